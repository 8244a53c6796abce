"""torch-mfac: cheap second-order information for PyTorch (M-FAC operators, the M-FAC
optimizer, OBS pruning and I-OBS sparse recovery)."""

from . import curvature, prune, recovery
from ._validation import NonFiniteGradientError
from .curvature import influence
from .operators import GradientBuffer, InverseFisher, SlidingInverseFisher
from .optim import MFAC

__version__ = "0.1.0"

__all__ = [
    "MFAC",
    "GradientBuffer",
    "InverseFisher",
    "NonFiniteGradientError",
    "SlidingInverseFisher",
    "__version__",
    "curvature",
    "influence",
    "prune",
    "recovery",
]
