"""Gradual pruning: a cubic sparsity schedule with fine-tuning between pruning steps, masks
held fixed (pruned weights stay exactly zero). A small loop to call or copy."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from .api import oneshot
from .collect import LossFn, cycle_batches
from .masks import hold_masks
from .patterns import check_sparsity
from .result import PruneResult


def cubic_schedule(final: float, steps: int, initial: float = 0.0) -> list[float]:
    """s_t = s_f + (s_i - s_f) (1 - t / n)^3 for t = 1..n (ends exactly at s_f)."""
    check_sparsity(final)
    return [final + (initial - final) * (1.0 - t / steps) ** 3 for t in range(1, steps + 1)]


def finetune(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[object],
    optimizer: torch.optim.Optimizer,
    num_batches: int,
    masks: dict[str, torch.Tensor] | None = None,
) -> float:
    """``num_batches`` optimizer steps on ``loss_fn`` in train mode, masks held; mean loss."""
    holder = hold_masks(model, masks, optimizer) if masks is not None else None
    model.train()
    total = 0.0
    try:
        for batch in cycle_batches(data, num_batches):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
    finally:
        if holder is not None:
            holder.remove()
    return total / max(num_batches, 1)


def gradual(
    model: nn.Module,
    sparsity: float,
    method: str = "mfac",
    *,
    data: Iterable[object] | None = None,
    loss_fn: LossFn | None = None,
    steps: int = 4,
    initial_sparsity: float = 0.0,
    finetune_fn: Callable[[nn.Module, dict[str, torch.Tensor], int], None] | None = None,
    pattern: str | Sequence[int] | None = None,
    **options: object,
) -> list[PruneResult]:
    """Prune to ``sparsity`` over ``steps`` cubic-schedule steps with :func:`oneshot`, calling
    ``finetune_fn(model, masks, step)`` after each step (use :func:`finetune` inside it; it
    holds the masks). Returns every step's result."""
    results = []
    for step, target in enumerate(cubic_schedule(sparsity, steps, initial_sparsity)):
        res = oneshot(model, target, method, data=data, loss_fn=loss_fn, pattern=pattern, **options)
        results.append(res)
        if finetune_fn is not None:
            finetune_fn(model, res.masks, step)
    return results
