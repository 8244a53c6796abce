"""The sliding window sharded by coordinates over a torch.distributed process group.

Rank p of P holds the columns [lo_p, hi_p) of the m x d window (about m*d/P entries). For an
incoming gradient g (identical on every rank, as after DDP's all-reduce):

- u = G g is the sum over ranks of the partial products G[:, lo:hi] g[lo:hi]: one all-reduce
  of m numbers (plus one flag that says whether any rank saw NaN/Inf, so every rank raises
  together and nobody deadlocks);
- K and K^-1 are replicated (m x m, float64), updated identically everywhere;
- the step F^-1 g = m G^T K^-1 e_r is local per column slice; the slices are all-gathered so
  that every rank can update its full parameter copy (d numbers, the same volume as DDP's
  gradient all-reduce).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from .._validation import (
    NonFiniteGradientError,
    check_float_dtype,
    check_positive_int,
    finite_fast,
)
from .gram import DenseRowsBacked, GramFactor
from .kernels import cols_dot, rows_dot, squared_norm
from .memory import check_fits, gram_nbytes

F64 = torch.float64


def shard_bounds(dim: int, world: int, rank: int) -> tuple[int, int]:
    """Columns [lo, hi) of rank ``rank``: equal chunks of ceil(dim / world), the last shorter."""
    chunk = -(-dim // world)
    lo = min(dim, rank * chunk)
    return lo, min(dim, lo + chunk)


def insert_columns(
    win: Any, part: torch.Tensor, part_x: torch.Tensor | None, bad: bool
) -> tuple[int, torch.Tensor | None]:
    """Write ``part`` (this rank's columns of the new gradient) into the next slot of a
    column-sharded window ``win`` (``grads``, ``factor``, ``window``, ``group``) and update the
    replicated K; with ``part_x`` (this rank's columns of x, float32) also G x under the updated
    window. ``bad``: this rank saw NaN/Inf. One all-reduce carries the m products, |g|^2, the
    two flags (every rank raises together) and, with x, the m + 1 products with x.
    Returns (slot, G x or None)."""
    u = column_products(win, part, part_x, bad)
    dist.all_reduce(u, group=win.group)
    check_flags(u, win.window)
    return commit_columns(win, part, u, part_x is not None)


def column_products(
    win: Any, part: torch.Tensor, part_x: torch.Tensor | None, bad: bool
) -> torch.Tensor:
    """This rank's share of what :func:`insert_columns` all-reduces (float64): u[:m] = G g
    (old rows), u[m] = |g_stored|^2, u[m+1] the NaN/Inf flag, u[m+2] the overflow flag, and
    with x u[m+3 : 2m+3] = G x (old rows), u[2m+3] = g_stored . x."""
    stored = part.to(win.grads.dtype)
    m = win.window
    u = torch.zeros(m + 3 + (m + 1 if part_x is not None else 0), dtype=F64, device=win.device)
    if part.numel() and not bad:
        if part_x is None:
            u[:m] = rows_dot(win.grads, stored.unsqueeze(1))[:, 0].to(F64)
        else:
            wide = stored.to(torch.float32)
            both = rows_dot(win.grads, torch.stack([wide, part_x], 1)).to(F64)
            u[:m], u[m + 3 : 2 * m + 3] = both[:, 0], both[:, 1]
            u[2 * m + 3] = float(torch.dot(wide, part_x))
        u[m] = squared_norm(stored)
    u[m + 1] = 1.0 if bad else 0.0
    # finite gradient, non-finite products: an overflow of the storage dtype
    overflow = not bad and not bool(torch.isfinite(u[: m + 1]).all())
    u[m + 2] = 1.0 if overflow else 0.0
    u[: m + 1].nan_to_num_(0.0, 0.0, 0.0)
    return u


def check_flags(u: torch.Tensor, m: int) -> None:
    """Raise (on every rank alike) when the all-reduced flags of :func:`column_products` say
    that some rank saw NaN/Inf or an overflow."""
    if u[m + 1] > 0:
        raise NonFiniteGradientError("gradient contains NaN or Inf; the window is unchanged")
    if u[m + 2] > 0:
        raise NonFiniteGradientError(
            "the products G g of the window with this gradient overflow float32, so K "
            "cannot be formed; scale the loss down or clip the gradients (damping cannot "
            "help). The window is unchanged."
        )


def commit_columns(
    win: Any, part: torch.Tensor, u: torch.Tensor, with_x: bool
) -> tuple[int, torch.Tensor | None]:
    """Store ``part`` in the next slot and update K from the all-reduced ``u`` (flags already
    checked); returns (slot, G x under the updated window or None)."""
    m = win.window
    slot = win.factor.next_slot
    u_row = u[:m].clone()
    u_row[slot] = u[m]
    old = win.grads[slot].clone()
    win.grads[slot] = part.to(win.grads.dtype)
    try:
        win.factor.commit(u_row)
    except (RuntimeError, NonFiniteGradientError):
        win.grads[slot] = old
        raise
    if not with_x:
        return slot, None
    products = u[m + 3 : 2 * m + 3].clone()
    products[slot] = u[2 * m + 3]
    return slot, products


class ShardedSlidingInverseFisher(DenseRowsBacked):
    """Sliding-window F^-1 whose m x d window is split by columns over ``process_group``.

    Satisfies :class:`mfac.operators.window.SlidingWindow`: ``push_ihvp(g)`` and ``ihvp(x)``
    take the full vector (d,) and return the full result (d,), identical on every rank (every
    rank must call them together); ``state_dict()`` holds this rank's shard plus the
    replicated K and K^-1.
    """

    @staticmethod
    def required_bytes(dim: int, window: int, world: int, dtype: torch.dtype) -> int:
        """Bytes one rank allocates: its m x ceil(d/P) shard, the m x m float64 matrices, and
        the step's gathered float32 buffers (three of length P * ceil(d/P))."""
        chunk = -(-dim // world)
        elem = torch.empty((), dtype=dtype).element_size()
        return window * chunk * elem + gram_nbytes(window) + 3 * chunk * world * 4

    def __init__(
        self,
        dim: int,
        window: int,
        damp: float | None = 1e-5,
        dtype: torch.dtype = torch.float32,
        process_group: dist.ProcessGroup | None = None,
        *,
        device: torch.device | str | None = None,
        memory_budget: int | None = None,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "process_group was given but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first (torchrun does the rendezvous)"
            )
        check_positive_int(dim, "dim")
        check_positive_int(window, "window")
        check_float_dtype(dtype, "dtype")
        self.group = process_group
        self.world = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.dim, self.window = dim, window
        self.lo, self.hi = shard_bounds(dim, self.world, self.rank)
        self.chunk = -(-dim // self.world)
        device = torch.device(device) if device is not None else torch.device("cpu")
        check_fits(
            self.required_bytes(dim, window, self.world, dtype),
            f"a window shard of {window} x {self.chunk} (with its {window} x {window} float64 "
            "matrices and step buffers)",
            memory_budget,
            device,
        )
        self.factor = GramFactor(window, damp, device)
        self._zero_rows_on_first_use((window, self.hi - self.lo), dtype, device)
        self._gathered = torch.zeros(self.chunk * self.world, dtype=torch.float32, device=device)

    @property
    def nbytes(self) -> int:
        """Bytes held on this rank: the shard plus the replicated K and K^-1."""
        return self.window_nbytes + self.factor.nbytes

    def _gather_full(self, local: torch.Tensor) -> torch.Tensor:
        """All-gather every rank's column slice (float32) into the full vector (d,), a tensor
        of its own (the gather buffer is reused: a view of it would change at the next call)."""
        out = self._gathered
        chunks = list(out.split(self.chunk))
        mine = torch.zeros(self.chunk, dtype=torch.float32, device=self.device)
        mine[: local.numel()] = local
        dist.all_gather(chunks, mine, group=self.group)
        return out[: self.dim].clone()

    def push(self, g: torch.Tensor) -> None:
        """Push the full gradient ``g`` (d,) (every rank together)."""
        self._insert(g)

    def push_ihvp(self, g: torch.Tensor) -> torch.Tensor:
        """Push the full gradient ``g`` (d,) and return the full F^-1 g_stored (d,)."""
        self.factor.require_inverse()  # an undamped window refuses before pushing
        slot, _ = self._insert(g)
        coeff = self.factor.slot_coeff(slot)
        local = cols_dot(self.grads, coeff)[:, 0].to(torch.float32)
        return self._gather_full(local).to(g.dtype).view_as(g)

    def ihvp(self, x: torch.Tensor) -> torch.Tensor:
        """F^-1 x = (x - G^T K^-1 G x) / lambda for the full x (d,) (every rank together)."""
        self.factor.require_inverse()
        gx = self.gather(x)
        part = x.reshape(-1)[self.lo : self.hi].to(torch.float32)
        c = self.factor.solve(gx[:, None])
        local = (part - cols_dot(self.grads, c)[:, 0].to(torch.float32)) / self.damp
        return self._gather_full(local).to(x.dtype).view_as(x)

    def push_gather(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Push the full ``g`` (d,) and return G x (m,) float64 under the updated window, for
        the full x (d,): the products travel in the push's one all-reduce."""
        flat = x.reshape(-1)
        if flat.numel() != self.dim:
            raise ValueError(f"x has {flat.numel()} entries, the window holds {self.dim}")
        return self._insert(g, flat[self.lo : self.hi].to(torch.float32))[1]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """G x (m,) float64 for the full x (d,): local products, one all-reduce of m numbers."""
        flat = x.reshape(-1)
        if flat.numel() != self.dim:
            raise ValueError(f"x has {flat.numel()} entries, the window holds {self.dim}")
        part = flat[self.lo : self.hi].to(torch.float32)
        gx = torch.zeros(self.window, dtype=F64, device=self.device)
        if part.numel():
            gx += rows_dot(self.grads, part.unsqueeze(1))[:, 0].to(F64)
        dist.all_reduce(gx, group=self.group)
        return gx

    def scatter(
        self,
        coeff: torch.Tensor,
        out: torch.Tensor | None = None,
        plus: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """G^T c (d,) float32 for c (m,), plus ``plus``, into ``out`` when given: this rank's
        columns, then one all-gather (every rank together)."""
        if not isinstance(coeff, torch.Tensor) or coeff.numel() != self.window:
            raise ValueError(f"coeff must be a tensor of {self.window} entries (one per row)")
        c = coeff.reshape(-1, 1).to(device=self.device, dtype=torch.float32)
        local = cols_dot(self.grads, c)[:, 0].to(torch.float32)
        result = self._gather_full(local)
        if plus is not None:  # result is this call's own buffer: add in place
            result.add_(plus.reshape(-1))
        return result if out is None else out.view(-1).copy_(result)

    def _insert(
        self, g: torch.Tensor, part_x: torch.Tensor | None = None
    ) -> tuple[int, torch.Tensor | None]:
        """Write this rank's slice of ``g`` into the next slot and update the replicated K;
        with ``part_x`` (this rank's slice of x, float32) also G x under the updated window.
        Returns (slot, G x or None)."""
        flat = g.reshape(-1)
        if flat.numel() != self.dim:
            raise ValueError(f"gradient has {flat.numel()} entries, the window holds {self.dim}")
        # the whole gradient, not only this slice: gradients that differ across ranks (no DDP)
        # still make every rank raise together
        return insert_columns(self, flat[self.lo : self.hi], part_x, not finite_fast(flat))

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard (by reference, as ``torch.optim`` returns its state), its bounds,
        and the replicated K (each rank saves its own)."""
        return {
            "grads": self.grads,
            "lo": self.lo,
            "hi": self.hi,
            "world": self.world,
            **self.factor.state_dict(),
        }

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise, naming the field, unless ``state`` is this rank's consistent state (layout,
        shapes, dtypes, finite values, pointer, damping, K^-1 against K). Rank-local: the
        check that K equals m*damp*I + G G^T would need every rank, so it is not made here."""
        if not isinstance(state, Mapping):
            raise TypeError(f"window state must be a mapping, got {type(state).__name__}")
        for key in ("grads", "lo", "hi", "world"):
            if key not in state:
                raise KeyError(f"state is missing the field {key!r}")
        if (state["lo"], state["hi"], state["world"]) != (self.lo, self.hi, self.world):
            raise ValueError(
                f"lo/hi/world: state was saved for columns [{state['lo']}, {state['hi']}) of a "
                f"world of {state['world']}; this rank holds [{self.lo}, {self.hi}) of {self.world}"
            )
        grads = state["grads"]
        if not isinstance(grads, torch.Tensor):
            raise TypeError(f"grads must be a tensor, got {type(grads).__name__}")
        if tuple(grads.shape) != self.rows_shape:
            raise ValueError(
                f"grads has shape {tuple(grads.shape)}, this shard {self.rows_shape}"
            )
        if grads.dtype != self.dtype:
            raise TypeError(f"grads: state stores {grads.dtype}, this shard {self.dtype}")
        if not finite_fast(grads):
            raise ValueError("grads contains NaN or Inf")
        self.factor.check_state(state)

    def __repr__(self) -> str:
        return (
            f"ShardedSlidingInverseFisher(dim={self.dim}, window={self.window}, "
            f"rank={self.rank}/{self.world}, columns=[{self.lo}, {self.hi}))"
        )


__all__ = ["ShardedSlidingInverseFisher", "shard_bounds"]
