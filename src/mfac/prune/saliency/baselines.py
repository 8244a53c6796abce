"""The baselines' scores: magnitude |w|, the diagonal empirical Fisher w^2 (lambda + F_qq)
and Wanda's |W_ij| ||X_j||_2."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._layers import Layout, Target


def magnitude_scores(targets: Sequence[Target]) -> list[torch.Tensor]:
    """|w| for every weight of every layer."""
    return [t.param.detach().abs().cpu() for t in targets]


def diag_fisher_scores(
    layout: Layout, fisher_diag: torch.Tensor, damp: float
) -> list[torch.Tensor]:
    """OBS saliency under a diagonal Fisher: rho_q = w_q^2 (lambda + F_qq) / 2, with lambda
    relative (``damp`` times the mean of F's diagonal), as for the M-FAC pruner."""
    lam = damp * float(fisher_diag[layout.real].mean())
    w = layout.gather([t.param for t in layout.targets], torch.float64)
    rho = 0.5 * w.square() * (lam + fisher_diag)
    return layout.scatter(rho)


def wanda_scores(weight: torch.Tensor, sqnorm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (float64) for a weight flattened to (rows, cols) and the summed
    squared input norms sum_t X_tj^2."""
    w = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    return w.abs() * sqnorm.to(device=w.device, dtype=torch.float64).clamp_min(0).sqrt()[None, :]
