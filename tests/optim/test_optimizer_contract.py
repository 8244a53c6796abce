"""The torch.optim contract, over every optimizer configuration (in the style of torch's
``optim_db``): one table of cases, and each contract test runs over all of them.

Covered: checkpoints through torch.save (bit-identical continuation against an uninterrupted
run), parameter groups with different learning rates, an LR scheduler, torch's step and
state-dict hooks, add_param_group mid-training, refused loads (one error naming the field, the
optimizer bit-identical before and after), non-finite gradients (NonFiniteGradientError,
parameters and state unchanged), zero_grad and gradients that are None, and the closure."""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optim_common import assert_state_equal, data, delete_field, model, snapshot, train
from torch import nn

import mfac
from mfac.optim import MFAC, MFACSGD, WindowOptimizer


@dataclass(frozen=True)
class OptimCase:
    """One optimizer configuration: the class, its arguments, and whether it masks the first
    layer's small weights (MFACSGD's sparse fine-tuning)."""

    name: str
    cls: type[WindowOptimizer]
    kwargs: dict[str, Any] = field(default_factory=dict)
    masks: bool = False

    def make(self, mod: nn.Module, params: Any = None, **overrides: Any) -> WindowOptimizer:
        params = mod.parameters() if params is None else params
        opt = self.cls(params, **{**self.kwargs, **overrides})
        if self.masks:
            opt.set_masks({mod[0].weight: mod[0].weight.abs() > 0.2})
        return opt

    @property
    def tensors(self) -> tuple[str, ...]:
        """The per-parameter tensors this case keeps once it has stepped."""
        if self.cls is MFAC:
            return ("exp_avg", "exp_avg_sq")
        return ("momentum_buffer",) if self.kwargs.get("momentum") else ()


OPTIMS = [
    OptimCase("mfac-dense", MFAC, dict(lr=1e-2, ngrads=4, weight_decay=0.01, share_below=1)),
    OptimCase(
        "mfac-bf16", MFAC, dict(lr=1e-2, ngrads=4, window_dtype=torch.bfloat16, share_below=1)
    ),
    OptimCase(
        "mfac-model-topk",
        MFAC,
        dict(lr=1e-2, ngrads=4, window_scope="model", layout="topk", topk=0.3),
    ),
    OptimCase("sgd-dense", MFACSGD, dict(lr=1e-2, ngrads=4, damp=1e-4)),
    OptimCase("sgd-topk", MFACSGD, dict(lr=1e-2, ngrads=4, damp=1e-4, layout="topk", topk=0.3)),
    OptimCase(
        "sgd-momentum-masks",
        MFACSGD,
        dict(lr=1e-2, ngrads=4, damp=1e-4, momentum=0.9, weight_decay=1e-3),
        masks=True,
    ),
]
BY_NAME = {case.name: case for case in OPTIMS}
optims = pytest.mark.parametrize("case", OPTIMS, ids=[c.name for c in OPTIMS])


def params_of(mod: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in mod.parameters()]


def assert_params_equal(mod: nn.Module, params: list[torch.Tensor]) -> None:
    for p, q in zip(mod.parameters(), params, strict=True):
        assert torch.equal(p.detach(), q)


# ---------------------------------------------------------------------- checkpoints
@optims
def test_state_dict_round_trip_through_torch_save_resumes_bit_identically(case: OptimCase):
    """torch.save to a buffer and back (model and optimizer), into a fresh model (other
    weights, so other masks) and a fresh optimizer: the continuation equals the uninterrupted
    run bit for bit, and so do the final states."""
    ref_model = model()
    ref_opt = case.make(ref_model)
    train(ref_model, ref_opt, 10)

    mod = model()
    opt = case.make(mod)
    train(mod, opt, 6)  # ngrads = 4: the windows have wrapped
    buf = io.BytesIO()
    torch.save({"model": mod.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    mod2 = model(seed=123)
    opt2 = case.make(mod2)
    mod2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.steps == 6
    train(mod2, opt2, 4, start=6)
    assert_params_equal(mod2, params_of(ref_model))
    assert_state_equal(opt2.state_dict(), ref_opt.state_dict())


@optims
def test_state_dict_layout(case: OptimCase):
    """Windows are saved as their own state dicts under the parameters that hold them; the
    step count sits with the first parameter; per-parameter tensors have their shapes."""
    mod = model()
    opt = case.make(mod)
    train(mod, opt, 2)
    sd = opt.state_dict()
    holders = [i for i, entry in sd["state"].items() if "window" in entry]
    assert len(holders) == len(opt.windows)
    assert holders == ([0, 1, 2, 3] if opt.window_scope == "tensor" else [0])
    for i in holders:
        window = sd["state"][i]["window"]
        assert isinstance(window, dict) and {"gram", "next_slot", "num_pushed"} <= window.keys()
        assert window["num_pushed"] == 2
    assert sd["state"][0]["step"] == 2 and opt.steps == 2
    for p, (i, entry) in zip(mod.parameters(), sorted(sd["state"].items()), strict=True):
        for key in case.tensors:
            assert entry[key].shape == p.shape, (i, key)


# ---------------------------------------------------------------------- groups, schedulers
@optims
def test_param_groups_take_their_own_lr(case: OptimCase):
    """Per-group lr: a group at lr 0 does not move; the first step of a group at 2 lr is
    twice that at lr (the direction does not depend on lr), the other group unchanged."""
    mods = [model(), model()]
    lrs = [(1e-2, 0.0), (2e-2, 0.0)]
    opts = []
    for mod, (lr0, lr2) in zip(mods, lrs, strict=True):
        groups = [
            {"params": list(mod[0].parameters()), "lr": lr0},
            {"params": list(mod[2].parameters()), "lr": lr2},
        ]
        opts.append(case.make(mod, groups, weight_decay=0.0))
    before = params_of(mods[0])  # after set_masks zeroed the masked entries
    x, y = data()
    for mod, opt in zip(mods, opts, strict=True):
        opt.zero_grad()
        nn.functional.cross_entropy(mod(x), y).backward()
        opt.step()
    moved = [
        [p.detach() - b for p, b in zip(mod.parameters(), before, strict=True)] for mod in mods
    ]
    for delta in moved:
        assert all(bool((d == 0).all()) for d in delta[2:])  # lr 0: not moved
        assert any(bool((d != 0).any()) for d in delta[:2])
    for d1, d2 in zip(moved[0][:2], moved[1][:2], strict=True):
        torch.testing.assert_close(d2, 2 * d1, rtol=1e-4, atol=1e-7)


@optims
def test_lr_scheduler_drives_the_groups(case: OptimCase):
    """CosineAnnealingLR sets every group's lr at each step; at the end of the cosine the
    lr is 0 and a step leaves the parameters exactly where they are."""
    mod = model()
    groups = [
        {"params": list(mod[0].parameters())},
        {"params": list(mod[2].parameters()), "lr": 5e-3},
    ]
    opt = case.make(mod, groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    base = [g["lr"] for g in opt.param_groups]
    x, y = data()
    for t in range(4):
        want = [b * (1 + math.cos(math.pi * t / 4)) / 2 for b in base]
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(want)
        opt.zero_grad()
        nn.functional.cross_entropy(mod(x), y).backward()
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert all(math.isfinite(float(p.abs().max())) for p in mod.parameters())
    before = params_of(mod)
    opt.zero_grad()
    nn.functional.cross_entropy(mod(x), y).backward()
    opt.step()
    assert_params_equal(mod, before)
    assert opt.steps == 5


# ---------------------------------------------------------------------- hooks
@optims
def test_torch_optimizer_hooks_fire(case: OptimCase):
    """Step pre/post hooks run around every step; the state-dict post hook sees the finished
    dict (windows as dicts) and may add to it; the load pre hook sees the given dict (with its
    state) and its returned dict is the one loaded; the load post hook sees the loaded state."""
    mod = model()
    opt = case.make(mod)
    calls: list[str] = []
    seen: dict[str, Any] = {}

    def sd_post(o, sd):
        calls.append("sd_post")
        seen["window"] = sd["state"][0]["window"]
        sd["note"] = "kept"
        return sd

    def load_pre(o, sd):  # migrates an "old format": the step count under another name
        calls.append("load_pre")
        seen["loaded_state"] = sorted(sd["state"])
        state = {i: dict(entry) for i, entry in sd["state"].items()}
        state[0]["step"] = state[0].pop("old_step")
        groups = [{**g, "lr": 1e-3} for g in sd["param_groups"]]
        return {**sd, "state": state, "param_groups": groups}

    def load_post(o):
        calls.append("load_post")
        seen["steps_after_load"] = o.steps

    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(sd_post)
    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(load_post)
    train(mod, opt, 2)
    assert calls == ["pre", "post", "pre", "post"]
    sd = copy.deepcopy(opt.state_dict())
    assert calls[-2:] == ["sd_pre", "sd_post"] and sd["note"] == "kept"
    assert isinstance(seen["window"], dict)  # the post hook saw the finished state dict
    del sd["note"]
    sd["state"][0]["old_step"] = sd["state"][0].pop("step")
    opt.load_state_dict(sd)
    assert calls[-2:] == ["load_pre", "load_post"]
    assert seen["loaded_state"] == sorted(sd["state"]) and seen["steps_after_load"] == 2
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)  # the pre hook's dict was loaded


# ---------------------------------------------------------------------- add_param_group
@optims
def test_add_param_group_mid_training(case: OptimCase):
    """A group added after some steps is trained from then on; the step count goes on; a
    checkpoint taken after the addition resumes bit-identically."""
    mod = model()
    extra = nn.Linear(3, 2)
    opt = case.make(mod)
    train(mod, opt, 3)
    moments = {id(p): opt.state[p].get(case.tensors[0]) for p in mod.parameters()} if (
        case.tensors
    ) else {}
    opt.add_param_group({"params": list(extra.parameters()), "lr": 5e-3})
    assert len(opt.param_groups) == 2 and opt.steps == 3
    for p in mod.parameters():  # existing parameters keep their tensors
        if moments.get(id(p)) is not None:
            assert opt.state[p][case.tensors[0]] is moments[id(p)]
    x, y = data()

    def run(m: nn.Module, e: nn.Linear, o: WindowOptimizer, steps: range) -> None:
        for t in steps:
            o.zero_grad()
            out = m(x[t * 8 : t * 8 + 8])
            loss = nn.functional.cross_entropy(out, y[t * 8 : t * 8 + 8]) + e(out).square().mean()
            loss.backward()
            o.step()

    before = [p.detach().clone() for p in extra.parameters()]
    run(mod, extra, opt, range(2))
    assert opt.steps == 5
    for p, b in zip(extra.parameters(), before, strict=True):
        assert not torch.equal(p.detach(), b)
    saved = copy.deepcopy((mod.state_dict(), extra.state_dict(), opt.state_dict()))
    run(mod, extra, opt, range(2, 4))
    mod2, extra2 = model(seed=5), nn.Linear(3, 2)
    opt2 = case.make(mod2)  # before the weights load: set_masks zeroes what its masks drop
    opt2.add_param_group({"params": list(extra2.parameters()), "lr": 5e-3})
    mod2.load_state_dict(saved[0])
    extra2.load_state_dict(saved[1])
    opt2.load_state_dict(saved[2])
    run(mod2, extra2, opt2, range(2, 4))
    assert_params_equal(mod2, params_of(mod))
    assert_params_equal(extra2, params_of(extra))


# ---------------------------------------------------------------------- refused loads
def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def _edit(path: tuple, fn: Callable[[Any], Any]) -> Callable[[dict], None]:
    def apply(sd: dict) -> None:
        target = sd
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = fn(target[path[-1]])

    return apply


W = ("state", 0, "window")
#: name -> (edit of a saved state, error type, words the error names)
CORRUPTIONS: dict[str, tuple[Callable[[dict], None], type, str]] = {
    "window gram NaN": (_edit((*W, "gram"), _nan), ValueError, r"state\[0\]\['window'\]: gram"),
    "window gram shape": (
        _edit((*W, "gram"), lambda t: t[:-1, :-1].clone()), ValueError,
        r"state\[0\]\['window'\]: gram has shape",
    ),
    "window gram stale": (
        _edit((*W, "gram"), lambda t: t * 1.5), ValueError, r"state\[0\]\['window'\]: .*gram",
    ),
    "window pointer": (
        _edit((*W, "next_slot"), lambda v: (v + 1) % 4), ValueError, "next_slot",
    ),
    "window missing": (delete_field(W), KeyError, r"state\[0\]\['window'\]"),
    "window damp": (_edit((*W, "damp"), lambda v: 0.5), ValueError, "damp"),
    "group count": (
        lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), ValueError,
        "param_groups",
    ),
    "group params": (
        _edit(("param_groups", 0, "params"), lambda ps: ps[:-1]), ValueError,
        r"param_groups\[0\]\['params'\]",
    ),
    "lr negative": (_edit(("param_groups", 0, "lr"), lambda v: -1.0), ValueError, "lr"),
    "lr missing": (delete_field(("param_groups", 0, "lr")), KeyError, "lr"),
    "step negative": (_edit(("state", 0, "step"), lambda v: -1), ValueError, "step"),
    "unknown parameter": (_edit(("state",), lambda s: {**s, 17: {}}), ValueError, "17"),
    "unexpected field": (_edit(("state", 2), lambda e: {**e, "junk": 1}), ValueError, "junk"),
}
#: the per-parameter tensor edits, for the cases that keep such tensors
TENSOR_EDITS = {
    "shape": (lambda t: t.reshape(-1)[:-1].clone(), ValueError, "has shape"),
    "dtype": (lambda t: t.to(torch.float16), TypeError, "dtype"),
    "NaN": (_nan, ValueError, "NaN"),
}


@pytest.fixture(scope="module")
def trained() -> dict[str, tuple[dict, WindowOptimizer]]:
    """Per case: a saved state (7 steps, wrapped windows) and a target optimizer that holds a
    different trained state (a refused load must leave it bit-identical: it is reused)."""
    out = {}
    for case in OPTIMS:
        mod = model()
        opt = case.make(mod)
        train(mod, opt, 7)
        target_model = model()
        target = case.make(target_model)
        train(target_model, target, 3, start=20)
        out[case.name] = (copy.deepcopy(opt.state_dict()), target)
    return out


def _refused(trained, case: OptimCase, edit: Callable[[dict], None], error: type, words: str):
    saved, target = trained[case.name]
    before = snapshot(target)
    tampered = copy.deepcopy(saved)
    edit(tampered)
    kept = copy.deepcopy(tampered)
    with pytest.raises(error, match=words):
        target.load_state_dict(tampered)
    assert_state_equal(snapshot(target), before)  # windows, tensors, step, lr: bit for bit
    assert_state_equal(tampered, kept)  # the given dict is not written to


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.sampled_from([c.name for c in OPTIMS]),
    corruption=st.sampled_from(list(CORRUPTIONS)),
)
def test_a_refused_load_names_the_field_and_changes_nothing(trained, name: str, corruption: str):
    edit, error, words = CORRUPTIONS[corruption]
    _refused(trained, BY_NAME[name], edit, error, words)


WITH_TENSORS = [c for c in OPTIMS if c.tensors]


@pytest.mark.parametrize("how", list(TENSOR_EDITS))
@pytest.mark.parametrize("case", WITH_TENSORS, ids=[c.name for c in WITH_TENSORS])
def test_a_refused_per_parameter_tensor_changes_nothing(trained, case: OptimCase, how: str):
    fn, error, words = TENSOR_EDITS[how]
    key = case.tensors[-1]
    _refused(trained, case, _edit(("state", 2, key), fn), error, rf"state\[2\]\['{key}'\].*{words}")


@optims
def test_a_valid_load_after_refusals_works(trained, case: OptimCase):
    saved, _ = trained[case.name]
    fresh_model = model()
    opt = case.make(fresh_model)
    opt.load_state_dict(copy.deepcopy(saved))
    assert_state_equal(opt.state_dict(), saved)


# ---------------------------------------------------------------------- bad gradients
@settings(max_examples=10, deadline=None)
@given(
    name=st.sampled_from([c.name for c in OPTIMS]),
    which=st.integers(0, 3),
    entry=st.integers(0, 2),
    bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
)
def test_a_nonfinite_gradient_raises_and_changes_nothing(name: str, which: int, entry: int, bad):
    case = BY_NAME[name]
    mod = model()
    opt = case.make(mod)
    train(mod, opt, 3)
    before, params = snapshot(opt), params_of(mod)
    x, y = data()
    opt.zero_grad()
    nn.functional.cross_entropy(mod(x), y).backward()
    p = list(mod.parameters())[which]
    mask = opt.state[p].get("mask")
    if mask is not None:  # a masked coordinate's gradient is never read: pick a survivor
        entry = int(mask.reshape(-1).nonzero()[entry])
    p.grad.view(-1)[entry] = bad
    with pytest.raises(mfac.NonFiniteGradientError, match=f"#{which}"):
        opt.step()
    assert_params_equal(mod, params)
    assert_state_equal(snapshot(opt), before)
    p.grad.view(-1)[entry] = 0.0  # the same step with a finite gradient then runs
    opt.step()
    assert opt.steps == 4


@optims
def test_zero_grad_and_missing_gradients(case: OptimCase):
    """After zero_grad() (gradients None) a step does nothing; a parameter whose gradient is
    None is not moved while the others are; zero gradients (set_to_none=False) give a finite
    step."""
    mod = model()
    opt = case.make(mod)
    train(mod, opt, 3)
    opt.zero_grad()
    assert all(p.grad is None for p in mod.parameters())
    before, params = snapshot(opt), params_of(mod)
    assert opt.step() is None
    assert_params_equal(mod, params)
    assert_state_equal(snapshot(opt), before)
    x, y = data()
    nn.functional.cross_entropy(mod(x), y).backward()
    mod[2].bias.grad = None
    opt.step()
    assert torch.equal(mod[2].bias.detach(), params[3]) and opt.steps == 4
    assert not torch.equal(mod[2].weight.detach(), params[2])
    nn.functional.cross_entropy(mod(x), y).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in mod.parameters())
    opt.step()
    assert opt.steps == 5 and all(bool(torch.isfinite(p).all()) for p in mod.parameters())


@optims
def test_step_with_closure_returns_the_loss(case: OptimCase):
    mod = model()
    opt = case.make(mod)
    x, y = data()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(mod(x), y)
        loss.backward()
        return loss

    first = float(opt.step(closure))
    for _ in range(5):
        last = float(opt.step(closure))
    assert opt.steps == 6 and math.isfinite(last) and last < first
