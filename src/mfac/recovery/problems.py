"""The objectives the sparse solvers minimise: least squares and logistic regression.

Every problem works in float64 on the device of its data and offers the same queries (value,
gradient, Hessian, Hessian-vector product, a global smoothness constant, per-sample curvature
rows for the matrix-free M-FAC operator, and the exact minimiser restricted to a support), so
that every solver is written once against this small interface.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

F64 = torch.float64


def spectral_norm_sq(
    A: torch.Tensor, iters: int = 500, rtol: float = 1e-9, exact_limit: float = 2e9
) -> float:
    """||A||_2^2: exact singular values for small A, power iteration on A^T A for large ones
    (the estimate is raised by 0.1 % to stay an upper bound for step sizes 1/L)."""
    n, d = A.shape
    if n * d * min(n, d) <= exact_limit:
        return float(torch.linalg.matrix_norm(A, ord=2)) ** 2
    gen = torch.Generator(device=A.device).manual_seed(0)
    v = torch.randn(d, dtype=A.dtype, device=A.device, generator=gen)
    v /= v.norm()
    est = 0.0
    for _ in range(iters):
        w = A.T @ (A @ v)
        new = float(w.norm())
        v = w / new
        if abs(new - est) <= rtol * new:
            est = new
            break
        est = new
    return est * 1.001


class Problem:
    """Base class: f(x) for x in R^d built from a design matrix A (n x d) and targets y (n,)."""

    is_quadratic: bool = False

    def __init__(self, A: torch.Tensor, y: torch.Tensor) -> None:
        if not bool((A != 0).any()):
            raise ValueError("A is all zero: f does not depend on x, there is nothing to recover")
        self.A = A
        self.y = y
        self.n, self.d = A.shape

    def value(self, x: torch.Tensor) -> float:
        raise NotImplementedError

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def hessian(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def hvp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def lipschitz(self) -> float:
        """A global bound L on the largest Hessian eigenvalue (IHT's step is 1/L)."""
        raise NotImplementedError

    def curvature_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """Rows R (m x d), a ridge r and a scale c with Hessian(x) = c R^T R / m + r I.

        The rows are per-sample gradients of the model output scaled by the square root of the
        per-sample loss curvature (Gauss-Newton / true Fisher), so that the M-FAC operator built
        on them is the exact Hessian plus damping, never forming a d x d matrix.
        """
        raise NotImplementedError

    def minimize_on(self, support: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
        """argmin f(x) subject to supp(x) within ``support`` (returned as a full d-vector)."""
        raise NotImplementedError


class LeastSquares(Problem):
    """f(x) = 0.5 * ||A x - y||^2 (Hessian A^T A, constant)."""

    is_quadratic = True

    def __init__(self, A: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__(A, y)
        self._L: float | None = None
        self._H: torch.Tensor | None = None
        self._Aty: torch.Tensor | None = None

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.A @ x - self.y

    def value(self, x: torch.Tensor) -> float:
        r = self.residual(x)
        return 0.5 * float(r @ r)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        if self.n >= self.d and self.d <= 4096:  # one d x d product (A^T A) x - A^T y: cheaper
            if self._Aty is None:
                self._Aty = self.A.T @ self.y
            return self.hessian(x) @ x - self._Aty
        return self.A.T @ self.residual(x)

    def hessian(self, x: torch.Tensor) -> torch.Tensor:
        if self._H is None:
            self._H = self.A.T @ self.A
        return self._H

    def hvp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.A.T @ (self.A @ v)

    def lipschitz(self) -> float:
        if self._L is None:
            self._L = spectral_norm_sq(self.A)
        return self._L

    def curvature_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        return self.A, 0.0, float(self.n)  # A^T A = n * A^T A / n: no copy of A

    def minimize_on(self, support: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
        x = torch.zeros(self.d, dtype=F64, device=self.A.device)
        if support.numel() == 0:
            return x
        sub = self.A[:, support]
        if sub.device.type == "cpu":
            sol = torch.linalg.lstsq(sub, self.y, driver="gelsd").solution
        else:  # only 'gels' exists on CUDA, which needs full column rank: use the pseudo-inverse
            sol = torch.linalg.pinv(sub) @ self.y
        x[support] = sol
        return x


class Logistic(Problem):
    """f(x) = mean_i [log(1 + exp(a_i x + b)) - y_i (a_i x + b)] + (l2 / 2) ||x||^2, y in {0, 1}.

    With ``intercept=True`` the bias b is unpenalised, never counted in the sparsity, and
    profiled out: f(x) = min_b (...), whose gradient is A^T (p - y) / n at the optimal b(x) and
    whose Hessian is the Schur complement, i.e. the weighted covariance of the rows around
    their p(1-p)-weighted mean. Without it b = 0. The small ridge ``l2`` keeps the minimiser on
    every support finite (separable subsets of features would otherwise send it to infinity).
    """

    def __init__(
        self, A: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, intercept: bool = False
    ) -> None:
        super().__init__(A, y)
        self.l2 = float(l2)
        self.intercept = bool(intercept)
        self._L: float | None = None
        self._b = 0.0  # warm start of the profiled bias

    def bias(self, x: torch.Tensor) -> float:
        """The optimal intercept b(x) (0 without intercept), by 1-D Newton from the last one."""
        if not self.intercept:
            return 0.0
        z = self.A @ x
        b = self._b
        ybar = float(self.y.mean())
        for _ in range(100):
            p = torch.sigmoid(z + b)
            g = float(p.mean()) - ybar
            h = float((p * (1 - p)).mean())
            if abs(g) <= 1e-13 or h <= 0:
                break
            step = max(-5.0, min(5.0, g / h))
            b -= step
            if abs(step) <= 1e-13 * max(1.0, abs(b)):
                break
        self._b = b
        return b

    def _z(self, x: torch.Tensor) -> torch.Tensor:
        return self.A @ x + self.bias(x)

    def value(self, x: torch.Tensor) -> float:
        z = self._z(x)
        return float((F.softplus(z) - self.y * z).mean()) + 0.5 * self.l2 * float(x @ x)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self._z(x))
        return self.A.T @ (p - self.y) / self.n + self.l2 * x

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """sqrt(w_i) (a_i - a_bar_w): the Hessian is rows^T rows / n (+ l2 I)."""
        p = torch.sigmoid(self._z(x))
        w = p * (1.0 - p)
        A = self.A
        if self.intercept:
            A = A - (w @ A) / w.sum().clamp_min(1e-300)
        return w.sqrt()[:, None] * A

    def hessian(self, x: torch.Tensor) -> torch.Tensor:
        R = self._rows(x)
        H = R.T @ R / self.n
        H.diagonal().add_(self.l2)
        return H

    def hvp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        R = self._rows(x)
        return R.T @ (R @ v) / self.n + self.l2 * v

    def lipschitz(self) -> float:
        if self._L is None:
            self._L = spectral_norm_sq(self.A) / (4 * self.n)
            self._L += self.l2
        return self._L

    def curvature_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        return self._rows(x), self.l2, 1.0

    def minimize_on(
        self, support: torch.Tensor, x0: torch.Tensor | None = None, max_newton: int = 50
    ) -> torch.Tensor:
        """Damped Newton on (x_S, b) with backtracking (the restricted problem is convex)."""
        x = torch.zeros(self.d, dtype=F64, device=self.A.device)
        if x0 is not None:
            x[support] = x0[support]
        ones = torch.ones(self.n, 1, dtype=F64, device=x.device)
        sub = torch.cat([self.A[:, support], ones], 1) if self.intercept else self.A[:, support]
        p_dim = sub.shape[1]
        if p_dim == 0:
            return x
        ridge = torch.full((p_dim,), self.l2, dtype=F64, device=x.device)
        if self.intercept:
            ridge[-1] = 0.0
        theta = (
            torch.cat([x[support], x.new_tensor([self.bias(x)])])
            if self.intercept
            else (x[support].clone())
        )

        def obj(th: torch.Tensor) -> float:
            z = sub @ th
            return float((F.softplus(z) - self.y * z).mean()) + 0.5 * float((ridge * th) @ th)

        f = obj(theta)
        for _ in range(max_newton):
            p = torch.sigmoid(sub @ theta)
            g = sub.T @ (p - self.y) / self.n + ridge * theta
            if float(g.norm()) <= 1e-12 * max(1.0, float(theta.norm())):
                break
            w = p * (1.0 - p)
            H = sub.T @ (w[:, None] * sub) / self.n
            H.diagonal().add_(ridge + 1e-12)
            step = torch.linalg.solve(H, g)
            t = 1.0
            while True:
                trial = theta - t * step
                ft = obj(trial)
                if ft <= f - 1e-4 * t * float(g @ step) or t < 1e-10:
                    break
                t *= 0.5
            gain = f - ft
            theta, f = trial, ft
            if gain <= 1e-15 * max(1.0, abs(f)):
                break
        if self.intercept:
            x[support] = theta[:-1]
            self._b = float(theta[-1])
        else:
            x[support] = theta
        return x


LOSSES = ("least_squares", "logistic")


def make_problem(
    loss: str,
    A: torch.Tensor,
    y: torch.Tensor,
    l2: float | None = None,
    intercept: bool = False,
) -> Problem:
    """Build the objective named ``loss`` ("least_squares" or "logistic")."""
    if loss == "least_squares":
        if l2 not in (None, 0, 0.0) or intercept:
            raise ValueError("l2 and intercept are options of loss='logistic' only")
        return LeastSquares(A, y)
    if loss == "logistic":
        labels = torch.unique(y)
        if not bool(((labels == 0) | (labels == 1)).all()):
            raise ValueError(
                f"loss='logistic' needs labels in {{0, 1}}, got values {labels[:5].tolist()}"
            )
        return Logistic(A, y, 1e-3 if l2 is None else float(l2), intercept)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
