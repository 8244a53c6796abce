"""SparseGPT as a registered method: layer-wise OBS on the Hessian 2 X X^T of each layer's
inputs (docs/algorithms.md section 5); the solver is :func:`layerwise.sparsegpt`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._config import option
from .base import CommonOptions, LayerOptions, Method, OWLBudgetOptions, Request
from .budgets import resolve_budget
from .layerwise import sparsegpt


@dataclass(frozen=True, kw_only=True)
class ProjectionOptions(LayerOptions):
    """Options shared by the methods built on SparseGPT projections."""

    damp: float = option(0.01, "damping, relative to the Hessian diagonal", low=0, low_open=True)
    calib_batches: int = option(32, "calibration batches per projection", low=1)
    sequential: bool = option(
        True, "re-run calibration per stage so later layers see the pruned earlier ones"
    )


@dataclass(frozen=True, kw_only=True)
class SparseGPTConfig(CommonOptions, ProjectionOptions, OWLBudgetOptions):
    """Options of ``method="sparsegpt"``."""

    block: int = option(128, "columns pruned together (lazy batch updates)", low=1)


def run(req: Request, cfg: SparseGPTConfig) -> dict[str, torch.Tensor]:
    """One sequential (or single-pass) SparseGPT sweep over the targets, at the uniform or the
    OWL budget."""
    assert req.data is not None and req.loss_fn is not None
    budget = resolve_budget(req, cfg, cfg.calib_batches)
    masks, timings = sparsegpt(
        req.model, req.data, req.loss_fn, budget,
        targets=req.targets, pattern=req.pattern, block=cfg.block, damp=cfg.damp,
        calib_batches=cfg.calib_batches, sequential=cfg.sequential, priors=req.priors,
        progress=cfg.progress, info=req.info,
    )  # fmt: skip
    req.timings.update(timings)
    return masks


METHOD = Method("sparsegpt", SparseGPTConfig, run, "layer-wise OBS from calibration inputs")
