"""The static M-FAC algorithm: exact products with the inverse of a damped empirical Fisher
F = lambda*I + G^T G / m built once from a fixed m x d set of gradients (optionally
block-diagonal), never forming a d x d matrix."""

from __future__ import annotations

import os
from typing import Literal

import torch

from .._validation import (
    LOW_PRECISION,
    NonFiniteGradientError,
    check_damp,
    check_float_dtype,
    check_positive_int,
    check_vector,
)
from .blocks import F64, BlockGroup
from .linear import LinearOperatorMixin
from .memory import is_memory_mapped

DampMode = Literal["absolute", "relative"]


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


class InverseFisher(LinearOperatorMixin):
    """Exact products with F^-1, where F = lambda*I + (1/m) sum_i g_i g_i^T.

    ``grads`` (m x d) is consumed in place when it is float32/float64: it is overwritten by
    Q = L^-1 G, so no second m x d copy is made. bfloat16/float16 gradients are kept as stored
    (the operator is then the exact inverse of the F built from the rounded rows).

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
        row_sq = squared_row_norms(grads)
        bad = (~torch.isfinite(row_sq)).nonzero().flatten()
        if bad.numel():
            raise NonFiniteGradientError(
                f"gradient rows {bad[:5].tolist()} contain NaN or Inf ({bad.numel()} rows in all)"
            )
        if damp_mode == "relative":
            mean_diag = float(row_sq.sum()) / (m * d)
            if mean_diag == 0.0:
                raise ValueError("relative damping needs gradients that are not all zero")
            damp = damp * mean_diag
        self.num_grads, self.dim = m, d
        self.damp = damp
        self.block_size = d if block_size is None else min(block_size, d)
        self.buffer = grads
        self.groups = self._make_groups()
        for group in self.groups:
            group.build(grads, memory_budget)

    def _make_groups(self) -> list[BlockGroup]:
        d, size, m = self.dim, self.block_size, self.num_grads
        full = d // size
        groups = [BlockGroup(0, full, size, m, self.damp)] if full else []
        if d - full * size:
            groups.append(BlockGroup(full * size, 1, d - full * size, m, self.damp))
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
        return is_memory_mapped(self.buffer) or any(
            is_memory_mapped(t) for g in self.groups for t in g.tensors().values()
        )

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
    def from_model(cls, model: torch.nn.Module, *args: object, **options: object) -> InverseFisher:
        """``from_model(model, data, loss_fn, num_grads, per_sample=True, block_size=None,
        damp=..., damp_mode=..., params=None)``: the operator over per-example (or per-batch)
        gradients of a model's loss, keeping the parameter layout (`mfac.operators.model`)."""
        from .model import inverse_fisher_from_model

        return inverse_fisher_from_model(model, *args, **options)  # type: ignore[arg-type]


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


__all__ = ["LOW_PRECISION", "InverseFisher", "build_from_rows", "squared_row_norms"]
