"""The m x m algebra of a sliding window: K = m*lambda*I + G G^T (float64) and its Cholesky
factor, shared by every window layout (dense rows in :mod:`mfac.operators.sliding`, top-k rows
and sharded columns in :mod:`mfac.optim`). docs/algorithms.md section 3."""

from __future__ import annotations

from typing import Any

import torch

from .._validation import check_damp, check_positive_int
from .threads import single_threaded

F64 = torch.float64


class GramFactor:
    """K = m*lambda*I + G G^T (float64) for a window of ``window`` rows, and its Cholesky factor.

    The window layouts only supply u = G g for the incoming row; this class writes u into
    row/column ``slot`` of K, refactors it and advances the ring pointer, restoring K exactly
    when the factorisation fails. Refactoring costs O(m^3) flops in float64, milliseconds for
    m <= 1024 and small next to the O(m d) passes over the window.
    """

    def __init__(self, window: int, damp: float, device: torch.device) -> None:
        self.window = check_positive_int(window, "window")
        self.damp = check_damp(damp)
        self.gram = torch.eye(window, dtype=F64, device=device) * (window * self.damp)
        self.chol = torch.linalg.cholesky(self.gram)
        self.next_slot = 0
        self.num_pushed = 0

    def commit(self, u: torch.Tensor) -> int:
        """Write u = G g_new (with u[slot] = g_new . g_new) into row and column ``slot`` of K,
        refactor, and advance the ring; return the slot used. On failure K is restored."""
        slot = self.next_slot
        u = u.to(F64)
        old = self.gram[slot].clone()
        self.gram[slot, :] = u
        self.gram[:, slot] = u
        self.gram[slot, slot] += self.window * self.damp
        with single_threaded():
            chol, info = torch.linalg.cholesky_ex(self.gram)
        if int(info) != 0:
            self.gram[slot, :] = old
            self.gram[:, slot] = old
            raise RuntimeError(
                "the window's m x m matrix lost positive definiteness in float64 "
                f"(damp={self.damp:g} is too small for gradients of this size, or the window "
                "holds near-identical gradients); increase damp. The window is unchanged."
            )
        self.chol = chol
        self.next_slot = (slot + 1) % self.window
        self.num_pushed += 1
        return slot

    def slot_coeff(self, slot: int) -> torch.Tensor:
        """c = m K^-1 e_slot (m x 1, float64), so that F^-1 g_slot = G^T c."""
        with single_threaded():
            rhs = torch.zeros(self.window, 1, dtype=F64, device=self.gram.device)
            rhs[slot, 0] = float(self.window)
            return torch.cholesky_solve(rhs, self.chol)

    def solve(self, gx: torch.Tensor) -> torch.Tensor:
        """K^-1 (G x) for G x of shape (m, k)."""
        with single_threaded():
            return torch.cholesky_solve(gx.to(F64), self.chol)

    def state_dict(self) -> dict[str, Any]:
        """K, its factor, the ring pointer and the damping, as clones."""
        return {
            "gram": self.gram.clone(),
            "chol": self.chol.clone(),
            "next_slot": self.next_slot,
            "num_pushed": self.num_pushed,
            "damp": self.damp,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; checks shapes first."""
        for key in ("gram", "chol"):
            if tuple(state[key].shape) != (self.window, self.window):
                raise ValueError(
                    f"state's {key} has shape {tuple(state[key].shape)}, "
                    f"this window needs ({self.window}, {self.window})"
                )
        damp = check_damp(state["damp"])
        device = self.gram.device
        self.gram = state["gram"].to(device=device, dtype=F64).clone()
        self.chol = state["chol"].to(device=device, dtype=F64).clone()
        self.next_slot = int(state["next_slot"])
        self.num_pushed = int(state["num_pushed"])
        self.damp = damp


class FactorBacked:
    """Read-only views of a window's :class:`GramFactor` (``self.factor``), shared by every
    window layout: the dense operator, the top-k window and the sharded window."""

    factor: GramFactor

    @property
    def damp(self) -> float:
        """The absolute damping lambda."""
        return self.factor.damp

    @property
    def gram(self) -> torch.Tensor:
        """K = m*lambda*I + G G^T, float64 (m x m)."""
        return self.factor.gram

    @property
    def chol(self) -> torch.Tensor:
        """The lower Cholesky factor of K."""
        return self.factor.chol

    @property
    def next_slot(self) -> int:
        """The ring slot the next gradient goes to."""
        return self.factor.next_slot

    @property
    def num_pushed(self) -> int:
        """Gradients pushed so far."""
        return self.factor.num_pushed


__all__ = ["FactorBacked", "GramFactor"]
