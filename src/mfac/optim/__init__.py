"""The M-FAC optimizer (dense, error-feedback top-k, or sharded over torch.distributed), and
ScaledMFAC, its scale-aware variant for transformers (docs/optim_transformers.md).

The windows live in :mod:`mfac.operators` (they satisfy :class:`mfac.operators.SlidingWindow`);
they are re-exported here for the import paths of earlier versions."""

from ..operators.gram import GramFactor
from ..operators.sharded import ShardedSlidingInverseFisher
from ..operators.topk import TopKSlidingInverseFisher
from .functional import GradientScaling, mfac_step
from .mfac import MFAC
from .scaled import ScaledMFAC

__all__ = [
    "MFAC",
    "GradientScaling",
    "GramFactor",
    "ScaledMFAC",
    "ShardedSlidingInverseFisher",
    "TopKSlidingInverseFisher",
    "mfac_step",
]
