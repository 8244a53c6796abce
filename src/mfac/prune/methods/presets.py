"""Presets: SparseGPT with a per-stage budget, registered under their own names.

``owl-sparsegpt``: OWL budgets (outlier-rich stages pruned less, the mean sparsity kept)
measured on the dense model, then SparseGPT stage by stage, each stage calibrated on the outputs
of the already-pruned ones. It is ``method="sparsegpt"`` with ``budget="owl"``,
``sequential=True`` and the damping set per layer by the calibration size (0.1 under 10
calibration tokens per input feature, else SparseGPT's own 0.01; docs/prune.md says how it was
chosen); with an N:M pattern every layer's sparsity is fixed by the pattern, so it is
sequential SparseGPT.

``fisher-sparsegpt``: the same, with the per-stage budgets set by the loss's curvature instead
of OWL's activation outliers (``budget="fisher"``, :mod:`mfac.prune.budgets.fisher`). It needs
``loss_fn`` to return a scalar loss, and costs one backward pass per calibration batch (at most
32 by default, ``budget_batches``) more than ``owl-sparsegpt``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..._config import option
from ..budgets import budget_batches_option, budget_option
from ..method import Method
from . import sparsegpt


@dataclass(frozen=True, kw_only=True)
class OWLSparseGPTConfig(sparsegpt.SparseGPTConfig):
    """Options of ``method="owl-sparsegpt"``: SparseGPT's, with the OWL budget and auto damping.

    The damping defaults to the calibration-size rule (``damp=None``,
    :func:`mfac.prune.methods.sparsegpt.calibration_damp`)."""

    damp: float | None = option(
        None, sparsegpt.DAMP_HELP, low=0, low_open=True, null_words=("auto", "none", "null")
    )  # fmt: skip
    budget: str = budget_option("owl")


METHOD = Method(
    "owl-sparsegpt", OWLSparseGPTConfig, sparsegpt.run,
    "OWL layer budgets, then sequential SparseGPT",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class FisherSparseGPTConfig(OWLSparseGPTConfig):
    """Options of ``method="fisher-sparsegpt"``: ``owl-sparsegpt``'s, with the diagonal-Fisher
    budget from at most 32 calibration batches by default (more calibration for the layer
    solves does not need more backward passes for the budgets; docs/prune.md §2g)."""

    budget: str = budget_option("fisher")
    budget_batches: int | None = budget_batches_option(32)


FISHER_METHOD = Method(
    "fisher-sparsegpt", FisherSparseGPTConfig, sparsegpt.run,
    "diagonal-Fisher layer budgets, then sequential SparseGPT (the transformer preset)",
)  # fmt: skip
