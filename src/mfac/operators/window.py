"""The contract every sliding-window operator satisfies (docs/algorithms.md, section 3), and the
one place a window is built from its settings.

Three layouts implement it: dense rows (:class:`mfac.operators.sliding.SlidingInverseFisher`,
float32 / bfloat16 / float16 storage), error-feedback top-k rows
(:class:`mfac.operators.topk.TopKSlidingInverseFisher`) and dense rows sharded by coordinates
over a process group (:class:`mfac.operators.sharded.ShardedSlidingInverseFisher`; with the
caller's own pieces of FSDP2-sharded parameters, :mod:`mfac.operators.fsdp`). Both
optimizer rules talk to this protocol only, so every layout serves both, and a new layout is
one class with these members.

A window is *damped* (``damp`` a number: it keeps K = m*damp*I + G G^T and K^-1, and applies
F^-1 for F = damp*I + G^T G / m) or *undamped* (``damp=None``: it keeps G G^T alone, for a rule
that applies its own function of the window's spectrum through ``push_gather``, ``gram`` and
``scatter``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from .fsdp import LocalShardedInverseFisher, LocalShardedTopK
from .sharded import ShardedSlidingInverseFisher
from .sliding import SlidingInverseFisher
from .topk import TopKSlidingInverseFisher

LAYOUTS = ("dense", "topk")


@runtime_checkable
class SlidingWindow(Protocol):
    """A ring of the last m gradients G (m x d) and K, its m x m float64 Gram matrix.

    ``push_ihvp(g)`` is the paper's step: push g (as stored: rounded, compressed) and return
    F^-1 of it under the updated window. ``push_gather(g, x)`` pushes g and returns G x from the
    same pass; with ``gram`` and ``scatter`` (G^T c) it lets a rule apply any function of the
    window's spectrum in two passes. ``check_state`` validates a saved state without touching
    the live one, so that a caller can check everything before loading anything;
    ``load_state_dict`` is all-or-nothing on its own.
    """

    dim: int
    window: int

    @property
    def damp(self) -> float | None:
        """The absolute damping lambda; None for an undamped window."""
        ...

    @property
    def gram(self) -> torch.Tensor:
        """K = m*damp*I + G G^T (float64, m x m); G G^T in an undamped window."""
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
    def filled(self) -> int:
        """Slots holding a gradient: min(num_pushed, window)."""
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
        """Push ``g`` and return F^-1 g_stored under the updated window (damped windows)."""
        ...

    def push_gather(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Push ``g`` and return G x (m,) float64 under the updated window."""
        ...

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """G x (m,) float64 for x (d,)."""
        ...

    def scatter(
        self,
        coeff: torch.Tensor,
        out: torch.Tensor | None = None,
        plus: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """G^T c (d,) for c (m,), plus ``plus`` when given, written into ``out`` when given."""
        ...

    def ihvp(self, x: torch.Tensor) -> torch.Tensor:
        """F^-1 x for a vector x (d,) under the current window (damped windows)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically."""
        ...

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise, naming the field, unless ``state`` can be loaded; writes nothing."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check ``state`` and restore it; on refusal nothing changes."""
        ...


def window_bytes(
    dim: int,
    window: int,
    *,
    layout: str = "dense",
    dtype: torch.dtype = torch.float32,
    topk: int | None = None,
    world: int = 1,
    device: torch.device | str | None = None,
) -> int:
    """Peak bytes :func:`make_window` with these settings allocates (on this rank; for a local
    sharded window, ``dim`` and ``topk`` this rank's coordinates and entries per row give its
    bytes within a few d-sized buffers)."""
    if layout == "topk":
        if topk is None:
            raise ValueError("layout='topk' needs topk (entries kept per row)")
        return TopKSlidingInverseFisher.required_bytes(dim, window, topk, dtype, device)
    if world > 1:
        return ShardedSlidingInverseFisher.required_bytes(dim, window, world, dtype)
    return SlidingInverseFisher.required_bytes(dim, window, dtype)


def make_window(
    dim: int,
    window: int,
    damp: float | None,
    *,
    layout: str = "dense",
    dtype: torch.dtype = torch.float32,
    topk: int | None = None,
    process_group: Any = None,
    device: torch.device | str | None = None,
    memory_budget: int | None = None,
    mesh: Any = None,
    shapes: Any = None,
) -> SlidingWindow:
    """A window of ``window`` rows over ``dim`` coordinates: dense rows in ``dtype``
    (``layout="dense"``; sharded by columns over ``process_group`` when one is given) or
    error-feedback top-k rows of ``topk`` entries (``layout="topk"``).

    With ``mesh`` (a 1-D DeviceMesh) and ``shapes`` (the global shapes of parameters sharded
    with FSDP2's ``Shard(0)`` over it), a *local* sharded window
    (:mod:`mfac.operators.fsdp`): ``dim`` is this rank's number of coordinates, vectors in and
    out are this rank's pieces, and ``topk`` counts entries of the whole (global) row."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if mesh is not None:
        if process_group is not None:
            raise ValueError("give mesh (local sharded window) or process_group, not both")
        if shapes is None:
            raise ValueError("a local sharded window (mesh) needs the parameters' shapes")
        if layout == "topk":
            if topk is None:
                raise ValueError("layout='topk' needs topk (entries kept per row)")
            win: SlidingWindow = LocalShardedTopK(
                shapes, window, topk, damp, dtype, mesh, device=device,
                memory_budget=memory_budget,
            )  # fmt: skip
        else:
            win = LocalShardedInverseFisher(
                shapes, window, damp, dtype, mesh, device=device, memory_budget=memory_budget
            )
        if win.dim != dim:
            raise ValueError(f"dim={dim}, but this rank's shards of shapes hold {win.dim}")
        return win
    if layout == "topk":
        if process_group is not None:
            raise NotImplementedError("a top-k window cannot be sharded over a process group")
        if topk is None:
            raise ValueError("layout='topk' needs topk (entries kept per row)")
        return TopKSlidingInverseFisher(
            dim, window, topk, damp, dtype, device, memory_budget=memory_budget
        )
    if process_group is not None:
        return ShardedSlidingInverseFisher(
            dim, window, damp, dtype, process_group, device=device, memory_budget=memory_budget
        )
    return SlidingInverseFisher(dim, window, damp, dtype, device, memory_budget=memory_budget)


__all__ = ["LAYOUTS", "SlidingWindow", "make_window", "window_bytes"]
