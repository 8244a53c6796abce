"""Uses of the M-FAC inverse Fisher beyond optimization and pruning: influence scores and a
Laplace posterior, built on `InverseFisher.from_model` and its linear-operator interface."""

from .influence import example_gradients, influence
from .laplace import Laplace, last_layer

__all__ = ["Laplace", "example_gradients", "influence", "last_layer"]
