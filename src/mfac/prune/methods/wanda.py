"""Wanda: prune by |W_ij| * ||X_j||_2, compared within each output row, with no weight update.

X is the (tokens x cols) matrix of a layer's calibration inputs, so ||X_j||_2 is the norm of
input feature j over all calibration tokens. The score is the size of weight w_ij's contribution
to output i, which is what a layer-wise reconstruction loses when w_ij is removed, up to the
cross terms (the diagonal of SparseGPT's Hessian without its inverse). Every row keeps the same
share (unstructured), or N of every M consecutive weights along the row (N:M).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..._config import option
from .._layers import LayerFilter, Target, find_targets
from ..budgets import BudgetOptions, Sparsity, layer_budgets, resolve_budget
from ..calibration import InputStats, calibration_batches, check_layerwise_targets, run_layerwise
from ..method import CommonOptions, Method, Request
from ..patterns import Pattern, check_pattern_fits, nm_keep
from ..restore import restored_on_error
from ..saliency import wanda_scores

F64 = torch.float64


@dataclass(frozen=True)
class WandaConfig(CommonOptions, BudgetOptions):
    """Options of :func:`wanda` and of ``method="wanda"``."""

    calib_batches: int = option(32, "calibration batches whose inputs give ||X_j||_2", low=1)
    sequential: bool = option(
        True,
        "prune stage by stage, each calibrated on the pruned stages' outputs (as the paper); "
        "False takes every norm from one pass of the dense model",
    )


def row_keep(
    scores: torch.Tensor, sparsity: float, pattern: Pattern, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep-mask from (rows, cols) scores: in every row drop the round(sparsity * cols) lowest
    (ties by position), or keep the N highest of every M consecutive ones. Already-pruned
    weights (``prior`` False) are dropped first and count towards the budget."""
    rows, cols = scores.shape
    if pattern is not None:  # the N best of every M, as every other N:M method picks them
        alive = torch.ones_like(scores, dtype=torch.bool) if prior is None else prior
        return nm_keep(scores, alive, pattern)
    s = scores if prior is None else torch.where(prior, scores, -1.0)
    count = round(sparsity * cols)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=s.device)
    if count:
        # stable sort: equal scores are dropped in column order
        keep.scatter_(1, s.argsort(dim=1, stable=True)[:, :count], False)
    return keep if prior is None else keep & prior


@torch.no_grad()
def wanda(
    model: nn.Module,
    data: Iterable[object],
    forward_fn: Callable[[nn.Module, object], object],
    sparsity: Sparsity | None,
    config: WandaConfig | None = None,
    *,
    pattern: Pattern = None,
    targets: Sequence[Target] | None = None,
    layers: LayerFilter = None,
    priors: Mapping[str, torch.Tensor] | None = None,
    info: dict[str, object] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Prune the Linear/Conv2d ``targets`` of ``model`` in place with Wanda; returns
    (keep-masks, timings).

    ``sparsity``: one fraction for every layer or a mapping layer -> fraction (e.g. OWL
    budgets); with an N:M ``pattern`` it must be None or 1 - N/M. ``forward_fn(model, batch)``
    runs a calibration batch. Nothing is changed when an input is refused; on any error during
    pruning the weights are restored.
    """
    config = config or WandaConfig()
    if targets is None:
        targets = find_targets(model, layers)
    check_layerwise_targets(targets)
    check_pattern_fits(targets, pattern)
    budgets = layer_budgets(targets, sparsity, pattern)
    batches = calibration_batches(data, config.calib_batches)
    timings = {"collect": 0.0, "precompute": 0.0, "prune": 0.0}
    masks: dict[str, torch.Tensor] = {}

    def prune_group(group: list[Target], stats: InputStats) -> None:
        t0 = time.perf_counter()
        for t in group:
            sqnorm, _ = stats.get(t.name)
            prior = None
            if priors is not None:
                prior = priors[t.name].reshape(t.shape[0], -1).to(t.param.device).bool()
            keep = row_keep(wanda_scores(t.param, sqnorm), budgets[t.name], pattern, prior)
            keep = keep.reshape(t.shape)
            t.param.mul_(keep.to(t.param.dtype))
            masks[t.name] = keep.cpu()
        timings["prune"] += time.perf_counter() - t0

    with restored_on_error([t.param for t in targets]):
        run_layerwise(
            model, targets, batches, forward_fn, "sqnorm", prune_group,
            sequential=config.sequential, timings=timings, info=info,
        )  # fmt: skip
    if info is not None:
        info["calib_batches"] = len(batches)
    return masks, timings


def run(req: Request, cfg: WandaConfig) -> dict[str, torch.Tensor]:
    """``method="wanda"``: the uniform or a per-layer budget, then :func:`wanda` over the
    targets."""
    assert req.loss_fn is not None and req.data is not None
    budget = resolve_budget(req, cfg, cfg.calib_batches)
    masks, timings = wanda(
        req.model, req.data, req.loss_fn, budget, cfg, pattern=req.pattern,
        targets=req.targets, priors=req.priors, info=req.info,
    )  # fmt: skip
    req.timings.update(timings)
    return masks


METHOD = Method("wanda", WandaConfig, run, "|W| times input norms per output row (no update)")
