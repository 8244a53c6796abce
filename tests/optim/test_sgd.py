"""The M-FAC optimizer against dense float64 oracles, and its torch.optim contract."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

import mfac
from mfac.optim import MFAC, PaperMFAC, ScaledMFAC, TopKSlidingInverseFisher
from mfac.optim.base import paper_only_options

from oracle import dense_inverse_fisher

F64 = torch.float64


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _data(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    x, y = _data(256)
    for t in range(start, start + steps):
        sl = slice((t * 16) % 256, (t * 16) % 256 + 16)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[sl]), y[sl]).backward()
        opt.step()


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _vec_param(d: int = 10, seed: int = 0) -> nn.Parameter:
    torch.manual_seed(seed)
    return nn.Parameter(torch.randn(d, dtype=F64))


# ---------------------------------------------------------------------- maths
def test_first_step_is_normalised_gradient() -> None:
    p = _vec_param()
    opt = PaperMFAC([p], lr=0.1, ngrads=4, damp=1e-3, history_dtype=F64)
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
    opt = PaperMFAC([p], lr=lr, ngrads=m, damp=damp, momentum=momentum, history_dtype=F64)
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
    opt = PaperMFAC(
        [{"params": [a], "lr": 0.1, "weight_decay": 0.5}, {"params": [b], "lr": 0.01}],
        ngrads=m,
        damp=damp,
        history_dtype=F64,
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
    opt = PaperMFAC(
        [p],
        lr=0.1,
        ngrads=2,
        damp=1e-2,
        weight_decay=0.3,
        decoupled_weight_decay=True,
        history_dtype=F64,
    )
    g = torch.randn(8, dtype=F64)
    x0 = p.detach().clone()
    p.grad = g.clone()
    opt.step()
    s = 2 * g / (2 * 1e-2 + g.dot(g))
    torch.testing.assert_close(p.detach(), x0 * (1 - 0.1 * 0.3) - 0.1 * s, rtol=1e-10, atol=1e-12)


def test_grad_none_enters_as_zero_and_is_not_updated() -> None:
    a, b = _vec_param(4, 1), _vec_param(5, 2)
    opt = PaperMFAC([a, b], lr=0.1, ngrads=3, damp=1e-2, momentum=0.5, weight_decay=0.1)
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
def assert_state_equal(s1: object, s2: object, path: str = "state") -> None:
    """Equality of two (nested) optimizer states: tensors of equal dtype and shape equal
    entry by entry (NaN matching NaN), everything else with ==."""
    if isinstance(s1, torch.Tensor):
        assert isinstance(s2, torch.Tensor) and s1.dtype == s2.dtype, path
        assert s1.shape == s2.shape, path
        same = s1 == s2
        if s1.is_floating_point():
            same |= s1.isnan() & s2.isnan()
        assert bool(same.all()), path
    elif isinstance(s1, dict):
        assert isinstance(s2, dict) and s1.keys() == s2.keys(), path
        for key in s1:
            assert_state_equal(s1[key], s2[key], f"{path}[{key!r}]")
    elif isinstance(s1, (list, tuple)):
        assert type(s1) is type(s2) and len(s1) == len(s2), path
        for i, (a, b) in enumerate(zip(s1, s2, strict=True)):
            assert_state_equal(a, b, f"{path}[{i}]")
    else:
        assert s1 == s2 or (s1 != s1 and s2 != s2), path


@pytest.mark.parametrize("history", ["dense", "topk"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_leaves_everything_unchanged(history: str, bad: float) -> None:
    model = _model()
    kw = {"topk": 0.3} if history == "topk" else {}
    opt = PaperMFAC(model.parameters(), lr=1e-2, ngrads=4, momentum=0.9, history=history, **kw)
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
        ({"history": "lowrank"}, ValueError, "history"),
        ({"history": "topk"}, ValueError, "topk"),
        ({"history": "topk", "topk": 1.5}, ValueError, "density"),
        ({"topk": 10}, ValueError, "topk"),
        ({"history_dtype": torch.int8}, TypeError, "history_dtype"),
        ({"ngrads": 1024, "memory_budget": 10_000}, MemoryError, "memory budget"),
        ({"history": "topk", "topk": 5, "memory_budget": 100}, MemoryError, "memory budget"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        PaperMFAC(_model().parameters(), **kwargs)


# ---------------------------------------------------------------------- masks
def test_explicit_masks_keep_zeros_and_precondition_survivors() -> None:
    p = _vec_param(10)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1, 1, 1], dtype=torch.bool)
    opt = PaperMFAC([p], lr=0.1, ngrads=3, damp=1e-2, history_dtype=F64, weight_decay=0.2)
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
    opt = PaperMFAC([p], lr=0.1, ngrads=2)
    assert opt.dim == 4
    p.grad = torch.ones(6, dtype=F64)
    opt.step()
    assert p[2].item() == 0.0 and p[4].item() == 0.0


def test_torch_prune_module_masks() -> None:
    model = _model()
    prune.l1_unstructured(model[0], "weight", amount=0.6)
    prune.random_unstructured(model[2], "weight", amount=0.5)
    opt = PaperMFAC(model.parameters(), lr=1e-2, ngrads=8, momentum=0.9, weight_decay=1e-3)
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
        {"history": "topk", "topk": 0.2, "momentum": 0.5},
        {"decoupled_weight_decay": True, "weight_decay": 0.1, "masked": True},
    ],
)
def test_resume_is_bit_identical(kwargs: dict) -> None:
    kwargs = dict(kwargs)
    masked = kwargs.pop("masked", False)

    def make() -> tuple[nn.Module, MFAC]:
        model = _model()
        opt = PaperMFAC(model.parameters(), lr=1e-2, ngrads=6, damp=1e-4, **kwargs)
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
    opt2 = PaperMFAC(model2.parameters(), lr=1e-2, ngrads=6, damp=1e-4, **kwargs)
    opt2.load_state_dict(ckpt["opt"])
    _train(model2, opt2, 10, start=10)
    for p, q in zip(ref_model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kwargs", [{}, {"history": "topk", "topk": 0.3}], ids=["dense", "topk"])
def test_state_dict_holds_the_window_without_a_copy(kwargs: dict) -> None:
    """A checkpoint must not double the largest buffer: state_dict() hands out the window (and
    the top-k error vector) by reference, as torch.optim hands out its moments, and a
    torch.save of it still resumes exactly (test_resume_is_bit_identical)."""
    model = _model()
    opt = PaperMFAC(model.parameters(), lr=1e-2, ngrads=6, damp=1e-4, **kwargs)
    _train(model, opt, 3)
    window = opt.state[opt._state_key]["window"]
    saved = opt.state_dict()["state"][0]["window"]
    names = ("values", "indices", "error") if kwargs else ("grads",)
    for name in names:
        assert saved[name].data_ptr() == getattr(window, name).data_ptr(), name


@pytest.mark.parametrize("blocks", ["tensor", "global"])
def test_default_rule_state_dict_holds_its_windows_without_a_copy(blocks: str) -> None:
    """The default rule's dense windows are handed out by reference too."""
    model = _model()
    opt = ScaledMFAC(model.parameters(), lr=1e-2, ngrads=4, blocks=blocks)
    _train(model, opt, 3)
    saved = opt.state_dict()["scaled"]["blocks"]
    for block, state in zip(opt._blocks, saved, strict=True):
        assert state["rows"].data_ptr() == block.rows.data_ptr()


# ---------------------------------------------------------------------- torch.optim contract
def test_lr_scheduler_and_closure() -> None:
    p = _vec_param(5)
    opt = PaperMFAC([p], lr=1.0, ngrads=1, damp=1e-2)
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
    opt = PaperMFAC(model.parameters(), lr=3e-3, ngrads=16, damp=1e-4)
    first = nn.functional.cross_entropy(model(x), y).item()
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert nn.functional.cross_entropy(model(x), y).item() < 0.5 * first


# ---------------------------------------------------------------------- top-k history
def test_topk_full_density_equals_dense() -> None:
    model_a, model_b = _model(), _model()
    opt_a = PaperMFAC(model_a.parameters(), lr=1e-2, ngrads=4, damp=1e-4)
    opt_b = PaperMFAC(model_b.parameters(), lr=1e-2, ngrads=4, damp=1e-4, history="topk", topk=1.0)
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
    opt = PaperMFAC([a], lr=0.1, ngrads=2)
    a.grad = torch.ones(4, dtype=F64)
    opt.step()
    state = opt.state_dict()
    opt.add_param_group({"params": [b], "lr": 0.01})
    assert opt.dim == 7 and opt.window.num_pushed == 0
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [_vec_param(2)], "lr": -1.0})
    other = PaperMFAC([_vec_param(5)], lr=0.1, ngrads=2)
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
    opt = PaperMFAC([p], lr=lr, ngrads=m, damp=damp, history_dtype=F64,
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
    other = PaperMFAC([_vec_param(d)], lr=lr, ngrads=m, damp=damp, history_dtype=F64,
                 gradient_scaling=_Diagonal(scale))  # fmt: skip
    other.load_state_dict(sd)
    assert other.gradient_scaling.calls == 5
    plain = PaperMFAC([_vec_param(d)], lr=lr, ngrads=m, damp=damp, history_dtype=F64)
    with pytest.raises(ValueError, match="gradient_scaling"):
        plain.load_state_dict(sd)


def test_state_lives_in_self_state_and_torch_hooks_apply() -> None:
    """The window and step count sit in ``self.state`` under the first parameter (as torch's
    LBFGS keeps its state), momentum per parameter; torch's step and state-dict hooks run."""
    from mfac.operators import SlidingWindow

    a, b = _vec_param(5, 1), _vec_param(3, 2)
    opt = PaperMFAC([a, b], lr=0.1, ngrads=2, momentum=0.5)
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


# ------------------------------------------------------------ MFAC: one class, two step rules
def test_mfac_default_is_the_adam_rule_and_paper_is_one_argument_away() -> None:
    """MFAC(params, lr) builds the default rule; mode="paper" the paper's step; both are MFACs
    and survive deepcopy and pickling as themselves."""
    import pickle

    from mfac.optim import ScaledMFAC

    params = [nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(2))]
    default = MFAC(params, lr=1e-3)
    paper = MFAC(params, lr=1e-3, mode="paper")
    assert type(default) is ScaledMFAC and type(paper) is PaperMFAC
    assert isinstance(default, MFAC) and isinstance(paper, MFAC)
    assert (default.cfg.ngrads, default.cfg.damp, default.cfg.graft) == (32, 1.0, True)
    assert (paper.ngrads, paper.damp) == (1024, 1e-5)
    assert type(copy.deepcopy(default)) is ScaledMFAC
    assert type(pickle.loads(pickle.dumps(paper))) is PaperMFAC


@pytest.mark.parametrize(
    "option", ["momentum", "decoupled_weight_decay", "process_group", "gradient_scaling"]
)
def test_paper_only_options_are_refused_by_name_in_the_default_mode(option: str) -> None:
    p = nn.Parameter(torch.randn(4))
    before = p.detach().clone()
    with pytest.raises(TypeError, match=f"'{option}' is an option of mode='paper'"):
        MFAC([p], lr=1e-3, **{option: None})
    assert torch.equal(p.detach(), before) and p.grad is None
    assert option in paper_only_options()


def test_history_and_topk_are_options_of_both_modes() -> None:
    """The default rule takes a top-k window too (one over the whole model), so history and
    topk are not paper-only; its own checks refuse them where they do not apply."""
    p = nn.Parameter(torch.randn(4))
    assert not {"history", "topk"} & set(paper_only_options())
    opt = MFAC([p], lr=1e-3, blocks="global", history="topk", topk=0.5)
    assert type(opt) is ScaledMFAC and opt.cfg.history == "topk"
    with pytest.raises(ValueError, match="needs blocks='global'"):
        MFAC([p], lr=1e-3, history="topk", topk=0.5)


def test_default_mode_refuses_positional_options_and_unknown_modes() -> None:
    p = nn.Parameter(torch.randn(4))
    with pytest.raises(TypeError, match="by keyword"):
        MFAC([p], 1e-3, 8)  # ngrads=8 positionally: the paper's signature
    with pytest.raises(ValueError, match="mode must be one of"):
        MFAC([p], lr=1e-3, mode="adamw")
    assert type(MFAC([p], 1e-3, 8, 1e-4, mode="paper")) is PaperMFAC  # paper: positional ok


def test_default_rule_checks_memory_before_allocating() -> None:
    """A window that does not fit the budget is refused with the bytes needed, and nothing
    (no state, no window) is built."""
    p = nn.Parameter(torch.randn(1000))
    with pytest.raises(MemoryError, match=r"needs .* over the memory budget"):
        MFAC([p], lr=1e-3, ngrads=64, memory_budget=100_000)
    opt = MFAC([p], lr=1e-3, ngrads=4, memory_budget=1_000_000)
    assert opt.state_nbytes <= 1_000_000


def test_default_rule_memory_error_points_to_what_helps() -> None:
    p = nn.Parameter(torch.randn(1000))
    with pytest.raises(MemoryError, match=r"mode='paper', history='topk'") as err:
        MFAC([p], lr=1e-3, ngrads=64, memory_budget=100_000)
    assert "process group" not in str(err.value)  # not an option of this rule
