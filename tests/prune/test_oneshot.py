"""mfac.prune.oneshot end to end over the methods on a trained MLP: the sparsity reached, N:M
validity, earlier masks kept, and bad input (refused, model untouched)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mfac.prune as mp

from prune_models import _acc, _fresh, _loss, _state, _unchanged

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ["magnitude", "diag-fisher", "mfac", "mfac-exact", "sparsegpt"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_hits_the_sparsity(digits, method) -> None:
    model = _fresh(digits)
    res = (
        mp.oneshot(model, 0.6, method, data=digits[2], loss_fn=_loss, num_grads=32)
        if method
        not in (
            "magnitude",
            "sparsegpt",
        )
        else mp.oneshot(model, 0.6, method, data=digits[2], loss_fn=_loss)
    )
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert set(res.masks) == set(names)
    for name in names:
        w = dict(model.named_modules())[name].weight
        assert bool((w[~res.masks[name]] == 0).all())
    if method == "sparsegpt":  # per-layer budget
        assert all(abs(s - 0.6) < 0.01 for s in res.layer_sparsity.values())
    else:
        assert abs(res.sparsity - 0.6) < 1e-3
    assert set(res.timings) >= {"collect", "precompute", "prune", "total"}
    assert _acc(model, digits[3]) > 0.5


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_masks_valid(digits, method, pattern) -> None:
    model = _fresh(digits)
    n, m = (int(v) for v in pattern.split(":"))
    kw = {"num_grads": 16} if method in ("diag-fisher", "mfac", "mfac-exact") else {}
    res = mp.oneshot(model, None, method, data=digits[2], loss_fn=_loss, pattern=pattern, **kw)
    for name, mask in res.masks.items():
        groups = mask.reshape(-1, m).sum(1)
        assert bool((groups == n).all()), name
        w = dict(model.named_modules())[name].weight
        assert bool(((w != 0).reshape(-1, m).sum(1) <= n).all())


def test_previous_masks_are_kept(digits) -> None:
    model = _fresh(digits)
    first = mp.oneshot(model, 0.5, "magnitude")
    second = mp.oneshot(model, 0.8, "mfac", data=digits[2], loss_fn=_loss, num_grads=16)
    for name in first.masks:
        assert not bool((second.masks[name] & ~first.masks[name]).any())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sparsity": 1.0}, ValueError, r"\[0, 1\)"),
        ({"sparsity": -0.1}, ValueError, r"\[0, 1\)"),
        ({"sparsity": float("nan")}, ValueError, r"\[0, 1\)"),
        ({"sparsity": 0.5, "pattern": "4:4"}, ValueError, "N < M"),
        ({"sparsity": 0.5, "pattern": "3:2"}, ValueError, "N < M"),
        ({"sparsity": 0.5, "pattern": "2:5"}, ValueError, "divisible by 5"),
        ({"sparsity": 0.5, "pattern": "two"}, ValueError, "N:M"),
        ({"sparsity": 0.5, "method": "obs"}, ValueError, "unknown method"),
        ({"sparsity": 0.5, "method": "mfac", "blocksize": 3}, TypeError, "unknown options"),
        ({"sparsity": 0.5, "method": "mfac", "data": None}, ValueError, "needs data"),
        ({"sparsity": 0.5, "method": "mfac", "damp": 0.0}, ValueError, "damp"),
        ({"sparsity": 0.5, "method": "mfac-exact", "block_size": 5000}, ValueError, "block_size"),
        ({"sparsity": 0.5, "method": "mfac", "layer_groups": 1}, ValueError, "layer_groups"),
        (
            {"sparsity": None, "method": "mfac-exact", "pattern": "2:4", "block_size": 6},
            ValueError,
            "divisible by M",
        ),
    ],
)
def test_bad_input_leaves_model_untouched(digits, kwargs, error, match) -> None:
    model = _fresh(digits)
    before = _state(model)
    call = {"method": "magnitude", "data": digits[2], "loss_fn": _loss, **kwargs}
    sparsity = call.pop("sparsity")
    method = call.pop("method")
    with pytest.raises(error, match=match):
        mp.oneshot(model, sparsity, method, **call)
    assert _unchanged(model, before)


def test_exhausted_generator_is_a_clear_error(digits) -> None:
    model = _fresh(digits)
    before = _state(model)
    with pytest.raises(ValueError, match="ran out after 3 batches"):
        mp.oneshot(model, 0.5, "mfac", data=iter(digits[2][:3]), loss_fn=_loss, num_grads=8)
    assert _unchanged(model, before)


def test_no_prunable_layers() -> None:
    with pytest.raises(ValueError, match="no prunable layers"):
        mp.oneshot(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), 0.5, "magnitude")


@pytest.mark.parametrize("method", ["diag-fisher", "mfac", "mfac-exact"])
def test_nan_loss_leaves_model_untouched(digits, method) -> None:
    model = _fresh(digits)
    model.train()
    before = _state(model)
    calls = {"n": 0}

    def nan_later(m: nn.Module, batch) -> torch.Tensor:
        calls["n"] += 1  # finite for the first sub-step, NaN in the second (after an update)
        loss = _loss(m, batch)
        return loss * float("nan") if calls["n"] > 8 else loss

    kw = {} if method == "diag-fisher" else {"recompute": 2}
    if method == "diag-fisher":
        calls["n"] = 5
    with pytest.raises(ValueError, match="non-finite loss"):
        mp.oneshot(model, 0.8, method, data=digits[2], loss_fn=nan_later, num_grads=8, **kw)
    assert _unchanged(model, before)
    assert model.training
