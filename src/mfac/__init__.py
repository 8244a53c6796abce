"""torch-mfac: cheap second-order information for PyTorch (M-FAC operators, the M-FAC
optimizer, OBS pruning, I-OBS sparse recovery, and curvature queries: influence, Laplace)."""

from . import curvature, prune, recovery
from ._validation import NonFiniteGradientError
from .curvature import influence
from .operators import GradientBuffer, InverseFisher, SlidingInverseFisher
from .optim import MFAC, MFACSGD

__version__ = "0.1.0"

__all__ = [
    "MFAC",
    "MFACSGD",
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
