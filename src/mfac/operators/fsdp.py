"""Windows over the local shards of FSDP2 parameters (``torch.distributed.fsdp.fully_shard``).

FSDP2 keeps each parameter as a DTensor sharded along dim 0 over a 1-D device mesh
(placement ``Shard(0)``, torch.chunk's split: rank r holds rows [r c, (r + 1) c) with
c = ceil(n_0 / P), possibly none). Flattened, a rank's piece of a parameter is one contiguous
run of the flattened parameter, so a window over some parameters is sharded by coordinates
exactly like :class:`mfac.operators.sharded.ShardedSlidingInverseFisher`, except that the
caller holds only its own piece. The windows here take and return *local* vectors (this rank's
pieces of the parameters, flattened and concatenated, d_local entries):

- ``push`` / ``push_gather`` / ``push_ihvp``: this rank's columns of the new row are written
  locally; the m products G g (+ |g|^2, two NaN/overflow flags, and with ``push_gather`` the m
  + 1 products with x) travel in one all-reduce of float64 numbers; K is replicated and
  updated identically on every rank;
- ``gather``: local products, one all-reduce of m numbers; ``scatter``: local, no
  communication (each rank needs only its own piece of G^T c);
- a rank keeps m x d_local of the window: 1/P of it.

:class:`LocalShardedTopK` is the error-feedback top-k window on local pieces: each rank keeps
the k_local = ceil(k d_local / d) largest entries of *its own* piece of e + g (the selection is
per shard, so the window differs from one process's top-k over the whole vector; it is the
top-k window of the concatenation of P independently compressed pieces). Its m x m products
are all-reduced as above.

Checkpoints (``state_dict``) hold the window's rows as DTensors sharded like the parameters
(rows of a parameter of shape (n_0, ...) as an (m, n_0, ...) DTensor with ``Shard(1)``; the
top-k window's per-rank rows as a (P, m, k_max) DTensor with ``Shard(0)``), and K, the ring
pointer and the damping as plain (replicated) values, so that ``torch.distributed.checkpoint``
saves every rank's piece once and no rank gathers a full window.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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
from .kernels import cols_dot, rows_dot
from .memory import check_fits, gram_nbytes
from .sharded import check_flags, column_products, commit_columns, insert_columns, shard_bounds
from .topk import TopKSlidingInverseFisher

F64 = torch.float64


def local_shape(shape: Sequence[int], world: int, rank: int) -> tuple[int, ...]:
    """The shape of rank ``rank``'s ``Shard(0)`` piece of a tensor of ``shape`` (torch.chunk)."""
    lo, hi = shard_bounds(int(shape[0]), world, rank)
    return (hi - lo, *(int(s) for s in shape[1:]))


def local_k(k: int, cols: int, dim: int) -> int:
    """Entries a rank with ``cols`` of the ``dim`` coordinates keeps of a top-k of ``k``."""
    return max(1, min(cols, math.ceil(k * cols / dim)))



def _require_process_group() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("a local sharded window needs torch.distributed initialised")

class ShardLayout:
    """Where a window's columns come from: parameters of global ``shapes``, each sharded with
    ``Shard(0)`` over the 1-D ``mesh``; this rank's pieces, flattened and concatenated, are the
    window's local columns. Wraps and unwraps a window's local tensors as DTensors for
    checkpoints (no communication)."""

    def __init__(self, shapes: Sequence[Sequence[int]], mesh: Any) -> None:
        if mesh is None or getattr(mesh, "ndim", None) != 1:
            raise ValueError("a local sharded window needs a 1-D DeviceMesh")
        if not shapes or any(len(s) == 0 for s in shapes):
            raise ValueError("shapes must be a non-empty list of shapes of dimension >= 1")
        self.mesh = mesh
        self.group = mesh.get_group()
        self.world, self.rank = mesh.size(), mesh.get_local_rank()
        self.shapes = [tuple(int(n) for n in s) for s in shapes]
        self.local_shapes = [local_shape(s, self.world, self.rank) for s in self.shapes]
        self.sizes = [math.prod(s) for s in self.local_shapes]
        self.cols = sum(self.sizes)
        self.dim = sum(math.prod(s) for s in self.shapes)

    def cols_of(self, rank: int) -> int:
        """Local columns of rank ``rank`` (every rank can tell, without communication)."""
        return sum(math.prod(local_shape(s, self.world, rank)) for s in self.shapes)

    def _from_local(self, t: torch.Tensor, placement: int, shape: tuple[int, ...]) -> Any:
        from torch.distributed.tensor import DTensor, Shard

        stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        return DTensor.from_local(
            t, self.mesh, [Shard(placement)], run_check=False, shape=shape, stride=stride
        )

    def _to_local(self, t: Any, field: str, placement: int, shape: tuple[int, ...],
                  local: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
        from torch.distributed.tensor import DTensor, Shard

        if not isinstance(t, DTensor):
            raise TypeError(
                f"{field} must be a DTensor sharded like the parameters (Shard({placement})), "
                f"got {type(t).__name__}"
            )
        if tuple(t.placements) != (Shard(placement),) or t.device_mesh.size() != self.world:
            raise ValueError(
                f"{field} has placements {tuple(t.placements)} over {t.device_mesh.size()} "
                f"ranks; this window needs (Shard(dim={placement}),) over {self.world}"
            )
        if tuple(t.shape) != shape or tuple(t.to_local().shape) != local:
            raise ValueError(
                f"{field} has shape {tuple(t.shape)} (local {tuple(t.to_local().shape)}), this "
                f"window needs {shape} (local {local})"
            )
        if t.dtype != dtype:
            raise TypeError(f"{field}: state stores {t.dtype}, this window stores {dtype}")
        return t.to_local()

    def wrap_columns(self, t: torch.Tensor) -> dict[str, Any]:
        """(..., cols) -> one DTensor per parameter, of shape (..., *shape), sharded on the
        parameter's dim 0 (a view when the window covers one parameter, else a copy)."""
        lead = tuple(t.shape[:-1])
        out, offset = {}, 0
        for i, (shape, local, size) in enumerate(
            zip(self.shapes, self.local_shapes, self.sizes, strict=True)
        ):
            piece = t[..., offset : offset + size]
            piece = piece if len(self.sizes) == 1 else piece.contiguous()
            out[str(i)] = self._from_local(piece.view(*lead, *local), len(lead), (*lead, *shape))
            offset += size
        return out

    def unwrap_columns(self, saved: Any, field: str, lead: tuple[int, ...],
                       dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
        """The inverse of :meth:`wrap_columns`, checked: (..., cols) (a new tensor)."""
        names = {str(i) for i in range(len(self.shapes))}
        if not isinstance(saved, Mapping) or set(saved) != names:
            raise ValueError(
                f"{field} must map '0'..'{len(self.shapes) - 1}' to the parameters' pieces"
            )
        pieces = [
            self._to_local(
                saved[str(i)], f"{field}['{i}']", len(lead), (*lead, *shape), (*lead, *local), dtype
            ).reshape(*lead, -1)
            for i, (shape, local) in enumerate(zip(self.shapes, self.local_shapes, strict=True))
        ]
        return torch.cat(pieces, dim=-1)

    def wrap_ranks(self, t: torch.Tensor) -> Any:
        """This rank's tensor t (same shape on every rank) as the rank's slice of a
        (P, *t.shape) DTensor sharded on dim 0."""
        return self._from_local(t.unsqueeze(0), 0, (self.world, *t.shape))

    def unwrap_ranks(self, saved: Any, field: str, shape: tuple[int, ...],
                     dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
        """The inverse of :meth:`wrap_ranks`, checked."""
        return self._to_local(saved, field, 0, (self.world, *shape), (1, *shape), dtype)[0]


def _check_local(v: torch.Tensor, cols: int, device: torch.device, name: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    check_float_dtype(v.dtype, name)
    flat = v.reshape(-1)
    if flat.numel() != cols:
        raise ValueError(f"{name} has {flat.numel()} entries, this rank's shard holds {cols}")
    if v.device != device:
        raise ValueError(f"{name} is on device {v.device}, the window lives on {device}")
    return flat


class LocalShardedInverseFisher(DenseRowsBacked):
    """A dense sliding window over this rank's ``Shard(0)`` pieces of parameters of global
    ``shapes`` on the 1-D ``mesh`` (see the module docstring): every method takes and returns
    local vectors (``dim`` = d_local entries), every rank calls it together.

    Satisfies :class:`mfac.operators.window.SlidingWindow`; damped (``damp`` a number, for
    ``push_ihvp`` and ``ihvp``) or undamped (``damp=None``: G G^T only).
    """

    @staticmethod
    def required_bytes(cols: int, window: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes one rank allocates: its m x d_local rows, the m x m float64 matrices and a
        step's d_local-sized buffers."""
        elem = torch.empty((), dtype=dtype).element_size()
        return window * cols * elem + gram_nbytes(window) + cols * (elem + 8)

    def __init__(
        self,
        shapes: Sequence[Sequence[int]],
        window: int,
        damp: float | None = 1e-5,
        dtype: torch.dtype = torch.float32,
        mesh: Any = None,
        *,
        device: torch.device | str | None = None,
        memory_budget: int | None = None,
    ) -> None:
        _require_process_group()
        check_positive_int(window, "window")
        check_float_dtype(dtype, "dtype")
        self.shards = ShardLayout(shapes, mesh)
        self.group = self.shards.group
        self.dim, self.global_dim, self.window = self.shards.cols, self.shards.dim, window
        device = torch.device(device) if device is not None else torch.device("cpu")
        check_fits(
            self.required_bytes(self.dim, window, dtype),
            f"a window shard of {window} x {self.dim} (with its {window} x {window} float64 "
            "matrices and step buffers)",
            memory_budget,
            device,
        )
        self.factor = GramFactor(window, damp, device)
        self._zero_rows_on_first_use((window, self.dim), dtype, device)

    @property
    def nbytes(self) -> int:
        """Bytes held on this rank: its rows plus the replicated K (and K^-1)."""
        return self.window_nbytes + self.factor.nbytes

    def _local(self, v: torch.Tensor, name: str) -> torch.Tensor:
        return _check_local(v, self.dim, self.device, name)

    def _products(self, part: torch.Tensor) -> torch.Tensor:
        """G x (m,) float64 summed over ranks, for this rank's piece of x: one all-reduce."""
        gx = torch.zeros(self.window, dtype=F64, device=self.device)
        if part.numel():
            gx += rows_dot(self.grads, part.to(torch.float32).unsqueeze(1))[:, 0].to(F64)
        dist.all_reduce(gx, group=self.group)
        return gx

    def _combine(self, coeff: torch.Tensor) -> torch.Tensor:
        """This rank's columns of G^T c (float32, local)."""
        if not self.dim:
            return torch.zeros(0, dtype=torch.float32, device=self.device)
        c = coeff.reshape(-1, 1).to(device=self.device, dtype=torch.float32)
        return cols_dot(self.grads, c)[:, 0].to(torch.float32)

    def push(self, g: torch.Tensor) -> None:
        """Push this rank's piece of the gradient (every rank together)."""
        flat = self._local(g, "gradient")
        insert_columns(self, flat, None, not finite_fast(flat))

    def push_gather(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Push this rank's piece of g; return the global G x (m,) float64 under the updated
        window for this rank's piece of x: one all-reduce for both."""
        flat = self._local(g, "gradient")
        part = self._local(x, "x").to(torch.float32)
        return insert_columns(self, flat, part, not finite_fast(flat))[1]

    def push_ihvp(self, g: torch.Tensor) -> torch.Tensor:
        """Push this rank's piece of g; return this rank's piece of F^-1 g_stored (local)."""
        self.factor.require_inverse()  # an undamped window refuses before pushing
        flat = self._local(g, "gradient")
        slot, _ = insert_columns(self, flat, None, not finite_fast(flat))
        coeff = self.factor.slot_coeff(slot)
        return self._combine(coeff).to(g.dtype).view_as(g)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """G x (m,) float64 for this rank's piece of x: one all-reduce of m numbers."""
        return self._products(self._local(x, "x"))

    def scatter(
        self,
        coeff: torch.Tensor,
        out: torch.Tensor | None = None,
        plus: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """This rank's piece of G^T c (+ ``plus``, into ``out``): local, no communication."""
        if not isinstance(coeff, torch.Tensor) or coeff.numel() != self.window:
            raise ValueError(f"coeff must be a tensor of {self.window} entries (one per row)")
        result = self._combine(coeff)
        if plus is not None:
            result = torch.add(plus.reshape(-1), result)
        return result if out is None else out.view(-1).copy_(result)

    def ihvp(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's piece of F^-1 x = (x - G^T K^-1 G x) / lambda (one all-reduce)."""
        part = self._local(x, "x").to(torch.float32)
        c = self.factor.solve(self._products(part)[:, None])
        return ((part - self._combine(c)) / self.damp).to(x.dtype).view_as(x)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The rows as DTensors sharded like the parameters (``rows``: one per parameter, the
        live rows by reference when the window covers one parameter), K and the pointer
        (replicated, plain)."""
        return {"rows": self.shards.wrap_columns(self.grads), **self.factor.state_dict()}

    def _rows(self, state: Mapping[str, Any]) -> torch.Tensor:
        if not isinstance(state, Mapping):
            raise TypeError(f"window state must be a mapping, got {type(state).__name__}")
        if "rows" not in state:
            raise KeyError("state is missing the field 'rows'")
        return self.shards.unwrap_columns(state["rows"], "rows", (self.window,), self.dtype)

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise, naming the field, unless ``state`` fits this rank's shard (DTensor rows of
        the right shapes, dtype, finite values; K, its inverse, the pointer, the damping).
        Rank-local: K against the rows would need every rank, so it is not checked."""
        rows = self._rows(state)
        if not finite_fast(rows):
            raise ValueError("rows contains NaN or Inf")
        self.factor.check_state(state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore this rank's shard from :meth:`state_dict` (checked first)."""
        self.check_state(state)
        rows = self._rows(state)
        self.factor.load_state_dict(state, check=False)
        self.grads.copy_(rows)

    def __repr__(self) -> str:
        return (
            f"LocalShardedInverseFisher(dim={self.dim} of {self.global_dim}, "
            f"window={self.window}, rank={self.shards.rank}/{self.shards.world})"
        )


def push_gather_all(
    windows: Sequence[LocalShardedInverseFisher],
    gs: Sequence[torch.Tensor],
    xs: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """``[w.push_gather(g, x) for ...]`` for dense local windows on one process group, with
    ONE all-reduce for all of them (instead of one per window): per-tensor windows of a model
    with hundreds of tensors pay the all-reduce's latency once. When any rank saw NaN/Inf (or
    an overflow) in any window, every rank raises with every window unchanged."""
    groups = {id(w.group) for w in windows}
    if len(groups) != 1:
        raise ValueError("push_gather_all needs windows on one process group")
    parts, shares = [], []
    for w, g, x in zip(windows, gs, xs, strict=True):
        flat = w._local(g, "gradient")
        part_x = w._local(x, "x").to(torch.float32)
        parts.append(flat)
        shares.append(column_products(w, flat, part_x, not finite_fast(flat)))
    u = torch.cat(shares)
    dist.all_reduce(u, group=windows[0].group)
    pieces = u.split([t.numel() for t in shares])
    for w, piece in zip(windows, pieces, strict=True):
        check_flags(piece, w.window)
    return [
        commit_columns(w, part, piece, True)[1]
        for w, part, piece in zip(windows, parts, pieces, strict=True)
    ]


class LocalShardedTopK(TopKSlidingInverseFisher):
    """The error-feedback top-k window over this rank's ``Shard(0)`` pieces (see the module
    docstring): rank r keeps the k_r = ceil(k d_r / d) largest entries of its own piece of
    e + g; the products of a new row with the window (and G x) are all-reduced, so K is the
    Gram matrix of the concatenated rows. Local vectors in and out, as
    :class:`LocalShardedInverseFisher`."""

    def __init__(
        self,
        shapes: Sequence[Sequence[int]],
        window: int,
        k: int,
        damp: float | None = 1e-5,
        dtype: torch.dtype = torch.float32,
        mesh: Any = None,
        *,
        device: torch.device | str | None = None,
        memory_budget: int | None = None,
    ) -> None:
        _require_process_group()
        shards = ShardLayout(shapes, mesh)
        check_positive_int(k, "k")
        if k > shards.dim:
            raise ValueError(f"k={k} exceeds the dimension {shards.dim}")
        counts = [shards.cols_of(r) for r in range(shards.world)]
        if min(counts) == 0:  # every rank can tell: all refuse together
            raise ValueError(
                f"a sharded top-k window needs coordinates on every rank; the parameters' "
                f"shards hold {counts} entries"
            )
        self.shards, self.group, self.k_global = shards, shards.group, k
        #: Entries each rank keeps per row (this rank's is ``self.k``).
        self.k_ranks = [local_k(k, c, shards.dim) for c in counts]
        super().__init__(
            shards.cols, window, self.k_ranks[shards.rank], damp, dtype, device,
            memory_budget=memory_budget,
        )  # fmt: skip
        self.global_dim = shards.dim
        self._bad = False
        self._loading = False
        self._checks_gram = False  # K against the rows would need every rank

    def _select(self, flat: torch.Tensor, acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The selection; a NaN/Inf on this rank is only flagged here (the all-reduce in
        :meth:`_reduce` makes every rank raise together)."""
        try:
            self._bad = False
            return super()._select(flat, acc)
        except NonFiniteGradientError:
            self._bad = True
            idx = torch.arange(self.k, device=self.device)
            return idx, torch.zeros(self.k, dtype=torch.float32, device=self.device)

    def _reduce(
        self,
        slot: int,
        u: torch.Tensor,
        products: Any,
        own: Any,
        x: Any,
        idx: torch.Tensor,
        kept: torch.Tensor,
    ) -> tuple[torch.Tensor, Any, Any]:
        """Sum the new row's products (and G x) over the ranks in one all-reduce."""
        m = self.window
        if x is not None and products is None:  # the torch path: G x with the old rows
            products = self._gather(x)
            own = float(torch.dot(kept, x[idx]))
        width = m + 1 + (m + 1 if x is not None else 0)
        vec = torch.zeros(width, dtype=F64, device=self.device)
        vec[:m] = u
        vec[m] = 1.0 if self._bad else 0.0
        if x is not None:
            vec[m + 1 : 2 * m + 1] = products
            vec[2 * m + 1] = own
        dist.all_reduce(vec, group=self.group)
        if vec[m] > 0:
            raise NonFiniteGradientError("gradient contains NaN or Inf; the window is unchanged")
        if x is None:
            return vec[:m].clone(), None, None
        return vec[:m].clone(), vec[m + 1 : 2 * m + 1].clone(), float(vec[2 * m + 1])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """G x (m,) float64 for this rank's piece of x: one all-reduce of m numbers."""
        gx = super().gather(x)
        dist.all_reduce(gx, group=self.group)
        return gx

    def ihvp(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's piece of F^-1 x (one all-reduce)."""
        xf = self._check_grad(x).to(torch.float32)
        c = self.factor.solve(self.gather(xf)[:, None])[:, 0]
        return ((xf - self._scatter(c)) / self.damp).to(x.dtype).view_as(x)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Rows (values, int32 indices) as this rank's slice of (P, m, k_max) DTensors padded
        with zeros, the error vector sharded like the parameters, K and the pointer (plain).
        Copies, except the error vector when the window covers one parameter."""
        kmax = max(self.k_ranks)
        values = torch.zeros(self.window, kmax, dtype=self.dtype, device=self.device)
        indices = torch.zeros(self.window, kmax, dtype=torch.int32, device=self.device)
        for slot in range(self.window):
            v, i = self.row(slot)
            values[slot, : self.k] = v
            indices[slot, : self.k] = i.to(torch.int32)
        return {
            "values": self.shards.wrap_ranks(values),
            "indices": self.shards.wrap_ranks(indices),
            "error": self.shards.wrap_columns(self.error),
            **self.factor.state_dict(),
        }

    def _local_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """The saved state as this rank's row-major window state (checked shapes)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"window state must be a mapping, got {type(state).__name__}")
        for key in ("values", "indices", "error"):
            if key not in state:
                raise KeyError(f"state is missing the field {key!r}")
        shape = (self.window, max(self.k_ranks))
        values = self.shards.unwrap_ranks(state["values"], "values", shape, self.dtype)
        indices = self.shards.unwrap_ranks(state["indices"], "indices", shape, torch.int32)
        error = self.shards.unwrap_columns(state["error"], "error", (), torch.float32)
        return {
            **{k: v for k, v in state.items() if k not in ("values", "indices", "error")},
            "values": values[:, : self.k].contiguous(),
            "indices": indices[:, : self.k].to(self._index_dtype),
            "error": error,
        }

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise, naming the field, unless ``state`` fits this rank's shard. Rank-local: K
        against the rows would need every rank, so it is not checked."""
        if self._loading:  # the base class's load checks the unwrapped state
            super().check_state(state)
            return
        local = self._local_state(state)
        self._loading = True
        try:
            super().check_state(local)
        finally:
            self._loading = False

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore this rank's shard from :meth:`state_dict` (checked first)."""
        local = self._local_state(state)
        self._loading = True
        try:
            super().load_state_dict(local)
        finally:
            self._loading = False

    def __repr__(self) -> str:
        return (
            f"LocalShardedTopK(dim={self.dim} of {self.global_dim}, window={self.window}, "
            f"k={self.k} of {self.k_global}, rank={self.shards.rank}/{self.shards.world})"
        )


__all__ = [
    "LocalShardedInverseFisher",
    "LocalShardedTopK",
    "ShardLayout",
    "local_k",
    "local_shape",
    "push_gather_all",
]
