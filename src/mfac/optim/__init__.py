"""The M-FAC optimizer (dense, error-feedback top-k, or sharded over torch.distributed)."""

from ..operators.gram import GramFactor
from .distributed import ShardedSlidingInverseFisher
from .mfac import MFAC
from .topk import TopKSlidingInverseFisher

__all__ = ["MFAC", "GramFactor", "ShardedSlidingInverseFisher", "TopKSlidingInverseFisher"]
