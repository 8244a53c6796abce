"""Diagonal-Fisher pruning: OBS saliency w^2 / (2 [F^-1]_ii) with F's diagonal only
(docs/algorithms.md section 4)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .._config import option
from ._layers import Layout
from .base import Method, Request, ScopedOptions, zero_pruned
from .collect import squared_gradient_mean
from .patterns import select
from .saliency import diag_fisher_scores


@dataclass(frozen=True, kw_only=True)
class GradientOptions(ScopedOptions):
    """Methods that estimate the Fisher from m gradients."""

    num_grads: int = option(64, "gradients m for the Fisher estimate", low=1)
    damp: float = option(1e-2, "damping lambda (relative to the diagonal)", low=0, low_open=True)
    per_sample: bool = option(
        False, "m per-sample gradients (torch.func) instead of m mini-batch gradients"
    )


@dataclass(frozen=True, kw_only=True)
class DiagFisherConfig(GradientOptions):
    """Options of ``method="diag-fisher"``."""


def run(req: Request, cfg: DiagFisherConfig) -> dict[str, torch.Tensor]:
    """Score by the diagonal Fisher and zero the lowest scores."""
    assert req.data is not None and req.loss_fn is not None
    layout = Layout(req.targets, req.priors)
    t0 = time.perf_counter()
    fdiag = squared_gradient_mean(
        req.model, req.loss_fn, req.data, layout, cfg.num_grads,
        progress=cfg.progress, per_sample=cfg.per_sample,
    )  # fmt: skip
    t1 = time.perf_counter()
    priors = [req.priors[t.name] for t in req.targets]
    scores = diag_fisher_scores(layout, fdiag, cfg.damp)
    new = select(scores, priors, req.sparsity, cfg.scope, req.pattern)
    zero_pruned(req.targets, new)
    req.timings["collect"], req.timings["prune"] = t1 - t0, time.perf_counter() - t1
    return dict(zip([t.name for t in req.targets], new, strict=True))


METHOD = Method("diag-fisher", DiagFisherConfig, run, "OBS saliency from the Fisher's diagonal")
