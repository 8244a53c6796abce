"""EFCP: the sliding window with error-feedback top-k rows (docs/algorithms.md section 3).

Each gradient g is added to the error e, the k largest magnitudes c of a = e + g are stored
(k values + int16/int32 indices), and e = a - c carries the rest into later steps. G x is a
gather, G^T y a scatter-add, both O(m k); the m x m algebra is
:class:`mfac.operators.gram.GramFactor`. On the CPU (float32/bfloat16/float16 values) the rows
live in the tile-major layout of :mod:`mfac.operators.tiled`, whose C sweeps stream the window,
and :mod:`mfac.operators.sparse_native` selects without d-sized temporaries; otherwise torch
keeps the rows as (m, k) tensors and does the same in row chunks of bounded size, so that no
temporary grows with m k.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import torch

from .._validation import (
    NonFiniteGradientError,
    check_float_dtype,
    check_positive_int,
    finite_fast,
)
from . import sparse_native, tiled
from .gram import FactorBacked, GramFactor, placed
from .memory import FileMappings, adoptable, check_fits, gram_nbytes
from .static import advise_huge_pages

F64 = torch.float64
#: Bytes of the temporaries one chunk of the gather / scatter may use.
CHUNK_BYTES = 32 * 2**20
#: Below this dimension the selection is a plain torch.topk.
SMALL_SELECT = 1 << 16


def resolve_k(topk: int | float | None, dim: int) -> int:
    """Entries kept per row: an int k (1 <= k <= dim) or a density in (0, 1]."""
    if topk is None:
        raise ValueError("layout='topk' needs topk: an int k or a density in (0, 1]")
    if isinstance(topk, bool):
        raise TypeError(f"topk must be an int or a float density, got {topk!r}")
    if isinstance(topk, float):
        if not (math.isfinite(topk) and 0.0 < topk <= 1.0):
            raise ValueError(f"topk as a density must lie in (0, 1], got {topk}")
        return max(1, min(dim, round(topk * dim)))
    if isinstance(topk, int):
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        return min(topk, dim)
    raise TypeError(f"topk must be an int or a float density, got {type(topk).__name__}")


def sample_threshold(sample: torch.Tensor, k: int, d: int) -> float:
    """A magnitude t read off ``sample`` (a strided sample of the d magnitudes) such that, with
    high probability, a little more than k of the d entries satisfy |a| >= t."""
    s = sample.numel()
    p = k / d
    p_cand = min(1.0, 1.2 * p + 6.0 * math.sqrt(p * (1.0 - p) / s) + 2.0 / s)
    rank = max(1, min(s, math.floor((1.0 - p_cand) * s)))
    return float(torch.kthvalue(sample, rank).values)


def candidate_cap(k: int) -> int:
    """Most candidates the sampled threshold may let through before the exact fallback runs."""
    return 4 * k + 1024


def sample_stride(d: int) -> int:
    """Stride of the threshold's sample (about 2^18 entries)."""
    return max(1, d // (1 << 18))


def largest_positions(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (ascending) of the k largest entries of ``mag``; ties at the k-th largest
    keep the lowest positions (as the C selection does, so both paths pick the same rows).
    The k-th largest comes from torch.topk of the smaller side (the few smallest when most
    entries stay), so the partial sort never exceeds min(k, n - k) entries."""
    n = mag.numel()
    if k >= n:
        return torch.arange(n, device=mag.device)
    if n - k < k:  # the k-th largest is the largest of the n - k + 1 smallest
        kth = torch.topk(mag, n - k + 1, largest=False, sorted=False).values.max()
    else:
        kth = torch.topk(mag, k, sorted=False).values.min()
    keep = mag > kth
    ties = (mag == kth).nonzero().squeeze(1)
    keep[ties[: k - int(keep.sum())]] = True
    return keep.nonzero().squeeze(1)


def largest_among(cand: torch.Tensor, mag: torch.Tensor, k: int) -> torch.Tensor:
    """The k candidates (ascending coordinates ``cand``, magnitudes ``mag``) of largest
    magnitude, in ascending order."""
    return cand[largest_positions(mag, k)]


def topk_indices(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64) of the k largest entries of the non-negative vector ``mag``.

    Exact without sorting all of ``mag``: a threshold t is read off a strided sample so that a
    little more than k entries satisfy mag >= t; those candidates contain the k largest
    (whenever at least k pass, the k-th largest is >= t), and :func:`largest_positions` picks
    them from the candidates. Falls back to all of ``mag`` when the sample misjudges. The
    indices come out ascending (the window's gathers read memory in order), ties at the k-th
    largest keep the lowest indices."""
    d = mag.numel()
    if d <= SMALL_SELECT or 4 * k >= d:
        return largest_positions(mag, k)
    threshold = sample_threshold(mag[:: sample_stride(d)], k, d)
    cand = torch.nonzero(mag >= threshold).squeeze(1)
    if cand.numel() < k or cand.numel() > candidate_cap(k):
        return largest_positions(mag, k)
    return largest_among(cand, mag[cand], k)


def _native_select(
    error: torch.Tensor, grad: torch.Tensor, acc: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """acc = error + grad, the ascending coordinates of its k largest magnitudes and acc there,
    with the C selection pass (no d-sized temporary; the candidates' values come out of the
    same pass), the k largest among the candidates by a radix select in C. Without enough
    candidates (or too many), the exact k-th largest magnitude by bisection instead. Either
    way: all entries above the k-th magnitude and the lowest coordinates among its ties.
    Raises on NaN/Inf."""
    d = acc.numel()
    stride = sample_stride(d)
    threshold = sample_threshold((error[::stride] + grad[::stride]).abs_(), k, d)
    cap = candidate_cap(k)
    cand, cval, count, bad = sparse_native.select_values(error, grad, acc, threshold, cap)
    if bad:
        raise NonFiniteGradientError("gradient contains NaN or Inf; the window is unchanged")
    if k <= count <= cap:
        return sparse_native.keep_largest(cand, cval, k)
    del cand, cval
    kth = sparse_native.kth_largest(acc, k)
    cand, count = sparse_native.list_range(acc, kth, math.inf, cap)
    if count <= cap:
        return sparse_native.keep_largest(cand, acc[cand], k)
    above_kth = float(torch.tensor(kth).nextafter(torch.tensor(math.inf)))  # in float32
    above, n_above = sparse_native.list_range(acc, above_kth, math.inf, k)
    ties, _ = sparse_native.list_range(acc, kth, kth, k - n_above)
    idx = torch.cat([above, ties]).sort().values
    return idx, acc[idx]


def _references(t: torch.Tensor) -> int:
    """Python references to ``t`` as seen from here (compared only with itself)."""
    return sys.getrefcount(t)


def _unshared(t: torch.Tensor) -> bool:
    """True when no other tensor shares ``t``'s TensorImpl (autograd, views' bases) and no
    other owner holds its storage (views, NumPy arrays). False when torch cannot tell."""
    storage_uses = getattr(torch._C, "_storage_Use_Count", None)
    if storage_uses is None or not hasattr(t, "_use_count"):
        return False
    if t._use_count() != 1:
        return False
    return storage_uses(t.untyped_storage()._cdata) == 2  # the tensor and this storage object


class TopKSlidingInverseFisher(FactorBacked):
    """EFCP sliding window: rows are top-k sparse (values in ``dtype`` + int16/int32 indices).

    ``push_ihvp(g)`` forms a = e + g, stores c = top-k(a) as the new row, keeps e = a - c, and
    returns F^-1 c = m G^T K^-1 e_r under the updated window (the applied step is the
    preconditioned compressed vector; what top-k dropped returns through e in later steps).
    Memory: m*k*(value bytes + index bytes) for the window, d floats for the error, the m x m
    float64 matrices, and a step's d-sized buffers (see :meth:`required_bytes`).
    """

    #: Whether ``check_state`` checks K against the saved rows (a window whose rows are one
    #: rank's share of K's rows cannot, on its own).
    _checks_gram: bool = True
    _row_attrs = ("rows", "values", "indices")

    def __init__(
        self,
        dim: int,
        window: int,
        k: int,
        damp: float | None = 1e-5,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        *,
        memory_budget: int | None = None,
    ) -> None:
        check_positive_int(dim, "dim")
        check_positive_int(window, "window")
        check_positive_int(k, "k")
        if k > dim:
            raise ValueError(f"k={k} exceeds the dimension {dim}")
        check_float_dtype(dtype, "dtype")
        device = torch.device(device) if device is not None else torch.device("cpu")
        index_dtype = self.index_dtype(dim)
        check_fits(
            self.required_bytes(dim, window, k, dtype),
            f"a top-k window of {window} x {k} entries over {dim} coordinates (with its "
            f"{window} x {window} float64 matrices, error buffer and step temporaries)",
            memory_budget,
            device,
        )
        self.dim, self.window, self.k = dim, window, k
        self._device, self._dtype, self._index_dtype = placed(device), dtype, index_dtype
        self.factor = GramFactor(window, damp, device)
        #: Whether the C kernels run the gathers, scatters and the selection (CPU, float32 /
        #: bfloat16 / float16 values and a working C compiler); else the torch path.
        self.native = self.native_for(dtype, device)
        self._rows_on_first_use()  # ``rows`` on the C path, ``values``/``indices``
        self.error = sparse_native.empty_huge((dim,), torch.float32, device).zero_()

    def _allocate_rows(self) -> None:
        """The empty window: m rows of k zeros at the coordinates 0..k-1, on huge pages."""
        device, dtype, index_dtype = self._device, self._dtype, self._index_dtype
        huge = sparse_native.empty_huge  # big buffers on huge pages (fewer page walks)
        if self.native:
            #: The rows in the tile-major layout (the C path).
            self.rows = tiled.TiledRows(
                self.dim, self.window, self.k, dtype, index_dtype,
                empty=lambda shape, dt: huge(shape, dt, device),
            )  # fmt: skip
            self.values, self.indices = self.rows.values, self.rows.indices
        else:
            #: The rows as (m, k) tensors (the torch path).
            self.values = huge((self.window, self.k), dtype, device).zero_()
            self.indices = huge((self.window, self.k), index_dtype, device)
            self.indices.copy_(torch.arange(self.k, device=device))  # zeros at 0..k-1

    @staticmethod
    def index_dtype(dim: int) -> torch.dtype:
        """int16 when every coordinate fits (d < 32768), int32 otherwise."""
        return torch.int16 if dim <= torch.iinfo(torch.int16).max else torch.int32

    @staticmethod
    def native_for(dtype: torch.dtype, device: torch.device | str | None = None) -> bool:
        """Whether a window storing ``dtype`` values on ``device`` runs the C kernels."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        return tiled.supports(dtype, device) and sparse_native.library() is not None

    @staticmethod
    def required_bytes(
        dim: int,
        window: int,
        k: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        grad_dtype: torch.dtype = torch.float32,
    ) -> int:
        """Peak bytes of the window and of a step, counted buffer by buffer before anything is
        allocated: values and indices (m k), the error vector and its spare (a = e + g), the
        returned step (d float32 each), the m x m float64 matrices (with a refactor's scratch),
        a float32 copy of a gradient of another dtype, the selection's candidates and its
        k-sized buffers, and the rollback copy of the replaced row. On the torch path also
        the dense copy of the new row, |a|, the candidate mask and torch.topk's fallback copy
        (index + value per coordinate)."""
        value_bytes = torch.empty((), dtype=dtype).element_size()
        index_bytes = 2 if dim <= torch.iinfo(torch.int16).max else 4
        native = TopKSlidingInverseFisher.native_for(dtype, device)
        window_bytes = TopKSlidingInverseFisher._layout_nbytes(
            dim, window, k, value_bytes, index_bytes, native
        )
        vectors = 3 * dim * 4  # error, spare, the returned step
        if grad_dtype != torch.float32:
            vectors += dim * 4
        cap = candidate_cap(k)
        threads = max(1, torch.get_num_threads())
        # candidates (int64 + their float32 value, one buffer per thread, and the joined
        # copy of the threads' parts), |a[cand]| and its
        # copy, topk's values and indices, the kept mask, the sort of k positions, idx, kept
        # values (picked, float32 and stored), the new row as stored
        selection = (threads + 1) * cap * (8 + 4) + 2 * cap * 4 + k * (4 + 8) + cap + 2 * k * 8
        selection += k * 8 + k * (4 + 4 + value_bytes) + k * (value_bytes + index_bytes)
        if native:
            passes = 2 * tiled.MAX_TILE * 4 + window * 8 * 2  # tile buffers, outputs
        else:
            # dense row, |a|, the mask, torch.topk's fallback (value + index per coordinate),
            # and one chunk of the gather / scatter
            passes = dim * 4 + dim * 4 + dim + dim * 12 + CHUNK_BYTES
        align = 5 * sparse_native.HUGE_PAGE  # each big buffer is padded to a 2 MiB boundary
        return window_bytes + vectors + gram_nbytes(window) + selection + passes + align

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        """Where the window lives."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the kept values."""
        return self._dtype

    @property
    def window_nbytes(self) -> int:
        """Bytes of the compressed window only (values + indices; on the C path also the spare
        group and the run offsets), allocated or still to be on first use."""
        value_bytes = torch.empty((), dtype=self._dtype).element_size()
        index_bytes = torch.empty((), dtype=self._index_dtype).element_size()
        return self._layout_nbytes(
            self.dim, self.window, self.k, value_bytes, index_bytes, self.native
        )

    @staticmethod
    def _layout_nbytes(
        dim: int, window: int, k: int, value_bytes: int, index_bytes: int, native: bool
    ) -> int:
        """Bytes of m rows of k values and indices: on the C path the tile-major layout (the
        groups, the spare group and the run offsets), else two (m, k) tensors."""
        if native:
            return tiled.layout_bytes(window, k, dim, value_bytes, index_bytes)
        return window * k * (value_bytes + index_bytes)

    @property
    def nbytes(self) -> int:
        """Bytes held: window, error-feedback vector (and, once stepping, its d-sized spare,
        the result buffer the C path reuses, or the torch path's dense row), K and K^-1."""
        vectors = 1 + (getattr(self, "_spare", None) is not None)
        vectors += getattr(self, "_row", None) is not None
        vectors += getattr(self, "_out", None) is not None
        return self.window_nbytes + vectors * self.dim * 4 + self.factor.nbytes

    # ------------------------------------------------------------------ sparse passes
    def _chunk_rows(self) -> int:
        return max(1, CHUNK_BYTES // (16 * self.k))

    def _index(self, rows: torch.Tensor) -> torch.Tensor:
        flat = rows.reshape(-1)
        return flat if flat.dtype == torch.int32 else flat.to(torch.int32)

    def _gather(self, x: torch.Tensor, values=None, indices=None) -> torch.Tensor:
        """G x (m,) float64 for a dense float32 x: a gather of m*k entries (the C tile sweep for
        this window's own rows, else torch by row chunks)."""
        if values is None and self.native:
            return self.rows.gather(x=x.contiguous())
        values = self.values if values is None else values
        indices = self.indices if indices is None else indices
        m = values.shape[0]
        out = torch.empty(m, dtype=torch.float32, device=x.device)
        step = self._chunk_rows()
        for a in range(0, m, step):
            b = min(m, a + step)
            picked = x.index_select(0, self._index(indices[a:b])).view(b - a, 1, -1)
            vals = values[a:b].to(torch.float32).unsqueeze(2)
            out[a:b] = torch.bmm(picked, vals).view(-1)
        return out.to(F64)

    def _scatter(self, coeff: torch.Tensor, values=None, indices=None) -> torch.Tensor:
        """G^T c (d,) float32 for c of shape (m,): a scatter-add of m*k entries (the C tile
        sweep for this window's own rows, else torch by row chunks)."""
        if values is None and self.native:
            return self.rows.scatter(coeff)
        values = self.values if values is None else values
        indices = self.indices if indices is None else indices
        out = torch.zeros(self.dim, dtype=torch.float32, device=values.device)
        coeff = coeff.to(torch.float32)
        m = values.shape[0]
        step = self._chunk_rows()
        for a in range(0, m, step):
            b = min(m, a + step)
            contrib = values[a:b].to(torch.float32) * coeff[a:b, None]
            out.index_add_(0, self._index(indices[a:b]), contrib.reshape(-1))
        return out

    # ------------------------------------------------------------------ updates
    def _check_grad(self, g: torch.Tensor) -> torch.Tensor:
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"gradient must be a torch.Tensor, got {type(g).__name__}")
        check_float_dtype(g.dtype, "gradient")
        flat = g.reshape(-1)
        if flat.numel() != self.dim:
            raise ValueError(f"gradient has {flat.numel()} entries, the window holds {self.dim}")
        if g.device != self.device:
            raise ValueError(f"gradient is on device {g.device}, the window lives on {self.device}")
        return flat

    def _scratch(self) -> torch.Tensor:
        """The d-sized float32 buffer for a = e + g, reused across steps (no page faults)."""
        if getattr(self, "_spare", None) is None:
            self._spare = sparse_native.empty_huge((self.dim,), torch.float32, self.device)
        return self._spare

    def _dense_row(self) -> torch.Tensor:
        """The torch path's zeroed d-sized buffer for the new row (kept zero between steps)."""
        if getattr(self, "_row", None) is None:
            self._row = torch.zeros(self.dim, dtype=torch.float32, device=self.device)
        return self._row

    def _select(
        self, flat: torch.Tensor, acc: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """acc = e + g, the ascending coordinates of the k largest |acc| (ties at the k-th:
        the lowest coordinates, on either path) and acc there; raises on NaN/Inf."""
        if self.native and self.dim > SMALL_SELECT and 4 * self.k < self.dim:
            grad = flat if flat.dtype == torch.float32 else flat.to(torch.float32)
            return _native_select(self.error, grad.contiguous(), acc, self.k)
        torch.add(self.error, flat.to(torch.float32), out=acc)
        if not finite_fast(acc):
            raise NonFiniteGradientError("gradient contains NaN or Inf; the window is unchanged")
        idx = topk_indices(acc.abs(), self.k)
        return idx, acc[idx]

    def _insert(self, flat: torch.Tensor, x: torch.Tensor | None = None) -> tuple[int, Any]:
        """Compress e + g into the next slot, update K, keep the new error; return the slot.

        a = e + g goes into a spare buffer, so a refused gradient leaves e as it was; on
        success the spare and e swap. The new row's products with the other rows come from its
        k entries (the C path spreads them per tile; the torch path writes and clears them in
        a dense buffer), its own from the kept values; the row is written once K took it, so
        a refused update leaves the window as it was. With ``x`` (a contiguous float32
        d-vector), also G x under the updated window, from the same sweep on the C path:
        returns (slot, G x or None)."""
        acc = self._scratch()
        idx, picked = self._select(flat, acc)
        vals = picked.to(self.values.dtype)
        slot = self.factor.next_slot
        kept = vals.to(torch.float32)  # the row as stored (rounded to the window dtype)
        products, own = None, None
        if self.native and x is not None:  # x . c_new too: G x's entry for the new row
            products, u, own = self.rows.gather(x=x, sparse=(idx, kept))
        elif self.native:
            u = self.rows.gather(sparse=(idx, kept))
        else:
            dense_c = self._dense_row()
            dense_c[idx] = kept
            try:
                u = self._gather(dense_c)
            finally:
                dense_c[idx] = 0.0
        u[slot] = float(kept.double().square().sum())
        u, products, own = self._reduce(slot, u, products, own, x, idx, kept)
        self.factor.commit(u)  # raises before anything changed
        if self.native:
            self.rows.replace(slot, idx, vals)
            sparse_native.sub_at(acc, idx, kept)  # e = a - c
        else:
            self.values[slot] = vals
            self.indices[slot] = idx.to(self.indices.dtype)
            acc[idx] -= kept  # e = a - c
        self._spare, self.error = self.error, acc
        if x is not None and products is None:
            products = self._gather(x)
        elif x is not None:  # the sweep read the slot's old row
            products[slot] = own
        return slot, products

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
        """The new row's products u (and, with x, G x with the old row in ``slot`` and
        x . c_new) before K takes them: as they are here; a sharded window sums them over
        its ranks (:class:`mfac.operators.fsdp.LocalShardedTopK`)."""
        return u, products, own

    def push(self, g: torch.Tensor) -> None:
        """Error-feedback compress ``g`` into the window (no product)."""
        self._insert(self._check_grad(g))

    def push_gather(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Error-feedback compress ``g`` into the window and return G x (float64, (m,)) under
        the updated window: on the C path one sweep serves the new row's products and G x
        (for rules that apply their own function of the window's spectrum)."""
        flat = self._check_grad(g)
        xf = self._check_grad(x).to(torch.float32).contiguous()
        return self._insert(flat, xf)[1]

    def push_ihvp(self, g: torch.Tensor) -> torch.Tensor:
        """Error-feedback compress ``g`` into the window and return F^-1 c (shape of g)."""
        self.factor.require_inverse()  # an undamped window refuses before pushing
        slot, _ = self._insert(self._check_grad(g))
        coeff = self.factor.slot_coeff(slot)[:, 0]
        if self.native:
            out = self.rows.scatter(coeff, self._result_buffer())
        else:
            out = self._scatter(coeff)
        return out.to(g.dtype).view_as(g)

    def _result_buffer(self) -> torch.Tensor:
        """The d-sized float32 buffer the C scatter writes the step into: the previous step's,
        when nothing outside the window still holds it (no tensor, view, array or autograd
        reference), else a fresh one. Reusing it spares the page faults of a fresh d-vector
        (more than a streaming pass over d)."""
        out = getattr(self, "_out", None)
        # Python references are compared with the count taken here right after allocation
        # (the attribute and this local), so the check does not depend on the interpreter
        if out is None or _references(out) != self._out_alone or not _unshared(out):
            out = sparse_native.empty_huge((self.dim,), torch.float32, self.device)
            self._out = out
            self._out_alone = _references(out)
        return out

    def ihvp(self, x: torch.Tensor) -> torch.Tensor:
        """F^-1 x = (x - G^T K^-1 G x) / lambda for x of shape (d,)."""
        xf = self._check_grad(x).to(torch.float32)
        c = self.factor.solve(self._gather(xf)[:, None])[:, 0]
        return ((xf - self._scatter(c)) / self.damp).to(x.dtype).view_as(x)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """G x (m,) float64 for x of shape (d,): the window's gather."""
        return self._gather(self._check_grad(x).to(torch.float32).contiguous())

    def scatter(
        self,
        coeff: torch.Tensor,
        out: torch.Tensor | None = None,
        plus: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """G^T c (d,) float32 for c of shape (m,): the window's scatter-add; plus ``plus`` when
        given (on the C path added per tile, with no
        extra pass over d); written into ``out`` when given. ``out`` and ``plus`` are
        contiguous float32 d-vectors on the window's device."""
        if not isinstance(coeff, torch.Tensor) or coeff.numel() != self.window:
            raise ValueError(f"coeff must be a tensor of {self.window} entries (one per row)")
        for name, t in (("out", out), ("plus", plus)):
            if t is not None and (
                not isinstance(t, torch.Tensor)
                or t.dtype != torch.float32
                or t.numel() != self.dim
                or not t.is_contiguous()
                or t.device != self.device
            ):
                raise ValueError(
                    f"{name} must be a contiguous float32 tensor of {self.dim} entries on "
                    f"{self.device}"
                )
        if self.native:
            return self.rows.scatter(coeff, out, plus)
        result = self._scatter(coeff)
        if plus is not None:
            result.add_(plus.view(-1))
        return result if out is None else out.copy_(result)

    def row(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of the row in ``slot`` (k each; ascending coordinates on the C
        path), copies."""
        if not 0 <= slot < self.window:
            raise IndexError(f"slot {slot} is outside the window's {self.window} rows")
        if self.native:
            return self.rows.row(slot)
        return self.values[slot].clone(), self.indices[slot].clone()

    def to_torch_path(self) -> None:
        """Keep the rows as (m, k) tensors and run the torch path from now on (the C path's
        results by other means: for comparisons and tests). Rows and K are unchanged."""
        if not self.native:
            return
        if not self._rows_allocated():  # nothing allocated yet: allocated as (m, k)
            self.native = False
            return
        groups = [self.rows.group(g) for g in range(self.rows.groups)]
        del self.rows
        self.values = torch.cat([v for v, _ in groups])
        self.indices = torch.cat([i for _, i in groups])
        self.native = False

    def dense_rows(self) -> torch.Tensor:
        """The window as a dense m x d float32 matrix (for tests and inspection)."""
        out = torch.zeros(self.window, self.dim, dtype=torch.float32, device=self.device)
        for slot in range(self.window):
            values, indices = self.row(slot)
            out[slot].scatter_(0, indices.long(), values.float())
        return out

    def write_rows(self, first: int, values: torch.Tensor, indices: torch.Tensor) -> None:
        """Rows ``first``, ``first + 1``, ... := ``values``/``indices`` ((n, k) each, every
        row's coordinates strictly ascending in [0, d)), without touching K: for filling a
        window whose K is then rebuilt (benchmarks, tests). Whole groups of the C layout are
        written in place; other rows go through the spare group."""
        n = values.shape[0] if values.dim() == 2 else -1
        if tuple(values.shape) != (n, self.k) or tuple(indices.shape) != (n, self.k):
            raise ValueError(f"values and indices must be (n, {self.k}) each")
        if not 0 <= first <= first + n <= self.window:
            raise ValueError(f"rows {first}..{first + n - 1} are outside the window")
        coords = indices.long()
        if n and (
            int(coords.min()) < 0
            or int(coords.max()) >= self.dim
            or not bool((coords[:, 1:] > coords[:, :-1]).all())
        ):
            raise ValueError(f"each row's indices must be strictly ascending in [0, {self.dim})")
        if not bool(torch.isfinite(values).all()):
            raise ValueError("values contains NaN or Inf")
        if not self.native:
            self.values[first : first + n] = values.to(self.dtype)
            self.indices[first : first + n] = indices.to(self.indices.dtype)
            return
        values = values.to(self.dtype)
        slot = first
        while slot < first + n:
            g, j = divmod(slot, self.rows.rows)
            size = self.rows.group_rows(g)
            at = slot - first
            if j == 0 and at + size <= n:
                self.rows.write_group(g, values[at : at + size], indices[at : at + size])
                slot += size
            else:
                self.rows.replace(slot, coords[at], values[at])
                slot += 1

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Window rows, error-feedback vector, K, K^-1, pointer.

        A full window on the C path saves the tile-major layout's tensors (``values``,
        ``indices``, ``starts``, ``block_of``), on the torch path (m, k) ``values`` and
        ``indices``; a partly filled window saves only its filled rows, row-major ((n, k)
        each, copies), so a checkpoint grows with the window. Either loads into either path.
        Full rows and the error vector are returned by reference, as ``torch.optim`` returns
        its state (a clone would double the largest buffers at every checkpoint); save or copy
        them before the next push. K and K^-1 (m x m) are copies."""
        filled = self.filled
        if filled == self.window:
            rows = self.rows.state() if self.native else {
                "values": self.values, "indices": self.indices
            }  # fmt: skip
        else:
            rows = self._filled_rows(filled)
        return {**rows, "error": self.error, **self.factor.state_dict()}

    def _filled_rows(self, n: int) -> dict[str, torch.Tensor]:
        """The first ``n`` rows, row-major copies (values (n, k), indices (n, k))."""
        if not self.native:
            return {"values": self.values[:n].clone(), "indices": self.indices[:n].clone()}
        values, indices, have = [], [], 0
        for v, i in self._state_groups(self.rows.state()):
            if have >= n:
                break
            take = min(n - have, v.shape[0])
            values.append(v[:take])
            indices.append(i[:take].to(self._index_dtype))
            have += take
        empty = torch.empty(0, self.k)
        return {
            "values": torch.cat(values) if values else empty.to(self.dtype),
            "indices": torch.cat(indices) if indices else empty.to(self._index_dtype),
        }

    def _tiled_view(self, state: Mapping[str, Any]) -> tiled.TiledRows | None:
        """The state's rows as a tile-major layout this window's kernels can sweep in place,
        or None (a row-major state, or no C path here)."""
        if "starts" not in state or not self.native:
            return None
        return tiled.TiledRows.over(self.dim, self.window, self.k, dict(state))

    def _state_groups(self, state: Mapping[str, Any]):
        """The state's rows as row-major (values, indices) pieces, in slot order."""
        if "starts" not in state:
            yield state["values"], state["indices"]
            return
        block_of, starts = state["block_of"], state["starts"]
        groups, rows = tiled.state_shape(state)
        for g in range(groups):
            n = min(rows, self.window - g * rows)
            b = int(block_of[g])
            yield tiled.unpack_group(
                state["values"][b * rows : (b + 1) * rows],
                state["indices"][b * rows : (b + 1) * rows],
                starts[:, g * (rows + 1) : g * (rows + 1) + n + 1],
            )

    def _check_tiled_fields(self, state: Mapping[str, Any]) -> None:
        """Types, shapes and the block map of a tile-major state (any version's layout)."""
        for key in ("values", "indices", "starts", "block_of"):
            if key not in state:
                raise KeyError(f"state is missing the field {key!r}")
            if not isinstance(state[key], torch.Tensor):
                raise TypeError(f"{key} must be a tensor, got {type(state[key]).__name__}")
        values, indices = state["values"], state["indices"]
        starts, block_of = state["starts"], state["block_of"]
        if values.dtype != self.dtype:
            raise TypeError(f"values: state stores {values.dtype}, this window stores {self.dtype}")
        if indices.dtype != self._index_dtype:
            raise TypeError(
                f"indices: state stores {indices.dtype}, this window stores {self._index_dtype}"
            )
        groups, rows = tiled.state_shape(state)
        if block_of.dim() != 1 or groups < 1 or starts.dim() != 2 or starts.shape[1] % groups:
            raise ValueError("block_of and starts do not describe a tile-major layout")
        if (
            rows < 1
            or -(-self.window // rows) != groups
            or tuple(values.shape) != ((groups + 1) * rows, self.k)
            or values.shape != indices.shape
        ):
            raise ValueError(
                f"values, indices and starts do not hold {self.window} rows of {self.k} entries"
            )
        if not torch.equal(block_of.long().sort().values, torch.arange(groups + 1)):
            raise ValueError("block_of must be a permutation of the layout's blocks")
        if starts.dtype != torch.int32:
            raise TypeError(f"starts must be int32, got {starts.dtype}")

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise, naming the field, unless ``state`` fits this window and is consistent
        (shapes, dtypes, finite values, indices in range and ascending, the layout's offsets,
        pointer, damping, K against the stored rows); writes nothing."""
        if not isinstance(state, Mapping):
            raise TypeError(f"window state must be a mapping, got {type(state).__name__}")
        if "error" not in state:
            raise KeyError("state is missing the field 'error'")
        error = state["error"]
        if not isinstance(error, torch.Tensor):
            raise TypeError(f"error must be a tensor, got {type(error).__name__}")
        if tuple(error.shape) != (self.dim,) or error.dtype != torch.float32:
            raise ValueError(f"error must be a float32 vector of {self.dim} entries")
        if not finite_fast(error):
            raise ValueError("error contains NaN or Inf")
        if "starts" in state:
            self._check_tiled_fields(state)
        else:
            pushed = state.get("num_pushed")
            filled = min(pushed, self.window) if isinstance(pushed, int) else self.window
            want = ((filled, self.k), (self.window, self.k))
            for key, dtype in (("values", self.dtype), ("indices", self._index_dtype)):
                if key not in state:
                    raise KeyError(f"state is missing the field {key!r}")
                t = state[key]
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{key} must be a tensor, got {type(t).__name__}")
                if tuple(t.shape) not in want:
                    raise ValueError(
                        f"{key} has shape {tuple(t.shape)}, this window needs {want[0]} (the "
                        f"filled rows) or {want[1]}"
                    )
                if t.dtype != dtype:
                    raise TypeError(f"{key}: state stores {t.dtype}, this window stores {dtype}")
        if not finite_fast(state["values"]):
            raise ValueError("values contains NaN or Inf")
        view = self._tiled_view(state)
        if view is not None:  # the C check of every run, then K through the C sweeps
            view.check()
            gram = (lambda z: view.gather(x=view.scatter(z))) if self._checks_gram else None
            self.factor.check_state(state, gram)
            return
        values, indices = (torch.cat(t) for t in zip(*self._state_groups(state), strict=True))
        values, indices = values.to(self.device), indices.to(self.device)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.dim):
            raise ValueError(f"indices must lie in [0, {self.dim})")
        repeats = (indices.sort(dim=1).values.diff(dim=1) == 0).any(dim=1)
        if bool((repeats & (values != 0).any(dim=1)).any()):
            raise ValueError("indices: a row with non-zero values repeats a coordinate")

        rows = values.shape[0]

        def window_gram(z: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(self.window, dtype=F64, device=z.device)
            if rows:
                out[:rows] = self._gather(
                    self._scatter(z[:rows], values, indices), values, indices
                )
            return out

        self.factor.check_state(state, window_gram if self._checks_gram else None)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (either path's); checks everything before
        writing."""
        self.check_state(state)
        self.factor.load_state_dict(state, check=False)
        mappings = FileMappings()  # the map list read once for every field
        if not self._adopt_rows(state, mappings):
            self._copy_rows(state)
        error = state["error"]
        if adoptable(error, self.device, mappings):
            self.error = error
            advise_huge_pages(error)
        else:
            self.error.copy_(error)

    def _adopt_rows(self, state: Mapping[str, Any], mappings: FileMappings) -> bool:
        """Take a full, checked state's rows as this window's own (no copy: the window
        then writes into the given tensors, as ``torch.optim`` adopts loaded moments) when
        they are laid out as this window keeps them (the C path's tile-major tensors of this
        layout, or, on the torch path, (m, k) rows whose coordinates ascend strictly in every
        row) and :func:`~mfac.operators.memory.adoptable`. False, with nothing changed,
        otherwise."""
        view = self._tiled_view(state)
        if view is not None:  # check_state: values and indices of this window's dtypes
            if not all(adoptable(t, self.device, mappings) for t in view.state().values()):
                return False
            for t in (view.values, view.indices):
                advise_huge_pages(t)
            self._rows_adopted()
            self.rows, self.values, self.indices = view, view.values, view.indices
            return True
        if self.native or "starts" in state:
            return False
        values, indices = state["values"], state["indices"]
        if (
            values.shape[0] != self.window
            or not all(adoptable(t, self.device, mappings) for t in (values, indices))
            or not all(
                bool((indices[at : at + n].diff(dim=1) > 0).all())
                for at, n in self._row_chunks(0, self.window)
            )
        ):
            return False
        self._rows_adopted()
        self.values, self.indices = values, indices
        return True

    def _copy_rows(self, state: Mapping[str, Any]) -> None:
        """Write a checked state's rows into this window's own: this layout's tensors as they
        are, other states a chunk of rows at a time (the temporaries are a chunk's, not the
        window's), with the rows a partly filled state does not hold empty."""
        view = self._tiled_view(state)
        if view is not None:
            for key, t in view.state().items():
                self.rows.state()[key].copy_(t)
            return
        slot = 0
        for piece_values, piece_indices in self._state_groups(state):
            for at, n in self._row_chunks(slot, piece_values.shape[0]):
                chunk = piece_indices[at - slot : at - slot + n]
                indices, order = chunk.long().sort(dim=1, stable=True)
                values = piece_values[at - slot : at - slot + n].gather(1, order)
                # an empty slot saved by an older version (k zeros at coordinate 0)
                empty = (indices.diff(dim=1) == 0).any(dim=1)
                indices[empty] = torch.arange(self.k, device=indices.device)
                self.write_rows(at, values, indices)
            slot += piece_values.shape[0]
        for at, n in self._row_chunks(slot, self.window - slot):
            self.write_rows(
                at,
                torch.zeros(n, self.k, dtype=self.dtype),
                torch.arange(self.k).expand(n, self.k).contiguous(),
            )

    def _row_chunks(self, first: int, n: int) -> list[tuple[int, int]]:
        """Rows ``first .. first + n - 1`` as (first row, count) chunks that end on the C
        layout's group boundaries (a whole group is then written in place, as one
        :meth:`write_rows` of all rows would), or of 16 rows on the torch path."""
        step = self.rows.rows if self.native else 16
        chunks, at, end = [], first, first + n
        while at < end:
            stop = min(end, (at // step + 1) * step)
            chunks.append((at, stop - at))
            at = stop
        return chunks

    def __repr__(self) -> str:
        return (
            f"TopKSlidingInverseFisher(dim={self.dim}, window={self.window}, k={self.k}, "
            f"damp={self.damp if self.damp is None else format(self.damp, 'g')}, "
            f"pushed={self.num_pushed})"
        )


__all__ = [
    "TopKSlidingInverseFisher",
    "resolve_k",
    "sample_threshold",
    "topk_indices",
]
