"""I-OBS for networks (``method="iobs"``): alternate dense optimisation steps on the calibration
loss with a layer-wise OBS projection (SparseGPT, Hessians recomputed from the current inputs),
keeping the iterate with the best validation loss (docs/algorithms.md section 6). Not the
sparse-recovery solver :mod:`mfac.recovery.iobs`, which projects one vector with its full
curvature.

Iteration 1 is the plain one-shot SparseGPT projection of the given (trained) model, so the
returned model is never worse on the validation batches than one-shot SparseGPT.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..._config import option
from .._layers import Target, find_targets
from ..collect import LossFn
from ..method import CommonOptions, Method, Request
from ..patterns import Pattern, check_nm_sparsity, parse_pattern
from ..result import PruneResult, summarize
from .sparsegpt import ProjectionOptions, sparsegpt


@dataclass(frozen=True, kw_only=True)
class IOBSConfig(CommonOptions, ProjectionOptions):
    """Options of ``method="iobs"`` and :func:`iobs_prune`."""

    iterations: int = option(3, "I-OBS iterations (the first is one SparseGPT projection)", low=1)
    dense_steps: int = option(50, "dense optimizer steps before each later projection", low=0)
    lr: float = option(1e-4, "learning rate of the dense steps", low=0, low_open=True)
    optimizer: str = option("adam", "optimizer of the dense steps", choices=("adam", "sgd"))
    calib_batches: int | None = option(
        None, "calibration batches per projection (default: every batch of data)", low=1
    )
    val_data: Any = option(None, "batches that pick the best iterate (default: data)", cli=False)
    val_fn: Any = option(None, "val_fn(model) -> score, overrides val_data", cli=False)
    callback: Any = option(None, "callback(iteration, model) after each projection", cli=False)


@dataclass(kw_only=True)
class IOBSPruneResult(PruneResult):
    """A :class:`PruneResult` plus the I-OBS trace: ``val_losses[t]`` is the validation loss
    after projection t+1, ``best_iteration`` the 1-based index of the kept iterate and
    ``train_losses`` the mean calibration loss of the dense steps before each projection."""

    method: str = "iobs"
    val_losses: list[float] = field(default_factory=list)
    best_iteration: int = 1
    train_losses: list[float] = field(default_factory=list)


def iobs_prune(
    model: nn.Module,
    sparsity: float,
    *,
    data: Iterable[Any],
    loss_fn: LossFn,
    pattern: str | Sequence[int] | None = None,
    **options: Any,
) -> IOBSPruneResult:
    """Prune ``model`` in place to ``sparsity`` (or an N:M ``pattern`` such as "2:4") with I-OBS
    and return the masks of the best validation iterate; ``options`` are :class:`IOBSConfig`'s.

    Each iteration after the first runs ``dense_steps`` steps of ``optimizer`` on all
    parameters from the current sparse weights, then re-projects with SparseGPT. On an error
    the model may be partly changed: :func:`mfac.prune.oneshot` (``method="iobs"``) restores it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cfg = IOBSConfig.build(options, "iobs_prune")
    nm = parse_pattern(pattern)
    target = check_nm_sparsity(sparsity, nm)
    targets = find_targets(model, cfg.layers, cfg.exclude)
    return _iobs(model, target, list(data), loss_fn, nm, cfg, targets)


def _iobs(
    model: nn.Module,
    sparsity: float,
    batches: list[Any],
    loss_fn: LossFn,
    nm: Pattern,
    cfg: IOBSConfig,
    targets: list[Target],
) -> IOBSPruneResult:
    val_batches = batches if cfg.val_data is None else list(cfg.val_data)
    if not batches:
        raise ValueError("data must hold at least one batch")
    if not val_batches and cfg.val_fn is None:
        raise ValueError("val_data must hold at least one batch (or pass val_fn)")
    val_fn: Callable[[nn.Module], float] | None = cfg.val_fn

    def score() -> float:
        if val_fn is not None:
            return float(val_fn(model))
        return _mean_loss(model, val_batches, loss_fn)

    def project() -> dict[str, torch.Tensor]:
        masks, _ = sparsegpt(
            model, batches, loss_fn, sparsity,
            targets=targets, pattern=nm, damp=cfg.damp,
            calib_batches=cfg.calib_batches or len(batches), sequential=cfg.sequential,
            progress=cfg.progress,
        )  # fmt: skip
        return masks

    params = [p for p in model.parameters() if p.requires_grad]
    result = IOBSPruneResult(
        target=sparsity, pattern=nm, masks={}, layer_sparsity={}, sparsity=0.0
    )
    best_state: dict[str, torch.Tensor] | None = None
    best = math.inf
    for it in range(1, cfg.iterations + 1):
        if it > 1 and cfg.dense_steps:
            result.train_losses.append(_dense_phase(model, params, batches, loss_fn, cfg))
        masks = project()
        val = score()
        if not math.isfinite(val):
            raise ValueError(f"validation loss is not finite after iteration {it}")
        result.val_losses.append(val)
        if cfg.callback is not None:
            cfg.callback(it, model)
        if val < best:
            best = val
            best_state = copy.deepcopy(model.state_dict())
            result.masks = {k: v.clone() for k, v in masks.items()}
            result.best_iteration = it
    assert best_state is not None
    model.load_state_dict(best_state)
    result.layer_sparsity, result.sparsity = summarize(result.masks)
    return result


def _mean_loss(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn) -> float:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            vals = [float(loss_fn(model, b)) for b in batches]
    finally:
        model.train(was)
    return sum(vals) / max(len(vals), 1)


def _dense_phase(
    model: nn.Module, params: list[torch.Tensor], batches: list[Any], loss_fn: LossFn,
    cfg: IOBSConfig,
) -> float:  # fmt: skip
    """``dense_steps`` unconstrained optimiser steps cycling over ``batches``; mean loss."""
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(params, lr=cfg.lr)
        if cfg.optimizer == "adam"
        else torch.optim.SGD(params, lr=cfg.lr)
    )
    was = model.training
    model.train()
    total = 0.0
    try:
        for s in range(cfg.dense_steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, batches[s % len(batches)])
            if not torch.isfinite(loss):
                raise ValueError(f"non-finite calibration loss at dense step {s}")
            loss.backward()
            opt.step()
            total += float(loss.detach())
    finally:
        model.train(was)
        for p in params:
            p.grad = None
    return total / max(cfg.dense_steps, 1)


def run(req: Request, cfg: IOBSConfig) -> dict[str, torch.Tensor]:
    """The registered entry: I-OBS on the request's layers; its trace goes into ``info``."""
    assert req.data is not None and req.loss_fn is not None
    out = _iobs(
        req.model, req.sparsity, list(req.data), req.loss_fn, req.pattern, cfg, req.targets
    )
    req.info.update(
        val_losses=out.val_losses, best_iteration=out.best_iteration,
        train_losses=out.train_losses,
    )  # fmt: skip
    return out.masks


METHOD = Method(
    "iobs", IOBSConfig, run, "I-OBS: dense steps alternating with SparseGPT projections",
    restores="model",
)  # fmt: skip
