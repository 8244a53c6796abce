"""MFAC's orthogonalized groups: Muon's step on hidden matrices, the window rule elsewhere."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from mfac import MFAC, NonFiniteGradientError
from mfac.optim import hidden_groups, newton_schulz


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 2))


def _grads(net: nn.Module, steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen) for p in net.parameters()] for _ in range(steps)]


def _apply(opt: torch.optim.Optimizer, params: list[nn.Parameter], grads: list) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()


# ------------------------------------------------------------------ the orthogonalization
@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3), rows=st.integers(1, 12), cols=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)  # fmt: skip
@example(batch=1, rows=3, cols=7, seed=40130)  # one entry one bfloat16 step off, on the CPU
def test_newton_schulz_is_torch_muons_iteration(batch, rows, cols, seed):
    """A stack orthogonalized at once equals torch.optim.Muon's iteration on each matrix up to
    bfloat16 rounding (same arithmetic, wide and tall matrices alike; the batched product
    ``baddbmm`` may round an entry one bfloat16 step away from ``addmm``, for instance at
    batch=1, rows=3, cols=7, seed=40130 on the CPU)."""
    reference = pytest.importorskip("torch.optim._muon")._zeropower_via_newtonschulz
    x = torch.randn(batch, rows, cols, generator=torch.Generator().manual_seed(seed))
    want = torch.stack([reference(m, (3.4445, -4.7750, 2.0315), 5, 1e-7) for m in x])
    got = newton_schulz(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=2**-7)


def test_newton_schulz_orthogonalizes_a_well_conditioned_matrix():
    """Every singular value of the result lies in the iteration's band around 1, whatever the
    input's scale (the Frobenius normalisation comes first)."""
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    x = (q * torch.linspace(0.5, 2.0, 16, dtype=torch.float64)) @ q.T * 1e3
    s = torch.linalg.svdvals(newton_schulz(x.float()[None])[0].double())
    assert float(s.min()) > 0.6 and float(s.max()) < 1.25


# ------------------------------------------------------------------ the rule
def test_hidden_matrices_take_torch_muons_step_and_the_rest_the_window_rule():
    """With hidden_groups, the hidden weights move exactly as under torch.optim.Muon (Nesterov,
    match_rms_adamw, decoupled weight decay) and everything else exactly as under MFAC over the
    rest alone: the two parts do not interact."""
    net, muon_net, rest_net = _net(), _net(), _net()
    grads = _grads(net, 6)
    groups = hidden_groups(net)
    for g in groups:
        g["weight_decay"] = 0.1
    opt = MFAC(groups, lr=0.02, ngrads=3)
    _apply(opt, list(net.parameters()), grads)

    hidden = {0, 2}  # positions of the two hidden weights in net.parameters()
    ref_params = list(muon_net.parameters())
    muon = torch.optim.Muon(
        [ref_params[i] for i in sorted(hidden)], lr=0.02, weight_decay=0.1,
        adjust_lr_fn="match_rms_adamw",
    )  # fmt: skip
    _apply(muon, [ref_params[i] for i in sorted(hidden)],
           [[g[i] for i in sorted(hidden)] for g in grads])  # fmt: skip
    rest_params = list(rest_net.parameters())
    rest_idx = [i for i in range(len(rest_params)) if i not in hidden]
    rest = MFAC([rest_params[i] for i in rest_idx], lr=0.02, weight_decay=0.1, ngrads=3)
    _apply(rest, [rest_params[i] for i in rest_idx], [[g[i] for i in rest_idx] for g in grads])

    got = list(net.parameters())
    for i in hidden:
        torch.testing.assert_close(got[i], ref_params[i], rtol=1e-6, atol=1e-7)
    for i in rest_idx:
        assert torch.equal(got[i].detach(), rest_params[i].detach())
    assert opt.steps == 6 and len(opt.windows) == 1  # the rest is small: one shared window
    state = opt.state[got[0]]
    assert "exp_avg" not in state and state["momentum_buffer"].shape == (9, 6)


def test_resume_is_bit_identical_with_orthogonalized_groups():
    ref = _net()
    grads = _grads(ref, 8)
    ref_opt = MFAC(hidden_groups(ref), lr=0.02, ngrads=3)
    _apply(ref_opt, list(ref.parameters()), grads)

    net = _net()
    opt = MFAC(hidden_groups(net), lr=0.02, ngrads=3)
    _apply(opt, list(net.parameters()), grads[:5])
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    net2 = _net(seed=7)
    opt2 = MFAC(hidden_groups(net2), lr=0.02, ngrads=3)
    net2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    _apply(opt2, list(net2.parameters()), grads[5:])
    for a, b in zip(net2.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def _snapshot(opt: MFAC, net: nn.Module) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in net.parameters()]
    for s in opt.state.values():
        out += [t.clone() for k, t in sorted(s.items()) if isinstance(t, torch.Tensor)]
    out += [w.gram.clone() for w in opt.windows]
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_nan_in_a_hidden_gradient_changes_nothing():
    net = _net()
    opt = MFAC(hidden_groups(net), lr=0.02, ngrads=3)
    _apply(opt, list(net.parameters()), _grads(net, 2))
    before = _snapshot(opt, net)
    grads = _grads(net, 1, seed=9)[0]
    grads[2][0, 0] = float("nan")  # the second hidden weight
    where = r"parameter #1 \(param_groups\[0\]\['params'\]\[1\], shape \(7, 9\)\)"
    with pytest.raises(NonFiniteGradientError, match=where):
        _apply(opt, list(net.parameters()), [grads])
    assert _same(before, _snapshot(opt, net)) and opt.steps == 2


def test_refusals_name_the_problem_and_build_nothing():
    net = _net()
    w, b = net[0].weight, net[0].bias
    with pytest.raises(ValueError, match=r"parameter #1 has shape \(9,\); only matrices"):
        MFAC([{"params": [w, b], "orthogonalize": True}, {"params": [net[2].weight]}])
    with pytest.raises(TypeError, match=r"\['orthogonalize'\] must be True or False"):
        MFAC([{"params": [w], "orthogonalize": 1}, {"params": [b]}])
    with pytest.raises(ValueError, match="no parameter outside the orthogonalized groups"):
        MFAC([{"params": [w], "orthogonalize": True}])
    assert w.grad is None and b.grad is None


def test_orthogonalize_cannot_change_after_construction():
    net = _net()
    opt = MFAC(hidden_groups(net), lr=0.02, ngrads=3)
    _apply(opt, list(net.parameters()), _grads(net, 2))
    before = _snapshot(opt, net)
    opt.param_groups[1]["orthogonalize"] = True
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['orthogonalize'\] changed"):
        _apply(opt, list(net.parameters()), _grads(net, 1, seed=3))
    assert _same(before, _snapshot(opt, net))


def test_a_state_with_other_groups_is_refused_unchanged():
    """A checkpoint of plain groups cannot be loaded into orthogonalized ones (the state kept
    per parameter differs), and the target stays as it was."""
    net = _net()
    plain = MFAC([{"params": g["params"]} for g in hidden_groups(net)], lr=0.02, ngrads=3)
    _apply(plain, list(net.parameters()), _grads(net, 2))
    saved = copy.deepcopy(plain.state_dict())
    net2 = _net()
    opt = MFAC(hidden_groups(net2), lr=0.02, ngrads=3)
    _apply(opt, list(net2.parameters()), _grads(net2, 2))
    before = _snapshot(opt, net2)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['orthogonalize'\]: state has False"):
        opt.load_state_dict(saved)
    assert _same(before, _snapshot(opt, net2))
    own = copy.deepcopy(opt.state_dict())
    own["param_groups"][0]["orthogonalize"] = 1  # equal to True, but not a flag
    with pytest.raises(ValueError, match=r"\['orthogonalize'\]: state has 1, this optimizer True"):
        opt.load_state_dict(own)
    assert _same(before, _snapshot(opt, net2)) and opt.param_groups[0]["orthogonalize"] is True


def test_add_param_group_orthogonalized():
    net, extra = _net(), nn.Linear(7, 7)
    opt = MFAC(hidden_groups(net), lr=0.02, ngrads=3)
    _apply(opt, list(net.parameters()), _grads(net, 2))
    kept = opt.state[net[0].weight]["momentum_buffer"]
    opt.add_param_group({"params": [extra.weight], "orthogonalize": True})
    assert opt.state[net[0].weight]["momentum_buffer"] is kept
    with pytest.raises(ValueError, match="only matrices"):
        opt.add_param_group({"params": [extra.bias], "orthogonalize": True})
    assert len(opt.param_groups) == 3
    params = [*net.parameters(), extra.weight]
    _apply(opt, params, [[torch.randn(p.shape) for p in params]])
    assert opt.steps == 3 and opt.state[extra.weight]["momentum_buffer"].abs().sum() > 0


def test_memory_check_counts_the_orthogonalized_matrices():
    net = _net()
    opt = MFAC(hidden_groups(net), lr=0.02, ngrads=3)
    windowed = [9, 7, 14, 2]
    base = opt.required_bytes(windowed, windows=1)
    # momentum, Nesterov direction, the batch's stack, three bfloat16 matrices; one update
    per_entry = 4 + 4 + 4 + 3 * 2
    assert opt.required_bytes(windowed, windows=1, unwindowed=[54, 63]) == (
        base + per_entry * 117 + 4 * 63
    )


def test_the_memory_check_refuses_orthogonalized_matrices_that_do_not_fit():
    """The hidden matrices' bytes are in the check made at construction: a budget that holds
    the windowed part and the matrices' momentum alone is refused, before anything is built."""
    net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
    groups = hidden_groups(net)
    probe = MFAC(groups, lr=0.02, ngrads=3)
    windowed = [p.numel() for p in groups[1]["params"]]
    fits = probe.required_bytes(windowed, windows=1, unwindowed=[64 * 64])
    budget = probe.required_bytes(windowed, windows=1) + 3 * 4 * 64 * 64  # the old count
    assert fits > budget
    with pytest.raises(MemoryError, match="memory_budget"):
        MFAC(hidden_groups(net), lr=0.02, ngrads=3, memory_budget=budget)
    MFAC(hidden_groups(net), lr=0.02, ngrads=3, memory_budget=fits)


@pytest.mark.parametrize(
    ("holder", "field"),
    [("windowed", "momentum_buffer"), ("hidden", "exp_avg"), ("hidden", "exp_avg_sq"),
     ("hidden", "window")],
)  # fmt: skip
def test_a_state_with_the_other_kinds_tensor_is_refused_by_name_unchanged(holder, field):
    """A windowed parameter keeps Adam's moments only and an orthogonalized one its momentum
    only: a saved entry carrying the other kind's tensor (or a window) is refused by name, the
    optimizer and the given dict unchanged."""
    net = _net()
    opt = MFAC(hidden_groups(net), lr=0.02, ngrads=3)
    _apply(opt, list(net.parameters()), _grads(net, 2))
    saved = copy.deepcopy(opt.state_dict())
    entries = saved["state"]
    pid = next(
        k for k, e in entries.items()
        if ("momentum_buffer" in e) == (holder == "hidden") and "window" not in e
    )  # fmt: skip
    shape = next(t for t in entries[pid].values() if isinstance(t, torch.Tensor)).shape
    entries[pid][field] = {} if field == "window" else torch.zeros(shape)
    given = copy.deepcopy(saved)
    before = _snapshot(opt, net)
    with pytest.raises(ValueError, match=rf"state\[{pid}\] has an unexpected field '{field}'"):
        opt.load_state_dict(saved)
    assert _same(before, _snapshot(opt, net))
    assert field not in opt.state[[p for g in opt.param_groups for p in g["params"]][pid]]
    assert saved["state"].keys() == given["state"].keys() and all(
        saved["state"][k].keys() == given["state"][k].keys() for k in given["state"]
    )  # fmt: skip


@settings(max_examples=10, deadline=None)
@given(kinds=st.lists(st.sampled_from(["both", "hidden", "rest", "none"]), min_size=1, max_size=6))
def test_steps_where_one_part_has_no_gradient_leave_that_part_as_if_alone(kinds):
    """A step in which only the hidden matrices (or only the rest) have gradients moves that
    part alone: the other part, its Adam moments, windows and step count (Adam's bias
    correction) stay as under an optimizer of that part alone that skipped the step."""
    net, muon_net, rest_net = _net(), _net(), _net()
    grads = _grads(net, len(kinds))
    hidden = [0, 2]
    rest_idx = [1, 3, 4, 5]
    opt = MFAC(hidden_groups(net), lr=0.02, ngrads=3)
    muon_params = [list(muon_net.parameters())[i] for i in hidden]
    muon = torch.optim.Muon(muon_params, lr=0.02, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    rest_params = [list(rest_net.parameters())[i] for i in rest_idx]
    rest = MFAC(rest_params, lr=0.02, ngrads=3)
    params = list(net.parameters())
    for kind, step_grads in zip(kinds, grads, strict=True):
        live = {"both": hidden + rest_idx, "hidden": hidden, "rest": rest_idx, "none": []}[kind]
        for i, p in enumerate(params):
            p.grad = step_grads[i].clone() if i in live else None
        opt.step()
        if kind in ("both", "hidden"):
            _apply(muon, muon_params, [[step_grads[i] for i in hidden]])
        if kind in ("both", "rest"):
            _apply(rest, rest_params, [[step_grads[i] for i in rest_idx]])
    for i, q in zip(hidden, muon_params, strict=True):
        torch.testing.assert_close(params[i], q, rtol=1e-6, atol=1e-7)
    for i, q in zip(rest_idx, rest_params, strict=True):
        assert torch.equal(params[i].detach(), q.detach())
    assert opt.steps == rest.steps


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_with_its_model_steps_as_the_original(how):
    """deepcopy or pickle of (model, optimizer) gives a working optimizer over the copied
    parameters, its layout, windows and orthogonalized groups included: both step alike."""
    import pickle

    net = _net()
    opt = MFAC(hidden_groups(net), lr=0.02, ngrads=3)
    _apply(opt, list(net.parameters()), _grads(net, 2))
    if how == "deepcopy":
        net2, opt2 = copy.deepcopy((net, opt))
    else:
        net2, opt2 = pickle.loads(pickle.dumps((net, opt)))
    assert repr(opt2) == repr(opt) and opt2.steps == 2
    grads = _grads(net, 3, seed=5)
    _apply(opt, list(net.parameters()), grads)
    _apply(opt2, list(net2.parameters()), grads)
    for a, b in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt2.steps == 5 and opt2.state_nbytes == opt.state_nbytes


def test_bfloat16_matrices_follow_torch_muon_as_closely_as_torch_itself():
    """On bfloat16 parameters the update is applied in bfloat16 (the parameter stays bfloat16,
    its momentum float32), and the result is as close to Muon in float32 as torch.optim.Muon
    on the same bfloat16 parameters is."""
    gen = torch.Generator().manual_seed(3)
    w0, b0 = torch.randn(24, 16, generator=gen) * 0.1, torch.randn(16, generator=gen)
    grads = [torch.randn(24, 16, generator=gen) for _ in range(8)]

    def run(rule: str, dtype: torch.dtype) -> torch.Tensor:
        w, b = nn.Parameter(w0.to(dtype)), nn.Parameter(b0.to(dtype))
        if rule == "mfac":
            groups = [{"params": [w], "orthogonalize": True}, {"params": [b]}]
            opt = MFAC(groups, lr=0.02, weight_decay=0.1, ngrads=3)
        else:
            opt = torch.optim.Muon([w], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
        for g in grads:
            w.grad, b.grad = g.to(dtype), torch.zeros_like(b)
            opt.step()
        if rule == "mfac":
            assert opt.state[w]["momentum_buffer"].dtype == torch.float32
        assert w.dtype == dtype
        return w.detach().float()

    want = run("muon", torch.float32)
    assert torch.equal(run("mfac", torch.float32), want)
    torch_error = (run("muon", torch.bfloat16) - want).norm()
    assert (run("mfac", torch.bfloat16) - want).norm() <= 1.1 * torch_error


@pytest.mark.parametrize(("saved_below", "below"), [(1, 1024), (1024, 1), (1024, 8)])
def test_a_state_of_another_share_below_is_refused_by_name_unchanged(saved_below, below):
    """Windows shared by other tensors than this optimizer's (another ``share_below``) are
    refused with the option named, the optimizer unchanged."""
    net = _net()
    saver = MFAC(hidden_groups(net), lr=0.02, ngrads=3, share_below=saved_below)
    _apply(saver, list(net.parameters()), _grads(net, 2))
    saved = copy.deepcopy(saver.state_dict())
    net2 = _net()
    opt = MFAC(hidden_groups(net2), lr=0.02, ngrads=3, share_below=below)
    _apply(opt, list(net2.parameters()), _grads(net2, 2, seed=4))
    before = _snapshot(opt, net2)
    with pytest.raises((KeyError, ValueError), match=rf"share_below\? .*share_below={below}\)"):
        opt.load_state_dict(saved)
    assert _same(before, _snapshot(opt, net2))


def _members(sizes: list[int], below: int) -> set[tuple[int, ...]]:
    """Which tensors share a window (the rule's layout, written out; a lone small tensor has a
    window of its own, as a large one does)."""
    small = tuple(i for i, n in enumerate(sizes) if n < below)
    return {(i,) for i, n in enumerate(sizes) if n >= below} | ({small} if small else set())


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=5),
    saved_below=st.integers(1, 14), below=st.integers(1, 14),
)  # fmt: skip
def test_a_state_loads_exactly_when_its_windows_are_laid_out_alike(sizes, saved_below, below):
    """A state saved under one ``share_below`` loads under another exactly when both share the
    same tensors' windows, and then resumes bit-identically; otherwise it is refused cleanly
    (naming share_below) and the optimizer is left as it was."""

    def build(below: int, seed: int) -> tuple[list[nn.Parameter], MFAC]:
        torch.manual_seed(seed)
        params = [nn.Parameter(torch.randn(n)) for n in sizes]
        return params, MFAC(params, lr=0.02, ngrads=2, share_below=below)

    grads = [[torch.randn(n) for n in sizes] for _ in range(4)]
    ref_params, ref = build(saved_below, 0)
    _apply(ref, ref_params, grads[:2])
    saved = copy.deepcopy(ref.state_dict())
    params, opt = build(below, 1)
    _apply(opt, params, grads[2:3])
    before = [p.detach().clone() for p in params] + [w.gram.clone() for w in opt.windows]
    if _members(sizes, saved_below) == _members(sizes, below):
        opt.load_state_dict(saved)
        with torch.no_grad():
            for p, q in zip(params, ref_params, strict=True):
                p.copy_(q)
        _apply(ref, ref_params, grads[2:])
        _apply(opt, params, grads[2:])
        assert all(torch.equal(p, q) for p, q in zip(params, ref_params, strict=True))
    else:
        with pytest.raises((KeyError, ValueError), match="share_below"):
            opt.load_state_dict(saved)
        after = [p.detach().clone() for p in params] + [w.gram.clone() for w in opt.windows]
        assert _same(before, after) and opt.steps == 1


def test_a_frozen_orthogonalized_group_holds_nothing_and_resumes():
    """An orthogonalize=True group whose matrices are all frozen is laid out as empty: no
    state, no bytes, a state dict that loads back, and the rest steps as without it."""
    net, alone = _net(), _net()
    for n in (net, alone):
        n[0].weight.requires_grad_(False)
        n[2].weight.requires_grad_(False)
    rest = [p for p in net.parameters() if p.requires_grad]
    opt = MFAC([{"params": [net[0].weight, net[2].weight], "orthogonalize": True},
                {"params": rest}], lr=0.02, ngrads=3)  # fmt: skip
    ref = MFAC([p for p in alone.parameters() if p.requires_grad], lr=0.02, ngrads=3)
    grads = _grads(net, 3)
    live = [i for i, p in enumerate(net.parameters()) if p.requires_grad]
    _apply(opt, rest, [[g[i] for i in live] for g in grads])
    _apply(ref, [p for p in alone.parameters() if p.requires_grad],
           [[g[i] for i in live] for g in grads])  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), alone.parameters(), strict=True))
    assert net[0].weight not in opt.state and opt.state_nbytes == ref.state_nbytes
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt.steps == 3
