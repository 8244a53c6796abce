"""The DNN variant of I-OBS: alternate dense optimisation steps on the calibration loss (the
"gradient step") with a layer-wise OBS projection (SparseGPT, Hessians recomputed from the
current inputs), for T iterations, keeping the iterate with the best validation loss.

Iteration 1 is the plain one-shot SparseGPT projection of the given (trained) model, so the
returned model is never worse on the validation split than one-shot SparseGPT.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class IOBSPruneResult:
    """``masks``: keep-masks of the returned (best) iterate; ``val_losses[t]``: validation loss
    after projection t+1; ``best_iteration``: 1-based index of the kept iterate;
    ``train_losses``: mean calibration loss of the dense steps before each projection."""

    masks: dict[str, torch.Tensor]
    val_losses: list[float]
    best_iteration: int
    train_losses: list[float] = field(default_factory=list)


def _mean_loss(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn) -> float:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            vals = [float(loss_fn(model, b)) for b in batches]
    finally:
        model.train(was)
    return sum(vals) / max(len(vals), 1)


def iobs_prune(
    model: nn.Module,
    sparsity: float,
    *,
    data: Iterable[Any],
    loss_fn: LossFn,
    val_data: Iterable[Any],
    iterations: int = 3,
    dense_steps: int = 50,
    lr: float = 1e-4,
    pattern: str | Sequence[int] | None = None,
    damp: float = 0.01,
    calib_batches: int | None = None,
    layers: Any = None,
    optimizer: str = "adam",
    val_fn: Callable[[nn.Module], float] | None = None,
    callback: Callable[[int, nn.Module], Any] | None = None,
    sequential: bool = True,
) -> IOBSPruneResult:
    """Prune ``model`` in place to ``sparsity`` (or an N:M ``pattern`` such as "2:4") with
    ``iterations`` I-OBS iterations and return the masks of the best validation iterate.

    ``data`` / ``val_data``: iterables of batches; ``loss_fn(model, batch)`` -> scalar loss
    (lower is better; ``val_fn(model)`` overrides the validation score). Each iteration after the
    first runs ``dense_steps`` steps of ``optimizer`` ("adam" or "sgd", learning rate ``lr``) on
    all parameters, starting from the current sparse weights, then re-projects with SparseGPT
    (``damp`` relative, Hessians from ``calib_batches`` batches of the current model).
    ``callback(it, model)`` sees every projected iterate (e.g. to log test metrics).
    ``sequential`` is SparseGPT's: re-run calibration per stage so later layers see the
    already-projected earlier ones (False: one calibration pass, cheaper on deep models).
    Needs the layer-wise pruner `mfac.prune.layerwise.sparsegpt`.
    """
    try:
        from ..prune.layerwise import sparsegpt
        from ..prune.patterns import check_sparsity, parse_pattern
    except ImportError as err:  # the pruning sub-package is optional at this layer
        raise ImportError("iobs_prune needs mfac.prune.layerwise.sparsegpt") from err

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    if isinstance(dense_steps, bool) or not isinstance(dense_steps, int) or dense_steps < 0:
        raise ValueError(f"dense_steps must be an integer >= 0, got {dense_steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    nm = parse_pattern(pattern)
    sparsity = check_sparsity(sparsity) if nm is None else 1.0 - nm[0] / nm[1]
    batches = list(data)
    val_batches = list(val_data)
    if not batches:
        raise ValueError("data must hold at least one batch")
    if not val_batches and val_fn is None:
        raise ValueError("val_data must hold at least one batch (or pass val_fn)")
    n_calib = calib_batches or len(batches)

    def score() -> float:
        return (
            float(val_fn(model)) if val_fn is not None else _mean_loss(model, val_batches, loss_fn)
        )

    def project() -> dict[str, torch.Tensor]:
        masks, _ = sparsegpt(
            model,
            batches,
            lambda m, b: loss_fn(m, b),
            sparsity,
            layers=layers,
            pattern=nm,
            damp=damp,
            calib_batches=n_calib,
            sequential=sequential,
            progress=False,
        )
        return masks

    params = [p for p in model.parameters() if p.requires_grad]
    result = IOBSPruneResult(masks={}, val_losses=[], best_iteration=1)
    best_state: dict[str, torch.Tensor] | None = None
    best = math.inf
    for it in range(1, iterations + 1):
        if it > 1 and dense_steps:
            result.train_losses.append(
                _dense_phase(model, params, batches, loss_fn, dense_steps, lr, optimizer)
            )
        masks = project()
        val = score()
        if not math.isfinite(val):
            raise ValueError(f"validation loss is not finite after iteration {it}")
        result.val_losses.append(val)
        if callback is not None:
            callback(it, model)
        if val < best:
            best = val
            best_state = copy.deepcopy(model.state_dict())
            result.masks = {k: v.clone() for k, v in masks.items()}
            result.best_iteration = it
    assert best_state is not None
    model.load_state_dict(best_state)
    return result


def _dense_phase(
    model: nn.Module,
    params: list[torch.Tensor],
    batches: list[Any],
    loss_fn: LossFn,
    steps: int,
    lr: float,
    optimizer: str,
) -> float:
    """``steps`` unconstrained optimiser steps cycling over ``batches``; mean loss seen."""
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
    )
    was = model.training
    model.train()
    total = 0.0
    try:
        for s in range(steps):
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
    return total / max(steps, 1)
