"""The M-FAC optimizer. ``MFAC(params, lr)`` builds the default rule (``mode="adam"``,
:class:`ScaledMFAC`: per-tensor windows of Adam-whitened gradients, AdamW's step length);
``MFAC(..., mode="paper")`` builds the paper's step (:class:`PaperMFAC`: dense, error-feedback
top-k, or sharded over torch.distributed). docs/optim_transformers.md has the study.

The windows live in :mod:`mfac.operators` (they satisfy :class:`mfac.operators.SlidingWindow`);
they are re-exported here for the import paths of earlier versions."""

from ..operators.gram import GramFactor
from ..operators.sharded import ShardedSlidingInverseFisher
from ..operators.topk import TopKSlidingInverseFisher
from .base import MFAC
from .functional import GradientScaling, mfac_step
from .mfac import PaperMFAC
from .scaled import ScaledMFAC

__all__ = [
    "MFAC",
    "GradientScaling",
    "GramFactor",
    "PaperMFAC",
    "ScaledMFAC",
    "ShardedSlidingInverseFisher",
    "TopKSlidingInverseFisher",
    "mfac_step",
]
