"""I-OBS (Wu et al., NeurIPS 2024): a curvature step followed by an OBS projection.

    t = x - eta * H^-1 grad f(x)
    S = support rule on t: "topk" |t_i|, "saliency" t_i^2 / [H^-1]_ii, or "greedy" OBC removal
    x = argmin_{supp(x') in S} ||x' - t||_H   (correction=True)   or   x = t on S   (False)

The authors' "Topk-I-OBS" is rule="topk", correction=False. For a quadratic f with the exact,
undamped Hessian and eta = 1 the corrected iterate is the least-squares refit on S.
"""

from __future__ import annotations

import torch

from .classic import Out, settles_honestly, stop_reason
from .curvature import build_curvature
from .problems import Problem
from .result import Tracker, topk_indices

RULES = ("topk", "saliency", "greedy")


@settles_honestly
def iobs(
    problem: Problem,
    k: int,
    x: torch.Tensor,
    max_iter: int,
    tracker: Tracker,
    rule: str = "topk",
    correction: bool = True,
    step: float = 1.0,
    damp: float | None = None,
    damp_mode: str = "absolute",
    curvature: str = "exact",
    refresh: int = 1,
    block_size: int | None = None,
    mfac_dtype: torch.dtype = torch.float32,
    backtrack: bool = False,
) -> Out:
    """Run I-OBS; the curvature is rebuilt every ``refresh`` iterations (once for quadratics).

    ``backtrack=True`` halves eta (up to 30 times) within an iteration until f does not
    increase, the damped-Newton safeguard for non-quadratic losses far from the optimum.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not (isinstance(step, (int, float)) and step > 0):
        raise ValueError(f"step must be a number > 0, got {step!r}")
    if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1:
        raise ValueError(f"refresh must be an integer >= 1, got {refresh!r}")
    if damp is None:
        damp = 0.0 if curvature == "exact" else 1e-4
        damp_mode = damp_mode if curvature == "exact" else "relative"
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    if rule == "greedy" and curvature != "exact":
        raise ValueError(
            "rule='greedy' downdates a dense d x d inverse: use curvature='exact' "
            "(or rule='saliency' / 'topk' with curvature='mfac')"
        )
    curv = None
    support = topk_indices(x.abs(), k)
    backtracks = 0
    for it in range(1, max_iter + 1):
        if curv is None or (not problem.is_quadratic and (it - 1) % refresh == 0):
            curv = build_curvature(problem, x, curvature, damp, damp_mode, block_size, mfac_dtype)
        direction = curv.solve(problem.grad(x))
        eta = step
        f_old = problem.value(x) if backtrack else 0.0
        for _ in range(30 if backtrack else 1):
            new, support = _obs_step(curv, x - eta * direction, k, rule, correction)
            if not backtrack or problem.value(new) <= f_old:
                break
            eta *= 0.5
            backtracks += 1
        done = tracker.step(it, x, new)
        x = new
        if done:
            info = {"damp": curv.damp, "backtracks": backtracks, "stop": stop_reason(tracker)}
            return x, support, it, True, info
    info = {
        "damp": curv.damp if curv is not None else None,
        "backtracks": backtracks,
        "stop": "max_iter",
    }
    return x, support, max_iter, False, info


def _obs_step(curv, t: torch.Tensor, k: int, rule: str, correction: bool):
    """Support rule and (optional) OBS correction applied to the curvature-step point t."""
    if rule == "greedy":
        corrected, support = curv.greedy(t, k)
        return (corrected if correction else _mask(t, support)), support
    score = t.abs() if rule == "topk" else t.square() / curv.inv_diag().clamp_min(1e-300)
    support = topk_indices(score, k)
    return (curv.project(t, support) if correction else _mask(t, support)), support


def _mask(t: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(t)
    out[support] = t[support]
    return out


__all__ = ["RULES", "iobs"]
