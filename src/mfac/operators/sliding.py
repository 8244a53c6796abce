"""The dynamic M-FAC algorithm: the inverse of F = lambda*I + G^T G / m over a sliding window
of the last m gradients, updated every step in two passes over the window."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .._validation import (
    NonFiniteGradientError,
    check_damp,
    check_float_dtype,
    check_positive_int,
    check_vector,
    finite_fast,
)
from .gram import DenseRowsBacked, GramFactor
from .kernels import cols_dot, rows_dot, squared_norm
from .memory import check_fits, gram_nbytes
from .threads import single_threaded

F64 = torch.float64
STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class SlidingInverseFisher(DenseRowsBacked):
    """F^-1 over a ring buffer of the last ``window`` gradients of dimension ``dim``.

    The window G (m x d, ``dtype`` float32, bfloat16 or float16) and the m x m matrix
    K = m*lambda*I + G G^T with its inverse (float64, :class:`GramFactor`) are kept up to date;
    a push updates K^-1 in O(m^2) and refactors it every m pushes.

    Empty slots are zero rows: they add nothing to G^T G, and normalisation always uses the
    window size m. So the very first step is ``m*g / (m*lambda + |g|^2)``, a normalised
    gradient step. With low-precision storage, K is computed from the stored (rounded) rows, so
    the operator is the exact inverse of a consistent F.
    """

    def __init__(
        self,
        dim: int,
        window: int,
        damp: float | None = 1e-5,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        *,
        memory_budget: int | None = None,
    ) -> None:
        check_positive_int(dim, "dim")
        check_positive_int(window, "window")
        if damp is not None:
            check_damp(damp)
        check_float_dtype(dtype, "dtype")
        device = torch.device(device) if device is not None else torch.device("cpu")
        check_fits(
            self.required_bytes(dim, window, dtype),
            f"a window of {window} x {dim} {dtype} gradients (with its {window} x {window} "
            "float64 matrices and step buffers)",
            memory_budget,
            device,
        )
        self.dim, self.window = dim, window
        self._zero_rows_on_first_use((window, dim), dtype, device)
        self.factor = GramFactor(window, damp, device)

    @staticmethod
    def required_bytes(dim: int, window: int, dtype: torch.dtype = torch.float32) -> int:
        """Peak bytes of the operator: the m x d window, the m x m float64 matrices (K, K^-1
        and the refactorisation's two temporaries) and a step's d-sized buffers (the stored
        row, its float32 copy and the result)."""
        elem = torch.empty((), dtype=dtype).element_size()
        return window * dim * elem + gram_nbytes(window) + dim * (elem + 8)

    # ------------------------------------------------------------------ properties
    @property
    def nbytes(self) -> int:
        """Bytes held: the window plus the two m x m float64 matrices (K and K^-1)."""
        return self.window_nbytes + self.factor.nbytes

    # ------------------------------------------------------------------ updates
    def _check_grad(self, g: torch.Tensor) -> torch.Tensor:
        """Check type, dtype, size and device (metadata only; finiteness is checked in _insert)."""
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"gradient must be a torch.Tensor, got {type(g).__name__}")
        check_float_dtype(g.dtype, "gradient")
        if g.numel() != self.dim:
            raise ValueError(
                f"gradient has shape {tuple(g.shape)} ({g.numel()} entries); the window holds "
                f"gradients of {self.dim} entries"
            )
        if g.device != self.device:
            raise ValueError(f"gradient is on device {g.device}, the window lives on {self.device}")
        return g.reshape(-1)

    def _insert(self, flat: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor | None:
        """Write ``flat`` into the next slot and update K and K^-1 (O(m^2)): one pass over G.

        u = G g is taken with the old row still in slot r, then u[r] is replaced by g.g, so
        nothing is written until every check has passed. g.g doubles as the NaN/Inf check
        (a NaN or Inf entry makes it non-finite), which saves a separate pass over g. With
        ``x`` (float32 or float64, d), the same pass also reads G x; returns G x under the
        updated window (float64), else None.
        """
        slot = self.next_slot
        with single_threaded(device=self.device):
            stored = flat.to(self.grads.dtype)
        if x is None:
            u = rows_dot(self.grads, stored.unsqueeze(1))[:, 0]  # the pass over G: all threads
            products = None
        else:
            acc = torch.float32 if self.grads.dtype != F64 else F64
            both = rows_dot(self.grads, torch.stack([stored.to(acc), x.to(acc)], 1)).to(F64)
            u, products = both[:, 0], both[:, 1]
        with single_threaded(device=self.device):
            u = u.to(F64)
            wide = stored.to(torch.float32 if stored.dtype != F64 else F64)
            u[slot] = squared_norm(wide)
            if not bool(torch.isfinite(u[slot])):
                if not bool(torch.isfinite(flat).all()):
                    raise NonFiniteGradientError(
                        "gradient contains NaN or Inf; the window is unchanged"
                    )
                if not bool(torch.isfinite(stored).all()):
                    raise NonFiniteGradientError(
                        f"gradient overflows {self.grads.dtype} storage; the window is unchanged"
                    )
                u[slot] = float(stored.to(F64).square().sum())  # float32 overflow of g.g only
        self.factor.commit(u)  # K's row/column and K^-1; raises with both restored
        with single_threaded(device=self.device):
            self.grads[slot] = stored
            if products is not None:  # the pass read the slot's old row
                products[slot] = float(torch.dot(wide, x.to(wide.dtype)))
        return products

    def push(self, g: torch.Tensor) -> None:
        """Add a gradient to the window, replacing the oldest one when the window is full."""
        self._insert(self._check_grad(g))

    def push_gather(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Push ``g`` and return G x (m,) float64 under the updated window, from the same pass
        over G: for rules that apply their own function of the window's spectrum."""
        flat = self._check_grad(g)
        return self._insert(flat, self._check_grad(x))

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """G x (m,) float64 for x of shape (d,): one pass over G."""
        xf = self._check_grad(x)
        wide = torch.float32 if self.grads.dtype != F64 else F64
        return rows_dot(self.grads, xf.to(wide).unsqueeze(1))[:, 0].to(F64)

    def scatter(
        self,
        coeff: torch.Tensor,
        out: torch.Tensor | None = None,
        plus: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """G^T c (d,) for c of shape (m,) (float32, float64 for a float64 window), plus
        ``plus`` when given, written into ``out`` when given: one pass over G."""
        if not isinstance(coeff, torch.Tensor) or coeff.numel() != self.window:
            raise ValueError(f"coeff must be a tensor of {self.window} entries (one per row)")
        wide = torch.float32 if self.grads.dtype != F64 else F64
        result = cols_dot(self.grads, coeff.reshape(-1, 1).to(device=self.device, dtype=wide))
        result = result[:, 0]
        if plus is not None:  # result is this call's own buffer: add in place
            result.add_(plus.reshape(-1))
        return result if out is None else out.view(-1).copy_(result)

    # ------------------------------------------------------------------ products
    def ihvp(self, x: torch.Tensor) -> torch.Tensor:
        """F^-1 x = (x - G^T K^-1 G x) / lambda, for x of shape (d,) or (d, k).

        The subtraction cancels when x lies in the span of the window's gradients (always when
        d <= m): the relative error is then about eps * |x| / (lambda * |F^-1 x|). To
        precondition a gradient, use :meth:`push_ihvp`, which has no such cancellation.
        """
        check_vector(x, self.dim, self.device, "x")
        xm = x.unsqueeze(1) if x.ndim == 1 else x
        c = self.factor.solve(rows_dot(self.grads, xm))
        y = (xm.to(torch.float32 if xm.dtype != F64 else F64) - cols_dot(self.grads, c)) / self.damp
        y = y.to(x.dtype)
        return y.squeeze(1) if x.ndim == 1 else y

    def push_ihvp(self, g: torch.Tensor) -> torch.Tensor:
        """Push ``g`` and return F^-1 g_stored under the updated window, reading G twice.

        With g stored as row r, F^-1 g = m G^T K^-1 e_r exactly, which avoids the
        cancellation between g/lambda and G^T K^-1 G g/lambda of the generic formula. When the
        window's rows are linearly dependent (d < m, or collinear gradients), K^-1 e_r has a
        component ~1/(m lambda) along G's left null space that the float32 pass G^T c cancels
        only up to its rounding: relative error ~ eps * |G| * m|K^-1 e_r| / |F^-1 g|. With
        low-precision storage the result is F^-1 of the gradient *as stored*: the exact
        F^-1 of the unrounded g would add the rounding residual amplified by 1/lambda, a
        step of pure rounding noise.
        """
        self.factor.require_inverse()  # an undamped window refuses before pushing
        flat = self._check_grad(g)
        slot = self.next_slot
        self._insert(flat)
        coeff = self.factor.slot_coeff(slot)
        return cols_dot(self.grads, coeff)[:, 0].to(g.dtype).view_as(g)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically (window, K, K^-1, the pointer).

        ``grads`` holds the filled rows only, so a checkpoint grows with the window. A full
        window is returned by reference, as ``torch.optim`` returns its state (a checkpoint
        must not hold a second copy of the largest buffer): save (``torch.save``) or copy it
        before the next push. A partly filled one is a copy of its filled rows."""
        filled = self.filled
        grads = self.grads if filled == self.window else self.grads[:filled].clone()
        return {"grads": grads, **self.factor.state_dict()}

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise, naming the field, unless ``state`` fits this operator and is consistent
        (shapes, dtypes, finite values, pointer, damping, K = m*damp*I + G G^T); writes nothing."""
        if not isinstance(state, Mapping):
            raise TypeError(f"window state must be a mapping, got {type(state).__name__}")
        if "grads" not in state:
            raise KeyError("state is missing the field 'grads'")
        grads = state["grads"]
        if not isinstance(grads, torch.Tensor):
            raise TypeError(f"grads must be a tensor, got {type(grads).__name__}")
        pushed = state.get("num_pushed")
        filled = min(pushed, self.window) if isinstance(pushed, int) else self.window
        if grads.ndim != 2 or grads.shape[1] != self.dim or grads.shape[0] not in (
            filled,
            self.window,
        ):
            raise ValueError(
                f"grads: state holds rows of shape {tuple(grads.shape)}, this operator needs "
                f"({filled}, {self.dim}) (the filled rows) or ({self.window}, {self.dim})"
            )
        if grads.dtype != self.dtype:
            raise TypeError(
                f"grads: state stores {grads.dtype}, this operator stores {self.dtype}"
            )
        grads = grads.to(self.device)
        with single_threaded(device=self.device):
            if not finite_fast(grads):
                raise ValueError("grads contains NaN or Inf")

        rows = grads.shape[0]

        def window_gram(z: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(self.window, dtype=F64, device=z.device)
            out[:rows] = rows_dot(grads, cols_dot(grads, z[:rows].unsqueeze(1)))[:, 0].to(F64)
            return out

        self.factor.check_state(state, window_gram)

    def __repr__(self) -> str:
        return (
            f"SlidingInverseFisher(dim={self.dim}, window={self.window}, "
            f"damp={self.damp if self.damp is None else format(self.damp, 'g')}, "
            f"dtype={self.dtype}, pushed={self.num_pushed})"
        )


__all__ = ["STORAGE_DTYPES", "SlidingInverseFisher"]
