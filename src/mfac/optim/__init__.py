"""The M-FAC optimizer (dense, error-feedback top-k, or sharded over torch.distributed)."""

from .distributed import ShardedSlidingInverseFisher
from .mfac import MFAC
from .topk import GramFactor, TopKSlidingInverseFisher

__all__ = ["MFAC", "GramFactor", "ShardedSlidingInverseFisher", "TopKSlidingInverseFisher"]
