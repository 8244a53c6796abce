"""MFACSGD (the paper's step) against dense float64 oracles: steps, groups, weight decay,
masks, top-k windows, the gradient-scaling extension point and its checkpoints."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from optim_common import F64, assert_state_equal, flat, vec_param
from optim_common import data as _data
from optim_common import model as _model
from optim_common import train as _train
from torch import nn
from torch.nn.utils import prune

import mfac
from mfac.operators import TopKSlidingInverseFisher
from mfac.optim import MFACSGD

from oracle import dense_inverse_fisher

_flat, _vec_param = flat, vec_param


# ---------------------------------------------------------------------- maths
def test_first_step_is_normalised_gradient() -> None:
    p = _vec_param()
    opt = MFACSGD([p], lr=0.1, ngrads=4, damp=1e-3, window_dtype=F64)
    g = torch.randn(10, dtype=F64)
    before = p.detach().clone()
    p.grad = g.clone()
    opt.step()
    expected = before - 0.1 * 4 * g / (4 * 1e-3 + g.dot(g))
    torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.0, 0.7])
def test_steps_match_dense_oracle(momentum: float) -> None:
    """Every step equals lr * (momentum-averaged) F^-1 g with F over the window, float64."""
    d, m, damp, lr = 12, 5, 1e-2, 0.05
    p = _vec_param(d)
    opt = MFACSGD([p], lr=lr, ngrads=m, damp=damp, momentum=momentum, window_dtype=F64)
    window = torch.zeros(m, d, dtype=F64)
    v = torch.zeros(d, dtype=F64)
    gen = torch.Generator().manual_seed(3)
    for t in range(9):  # wraps around the ring
        g = torch.randn(d, dtype=F64, generator=gen)
        window[t % m] = g
        s = dense_inverse_fisher(window, damp) @ g
        v = momentum * v + s
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), before - lr * v, rtol=1e-8, atol=1e-10)


def test_param_groups_lr_and_coupled_weight_decay() -> None:
    """Two groups share one preconditioner; each gets its own lr; coupled wd enters F^-1."""
    a, b = _vec_param(4, 1), _vec_param(6, 2)
    damp, m = 1e-2, 3
    opt = MFACSGD(
        [{"params": [a], "lr": 0.1, "weight_decay": 0.5}, {"params": [b], "lr": 0.01}],
        ngrads=m,
        damp=damp,
        window_dtype=F64,
    )
    window = torch.zeros(m, 10, dtype=F64)
    gen = torch.Generator().manual_seed(5)
    for t in range(4):
        g = torch.randn(10, dtype=F64, generator=gen)
        x0 = torch.cat([a.detach(), b.detach()])
        eff = g.clone()
        eff[:4] += 0.5 * x0[:4]
        window[t % m] = eff
        s = dense_inverse_fisher(window, damp) @ eff
        a.grad, b.grad = g[:4].clone(), g[4:].clone()
        opt.step()
        torch.testing.assert_close(a.detach(), x0[:4] - 0.1 * s[:4], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(b.detach(), x0[4:] - 0.01 * s[4:], rtol=1e-8, atol=1e-10)


def test_decoupled_weight_decay() -> None:
    p = _vec_param(8)
    opt = MFACSGD(
        [p],
        lr=0.1,
        ngrads=2,
        damp=1e-2,
        weight_decay=0.3,
        decoupled_weight_decay=True,
        window_dtype=F64,
    )
    g = torch.randn(8, dtype=F64)
    x0 = p.detach().clone()
    p.grad = g.clone()
    opt.step()
    s = 2 * g / (2 * 1e-2 + g.dot(g))
    torch.testing.assert_close(p.detach(), x0 * (1 - 0.1 * 0.3) - 0.1 * s, rtol=1e-10, atol=1e-12)


def test_grad_none_enters_as_zero_and_is_not_updated() -> None:
    a, b = _vec_param(4, 1), _vec_param(5, 2)
    opt = MFACSGD([a, b], lr=0.1, ngrads=3, damp=1e-2, momentum=0.5, weight_decay=0.1)
    b0 = b.detach().clone()
    a.grad = torch.randn(4, dtype=F64)
    opt.step()
    assert torch.equal(b.detach(), b0)
    row = opt.window.grads[0]
    assert torch.equal(row[4:], torch.zeros(5, dtype=row.dtype))
    buf_a = opt.state[a]["momentum_buffer"]
    assert buf_a.shape == a.shape and bool(buf_a.ne(0).any())
    assert "momentum_buffer" not in opt.state[b]  # b had no gradient: no momentum either
    # no gradients at all: nothing happens
    a.grad = None
    state = copy.deepcopy(opt.state_dict())
    a0 = a.detach().clone()
    opt.step()
    assert torch.equal(a.detach(), a0) and opt.window.num_pushed == 1
    assert_state_equal(opt.state_dict(), state)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("layout", ["dense", "topk"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_leaves_everything_unchanged(layout: str, bad: float) -> None:
    model = _model()
    kw = {"topk": 0.3} if layout == "topk" else {}
    opt = MFACSGD(model.parameters(), lr=1e-2, ngrads=4, momentum=0.9, layout=layout, **kw)
    _train(model, opt, 3)
    state = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    x, y = _data()
    nn.functional.cross_entropy(model(x), y).backward()
    model[2].weight.grad[1, 2] = bad
    with pytest.raises(mfac.NonFiniteGradientError, match=r"parameter #2 .*NaN or Inf"):
        opt.step()
    assert_state_equal(state, opt.state_dict())
    for p, p0 in zip(model.parameters(), params, strict=True):
        assert torch.equal(p.detach(), p0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": -1e-3}, ValueError, "lr"),
        ({"damp": 0.0}, ValueError, "damp"),
        ({"damp": -1.0}, ValueError, "damp"),
        ({"ngrads": 0}, ValueError, "ngrads"),
        ({"ngrads": 2.5}, TypeError, "ngrads"),
        ({"momentum": 1.0}, ValueError, "momentum"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay"),
        ({"layout": "lowrank"}, ValueError, "layout"),
        ({"layout": "topk"}, ValueError, "layout='topk' needs topk"),
        ({"layout": "topk", "topk": 1.5}, ValueError, "density"),
        ({"topk": 10}, ValueError, "topk"),
        ({"window_dtype": torch.int8}, ValueError, "window_dtype"),
        ({"ngrads": 1024, "memory_budget": 10_000}, MemoryError, "memory budget"),
        ({"layout": "topk", "topk": 5, "memory_budget": 100}, MemoryError, "memory budget"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        MFACSGD(_model().parameters(), **kwargs)


# ---------------------------------------------------------------------- masks
def test_explicit_masks_keep_zeros_and_precondition_survivors() -> None:
    p = _vec_param(10)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1, 1, 1], dtype=torch.bool)
    opt = MFACSGD([p], lr=0.1, ngrads=3, damp=1e-2, window_dtype=F64, weight_decay=0.2)
    opt.set_masks({p: mask})
    assert opt.dim == int(mask.sum()) and opt.window.dim == 7
    assert torch.equal(p.detach()[~mask], torch.zeros(3, dtype=F64))
    window = torch.zeros(3, 7, dtype=F64)
    gen = torch.Generator().manual_seed(7)
    for t in range(5):
        g = torch.randn(10, dtype=F64, generator=gen)
        x0 = p.detach().clone()
        eff = g[mask] + 0.2 * x0[mask]
        window[t % 3] = eff
        s = dense_inverse_fisher(window, 1e-2) @ eff
        p.grad = g
        opt.step()
        assert torch.equal(p.detach()[~mask], torch.zeros(3, dtype=F64))
        torch.testing.assert_close(p.detach()[mask], x0[mask] - 0.1 * s, rtol=1e-8, atol=1e-10)


def test_mask_attribute_is_picked_up() -> None:
    p = _vec_param(6)
    p.mask = torch.tensor([1, 1, 0, 1, 0, 1])
    opt = MFACSGD([p], lr=0.1, ngrads=2)
    assert opt.dim == 4
    p.grad = torch.ones(6, dtype=F64)
    opt.step()
    assert p[2].item() == 0.0 and p[4].item() == 0.0


def test_torch_prune_module_masks() -> None:
    model = _model()
    prune.l1_unstructured(model[0], "weight", amount=0.6)
    prune.random_unstructured(model[2], "weight", amount=0.5)
    opt = MFACSGD(model.parameters(), lr=1e-2, ngrads=8, momentum=0.9, weight_decay=1e-3)
    opt.set_masks(model)
    survivors = sum(int(model[i].weight_mask.sum()) for i in (0, 2)) + 8 + 3
    assert opt.dim == survivors
    _train(model, opt, 12)
    for i in (0, 2):
        pruned = model[i].weight_mask == 0
        assert torch.equal(model[i].weight[pruned], torch.zeros(int(pruned.sum())))
        assert torch.equal(model[i].weight_orig[pruned], torch.zeros(int(pruned.sum())))
    with pytest.raises(ValueError, match="does not hold"):
        opt.set_masks({nn.Parameter(torch.zeros(2)): torch.ones(2)})


# ---------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize(
    "kwargs",
    [
        {"momentum": 0.9, "weight_decay": 1e-3},
        {"layout": "topk", "topk": 0.2, "momentum": 0.5},
        {"decoupled_weight_decay": True, "weight_decay": 0.1, "masked": True},
    ],
)
def test_resume_is_bit_identical(kwargs: dict) -> None:
    kwargs = dict(kwargs)
    masked = kwargs.pop("masked", False)

    def make() -> tuple[nn.Module, MFACSGD]:
        model = _model()
        opt = MFACSGD(model.parameters(), lr=1e-2, ngrads=6, damp=1e-4, **kwargs)
        if masked:
            opt.set_masks({model[0].weight: model[0].weight.abs() > 0.2})
        return model, opt

    ref_model, ref_opt = make()
    _train(ref_model, ref_opt, 20)

    model, opt = make()
    _train(model, opt, 10)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model2, opt2 = _model(seed=123), None
    model2.load_state_dict(ckpt["model"])
    opt2 = MFACSGD(model2.parameters(), lr=1e-2, ngrads=6, damp=1e-4, **kwargs)
    opt2.load_state_dict(ckpt["opt"])
    _train(model2, opt2, 10, start=10)
    for p, q in zip(ref_model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kwargs", [{}, {"layout": "topk", "topk": 0.3}], ids=["dense", "topk"])
def test_state_dict_holds_the_window_without_a_copy(kwargs: dict) -> None:
    """A checkpoint must not double the largest buffer: once the window is full, state_dict()
    hands out the window (and the top-k error vector) by reference, as torch.optim hands out
    its moments, and a torch.save of it still resumes exactly (test_resume_is_bit_identical).
    While it fills, it saves copies of the filled rows only (the error vector by reference)."""
    model = _model()
    opt = MFACSGD(model.parameters(), lr=1e-2, ngrads=6, damp=1e-4, **kwargs)
    _train(model, opt, 3)
    window = opt.window
    assert window is opt.state[model[0].weight]["window"]
    saved = opt.state_dict()["state"][0]["window"]
    rows = ("values", "indices") if kwargs else ("grads",)
    for name in rows:
        assert saved[name].shape[0] == 3, name
    if kwargs:
        assert saved["error"].data_ptr() == window.error.data_ptr()
    _train(model, opt, 3)
    saved = opt.state_dict()["state"][0]["window"]
    names = ("values", "indices", "error") if kwargs else ("grads",)
    for name in names:
        assert saved[name].data_ptr() == getattr(window, name).data_ptr(), name


# ---------------------------------------------------------------------- torch.optim contract
def test_lr_scheduler_and_closure() -> None:
    p = _vec_param(5)
    opt = MFACSGD([p], lr=1.0, ngrads=1, damp=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    g = torch.ones(5, dtype=F64)
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        p.grad = g.clone()
        return torch.tensor(3.0)

    deltas = []
    for _ in range(3):
        x0 = p.detach().clone()
        assert opt.step(closure).item() == 3.0
        sched.step()
        deltas.append((x0 - p.detach())[0].item())
    # window of 1 holding g each time: the step is the same, lr halves
    assert len(calls) == 3
    assert deltas[1] == pytest.approx(deltas[0] / 2) and deltas[2] == pytest.approx(deltas[0] / 4)
    opt.zero_grad()
    assert p.grad is None


def test_trains_mlp() -> None:
    model = _model()
    x, _ = _data(128)
    y = (x[:, :3] * torch.tensor([1.0, -2.0, 0.5])).argmax(1)  # a learnable rule
    opt = MFACSGD(model.parameters(), lr=3e-3, ngrads=16, damp=1e-4)
    first = nn.functional.cross_entropy(model(x), y).item()
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert nn.functional.cross_entropy(model(x), y).item() < 0.5 * first


# ---------------------------------------------------------------------- top-k history
def test_topk_full_density_equals_dense() -> None:
    model_a, model_b = _model(), _model()
    opt_a = MFACSGD(model_a.parameters(), lr=1e-2, ngrads=4, damp=1e-4)
    opt_b = MFACSGD(model_b.parameters(), lr=1e-2, ngrads=4, damp=1e-4, layout="topk", topk=1.0)
    _train(model_a, opt_a, 8)
    _train(model_b, opt_b, 8)
    torch.testing.assert_close(_flat(model_a.parameters()), _flat(model_b.parameters()))


@settings(max_examples=15, deadline=None)
@given(k=st.integers(1, 9), seed=st.integers(0, 10_000))
def test_topk_error_feedback_and_oracle(k: int, seed: int) -> None:
    """c + e_new = e_old + g, c has k entries, and the step is F^-1 c over the dense rows."""
    d, m, damp = 9, 3, 1e-2
    op = TopKSlidingInverseFisher(d, m, k, damp, dtype=F64)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(4):
        g = torch.randn(d, generator=gen)
        e_old = op.error.clone()
        slot = op.factor.next_slot
        step = op.push_ihvp(g)
        c = op.dense_rows()[slot]
        assert int((c != 0).sum()) <= k
        torch.testing.assert_close(c.float() + op.error, e_old + g)
        want = dense_inverse_fisher(op.dense_rows().to(F64), damp) @ c.to(F64)
        torch.testing.assert_close(step.to(F64), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("d", "per_entry"), [(10_000, 6), (40_000, 8)])
def test_topk_memory_ratio(d: int, per_entry: int) -> None:
    """1 % density: a 4-byte value + a 2-byte (d < 32768) or 4-byte index per kept entry; the
    C path's layout adds its spare group (one in m / rows) and the run offsets."""
    dense = mfac.SlidingInverseFisher(d, 16)
    sparse = TopKSlidingInverseFisher(d, 16, d // 100)
    ratio = sparse.window_nbytes / (dense.grads.numel() * dense.grads.element_size())
    entries = 0.01 * per_entry / 4
    if sparse.native:
        groups, rows = sparse.rows.groups, sparse.rows.rows
        offsets = sparse.rows.starts.numel() * 4 / (dense.grads.numel() * 4)
        assert ratio == pytest.approx(entries * (groups + 1) * rows / 16 + offsets)
    else:
        assert ratio == pytest.approx(entries)


def test_add_param_group_and_mismatched_state() -> None:
    a, b = _vec_param(4, 1), _vec_param(3, 2)
    opt = MFACSGD([a], lr=0.1, ngrads=2)
    a.grad = torch.ones(4, dtype=F64)
    opt.step()
    state = opt.state_dict()
    opt.add_param_group({"params": [b], "lr": 0.01})
    assert opt.dim == 7 and opt.window.num_pushed == 0
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [_vec_param(2)], "lr": -1.0})
    other = MFACSGD([_vec_param(5)], lr=0.1, ngrads=2)
    with pytest.raises(ValueError):
        other.load_state_dict(state)
    assert opt.state_nbytes >= opt.window.nbytes


def test_topk_low_precision_values() -> None:
    """bfloat16 values: K is built from the stored (rounded) rows, so F^-1 c stays exact."""
    d, m, damp = 12, 3, 1e-2
    op = TopKSlidingInverseFisher(d, m, 4, damp, dtype=torch.bfloat16)
    assert op.values.dtype == torch.bfloat16 and op.indices.dtype == torch.int16
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        slot = op.factor.next_slot
        step = op.push_ihvp(torch.randn(d, generator=gen))
        rows = op.dense_rows().to(F64)
        want = dense_inverse_fisher(rows, damp) @ rows[slot]
        torch.testing.assert_close(step.to(F64), want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- extension point
class _Diagonal:
    """D (damp I + G~^T G~ / m)^-1 D g with a fixed diagonal D, and a counter as its state."""

    def __init__(self, d: torch.Tensor) -> None:
        self.d, self.calls = d, 0

    def before_push(self, flat_grad: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return flat_grad * self.d

    def after_ihvp(self, direction: torch.Tensor) -> torch.Tensor:
        return direction * self.d

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]


def test_gradient_scaling_hook_composes_with_the_window() -> None:
    d, m, damp, lr = 7, 3, 1e-2, 0.1
    p = _vec_param(d)
    scale = torch.linspace(0.5, 2.0, d, dtype=F64)
    opt = MFACSGD([p], lr=lr, ngrads=m, damp=damp, window_dtype=F64,
               gradient_scaling=_Diagonal(scale))  # fmt: skip
    window = torch.zeros(m, d, dtype=F64)
    gen = torch.Generator().manual_seed(2)
    for t in range(5):
        g = torch.randn(d, dtype=F64, generator=gen)
        window[t % m] = scale * g
        want = scale * (dense_inverse_fisher(window, damp) @ (scale * g))
        x0 = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), x0 - lr * want, rtol=1e-8, atol=1e-10)
    sd = opt.state_dict()
    assert sd["state"][0]["gradient_scaling"] == {"calls": 5}
    other = MFACSGD([_vec_param(d)], lr=lr, ngrads=m, damp=damp, window_dtype=F64,
                 gradient_scaling=_Diagonal(scale))  # fmt: skip
    other.load_state_dict(sd)
    assert other.gradient_scaling.calls == 5
    plain = MFACSGD([_vec_param(d)], lr=lr, ngrads=m, damp=damp, window_dtype=F64)
    with pytest.raises(ValueError, match="gradient_scaling"):
        plain.load_state_dict(sd)


def test_state_lives_in_self_state_and_torch_hooks_apply() -> None:
    """The window and step count sit in ``self.state`` under the first parameter (as torch's
    LBFGS keeps its state), momentum per parameter; torch's step and state-dict hooks run."""
    from mfac.operators import SlidingWindow

    a, b = _vec_param(5, 1), _vec_param(3, 2)
    opt = MFACSGD([a, b], lr=0.1, ngrads=2, momentum=0.5)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, args, kw: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kw: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd") or sd)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load"))
    a.grad, b.grad = torch.ones(5, dtype=F64), torch.ones(3, dtype=F64)
    opt.step()
    assert opt.state[a]["step"] == 1 and isinstance(opt.state[a]["window"], SlidingWindow)
    assert opt.state[b]["momentum_buffer"].shape == b.shape and "window" not in opt.state[b]
    sd = opt.state_dict()
    assert isinstance(sd["state"][0]["window"], dict) and sd["state"][0]["step"] == 1
    opt.load_state_dict(sd)
    assert calls == ["pre", "post", "sd", "load"]
    assert opt.window is opt.state[a]["window"] and opt.steps == 1


# ------------------------------------------------------------ one class per rule
def test_mfacsgd_defaults_and_copies() -> None:
    """MFACSGD is the paper's rule with its own defaults (m = 1024, absolute damp 1e-5); it
    survives deepcopy and pickling as itself."""
    import pickle

    params = [nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(2))]
    opt = MFACSGD(params, lr=1e-3)
    assert (opt.ngrads, opt.damp, opt.cfg.layout, opt.dim) == (1024, 1e-5, "dense", 8)
    assert len(opt.windows) == 1 and opt.window.damp == 1e-5
    assert type(copy.deepcopy(opt)) is MFACSGD
    assert type(pickle.loads(pickle.dumps(opt))) is MFACSGD
    assert isinstance(opt, mfac.optim.WindowOptimizer) and not isinstance(opt, mfac.MFAC)


@pytest.mark.parametrize(
    ("option", "value"),
    [("window_scope", "tensor"), ("window_scope", "model"), ("relative_damp", 1.0),
     ("power", 0.5), ("betas", (0.9, 0.99)), ("mode", "paper"), ("history", "dense"),
     ("history_dtype", torch.float32), ("blocks", "global")],
)  # fmt: skip
def test_options_of_other_rules_and_old_names_are_refused_by_name(option: str, value) -> None:
    """MFACSGD is always one model-wide window: window_scope and the default rule's options are
    refused by name, as are the removed names (mode, history, history_dtype, blocks)."""
    p = nn.Parameter(torch.randn(4))
    before = p.detach().clone()
    with pytest.raises(TypeError, match=rf"unknown options for MFACSGD: \['{option}'\]"):
        MFACSGD([p], lr=1e-3, **{option: value})
    assert torch.equal(p.detach(), before) and p.grad is None


def test_options_after_weight_decay_are_keyword_only() -> None:
    """The old positional order (lr, ngrads, damp, ...) is gone: after weight_decay everything
    is a keyword, so a stray positional ngrads is refused instead of read as something else."""
    p = nn.Parameter(torch.randn(4))
    with pytest.raises(TypeError, match="positional"):
        MFACSGD([p], 1e-3, 0.0, 0.0, 8)
    opt = MFACSGD([p], 1e-3, 0.5, 0.1, ngrads=8)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], opt.ngrads) == (
        1e-3, 0.5, 0.1, 8
    )  # fmt: skip
