"""Diagonal-Fisher pruning: OBS saliency w^2 / (2 [F^-1]_ii) with F's diagonal only
(docs/algorithms.md section 4)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .._layers import Layout
from ..collect import squared_gradient_mean
from ..method import GradientOptions, Method, Request, zero_pruned
from ..patterns import select


@dataclass(frozen=True, kw_only=True)
class DiagFisherConfig(GradientOptions):
    """Options of ``method="diag-fisher"``."""


def diag_fisher_scores(
    layout: Layout, fisher_diag: torch.Tensor, damp: float
) -> list[torch.Tensor]:
    """OBS saliency under a diagonal Fisher: rho_q = w_q^2 (lambda + F_qq) / 2, with lambda
    relative (``damp`` times the mean of F's diagonal), as for the M-FAC OBS method."""
    lam = damp * float(fisher_diag[layout.real].mean())
    w = layout.gather([t.param for t in layout.targets], torch.float64)
    rho = 0.5 * w.square() * (lam + fisher_diag)
    return layout.scatter(rho)


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
