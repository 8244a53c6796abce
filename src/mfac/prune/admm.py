"""Mask search by ADMM (the mask step of ALPS, Meng et al. 2024): the keep-mask of one linear
layer that minimises its damped output error under the sparsity constraint.

For dense weights W0 (out x in) and the damped Gram A (:func:`mfac.prune.refine.damped_gram`),

    min_W tr((W - W0) A (W - W0)^T)   subject to  W in C,

C being "at most k nonzeros in the layer" or "at most N of every M consecutive inputs of a row".
The split W = D, D in C, with the scaled dual V and a penalty rho that grows, gives

    W <- (W0 A + rho (D - V)) (A + rho I)^-1,   D <- P_C(W + V),   V <- V + W - D.

Everything runs in coordinates where A has unit diagonal (column j scaled by sqrt(A_jj)), so
the projection P_C keeps the largest w_ij^2 A_jj: the saliency SparseGPT and Wanda start from,
but applied to an iterate that already anticipates the other weights' removal. (A + rho I)^-1
is applied through one eigendecomposition of the scaled A per layer (float64, then the weight's
dtype): two (out x in) @ (in x in) matmuls per iteration. While rho is small W stays near W0
and the support moves freely; as rho grows W is pulled onto D and the support settles. rho grows
by 30 % after an iteration that changed more than 1 % of the kept weights, else by 10 % (the
default :func:`grow`; ``growth`` takes another schedule); the search stops once the support has
not changed for three iterations, or after ``iters``.

The search starts from a given mask and its weights (SparseGPT's): D = those weights, V = 0.
Its output is the support of the last D; the weights on it are then the exact least squares
(:func:`mfac.prune.refine.pcg_refine`), which ALPS also runs after its ADMM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._validation import check_damp, check_positive_int
from .patterns import Pattern, lowest, nm_keep, parse_pattern
from .refine import (
    RefineReport,
    check_layer,
    check_nm_mask,
    damped_gram,
    layer_error,
    pcg_refine,
)  # fmt: skip
from .restore import restored_on_error

F64 = torch.float64

#: Growth of rho after an iteration that moved more than ``BUSY`` of the kept weights, and after
#: a quieter one.
FAST, SLOW, BUSY = 1.3, 1.1, 0.01

#: Iterations without a support change that end the search.
SETTLED = 3

#: A penalty schedule: (rho, support entries changed by the last iteration, kept weights) -> the
#: next rho. May keep state across the calls of one search (a fresh one per layer).
Growth = Callable[[float, int, int], float]


def two_speed(fast: float = FAST, slow: float = SLOW, busy: float = BUSY) -> Growth:
    """The schedule rho x ``fast`` after an iteration that changed more than ``busy`` of the
    kept weights, else x ``slow`` (docs/prune.md §2g compares constants and other rules)."""

    def grow(rho: float, changed: int, kept: int) -> float:
        return rho * (fast if changed > busy * max(kept, 1) else slow)

    return grow


#: The default schedule: x1.3 after an iteration that moved more than 1 % of the kept weights,
#: else x1.1.
grow = two_speed()


#: :func:`scaled_eig`'s (sqrt(diag A), eigenvalues, eigenvectors) of one damped Gram.
Eig = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class SearchReport:
    """What one layer's ADMM search did: ``iterations`` run, ``rho`` at the end, ``moved``: the
    fraction of the start mask's kept weights that the final mask drops (as many are added for
    an unstructured budget), ``settled``: whether the support stopped changing before
    ``iters``; ``error_start``: the damped layer error of the start weights, ``error_end``: of
    the weights returned; ``fallback``: the searched mask's CG ended above ``error_start``, so
    the start mask was kept (and refined instead)."""

    iterations: int
    rho: float
    moved: float
    settled: bool
    error_start: float = 0.0
    error_end: float = 0.0
    fallback: bool = False


def project(
    x: torch.Tensor, allowed: torch.Tensor, pattern: Pattern, keep_count: int
) -> torch.Tensor:
    """The keep-mask of P_C: the ``keep_count`` largest |x| among ``allowed`` entries of the
    layer, or the N largest of every M consecutive inputs (N:M ``pattern``), never a
    disallowed entry."""
    if pattern is not None:
        return nm_keep(x.abs(), allowed, pattern)
    scores = torch.where(allowed, x.abs(), -torch.inf).reshape(-1)
    return (~lowest(scores, scores.numel() - keep_count)).view(x.shape) & allowed


@torch.no_grad()
def admm_search(
    dense: torch.Tensor,
    gram: torch.Tensor,
    start: torch.Tensor,
    start_mask: torch.Tensor,
    pattern: Pattern,
    *,
    allowed: torch.Tensor | None = None,
    iters: int = 40,
    rho: float = 0.3,
    eig: Eig | None = None,
    growth: Growth = grow,
) -> tuple[torch.Tensor, torch.Tensor, SearchReport]:
    """Search the keep-mask of ``dense`` W0 (rows x cols) under the damped Gram ``gram`` A
    (cols x cols, float64) by ADMM from ``start`` (pruned weights) on ``start_mask``, keeping
    as many weights as ``start_mask`` (unstructured) or N of every M (``pattern``), only where
    ``allowed`` (default everywhere). ``eig``: :func:`scaled_eig` of ``gram``, when already
    computed for a layer with the same input; ``growth``: the penalty schedule. Returns (mask,
    weights on it in the compute dtype, report); inputs are trusted
    (:func:`mfac.prune.refine.refine_weights`-style checks are the caller's). The compute
    dtype is float64 for float64 ``dense``, float32 otherwise."""
    dtype = F64 if dense.dtype == F64 else torch.float32
    device = dense.device
    keep0 = start_mask.to(device, torch.bool)
    ok = torch.ones_like(keep0) if allowed is None else allowed.to(device, torch.bool)
    count = int(keep0.sum())
    scale, evals, evecs = eig if eig is not None else scaled_eig(gram)
    s = scale.to(device, dtype)
    lam = evals.to(device, dtype)
    q = evecs.to(device, dtype)
    w0 = dense.to(dtype) * s  # scaled coordinates: A has unit diagonal
    b_q = (w0 @ q) * lam  # W0 A Q = W0 Q diag(lam), A = Q diag(lam) Q^T
    d = start.to(dtype) * s * keep0
    v = torch.zeros_like(d)
    keep = keep0
    quiet = done = 0
    while done < iters and quiet < SETTLED:
        done += 1
        w = ((b_q + rho * ((d - v) @ q)) / (lam + rho)) @ q.T
        x = w + v
        new = project(x, ok, pattern, count)
        changed = int((new != keep).sum())
        keep = new
        d = x * keep
        v = x - d
        quiet = quiet + 1 if changed == 0 else 0
        rho = growth(rho, changed, count)
    moved = float((keep0 & ~keep).sum()) / max(count, 1)
    report = SearchReport(iterations=done, rho=rho, moved=moved, settled=quiet >= SETTLED)
    return keep, d / s, report


def scaled_eig(gram: torch.Tensor) -> Eig:
    """(sqrt(diag A), eigenvalues, eigenvectors) of the unit-diagonal A / (s s^T), in float64:
    the factorisation every ADMM iteration applies (A + rho I)^-1 with."""
    a = gram.to(F64)
    s = a.diagonal().sqrt()
    evals, evecs = torch.linalg.eigh(a / s[:, None] / s[None, :])
    return s, evals.clamp_min(0.0), evecs


@torch.no_grad()
def search_refine(
    dense: torch.Tensor,
    gram: torch.Tensor,
    start: torch.Tensor,
    start_mask: torch.Tensor,
    pattern: Pattern,
    *,
    allowed: torch.Tensor | None = None,
    iters: int = 40,
    rho: float = 0.3,
    eig: Eig | None = None,
    pcg_iters: int = 50,
    pcg_tol: float = 1e-3,
    grads: torch.Tensor | None = None,
    fisher_weight: float = 0.0,
    growth: Growth = grow,
) -> tuple[torch.Tensor, torch.Tensor, SearchReport, RefineReport]:
    """:func:`admm_search`, then the CG weights on the mask found
    (:func:`mfac.prune.refine.pcg_refine`, with the optional Fisher term). If those end with a
    larger layer error than ``start`` on ``start_mask``, the start mask is kept and refined
    instead, so the result is never worse than the start. Returns (weights, mask, search
    report, CG report); inputs are trusted."""
    found, on_found, search = admm_search(
        dense, gram, start, start_mask, pattern, allowed=allowed, iters=iters, rho=rho, eig=eig,
        growth=growth,
    )  # fmt: skip
    cg = {"iters": pcg_iters, "tol": pcg_tol, "grads": grads, "fisher_weight": fisher_weight}
    weights, report = pcg_refine(dense, found, gram, on_found, **cg)
    base = layer_error(dense, start, gram)
    end = layer_error(dense, weights, gram)
    fallback = end > base
    if fallback:
        found = start_mask.to(found.device, torch.bool)
        weights, report = pcg_refine(dense, found, gram, start, **cg)
        end = layer_error(dense, weights, gram)
    search = SearchReport(
        iterations=search.iterations, rho=search.rho, moved=0.0 if fallback else search.moved,
        settled=search.settled, error_start=base, error_end=end, fallback=fallback,
    )  # fmt: skip
    return weights, found, search, report


@torch.no_grad()
def search_mask(
    weight: torch.Tensor,
    mask: torch.Tensor,
    hessian: torch.Tensor,
    *,
    start: torch.Tensor | None = None,
    pattern: str | tuple[int, int] | None = None,
    iters: int = 40,
    rho: float = 0.3,
    pcg_iters: int = 50,
    pcg_tol: float = 1e-3,
    damp: float = 0.01,
    name: str = "layer",
) -> tuple[torch.Tensor, SearchReport]:
    """Replace ``mask`` (any method's keep-mask for the dense ``weight``, out x in; a conv weight
    is flattened to (out, in*k*k)) by one of the same size found by ADMM on the calibration
    Gram ``hessian`` (X^T X, damped by ``damp * mean(diag H)``), and overwrite ``weight`` with
    the exact least-squares weights on it (CG). ``start``: the pruned weights the search starts
    from (default weight * mask). An unstructured mask keeps its count; with an N:M
    ``pattern`` (which ``mask`` must satisfy) the new mask keeps N of every M. Weights on
    inputs the calibration never excites (zero Hessian diagonal) change no output and are
    dropped from ``mask`` first, as SparseGPT does.

    Returns (new keep-mask with the weight's shape, report); the result is never worse in the
    damped layer error than ``start`` on that mask. Bad input raises naming the problem, and on
    any error ``weight`` is left as it was."""
    rows, cols = check_layer(weight, mask, hessian, start, name)
    check_positive_int(iters, "iters")
    check_damp(rho, "rho")
    check_positive_int(pcg_iters, "pcg_iters")
    check_damp(pcg_tol, "pcg_tol")
    check_damp(damp)
    keep = mask.reshape(rows, cols).bool()
    nm = parse_pattern(pattern)
    check_nm_mask(keep, nm, name)
    dense = weight.detach().reshape(rows, cols)
    # weights on inputs that are always zero change no output: dropped first, as SparseGPT does
    alive = (hessian.diagonal() > 0).to(dense.device)[None, :].expand(rows, cols)
    keep = keep & alive
    begin = dense if start is None else start.detach().reshape(rows, cols)
    with restored_on_error([weight]):
        new, found, report, _ = search_refine(
            dense, damped_gram(hessian, damp), begin * keep, keep, nm, allowed=alive,
            iters=iters, rho=rho,
            pcg_iters=pcg_iters, pcg_tol=pcg_tol,
        )  # fmt: skip
        if not bool(torch.isfinite(new).all()):
            raise FloatingPointError(f"{name}: ADMM produced non-finite weights; nothing written")
        weight.detach().copy_(new.reshape(weight.shape).to(weight.dtype))
    return found.reshape(weight.shape), report
