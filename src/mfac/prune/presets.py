"""Named recipes: combinations of the layer-wise pieces that a user gets by one method name.

``owl-sparsegpt``: OWL budgets (outlier-rich transformer blocks pruned less, the mean sparsity
kept) measured on the dense model, then SparseGPT's layer-wise OBS reconstruction block by
block, each block calibrated on the outputs of the already-pruned ones. It is
``method="sparsegpt"`` with ``budget="owl"``, ``sequential=True`` and damping 0.1 (SparseGPT's own
default is 0.01); with an N:M pattern every layer's sparsity is fixed by the pattern, so it is
sequential SparseGPT. The damping is the one value with the lowest validation perplexity over
50 %, 60 %, 70 % and 2:4 on SmolLM2-135M, scored on calibration-text windows the calibration did
not use.

``fisher-sparsegpt``: the same, with the per-block budgets set by the loss's curvature instead
of OWL's activation outliers (``budget="fisher"``, :mod:`mfac.prune.fisher_budget`: the global
diagonal-Fisher saliency decides which blocks keep more). It needs ``loss_fn`` to return a
scalar loss, and costs one backward pass per calibration batch more than ``owl-sparsegpt``. On
SmolLM2-135M it is the best layer-wise method measured, below ``owl-sparsegpt``, SparseGPT and
Wanda at 50 %, 60 % and 70 % on both held-out texts (docs/prune.md, section 2b).
"""

from __future__ import annotations

from dataclasses import dataclass

from .._config import option
from . import sparsegpt
from .base import Method, budget_option


@dataclass(frozen=True, kw_only=True)
class OWLSparseGPTConfig(sparsegpt.SparseGPTConfig):
    """Options of ``method="owl-sparsegpt"``: SparseGPT's, with the OWL budget and damping 0.1
    by default."""

    damp: float = option(
        0.1, "damping, relative to the Hessian diagonal (chosen on validation text)",
        low=0, low_open=True,
    )  # fmt: skip
    budget: str = budget_option("owl")


METHOD = Method(
    "owl-sparsegpt", OWLSparseGPTConfig, sparsegpt.run,
    "OWL layer budgets, then sequential SparseGPT",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class FisherSparseGPTConfig(OWLSparseGPTConfig):
    """Options of ``method="fisher-sparsegpt"``: ``owl-sparsegpt``'s, with the diagonal-Fisher
    budget by default."""

    budget: str = budget_option("fisher")


FISHER_METHOD = Method(
    "fisher-sparsegpt", FisherSparseGPTConfig, sparsegpt.run,
    "diagonal-Fisher layer budgets, then sequential SparseGPT (the transformer preset)",
)  # fmt: skip
