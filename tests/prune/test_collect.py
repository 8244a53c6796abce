"""Gradient collection for the Fisher-based methods: rows are the masked gradients; per-sample
rows match single-sample gradients."""

from __future__ import annotations

import pytest
import torch

import mfac.prune as mp
from mfac.prune._layers import Layout, current_masks, find_targets
from mfac.prune.collect import gradient_buffer

from prune_models import _fresh, _loss

pytestmark = pytest.mark.usefixtures("one_thread")

def test_collected_rows_are_masked_gradients(digits) -> None:
    model = _fresh(digits)
    mp.oneshot(model, 0.5, "magnitude")
    model.train()
    targets = find_targets(model)
    layout = Layout(targets, current_masks(targets), 16)
    buf = gradient_buffer(model, _loss, digits[2][:3], layout, 3, progress=False)
    assert model.training  # mode restored
    model.eval()
    model.zero_grad()
    _loss(model, digits[2][1]).backward()
    expect = layout.gather([t.param.grad for t in targets])
    assert torch.allclose(buf.tensor[1], expect)
    assert layout.dim % 16 == 0 and layout.dim < sum(t.numel for t in targets)


def test_per_sample_rows_match_single_sample_gradients(digits) -> None:
    """torch.func per-sample rows equal the gradients of one-sample batches, in order."""
    model = _fresh(digits)
    targets = find_targets(model)
    layout = Layout(targets, current_masks(targets))
    data = [(b[0][:3], b[1][:3]) for b in digits[2][:2]]
    buf = gradient_buffer(model, _loss, data, layout, 5, progress=False, per_sample=True)
    singles = [(x[i : i + 1], y[i : i + 1]) for x, y in data for i in range(3)][:5]
    ref = gradient_buffer(model, _loss, singles, layout, 5, progress=False)
    assert torch.allclose(buf.tensor, ref.tensor, atol=1e-6)
    res = mp.oneshot(model, 0.7, "mfac", data=data, loss_fn=_loss, num_grads=6, per_sample=True)
    assert abs(res.sparsity - 0.7) < 1e-3
