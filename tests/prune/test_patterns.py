"""N:M patterns and selection: refusals naming the layer, exact counts with ties."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mfac.prune.methods.sparsegpt import sparsegpt
from mfac.prune.methods.wanda import wanda

from prune_models import _chain, _layers, _run, _same, _snapshot

F64 = torch.float64


def test_nm_contradicting_sparsity_refused_model_unchanged() -> None:
    model, batches = _chain()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="contradicts the N:M pattern 2:4"):
        wanda(model, batches, _run, 0.8, pattern=(2, 4), layers=_layers)
    assert _same(model, snap)


def test_nm_width_not_divisible_names_layer_and_exclude() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    snap = _snapshot(model)
    batches = [torch.randn(4, 6, dtype=F64)]
    for fn in (wanda, sparsegpt):
        with pytest.raises(ValueError, match=r"\('0', 6\).*exclude"):
            fn(model, batches, _run, None, pattern=(2, 4))
        assert _same(model, snap)


def test_lowest_selects_exactly_count_with_ties() -> None:
    from mfac.prune.patterns import lowest

    gen = torch.Generator().manual_seed(2)
    for n, count in [(10, 0), (10, 10), (50, 17), (1000, 500)]:
        values = torch.randint(0, 7, (n,), generator=gen).double()  # many ties
        values[:3] = -math.inf
        sel = lowest(values, count)
        assert int(sel.sum()) == count
        if 0 < count < n:
            assert float(values[sel].max()) <= float(values[~sel].min())
