"""Optimal weights on a fixed mask: batched preconditioned conjugate gradients (the weight update
of ALPS, Meng et al. 2024; its ADMM mask search is :mod:`mfac.prune.admm`).

For a linear map with calibration inputs X (Gram H = X^T X up to a scale) and dense weights W0
(out x in), the pruned weights on a keep-mask S minimise

    f(W) = tr((W - W0) A (W - W0)^T),   A = H + damp * mean(diag H) * I,   W = 0 off S,

(the layer's output error ||X W^T - X W0^T||^2 plus the damping term). Rows are independent:
row i solves A[S_i, S_i] w_S = (A w0)_S. All rows are solved together by conjugate gradients on
the matrix-free operator V -> (V A) * S, one (out x in) @ (in x in) matmul per iteration,
preconditioned by diag(A) on the mask (Jacobi) and warm-started from the current pruned weights
(SparseGPT's, or W0 * S). Per-row step sizes are float64; the big buffers keep the weight's
float32 (float64 in, float64 throughout). A row that ends with a larger objective than its warm
start (float32 round-off) keeps its warm start, so f never increases.

With ``fisher_weight`` beta > 0 the objective gains the empirical-Fisher quadratic model of the
loss increase from m gradients G_1..G_m of the loss with respect to this weight (at the dense
model):

    f(W) = tr((W - W0) A (W - W0)^T) + lam (1/m) sum_j <G_j, W - W0>^2,
    lam = beta r tr(A) / ((1/m) sum_j ||G_j||_F^2),

so beta is the ratio of the traces of the two terms over the r x c weights (scale-free). The
second term couples the rows: CG then runs on the whole layer as one system (one float64 step
size per iteration) with the operator V -> (V A + lam/m sum_j <G_j, V> G_j) * S (one matmul
with A and two with the (m, r c) gradient matrix). The preconditioner is the inverse of
D + lam/m Gs^T Gs (D = diag(A) on the mask, Gs the gradients on the mask) by Woodbury: one
m x m float64 Cholesky per layer and two more (m, r c) matmuls per iteration, so the m large
eigenvalues the Fisher term adds cost no iterations (plain Jacobi, diag(A)[k] +
lam/m sum_j G_j[i, k]^2, is ``precond="jacobi"`` of :func:`joint_pcg`: on SmolLM2 at beta = 1
it left 85 of 210 layers above tol at 50 iterations). A solve that ends above its warm start
keeps the warm start (all rows). beta = 0 is the row-wise solve above, unchanged.

:func:`refine_weights` is the composable step (any mask, in place, refused input leaves the
weight as it was); :func:`pcg_refine` is the out-of-place solver ``method="sparsegpt"`` calls
with ``refine="pcg"``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._config import Options, option
from .._validation import check_damp, check_positive_int
from .patterns import Pattern, parse_pattern
from .restore import restored_on_error

F64 = torch.float64

#: The weight updates after SparseGPT's: none, CG on its mask, ADMM mask search then CG.
REFINES = ("none", "pcg", "admm")


@dataclass(frozen=True, kw_only=True)
class RefineOptions(Options):
    """Options of the weight update that follows a mask choice (mixed into SparseGPT's config)."""

    refine: str = option(
        "none", "after SparseGPT's OBS updates, refine the kept weights to the exact layer-wise "
        "least squares on the mask by preconditioned CG (pcg), or first search a better mask "
        "of the same size by ADMM from SparseGPT's (admm, ALPS)", choices=REFINES,
    )  # fmt: skip
    pcg_iters: int = option(50, "refine=pcg or admm: most CG iterations per layer", low=1)
    pcg_tol: float = option(
        1e-3, "refine=pcg or admm: stop once every row's residual, relative to its right-hand "
        "side, is below this", low=0, low_open=True,
    )  # fmt: skip
    admm_iters: int = option(40, "refine=admm: most ADMM iterations per layer", low=1)
    admm_rho: float = option(
        0.3, "refine=admm: the first ADMM penalty, relative to the unit-diagonal Hessian",
        low=0, low_open=True,
    )  # fmt: skip
    fisher_weight: float = option(
        0.0, "refine=pcg or admm: beta, the weight of the empirical-Fisher loss model next to "
        "the layer error (ratio of the two terms' traces; 0: the layer error alone)", low=0,
    )  # fmt: skip
    fisher_grads: int = option(
        32, "refine=pcg or admm, fisher_weight > 0: loss gradients m (one per calibration "
        "batch, at the dense model)", low=1,
    )  # fmt: skip


@dataclass(frozen=True)
class RefineReport:
    """What one layer's CG solve did. ``residual``: the largest row's ||r|| / ||b|| at the end
    (recomputed, not the recursion's); ``error_start`` / ``error_end``: f summed over rows at
    the warm start and at the result; ``kept_rows``: rows that kept their warm start. With a
    Fisher term (``fisher_lambda`` > 0, the lam it used) the layer is one system: ``residual``
    is the whole layer's ||r||_F / ||b||_F, f includes the Fisher term, and ``kept_rows`` is
    all rows or none."""

    iterations: int
    residual: float
    converged: bool
    error_start: float
    error_end: float
    kept_rows: int = 0
    fisher_lambda: float = 0.0


def damped_gram(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """A = H + damp * mean(diag H) * I in float64, dead inputs (zero diagonal) given unit
    diagonal first, as :func:`mfac.prune.methods.sparsegpt.damped_inverse_factor` does."""
    h = hessian.to(F64).clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    return h


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row inner products, accumulated in float64: the row-wise solve's groups. The
    products stay in the operands' dtype (one temporary, no float64 copies of either)."""
    return (a * b).sum(dim=1, dtype=F64)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> over all entries, accumulated in float64, as a (1,) tensor: the whole layer as
    one group."""
    return (a * b).sum(dtype=F64).reshape(1)


Operator = Callable[[torch.Tensor], torch.Tensor]


def _solve(
    apply: Operator,
    precond: Operator,
    dot: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    const: torch.Tensor,
    v0: torch.Tensor,
    iters: int,
    tol: float,
    lam: float = 0.0,
) -> tuple[torch.Tensor, RefineReport]:
    """Preconditioned CG on apply(V) = b (V zero off the mask), from ``v0``, in groups of rows:
    ``dot`` returns each group's float64 inner products (per row: independent systems; one
    group: the whole layer), and a group stops once its ||r|| / ||b|| <= tol. The objective is
    f = const - V.b - V.r per group (V.apply(V) = V.b - V.r); a group that ends above its warm
    start keeps the warm start, so f never increases."""
    dtype = v0.dtype
    v = v0.clone()
    bnorm = dot(b, b).sqrt().clamp_min(torch.finfo(dtype).tiny)

    def objective(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return const - dot(x, b) - dot(x, r)

    r = b - apply(v)
    f_start = objective(v, r)
    rel = dot(r, r).sqrt() / bnorm
    active = rel > tol
    z = precond(r)
    rz = dot(r, z)
    p = z * active.to(dtype)[:, None]
    done = 0
    while done < iters and bool(active.any()):
        done += 1
        q = apply(p)
        pq = dot(p, q)
        alpha = torch.where(pq > 0, rz / pq.clamp_min(1e-300), 0.0)
        v.add_(p * alpha.to(dtype)[:, None])
        r.sub_(q * alpha.to(dtype)[:, None])
        rel = dot(r, r).sqrt() / bnorm
        active &= rel > tol
        z = precond(r)
        rz_new = dot(r, z)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-300), 0.0)
        rz = rz_new
        p = (z + p * beta.to(dtype)[:, None]) * active.to(dtype)[:, None]
    r = b - apply(v)  # the true residual, not the recursion's
    f_end = objective(v, r)
    worse = f_end > f_start
    if bool(worse.any()):
        v = torch.where(worse[:, None], v0, v)
        r = b - apply(v)
        f_end = torch.where(worse, f_start, f_end)
    rel = dot(r, r).sqrt() / bnorm
    top = float(rel.max()) if rel.numel() else 0.0
    report = RefineReport(
        iterations=done, residual=top, converged=top <= tol,
        error_start=float(f_start.sum()), error_end=float(f_end.sum()),
        kept_rows=int(worse.sum()) * (v.shape[0] // max(worse.numel(), 1)), fisher_lambda=lam,
    )  # fmt: skip
    return v, report


@torch.no_grad()
def pcg_refine(
    dense: torch.Tensor,
    mask: torch.Tensor,
    gram: torch.Tensor,
    start: torch.Tensor | None = None,
    *,
    iters: int = 50,
    tol: float = 1e-3,
    grads: torch.Tensor | None = None,
    fisher_weight: float = 0.0,
) -> tuple[torch.Tensor, RefineReport]:
    """Solve min_W tr((W - W0) A (W - W0)^T) over W zero off ``mask`` for all rows at once by
    Jacobi-preconditioned CG from ``start`` (default W0 * mask). ``dense`` W0 and ``mask`` are
    (rows, cols), ``gram`` is the damped A (cols, cols, see :func:`damped_gram`); inputs are
    trusted (:func:`refine_weights` checks them). Returns (W in the compute dtype, report); the
    compute dtype is float64 for float64 ``dense``, float32 otherwise.

    ``fisher_weight`` beta > 0 with ``grads`` (m, rows, cols) or (m, rows * cols) adds the
    empirical-Fisher term (module docstring) and solves the layer as one system
    (:func:`joint_pcg`)."""
    if fisher_weight > 0 and grads is not None:
        lam = fisher_lambda(gram, grads, fisher_weight, dense.shape[0])
        if lam > 0:
            return joint_pcg(dense, mask, gram, grads, lam, start, iters=iters, tol=tol)
    dtype = F64 if dense.dtype == F64 else torch.float32
    keep = mask.to(dense.device, torch.bool)
    w0 = dense.to(dtype)
    a = gram.to(dense.device, dtype)
    fmask = keep.to(dtype)
    w0a = w0 @ a
    dinv = torch.where(keep, 1.0 / a.diagonal()[None, :], 0.0).to(dtype)
    return _solve(
        lambda x: (x @ a) * fmask, lambda x: x * dinv, _row_dot, w0a * fmask,
        _row_dot(w0a, w0), (w0 if start is None else start.to(dtype)) * fmask, iters, tol,
    )  # fmt: skip


def layer_error(dense: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> float:
    """f(W) = tr((W - W0) A (W - W0)^T) in float64: the damped layer error of ``pruned``."""
    diff = pruned.to(F64) - dense.to(F64)
    return float(((diff @ gram.to(diff.device, F64)) * diff).sum())


def fisher_lambda(gram: torch.Tensor, grads: torch.Tensor, beta: float, rows: int) -> float:
    """lam = beta * rows * tr(A) / ((1/m) sum_j ||G_j||_F^2): the Fisher term's trace is beta
    times the layer term's (0 when every gradient is zero)."""
    g = grads.reshape(grads.shape[0], -1)
    mean_sq = float(_row_dot(g, g).mean())
    if mean_sq == 0.0:
        return 0.0
    return beta * rows * float(gram.diagonal().to(F64).sum()) / mean_sq


@torch.no_grad()
def joint_pcg(
    dense: torch.Tensor,
    mask: torch.Tensor,
    gram: torch.Tensor,
    grads: torch.Tensor,
    lam: float,
    start: torch.Tensor | None = None,
    *,
    iters: int = 50,
    tol: float = 1e-3,
    precond: str = "woodbury",
) -> tuple[torch.Tensor, RefineReport]:
    """Solve min_W tr((W - W0) A (W - W0)^T) + lam/m sum_j <G_j, W - W0>^2 over W zero off
    ``mask`` by preconditioned CG on the whole layer (one system: scalar float64 step sizes),
    from ``start`` (default W0 * mask). ``grads``: (m, rows, cols) or (m, rows * cols).
    ``precond``: ``"woodbury"`` ((D + lam/m Gs^T Gs)^-1, D = diag(A) on the mask) or
    ``"jacobi"`` (the diagonal of the whole operator). Inputs are trusted; dtypes as
    :func:`pcg_refine`."""
    if precond not in ("woodbury", "jacobi"):
        raise ValueError(f"precond must be 'woodbury' or 'jacobi', got {precond!r}")
    dtype = F64 if dense.dtype == F64 else torch.float32
    rows, cols = dense.shape
    m = grads.shape[0]
    keep = mask.to(dense.device, torch.bool)
    w0 = dense.to(dtype)
    a = gram.to(dense.device, dtype)
    fmask = keep.to(dtype)
    g = grads.reshape(m, rows * cols).to(dense.device, dtype)
    coef = lam / m
    c0 = g @ w0.reshape(-1)  # <G_j, W0>
    g = g * fmask.reshape(1, -1)  # G_j on the mask: <G_j, V> = <G_j * S, V> for V on S
    w0a = w0 @ a

    def fisher(x_coef: torch.Tensor) -> torch.Tensor:
        # lam/m sum_j x_coef[j] G_j, already zero off the mask
        return ((x_coef.to(F64) * coef).to(dtype) @ g).view(rows, cols)

    def apply(x: torch.Tensor) -> torch.Tensor:
        return (x @ a) * fmask + fisher(g @ x.reshape(-1))

    dinv = torch.where(keep, 1.0 / a.diagonal()[None, :], 0.0).to(dtype)
    if precond == "jacobi":
        diag = a.diagonal()[None, :] + (g.square().sum(0) * coef).view(rows, cols)
        dinv = torch.where(keep, 1.0 / diag, 0.0).to(dtype)

        def apply_precond(x: torch.Tensor) -> torch.Tensor:
            return x * dinv

    else:  # (D + lam/m Gs^T Gs)^-1 by Woodbury, D = diag(A) on the mask: an m x m solve
        gd = g * dinv.reshape(1, -1)
        core = (g @ gd.T).to(F64)
        core.diagonal().add_(1.0 / coef)
        chol = torch.linalg.cholesky(core)

        def apply_precond(x: torch.Tensor) -> torch.Tensor:
            y = torch.cholesky_solve((gd @ x.reshape(-1)).to(F64)[:, None], chol)[:, 0]
            return x * dinv - (y.to(dtype) @ gd).view(rows, cols)

    const = _dot(w0a, w0) + coef * float(c0.to(F64).square().sum())
    return _solve(
        apply, apply_precond, _dot, w0a * fmask + fisher(c0), const,
        (w0 if start is None else start.to(dtype)) * fmask, iters, tol, lam,
    )  # fmt: skip


def check_nm_mask(mask: torch.Tensor, pattern: Pattern, name: str = "layer") -> None:
    """Refuse a keep-mask that keeps more than N of some M consecutive inputs of a row."""
    if pattern is None:
        return
    n, m = pattern
    rows, cols = mask.shape
    if cols % m:
        raise ValueError(f"{name}: input width {cols} is not divisible by M={m} of {n}:{m}")
    kept = mask.reshape(rows, cols // m, m).sum(-1)
    if bool((kept > n).any()):
        row, group = (int(i) for i in (kept > n).nonzero()[0])
        raise ValueError(
            f"{name}: the mask violates the {n}:{m} pattern (row {row}, inputs "
            f"{group * m}..{group * m + m - 1} keep {int(kept[row, group])} > {n})"
        )


def check_fisher_weight(fisher_weight: object, what: str = "fisher_weight") -> None:
    """Refuse a Fisher weight beta that is not a finite number >= 0."""
    if isinstance(fisher_weight, bool) or not isinstance(fisher_weight, int | float):
        raise TypeError(f"{what} must be a number, got {fisher_weight!r}")
    if not 0 <= fisher_weight < float("inf"):
        raise ValueError(f"{what} must be finite and >= 0, got {fisher_weight}")


def check_fisher(
    weight: torch.Tensor, grads: torch.Tensor | None, fisher_weight: float, name: str = "layer"
) -> None:
    """Refuse a Fisher weight that is negative or not finite, and beta > 0 without finite
    gradients of the weight's shape (m, *weight.shape), or flat (m, weight.numel())."""
    check_fisher_weight(fisher_weight, f"{name}: fisher_weight")
    if fisher_weight == 0:
        return
    if not isinstance(grads, torch.Tensor) or grads.ndim < 1 or grads.shape[0] < 1:
        raise ValueError(f"{name}: fisher_weight > 0 needs grads, (m, *weight.shape) tensor")
    # only the weight's own layout: another shape of the same size (a transposed gradient)
    # would be read in the wrong order
    if tuple(grads.shape[1:]) not in (tuple(weight.shape), (weight.numel(),)):
        raise ValueError(
            f"{name}: grads must have shape (m, {', '.join(map(str, weight.shape))}) or "
            f"(m, {weight.numel()}), got {tuple(grads.shape)}"
        )
    if not bool(torch.isfinite(grads).all()):
        raise ValueError(f"{name}: grads hold NaN or Inf")


def check_layer(
    weight: torch.Tensor,
    mask: torch.Tensor,
    hessian: torch.Tensor,
    start: torch.Tensor | None = None,
    name: str = "layer",
) -> tuple[int, int]:
    """Refuse a layer problem that does not fit: a non-float or non-finite weight, a mask of
    another shape or not 0/1, a Hessian that is not a finite cols x cols Gram matrix, a start
    of another shape. Returns the weight's (rows, cols) as the layer solvers see it."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"{name}: weight must be a floating-point tensor")
    rows = weight.shape[0] if weight.ndim else 0
    if weight.ndim < 2:
        raise ValueError(f"{name}: weight must have at least 2 dimensions, got {weight.ndim}")
    cols = weight[0].numel()
    if not isinstance(mask, torch.Tensor) or mask.shape != weight.shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"{name}: mask must have the weight's shape {tuple(weight.shape)}, got {got}"
        )
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{name}: mask must be boolean or 0/1")
    if not isinstance(hessian, torch.Tensor) or hessian.ndim != 2 or hessian.shape != (cols, cols):
        got = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise ValueError(
            f"{name}: hessian must be square, {cols} x {cols} for this weight, got {got}"
        )
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError(f"{name}: hessian holds NaN or Inf")
    if bool((hessian.diagonal() < 0).any()):
        raise ValueError(f"{name}: hessian has a negative diagonal entry (not a Gram matrix)")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{name}: weight holds NaN or Inf")
    if start is not None and (start.shape != weight.shape or not bool(torch.isfinite(start).all())):
        raise ValueError(
            f"{name}: start must be finite with the weight's shape {tuple(weight.shape)}"
        )
    return rows, cols


@torch.no_grad()
def refine_weights(
    weight: torch.Tensor,
    mask: torch.Tensor,
    hessian: torch.Tensor,
    *,
    start: torch.Tensor | None = None,
    iters: int = 50,
    tol: float = 1e-3,
    damp: float = 0.01,
    pattern: str | tuple[int, int] | None = None,
    name: str = "layer",
    grads: torch.Tensor | None = None,
    fisher_weight: float = 0.0,
) -> RefineReport:
    """Overwrite ``weight`` (the dense W0, out x in; a conv weight is flattened to
    (out, in*k*k)) with the weights on keep-``mask`` that best reconstruct its outputs on the
    calibration inputs with Gram ``hessian`` (X^T X, any positive scale, damped by
    ``damp * mean(diag H)``), solved by batched PCG from ``start`` (e.g. SparseGPT's pruned
    weights; default weight * mask). ``pattern``, when given, is checked against the mask.
    ``fisher_weight`` beta > 0 adds the empirical-Fisher term of ``grads`` (m loss gradients
    with respect to this weight, shape (m, *weight.shape)) and solves the layer as one system
    (module docstring).

    Returns the :class:`RefineReport`; ``converged`` is False when ``iters`` iterations left a
    row's relative residual above ``tol`` (the weights are still written: f never increases).
    Bad input (shapes, a non-finite or non-square ``hessian``, a mask breaking ``pattern``)
    raises naming the problem, and on any error ``weight`` is left as it was.
    """
    rows, cols = check_layer(weight, mask, hessian, start, name)
    check_positive_int(iters, "iters")
    check_damp(tol, "tol")
    check_damp(damp)
    check_fisher(weight, grads, fisher_weight, name)
    keep = mask.reshape(rows, cols).bool()
    check_nm_mask(keep, parse_pattern(pattern), name)
    with restored_on_error([weight]):
        new, report = pcg_refine(
            weight.detach().reshape(rows, cols), keep, damped_gram(hessian, damp),
            None if start is None else start.detach().reshape(rows, cols), iters=iters, tol=tol,
            grads=grads, fisher_weight=fisher_weight,
        )  # fmt: skip
        if not bool(torch.isfinite(new).all()):
            raise FloatingPointError(f"{name}: PCG produced non-finite weights; nothing written")
        weight.detach().copy_(new.reshape(weight.shape).to(weight.dtype))
    return report
