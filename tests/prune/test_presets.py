"""The presets owl-sparsegpt and fisher-sparsegpt: a budget, then sequential SparseGPT."""

from __future__ import annotations

import pytest
import torch

from mfac.prune.methods.sparsegpt import sparsegpt

from prune_models import _chain, _layers, _run
from prune_models import _chain_loss as _loss

F64 = torch.float64


def test_owl_sparsegpt_preset_is_owl_then_sequential_sparsegpt() -> None:
    from mfac.prune import oneshot
    from mfac.prune.budgets.owl import OWLConfig, owl_sparsities
    from mfac.prune.methods.presets import OWLSparseGPTConfig

    opts = {"calib_batches": 3, "block": 4, "owl_threshold": 2.0, "owl_spread": 0.1}
    for nm in (None, (2, 4)):
        model, batches = _chain(6)
        ref, _ = _chain(6)
        res = oneshot(
            model, 0.5, "owl-sparsegpt", data=batches, loss_fn=_run, pattern=nm,
            layers=_layers, progress=False, **opts,
        )  # fmt: skip
        budget: object = 0.5
        if nm is None:
            budget = owl_sparsities(ref, batches, _run, 0.5, OWLConfig(2.0, 0.1, 3), layers=_layers)
            assert res.info["owl_group_sparsity"]
            assert "owl" in res.timings
        else:
            assert "skipped" in str(res.info["owl"])
        expect, _ = sparsegpt(
            ref, batches, _run, budget, layers=_layers, pattern=nm, block=4, calib_batches=3,
            damp=0.1, progress=False,
        )  # fmt: skip
        assert all(torch.equal(res.masks[n], expect[n]) for n in res.masks)
        assert all(
            torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters(), strict=True)
        )
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="contradicts"):
        oneshot(
            model, 0.8, "owl-sparsegpt", data=batches, loss_fn=_run, pattern=(2, 4),
            layers=_layers, **opts,
        )  # fmt: skip
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    with pytest.raises(ValueError, match="damp"):
        OWLSparseGPTConfig(damp=0.0)


def test_fisher_sparsegpt_preset_is_fisher_budgets_then_sequential_sparsegpt() -> None:
    from mfac.prune import oneshot

    model, batches = _chain(5)
    ref, _ = _chain(5)
    res = oneshot(model, 0.6, "fisher-sparsegpt", data=batches, loss_fn=_loss, layers=_layers,
                  calib_batches=3, block=4, progress=False)  # fmt: skip
    expect = oneshot(ref, 0.6, "sparsegpt", data=batches, loss_fn=_loss, layers=_layers,
                     calib_batches=3, block=4, budget="fisher", damp=0.1, sequential=True,
                     progress=False)  # fmt: skip
    assert res.method == "fisher-sparsegpt" and res.info["fisher_group_sparsity"]
    assert all(torch.equal(res.masks[n], expect.masks[n]) for n in expect.masks)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters(), strict=True))
