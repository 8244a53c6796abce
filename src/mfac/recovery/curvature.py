"""Curvature for I-OBS: the damped Hessian H, dense (small d) or matrix-free via M-FAC (large d).

Both offer the three queries I-OBS needs: products with H^-1 (the curvature step), the diagonal
of H^-1 (OBS saliency), and the H-norm projection of a point onto a given support (the OBS
correction of the kept weights). The projection is written with H itself,
x_S = t_S + H_SS^-1 H_SP t_P, which equals the spec's t - H^-1_{:,P} [(H^-1)_PP]^-1 t_P but costs
a k x k solve instead of a (d-k) x (d-k) one.
"""

from __future__ import annotations

import torch

from .._validation import SingularHessianError
from ..operators import InverseFisher
from .problems import F64, Problem


def _damp_value(diag_mean: float, damp: float, damp_mode: str) -> float:
    if damp_mode == "absolute":
        return damp
    if damp_mode == "relative":
        return damp * diag_mean
    raise ValueError(f"damp_mode must be 'absolute' or 'relative', got {damp_mode!r}")


class DenseCurvature:
    """H = Hessian + lambda I stored as a d x d float64 matrix, with its inverse."""

    def __init__(self, H: torch.Tensor, damp: float = 0.0, damp_mode: str = "absolute") -> None:
        d = H.shape[0]
        lam = _damp_value(float(H.diagonal().mean()), damp, damp_mode)
        H = 0.5 * (H + H.T)
        if lam:
            H = H + lam * torch.eye(d, dtype=F64, device=H.device)
        evals = torch.linalg.eigvalsh(H)
        top = float(evals[-1].abs())
        if float(evals[0]) <= d * torch.finfo(F64).eps * max(top, 1e-300):
            raise SingularHessianError(
                f"the Hessian is singular or indefinite (smallest eigenvalue {float(evals[0]):.3g}"
                f", largest {top:.3g}; e.g. fewer samples than features): pass damp > 0 "
                "(damp_mode='relative' scales it by the mean Hessian diagonal)"
            )
        self.H = H
        self.damp = lam
        L = torch.linalg.cholesky(H)
        self.Hinv = torch.cholesky_inverse(L)

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        return self.Hinv @ v

    def inv_diag(self) -> torch.Tensor:
        return self.Hinv.diagonal()

    def project(self, t: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """argmin over x with supp(x) within ``support`` of ||x - t||_H."""
        keep = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
        keep[support] = True
        tp = torch.where(keep, torch.zeros_like(t), t)
        rhs = self.H[support] @ tp
        x = torch.zeros_like(t)
        x[support] = t[support] + torch.linalg.solve(self.H[support][:, support], rhs)
        return x

    def greedy(self, t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy OBC: remove the lowest-saliency weight, apply its OBS update, downdate H^-1.

        Returns the corrected point and its support. The sequence of exact single removals with
        downdates equals the joint OBS correction for the final removed set.
        """
        w = t.clone()
        Hinv = self.Hinv.clone()
        alive = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
        for _ in range(w.numel() - k):
            diag = Hinv.diagonal()
            score = w.square() / diag.clamp_min(1e-300)
            score = torch.where(alive, score, torch.full_like(score, float("inf")))
            q = int(torch.argmin(score))
            col = Hinv[:, q].clone()
            w -= (w[q] / col[q]) * col
            Hinv -= torch.outer(col, col) / col[q]
            w[q] = 0.0
            alive[q] = False
        support = torch.nonzero(alive).flatten()
        out = torch.zeros_like(w)
        out[support] = w[support]
        return out, support


class MFACCurvature:
    """H = c R^T R / m + lambda I from m curvature rows, through `mfac.InverseFisher` (no d x d).

    ``R`` is kept by reference (no copy) for the k x k block H_SS of the projection; the inverse
    operator holds its own copy sqrt(c) R in ``dtype`` (consumed into its Q factor).
    """

    def __init__(
        self,
        R: torch.Tensor,
        ridge: float,
        damp: float,
        damp_mode: str,
        block_size: int | None = None,
        dtype: torch.dtype = torch.float32,
        scale: float = 1.0,
    ) -> None:
        m, d = R.shape
        diag_mean = scale * float(R.square().sum()) / (m * d) + ridge
        lam = _damp_value(diag_mean, damp, damp_mode) + ridge
        if lam <= 0:
            raise SingularHessianError(
                "curvature='mfac' needs damp > 0 (the M-FAC operator inverts lambda*I + G^T G/m)"
            )
        self.R = R
        self.m = m
        self.scale = scale
        self.damp = lam
        rows = R.to(dtype, copy=True, memory_format=torch.contiguous_format)
        if scale != 1.0:
            rows.mul_(scale**0.5)
        self.op = InverseFisher(rows, damp=lam, block_size=block_size)
        self._diag: torch.Tensor | None = None

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        return self.op.ihvp(v)  # float64 in, float64 out (Q stays in the operator's dtype)

    def inv_diag(self) -> torch.Tensor:
        if self._diag is None:
            self._diag = self.op.diag().to(F64)
        return self._diag

    def project(self, t: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
        keep[support] = True
        tp = torch.where(keep, torch.zeros_like(t), t)
        RS = self.R[:, support]
        c = self.scale / self.m
        rhs = c * (RS.T @ (self.R @ tp))  # H_SP t_P (the lambda*I part is zero off-support)
        HSS = c * (RS.T @ RS)
        HSS.diagonal().add_(self.damp)
        x = torch.zeros_like(t)
        x[support] = t[support] + torch.linalg.solve(HSS, rhs)
        return x

    def greedy(self, t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise ValueError(
            "rule='greedy' downdates a dense d x d inverse: use curvature='exact' "
            "(or rule='saliency' / 'topk' with curvature='mfac')"
        )


def build_curvature(
    problem: Problem,
    x: torch.Tensor,
    kind: str,
    damp: float,
    damp_mode: str,
    block_size: int | None = None,
    mfac_dtype: torch.dtype = torch.float32,
) -> DenseCurvature | MFACCurvature:
    """The damped curvature of ``problem`` at ``x``: 'exact' (dense) or 'mfac' (matrix-free)."""
    if kind == "exact":
        return DenseCurvature(problem.hessian(x), damp, damp_mode)
    if kind == "mfac":
        R, ridge, scale = problem.curvature_rows(x)
        return MFACCurvature(R, ridge, damp, damp_mode, block_size, mfac_dtype, scale)
    raise ValueError(f"curvature must be 'exact' or 'mfac', got {kind!r}")
