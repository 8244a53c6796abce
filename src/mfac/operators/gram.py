"""The m x m algebra of a sliding window: K = m*lambda*I + G G^T and its inverse (float64),
shared by every window layout (dense rows in :mod:`mfac.operators.sliding`, top-k rows in
:mod:`mfac.operators.topk`, sharded columns in :mod:`mfac.operators.sharded`).
docs/algorithms.md section 3.

A push replaces row and column r of K, a symmetric rank-2 change. Instead of refactoring K
(O(m^3)), the inverse B = K^-1 is updated in O(m^2) by two exact identities:

- removing row/column r: the inverse of K without r, embedded with a zero row/column r, is
  A = B - B[:, r] B[r, :] / B[r, r];
- bordering with the new row b (b[r] = 0) and diagonal c: with w = A b and the Schur
  complement s = c - b.w > 0, K'^-1 = A + v v^T / s, v = w - e_r, and K'^-1 e_r = -v / s.

So one push costs a matrix-vector product with B, a rank-2 update of B, and a residual check
K' y = e_r (one more matrix-vector product). B is recomputed from scratch (Cholesky, O(m^3))
every m pushes, and at once when the residual check fails or s is not safely positive, so
rounding never accumulates over more than one pass of the ring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .._validation import NonFiniteGradientError, check_damp, check_positive_int
from .memory import adoptable
from .threads import single_threaded

F64 = torch.float64

#: Relative backward residual |K y - e_r| / (trace(K) |y|) above which a push refactors K.
REFACTOR_TOL = 1e-11
#: Looser bounds used when a saved state is checked: the stored inverse against K, and K
#: against m*lambda*I + G G^T of the stored window (G is float32 or lower, so K carries its
#: rounding), both measured on a random probe vector.
INVERSE_TOL = 1e-7
STALE_TOL = 1e-4
STATE_KEYS = ("gram", "inverse", "next_slot", "num_pushed", "since_refactor", "damp")


class GramFactor:
    """K = m*lambda*I + G G^T (float64) for a window of ``window`` rows, and B = K^-1.

    The window layouts only supply u = G g for the incoming row; :meth:`commit` writes u into
    row/column ``next_slot`` of K, updates B in O(m^2) (see the module docstring) and advances
    the ring pointer. When K would lose positive definiteness, K and B are restored and a
    RuntimeError says so.

    ``damp=None`` keeps K = G G^T alone (positive semi-definite, no inverse): the form for a
    rule that applies its own function of the window's spectrum (``mfac.MFAC``'s default
    rule), so the O(m^2) inverse updates are not paid for nothing.
    """

    def __init__(
        self, window: int, damp: float | None, device: torch.device | str | None
    ) -> None:
        self.window = check_positive_int(window, "window")
        self.damp = None if damp is None else check_damp(damp)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if self.damp is None:
            self.gram = torch.zeros(window, window, dtype=F64, device=device)
            self.inverse = torch.empty(0, dtype=F64, device=device)
        else:
            self.gram = torch.eye(window, dtype=F64, device=device) * (window * self.damp)
            self.inverse = torch.eye(window, dtype=F64, device=device) / (window * self.damp)
        self.next_slot = 0
        self.num_pushed = 0
        self.since_refactor = 0
        self.refactors = 0  # full refactorisations so far (diagnostics, not saved)

    # ------------------------------------------------------------------ updates
    @property
    def shift(self) -> float:
        """m * lambda, the diagonal shift of K (0 without damping)."""
        return 0.0 if self.damp is None else self.window * self.damp

    @property
    def filled(self) -> int:
        """Slots holding a row."""
        return min(self.num_pushed, self.window)

    @property
    def nbytes(self) -> int:
        """Bytes of K and (when damped) K^-1."""
        return (self.gram.numel() + self.inverse.numel()) * 8

    def require_inverse(self) -> None:
        """Refuse, before anything is pushed, a query that needs K^-1 of an undamped window."""
        if self.damp is None:
            raise RuntimeError(
                "this window was built without damping (damp=None): it keeps G G^T for a rule "
                "that applies its own function of the spectrum, and has no inverse to apply"
            )

    def _commit_undamped(self, u: torch.Tensor) -> int:
        slot = self.next_slot
        self.gram[slot, :] = u
        self.gram[:, slot] = u
        self.next_slot = (slot + 1) % self.window
        self.num_pushed += 1
        return slot

    def _refactor(self) -> None:
        """B = K^-1 from a float64 Cholesky factor of K; RuntimeError when K is not SPD."""
        chol, info = torch.linalg.cholesky_ex(self.gram)
        if int(info) != 0:
            raise RuntimeError(
                "the window's m x m matrix K = m*damp*I + G G^T lost positive definiteness in "
                f"float64 (damp={self.damp:g} is too small for gradients of this size, or the "
                "window holds near-identical gradients); increase damp. The window is unchanged."
            )
        self.inverse = torch.cholesky_inverse(chol)
        self.since_refactor = 0
        self.refactors += 1

    def commit(self, u: torch.Tensor) -> int:
        """Write u = G g_new (with u[slot] = g_new . g_new) into row and column ``slot`` of K,
        update K^-1, and advance the ring; return the slot used. On failure nothing changes."""
        slot = self.next_slot
        with single_threaded(device=self.gram.device):
            u = u.to(F64).reshape(-1)  # read only: b below is the working copy
            if not bool(torch.isfinite(u).all()):
                raise NonFiniteGradientError(
                    "the products G g of the window with this gradient overflow the window's "
                    "float range (float32: |G_i . g| > 3.4e38), so K cannot be formed; scale the "
                    "loss down or clip the gradients (damping cannot help). The window is "
                    "unchanged."
                )
            if self.damp is None:
                return self._commit_undamped(u)
            diag = float(u[slot]) + self.shift
            b = u.clone()
            b[slot] = 0.0
            inv = self.inverse
            col = inv[:, slot].clone()
            brr = float(col[slot])
            w = inv @ b
            w.sub_(col, alpha=float(w[slot]) / brr)  # A b with A = B - col col^T / brr
            w[slot] = 0.0
            schur = diag - float(b @ w)
            old_row = self.gram[slot].clone()
            self.gram[slot, :] = u
            self.gram[:, slot] = u
            self.gram[slot, slot] = diag
            refactor = not (math.isfinite(schur) and schur > 1e-13 * diag and brr > 0.0)
            refactor = refactor or self.since_refactor + 1 >= self.window
            y = None
            if not refactor:
                y = w.mul(-1.0 / schur)
                y[slot] = 1.0 / schur  # K'^-1 e_r = (e_r - w) / s
                resid = self.gram @ y
                resid[slot] -= 1.0
                scale = float(self.gram.diagonal().sum()) * float(y.abs().max())
                refactor = not float(resid.abs().max()) <= REFACTOR_TOL * scale
            if refactor:
                try:
                    self._refactor()
                except RuntimeError:
                    self.gram[slot, :] = old_row
                    self.gram[:, slot] = old_row
                    raise
            else:
                v = w
                v[slot] = -1.0
                left = torch.stack([col, v], dim=1)
                right = torch.stack([col * (-1.0 / brr), v * (1.0 / schur)], dim=0)
                inv.addmm_(left, right)
                inv[slot, :] = y
                inv[:, slot] = y
                self.since_refactor += 1
        self.next_slot = (slot + 1) % self.window
        self.num_pushed += 1
        return slot

    # ------------------------------------------------------------------ products
    def slot_coeff(self, slot: int) -> torch.Tensor:
        """c = m K^-1 e_slot (m x 1, float64), so that F^-1 g_slot = G^T c."""
        self.require_inverse()
        return self.inverse[:, slot : slot + 1] * float(self.window)

    def solve(self, gx: torch.Tensor) -> torch.Tensor:
        """K^-1 (G x) for G x of shape (m, k)."""
        self.require_inverse()
        with single_threaded(device=self.gram.device):
            return self.inverse @ gx.to(F64)

    def rebuild(self, gram: torch.Tensor) -> None:
        """Replace K by that of a filled window (every slot then counts as holding a row) and
        refactor it; on failure nothing changes."""
        old = self.gram
        self.gram = gram.to(device=old.device, dtype=F64).clone()
        if self.damp is not None:
            try:
                self._refactor()
            except RuntimeError:
                self.gram = old
                raise
        self.num_pushed = max(self.num_pushed, self.window)
        self.next_slot = self.num_pushed % self.window

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """K, its inverse, the ring pointer and the damping, as clones."""
        return {
            "gram": self.gram.clone(),
            "inverse": self.inverse.clone(),
            "next_slot": self.next_slot,
            "num_pushed": self.num_pushed,
            "since_refactor": self.since_refactor,
            "damp": self.damp,
        }

    def check_state(
        self,
        state: Mapping[str, Any],
        window_gram: Callable[[torch.Tensor], torch.Tensor] | None = None,
        prefix: str = "",
    ) -> None:
        """Raise, naming the field, unless ``state`` is a consistent state of this factor.

        Checks keys, types, shapes, dtype (float64), finiteness, the ring pointer, the damping
        (it must equal this window's), that K is symmetric positive definite, that the stored
        inverse is K's inverse, and, when ``window_gram(z)`` (G G^T z of the saved window,
        float64) is given, that K = m*lambda*I + G G^T (a window edited after K was formed
        is refused). Writes nothing.
        """
        m = self.window
        if not isinstance(state, Mapping):
            raise TypeError(f"window state must be a mapping, got {type(state).__name__}")
        for key in STATE_KEYS:
            if key not in state:
                raise KeyError(f"state is missing the field {prefix}{key!r}")
        damp = state["damp"]
        if damp is None or self.damp is None:
            if damp is not self.damp and damp != self.damp:
                raise ValueError(
                    f"{prefix}damp = {damp!r} differs from this window's damp = {self.damp!r} "
                    "(a damped window and an undamped one hold different K)"
                )
        elif isinstance(damp, bool) or not isinstance(damp, (int, float)) or damp != self.damp:
            raise ValueError(
                f"{prefix}damp = {damp!r} differs from this window's damp = {self.damp!r}; "
                "construct the optimizer with the saved damp"
            )
        for key in ("gram", "inverse") if self.damp is not None else ("gram",):
            t = state[key]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{prefix}{key} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != (m, m):
                raise ValueError(
                    f"{prefix}{key} has shape {tuple(t.shape)}, this window needs ({m}, {m})"
                )
            if t.dtype != F64:
                raise TypeError(f"{prefix}{key} must be float64, got {t.dtype}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{prefix}{key} contains NaN or Inf")
        for key, low, high in (
            ("next_slot", 0, m - 1),
            ("num_pushed", 0, None),
            ("since_refactor", 0, m - 1),
        ):
            v = state[key]
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{prefix}{key} must be an int, got {v!r}")
            if v < low or (high is not None and v > high):
                bound = f"[{low}, {high}]" if high is not None else f">= {low}"
                raise ValueError(f"{prefix}{key} = {v} is out of range {bound}")
        if state["next_slot"] != state["num_pushed"] % m:
            raise ValueError(
                f"{prefix}next_slot = {state['next_slot']} disagrees with {prefix}num_pushed = "
                f"{state['num_pushed']} (expected num_pushed mod {m})"
            )
        gram = state["gram"].to(self.gram.device)
        with single_threaded(device=self.gram.device):
            if float((gram - gram.T).abs().max()) > 1e-12 * float(gram.abs().max()):
                raise ValueError(f"{prefix}gram is not symmetric")
            probe = torch.randn(m, dtype=F64, generator=torch.Generator().manual_seed(0))
            probe = probe.to(self.gram.device)
            if self.damp is not None:
                self._check_inverse(state, gram, probe, prefix)
            if window_gram is not None:
                want = window_gram(probe).to(F64) + self.shift * probe
                have = gram @ probe
                err = float((have - want).norm())
                size = float(gram.norm()) * float(probe.norm())
                if not err <= STALE_TOL * max(size, 1e-300):
                    raise ValueError(
                        f"{prefix}gram is stale: it differs from m*damp*I + G G^T of the stored "
                        f"window (relative error {err / max(size, 1e-300):.1e}); the window was "
                        "edited after K was formed, or the state dict was kept across a later "
                        "step (it holds the window by reference: save or copy it before "
                        "stepping on)"
                    )

    def _check_inverse(
        self, state: Mapping[str, Any], gram: torch.Tensor, probe: torch.Tensor, prefix: str
    ) -> None:
        """A damped state's K must be positive definite and its stored inverse K^-1."""
        inverse = state["inverse"].to(self.gram.device)
        if int(torch.linalg.cholesky_ex(gram)[1]) != 0:
            raise ValueError(f"{prefix}gram is not positive definite")
        y = inverse @ probe
        resid = float((gram @ y - probe).abs().max())
        scale = float(gram.diagonal().sum()) * float(y.abs().max())
        if not resid <= INVERSE_TOL * scale:
            raise ValueError(
                f"{prefix}inverse is not the inverse of {prefix}gram (relative residual "
                f"{resid / scale:.1e}); the state was edited or corrupted"
            )

    def load_state_dict(self, state: Mapping[str, Any], check: bool = True) -> None:
        """Restore from :meth:`state_dict` (checked first unless the caller already did)."""
        if check:
            self.check_state(state)
        device = self.gram.device
        self.gram = state["gram"].to(device=device, dtype=F64).clone()
        if self.damp is not None:
            self.inverse = state["inverse"].to(device=device, dtype=F64).clone()
        self.next_slot = int(state["next_slot"])
        self.num_pushed = int(state["num_pushed"])
        self.since_refactor = int(state["since_refactor"])


def placed(device: torch.device) -> torch.device:
    """The device a tensor allocated on ``device`` reports (``cuda`` -> ``cuda:<current>``,
    ``cpu:0`` -> ``cpu``): where a window whose rows are still to be allocated says it lives,
    so that its checks compare the device its tensors will report, as when read from them."""
    return torch.empty(0, device=device).device


class FactorBacked:
    """Read-only views of a window's :class:`GramFactor` (``self.factor``), shared by every
    window layout: the dense operator, the top-k window and the sharded window."""

    factor: GramFactor
    #: The attributes that hold the window's rows: allocated by ``_allocate_rows`` when one of
    #: them is first read (see :meth:`_rows_on_first_use`).
    _row_attrs: tuple[str, ...] = ()

    def _allocate_rows(self) -> None:
        raise NotImplementedError

    def _rows_on_first_use(self) -> None:
        """Defer the empty rows to their first read, so a window loaded before its first push
        adopts the saved rows instead and a resume holds one copy of the window."""
        self.__dict__["_rows_pending"] = True

    def _rows_allocated(self) -> bool:
        """Whether the rows exist (allocated, or adopted from a loaded state)."""
        return "_rows_pending" not in self.__dict__

    def _rows_adopted(self) -> None:
        """The caller has set the row attributes itself: nothing is left to allocate."""
        self.__dict__.pop("_rows_pending", None)

    def __getattr__(self, name: str) -> Any:
        """Allocate the rows when one of ``_row_attrs`` is first read."""
        if name in type(self)._row_attrs and self.__dict__.pop("_rows_pending", False):
            self._allocate_rows()
            return getattr(self, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def damp(self) -> float | None:
        """The absolute damping lambda (None: an undamped window, see :class:`GramFactor`)."""
        return self.factor.damp

    @property
    def filled(self) -> int:
        """Slots holding a row."""
        return self.factor.filled

    @property
    def gram(self) -> torch.Tensor:
        """K = m*lambda*I + G G^T, float64 (m x m); G G^T in an undamped window."""
        return self.factor.gram

    @property
    def inverse(self) -> torch.Tensor:
        """K^-1, float64 (m x m)."""
        return self.factor.inverse

    @property
    def next_slot(self) -> int:
        """The ring slot the next gradient goes to."""
        return self.factor.next_slot

    @property
    def num_pushed(self) -> int:
        """Gradients pushed so far."""
        return self.factor.num_pushed


class DenseRowsBacked(FactorBacked):
    """What the windows that store their rows densely in ``self.grads`` share (the whole window,
    or this rank's column shard): where and how they store it, and an all-or-nothing load."""

    grads: torch.Tensor
    _row_attrs = ("grads",)

    def _zero_rows_on_first_use(
        self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device
    ) -> None:
        """The rows' shape, dtype and device; the zero rows are allocated on first use
        (:meth:`FactorBacked._rows_on_first_use`). A loaded state's rows are checked against
        the same, so this stays the rows' description once they exist."""
        self._rows_spec = (shape, dtype, placed(device))
        self._rows_on_first_use()

    def _allocate_rows(self) -> None:
        shape, dtype, device = self._rows_spec
        self.grads = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def rows_shape(self) -> tuple[int, int]:
        """Shape of the stored rows (m x the columns held here), allocated or not."""
        return self._rows_spec[0]

    @property
    def device(self) -> torch.device:
        """Where the stored rows live."""
        return self._rows_spec[2]

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the rows."""
        return self._rows_spec[1]

    @property
    def window_nbytes(self) -> int:
        """Bytes of the stored rows (the window, or this rank's shard of it), allocated or
        still to be on first use."""
        m, cols = self.rows_shape
        return m * cols * torch.empty((), dtype=self.dtype).element_size()

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Validate ``state`` without writing anything (each window checks its own fields)."""
        raise NotImplementedError

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from ``state_dict``: everything is checked before anything is
        written. A full window's rows are adopted, not copied, when
        :func:`~mfac.operators.memory.adoptable` (the window then writes into them, as
        ``torch.optim`` adopts loaded moments); filled rows of a partly filled one are copied."""
        self.check_state(state)
        self.factor.load_state_dict(state, check=False)
        grads = state["grads"]
        rows = grads.shape[0]
        if rows == self.window and adoptable(grads, self.device):
            self._rows_adopted()
            self.grads = grads
            return
        self.grads[:rows].copy_(grads)
        self.grads[rows:].zero_()  # empty slots are zero rows


__all__ = ["DenseRowsBacked", "FactorBacked", "GramFactor"]
