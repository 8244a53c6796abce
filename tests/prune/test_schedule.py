"""Gradual pruning: the cubic schedule with masks held between steps."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import mfac.prune as mp

from prune_models import _fresh, _loss

pytestmark = pytest.mark.usefixtures("one_thread")

def test_gradual_cubic_schedule_holds_masks(digits) -> None:
    sched = mp.cubic_schedule(0.9, 4)
    assert sched[-1] == pytest.approx(0.9) and all(a < b for a, b in itertools.pairwise(sched))
    model = _fresh(digits)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    seen = []

    def tune(m: nn.Module, masks: dict[str, torch.Tensor], step: int) -> None:
        mp.finetune(m, _loss, digits[2], opt, 10, masks)
        seen.append(step)

    results = mp.gradual(
        model, 0.9, "mfac", data=digits[2], loss_fn=_loss, steps=3, finetune_fn=tune, num_grads=16
    )
    assert seen == [0, 1, 2]
    assert abs(results[-1].sparsity - 0.9) < 1e-3
    for name, mask in results[-1].masks.items():
        assert bool((dict(model.named_modules())[name].weight[~mask] == 0).all())
