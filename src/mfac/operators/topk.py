"""EFCP: the sliding window with error-feedback top-k rows (docs/algorithms.md section 3).

Each gradient g is added to the error e, the k largest magnitudes c of a = e + g are stored
(k values + int16/int32 indices), and e = a - c carries the rest into later steps. G x is a
gather, G^T y a scatter-add, both O(m k); the m x m algebra is
:class:`mfac.operators.gram.GramFactor`. On the CPU (float32/bfloat16/float16 values) the C
kernels of :mod:`mfac.operators.sparse_native` sweep the rows, kept in ascending coordinate
order, tile by tile, and select without d-sized temporaries; otherwise torch does the same in
row chunks of bounded size, so that no temporary grows with m k.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import torch

from .._validation import NonFiniteGradientError, check_float_dtype, check_positive_int
from . import sparse_native
from .gram import FactorBacked, GramFactor
from .memory import check_fits, gram_nbytes

F64 = torch.float64
#: Bytes of the temporaries one chunk of the gather / scatter may use.
CHUNK_BYTES = 32 * 2**20
#: Below this dimension the selection is a plain torch.topk.
SMALL_SELECT = 1 << 16


def finite_fast(x: torch.Tensor) -> bool:
    """True when x holds no NaN/Inf, in one summing pass (NaN and +-Inf propagate through a
    sum); only a non-finite sum (NaN/Inf, or a float overflow) runs the exact elementwise check.
    ``torch.isfinite(x).all()`` alone costs about five passes over x."""
    return math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all())


def resolve_k(topk: int | float | None, dim: int) -> int:
    """Entries kept per row: an int k (1 <= k <= dim) or a density in (0, 1]."""
    if topk is None:
        raise ValueError("history='topk' needs topk: an int k or a density in (0, 1]")
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
    """Positions (ascending) of the k largest entries of ``mag``. When most entries stay, the
    few smallest are dropped instead (torch.topk of the smaller side: 7x faster at k = 1.35M
    of 1.77M)."""
    n = mag.numel()
    if n - k < k:
        drop = torch.topk(mag, n - k, largest=False, sorted=False).indices
        keep = torch.ones(n, dtype=torch.bool, device=mag.device)
        keep[drop] = False
        return keep.nonzero().squeeze(1)
    return torch.topk(mag, k, sorted=False).indices.sort().values


def largest_among(cand: torch.Tensor, mag: torch.Tensor, k: int) -> torch.Tensor:
    """The k candidates (ascending coordinates ``cand``, magnitudes ``mag``) of largest
    magnitude, in ascending order."""
    return cand[largest_positions(mag, k)]


def topk_indices(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64) of the k largest entries of the non-negative vector ``mag``.

    Exact without sorting all of ``mag``: a threshold t is read off a strided sample so that a
    little more than k entries satisfy mag >= t; those candidates contain the k largest
    (whenever at least k pass, the k-th largest is >= t), and torch.topk picks them from the
    candidates. Falls back to torch.topk over everything when the sample misjudges. On the
    fast path the indices come out ascending, so the window's gathers read memory in order."""
    d = mag.numel()
    if d <= SMALL_SELECT or 4 * k >= d:
        return torch.topk(mag, k, sorted=False).indices
    threshold = sample_threshold(mag[:: sample_stride(d)], k, d)
    cand = torch.nonzero(mag >= threshold).squeeze(1)
    if cand.numel() < k or cand.numel() > candidate_cap(k):
        return torch.topk(mag, k, sorted=False).indices
    return largest_among(cand, mag[cand], k)


def _native_select(
    error: torch.Tensor, grad: torch.Tensor, acc: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """acc = error + grad, the ascending coordinates of its k largest magnitudes and acc there,
    with the C selection pass (no d-sized temporary; the candidates' values come out of the
    same pass). Same choice as :func:`topk_indices` on |acc| when the sampled threshold holds;
    otherwise the exact k-th largest magnitude by bisection, all entries above it and the
    lowest coordinates among its ties. Raises on NaN/Inf."""
    d = acc.numel()
    stride = sample_stride(d)
    threshold = sample_threshold((error[::stride] + grad[::stride]).abs_(), k, d)
    cap = candidate_cap(k)
    cand, cval, count, bad = sparse_native.select_values(error, grad, acc, threshold, cap)
    if bad:
        raise NonFiniteGradientError("gradient contains NaN or Inf; the window is unchanged")
    if k <= count <= cap:
        pos = largest_positions(cval.abs(), k)
        return cand[pos], cval[pos]
    del cand, cval
    kth = sparse_native.kth_largest(acc, k)
    cand, count = sparse_native.list_range(acc, kth, math.inf, cap)
    if count <= cap:
        idx = largest_among(cand, acc[cand].abs(), k)
        return idx, acc[idx]
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

    def __init__(
        self,
        dim: int,
        window: int,
        k: int,
        damp: float = 1e-5,
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
        self.factor = GramFactor(window, damp, device)
        huge = sparse_native.empty_huge  # big buffers on huge pages (fewer page walks)
        self.values = huge((window, k), dtype, device).zero_()
        self.indices = huge((window, k), index_dtype, device).zero_()
        self.error = huge((dim,), torch.float32, device).zero_()
        #: Whether the C kernels run the gathers, scatters and the selection (CPU, float32 /
        #: bfloat16 / float16 values and a working C compiler); else the torch path.
        self.native = sparse_native.supports(self.values, self.indices)

    @staticmethod
    def index_dtype(dim: int) -> torch.dtype:
        """int16 when every coordinate fits (d < 32768), int32 otherwise."""
        return torch.int16 if dim <= torch.iinfo(torch.int16).max else torch.int32

    @staticmethod
    def native_for(dtype: torch.dtype, device: torch.device | str | None = None) -> bool:
        """Whether a window storing ``dtype`` values on ``device`` runs the C kernels."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        return sparse_native.supports(
            torch.empty(1, 1, dtype=dtype), torch.empty(1, 1, dtype=torch.int32)
        )

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
        window_bytes = window * k * (value_bytes + index_bytes)
        vectors = 3 * dim * 4  # error, spare, the returned step
        if grad_dtype != torch.float32:
            vectors += dim * 4
        cap = candidate_cap(k)
        threads = max(1, torch.get_num_threads())
        # candidates (int64 + their float32 value, one buffer per thread, and the joined
        # copy of the threads' parts), |a[cand]| and its
        # copy, topk's values and indices, the kept mask, the sort of k positions, idx, kept
        # values (picked, float32 and stored), rollback
        selection = (threads + 1) * cap * (8 + 4) + 2 * cap * 4 + k * (4 + 8) + cap + 2 * k * 8
        selection += k * 8 + k * (4 + 4 + value_bytes) + k * (value_bytes + index_bytes)
        if TopKSlidingInverseFisher.native_for(dtype, device):
            passes = 2 * sparse_native.TILE * 4 + window * 8 * 2  # tile buffers and cursors
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
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the kept values."""
        return self.values.dtype

    @property
    def window_nbytes(self) -> int:
        """Bytes of the compressed window only (values + indices)."""
        return (
            self.values.numel() * self.values.element_size()
            + self.indices.numel() * self.indices.element_size()
        )

    @property
    def nbytes(self) -> int:
        """Bytes held: window, error-feedback vector (and, once stepping, its d-sized spare,
        the result buffer the C path reuses, or the torch path's dense row), K and K^-1."""
        vectors = 1 + (getattr(self, "_spare", None) is not None)
        vectors += getattr(self, "_row", None) is not None
        vectors += getattr(self, "_out", None) is not None
        return self.window_nbytes + vectors * self.dim * 4 + 2 * self.window**2 * 8

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
            return sparse_native.gather(self.values, self.indices, self.dim, x=x.contiguous())
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
            return sparse_native.scatter(self.values, self.indices, self.dim, coeff)
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

    def _sort_rows(self) -> None:
        """Order every row's entries by coordinate (the C kernels' invariant; rows written by
        a push already are), in row chunks; the matrix the rows stand for is unchanged."""
        step = self._chunk_rows()
        for a in range(0, self.window, step):
            b = min(self.window, a + step)
            rows = self.indices[a:b].long()
            if bool((rows[:, 1:] >= rows[:, :-1]).all()):
                continue
            order, perm = rows.sort(dim=1, stable=True)
            self.indices[a:b] = order.to(self.indices.dtype)
            self.values[a:b] = self.values[a:b].gather(1, perm)

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
        """acc = e + g, the coordinates of the k largest |acc| (ascending, as the C kernels
        need; the torch path keeps torch.topk's order) and acc there; raises on NaN/Inf."""
        if self.native and self.dim > SMALL_SELECT and 4 * self.k < self.dim:
            grad = flat if flat.dtype == torch.float32 else flat.to(torch.float32)
            return _native_select(self.error, grad.contiguous(), acc, self.k)
        torch.add(self.error, flat.to(torch.float32), out=acc)
        if not finite_fast(acc):
            raise NonFiniteGradientError("gradient contains NaN or Inf; the window is unchanged")
        idx = topk_indices(acc.abs(), self.k)
        idx = idx.sort().values if self.native else idx
        return idx, acc[idx]

    def _insert(self, flat: torch.Tensor) -> int:
        """Compress e + g into the next slot, update K, keep the new error; return the slot.

        a = e + g goes into a spare buffer, so a refused gradient leaves e as it was; on
        success the spare and e swap. The new row's products with the window come from its
        k entries (the C path spreads them per tile; the torch path writes and clears them in
        a dense buffer)."""
        acc = self._scratch()
        idx, picked = self._select(flat, acc)
        vals = picked.to(self.values.dtype)
        slot = self.factor.next_slot
        old_vals, old_idx = self.values[slot].clone(), self.indices[slot].clone()
        self.values[slot] = vals
        self.indices[slot] = idx.to(self.indices.dtype)
        kept = vals.to(torch.float32)  # the row as stored (rounded to the window dtype)
        try:
            if self.native:
                u = sparse_native.gather(self.values, self.indices, self.dim, sparse=(idx, kept))
            else:
                dense_c = self._dense_row()
                dense_c[idx] = kept
                try:
                    u = self._gather(dense_c)
                finally:
                    dense_c[idx] = 0.0
            u[slot] = float(kept.double().square().sum())
            self.factor.commit(u)
        except (RuntimeError, NonFiniteGradientError):
            self.values[slot], self.indices[slot] = old_vals, old_idx
            raise
        if self.native:
            sparse_native.sub_at(acc, idx, kept)  # e = a - c
        else:
            acc[idx] -= kept  # e = a - c
        self._spare, self.error = self.error, acc
        return slot

    def push(self, g: torch.Tensor) -> None:
        """Error-feedback compress ``g`` into the window (no product)."""
        self._insert(self._check_grad(g))

    def push_ihvp(self, g: torch.Tensor) -> torch.Tensor:
        """Error-feedback compress ``g`` into the window and return F^-1 c (shape of g)."""
        slot = self._insert(self._check_grad(g))
        coeff = self.factor.slot_coeff(slot)[:, 0]
        if self.native:
            out = self._result_buffer()
            sparse_native.scatter(self.values, self.indices, self.dim, coeff, out)
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
        """G x (m,) float64 for x of shape (d,): the window's gather, public for rules that do
        their own m x m algebra on the stored rows (``MFAC``'s default rule on a top-k window)."""
        return self._gather(self._check_grad(x).to(torch.float32).contiguous())

    def scatter(self, coeff: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """G^T c (d,) float32 for c of shape (m,): the window's scatter-add, public as
        :meth:`gather` is; written into ``out`` (a contiguous float32 d-vector) when given."""
        if not isinstance(coeff, torch.Tensor) or coeff.numel() != self.window:
            raise ValueError(f"coeff must be a tensor of {self.window} entries (one per row)")
        if out is not None and (
            not isinstance(out, torch.Tensor)
            or out.dtype != torch.float32
            or out.numel() != self.dim
            or not out.is_contiguous()
            or out.device != self.device
        ):
            raise ValueError(
                f"out must be a contiguous float32 tensor of {self.dim} entries on {self.device}"
            )
        if out is not None and self.native:
            return sparse_native.scatter(self.values, self.indices, self.dim, coeff, out)
        result = self._scatter(coeff)
        return result if out is None else out.copy_(result)

    def dense_rows(self) -> torch.Tensor:
        """The window as a dense m x d float32 matrix (for tests and inspection)."""
        out = torch.zeros(self.window, self.dim, dtype=torch.float32, device=self.values.device)
        out.scatter_(1, self.indices.long(), self.values.float())
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Window values/indices, error-feedback vector, K, K^-1, pointer.

        The window and the error vector are returned by reference, as ``torch.optim`` returns
        its state (a clone would double the largest buffers at every checkpoint); save or
        copy them before the next push. K and K^-1 (m x m) are copies."""
        return {
            "values": self.values,
            "indices": self.indices,
            "error": self.error,
            **self.factor.state_dict(),
        }

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise, naming the field, unless ``state`` fits this window and is consistent
        (shapes, dtypes, finite values, indices in range, pointer, damping, K against the
        stored rows); writes nothing."""
        if not isinstance(state, Mapping):
            raise TypeError(f"window state must be a mapping, got {type(state).__name__}")
        want = {
            "values": ((self.window, self.k), self.values.dtype),
            "indices": ((self.window, self.k), self.indices.dtype),
            "error": ((self.dim,), torch.float32),
        }
        for key, (shape, dtype) in want.items():
            if key not in state:
                raise KeyError(f"state is missing the field {key!r}")
            t = state[key]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{key} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"{key} has shape {tuple(t.shape)}, this window needs {shape}")
            if t.dtype != dtype:
                raise TypeError(f"{key}: state stores {t.dtype}, this window stores {dtype}")
        values = state["values"].to(self.device)
        indices = state["indices"].to(self.device)
        if not bool(torch.isfinite(values).all()):
            raise ValueError("values contains NaN or Inf")
        if not bool(torch.isfinite(state["error"]).all()):
            raise ValueError("error contains NaN or Inf")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.dim):
            raise ValueError(f"indices must lie in [0, {self.dim})")

        def window_gram(z: torch.Tensor) -> torch.Tensor:
            return self._gather(self._scatter(z, values, indices), values, indices)

        self.factor.check_state(state, window_gram)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; checks everything before writing."""
        self.check_state(state)
        self.factor.load_state_dict(state, check=False)
        self.values.copy_(state["values"])
        self.indices.copy_(state["indices"])
        if self.native:
            self._sort_rows()
        self.error.copy_(state["error"])

    def __repr__(self) -> str:
        return (
            f"TopKSlidingInverseFisher(dim={self.dim}, window={self.window}, k={self.k}, "
            f"damp={self.damp:g}, pushed={self.num_pushed})"
        )


__all__ = [
    "TopKSlidingInverseFisher",
    "finite_fast",
    "resolve_k",
    "sample_threshold",
    "topk_indices",
]
