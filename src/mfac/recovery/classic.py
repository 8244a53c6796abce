"""The classic first-order baselines: IHT, normalised IHT, HTP, CoSaMP and OMP.

Each takes a `Problem`, the sparsity k, a start point, max_iter and a `Tracker`, and returns
(x, support, iterations, converged, info). All are written against f's gradient, Hessian-vector
product and restricted minimiser, so they run on least squares and logistic regression alike.

``converged`` is True only when the solver's own stopping rule fired before ``max_iter`` (a
relative change below tol, a repeated support for HTP, a vanishing gradient for OMP, or the
user's callback); ``info["stop"]`` names the rule. It says the iteration settled, not that y is
fitted: a k-sparse fixed point can leave a large residual when no k-sparse x fits y.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from .problems import LeastSquares, Problem
from .result import Tracker, hard_threshold, support_of, topk_indices

Out = tuple[torch.Tensor, torch.Tensor, int, bool, dict[str, Any]]


def stop_reason(tracker: Tracker) -> str:
    return "callback" if tracker.callback_stopped else "tolerance"


def settles_honestly(solver: Callable[..., Out]) -> Callable[..., Out]:
    """Refuse a start point whose loss overflows float64, report ``converged=False``
    (``stop="non_finite"``) when the run ends at a non-finite loss or iterate, and add
    ``relative_residual`` = ||Ax - y|| / ||y|| to a least-squares run's info."""

    @functools.wraps(solver)
    def run(problem: Problem, k: int, x: torch.Tensor, *args: Any, **kwargs: Any) -> Out:
        start = problem.value(x)
        if not math.isfinite(start):
            raise ValueError(
                f"the loss at the start point is {start} (float64 overflow): rescale A and y"
            )
        x_out, support, iters, converged, info = solver(problem, k, x, *args, **kwargs)
        end = problem.value(x_out)
        if isinstance(problem, LeastSquares):
            scale = float(problem.y.norm())
            residual = float(problem.residual(x_out).norm())
            info = {**info, "relative_residual": residual / scale if scale > 0 else residual}
        if not (math.isfinite(end) and bool(torch.isfinite(x_out).all())):
            return x_out, support, iters, False, {**info, "stop": "non_finite"}
        return x_out, support, iters, converged, info

    return run


def _step(problem: Problem, step: float | None, step_scale: float) -> float:
    if step is not None:
        if not step > 0:
            raise ValueError(f"step must be > 0, got {step}")
        return float(step)
    if not step_scale > 0:
        raise ValueError(f"step_scale must be > 0, got {step_scale}")
    return step_scale / _lipschitz(problem)


def _lipschitz(problem: Problem) -> float:
    L = problem.lipschitz()
    if not (0.0 < L < math.inf and math.isfinite(1.0 / L)):
        raise ValueError(
            f"the smoothness constant of f is {L} (float64 over- or underflow): rescale A"
        )
    return L


@settles_honestly
def iht(
    problem: Problem,
    k: int,
    x: torch.Tensor,
    max_iter: int,
    tracker: Tracker,
    step: float | None = None,
    step_scale: float = 1.0,
) -> Out:
    """x <- T_k(x - mu grad f(x)), mu = step_scale / L (L the global smoothness constant)."""
    mu = _step(problem, step, step_scale)
    support = topk_indices(x.abs(), k)  # the start point is not truncated (as the authors' code)
    for it in range(1, max_iter + 1):
        new, support = hard_threshold(x - mu * problem.grad(x), k)
        done = tracker.step(it, x, new)
        x = new
        if done:
            return x, support, it, True, {"step": mu, "stop": stop_reason(tracker)}
    return x, support, max_iter, False, {"step": mu, "stop": "max_iter"}


@settles_honestly
def niht(
    problem: Problem,
    k: int,
    x: torch.Tensor,
    max_iter: int,
    tracker: Tracker,
    kappa: float = 2.0,
    c: float = 0.01,
) -> Out:
    """Normalised IHT (Blumensath & Davies 2010): the exact line-search step on the current
    support, shrunk by kappa(1-c) whenever the support changes and the step is too long."""
    x, support = hard_threshold(x, k)
    shrinks = 0
    for it in range(1, max_iter + 1):
        g = -problem.grad(x)
        S = support_of(x) if bool((x != 0).any()) else topk_indices(g.abs(), k)
        gS = torch.zeros_like(g)
        gS[S] = g[S]
        curv = float(gS @ problem.hvp(x, gS))
        mu = float(gS @ gS) / curv if curv > 0 else 1.0 / _lipschitz(problem)
        new, support = hard_threshold(x + mu * g, k)
        for _ in range(60):
            if torch.equal(support, torch.sort(S).values):
                break
            diff = new - x
            dHd = float(diff @ problem.hvp(x, diff))
            omega = (1 - c) * float(diff @ diff) / dHd if dHd > 0 else float("inf")
            if mu <= omega:
                break
            mu /= kappa * (1 - c)
            shrinks += 1
            new, support = hard_threshold(x + mu * g, k)
        done = tracker.step(it, x, new)
        x = new
        if done:
            return x, support, it, True, {"shrinks": shrinks, "stop": stop_reason(tracker)}
    return x, support, max_iter, False, {"shrinks": shrinks, "stop": "max_iter"}


@settles_honestly
def htp(
    problem: Problem,
    k: int,
    x: torch.Tensor,
    max_iter: int,
    tracker: Tracker,
    step: float | None = None,
    step_scale: float = 1.0,
) -> Out:
    """Hard thresholding pursuit (Foucart 2011): support from a gradient step, then the exact
    minimiser of f on that support; stops when the support repeats."""
    mu = _step(problem, step, step_scale)
    x, _ = hard_threshold(x, k)
    prev: torch.Tensor | None = None
    for it in range(1, max_iter + 1):
        S = topk_indices((x - mu * problem.grad(x)).abs(), k)
        new = problem.minimize_on(S, x)
        done = tracker.step(it, x, new)
        x = new
        if done:
            return x, S, it, True, {"step": mu, "stop": stop_reason(tracker)}
        if prev is not None and torch.equal(S, prev):
            return x, S, it, True, {"step": mu, "stop": "support_repeated"}
        prev = S
    return x, S, max_iter, False, {"step": mu, "stop": "max_iter"}


@settles_honestly
def cosamp(
    problem: Problem,
    k: int,
    x: torch.Tensor,
    max_iter: int,
    tracker: Tracker,
) -> Out:
    """CoSaMP (Needell & Tropp 2009), gradient form: merge the 2k largest gradient entries with
    the current support, minimise f there, keep the k largest."""
    d = x.numel()
    x, support = hard_threshold(x, k)
    for it in range(1, max_iter + 1):
        omega = topk_indices(problem.grad(x).abs(), min(2 * k, d))
        T = torch.unique(torch.cat([omega, support_of(x)]))
        b = problem.minimize_on(T, x)
        new, support = hard_threshold(b, k)
        done = tracker.step(it, x, new)
        x = new
        if done:
            return x, support, it, True, {"stop": stop_reason(tracker)}
    return x, support, max_iter, False, {"stop": "max_iter"}


@settles_honestly
def omp(
    problem: Problem,
    k: int,
    x: torch.Tensor,
    max_iter: int,
    tracker: Tracker,
    grad_tol: float = 1e-12,
) -> Out:
    """Orthogonal matching pursuit: add the coordinate with the largest |gradient|, refit f on
    the support; at most k (and max_iter) atoms. The start point is ignored (OMP starts at 0).

    It has converged when the gradient vanishes (max |grad| <= grad_tol * its initial value),
    checked before every atom and after the last one; using up the k atoms before that is
    ``stop="k_atoms"``, not convergence."""
    x = torch.zeros_like(x)
    S = torch.zeros(0, dtype=torch.long, device=x.device)
    g0 = float(problem.grad(x).abs().max())
    steps = min(k, max_iter)
    for it in range(1, steps + 1):
        g = problem.grad(x).abs()
        g[S] = -1.0
        i = int(torch.argmax(g))
        if float(g[i]) <= grad_tol * max(g0, 1e-300):
            return x, S, it - 1, True, {"stop": "gradient"}
        S = torch.sort(torch.cat([S, torch.tensor([i], device=x.device)])).values
        new = problem.minimize_on(S, x)
        tracker.step(it, x, new)
        x = new
        if tracker.callback_stopped:
            return x, S, it, True, {"stop": "callback"}
    if float(problem.grad(x).abs().max()) <= grad_tol * max(g0, 1e-300):
        return x, S, steps, True, {"stop": "gradient"}
    return x, S, steps, False, {"stop": "k_atoms" if steps == k else "max_iter"}
