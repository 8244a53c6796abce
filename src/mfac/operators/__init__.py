"""M-FAC inverse-Fisher operators: the static (fixed gradients, optionally blocked) and the
dynamic (sliding window) algorithms, and where their big buffers live."""

from .gradients import LossFn, ModelGradients, SampleFn, collect_gradients, sample_labels
from .layout import FlatLayout
from .memory import GradientBuffer, allocate, available_memory, default_memory_budget
from .sliding import SlidingInverseFisher
from .spectrum import SpectrumError
from .static import InverseFisher, build_from_rows
from .topk import TopKSlidingInverseFisher
from .window import SlidingWindow

__all__ = [
    "FlatLayout",
    "GradientBuffer",
    "InverseFisher",
    "LossFn",
    "ModelGradients",
    "SampleFn",
    "SlidingInverseFisher",
    "SlidingWindow",
    "SpectrumError",
    "TopKSlidingInverseFisher",
    "allocate",
    "available_memory",
    "build_from_rows",
    "collect_gradients",
    "default_memory_budget",
    "sample_labels",
]
