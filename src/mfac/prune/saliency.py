"""Wanda's score |W_ij| ||X_j||_2, shared by ``method="wanda"`` (which prunes by it) and the OWL
budget (which counts its outliers)."""

from __future__ import annotations

import torch


def wanda_scores(weight: torch.Tensor, sqnorm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (float64) for a weight flattened to (rows, cols) and the summed
    squared input norms sum_t X_tj^2."""
    w = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    return w.abs() * sqnorm.to(device=w.device, dtype=torch.float64).clamp_min(0).sqrt()[None, :]
