"""OWL (outlier-weighted layer-wise sparsity): per-stage sparsity budgets for layer-wise methods.

For every stage l (a transformer block: the linear layers sharing the name prefix up to the first
index, see :func:`mfac.prune.calibration.stages`) take the Wanda scores A_ij = |W_ij| ||X_j||_2
of all its linear layers together, and its outlier ratio D_l = share of scores above M times the
stage's mean score. Stages rich in outliers are pruned less:

    s_l = S + lambda (1 - 2 (D_l - D_min) / (D_max - D_min)),   in [S - lambda, S + lambda],

then shifted by one constant c, s_l <- clip(s_l + c, S - lambda, S + lambda) (and into [0, 1)),
with c chosen so that the weight-count-weighted mean of the s_l is exactly S. The result is a
mapping layer -> sparsity that :func:`mfac.prune.methods.sparsegpt.sparsegpt`,
:func:`mfac.prune.methods.wanda.wanda` and any other layer-wise solver accept in place of one
sparsity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..._config import Options, option
from .._layers import LayerFilter, Target, find_targets
from ..calibration import (
    InputStats,
    calibration_batches,
    check_layerwise_targets,
    run_layerwise,
    stage_name,
)
from ..patterns import check_sparsity
from ..saliency import wanda_scores

THRESHOLD_HELP = "OWL's M: a score is an outlier above M times its stage's mean score"
SPREAD_HELP = "OWL's lambda: the largest deviation of a stage's sparsity from the target"

#: Highest sparsity a budget may reach (a layer keeps at least a few weights).
MAX_SPARSITY = 0.99


@dataclass(frozen=True)
class OWLConfig(Options):
    """Options of :func:`owl_sparsities`."""

    threshold: float = option(5.0, THRESHOLD_HELP, low=0, low_open=True)
    spread: float = option(0.08, SPREAD_HELP, low=0, high=1, high_open=True)
    calib_batches: int = option(32, "calibration batches whose inputs give ||X_j||_2", low=1)
    granularity: str = option(
        "block", "one budget per stage, i.e. transformer block (the paper), or per linear layer",
        choices=("block", "layer"),
    )  # fmt: skip


def owl_budgets(
    ratios: Sequence[float], sizes: Sequence[int], sparsity: float, spread: float
) -> list[float]:
    """Per-group sparsities from outlier ratios (see the module docstring): in
    [S - spread, S + spread] within [0, MAX_SPARSITY], higher ratio -> lower sparsity, and
    weighted by ``sizes`` their mean is ``sparsity``."""
    s = check_sparsity(sparsity)
    if len(ratios) != len(sizes) or not ratios:
        raise ValueError("ratios and sizes must be non-empty and of equal length")
    r = torch.tensor(ratios, dtype=torch.float64)
    n = torch.tensor(sizes, dtype=torch.float64)
    lo, hi = max(s - spread, 0.0), min(s + spread, MAX_SPARSITY)
    if s > hi:
        raise ValueError(f"sparsity {s} exceeds the largest layer budget {MAX_SPARSITY}")
    span = float(r.max() - r.min())
    if span == 0.0 or spread == 0.0:
        return [s] * len(ratios)
    raw = s + spread * (1.0 - 2.0 * (r - r.min()) / span)

    def mean_at(c: float) -> float:
        return float((n * (raw + c).clamp(lo, hi)).sum() / n.sum())

    a, b = -2.0 * spread - 1.0, 2.0 * spread + 1.0  # mean_at(a) = lo <= s <= hi = mean_at(b)
    for _ in range(200):
        mid = 0.5 * (a + b)
        if mean_at(mid) < s:
            a = mid
        else:
            b = mid
    return (raw + 0.5 * (a + b)).clamp(lo, hi).tolist()


def outlier_ratio(scores: Sequence[torch.Tensor], threshold: float) -> float:
    """Share of the pooled scores above ``threshold`` times their mean."""
    flat = torch.cat([t.reshape(-1) for t in scores])
    return float((flat > threshold * flat.mean()).double().mean())


@torch.no_grad()
def owl_sparsities(
    model: nn.Module,
    data: Iterable[object],
    forward_fn: Callable[[nn.Module, object], object],
    sparsity: float,
    config: OWLConfig | None = None,
    *,
    targets: Sequence[Target] | None = None,
    layers: LayerFilter = None,
    info: dict[str, object] | None = None,
) -> dict[str, float]:
    """OWL budgets (layer name -> sparsity) for ``targets`` of ``model`` at overall
    ``sparsity``, from one calibration pass of the model as it is (nothing is changed).
    ``info`` receives the outlier ratio of every group (``owl_ratios``)."""
    config = config or OWLConfig()
    s = check_sparsity(sparsity)
    if targets is None:
        targets = find_targets(model, layers)
    check_layerwise_targets(targets)
    batches = calibration_batches(data, config.calib_batches)
    groups: dict[str, list[Target]] = {}
    for t in targets:
        key = stage_name(t.name) if config.granularity == "block" else t.name
        groups.setdefault(key, []).append(t)
    ratios: dict[str, float] = {}

    def measure(group: list[Target], stats: InputStats) -> None:
        for key, members in groups.items():
            scores = [wanda_scores(t.param, stats.get(t.name)[0]) for t in members]
            ratios[key] = outlier_ratio(scores, config.threshold)

    run_layerwise(
        model, targets, batches, forward_fn, "sqnorm", measure, sequential=False, timings={}
    )  # fmt: skip
    keys = list(groups)
    sizes = [sum(t.numel for t in groups[k]) for k in keys]
    budgets = owl_budgets([ratios[k] for k in keys], sizes, s, config.spread)
    if info is not None:
        info["owl_ratios"] = {k: ratios[k] for k in keys}
        info["owl_group_sparsity"] = dict(zip(keys, budgets, strict=True))
    return {t.name: b for k, b in zip(keys, budgets, strict=True) for t in groups[k]}

