"""MFACSGD refuses bad input without changing anything: tampered checkpoints (property
tests), options out of range at construction and at step time, windows that cannot fit, and
gradients whose products overflow float32."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from optim_common import assert_state_equal
from optim_common import data as _data
from optim_common import delete_field as _delete
from optim_common import model as _model
from optim_common import nan_first as _nan
from optim_common import set_field as _set
from optim_common import train as _train
from torch import nn

import mfac
from mfac.operators import SlidingInverseFisher, TopKSlidingInverseFisher, tiled
from mfac.operators.memory import gram_nbytes
from mfac.optim import MFACSGD

NGRADS = 4


def _make(layout: str) -> tuple[nn.Module, MFACSGD]:
    model = _model()
    kw = {"layout": "topk", "topk": 0.3} if layout == "topk" else {}
    opt = MFACSGD(model.parameters(), lr=1e-2, ngrads=NGRADS, damp=1e-4, momentum=0.9, **kw)
    opt.set_masks({model[0].weight: model[0].weight.abs() > 0.1})
    return model, opt


def _saved(layout: str) -> dict:
    model, opt = _make(layout)
    _train(model, opt, 2 * NGRADS + 1)  # wraps around, ends mid-ring
    return copy.deepcopy(opt.state_dict())


SAVED = {h: _saved(h) for h in ("dense", "topk")}


def _fresh_loaded(layout: str) -> MFACSGD:
    """An optimizer that already holds a (different) trained state: a refusal must keep it."""
    model, opt = _make(layout)
    _train(model, opt, 3)
    return opt


def _window_key(sd: dict) -> dict:
    return sd["state"][0]["window"]


# Each corruption: name -> (edit of the saved state, expected word in the error).
W = ("state", 0, "window")
CORRUPTIONS = {
    "lr nan": (_set(("param_groups", 0, "lr"), math.nan), "lr"),
    "lr negative": (_set(("param_groups", 0, "lr"), -0.1), "lr"),
    "lr string": (_set(("param_groups", 0, "lr"), "fast"), "lr"),
    "momentum one": (_set(("param_groups", 0, "momentum"), 1.0), "momentum"),
    "weight_decay inf": (_set(("param_groups", 0, "weight_decay"), math.inf), "weight_decay"),
    "lr missing": (_delete(("param_groups", 0, "lr")), "missing the field param_groups[0]['lr']"),
    "too many groups": (
        lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])),
        "param_groups",
    ),
    "momentum nan": (_set(("state", 1, "momentum_buffer"), _nan), "momentum_buffer"),
    "momentum shape": (
        _set(("state", 1, "momentum_buffer"), lambda t: t[:-1].clone()),
        "momentum_buffer",
    ),
    "momentum dtype": (
        _set(("state", 1, "momentum_buffer"), lambda t: t.double()),
        "momentum_buffer",
    ),
    "mask shape": (_set(("state", 0, "mask"), lambda t: t[:-1].clone()), "mask"),
    "mask dtype": (_set(("state", 0, "mask"), lambda t: t.float()), "mask"),
    "step negative": (_set(("state", 0, "step"), -1), "step"),
    "unknown field": (_set(("state", 1, "exp_avg"), torch.zeros(1)), "exp_avg"),
    "window on another parameter": (_set(("state", 1, "window"), {}), "unexpected field 'window'"),
    "step on another parameter": (_set(("state", 1, "step"), 3), "unexpected field 'step'"),
    "unknown parameter id": (_set(("state", 99), {}), "state[99]"),
    "scaling without one": (
        _set(("state", 0, "gradient_scaling"), {"calls": 1}), "gradient_scaling"
    ),
    "window missing": (_delete(W), "missing the field state[0]['window']"),
    "next_slot out of range": (_set((*W, "next_slot"), NGRADS), "next_slot"),
    "next_slot negative": (_set((*W, "next_slot"), -1), "next_slot"),
    "next_slot inconsistent": (_set((*W, "next_slot"), lambda v: (v + 1) % NGRADS), "next_slot"),
    "num_pushed float": (_set((*W, "num_pushed"), lambda v: float(v)), "num_pushed"),
    "since_refactor out of range": (_set((*W, "since_refactor"), NGRADS), "since_refactor"),
    "damp changed": (_set((*W, "damp"), lambda v: 2 * v), "damp"),
    "damp nan": (_set((*W, "damp"), math.nan), "damp"),
    "gram nan": (_set((*W, "gram"), _nan), "gram"),
    "gram shape": (_set((*W, "gram"), lambda t: t[:-1, :-1].clone()), "gram"),
    "gram dtype": (_set((*W, "gram"), lambda t: t.float()), "gram"),
    "gram missing": (_delete((*W, "gram")), "missing the field 'gram'"),
    "inverse edited": (_set((*W, "inverse"), lambda t: t * 1.01), "inverse"),
    "inverse missing": (_delete((*W, "inverse")), "missing the field 'inverse'"),
}
DENSE_ONLY = {
    "grads nan": (_set((*W, "grads"), _nan), "grads"),
    "grads shape": (_set((*W, "grads"), lambda t: t[:, :-1].clone()), "grads"),
    "grads dtype": (_set((*W, "grads"), lambda t: t.bfloat16()), "grads"),
    "grads edited (stale K)": (_set((*W, "grads"), lambda t: t * 1.5), "stale"),
}
TOPK_ONLY = {
    "values nan": (_set((*W, "values"), _nan), "values"),
    "values edited (stale K)": (_set((*W, "values"), lambda t: t * 1.5), "stale"),
    "indices out of range": (_set((*W, "indices"), lambda t: t + 10_000), "indices"),
    "indices dtype": (_set((*W, "indices"), lambda t: t.long()), "indices"),
    "error nan": (_set((*W, "error"), _nan), "error"),
    "error shape": (_set((*W, "error"), lambda t: t[:-1].clone()), "error"),
}
CASES = [("dense", c) for c in [*CORRUPTIONS, *DENSE_ONLY]] + [
    ("topk", c) for c in [*CORRUPTIONS, *TOPK_ONLY]
]


def _corruption(name: str):
    return {**CORRUPTIONS, **DENSE_ONLY, **TOPK_ONLY}[name]


def test_saved_states_load_and_resume() -> None:
    for layout in SAVED:
        opt = _fresh_loaded(layout)
        given_state = copy.deepcopy(SAVED[layout])
        opt.load_state_dict(given_state)
        assert_state_equal(opt.state_dict(), SAVED[layout])
        assert_state_equal(given_state, SAVED[layout])  # the caller's dict is not modified


def _tensors(tree: object) -> list[torch.Tensor]:
    """Every tensor in a (nested) state."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    items = tree.values() if isinstance(tree, dict) else tree
    if isinstance(items, (list, tuple, type({}.values()))):
        return [t for item in items for t in _tensors(item)]
    return []


@pytest.mark.parametrize("rule", ["MFACSGD-dense", "MFACSGD-topk", "MFAC-topk"])
def test_a_resume_adopts_the_loaded_window_and_moments(rule: str, tmp_path) -> None:
    """A plain ``torch.load`` resume of a full window holds one copy of it: the window's rows
    (and a top-k window's error vector) and the moments / momentum are the loaded tensors, not
    copies, and a refused load adopts and changes nothing; a state mapped from its file
    (``mmap=True``) is copied. All three optimizers then continue bit for bit."""
    name, layout = rule.split("-")

    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        if name == "MFACSGD":
            return _make(layout)
        model = _model()
        return model, mfac.MFAC(
            model.parameters(), lr=1e-3, ngrads=NGRADS, window_scope="model",
            layout="topk", topk=0.3,
        )  # fmt: skip

    model, opt = make()
    _train(model, opt, 2 * NGRADS + 1)
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    runs = [(model, opt)]
    for mmap in (False, True):
        resumed_model, resumed = make()
        resumed_model.load_state_dict(model.state_dict())
        state = torch.load(path, weights_only=True, mmap=mmap)
        # a refusal (the last moment tampered with) adopts nothing and changes nothing
        before, kept = copy.deepcopy(resumed.state_dict()), copy.deepcopy(state)
        last = [e for e in state["state"].values() if "window" not in e][-1]
        key = next(k for k in last if k != "mask")
        good = last[key]
        last[key] = _nan(good)
        with pytest.raises(ValueError, match="NaN"):
            resumed.load_state_dict(state)
        assert_state_equal(resumed.state_dict(), before)
        last[key] = good
        assert_state_equal(state, kept)
        resumed.load_state_dict(state)
        live = {t.data_ptr() for t in _tensors(resumed.state) if t.numel()}
        for w in resumed.windows:
            live |= {t.data_ptr() for t in vars(w).values() if isinstance(t, torch.Tensor)}
        window = next(e["window"] for e in state["state"].values() if "window" in e)
        rows = window["grads"] if "grads" in window else window["values"]
        moments = [
            t for e in state["state"].values() for k, t in e.items()
            if k not in ("window", "mask", "step")
        ]  # fmt: skip
        assert moments
        shared = [t.data_ptr() in live for t in (rows, *moments)]
        assert shared == [not mmap] * len(shared), (rule, mmap)
        runs.append((resumed_model, resumed))
    for step_model, step_opt in runs:
        _train(step_model, step_opt, 3, start=2 * NGRADS + 1)
    for other_model, other in runs[1:]:
        assert_state_equal(other.state_dict(), opt.state_dict())
        for a, b in zip(other_model.parameters(), model.parameters(), strict=True):
            assert torch.equal(a, b)


def _check_refused(layout: str, name: str) -> None:
    corrupt, word = _corruption(name)
    opt = _fresh_loaded(layout)
    before = copy.deepcopy(opt.state_dict())
    tampered = copy.deepcopy(SAVED[layout])
    corrupt(tampered)
    kept = copy.deepcopy(tampered)
    with pytest.raises((ValueError, TypeError, KeyError)) as info:
        opt.load_state_dict(tampered)
    assert word in str(info.value), (name, str(info.value))
    assert_state_equal(opt.state_dict(), before)  # window, momentum, masks, lr: bit for bit
    assert_state_equal(tampered, kept)


@pytest.mark.parametrize(("layout", "name"), CASES)
def test_every_tampered_field_is_refused(layout: str, name: str) -> None:
    _check_refused(layout, name)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(CASES), extra=st.sampled_from(sorted(CORRUPTIONS)))
def test_tampered_state_is_refused_and_nothing_changes(case: tuple[str, str], extra: str) -> None:
    """Two corruptions at once: still refused, one error, nothing changed."""
    layout, name = case
    corrupt, _ = _corruption(name)
    second, _ = _corruption(extra)
    opt = _fresh_loaded(layout)
    before = copy.deepcopy(opt.state_dict())
    tampered = copy.deepcopy(SAVED[layout])
    corrupt(tampered)
    try:
        second(tampered)
    except (KeyError, IndexError, TypeError):  # the first corruption removed its target
        pass
    try:  # two edits can cancel (next_slot m, then +1 mod m): a valid state is not tampered
        assert_state_equal(tampered, SAVED[layout])
    except AssertionError:
        pass
    else:
        assume(False)
    with pytest.raises((ValueError, TypeError, KeyError)):
        opt.load_state_dict(tampered)
    assert_state_equal(opt.state_dict(), before)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=st.sampled_from(["dense", "topk"]),
    row=st.integers(0, NGRADS - 1),
    factor=st.floats(1.01, 100.0),
)
def test_any_edited_window_row_is_stale(layout: str, row: int, factor: float) -> None:
    """Scaling any stored row (by 1 %% or more) leaves K stale, and the load is refused."""
    opt = _fresh_loaded(layout)
    before = copy.deepcopy(opt.state_dict())
    tampered = copy.deepcopy(SAVED[layout])
    window = _window_key(tampered)
    if layout == "dense":
        window["grads"][row] *= factor
    elif "block_of" in window:  # the tile-major layout: a stretch of slot row's group
        rows = tiled.state_shape(window)[1]
        g, j = divmod(row, rows)
        window["values"][int(window["block_of"][g]) * rows + j] *= factor
    else:
        window["values"][row] *= factor
    with pytest.raises(ValueError, match="stale"):
        opt.load_state_dict(tampered)
    assert_state_equal(opt.state_dict(), before)


# ---------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("key", "value"),
    [("lr", math.nan), ("lr", -1.0), ("momentum", 1.0), ("momentum", -0.1),
     ("weight_decay", math.inf), ("lr", "0.1")],
)  # fmt: skip
def test_options_changed_between_steps_are_checked_before_the_step(key: str, value) -> None:
    model, opt = _make("dense")
    _train(model, opt, 3)
    before = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0][key] = value
    opt.zero_grad()
    x, y = _data()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises((ValueError, TypeError), match=rf"param_groups\[0\]\['{key}'\]"):
        opt.step()
    after = opt.state_dict()
    after["param_groups"][0][key] = before["param_groups"][0][key]
    assert_state_equal(after, before)
    for p, p0 in zip(model.parameters(), params, strict=True):
        assert torch.equal(p.detach(), p0)


@pytest.mark.parametrize(
    ("group", "match"),
    [({"lr": math.nan}, "lr"), ({"momentum": 1.5}, "momentum"),
     ({"weight_decay": -1.0}, "weight_decay")],
)  # fmt: skip
def test_add_param_group_refusal_changes_nothing(group: dict, match: str) -> None:
    model, opt = _make("dense")
    _train(model, opt, 3)
    before = copy.deepcopy(opt.state_dict())
    extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [extra], **group})
    assert len(opt.param_groups) == 1
    assert_state_equal(opt.state_dict(), before)


def test_add_param_group_over_budget_changes_nothing() -> None:
    p = nn.Parameter(torch.zeros(10))
    opt = MFACSGD([p], lr=0.1, ngrads=4, memory_budget=200_000)
    p.grad = torch.ones(10)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(MemoryError, match="memory budget"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(100_000))]})
    assert len(opt.param_groups) == 1 and opt.dim == 10
    assert_state_equal(opt.state_dict(), before)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": math.nan}, ValueError, "lr"),
        ({"lr": math.inf}, ValueError, "lr"),
        ({"lr": True}, TypeError, "lr"),
        ({"damp": math.nan}, ValueError, "damp"),
        ({"damp": math.inf}, ValueError, "damp"),
        ({"momentum": math.nan}, ValueError, "momentum"),
        ({"ngrads": -3}, ValueError, "ngrads"),
        ({"ngrads": True}, TypeError, "ngrads"),
        ({"layout": "topk", "topk": math.nan}, ValueError, "density"),
        ({"layout": "topk", "topk": 0.0}, ValueError, "density"),
        ({"layout": "topk", "topk": 0}, ValueError, "topk"),
        ({"layout": "topk", "topk": "1%"}, TypeError, "topk"),
        ({"memory_budget": 0}, ValueError, "memory_budget"),
        ({"gradient_scaling": object()}, TypeError, "gradient_scaling"),
    ],
)
def test_bad_options_are_refused(kwargs: dict, error: type, match: str) -> None:
    model = _model()
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=match):
        MFACSGD(model.parameters(), **kwargs)
    for p, p0 in zip(model.parameters(), params, strict=True):
        assert torch.equal(p.detach(), p0)


# ---------------------------------------------------------------------- memory
def test_window_of_many_tiny_gradients_is_refused() -> None:
    """m = 200000, d = 1: the window is 800 kB but K and K^-1 are 2 x 320 GB."""
    with pytest.raises(MemoryError, match=r"needs .* bytes.*available"):
        SlidingInverseFisher(1, 200_000)
    with pytest.raises(MemoryError, match="memory budget"):
        MFACSGD([nn.Parameter(torch.zeros(1))], ngrads=200_000)
    assert gram_nbytes(200_000) == 4 * 200_000**2 * 8


def test_language_model_topk_window_is_refused_up_front() -> None:
    """SmolLM2-135M (134,515,008 parameters), m = 1024, 1 % top-k, on a 23 GB machine (budget:
    half of it): refused before anything is allocated, counting every buffer of the step."""
    d, m = 134_515_008, 1024
    k = round(0.01 * d)
    need = TopKSlidingInverseFisher.required_bytes(d, m, k)
    assert need > m * k * 8 + d * 4 + gram_nbytes(m)  # values, indices, error, m x m ...
    assert need > 11.5e9  # ... and the step's temporaries: more than half of 23 GB
    with pytest.raises(MemoryError, match="top-k window"):
        TopKSlidingInverseFisher(d, m, k, memory_budget=23 * 10**9 // 2)


# ---------------------------------------------------------------------- overflow
def test_float32_overflow_of_products_is_named() -> None:
    op = SlidingInverseFisher(8, 3, 1e-2)
    op.push(torch.full((8,), 1e20))
    before = op.state_dict()
    with pytest.raises(mfac.NonFiniteGradientError, match="overflow") as info:
        op.push(torch.full((8,), 1e20))
    assert "increase damp" not in str(info.value)
    after = op.state_dict()
    for key, value in before.items():
        assert (
            torch.equal(value, after[key])
            if isinstance(value, torch.Tensor)
            else value == after[key]
        )


def test_optimizer_names_overflow_not_nan() -> None:
    p = nn.Parameter(torch.zeros(8))
    opt = MFACSGD([p], lr=0.1, ngrads=3, damp=1e-2)
    p.grad = torch.full((8,), 1e20)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    p0 = p.detach().clone()
    p.grad = torch.full((8,), 1e20)
    with pytest.raises(mfac.NonFiniteGradientError, match="overflow"):
        opt.step()
    assert torch.equal(p.detach(), p0)
    assert_state_equal(opt.state_dict(), before)
