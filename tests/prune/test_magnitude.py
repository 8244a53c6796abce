"""Magnitude pruning: global and per-layer scope."""

from __future__ import annotations

import pytest
import torch

import mfac.prune as mp

from prune_models import _fresh

pytestmark = pytest.mark.usefixtures("one_thread")

def test_magnitude_global_and_layer_scope(digits) -> None:
    model = _fresh(digits)
    res = mp.oneshot(model, 0.5, "magnitude", scope="layer")
    assert all(abs(s - 0.5) < 0.01 for s in res.layer_sparsity.values())
    model = _fresh(digits)
    res = mp.oneshot(model, 0.5, "magnitude")
    kept = torch.cat([model[i].weight.detach().abs().reshape(-1) for i in (0, 2, 4)])
    assert float(kept[kept > 0].min()) >= float(
        torch.cat([digits[1][f"{i}.weight"].abs().reshape(-1) for i in (0, 2, 4)]).median()
    )
