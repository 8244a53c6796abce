"""MFAC (the default rule) against a dense float64 oracle of the operator it claims to apply,
its top-k window, its checkpoints and its refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from optim_common import assert_state_equal
from optim_common import delete_field as _delete
from optim_common import set_field as _set
from torch import nn

from mfac import NonFiniteGradientError
from mfac.operators import TopKSlidingInverseFisher
from mfac.operators.topk import SMALL_SELECT
from mfac.optim import MFAC, window_coeffs

F64 = torch.float64


def window_coeff(gram: torch.Tensor, filled: int, damp: float, power: float):
    """:func:`window_coeffs` for one window: (W, lam)."""
    w, lams = window_coeffs(gram[None], [filled], damp, power)
    return w[0], lams[0]


def dense_power(s: torch.Tensor, lam: float, power: float) -> torch.Tensor:
    """(I + S/lam)^-power by a d x d float64 eigendecomposition."""
    evals, evecs = torch.linalg.eigh(s)
    f = (1.0 + evals.clamp_min(0.0) / lam) ** -power
    return (evecs * f) @ evecs.T


def oracle_run(
    shapes, grads, lr, wd, ngrads, damp, power, whiten, window_scope, betas, eps, graft, stored=F64,
    share_below=1,
):
    """Parameters after the given gradient steps, everything dense in float64; ``graft``
    rescales each tensor's piece of the step to the length of AdamW's step on the tensor (also
    with one global block); the window holds the whitened gradients rounded to ``stored``."""
    params = [torch.zeros(s, dtype=F64) for s in shapes]
    torch.manual_seed(0)
    params = [torch.randn(s).to(F64) for s in shapes]
    b1, b2 = betas
    sizes = [p.numel() for p in params]
    ea = [torch.zeros(n, dtype=F64) for n in sizes]
    es = [torch.zeros(n, dtype=F64) for n in sizes]
    history: list[list[torch.Tensor]] = []  # per step: whitened flat z per parameter
    for t, step_grads in enumerate(grads, start=1):
        zs, us, adamw = [], [], []
        for i, g in enumerate(step_grads):
            g = g.to(F64).reshape(-1)
            ea[i] = b1 * ea[i] + (1 - b1) * g
            es[i] = b2 * es[i] + (1 - b2) * g * g
            mhat = ea[i] / (1 - b1**t)
            den = torch.sqrt(es[i] / (1 - b2**t)) + eps
            adamw.append(mhat / den)
            if whiten == "adam":
                zs.append(g / den)
                us.append(mhat / den)
            else:
                zs.append(g)
                us.append(mhat)
        history.append([z.to(stored).to(F64) for z in zs])
        window = history[-ngrads:]
        small = [i for i in range(len(params)) if sizes[i] < share_below]
        groups = (
            [list(range(len(params)))]
            if window_scope == "model"
            else [[i] for i in range(len(params)) if sizes[i] >= share_below]
            + ([small] if small else [])
        )
        dirs: list[torch.Tensor] = [None] * len(params)  # type: ignore[list-item]
        for grp in groups:
            zmat = torch.stack([torch.cat([h[i] for i in grp]) for h in window])
            u = torch.cat([us[i] for i in grp])
            smat = zmat.T @ zmat / ngrads
            lam = damp * float(torch.trace(smat)) / len(window)
            s = dense_power(smat, lam, power) @ u
            if whiten == "none":
                s = s / lam**0.5
            for i, piece in zip(grp, s.split([sizes[i] for i in grp]), strict=True):
                dirs[i] = piece * adamw[i].norm() / piece.norm() if graft else piece
        for i, p in enumerate(params):
            p.mul_(1 - lr * wd)
            p.sub_(lr * dirs[i].view_as(p))
    return params


CASES = [
    dict(power=1.0, whiten="adam", window_scope="model"),
    dict(power=0.5, whiten="adam", window_scope="model"),
    dict(power=1.0, whiten="adam", window_scope="tensor", share_below=1),
    dict(power=0.5, whiten="adam", window_scope="tensor", share_below=1),
    dict(power=0.5, whiten="none", window_scope="model"),
    # (3, 4) alone; (5,) and (2, 2) share one window, each grafted on its own
    dict(power=1.0, whiten="adam", window_scope="tensor", share_below=6),
    dict(power=0.5, whiten="none", window_scope="tensor", share_below=6),
]


@pytest.mark.parametrize("graft", [True, False], ids=["graft", "plain"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("ngrads", [3, 16])  # 3: wrap-around; 16 > d of some blocks
def test_matches_dense_float64_oracle(case, ngrads, graft):
    shapes = [(3, 4), (5,), (2, 2)]
    gen = torch.Generator().manual_seed(1)
    steps = 7
    # very different scales per tensor, as in a freshly initialised transformer
    scales = [1.0, 1e-3, 30.0]
    grads = [
        [torch.randn(s, generator=gen) * sc for s, sc in zip(shapes, scales, strict=True)]
        for _ in range(steps)
    ]
    kw = dict(
        lr=0.05, wd=0.1, ngrads=ngrads, damp=0.3, betas=(0.9, 0.99), eps=1e-8, graft=graft, **case
    )
    want = oracle_run(shapes, grads, **kw)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = MFAC(
        [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.1}],
        lr=0.05,
        ngrads=ngrads,
        relative_damp=0.3,
        betas=(0.9, 0.99),
        graft=graft,
        **case,
    )
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
    for p, w in zip(params, want, strict=True):
        torch.testing.assert_close(p.detach().to(F64), w, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("case", CASES[2:4], ids=["tensor-inverse", "tensor-sqrt"])
def test_bfloat16_window_is_the_oracle_of_its_rounded_rows(case):
    """window_dtype=bfloat16 stores the whitened gradients rounded to bfloat16 and applies the
    exact operator of those rows (float64 oracle on the rounded rows), at half the bytes."""
    shapes = [(3, 40), (50,)]
    gen = torch.Generator().manual_seed(2)
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(7)]
    kw = dict(lr=0.05, wd=0.0, ngrads=3, damp=0.3, betas=(0.9, 0.99), eps=1e-8, graft=True)
    want = oracle_run(shapes, grads, **kw, **case, stored=torch.bfloat16)
    unrounded = oracle_run(shapes, grads, **kw, **case)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = MFAC(
        params, lr=0.05, ngrads=3, relative_damp=0.3, betas=(0.9, 0.99),
        window_dtype=torch.bfloat16,
        **case,
    )  # fmt: skip
    plain = MFAC([torch.nn.Parameter(torch.randn(s)) for s in shapes], ngrads=3, share_below=1)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
    for p, g in zip(plain.param_groups[0]["params"], grads[0], strict=True):
        p.grad = g.clone()
    plain.step()  # Adam's moments are created at the first step
    for p, w, u in zip(params, want, unrounded, strict=True):
        torch.testing.assert_close(p.detach().to(F64), w, rtol=2e-5, atol=2e-6)
        assert not torch.allclose(w, u, rtol=1e-7, atol=0)  # the rounding is visible
    window = sum(w.grads.numel() for w in opt.windows)
    assert plain.state_nbytes - opt.state_nbytes == 2 * window  # 4 bytes -> 2 per entry


def test_bfloat16_window_resumes_bit_identically_and_refuses_a_float32_state():
    torch.manual_seed(0)
    x = torch.randn(16, 6)

    def steps(model, opt, first, last):
        for i in range(first, last):
            opt.zero_grad()
            model(x * (i + 1)).square().mean().backward()
            opt.step()

    model = torch.nn.Linear(6, 3)
    opt = MFAC(model.parameters(), lr=1e-2, ngrads=4, window_dtype=torch.bfloat16)
    steps(model, opt, 0, 5)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    steps(model, opt, 5, 9)
    again = torch.nn.Linear(6, 3)
    again.load_state_dict(saved_model)
    resumed = MFAC(again.parameters(), lr=1e-2, ngrads=4, window_dtype=torch.bfloat16)
    resumed.load_state_dict(saved_opt)
    steps(again, resumed, 5, 9)
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)
    f32 = MFAC(again.parameters(), lr=1e-2, ngrads=4)
    before = copy.deepcopy(f32.state_dict())
    with pytest.raises(TypeError, match=r"\['window'\]: grads: state stores torch.bfloat16"):
        f32.load_state_dict(saved_opt)
    # nothing changed: Adam's moments (none yet), windows, step count
    assert f32.steps == 0 and "exp_avg" not in f32.state[again.weight]
    assert_state_equal(before, f32.state_dict())


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 6),
    rows=st.integers(0, 6),
    d=st.integers(1, 8),
    damp=st.floats(1e-3, 1e3),
    power=st.sampled_from([1.0, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_window_coeff_is_the_matrix_function(m, rows, d, damp, power, seed):
    """x + Z^T W Z x equals (I + Z^T Z/(m lam))^-p x, rank-deficient windows included."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.zeros(m, d, dtype=F64)
    n = min(rows, m)
    z[:n] = torch.randn(n, d, generator=gen, dtype=F64)
    x = torch.randn(d, generator=gen, dtype=F64)
    w, lam = window_coeff(z @ z.T / m, n, damp, power)
    if n == 0 or float(z.abs().sum()) == 0.0:
        assert lam == 0.0
        return
    want = dense_power(z.T @ z / m, lam, power) @ x
    torch.testing.assert_close(x + z.T @ (w @ (z @ x)), want, rtol=1e-9, atol=1e-9)


def test_huge_damp_is_adamw():
    """With whitening and damp -> inf the step is AdamW's, bit for bit up to rounding."""
    torch.manual_seed(0)
    a = torch.nn.Linear(6, 3)
    b = copy.deepcopy(a)
    opt_a = MFAC(a.parameters(), lr=1e-2, relative_damp=1e12, weight_decay=0.01)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.01)
    for _ in range(5):
        x = torch.randn(8, 6)
        for mod, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            mod(x).square().mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window_scope", ["tensor", "model"])
def test_graft_keeps_the_direction_and_takes_adamw_length(window_scope):
    """graft=True: every tensor's step is the ungrafted step's direction on that tensor, at
    AdamW's length (AdamW's step = the step at damp -> inf), over steps that wrap the window;
    with one global window the graft is still per tensor."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 3)
    mods = [copy.deepcopy(base) for _ in range(3)]
    opts = [
        MFAC(mods[0].parameters(), lr=1e-2, ngrads=3, window_scope=window_scope, graft=True),
        MFAC(mods[1].parameters(), lr=1e-2, ngrads=3, window_scope=window_scope),
        MFAC(
            mods[2].parameters(),
            lr=1e-2,
            ngrads=3,
            window_scope=window_scope,
            relative_damp=1e12,
        ),
    ]
    for i in range(7):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(i))
        grads = None
        for mod, opt in zip(mods, opts, strict=True):
            opt.zero_grad()
            mod(x).square().mean().backward()
            if grads is None:
                grads = [p.grad.clone() for p in mod.parameters()]
            for p, g in zip(mod.parameters(), grads, strict=True):
                p.grad = g.clone()  # the same gradient for all three (parameters differ)
        before = [[p.detach().clone() for p in mod.parameters()] for mod in mods]
        for opt in opts:
            opt.step()
        steps = [
            torch.cat(
                [(b - p.detach()).reshape(-1) for b, p in zip(bs, mod.parameters(), strict=True)]
            )
            for bs, mod in zip(before, mods, strict=True)
        ]
        sizes = [p.numel() for p in base.parameters()]
        parts = [s.split(sizes) for s in steps]  # per tensor, for a model-wide window too
        for grafted, plain, adamw in zip(*parts, strict=True):
            torch.testing.assert_close(grafted.norm(), adamw.norm(), rtol=1e-5, atol=0)
            cos = torch.dot(grafted, plain) / (grafted.norm() * plain.norm())
            assert float(cos) > 1 - 1e-5


def test_invariant_to_gradient_scale():
    """Scaling the loss by 1e4 changes nothing (up to eps), for each design."""
    for case in CASES:
        runs = []
        for scale in (1.0, 1e4):
            torch.manual_seed(0)
            mod = torch.nn.Linear(5, 2)
            opt = MFAC(mod.parameters(), lr=1e-2, ngrads=4, eps=1e-12, **case)
            for i in range(6):
                x = torch.randn(7, 5, generator=torch.Generator().manual_seed(i))
                opt.zero_grad()
                (scale * mod(x).square().mean()).backward()
                opt.step()
            runs.append([p.detach().clone() for p in mod.parameters()])
        for pa, pb in zip(*runs, strict=True):
            torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_resume_is_bit_identical():
    def batch(i):
        return torch.randn(9, 4, generator=torch.Generator().manual_seed(i))

    def train(mod, opt, steps):
        for i in steps:
            opt.zero_grad()
            mod(batch(i)).square().mean().backward()
            opt.step()

    torch.manual_seed(0)
    mod = torch.nn.Linear(4, 3)
    ref = copy.deepcopy(mod)
    opt = MFAC(mod.parameters(), ngrads=3, window_scope="tensor")
    train(mod, opt, range(5))
    saved_mod, saved_opt = copy.deepcopy(mod.state_dict()), copy.deepcopy(opt.state_dict())
    train(mod, opt, range(5, 9))
    ref_opt = MFAC(ref.parameters(), ngrads=3, window_scope="tensor")
    ref.load_state_dict(saved_mod)
    ref_opt.load_state_dict(saved_opt)
    train(ref, ref_opt, range(5, 9))
    for pa, pb in zip(mod.parameters(), ref.parameters(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=-1.0),
        dict(relative_damp=0.0),
        dict(relative_damp=float("nan")),
        dict(ngrads=0),
        dict(power=2.0),
        dict(whiten="sgd"),
        dict(window_scope="layer"),
        dict(whiten="none", power=1.0),
        dict(betas=(0.9, 1.0)),
        dict(eps=0.0),
        dict(weight_decay=-0.1),
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises((ValueError, TypeError)):
        MFAC(torch.nn.Linear(2, 2).parameters(), **kwargs)


@pytest.mark.parametrize(
    ("options", "bad", "where"),
    [({}, ("bias", (0,), float("nan")), "#1"),
     (dict(window_scope="model", layout="topk", topk=2), ("weight", (0, 0), float("inf")), "#0")],
    ids=["dense", "topk"],
)  # fmt: skip
def test_nonfinite_gradient_changes_nothing(options, bad, where):
    torch.manual_seed(0)
    mod = torch.nn.Linear(3, 2)
    opt = MFAC(mod.parameters(), lr=1e-2, ngrads=2, **options)
    mod(torch.randn(4, 3)).sum().backward()
    opt.step()
    before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in mod.parameters()]
    name, index, value = bad
    getattr(mod, name).grad[index] = value
    with pytest.raises(ValueError, match=where):
        opt.step()
    after = opt.state_dict()
    for pa, pb in zip(before[1], mod.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert_state_equal(before[0], after)


def test_parameter_without_grad_is_not_updated():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    opt = MFAC([a, b], lr=0.1, weight_decay=0.5)
    before = b.detach().clone()
    a.grad = torch.randn(3)
    opt.step()
    assert torch.equal(b.detach(), before)


def test_batched_coeffs_match_one_by_one():
    """Blocks of one batched call, an all-zero block among them, equal separate calls."""
    gen = torch.Generator().manual_seed(3)
    zs = [torch.randn(4, 6, generator=gen, dtype=F64), torch.zeros(4, 6, dtype=F64)]
    zs.append(torch.randn(4, 6, generator=gen, dtype=F64))
    grams = torch.stack([z @ z.T / 4 for z in zs])
    w, lams = window_coeffs(grams, [4, 0, 2], 0.7, 1.0)
    assert lams[1] == 0.0 and torch.equal(w[1], torch.zeros(4, 4, dtype=F64))
    for i, filled in ((0, 4), (2, 2)):
        wi, lam = window_coeff(grams[i], filled, 0.7, 1.0)
        assert lam == pytest.approx(lams[i], rel=1e-15)
        torch.testing.assert_close(w[i], wi, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- one top-k window (EFCP)


def topk_oracle_step(
    state, params, grads, opt, lr, damp, power, whiten, graft, betas, eps, stored=F64
):
    """One step of the global top-k rule in float64, after ``opt.step()`` ran on the same
    gradients: Adam moments, z and u; a = e + z; the optimizer's new row must be a top-k of
    |a| (its choice among ties is taken); c = a on those coordinates (rounded to ``stored``,
    the window's dtype), e = a - c; the window
    holds the last m rows c; S = Z^T Z / m, lam = damp tr(S) / n, s = (I + S/lam)^-p u (dense
    d x d), grafted per tensor. Returns the float64 parameters after the step."""
    b1, b2 = betas
    state["t"] += 1
    t = state["t"]
    zs, us, adamw = [], [], []
    for i, g in enumerate(grads):
        g = g.to(F64).reshape(-1)
        state["ea"][i] = b1 * state["ea"][i] + (1 - b1) * g
        state["es"][i] = b2 * state["es"][i] + (1 - b2) * g * g
        mhat = state["ea"][i] / (1 - b1**t)
        den = torch.sqrt(state["es"][i] / (1 - b2**t)) + eps
        adamw.append(mhat / den)
        zs.append(g / den if whiten == "adam" else g)
        us.append(mhat / den if whiten == "adam" else mhat)
    z, u = torch.cat(zs), torch.cat(us)
    a = state["e"] + z
    op = opt.windows[0]
    chosen = op.row((t - 1) % op.window)[1].long()
    rest = torch.ones_like(a, dtype=torch.bool)
    rest[chosen] = False
    assert chosen.unique().numel() == op.k
    if bool(rest.any()):  # a top-k of |a| (up to float32 rounding of ties)
        assert float(a[chosen].abs().min()) >= float(a[rest].abs().max()) * (1 - 1e-5)
    c = torch.zeros_like(a)
    c[chosen] = a[chosen].to(stored).to(F64)
    state["e"] = a - c
    state["rows"].append(c)
    m = op.window
    zmat = torch.zeros(m, a.numel(), dtype=F64)
    window = state["rows"][-m:]
    zmat[: len(window)] = torch.stack(window)
    smat = zmat.T @ zmat / m
    lam = damp * float(torch.trace(smat)) / len(window)
    s = dense_power(smat, lam, power) @ u
    if whiten == "none":
        s = s / lam**0.5
    sizes = [p.numel() for p in params]
    out = []
    for p, piece, aw in zip(params, s.split(sizes), adamw, strict=True):
        if graft:
            piece = piece * aw.norm() / piece.norm()
        out.append(p - lr * piece.view_as(p))
    return out


TOPK_CASES = [
    dict(power=1.0, whiten="adam", graft=True, topk=0.3),
    dict(power=1.0, whiten="adam", graft=False, topk=5),
    dict(power=0.5, whiten="adam", graft=True, topk=0.3),
    dict(power=0.5, whiten="none", graft=False, topk=0.5),
    dict(power=1.0, whiten="adam", graft=True, topk=1.0),  # k = d: the dense global window
    dict(power=1.0, whiten="adam", graft=True, topk=0.3, window_dtype=torch.bfloat16),
]


@pytest.mark.parametrize("case", TOPK_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_topk_window_matches_dense_float64_oracle(case):
    """The global top-k rule equals the float64 formula on the dense rows c of an
    error-feedback top-k window, over 8 steps that wrap a 3-slot window."""
    shapes = [(3, 4), (5,), (2, 2)]
    gen = torch.Generator().manual_seed(4)
    scales = [1.0, 1e-3, 30.0]
    lr, damp, betas, eps = 0.05, 0.3, (0.9, 0.99), 1e-8
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    want = [p.detach().to(F64) for p in params]
    opt = MFAC(
        params, lr=lr, ngrads=3, relative_damp=damp, betas=betas, window_scope="model",
        layout="topk",
        **case,
    )  # fmt: skip
    assert opt.windows[0].k == (5 if case["topk"] == 5 else round(case["topk"] * 21))
    state = {
        "t": 0,
        "ea": [torch.zeros(p.numel(), dtype=F64) for p in params],
        "es": [torch.zeros(p.numel(), dtype=F64) for p in params],
        "e": torch.zeros(21, dtype=F64),
        "rows": [],
    }
    kw = {k: case[k] for k in ("power", "whiten", "graft")}
    kw["stored"] = case.get("window_dtype", F64)
    for _ in range(8):
        grads = [torch.randn(s, generator=gen) * sc for s, sc in zip(shapes, scales, strict=True)]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        want = topk_oracle_step(state, want, grads, opt, lr, damp, betas=betas, eps=eps, **kw)
        for p, w in zip(params, want, strict=True):
            torch.testing.assert_close(p.detach().to(F64), w, rtol=2e-5, atol=2e-6)
    op = opt.windows[0]
    rows = torch.stack(state["rows"][-3:])  # slots of steps 6, 7, 8: 2, 0, 1
    rtol = 1e-5 if kw["stored"] == F64 else 1e-2  # one bfloat16 rounding step, at most
    torch.testing.assert_close(op.dense_rows().to(F64)[[2, 0, 1]], rows, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(op.error.to(F64), state["e"], rtol=1e-5, atol=1e-5)


def test_topk_window_at_native_selection_size_matches_svd_oracle():
    """d > 65,536 (the C selection pass): the step equals u + V((1 + sigma^2/(m lam))^-1 - 1)
    V^T u from a float64 SVD of the dense rows (no d x d matrix), over a wrapped window."""
    sizes = [70_000, 7]
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    opt = MFAC(
        params, lr=1.0, ngrads=3, window_scope="model", layout="topk", topk=0.01, graft=False,
        betas=(0.0, 0.5),
    )  # fmt: skip
    op = opt.windows[0]
    es = torch.zeros(sum(sizes), dtype=F64)
    err = torch.zeros(sum(sizes), dtype=F64)
    rows: list[torch.Tensor] = []
    for t in range(1, 6):
        g = torch.randn(sum(sizes), generator=gen) * torch.linspace(0.1, 3.0, sum(sizes))
        for p, piece in zip(params, g.split(sizes), strict=True):
            p.grad = piece.clone()
        before = torch.cat([p.detach().reshape(-1) for p in params]).to(F64)
        opt.step()
        step = before - torch.cat([p.detach().reshape(-1) for p in params]).to(F64)
        g64 = g.to(F64)
        es = 0.5 * es + 0.5 * g64 * g64
        den = torch.sqrt(es / (1 - 0.5**t)) + 1e-8
        u = g64 / den  # b1 = 0: the momentum is the gradient
        a = err + u
        chosen = op.row((t - 1) % 3)[1].long()
        c = torch.zeros_like(a)
        c[chosen] = a[chosen]
        kth = float(a.abs().kthvalue(a.numel() - op.k + 1).values)
        assert float(a[chosen].abs().min()) >= kth * (1 - 1e-5)  # a top-k of |a|
        err = a - c
        rows.append(c)
        zmat = torch.stack(rows[-3:])
        lam = float((zmat * zmat).sum()) / 3 / zmat.shape[0]
        _, sig, vt = torch.linalg.svd(zmat, full_matrices=False)
        f = 1.0 / (1.0 + sig**2 / (3 * lam)) - 1.0
        want = u + vt.T @ (f * (vt @ u))
        torch.testing.assert_close(step, want, rtol=1e-4, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(
    m=st.integers(1, 4),
    steps=st.integers(1, 9),
    d=st.integers(2, 30),
    frac=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
)
def test_topk_window_invariants_over_wraparound(m, steps, d, frac, seed):
    """Error feedback loses nothing (sum of every row ever pushed + e = sum of every z), and
    the stored G G^T is the Gram matrix of the stored rows, however often the ring wraps."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.zeros(d))
    opt = MFAC([p], ngrads=m, window_scope="model", layout="topk", topk=frac, betas=(0.0, 0.9))
    op = opt.windows[0]
    pushed = torch.zeros(d, dtype=F64)
    zsum = torch.zeros(d, dtype=F64)
    es = torch.zeros(d, dtype=F64)
    for t in range(1, steps + 1):
        g = torch.randn(d, generator=gen)
        p.grad = g.clone()
        opt.step()
        es = 0.9 * es + 0.1 * g.to(F64) ** 2
        zsum += g.to(F64) / (torch.sqrt(es / (1 - 0.9**t)) + 1e-8)
        pushed += op.dense_rows()[(t - 1) % m].to(F64)
    torch.testing.assert_close(pushed + op.error.to(F64), zsum, rtol=1e-5, atol=1e-5)
    rows = op.dense_rows().to(F64)
    torch.testing.assert_close(op.factor.gram, rows @ rows.T, rtol=1e-6, atol=1e-6)
    assert opt.windows[0].filled == min(steps, m)


def _topk_train(mod, opt, steps):
    for i in steps:
        x = torch.randn(9, 4, generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        mod(x).square().mean().backward()
        opt.step()


def test_topk_resume_is_bit_identical_and_a_wrong_state_changes_nothing():
    kw = dict(lr=1e-2, ngrads=3, window_scope="model", layout="topk", topk=0.4)
    torch.manual_seed(0)
    mod = torch.nn.Linear(4, 3)
    ref = copy.deepcopy(mod)
    opt = MFAC(mod.parameters(), **kw)
    assert type(opt) is MFAC
    _topk_train(mod, opt, range(5))
    saved_mod, saved_opt = copy.deepcopy(mod.state_dict()), copy.deepcopy(opt.state_dict())
    _topk_train(mod, opt, range(5, 9))
    ref_opt = MFAC(ref.parameters(), **kw)
    ref.load_state_dict(saved_mod)
    ref_opt.load_state_dict(saved_opt)
    _topk_train(ref, ref_opt, range(5, 9))
    for pa, pb in zip(mod.parameters(), ref.parameters(), strict=True):
        assert torch.equal(pa, pb)
    # states that do not fit: a dense window, another k, an edited row; nothing is written
    dense = MFAC(torch.nn.Linear(4, 3).parameters(), lr=1e-2, ngrads=3, window_scope="model")
    _topk_train(torch.nn.Linear(4, 3), dense, range(1))
    other_k = copy.deepcopy(saved_opt)
    blk = other_k["state"][0]["window"]
    blk["values"], blk["indices"] = blk["values"][:, :-1], blk["indices"][:, :-1]
    edited = copy.deepcopy(saved_opt)
    edited["state"][0]["window"]["values"].add_(1.0)  # every stored row (and the spare)
    fresh = MFAC(torch.nn.Linear(4, 3).parameters(), **kw)
    _topk_train(torch.nn.Linear(4, 3), fresh, range(2))
    before = copy.deepcopy(fresh.state_dict())
    for bad, error, match in (
        (dense.state_dict(), KeyError, r"state\[0\]\['window'\]: .*'error'"),
        (other_k, ValueError, "3 rows of 6 entries|needs"),
        (edited, ValueError, "differs from m\\*damp\\*I \\+ G G"),
    ):
        with pytest.raises(error, match=match):
            fresh.load_state_dict(bad)
        assert_state_equal(before, fresh.state_dict())


def test_topk_memory_is_checked_before_anything_is_built():
    p = torch.nn.Parameter(torch.randn(5000))
    before = p.detach().clone()
    kw = dict(lr=1e-3, ngrads=64, window_scope="model", layout="topk", topk=0.5)
    with pytest.raises(MemoryError, match=r"top-k window of 64 rows x 2500 entries.*needs"):
        MFAC([p], memory_budget=100_000, **kw)
    assert torch.equal(p.detach(), before) and p.grad is None
    need = MFAC([p], **kw).required_bytes([5000])
    opt = MFAC([p], memory_budget=need, **kw)
    assert opt.state_nbytes <= need
    dense = MFAC([p], ngrads=256, window_scope="model").required_bytes([10**7])
    sparse = MFAC([p], ngrads=256, window_scope="model", layout="topk", topk=10**5)
    sparse = sparse.required_bytes([10**7])
    assert 256 * 10**5 * 8 < sparse < dense / 10  # 1 % rows: values + int32 indices


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(topk=0.0), r"density must lie in \(0, 1\]"),
        (dict(topk=1.5), r"density must lie in \(0, 1\]"),
        (dict(topk=float("nan")), r"density must lie in \(0, 1\]"),
        (dict(topk=0), "topk must be >= 1"),
        (dict(topk=True), "topk must be an int or a float"),
        (dict(topk="1%"), "topk must be an int or a float"),
        (dict(topk=None), "needs topk"),
        (dict(window_scope="tensor", topk=0.1), "needs window_scope='model'"),
        (dict(layout="sparse", topk=0.1), "layout must be one of"),
        (dict(layout="dense", topk=0.1), "topk is only used with layout='topk'"),
    ],
)
def test_bad_topk_options_are_refused_by_name(kwargs, match):
    p = torch.nn.Parameter(torch.randn(6))
    before = p.detach().clone()
    kw = {"window_scope": "model", "layout": "topk", **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        MFAC([p], lr=1e-3, **kw)
    assert torch.equal(p.detach(), before) and p.grad is None


def test_topk_torch_path_matches_the_c_kernels():
    """The torch gathers/scatters/selection (CUDA, or no C compiler) give the C kernels' steps."""
    torch.manual_seed(0)
    base = torch.nn.Linear(300, 250)  # d = 75,250 > SMALL_SELECT: the C selection runs
    assert sum(p.numel() for p in base.parameters()) > SMALL_SELECT
    mods = [copy.deepcopy(base) for _ in range(2)]
    kw = dict(lr=1e-2, ngrads=3, window_scope="model", layout="topk", topk=0.05)
    opts = [MFAC(mod.parameters(), **kw) for mod in mods]
    opts[1].windows[0].to_torch_path()
    for i in range(7):
        x = torch.randn(16, 300, generator=torch.Generator().manual_seed(i))
        for mod, opt in zip(mods, opts, strict=True):
            opt.zero_grad()
            mod(x).square().mean().backward()
            opt.step()
    for pa, pb in zip(*(mod.parameters() for mod in mods), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    rows = [opt.windows[0].dense_rows() for opt in opts]
    torch.testing.assert_close(rows[0], rows[1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- checkpoints: refusals, dtypes
def _nan_first(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


W0, W1 = ("state", 0, "window"), ("state", 1, "window")  # the weight's and the bias's windows
CORRUPTIONS = {
    "missing gram of the last window": (_delete((*W1, "gram")), KeyError, "gram"),
    "missing step": (_delete(("state", 0, "step")), ValueError, "step"),
    "negative step": (_set(("state", 0, "step"), -1), ValueError, "step"),
    "pointer off the ring": (_set((*W0, "next_slot"), 7), ValueError, "next_slot"),
    "NaN in a row": (_set((*W1, "grads"), _nan_first), ValueError, "NaN"),
    "row edited after K": (_set((*W0, "grads"), lambda t: t * 2), ValueError, "kept across"),
    "no window": (_delete(W0), KeyError, r"state\[0\]\['window'\]"),
    "a damped window": (_set((*W0, "damp"), 1.0), ValueError, "damp"),
    "moment of another shape": (
        _set(("state", 1, "exp_avg"), lambda t: t[:-1].clone()), ValueError, "exp_avg"
    ),
    "moment in float64": (
        _set(("state", 1, "exp_avg_sq"), lambda t: t.double()), TypeError, "exp_avg_sq"
    ),
    "a mask": (_set(("state", 1, "mask"), torch.ones(3, dtype=torch.bool)), ValueError, "mask"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_bad_state_is_refused_before_anything_is_written(name):
    """Every field is checked before the moments, windows or step count change."""
    edit, error, match = CORRUPTIONS[name]
    torch.manual_seed(0)
    mod = torch.nn.Linear(4, 3)  # two tensors: two windows
    opt = MFAC(mod.parameters(), ngrads=3, share_below=1)
    _topk_train(mod, opt, range(5))
    saved = copy.deepcopy(opt.state_dict())
    edit(saved)
    other = torch.nn.Linear(4, 3)
    target = MFAC(other.parameters(), ngrads=3, share_below=1)
    _topk_train(other, target, range(10, 12))
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(error, match=match):
        target.load_state_dict(saved)
    assert_state_equal(before, target.state_dict())


@pytest.mark.parametrize("window_scope", ["tensor", "model"])
def test_a_state_dict_kept_across_a_step_is_refused(window_scope):
    """state_dict() holds the windows by reference; kept across a step its K no longer matches
    its rows, and loading it is refused instead of silently mixing two steps."""
    torch.manual_seed(0)
    mod = torch.nn.Linear(4, 3)
    opt = MFAC(mod.parameters(), ngrads=3, window_scope=window_scope)
    _topk_train(mod, opt, range(4))
    held = opt.state_dict()
    _topk_train(mod, opt, range(4, 5))
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="kept across a later step"):
        opt.load_state_dict(held)
    assert_state_equal(before, opt.state_dict())


def test_bfloat16_parameters_resume_with_float32_moments():
    """torch casts loaded moments to the parameter's dtype; this rule keeps float32 moments
    (adopted from the given dict, as torch adopts them, since they are float32 already)."""
    torch.manual_seed(0)
    mod = torch.nn.Linear(4, 3).to(torch.bfloat16)
    opt = MFAC(mod.parameters(), ngrads=3)

    def train(steps):
        for i in steps:
            x = torch.randn(9, 4, generator=torch.Generator().manual_seed(i)).bfloat16()
            opt.zero_grad()
            mod(x).float().square().mean().backward()
            opt.step()

    train(range(3))
    saved = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(saved)
    for index, p in enumerate(mod.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            mine = opt.state[p][key]
            assert mine.dtype == torch.float32
            assert torch.equal(mine, saved["state"][index][key])
            assert mine.data_ptr() == saved["state"][index][key].data_ptr()
    train(range(3, 5))  # steps after the load run


def test_topk_scatter_refuses_a_wrong_buffer_or_coefficients():
    op = TopKSlidingInverseFisher(100, 3, 10)
    op.push(torch.randn(100))
    coeff = torch.randn(3, dtype=torch.float64)
    for out in (torch.zeros(100, dtype=torch.float64), torch.zeros(99), torch.zeros(200)[::2]):
        with pytest.raises(ValueError, match="out must be"):
            op.scatter(coeff, out=out)
    with pytest.raises(ValueError, match="coeff"):
        op.scatter(torch.randn(4, dtype=torch.float64))
    torch.testing.assert_close(
        op.scatter(coeff, out=torch.empty(100)), op.dense_rows().T @ coeff.float()
    )


def test_topk_without_whitening_refuses_an_overflowing_error_feedback_sum():
    """With whiten='none' the window compresses e + g for the raw g; a sum past float32's
    range is refused before Adam's moments change."""
    torch.manual_seed(0)
    mod = torch.nn.Linear(3, 2)
    kw = dict(ngrads=2, window_scope="model", layout="topk", topk=2, whiten="none", power=0.5)
    opt = MFAC(mod.parameters(), **kw)
    mod(torch.randn(4, 3)).sum().backward()
    opt.step()
    opt.windows[0].error.fill_(torch.finfo(torch.float32).max)
    before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in mod.parameters()]
    with pytest.raises(NonFiniteGradientError, match="overflows float32"):
        opt.step()
    assert_state_equal(before[0], opt.state_dict())
    for pa, pb in zip(before[1], mod.parameters(), strict=True):
        assert torch.equal(pa, pb)


# ------------------------------------------------------------- the class: defaults, refusals
def test_defaults_and_copies():
    """MFAC(params, lr) is the default rule with undamped windows, one per tensor of at least
    1024 entries and one shared by the smaller ones (held by the first of them); it survives
    deepcopy and pickling as itself."""
    import pickle

    params = [nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(40, 30)),
              nn.Parameter(torch.randn(2))]  # fmt: skip
    opt = MFAC(params, lr=1e-3)
    cfg = opt.cfg
    assert (cfg.ngrads, cfg.relative_damp, cfg.graft, cfg.window_scope) == (32, 1.0, True, "tensor")
    assert (cfg.share_below, cfg.orthogonal_momentum) == (1024, 0.95)
    assert len(opt.windows) == 2 and all(w.damp is None for w in opt.windows)
    assert [w.dim for w in opt.windows] == [1200, 8]
    assert opt.state[params[1]]["window"] is opt.windows[0] and opt.steps == 0
    assert opt.state[params[0]]["window"] is opt.windows[1] and "window" not in opt.state[params[2]]
    assert type(copy.deepcopy(opt)) is MFAC
    assert type(pickle.loads(pickle.dumps(opt))) is MFAC
    for w in opt.windows:  # undamped windows have no inverse to apply
        with pytest.raises(RuntimeError, match="without damping"):
            w.ihvp(torch.zeros(w.dim))


@pytest.mark.parametrize(
    ("option", "value"),
    [("momentum", 0.9), ("damp", 1e-4), ("decoupled_weight_decay", True),
     ("gradient_scaling", None), ("mode", "paper"), ("history", "topk"),
     ("history_dtype", torch.bfloat16), ("blocks", "global")],
)  # fmt: skip
def test_options_of_mfacsgd_and_old_names_are_refused_by_name(option, value):
    """An option of MFACSGD (momentum, the absolute damp, ...) or a removed name is refused
    with a TypeError naming it and listing what MFAC takes; nothing is touched."""
    p = nn.Parameter(torch.randn(4))
    before = p.detach().clone()
    with pytest.raises(TypeError, match=rf"unknown options for MFAC: \['{option}'\]; it takes"):
        MFAC([p], lr=1e-3, **{option: value})
    assert torch.equal(p.detach(), before) and p.grad is None


def test_unknown_options_are_all_named_and_options_are_keyword_only():
    p = nn.Parameter(torch.randn(4))
    with pytest.raises(TypeError, match=r"\['bar', 'foo'\].*'relative_damp'"):
        MFAC([p], lr=1e-3, foo=1, bar=2)
    with pytest.raises(TypeError, match="positional"):
        MFAC([p], 1e-3, 0.0, 8)  # ngrads=8 positionally: the old paper signature


def test_set_masks_is_refused():
    p = nn.Parameter(torch.randn(4))
    opt = MFAC([p], lr=1e-3)
    with pytest.raises(NotImplementedError, match="MFACSGD"):
        opt.set_masks({p: torch.ones(4, dtype=torch.bool)})


@pytest.mark.parametrize("window_scope", ["tensor", "model"])
def test_state_dict_holds_its_windows_without_a_copy(window_scope):
    """A partly filled window saves copies of its filled rows only (a checkpoint grows with the
    window); a full one is handed out by reference, as torch.optim hands out its moments (a
    checkpoint must not double the largest buffer)."""
    torch.manual_seed(0)
    mod = torch.nn.Linear(4, 3)
    opt = MFAC(mod.parameters(), lr=1e-2, ngrads=4, window_scope=window_scope, share_below=1)
    holders = [0, 1] if window_scope == "tensor" else [0]
    _topk_train(mod, opt, range(3))
    sd = opt.state_dict()
    for index, window in zip(holders, opt.windows, strict=True):
        saved = sd["state"][index]["window"]
        assert saved["grads"].shape == (3, window.dim)
        assert torch.equal(saved["grads"], window.grads[:3])
        assert saved["grads"].data_ptr() != window.grads.data_ptr()
    _topk_train(mod, opt, range(3, 5))
    sd = opt.state_dict()
    assert len(opt.windows) == len(holders)
    for index, window in zip(holders, opt.windows, strict=True):
        saved = sd["state"][index]["window"]
        assert saved["grads"].data_ptr() == window.grads.data_ptr()
        assert saved["damp"] is None and saved["inverse"].numel() == 0
    if window_scope == "model":
        assert "window" not in sd["state"][1]
    assert sd["state"][0]["step"] == 5 and "step" not in sd["state"][1]


def test_add_param_group_keeps_per_tensor_windows_and_restarts_a_model_wide_one():
    torch.manual_seed(0)
    a, b, c = (nn.Parameter(torch.randn(n)) for n in (4, 3, 2))
    per_tensor = MFAC([a, b], lr=1e-2, ngrads=3, share_below=1)
    model_wide = MFAC([a, b], lr=1e-2, ngrads=3, window_scope="model")
    for opt in (per_tensor, model_wide):
        for _ in range(2):
            a.grad, b.grad = torch.randn(4), torch.randn(3)
            opt.step()
    kept = per_tensor.windows
    moments = per_tensor.state[a]["exp_avg"]
    per_tensor.add_param_group({"params": [c], "lr": 1e-3})
    assert per_tensor.windows[:2] == kept and per_tensor.windows[2].num_pushed == 0
    assert per_tensor.state[a]["exp_avg"] is moments and per_tensor.steps == 2
    model_wide.add_param_group({"params": [c], "lr": 1e-3})
    assert len(model_wide.windows) == 1 and model_wide.windows[0].dim == 9
    assert model_wide.windows[0].num_pushed == 0 and model_wide.steps == 2
    for opt in (per_tensor, model_wide):
        a.grad, b.grad, c.grad = torch.randn(4), torch.randn(3), torch.randn(2)
        opt.step()
        assert opt.steps == 3 and all(w.num_pushed >= 1 for w in opt.windows)


def test_checks_memory_before_allocating():
    """A window that does not fit the budget is refused with the bytes needed and what helps,
    and nothing (no state, no window) is built."""
    p = nn.Parameter(torch.randn(1000))
    with pytest.raises(MemoryError, match=r"needs .* over the memory budget") as err:
        MFAC([p], lr=1e-3, ngrads=64, memory_budget=100_000)
    assert "window_dtype=torch.bfloat16" in str(err.value)
    assert "layout='topk'" in str(err.value) and "process group" not in str(err.value)
    opt = MFAC([p], lr=1e-3, ngrads=4, memory_budget=1_000_000)
    assert opt.state_nbytes <= 1_000_000
