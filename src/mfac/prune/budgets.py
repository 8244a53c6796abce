"""How a registered layer-wise method spreads its sparsity over layers (its ``budget`` option):
the same sparsity everywhere, OWL's outlier-weighted budgets (:mod:`mfac.prune.owl`) or the
diagonal-Fisher budgets (:mod:`mfac.prune.fisher_budget`), each with the target as its mean."""

from __future__ import annotations

import time
from itertools import islice

from .base import OWLBudgetOptions, Request
from .fisher_budget import fisher_sparsities
from .owl import OWLConfig, owl_sparsities


def resolve_budget(
    req: Request, options: OWLBudgetOptions, calib_batches: int
) -> float | dict[str, float]:
    """What a registered layer-wise method prunes to: ``req.sparsity`` for every layer, or (with
    ``budget="owl"`` or ``"fisher"`` and no N:M pattern, which fixes every layer's share) the
    per-layer budgets, recorded in ``req.info`` with their cost in ``req.timings[budget]``.
    The calibration batches are taken from ``req.data`` once (into a list), so the budgets and
    the pruning that follows see the same batches even when ``req.data`` is a one-pass
    iterator."""
    if options.budget == "uniform":
        return req.sparsity
    if req.pattern is not None:
        req.info[options.budget] = "skipped: the N:M pattern fixes every layer's sparsity"
        return req.sparsity
    assert req.data is not None and req.loss_fn is not None
    req.data = list(islice(iter(req.data), calib_batches))
    t0 = time.perf_counter()
    if options.budget == "owl":
        config = OWLConfig(options.owl_threshold, options.owl_spread, calib_batches)
        budgets = owl_sparsities(
            req.model, req.data, req.loss_fn, req.sparsity, config,
            targets=req.targets, info=req.info,
        )  # fmt: skip
    else:
        budgets = fisher_sparsities(
            req.model, req.data, req.loss_fn, req.sparsity, spread=options.owl_spread,
            calib_batches=calib_batches, targets=req.targets, info=req.info,
        )  # fmt: skip
    req.timings[options.budget] = time.perf_counter() - t0
    return budgets
