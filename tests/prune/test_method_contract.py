"""The contract every registered pruning method keeps, checked over ``mfac.prune.REGISTRY`` on a
tiny MLP (a method registered later is covered without a new test):

- it reports its sparsity: ``result.masks`` name the pruned layers, the pruned weights are
  exactly the zeros of the weights, and ``layer_sparsity`` / ``sparsity`` count the masks;
- it keeps an N:M pattern (N of every M consecutive weights of a row) or, when it does not take
  one, refuses it naming the method;
- when it fails part-way (a weight write that fails after another layer was written, or a
  ``loss_fn`` that raises on its last call), the model is restored bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import mfac.prune as mp
from mfac.prune.method import Method

METHODS = sorted(mp.REGISTRY)

#: Small settings so each method runs in well under a second; methods not named here run with
#: their defaults.
SMALL: dict[str, dict[str, object]] = {
    "diag-fisher": {"num_grads": 8},
    "mfac": {"num_grads": 8, "block_size": 16, "recompute": 2},
    "mfac-exact": {"num_grads": 8, "block_size": 16},
    "sparsegpt": {"calib_batches": 4},
    "wanda": {"calib_batches": 4},
    "owl-sparsegpt": {"calib_batches": 4},
    "fisher-sparsegpt": {"calib_batches": 4},
    "iobs": {"calib_batches": 4, "iterations": 2, "dense_steps": 2},
}


def _options(method: str) -> dict[str, object]:
    names = {f.name for f in dataclasses.fields(mp.REGISTRY[method].config)}
    quiet = {"progress": False} if "progress" in names else {}
    return {**quiet, **SMALL.get(method, {})}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)
    )


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen))
            for _ in range(8)]  # fmt: skip


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _identical(model: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return state.keys() == snap.keys() and all(
        state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in snap.items()
    )


def _check_reported(model: nn.Module, res: mp.PruneResult) -> None:
    modules = dict(model.named_modules())
    assert set(res.masks) == {"0", "2", "4"}
    pruned = total = 0
    for name, keep in res.masks.items():
        w = modules[name].weight.detach()
        assert keep.dtype == torch.bool and keep.shape == w.shape
        assert torch.equal(w.cpu() == 0, ~keep), name  # the zeros are exactly the pruned weights
        assert res.layer_sparsity[name] == pytest.approx(1.0 - float(keep.float().mean()))
        pruned += int((~keep).sum())
        total += keep.numel()
    assert res.sparsity == pytest.approx(pruned / total)


@pytest.mark.parametrize("method", METHODS)
def test_reports_its_sparsity(method: str) -> None:
    model = _model()
    res = mp.oneshot(model, 0.5, method, data=_data(), loss_fn=_loss, **_options(method))
    assert res.method == method and res.target == 0.5 and res.pattern is None
    _check_reported(model, res)
    assert abs(res.sparsity - 0.5) < 0.05


@pytest.mark.parametrize("method", METHODS)
def test_keeps_an_nm_pattern_or_refuses_it(method: str) -> None:
    model = _model()
    before = _snapshot(model)
    call = {"data": _data(), "loss_fn": _loss, "pattern": "2:4", **_options(method)}
    if not mp.REGISTRY[method].patterns:
        with pytest.raises(ValueError, match=f"'{method}'"):
            mp.oneshot(model, None, method, **call)
        assert _identical(model, before)
        return
    res = mp.oneshot(model, None, method, **call)
    assert res.pattern == (2, 4)
    _check_reported(model, res)
    for name, keep in res.masks.items():
        groups = keep.reshape(keep.shape[0], -1).reshape(-1, 4)
        assert bool((groups.sum(1) == 2).all()), name


def test_a_method_without_patterns_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal path of the test above, with a method that takes no pattern."""
    base = mp.REGISTRY["magnitude"]
    plain = Method("plain", base.config, base.run, "no N:M", needs_data=False, patterns=False)
    monkeypatch.setitem(mp.REGISTRY, "plain", plain)
    model = _model()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="'plain' does not take an N:M pattern"):
        mp.oneshot(model, None, "plain", pattern="2:4")
    assert _identical(model, before)
    assert mp.oneshot(model, 0.5, "plain").sparsity == pytest.approx(0.5, abs=0.01)


class _FailSecondWrite(TorchFunctionMode):
    """Raises on an in-place write to a parameter once another parameter has changed value
    (once; later writes, the restore among them, pass)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__()
        self.initial = {id(p): (p, p.detach().clone()) for p in params}
        self.fired = False

    def _changed(self, other_than: int) -> bool:
        return any(
            i != other_than and not torch.equal(p.detach(), v)
            for i, (p, v) in self.initial.items()
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if not self.fired and name.endswith("_") and name != "requires_grad_" and args:
            first = args[0]
            for t in first if isinstance(first, (list, tuple)) else [first]:
                if id(t) in self.initial and self._changed(id(t)):
                    self.fired = True
                    raise RuntimeError("injected failure while writing a second layer")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", METHODS)
def test_restores_the_model_when_a_write_fails_part_way(method: str) -> None:
    model = _model()
    before = _snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    params = [m.weight for m in model if isinstance(m, nn.Linear)]
    mode = _FailSecondWrite(params)
    with mode, pytest.raises(RuntimeError, match="injected"):
        mp.oneshot(model, 0.5, method, data=_data(), loss_fn=_loss, **_options(method))
    assert mode.fired  # a layer had changed before the failure
    assert _identical(model, before)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize("method", [m for m in METHODS if mp.REGISTRY[m].needs_data])
def test_restores_the_model_when_the_loss_fails_on_its_last_call(method: str) -> None:
    calls = 0

    def counting(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return _loss(model, batch)

    mp.oneshot(_model(), 0.5, method, data=_data(), loss_fn=counting, **_options(method))
    last, seen = calls, 0

    def failing(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        nonlocal seen
        seen += 1
        if seen == last:
            raise RuntimeError("loss failed")
        return _loss(model, batch)

    model = _model()
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="loss failed"):
        mp.oneshot(model, 0.5, method, data=_data(), loss_fn=failing, **_options(method))
    assert _identical(model, before)
    assert model.training


@pytest.mark.parametrize("method", [m for m in METHODS if mp.REGISTRY[m].needs_data])
def test_refuses_bad_data_leaving_the_model_as_it_was(method: str) -> None:
    """Batches that do not fit the model (wrong width) fail inside the first forward."""
    model = _model()
    before = _snapshot(model)
    bad = [(x[:, :5], y) for x, y in _data()]
    with pytest.raises(RuntimeError):
        mp.oneshot(model, 0.5, method, data=bad, loss_fn=_loss, **_options(method))
    assert _identical(model, before)


def test_the_suite_covers_every_registered_method() -> None:
    assert set(METHODS) == set(mp.REGISTRY) and len(METHODS) >= 9
    assert copy.copy(METHODS) == sorted(mp.METHODS)
