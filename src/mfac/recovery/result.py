"""The result every solver returns, and the small pieces the solvers share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .._result import Result
from .problems import Problem


@dataclass
class RecoveryResult(Result):
    """Outcome of `mfac.recovery.solve`.

    ``x``: the k-sparse solution (numpy array or torch tensor, the kind and dtype of A);
    ``support``: sorted indices of its nonzero-allowed coordinates (same kind, integer);
    ``iterations``: iterations run; ``converged``: info["stop"] (a stopping rule) fired before
    ``max_iter``; ``history``: objective value after every iteration when asked for (else None);
    ``iterates``: the iterates themselves when ``history="iterates"``; ``loss``: final f(x).
    """

    x: Any
    support: Any
    iterations: int
    converged: bool
    loss: float
    history: list[float] | None = None
    iterates: list[Any] | None = None


class Tracker:
    """Records history, applies the relative-change stopping test and the user callback."""

    def __init__(
        self,
        problem: Problem,
        tol: float,
        history: bool | str,
        callback: Callable[[int, torch.Tensor], Any] | None,
    ) -> None:
        if history not in (False, True, "iterates"):
            raise ValueError(f"history must be False, True or 'iterates', got {history!r}")
        self.problem = problem
        self.tol = tol
        self.losses: list[float] | None = [] if history else None
        self.iterates: list[torch.Tensor] | None = [] if history == "iterates" else None
        self.callback = callback
        self.callback_stopped = False

    def step(self, it: int, x_old: torch.Tensor, x_new: torch.Tensor) -> bool:
        """Record iteration ``it`` (1-based); True when the solver should stop (converged)."""
        if self.losses is not None:
            self.losses.append(self.problem.value(x_new))
        if self.iterates is not None:
            self.iterates.append(x_new.clone())
        if self.callback is not None and self.callback(it, x_new):
            self.callback_stopped = True
            return True
        change = float((x_new - x_old).norm())
        return change <= self.tol * max(float(x_new.norm()), 1e-300)


def topk_indices(v: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of v (ties broken by torch.topk), sorted."""
    return torch.sort(torch.topk(v, k, sorted=False).indices).values


def hard_threshold(v: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T_k(v): keep the k largest magnitudes; returns (thresholded vector, support)."""
    idx = topk_indices(v.abs(), k)
    out = torch.zeros_like(v)
    out[idx] = v[idx]
    return out, idx


def support_of(x: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(x).flatten()
