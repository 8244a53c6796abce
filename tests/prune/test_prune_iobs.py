"""The I-OBS pruning method (method="iobs", iobs_prune): its first iterate is SparseGPT, the
registered entry matches the function, excluded layers stay dense, the best validation iterate is
kept, N:M and its refusals. (The sparse-recovery I-OBS solver is tested in tests/recovery/.)"""

from __future__ import annotations

import pytest
import torch

import mfac.prune as mp
from mfac.prune._layers import find_targets

from prune_models import _fresh, _loss, _state, _unchanged

pytestmark = pytest.mark.usefixtures("one_thread")

def test_oneshot_iobs_matches_the_dnn_variant(digits) -> None:
    import copy

    from mfac.prune import iobs_prune

    batches = digits[2]
    train, val = batches[:8], batches[8:12]
    via_oneshot, direct = copy.deepcopy(_fresh(digits)), copy.deepcopy(_fresh(digits))
    kwargs = {"iterations": 2, "dense_steps": 5, "lr": 1e-3}
    res = mp.oneshot(via_oneshot, 0.8, "iobs", data=train, loss_fn=_loss, val_data=val, **kwargs)
    ref = iobs_prune(direct, 0.8, data=train, loss_fn=_loss, val_data=val, **kwargs)
    assert res.method == "iobs" and res.info["best_iteration"] == ref.best_iteration
    assert res.sparsity == pytest.approx(0.8, abs=0.01)
    for name, mask in ref.masks.items():
        assert torch.equal(res.masks[name], mask)
    for a, b in zip(via_oneshot.parameters(), direct.parameters(), strict=True):
        assert torch.equal(a, b)
    before = _state(via_oneshot)
    with pytest.raises(TypeError, match="unknown options"):
        mp.oneshot(via_oneshot, 0.8, "iobs", data=train, loss_fn=_loss, block_size=4)
    assert _unchanged(via_oneshot, before)


@pytest.mark.parametrize("sequential", [True, False])
def test_iobs_first_iterate_is_sparsegpt_in_the_same_mode(digits, sequential: bool) -> None:
    """One I-OBS iteration is one SparseGPT projection, sequential or not, as asked; and the
    two modes differ on a multi-layer model (so the flag reaches the projection)."""
    import copy

    batches = digits[2][:6]
    iobs_model, sgpt_model = copy.deepcopy(_fresh(digits)), copy.deepcopy(_fresh(digits))
    mp.oneshot(iobs_model, 0.7, "iobs", data=batches, loss_fn=_loss, iterations=1,
               sequential=sequential)  # fmt: skip
    mp.oneshot(sgpt_model, 0.7, "sparsegpt", data=batches, loss_fn=_loss, progress=False,
               calib_batches=len(batches), sequential=sequential)  # fmt: skip
    for a, b in zip(iobs_model.parameters(), sgpt_model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    other = copy.deepcopy(_fresh(digits))
    mp.oneshot(other, 0.7, "iobs", data=batches, loss_fn=_loss, iterations=1,
               sequential=not sequential)  # fmt: skip
    assert any(
        not torch.allclose(a, b, atol=1e-6)
        for a, b in zip(iobs_model.parameters(), other.parameters(), strict=True)
    )


def test_iobs_excludes_the_layers_it_is_told_to(digits) -> None:
    """I-OBS takes ``exclude`` like every one-shot method (its N:M width error suggests it):
    an excluded layer keeps its weights and gets no mask, through both entry points."""
    import copy

    from mfac.prune import iobs_prune

    batches = digits[2][:6]
    first = find_targets(_fresh(digits))[0].name
    for run in ("oneshot", "iobs_prune"):
        model = copy.deepcopy(_fresh(digits))
        kept = model.get_submodule(first).weight.detach().clone()
        kw = {"data": batches, "loss_fn": _loss, "iterations": 1, "exclude": (first,)}
        res = (mp.oneshot(model, 0.7, "iobs", **kw) if run == "oneshot"
               else iobs_prune(model, 0.7, **kw))  # fmt: skip
        assert first not in res.masks and res.masks, run
        assert torch.equal(model.get_submodule(first).weight, kept), run


def _digits_mlp():
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(X))
    tr, va = perm[:800], perm[800:1200]
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X[tr]), y[tr]).backward()
        opt.step()
    batches = [(X[tr[i : i + 200]], y[tr[i : i + 200]]) for i in range(0, 800, 200)]
    return model, batches, [(X[va], y[va])]


def _ce(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_iobs_prune_digits_mlp():
    pytest.importorskip("mfac.prune.methods.sparsegpt")
    import copy

    from mfac.prune import iobs_prune
    from mfac.prune.methods.sparsegpt import sparsegpt

    model, batches, val = _digits_mlp()
    oneshot = copy.deepcopy(model)
    sparsegpt(oneshot, batches, _ce, 0.85, progress=False)
    res = iobs_prune(
        model,
        0.85,
        data=batches,
        loss_fn=_ce,
        val_data=val,
        iterations=3,
        dense_steps=40,
        lr=1e-3,
    )
    assert len(res.val_losses) == 3
    # iteration 1 is exactly one-shot SparseGPT; keep-best never returns anything worse
    with torch.no_grad():
        assert res.val_losses[0] == pytest.approx(float(_ce(oneshot, val[0])), rel=1e-6)
        assert float(_ce(model, val[0])) == pytest.approx(min(res.val_losses), rel=1e-6)
    assert min(res.val_losses) <= res.val_losses[0]
    for layer in (model[0], model[2]):
        assert float((layer.weight == 0).float().mean()) == pytest.approx(0.85, abs=0.01)
    for name, keep in res.masks.items():
        w = dict(model.named_modules())[name].weight
        assert bool((w[~keep] == 0).all())


def test_iobs_prune_nm_and_errors():
    pytest.importorskip("mfac.prune.methods.sparsegpt")
    from mfac.prune import iobs_prune

    model, batches, val = _digits_mlp()
    res = iobs_prune(
        model,
        0.5,
        data=batches,
        loss_fn=_ce,
        val_data=val,
        iterations=2,
        dense_steps=10,
        lr=1e-3,
        pattern="2:4",
    )
    w = model[0].weight.reshape(-1, 4)
    assert bool(((w != 0).sum(1) <= 2).all()) and len(res.val_losses) == 2
    with pytest.raises(ValueError, match="iterations"):
        iobs_prune(model, 0.5, data=batches, loss_fn=_ce, val_data=val, iterations=0)
    with pytest.raises(ValueError, match="sparsity"):
        iobs_prune(model, 1.5, data=batches, loss_fn=_ce, val_data=val)
    with pytest.raises(ValueError, match="lr"):
        iobs_prune(model, 0.5, data=batches, loss_fn=_ce, val_data=val, lr=-1.0)
    with pytest.raises(ValueError, match="val_data"):
        iobs_prune(model, 0.5, data=batches, loss_fn=_ce, val_data=[])
