"""The static M-FAC algorithm: exact products with the inverse of a damped empirical Fisher
F = lambda*I + G^T G / m built once from a fixed m x d set of gradients (optionally
block-diagonal), never forming a d x d matrix."""

from __future__ import annotations

import ctypes
import math
import os
import sys
from collections.abc import Sequence
from typing import Any, Literal

import torch

from .._validation import (
    LOW_PRECISION,
    NonFiniteGradientError,
    check_damp,
    check_float_dtype,
    check_positive_int,
    check_vector,
)
from .blocks import F64, BlockGroup, FisherFactorError, tile_bytes
from .gradients import (
    LossFn,
    SampleFn,
    batches_of,
    collect_gradients,
    sample_labels,
    sampled_batches,
)
from .linear import LinearOperatorMixin
from .memory import FileMappings, allocate, default_memory_budget, is_memory_mapped

DampMode = Literal["absolute", "relative"]
FisherKind = Literal["empirical", "mc"]


def squared_row_norms(grads: torch.Tensor) -> torch.Tensor:
    """Per-row sums of squares (float64 result), in one BLAS pass with no m x d temporary.

    A NaN or Inf anywhere in a row makes that row's value non-finite, so this pass is also the
    finiteness check. Rows whose float32 sum overflowed are recomputed in float64, so only rows
    that really hold NaN/Inf stay non-finite.
    """
    work = grads if grads.dtype in (torch.float32, F64) else grads.float()
    out = torch.einsum("ij,ij->i", work, work).to(F64)
    suspect = (~torch.isfinite(out)).nonzero().flatten()
    for row in suspect.tolist():  # only rows that overflowed or hold NaN/Inf
        out[row] = grads[row].to(F64).square().sum()
    return out


def device_memory_budget(device: torch.device, memory_budget: int | None) -> int:
    """Bytes a build may use on ``device``: the explicit budget, else the free memory of a CUDA
    device, else half the available RAM."""
    if memory_budget is not None:
        return int(memory_budget)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return default_memory_budget()


_HUGE_PAGE = 2**21
_MADV_HUGEPAGE = 14
_libc: list[ctypes.CDLL | None] = []


def advise_huge_pages(tensor: torch.Tensor) -> None:
    """Ask Linux to back a freshly allocated, untouched CPU tensor with 2 MiB pages
    (transparent huge pages), so that its first writes take one page fault per 2 MiB instead
    of one per 4 KiB (a 64 MiB store: 32 faults instead of 16384); for a tensor already
    written (a window's rows adopted from a loaded state) the kernel's own thread collapses
    its pages later, where it does so. Only a hint: a no-op off Linux, on other devices, for
    small tensors, and wherever the kernel declines."""
    nbytes = tensor.numel() * tensor.element_size()
    if sys.platform != "linux" or tensor.device.type != "cpu" or nbytes < 2 * _HUGE_PAGE:
        return
    if not _libc:
        try:
            libc = ctypes.CDLL(None)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _libc.append(libc)
        except (OSError, AttributeError):
            _libc.append(None)
    if _libc[0] is None:
        return
    start = -(-tensor.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE  # whole huge pages inside it
    stop = (tensor.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if stop > start:
        _libc[0].madvise(start, stop - start, _MADV_HUGEPAGE)


def _float64_store(
    shape: tuple[int, ...], device: torch.device, budget: int, what: str
) -> torch.Tensor:
    """An uninitialised float64 tensor: in memory within ``budget`` bytes, else (CPU only) a
    memory-mapped file; MemoryError before anything is allocated when neither can hold it."""
    nbytes = 8 * math.prod(shape)
    if nbytes <= budget:
        store = torch.empty(shape, dtype=F64, device=device)
        advise_huge_pages(store)
        return store
    if device.type != "cpu":
        raise MemoryError(
            f"{what} need {nbytes / 2**30:.2f} GiB of float64 on {device}, over the "
            f"{max(budget, 0) / 2**30:.2f} GiB left of its free memory; use fewer gradients or "
            "smaller blocks"
        )
    return allocate(shape, F64, memory_budget=max(budget, 0), what=what)


class InverseFisher(LinearOperatorMixin):
    """Exact products with F^-1, where F = lambda*I + (1/m) sum_i g_i g_i^T.

    ``grads`` (m x d) is consumed in place when it is float32/float64: it is overwritten by
    Q = L^-1 G, so no second m x d copy is made. bfloat16/float16 gradients are kept as stored
    (the operator is then the exact inverse of the F built from the rounded rows). The build
    factors every block before it writes anything, so a refusal (bad input, a block that does
    not factor in float64, a MemoryError) leaves ``grads`` bit-identical; for that the Woodbury
    blocks' float64 factors (nblocks*m*m*8 bytes) are held until ``grads`` is overwritten, in
    memory within ``memory_budget`` and in a memory-mapped file past it.

    ``block_size=None`` is full M-FAC; an integer B gives the block-diagonal approximation with
    contiguous blocks of B coordinates (the last one shorter when B does not divide d). Each
    group of equal blocks uses the B x B direct inverse when B <= m and the Woodbury form when
    B > m (at B == m both cost the same, and the direct form is the better conditioned).

    ``damp_mode="relative"`` scales ``damp`` by the mean of diag(G^T G / m), so that damping
    means the same thing whatever the gradients' size (SparseGPT uses 1 % of that mean).
    """

    def __init__(
        self,
        grads: torch.Tensor,
        damp: float = 1e-5,
        block_size: int | None = None,
        *,
        damp_mode: DampMode = "absolute",
        memory_budget: int | None = None,
    ) -> None:
        if not isinstance(grads, torch.Tensor):
            raise TypeError(f"grads must be a torch.Tensor, got {type(grads).__name__}")
        if grads.requires_grad:
            raise ValueError(
                "grads requires grad: the operator overwrites float32/float64 gradients in "
                "place, which autograd cannot track; pass grads.detach() (or "
                "grads.detach().clone() to keep the original)"
            )
        check_float_dtype(grads.dtype, "grads")
        if grads.ndim != 2 or grads.shape[0] < 1 or grads.shape[1] < 1:
            raise ValueError(
                f"grads must be a non-empty m x d matrix, got shape {tuple(grads.shape)}"
            )
        if not grads.is_contiguous():
            raise ValueError("grads must be contiguous (rows are gradients, stored row-major)")
        damp = check_damp(damp)
        if damp_mode not in ("absolute", "relative"):
            raise ValueError(f"damp_mode must be 'absolute' or 'relative', got {damp_mode!r}")
        m, d = grads.shape
        if block_size is not None:
            check_positive_int(block_size, "block_size")
        self.num_grads, self.dim = m, d
        self.block_size = d if block_size is None else min(block_size, d)
        self.buffer = grads
        self.groups = self._make_groups(damp)
        self._build(memory_budget, damp, damp_mode)

    def _build(self, memory_budget: int | None, damp: float, damp_mode: DampMode) -> None:
        """Factor every block (reading the buffer only), then overwrite G by Q.

        Memory is checked first: the float64 scratch (a tile of gradients and one tile's
        m x m or B x B matrices) against the memory available on the device, then the stored
        factors and inverses against ``memory_budget`` (past it they are memory-mapped on CPU;
        on an accelerator, which cannot page to a file, a MemoryError is raised)."""
        device = self.buffer.device
        scratch = max(g.scratch_bytes() for g in self.groups)
        free = device_memory_budget(device, None)
        if scratch > free:
            raise MemoryError(
                f"the precompute needs {scratch / 2**30:.2f} GiB of float64 scratch (a tile of "
                "gradients and one tile's m x m or B x B matrices and their factors), over the "
                f"{free / 2**30:.2f} GiB available on {device}; use fewer gradients. Nothing "
                "was written"
            )
        # The stored factors/inverses live in memory within the budget, else in a file (CPU).
        left = (free if memory_budget is None else int(memory_budget)) - scratch
        if device.type != "cpu" and memory_budget is not None:
            left = min(left, free - scratch)
        for group in self.groups:
            group.q_form = self.buffer.dtype in (torch.float32, torch.float64)
        stores = []
        for group in self.groups:
            small = group.size if group.direct else group.m
            what = "block inverses" if group.direct else "Cholesky factors of the blocks"
            stores.append(_float64_store((group.nblocks, small, small), device, left, what))
            left -= 8 * group.nblocks * small * small
        work = BlockGroup.new_scratch(self.groups, device)
        # The Grams' diagonals give the sum of squares: the finiteness check and the mean
        # diagonal of relative damping, without a separate pass over the buffer.
        total = sum(g.form(self.buffer, work, s) for g, s in zip(self.groups, stores, strict=True))
        if not math.isfinite(total):
            self._refuse_non_finite()
        m, d = self.num_grads, self.dim
        if damp_mode == "relative":
            mean_diag = total / (m * d)
            if mean_diag == 0.0:
                raise ValueError("relative damping needs gradients that are not all zero")
            damp = damp * mean_diag
            if not math.isfinite(damp) or damp <= 0.0:
                raise ValueError(
                    f"relative damping gives damp = {damp:.3g} (mean diagonal {mean_diag:.3g}), "
                    "not a positive finite number; rescale the gradients or use absolute damping"
                )
        self.damp = damp
        for group in self.groups:
            group.factor(self.buffer, damp)
        for group in self.groups:  # only now is the caller's buffer written
            group.finish(self.buffer, work)

    def _refuse_non_finite(self) -> None:
        """Name the rows that hold NaN/Inf, or say that the squares overflow float64."""
        grads = self.buffer
        row_sq = squared_row_norms(grads)
        bad = (~torch.isfinite(row_sq)).nonzero().flatten()
        nonfinite = [r for r in bad.tolist() if not bool(torch.isfinite(grads[r]).all())]
        if nonfinite:
            raise NonFiniteGradientError(
                f"gradient rows {nonfinite[:5]} contain NaN or Inf ({len(nonfinite)} rows in all)"
            )
        peak = float(grads.abs().max())
        rows = (
            f"the squared norms of gradient rows {bad[:5].tolist()}"
            if bad.numel()
            else ("the sums of squares of the gradients")
        )
        raise ValueError(
            f"{rows} overflow float64 (largest |entry| {peak:.3g}); rescale the gradients "
            "(F^-1 scales by the inverse square of the factor). Nothing was written"
        )

    def _make_groups(self, damp: float) -> list[BlockGroup]:
        d, size, m = self.dim, self.block_size, self.num_grads
        full = d // size
        tile = tile_bytes(self.buffer.device)
        groups = [BlockGroup(0, full, size, m, damp, tile)] if full else []
        if d - full * size:
            groups.append(BlockGroup(full * size, 1, d - full * size, m, damp, tile))
        return groups

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        """Where the operator's tensors live."""
        return self.buffer.device

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the m x d buffer."""
        return self.buffer.dtype

    @property
    def memory_mapped(self) -> bool:
        """True when the m x d buffer, or the blocks' float64 inverses (direct form, d x B
        values), are paged from a memory-mapped file because they exceeded the budget."""
        mappings = FileMappings()  # /proc/self/maps read once, not once per tensor
        tensors = [self.buffer, *(t for g in self.groups for t in g.tensors().values())]
        return any(is_memory_mapped(t, mappings) for t in tensors)

    @property
    def nbytes(self) -> int:
        """Bytes held by the operator: the m x d buffer plus the blocks' factors or inverses."""
        owned = sum(t.numel() * t.element_size() for g in self.groups for t in g.tensors().values())
        return self.buffer.numel() * self.buffer.element_size() + owned

    # ------------------------------------------------------------------ queries
    def ihvp(self, x: torch.Tensor) -> torch.Tensor:
        """F^-1 x for x of shape (d,) or (d, k); the result has x's dtype."""
        check_vector(x, self.dim, self.device, "x")
        xm = x.unsqueeze(1) if x.ndim == 1 else x
        out = torch.empty_like(xm)
        for group in self.groups:
            out[group.start : group.stop] = group.ihvp(self.buffer, xm[group.start : group.stop])
        if not bool(torch.isfinite(out).all()):
            precision = sorted({str(t).replace("torch.", "") for t in (self.dtype, x.dtype)})
            raise OverflowError(
                f"F^-1 x overflows {' / '.join(precision)}: x (largest |entry| "
                f"{float(xm.abs().max()):.3g}) scaled by up to 1/damp = {1 / self.damp:.3g} "
                "leaves the range; rescale x (F^-1 is linear)"
            )
        return out.squeeze(1) if x.ndim == 1 else out

    def diag(self) -> torch.Tensor:
        """diag(F^-1) as a float64 vector of length d; O(m d)."""
        return torch.cat([g.diag(self.buffer) for g in self.groups])

    def submatrix(self, idx: torch.Tensor | list[int]) -> torch.Tensor:
        """(F^-1)[idx][:, idx] as a float64 p x p matrix; O(m p^2) (exact OBS needs it)."""
        index = torch.as_tensor(idx, dtype=torch.long, device=self.device).reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.dim):
            raise IndexError(f"coordinates must lie in [0, {self.dim}), got {index.tolist()[:8]}")
        out = torch.zeros(index.numel(), index.numel(), dtype=F64, device=self.device)
        for group in self.groups:
            pos = ((index >= group.start) & (index < group.stop)).nonzero().flatten()
            if pos.numel():
                sub = group.submatrix(self.buffer, index[pos] - group.start)
                out[pos[:, None], pos[None, :]] = sub
        return out

    def entry(self, i: int, j: int) -> float:
        """The single entry (F^-1)_ij; O(m)."""
        return float(self.submatrix([i, j])[0, 1])

    def to(self, device: torch.device | str) -> InverseFisher:
        """Move the operator to ``device`` in place and return it."""
        device = torch.device(device)
        self.buffer = self.buffer.to(device)
        for group in self.groups:
            group.to(device)
        return self

    def __repr__(self) -> str:
        forms = sorted({"direct" if g.direct else "woodbury" for g in self.groups})
        return (
            f"InverseFisher(m={self.num_grads}, d={self.dim}, block_size={self.block_size}, "
            f"damp={self.damp:.3g}, forms={forms}, dtype={self.dtype}, "
            f"nbytes={self.nbytes}, memory_mapped={self.memory_mapped})"
        )

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        data: Any,
        loss_fn: LossFn,
        num_grads: int,
        *,
        per_sample: bool = True,
        block_size: int | None = None,
        damp: float = 1e-5,
        damp_mode: DampMode = "absolute",
        params: Sequence[str] | Sequence[torch.Tensor] | None = None,
        dtype: torch.dtype = torch.float32,
        chunk_size: int = 64,
        memory_budget: int | None = None,
        fisher: FisherKind = "empirical",
        sample_fn: SampleFn | None = None,
        generator: torch.Generator | None = None,
    ) -> InverseFisher:
        """The operator over ``num_grads`` per-example (or, ``per_sample=False``, per-batch)
        gradients of ``loss_fn(model, batch)`` (the batch's mean loss) on ``data``: one batch
        (a tuple or dict of tensors, cut into chunks of ``chunk_size`` examples) or an iterable
        of batches. ``params``: names (tied aliases accepted) or Parameter objects; default every
        parameter that requires grad. The operator keeps the parameter layout for
        ``flatten``/``unflatten``. See :mod:`mfac.operators.gradients`.

        ``fisher="empirical"`` (default) takes the gradients at the data's own targets;
        ``fisher="mc"`` at targets drawn from the model's predictive distribution (one draw per
        example: the Monte Carlo estimate of the true Fisher). The draw is
        ``sample_fn(model, batch, generator)``, by default `sample_labels` (class labels from
        softmax(logits) of an (n, C) classifier, for ``(inputs, targets)`` tuples and Hugging
        Face dicts with ``"labels"``); ``loss_fn`` then gets the batch with the drawn targets."""
        if fisher not in ("empirical", "mc"):
            raise ValueError(f"fisher must be 'empirical' or 'mc', got {fisher!r}")
        if fisher == "empirical" and (sample_fn is not None or generator is not None):
            raise ValueError("sample_fn and generator draw the targets of fisher='mc' only")
        if fisher == "mc":
            check_positive_int(chunk_size, "chunk_size")
            data = sampled_batches(
                model, batches_of(data, chunk_size), sample_fn or sample_labels, generator
            )
        rows, layout = collect_gradients(
            model, data, loss_fn, num_grads, per_sample=per_sample, params=params, dtype=dtype,
            chunk_size=chunk_size,
        )  # fmt: skip
        op = cls(rows, damp, block_size, damp_mode=damp_mode, memory_budget=memory_budget)
        op.layout = layout
        return op


def build_from_rows(
    rows: object,
    num_grads: int,
    dim: int,
    *,
    damp: float = 1e-5,
    block_size: int | None = None,
    damp_mode: DampMode = "absolute",
    dtype: torch.dtype = torch.float32,
    memory_budget: int | None = None,
    spill_dir: str | os.PathLike[str] | None = None,
) -> InverseFisher:
    """Stream ``num_grads`` gradients (an iterable of tensors with ``dim`` entries each) into a
    buffer (RAM, or memory-mapped past ``memory_budget``) and build the operator over it."""
    from .memory import GradientBuffer

    buf = GradientBuffer(num_grads, dim, dtype, memory_budget=memory_budget, spill_dir=spill_dir)
    for row in rows:  # type: ignore[attr-defined]
        buf.append(row)
    if not buf.full:
        raise ValueError(f"expected {num_grads} gradients, got {buf.count}")
    return InverseFisher(
        buf.tensor, damp, block_size, damp_mode=damp_mode, memory_budget=memory_budget
    )


__all__ = [
    "LOW_PRECISION",
    "FisherFactorError",
    "FisherKind",
    "InverseFisher",
    "build_from_rows",
    "device_memory_budget",
    "squared_row_norms",
]
