"""Compressed and shared pieces of the sliding window used by the M-FAC optimizer.

- The m x m algebra (K and its Cholesky factor) is :class:`mfac.operators.gram.GramFactor`,
  shared with the dense operator :class:`mfac.SlidingInverseFisher` and the sharded window.
- :class:`TopKSlidingInverseFisher`: EFCP, error-feedback top-k history. Each gradient g is
  added to the error e, the k largest magnitudes c of a = e + g are stored (k values + int32
  indices, int16 when d < 32768), and e = a - c carries the rest into later steps. G x is a
  gather, G^T y a scatter-add, both O(m k); the m x m algebra is unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._validation import (
    NonFiniteGradientError,
    check_float_dtype,
    check_positive_int,
)
from ..operators.gram import FactorBacked, GramFactor
from ..operators.memory import check_fits

F64 = torch.float64


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
        if not 0.0 < topk <= 1.0:
            raise ValueError(f"topk as a density must lie in (0, 1], got {topk}")
        return max(1, min(dim, round(topk * dim)))
    if isinstance(topk, int):
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        return min(topk, dim)
    raise TypeError(f"topk must be an int or a float density, got {type(topk).__name__}")


class TopKSlidingInverseFisher(FactorBacked):
    """EFCP sliding window: rows are top-k sparse (values in ``dtype`` + int16/int32 indices).

    ``push_ihvp(g)`` forms a = e + g, stores c = top-k(a) as the new row, keeps e = a - c, and
    returns F^-1 c = m G^T K^-1 e_r under the updated window (the applied step is the
    preconditioned compressed vector; what top-k dropped returns through e in later steps).
    Indices are int16 when d < 32768, else int32.
    Memory: m*k*(value bytes + index bytes) for the window, d floats for the error, 2 m^2 float64.
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
        value_bytes = torch.empty((), dtype=dtype).element_size()
        # int16 indices when every coordinate fits (d < 32768), int32 otherwise
        index_dtype = torch.int16 if dim <= torch.iinfo(torch.int16).max else torch.int32
        index_bytes = 2 if index_dtype == torch.int16 else 4
        check_fits(
            window * k * (value_bytes + index_bytes) + dim * 4,
            f"a top-k window of {window} x {k} entries over {dim} coordinates",
            memory_budget,
            device,
        )
        self.dim, self.window, self.k = dim, window, k
        self.factor = GramFactor(window, damp, device)
        self.values = torch.zeros(window, k, dtype=dtype, device=device)
        self.indices = torch.zeros(window, k, dtype=index_dtype, device=device)
        self.error = torch.zeros(dim, dtype=torch.float32, device=device)

    @property
    def window_nbytes(self) -> int:
        """Bytes of the compressed window only (values + indices)."""
        return (
            self.values.numel() * self.values.element_size()
            + self.indices.numel() * self.indices.element_size()
        )

    @property
    def nbytes(self) -> int:
        """Bytes held: window, error-feedback vector, K and its factor."""
        return self.window_nbytes + self.error.numel() * 4 + 2 * self.window**2 * 8

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """G x (m,) for a dense float32 x: a gather of m*k entries."""
        picked = x[self.indices.long()]
        return (picked * self.values.float()).sum(1)

    def _scatter(self, coeff: torch.Tensor) -> torch.Tensor:
        """G^T c (d,) for c of shape (m,): a scatter-add of m*k entries."""
        out = torch.zeros(self.dim, dtype=torch.float32, device=self.values.device)
        contrib = self.values.float() * coeff.to(torch.float32)[:, None]
        out.index_add_(0, self.indices.reshape(-1).long(), contrib.reshape(-1))
        return out

    def push_ihvp(self, g: torch.Tensor) -> torch.Tensor:
        """Error-feedback compress ``g`` into the window and return F^-1 c (shape of g)."""
        flat = g.reshape(-1)
        if flat.numel() != self.dim:
            raise ValueError(f"gradient has {flat.numel()} entries, the window holds {self.dim}")
        acc = self.error + flat.to(torch.float32)
        if not finite_fast(acc):
            raise NonFiniteGradientError("gradient contains NaN or Inf; the window is unchanged")
        idx = torch.topk(acc.abs(), self.k, sorted=False).indices
        vals = acc[idx].to(self.values.dtype)
        slot = self.factor.next_slot
        old_vals, old_idx = self.values[slot].clone(), self.indices[slot].clone()
        self.values[slot] = vals
        self.indices[slot] = idx.to(self.indices.dtype)
        dense_c = torch.zeros_like(acc)
        dense_c[idx] = vals.float()  # the row as stored (rounded to the window dtype)
        try:
            self.factor.commit(self._gather(dense_c))
        except RuntimeError:
            self.values[slot], self.indices[slot] = old_vals, old_idx
            raise
        acc.sub_(dense_c)
        self.error = acc
        return self._scatter(self.factor.slot_coeff(slot)[:, 0]).to(g.dtype).view_as(g)

    def ihvp(self, x: torch.Tensor) -> torch.Tensor:
        """F^-1 x = (x - G^T K^-1 G x) / lambda for x of shape (d,)."""
        xf = x.reshape(-1).to(torch.float32)
        c = self.factor.solve(self._gather(xf)[:, None])[:, 0]
        return ((xf - self._scatter(c)) / self.damp).to(x.dtype).view_as(x)

    def dense_rows(self) -> torch.Tensor:
        """The window as a dense m x d float32 matrix (for tests and inspection)."""
        out = torch.zeros(self.window, self.dim, dtype=torch.float32, device=self.values.device)
        out.scatter_(1, self.indices.long(), self.values.float())
        return out

    def state_dict(self) -> dict[str, Any]:
        """Window values/indices, error-feedback vector, K, factor, pointer (all cloned)."""
        return {
            "values": self.values.clone(),
            "indices": self.indices.clone(),
            "error": self.error.clone(),
            **self.factor.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; checks shapes and dtypes first."""
        if tuple(state["values"].shape) != (self.window, self.k):
            raise ValueError(
                f"state holds a top-k window of shape {tuple(state['values'].shape)}, "
                f"this one is ({self.window}, {self.k})"
            )
        if state["values"].dtype != self.values.dtype:
            raise TypeError(
                f"state stores {state['values'].dtype}, this window stores {self.values.dtype}"
            )
        if tuple(state["error"].shape) != (self.dim,):
            raise ValueError(f"state's error vector has shape {tuple(state['error'].shape)}")
        self.factor.load_state_dict(state)
        self.values.copy_(state["values"])
        self.indices.copy_(state["indices"])
        self.error = state["error"].to(self.error.device, torch.float32).clone()

    def __repr__(self) -> str:
        return (
            f"TopKSlidingInverseFisher(dim={self.dim}, window={self.window}, k={self.k}, "
            f"damp={self.damp:g}, pushed={self.num_pushed})"
        )


__all__ = ["GramFactor", "TopKSlidingInverseFisher", "check_fits", "resolve_k"]
