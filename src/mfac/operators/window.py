"""The contract every sliding-window inverse-Fisher operator satisfies (docs/algorithms.md,
section 3).

Three layouts implement it: the dense window (:class:`mfac.operators.sliding.SlidingInverseFisher`),
the error-feedback top-k window (:class:`mfac.operators.topk.TopKSlidingInverseFisher`) and the
window sharded by coordinates over a process group
(:class:`mfac.operators.sharded.ShardedSlidingInverseFisher`). The optimizer only talks to this
protocol, so a new layout is one class with these members.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class SlidingWindow(Protocol):
    """F^-1 for F = damp*I + G^T G / m over a ring of the last m gradients of dimension d.

    ``push_ihvp(g)`` is the optimizer's step: push g (as stored: rounded, compressed) and return
    F^-1 of it under the updated window. ``check_state`` validates a saved state without
    touching the live one, so that a caller can check everything before loading anything;
    ``load_state_dict`` is all-or-nothing on its own.
    """

    dim: int
    window: int

    @property
    def damp(self) -> float:
        """The absolute damping lambda."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the window lives."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the window's values."""
        ...

    @property
    def num_pushed(self) -> int:
        """Gradients pushed so far."""
        ...

    @property
    def next_slot(self) -> int:
        """The ring slot the next gradient goes to."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes held (window, m x m float64 matrices, and any per-coordinate state)."""
        ...

    def push(self, g: torch.Tensor) -> None:
        """Add a gradient (d,), replacing the oldest when the window is full."""
        ...

    def push_ihvp(self, g: torch.Tensor) -> torch.Tensor:
        """Push ``g`` and return F^-1 g_stored under the updated window (shape of g)."""
        ...

    def ihvp(self, x: torch.Tensor) -> torch.Tensor:
        """F^-1 x for a vector x (d,) under the current window."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically (cloned)."""
        ...

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise, naming the field, unless ``state`` can be loaded; writes nothing."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check ``state`` and restore it; on refusal nothing changes."""
        ...


__all__ = ["SlidingWindow"]
