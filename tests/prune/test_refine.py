"""Batched PCG on a fixed mask (mfac.prune.refine): the exact per-row restricted least squares
in float64, monotone from the warm start, the mask held exactly, non-convergence reported by
name, refusals that leave the weight (and the model) as they were, and ``refine="pcg"``
through ``sparsegpt`` and ``oneshot``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mfac.prune as mp
from mfac.prune import refine
from mfac.prune.methods.sparsegpt import prune_layer, sparsegpt
from mfac.prune.refine import damped_gram, fisher_lambda, joint_pcg, refine_weights

from prune_models import _chain, _chain_loss, _layers, _run, _same, _snapshot

F64 = torch.float64


def _problem(rows: int, cols: int, samples: int, density: float, seed: int = 0):
    """Dense weights, inputs X (samples x cols), Gram X^T X and a random keep-mask."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, cols, generator=gen, dtype=F64)
    x = x * torch.linspace(0.2, 3.0, cols, dtype=F64)  # uneven input scales
    w0 = torch.randn(rows, cols, generator=gen, dtype=F64)
    mask = torch.rand(rows, cols, generator=gen) < density
    return w0, x, x.T @ x, mask


def _exact(w0: torch.Tensor, h: torch.Tensor, mask: torch.Tensor, damp: float) -> torch.Tensor:
    """Row by row: w_S = A[S, S]^-1 (A w0)_S with A the damped Gram (the float64 reference)."""
    a = damped_gram(h, damp)
    out = torch.zeros_like(w0)
    for i in range(w0.shape[0]):
        s = mask[i]
        if bool(s.any()):
            out[i, s] = torch.linalg.solve(a[s][:, s], (w0[i] @ a)[s])
    return out


def _objective(w: torch.Tensor, w0: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Per-row tr((w - w0) A (w - w0)^T)."""
    d = w - w0
    return ((d @ a) * d).sum(1)


@pytest.mark.parametrize("damp", [1e-3, 0.1])
@pytest.mark.parametrize("density", [0.3, 0.5, 0.9])
def test_pcg_equals_restricted_least_squares(density: float, damp: float) -> None:
    w0, _, h, mask = _problem(9, 24, 64, density)
    mask[0] = False  # an empty row
    mask[1] = True  # a dense row
    w = w0.clone()
    rep = refine_weights(w, mask, h, iters=200, tol=1e-13, damp=damp)
    assert rep.converged and rep.residual <= 1e-13
    assert torch.allclose(w, _exact(w0, h, mask, damp), rtol=0, atol=1e-8)
    assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))  # the mask held exactly


def test_nm_mask_and_dead_inputs() -> None:
    """A 2:4 mask from SparseGPT and inputs that are always zero (zero Gram rows)."""
    w0, x, _, _ = _problem(6, 16, 40, 0.5, seed=1)
    x[:, [3, 10]] = 0.0
    h = x.T @ x
    start, keep = prune_layer(w0, h, 0.5, (2, 4), block=16)
    w = w0.clone()
    rep = refine_weights(w, keep, h, start=start, iters=100, tol=1e-13, pattern="2:4")
    assert rep.converged
    assert torch.allclose(w, _exact(w0, h, keep, 0.01), rtol=0, atol=1e-8)
    assert torch.equal(w != 0, keep & (w != 0)) and bool((w[~keep] == 0).all())


@pytest.mark.parametrize("iters", [1, 2, 5, 50])
def test_error_never_increases_from_sparsegpt(iters: int) -> None:
    """Every row's damped objective is at most SparseGPT's; the undamped output error
    ||X (W - W0)^T||^2 of the layer falls too once CG has run a few steps."""
    w0, x, h, _ = _problem(12, 32, 48, 0.5, seed=2)
    start, keep = prune_layer(w0, h, 0.6, None, block=8)
    a = damped_gram(h, 0.01)
    w = w0.clone()
    rep = refine_weights(w, keep, h, start=start, iters=iters, tol=1e-12)
    assert bool((_objective(w, w0, a) <= _objective(start, w0, a) + 1e-10).all())
    assert rep.error_end <= rep.error_start
    assert rep.error_start == pytest.approx(float(_objective(start, w0, a).sum()), rel=1e-10)
    assert rep.error_end == pytest.approx(float(_objective(w, w0, a).sum()), rel=1e-10)
    out_err = lambda v: float((x @ (v - w0).T).square().sum())  # noqa: E731
    if iters >= 5:
        assert out_err(w) < out_err(start)
    assert torch.equal(w[~keep], torch.zeros_like(w[~keep]))


def test_float32_weights_close_to_float64() -> None:
    """A float32 weight is solved in float32 (per-row scalars in float64) and lands near the
    float64 solution; the result keeps the weight's dtype."""
    w0, _, h, mask = _problem(16, 48, 96, 0.5, seed=3)
    w = w0.float()
    rep = refine_weights(w, mask, h.float(), iters=200, tol=1e-5, damp=0.1)
    ref = _exact(w0, h, mask, 0.1)
    assert w.dtype == torch.float32 and rep.converged
    assert float((w.double() - ref).norm() / ref.norm()) < 1e-4
    assert bool((w[~mask] == 0).all())


def test_refines_a_parameter_in_place() -> None:
    """A layer's weight (an nn.Parameter with grad enabled) is written in place."""
    w0, _, h, mask = _problem(5, 10, 30, 0.5, seed=6)
    layer = torch.nn.Linear(10, 5, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(w0)
    ref = _exact(w0, h, mask, 0.01)
    refine_weights(layer.weight, mask, h, iters=50, tol=1e-13)
    assert layer.weight.requires_grad and torch.allclose(layer.weight, ref, rtol=0, atol=1e-8)


def test_conv_weight_is_flattened() -> None:
    gen = torch.Generator().manual_seed(4)
    w0 = torch.randn(4, 2, 3, 3, generator=gen, dtype=F64)
    x = torch.randn(50, 18, generator=gen, dtype=F64)
    mask = torch.rand(4, 2, 3, 3, generator=gen) < 0.5
    w = w0.clone()
    refine_weights(w, mask, x.T @ x, iters=100, tol=1e-13)
    ref = _exact(w0.reshape(4, 18), x.T @ x, mask.reshape(4, 18), 0.01)
    assert torch.allclose(w.reshape(4, 18), ref, rtol=0, atol=1e-8)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 12),
    samples=st.integers(1, 30),
    density=st.floats(0.0, 1.0),
    damp=st.sampled_from([1e-2, 0.1, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(rows, cols, samples, density, damp, seed) -> None:
    """On any small problem (rank-deficient Gram included) CG with cols + 5 iterations gives the
    exact restricted solve, zeros off the mask, and no row worse than its warm start."""
    w0, _, h, mask = _problem(rows, cols, samples, density, seed)
    a = damped_gram(h, damp)
    start = w0 * mask
    w = w0.clone()
    rep = refine_weights(w, mask, h, iters=cols + 5, tol=1e-14, damp=damp)
    scale = 1.0 + float(w0.abs().max())
    assert torch.allclose(w, _exact(w0, h, mask, damp), rtol=0, atol=1e-8 * scale)
    assert bool((w[~mask] == 0).all())
    assert bool((_objective(w, w0, a) <= _objective(start, w0, a) + 1e-9 * scale**2).all())
    assert rep.iterations <= cols + 5


def _refused(w: torch.Tensor, match: str, *args, **kwargs) -> None:
    before = w.clone()
    with pytest.raises((ValueError, TypeError), match=match):
        refine_weights(w, *args, **kwargs)
    assert torch.equal(w, before)


def test_refusals_leave_the_weight_untouched() -> None:
    w0, _, h, mask = _problem(4, 8, 20, 0.5)
    w = w0.clone()
    _refused(w, "mask must have the weight's shape", mask[:, :4], h)
    _refused(w, "mask must be boolean or 0/1", mask.double() * 2, h)
    _refused(w, "hessian must be square, 8 x 8", mask, h[:, :6])
    _refused(w, "hessian must be square", mask, h[:6, :6])
    bad = h.clone()
    bad[2, 3] = float("nan")
    _refused(w, "hessian holds NaN or Inf", mask, bad)
    _refused(w, "start must be finite", mask, h, start=w0[:2])
    _refused(w, "iters must be", mask, h, iters=0)
    _refused(w, "damp must be a positive", mask, h, damp=0.0)
    _refused(w, "pattern", mask, h, pattern="4:2")
    dense_mask = torch.ones(4, 8, dtype=torch.bool)
    _refused(w, r"violates the 2:4 pattern \(row 0, inputs 0..3 keep 4 > 2\)", dense_mask, h,
             pattern="2:4")  # fmt: skip


def test_failure_inside_the_solve_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    w0, _, h, mask = _problem(4, 8, 20, 0.5)
    w = w0.clone()
    monkeypatch.setattr(
        refine, "pcg_refine", lambda d, *a, **k: (torch.full_like(d, float("nan")), None)
    )
    with pytest.raises(FloatingPointError, match="non-finite"):
        refine_weights(w, mask, h)
    assert torch.equal(w, w0)


def test_non_convergence_reported() -> None:
    """Too few iterations: ``converged`` is False with the residual left; through sparsegpt the
    layers are named in ``info`` and in one warning."""
    w0, _, h, mask = _problem(8, 40, 200, 0.8, seed=5)
    rep = refine_weights(w0.clone(), mask, h, iters=1, tol=1e-12, damp=1e-3)
    assert not rep.converged and rep.iterations == 1 and rep.residual > 1e-12
    model, batches = _chain()
    info: dict = {}
    with pytest.warns(RuntimeWarning, match=r"PCG did not reach pcg_tol=1e-12 within 1 "):
        sparsegpt(
            model, batches, _run, 0.5, layers=_layers, calib_batches=3, progress=False,
            info=info, refine="pcg", pcg_iters=1, pcg_tol=1e-12,
        )  # fmt: skip
    assert info["pcg_not_converged"] and set(info["pcg_not_converged"]) <= set(info["pcg"])
    assert all(not info["pcg"][n]["converged"] for n in info["pcg_not_converged"])


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_oneshot_refine_pcg_keeps_masks_and_lowers_layer_error(pattern) -> None:
    """Single-pass calibration (every layer sees the dense model's inputs): ``refine="pcg"``
    picks SparseGPT's masks and leaves every layer's damped error at most SparseGPT's, equal to
    the exact restricted solve on the Gram the calibration recorded."""
    results, models = {}, {}
    for mode in ("none", "pcg"):
        model, batches = _chain()
        dense = _snapshot(model)
        results[mode] = mp.oneshot(
            model, 0.5, "sparsegpt", data=batches, loss_fn=_run, pattern=pattern,
            layers=["layers.*"], sequential=False, calib_batches=3, progress=False,
            refine=mode, pcg_iters=100, pcg_tol=1e-13,
        )  # fmt: skip
        models[mode] = model
    assert results["pcg"].timings["refine"] >= 0 and results["pcg"].info["pcg"]
    assert results["pcg"].info["pcg_not_converged"] == []
    model, batches = _chain()
    xs: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_hook(lambda _m, a, _o, n=n: xs.setdefault(n, []).append(a[0]))
        for n, m in model.named_modules()
        if n.startswith("layers.") and isinstance(m, torch.nn.Linear)
    ]
    with torch.no_grad():
        for b in batches:
            model(b)
    for hk in hooks:
        hk.remove()
    for name, keep in results["pcg"].masks.items():
        assert torch.equal(keep, results["none"].masks[name])
        # the Gram as calibration accumulates it: float32 per batch, summed in float64
        cols = dense[f"{name}.weight"].shape[1]
        grams = [(x.reshape(-1, cols).float().T @ x.reshape(-1, cols).float()) for x in xs[name]]
        rows = sum(x.reshape(-1, cols).shape[0] for x in xs[name])
        h = sum(g.to(F64) for g in grams) * (2.0 / rows)  # scale matters for dead inputs
        a = damped_gram(h, 0.01)
        w0 = dense[f"{name}.weight"]
        obs = models["none"].get_submodule(name).weight.detach()
        pcg = models["pcg"].get_submodule(name).weight.detach()
        assert bool((pcg[~keep] == 0).all())
        assert bool((_objective(pcg, w0, a) <= _objective(obs, w0, a) + 1e-10).all())
        assert torch.allclose(pcg, _exact(w0, h, keep, 0.01), rtol=0, atol=1e-8)


def test_presets_take_the_option_and_bad_values_leave_the_model() -> None:
    model, batches = _chain()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="refine"):
        mp.oneshot(
            model, 0.5, "owl-sparsegpt", data=batches, loss_fn=_run, layers=["layers.*"],
            refine="bogus", progress=False,
        )  # fmt: skip
    assert _same(model, snap)
    res = mp.oneshot(
        model, 0.5, "owl-sparsegpt", data=batches, loss_fn=_run, layers=["layers.*"],
        calib_batches=3, refine="pcg", progress=False,
    )  # fmt: skip
    assert set(res.info["pcg"]) == set(res.masks)
    for name, keep in res.masks.items():
        assert torch.equal(model.get_submodule(name).weight.detach() == 0, ~keep) or bool(
            (model.get_submodule(name).weight.detach()[~keep] == 0).all()
        )


# ---------------------------------------------------------------- the joint objective


def _joint_exact(
    w0: torch.Tensor, h: torch.Tensor, mask: torch.Tensor, grads: torch.Tensor, beta: float,
    damp: float = 0.01,
) -> torch.Tensor:  # fmt: skip
    """The float64 reference: the normal equations of tr((W-W0) A (W-W0)^T)
    + lam/m sum_j <G_j, W-W0>^2 on the mask, K = I (x) A + lam/m G^T G over vec(W), solved
    densely."""
    rows, cols = w0.shape
    m = grads.shape[0]
    a = damped_gram(h, damp)
    g = grads.reshape(m, -1).to(F64)
    lam = beta * rows * float(a.trace()) / float(g.square().sum(1).mean())
    k = torch.kron(torch.eye(rows, dtype=F64), a) + lam / m * g.T @ g
    s = mask.reshape(-1)
    out = torch.zeros(rows * cols, dtype=F64)
    if bool(s.any()):
        out[s] = torch.linalg.solve(k[s][:, s], (k @ w0.reshape(-1))[s])
    return out.view(rows, cols)


def _joint_objective(
    w: torch.Tensor, w0: torch.Tensor, a: torch.Tensor, grads: torch.Tensor, lam: float
) -> float:
    d = (w - w0).to(F64)
    inner = grads.reshape(grads.shape[0], -1).to(F64) @ d.reshape(-1)
    return float(((d @ a) * d).sum() + lam * inner.square().mean())


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 10.0])
@pytest.mark.parametrize("density", [0.4, 0.8])
def test_joint_equals_dense_normal_equations(beta: float, density: float) -> None:
    """r = 4, c = 6, m = 3: CG on the coupled system gives the dense float64 solve, zero off
    the mask, and reports the lam that makes beta the ratio of the two terms' traces."""
    w0, _, h, mask = _problem(4, 6, 20, density, seed=7)
    grads = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(8), dtype=F64)
    w = w0.clone()
    rep = refine_weights(w, mask, h, iters=200, tol=1e-14, grads=grads, fisher_weight=beta)
    assert rep.converged and rep.kept_rows == 0
    assert torch.allclose(w, _joint_exact(w0, h, mask, grads, beta), rtol=0, atol=1e-9)
    assert bool((w[~mask] == 0).all())
    a = damped_gram(h, 0.01)
    lam = rep.fisher_lambda
    # the traces: lam/m sum_j ||G_j||^2 = beta * rows * tr(A)
    assert lam * float(grads.square().sum()) / 3 == pytest.approx(beta * 4 * float(a.trace()))


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 5),
    cols=st.integers(1, 8),
    m=st.integers(1, 6),
    density=st.floats(0.0, 1.0),
    beta=st.sampled_from([0.05, 0.5, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_joint_property_random(rows, cols, m, density, beta, seed) -> None:
    """Any small problem: the coupled CG (at most |S| + 5 iterations) matches the dense solve and
    never ends above its warm start."""
    w0, _, h, mask = _problem(rows, cols, 12, density, seed)
    grads = torch.randn(m, rows, cols, generator=torch.Generator().manual_seed(seed), dtype=F64)
    w = w0.clone()
    rep = refine_weights(
        w, mask, h, iters=rows * cols + 5, tol=1e-14, grads=grads, fisher_weight=beta
    )
    scale = 1.0 + float(w0.abs().max())
    assert torch.allclose(w, _joint_exact(w0, h, mask, grads, beta), rtol=0, atol=1e-7 * scale)
    assert bool((w[~mask] == 0).all())
    assert rep.error_end <= rep.error_start + 1e-9 * scale**2


def test_joint_beta_zero_is_bit_identical() -> None:
    """fisher_weight = 0 is the row-wise solve, bit for bit, with or without gradients, and so
    is fisher_weight > 0 with all-zero gradients (lam = 0); through sparsegpt too (gradients not
    even collected)."""
    w0, _, h, mask = _problem(8, 16, 40, 0.5, seed=9)
    grads = torch.randn(3, 8, 16, dtype=F64)
    plain, zero = w0.float(), w0.float()
    rep_a = refine_weights(plain, mask, h, iters=7, tol=1e-9)
    rep_b = refine_weights(zero, mask, h, iters=7, tol=1e-9, grads=grads, fisher_weight=0.0)
    assert torch.equal(plain, zero) and rep_a == rep_b
    flat = w0.float()
    rep_c = refine_weights(flat, mask, h, iters=7, tol=1e-9, grads=torch.zeros_like(grads),
                           fisher_weight=1.0)  # fmt: skip
    assert fisher_lambda(h, torch.zeros_like(grads), 1.0, 8) == 0.0
    assert torch.equal(plain, flat) and rep_a == rep_c and rep_c.fisher_lambda == 0.0
    out = {}
    for kwargs in ({}, {"loss_fn": _chain_loss, "fisher_weight": 0.0, "fisher_grads": 3}):
        model, batches = _chain()
        timings = sparsegpt(
            model, batches, _run, 0.5, layers=_layers, calib_batches=3, progress=False,
            refine="pcg", pcg_iters=5, **kwargs,
        )[1]  # fmt: skip
        assert "fisher_grads" not in timings
        out[len(kwargs)] = _snapshot(model)
    assert all(torch.equal(out[0][k], out[3][k]) for k in out[0])


@pytest.mark.parametrize("iters", [1, 2, 5])
def test_joint_objective_never_increases(iters: int) -> None:
    """From SparseGPT's weights, the joint objective (Fisher term included) falls in every
    iteration run (none kept the warm start; tol is out of reach), and the report's errors are
    that objective."""
    w0, _, h, _ = _problem(10, 24, 40, 0.5, seed=10)
    grads = torch.randn(4, 10, 24, generator=torch.Generator().manual_seed(11), dtype=F64)
    start, keep = prune_layer(w0, h, 0.6, None, block=8)
    w = w0.clone()
    rep = refine_weights(w, keep, h, start=start, iters=iters, tol=1e-12, grads=grads,
                         fisher_weight=1.0)  # fmt: skip
    a, lam = damped_gram(h, 0.01), rep.fisher_lambda
    f_start = _joint_objective(start, w0, a, grads, lam)
    assert rep.error_start == pytest.approx(f_start, rel=1e-10)
    assert rep.error_end == pytest.approx(_joint_objective(w, w0, a, grads, lam), rel=1e-10)
    assert rep.error_end < rep.error_start and rep.kept_rows == 0 and rep.iterations == iters
    assert bool((w[~keep] == 0).all())


@pytest.mark.parametrize("beta", [0.1, 10.0])
def test_joint_preconditioners_agree_and_woodbury_needs_fewer_steps(beta: float) -> None:
    """Both preconditioners reach the dense solve; the Woodbury one (the m Fisher directions
    inverted exactly) in fewer iterations than Jacobi."""
    w0, _, h, mask = _problem(12, 20, 40, 0.6, seed=15)
    grads = torch.randn(5, 12, 20, generator=torch.Generator().manual_seed(16), dtype=F64)
    grads += torch.randn(1, 12, 20, generator=torch.Generator().manual_seed(17), dtype=F64)
    a = damped_gram(h, 0.01)
    lam = fisher_lambda(a, grads, beta, 12)
    ref = _joint_exact(w0, h, mask, grads, beta)
    steps = {}
    for precond in ("woodbury", "jacobi"):
        w, rep = joint_pcg(w0, mask, a, grads, lam, iters=500, tol=1e-12, precond=precond)
        assert rep.converged and torch.allclose(w, ref, rtol=0, atol=1e-8)
        steps[precond] = rep.iterations
    assert steps["woodbury"] < steps["jacobi"]
    with pytest.raises(ValueError, match="precond must be"):
        joint_pcg(w0, mask, a, grads, lam, precond="ilu")


def test_joint_float32_close_to_float64() -> None:
    """Float32 weights and gradients: float32 buffers, float64 scalars, near the float64 solve
    (the coupled system is worse conditioned than one row's)."""
    w0, _, h, mask = _problem(12, 32, 64, 0.5, seed=13)
    grads = torch.randn(5, 12, 32, generator=torch.Generator().manual_seed(14), dtype=F64)
    w = w0.float()
    rep = refine_weights(w, mask, h.float(), iters=300, tol=1e-5, damp=0.1, grads=grads.float(),
                         fisher_weight=1.0)  # fmt: skip
    ref = _joint_exact(w0, h, mask, grads, 1.0, damp=0.1)
    assert w.dtype == torch.float32 and rep.converged
    assert float((w.double() - ref).norm() / ref.norm()) < 1e-3


def test_joint_refusals_leave_the_weight_untouched() -> None:
    w0, _, h, mask = _problem(4, 6, 20, 0.5)
    grads = torch.randn(3, 4, 6, dtype=F64)
    w = w0.clone()
    _refused(w, "fisher_weight > 0 needs grads", mask, h, fisher_weight=1.0)
    _refused(w, r"grads must have shape \(m, 4, 6\)", mask, h, grads=grads[:, :3],
             fisher_weight=1.0)  # fmt: skip
    # a gradient of the same size in another layout (transposed) is not read as the weight's
    _refused(w, r"grads must have shape \(m, 4, 6\) or \(m, 24\), got \(3, 6, 4\)", mask, h,
             grads=grads.transpose(1, 2), fisher_weight=1.0)  # fmt: skip
    _refused(w, r"got \(3, 2, 12\)", mask, h, grads=grads.reshape(3, 2, 12), fisher_weight=1.0)
    flat, shaped = w0.clone(), w0.clone()
    rep_flat = refine_weights(flat, mask, h, grads=grads.reshape(3, 24), fisher_weight=1.0)
    rep_shaped = refine_weights(shaped, mask, h, grads=grads, fisher_weight=1.0)
    assert torch.equal(flat, shaped) and rep_flat == rep_shaped
    bad = grads.clone()
    bad[1, 2, 3] = float("inf")
    _refused(w, "grads hold NaN or Inf", mask, h, grads=bad, fisher_weight=1.0)
    _refused(w, "fisher_weight must be finite and >= 0", mask, h, grads=grads, fisher_weight=-1)
    _refused(w, "fisher_weight must be finite", mask, h, grads=grads, fisher_weight=float("nan"))


def test_joint_through_sparsegpt_matches_the_layer_oracle() -> None:
    """Single pass (every layer sees the dense model's inputs and gradients): each layer's
    refined weights are the dense solve of the joint normal equations on SparseGPT's mask, with
    the Gram the calibration recorded and the per-batch gradients of the loss at the dense
    model; the masks are SparseGPT's."""
    model, batches = _chain()
    dense = _snapshot(model)
    info: dict = {}
    masks, timings = sparsegpt(
        model, batches, _run, 0.5, layers=_layers, calib_batches=3, sequential=False,
        progress=False, info=info, refine="pcg", pcg_iters=300, pcg_tol=1e-13,
        loss_fn=_chain_loss, fisher_weight=0.5, fisher_grads=3,
    )  # fmt: skip
    assert timings["fisher_grads"] > 0 and info["pcg_not_converged"] == []
    ref_model, _ = _chain()
    grads: dict[str, list[torch.Tensor]] = {}
    for b in batches:
        ref_model.zero_grad()
        _chain_loss(ref_model, b).backward()
        for name in masks:
            grads.setdefault(name, []).append(ref_model.get_submodule(name).weight.grad.clone())
    xs: dict[str, list[torch.Tensor]] = {}
    hooks = [
        ref_model.get_submodule(n).register_forward_hook(
            lambda _m, a, _o, n=n: xs.setdefault(n, []).append(a[0].detach())
        )
        for n in masks
    ]
    with torch.no_grad():
        for b in batches:
            ref_model(b)
    for hk in hooks:
        hk.remove()
    for name, keep in masks.items():
        x = torch.cat([v.reshape(-1, v.shape[-1]) for v in xs[name]])
        h = x.T @ x * (2.0 / x.shape[0])
        g = torch.stack(grads[name])
        ref = _joint_exact(dense[f"{name}.weight"], h, keep, g, 0.5)
        assert info["pcg"][name]["fisher_lambda"] > 0
        assert torch.allclose(model.get_submodule(name).weight.detach(), ref, atol=1e-7)


def test_joint_refusals_leave_the_model() -> None:
    """fisher_weight > 0 without refine='pcg', without loss_fn, with fewer calibration batches
    than gradients asked for, or with a loss that turns non-finite: refused by name, the model
    exactly as it was."""
    model, batches = _chain()
    snap = _snapshot(model)
    common = {"layers": _layers, "calib_batches": 3, "progress": False}
    cases = [
        ("needs refine='pcg'", {"fisher_weight": 1.0, "loss_fn": _chain_loss}),
        ("needs loss_fn", {"fisher_weight": 1.0, "refine": "pcg"}),
        ("fisher_grads=4 gradients.*holds 3 batches",
         {"fisher_weight": 1.0, "refine": "pcg", "loss_fn": _chain_loss, "fisher_grads": 4}),
        ("non-finite", {"fisher_weight": 1.0, "refine": "pcg", "fisher_grads": 3,
                        "loss_fn": lambda m, b: _chain_loss(m, b) * float("nan")}),
    ]  # fmt: skip
    for match, kwargs in cases:
        with pytest.raises(ValueError, match=match):
            sparsegpt(model, batches, _run, 0.5, **common, **kwargs)
        assert _same(model, snap)
    with pytest.raises(ValueError, match="fisher_weight"):
        mp.oneshot(
            model, 0.5, "fisher-sparsegpt", data=batches, loss_fn=_chain_loss,
            layers=["layers.*"], refine="pcg", fisher_weight=-0.5, progress=False,
        )  # fmt: skip
    assert _same(model, snap)


def test_presets_take_the_fisher_weight() -> None:
    """``fisher-sparsegpt`` with ``refine="pcg", fisher_weight=1``: every layer's report carries
    its lam; the masks hold."""
    model, batches = _chain()
    res = mp.oneshot(
        model, 0.5, "fisher-sparsegpt", data=batches, loss_fn=_chain_loss, layers=["layers.*"],
        calib_batches=3, refine="pcg", fisher_weight=1.0, fisher_grads=3, progress=False,
    )  # fmt: skip
    assert res.timings["fisher_grads"] > 0
    assert all(r["fisher_lambda"] > 0 for r in res.info["pcg"].values())
    for name, keep in res.masks.items():
        assert bool((model.get_submodule(name).weight.detach()[~keep] == 0).all())
