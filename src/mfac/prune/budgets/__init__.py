"""Budgets: how a layer-wise method spreads its sparsity over layers (its ``budget`` option).

``uniform`` prunes every layer to the target; ``owl`` sets one sparsity per stage from the
outliers of its Wanda scores (:mod:`mfac.prune.budgets.owl`); ``fisher`` sets it from the global
diagonal-Fisher saliency (:mod:`mfac.prune.budgets.fisher`). Both keep the target as the
weight-count-weighted mean. A budget is a mapping layer name -> sparsity that the layer-wise
solvers accept in place of one sparsity.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

from ..._config import Options, option
from .._layers import Target
from ..method import Request
from ..patterns import Pattern, check_nm_sparsity, check_sparsity
from .fisher import SALIENCIES, fisher_sparsities
from .owl import SPREAD_HELP, THRESHOLD_HELP, OWLConfig, owl_budgets, owl_sparsities

__all__ = [
    "BUDGETS",
    "BudgetOptions",
    "OWLConfig",
    "Sparsity",
    "fisher_sparsities",
    "layer_budgets",
    "owl_budgets",
    "owl_sparsities",
    "resolve_budget",
]

#: The values of a layer-wise method's ``budget`` option.
BUDGETS = ("uniform", "owl", "fisher")


def budget_option(default: str) -> Any:
    """The ``budget`` field of a layer-wise method, with ``default`` as its default."""
    return option(default, "how sparsity is spread over layers", choices=BUDGETS)


def budget_batches_option(default: int | None) -> Any:
    """The ``budget_batches`` field of a layer-wise method, with ``default`` as its default."""
    return option(
        default, "budget=owl or fisher: at most this many of the calibration batches (the first) "
        "set the budgets (none: all of them); fewer cut the Fisher budget's backward passes",
        low=1,
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class BudgetOptions(Options):
    """The budget option of every layer-wise method: one sparsity for every layer, OWL's
    outlier-weighted per-stage budgets or per-stage budgets from the global diagonal-Fisher
    saliency, with the same mean."""

    budget: str = budget_option("uniform")
    owl_threshold: float = option(5.0, THRESHOLD_HELP + " (budget=owl)", low=0, low_open=True)
    owl_spread: float = option(
        0.08, SPREAD_HELP + " (budget=owl or fisher)", low=0, high=1, high_open=True
    )
    fisher_saliency: str = option(
        "diag", "budget=fisher: the saliency ranked, w^2 F_ii from the Fisher's diagonal (diag) "
        "or w^2 / (2 [F^-1]_ii) from the block-diagonal M-FAC inverse (mfac)",
        choices=SALIENCIES,
    )  # fmt: skip
    fisher_block: int = option(128, "budget=fisher, fisher_saliency=mfac: Fisher block size", low=1)
    fisher_damp: float = option(
        1e-2, "budget=fisher, fisher_saliency=mfac: damping, relative to the mean of diag(F)",
        low=0, low_open=True,
    )  # fmt: skip
    budget_batches: int | None = budget_batches_option(None)


Sparsity = float | Mapping[str, float]


def layer_budgets(
    targets: Sequence[Target], sparsity: Sparsity | None, pattern: Pattern
) -> dict[str, float]:
    """Per-layer sparsity from one number or a mapping naming every target (e.g. OWL budgets);
    checked against the N:M pattern, before anything runs."""
    names = [t.name for t in targets]
    if isinstance(sparsity, Mapping):
        missing = [n for n in names if n not in sparsity]
        if missing:
            raise ValueError(f"per-layer sparsity misses layers: {missing[:5]}")
        if pattern is not None:
            raise ValueError("per-layer sparsities cannot be combined with an N:M pattern")
        return {n: check_sparsity(sparsity[n]) for n in names}
    return dict.fromkeys(names, check_nm_sparsity(sparsity, pattern))


def resolve_budget(
    req: Request, options: BudgetOptions, calib_batches: int
) -> float | dict[str, float]:
    """What a registered layer-wise method prunes to: ``req.sparsity`` for every layer, or (with
    ``budget="owl"`` or ``"fisher"`` and no N:M pattern, which fixes every layer's share) the
    per-layer budgets, recorded in ``req.info`` with their cost in ``req.timings[budget]``.
    The calibration batches are taken from ``req.data`` once (into a list), so the budgets and
    the pruning that follows see the same batches even when ``req.data`` is a one-pass
    iterator; the budgets read at most the first ``options.budget_batches`` of them."""
    if options.budget == "uniform":
        return req.sparsity
    if req.pattern is not None:
        req.info[options.budget] = "skipped: the N:M pattern fixes every layer's sparsity"
        return req.sparsity
    assert req.data is not None and req.loss_fn is not None
    req.data = list(islice(iter(req.data), calib_batches))
    # a short ``data`` is warned about once, by the pruning that follows, not by the budgets
    used = max(1, min(options.budget_batches or calib_batches, calib_batches, len(req.data)))
    req.info["budget_batches"] = used
    t0 = time.perf_counter()
    if options.budget == "owl":
        config = OWLConfig(options.owl_threshold, options.owl_spread, used)
        budgets = owl_sparsities(
            req.model, req.data, req.loss_fn, req.sparsity, config,
            targets=req.targets, info=req.info,
        )  # fmt: skip
    else:
        budgets = fisher_sparsities(
            req.model, req.data, req.loss_fn, req.sparsity, spread=options.owl_spread,
            calib_batches=used, targets=req.targets, info=req.info,
            saliency=options.fisher_saliency, block_size=options.fisher_block,
            damp=options.fisher_damp,
        )  # fmt: skip
    req.timings[options.budget] = time.perf_counter() - t0
    return budgets
