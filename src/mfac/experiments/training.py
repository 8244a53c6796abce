"""A resumable training loop: epochs of shuffled mini-batches whose order depends only on the
seed and the epoch, so that a run resumed at (epoch, batch, step) with the same model,
optimizer and RNG states sees the same batches and ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .tasks import Dataset, Objective

log = logging.getLogger("mfac.experiments")


@dataclass
class Position:
    """Where a run stands: ``batch`` batches of epoch ``epoch`` done, ``step`` optimizer steps
    in all, the loss of every step and the held-out metrics after every epoch."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    history: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False


def fit(
    model: nn.Module, optimizer: torch.optim.Optimizer, objective: Objective, data: Dataset,
    pos: Position, *, epochs: int, batch_size: int, seed: int, max_steps: int | None = None,
    save_every: int = 0, save: Callable[[Position], None] = lambda pos: None, bar: Any = None,
) -> Position:  # fmt: skip
    """Train from ``pos`` up to ``epochs`` (or ``max_steps`` steps in all), calling
    ``save(pos)`` after every ``save_every`` steps, at the end of every epoch and when
    stopping; a non-finite loss raises ValueError before the step is taken. ``bar`` is a
    tqdm-like progress-bar factory (None: no bar)."""
    while pos.epoch < epochs and not pos.stopped:
        batches = data.batches(batch_size, shuffle=True, seed=seed * 100_003 + pos.epoch)
        model.train()
        desc, n = f"epoch {pos.epoch + 1}/{epochs}", len(batches)
        progress = bar(total=n, desc=desc, unit="batch", initial=pos.batch) if bar else None
        for i in range(pos.batch, len(batches)):
            optimizer.zero_grad(set_to_none=True)
            loss = objective(model, batches[i])
            if not torch.isfinite(loss):
                raise ValueError(
                    f"the loss is {float(loss)} at step {pos.step + 1}: lower the learning rate "
                    "(this step was not taken)"
                )
            loss.backward()
            optimizer.step()
            pos.step, pos.batch = pos.step + 1, i + 1
            pos.history.append(float(loss.detach()))
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{pos.history[-1]:.4f}")
            pos.stopped = max_steps is not None and pos.step >= max_steps
            if pos.stopped or (save_every and pos.step % save_every == 0):
                save(pos)
            if pos.stopped:
                break
        if progress is not None:
            progress.close()
        if pos.stopped:
            break
        metrics = objective.evaluate(model, batch_size, "held-out", bar or iter)
        pos.evals.append({"epoch": pos.epoch + 1, "step": pos.step, **metrics})
        mean = sum(pos.history[-len(batches) :]) / max(len(batches), 1)
        log.info("epoch %d: train loss %.4f, held-out %s", pos.epoch + 1, mean,
                 ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))  # fmt: skip
        pos.epoch, pos.batch = pos.epoch + 1, 0
        save(pos)
    return pos
