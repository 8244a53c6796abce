"""What a pruning call returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._result import Result


@dataclass
class PruneResult(Result):
    """Masks (True = kept), achieved sparsity per layer and overall, and wall-clock timings.

    ``timings`` holds seconds for ``collect`` (gradients or activations), ``precompute``
    (building the inverse Fisher or Hessians), ``prune`` (selection and weight updates) and
    ``total``.
    """

    target: float
    pattern: tuple[int, int] | None
    masks: dict[str, torch.Tensor]
    layer_sparsity: dict[str, float]
    sparsity: float
    timings: dict[str, float] = field(default_factory=dict)


def summarize(masks: dict[str, torch.Tensor]) -> tuple[dict[str, float], float]:
    """Per-layer and overall fraction of pruned weights."""
    per = {n: 1.0 - float(m.float().mean()) for n, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    return per, pruned / max(total, 1)
