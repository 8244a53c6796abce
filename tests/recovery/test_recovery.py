"""Tests of mfac.recovery: exact recovery, the OBS correction against a float64 least-squares
oracle, I-OBS against IHT on an ill-conditioned design, numpy/torch round trips, the matrix-free
curvature, property tests and the input errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mfac.recovery import (
    DenseCurvature,
    LeastSquares,
    Logistic,
    MFACCurvature,
    RecoveryResult,
    SingularHessianError,
    solve,
)

METHODS = ["iobs", "iht", "niht", "htp", "cosamp", "omp"]


pytestmark = pytest.mark.usefixtures("one_thread")


def sparse_problem(n=120, d=60, ks=5, seed=0, noise=0.0, rho=0.0):
    """y = A w* (+ noise) with a ks-sparse w*; rho > 0 correlates neighbouring columns."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, d)) / np.sqrt(n)
    if rho:
        cov = rho ** np.abs(np.subtract.outer(np.arange(d), np.arange(d)))
        A = A @ np.linalg.cholesky(cov).T
    w = np.zeros(d)
    S = rng.choice(d, ks, replace=False)
    w[S] = rng.choice([-1, 1], ks) * (1 + rng.random(ks))
    y = A @ w + noise * rng.normal(size=n)
    return A, y, w


def rel_err(x, w):
    return np.linalg.norm(x - w) / np.linalg.norm(w)


# ----------------------------------------------------------------------------- recovery
@pytest.mark.parametrize("method", METHODS)
def test_exact_recovery_every_solver(method):
    A, y, w = sparse_problem()
    res = solve(A, y, 5, method=method, max_iter=3000, tol=1e-12)
    assert isinstance(res, RecoveryResult)
    assert res.converged
    assert rel_err(res.x, w) < 1e-6
    assert set(res.support.tolist()) == set(np.flatnonzero(w).tolist())


@pytest.mark.parametrize("rule", ["topk", "saliency", "greedy"])
@pytest.mark.parametrize("correction", [True, False])
def test_exact_recovery_iobs_variants(rule, correction):
    A, y, w = sparse_problem(seed=1)
    res = solve(A, y, 5, method="iobs", rule=rule, correction=correction, max_iter=50)
    assert res.converged and rel_err(res.x, w) < 1e-9


def test_exact_recovery_iobs_small_step_and_larger_k():
    """The authors' regime: k > k*, step eta < 1 (Topk-I-OBS without correction)."""
    A, y, w = sparse_problem(n=128, d=64, ks=6, seed=2)
    res = solve(A, y, 20, method="iobs", correction=False, step=0.5, max_iter=200, tol=1e-13)
    assert rel_err(res.x, w) < 1e-8


def test_compressed_sensing_needs_damping():
    A, y, w = sparse_problem(n=40, d=100, ks=4, seed=3)
    with pytest.raises(SingularHessianError, match="damp"):
        solve(A, y, 4, method="iobs")
    res = solve(A, y, 4, method="iobs", damp=1e-3, damp_mode="relative", max_iter=500)
    assert rel_err(res.x, w) < 1e-6


# ----------------------------------------------------------------------------- OBS correction
def test_obs_correction_is_least_squares_refit():
    """One I-OBS step (eta = 1, exact undamped H) from any start lands on the LS refit."""
    A, y, _ = sparse_problem(n=90, d=40, ks=6, seed=4, noise=0.1)
    x0 = np.random.default_rng(5).normal(size=40)
    for rule in ("topk", "saliency", "greedy"):
        res = solve(A, y, 10, method="iobs", rule=rule, max_iter=1, x0=x0)
        S = res.support
        oracle = np.zeros(40)
        oracle[S] = np.linalg.lstsq(A[:, S], y, rcond=None)[0]
        np.testing.assert_allclose(res.x, oracle, rtol=1e-9, atol=1e-10)


def test_projection_matches_spec_inverse_form():
    """x = t - H^-1_{:,P} [(H^-1)_PP]^-1 t_P (spec form) equals the k x k H-form we use."""
    rng = np.random.default_rng(6)
    M = rng.normal(size=(30, 30))
    H = torch.tensor(M @ M.T + 0.5 * np.eye(30))
    t = torch.tensor(rng.normal(size=30))
    S = torch.tensor(sorted(rng.choice(30, 8, replace=False).tolist()))
    P = torch.tensor([i for i in range(30) if i not in set(S.tolist())])
    curv = DenseCurvature(H)
    Hinv = torch.linalg.inv(H)
    spec = t - Hinv[:, P] @ torch.linalg.solve(Hinv[P][:, P], t[P])
    torch.testing.assert_close(curv.project(t, S), spec, rtol=1e-9, atol=1e-11)
    assert float(spec[P].abs().max()) < 1e-10
    # greedy OBC output is the joint OBS projection onto the support it found
    out, supp = curv.greedy(t, 8)
    torch.testing.assert_close(out, curv.project(t, supp), rtol=1e-8, atol=1e-10)


def test_mfac_curvature_matches_dense():
    """The matrix-free operator on curvature rows reproduces the dense damped Hessian."""
    A, _, _ = sparse_problem(n=50, d=80, seed=7)
    At = torch.tensor(A)
    prob = LeastSquares(At, torch.zeros(50, dtype=torch.float64))
    R, ridge, scale = prob.curvature_rows(torch.zeros(80, dtype=torch.float64))
    mf = MFACCurvature(R, ridge, 1e-2, "relative", dtype=torch.float64, scale=scale)
    dense = DenseCurvature(prob.hessian(None), 1e-2, "relative")
    assert mf.damp == pytest.approx(dense.damp, rel=1e-12)
    v = torch.randn(80, dtype=torch.float64)
    torch.testing.assert_close(mf.solve(v), dense.solve(v), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(mf.inv_diag(), dense.inv_diag(), rtol=1e-8, atol=1e-10)
    S = torch.arange(0, 80, 7)
    torch.testing.assert_close(mf.project(v, S), dense.project(v, S), rtol=1e-8, atol=1e-10)


def test_mfac_iobs_scales_past_dense():
    """d = 4000 with n = 300 samples: I-OBS via M-FAC (no d x d matrix) recovers w*."""
    A, y, w = sparse_problem(n=300, d=4000, ks=8, seed=8)
    res = solve(
        torch.tensor(A, dtype=torch.float32),
        torch.tensor(y, dtype=torch.float32),
        8,
        method="iobs",
        curvature="mfac",
        rule="saliency",
        damp=1e-3,
        max_iter=100,
    )
    assert res.x.dtype == torch.float32
    assert rel_err(res.x.double().numpy(), w) < 1e-4


def test_spectral_norm_power_iteration_is_a_tight_upper_bound():
    from mfac.recovery.problems import spectral_norm_sq

    A = torch.tensor(sparse_problem(n=200, d=100, seed=17, rho=0.5)[0])
    exact = float(torch.linalg.matrix_norm(A, ord=2)) ** 2
    approx = spectral_norm_sq(A, exact_limit=0)
    assert exact <= approx <= exact * 1.002


# ----------------------------------------------------------------------------- speed claim
def test_iobs_fewer_iterations_than_iht_when_ill_conditioned():
    A, y, w = sparse_problem(n=200, d=100, ks=8, seed=9, rho=0.95)
    assert np.linalg.cond(A) > 20
    hit = {}
    for method in ("iobs", "iht"):

        def cb(it, x, method=method):
            if method not in hit and rel_err(x.numpy(), w) < 1e-6:
                hit[method] = it
                return True
            return False

        solve(A, y, 8, method=method, max_iter=3000, tol=0, callback=cb)
    assert "iobs" in hit
    assert hit["iobs"] < hit.get("iht", 10**9) / 10


# ----------------------------------------------------------------------------- kinds
def test_numpy_in_numpy_out_and_torch_in_torch_out():
    A, y, _ = sparse_problem(seed=10)
    res = solve(A, y, 5, method="htp")
    assert isinstance(res.x, np.ndarray) and res.x.dtype == np.float64
    assert isinstance(res.support, np.ndarray) and res.support.dtype == np.int64
    res32 = solve(A.astype(np.float32), y.astype(np.float32), 5, method="omp")
    assert isinstance(res32.x, np.ndarray) and res32.x.dtype == np.float32
    At = torch.tensor(A, dtype=torch.float32)
    res_t = solve(At, torch.tensor(y, dtype=torch.float32), 5, method="iobs", history="iterates")
    assert isinstance(res_t.x, torch.Tensor) and res_t.x.dtype == torch.float32
    assert res_t.support.dtype == torch.long
    assert len(res_t.history) == res_t.iterations == len(res_t.iterates)
    np.testing.assert_allclose(res_t.x.numpy(), res.x, atol=1e-5)


def test_callback_stops_and_history():
    A, y, _ = sparse_problem(seed=11)
    res = solve(
        A, y, 5, method="iht", max_iter=100, tol=0, history=True, callback=lambda i, x: i == 7
    )
    assert res.iterations == 7 and res.converged and len(res.history) == 7


# ----------------------------------------------------------------------------- logistic
def logistic_problem(seed=12, n=1500, d=25, ks=3):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, d))
    w = np.zeros(d)
    w[rng.choice(d, ks, replace=False)] = rng.choice([-3.0, 3.0], ks)
    y = (rng.random(n) < 1 / (1 + np.exp(-A @ w))).astype(float)
    return A, y, w


@pytest.mark.parametrize(
    "method,opts",
    [
        ("iobs", {}),
        ("iobs", {"curvature": "mfac", "rule": "saliency"}),
        ("htp", {}),
        ("cosamp", {}),
        ("omp", {}),
        ("niht", {}),
        ("iht", {}),
    ],
)
def test_logistic_support_recovery(method, opts):
    A, y, w = logistic_problem()
    res = solve(A, y, 3, method=method, loss="logistic", max_iter=400, tol=1e-9, **opts)
    assert set(res.support.tolist()) == set(np.flatnonzero(w).tolist())
    assert np.all(np.sign(res.x[np.flatnonzero(w)]) == np.sign(w[np.flatnonzero(w)]))


def test_logistic_iobs_converges_to_restricted_minimiser():
    A, y, _ = logistic_problem(seed=13)
    res = solve(A, y, 3, method="iobs", loss="logistic", max_iter=100, tol=1e-12)
    ref = solve(A, y, 3, method="htp", loss="logistic", max_iter=100)
    np.testing.assert_allclose(res.x, ref.x, atol=1e-7)


def test_logistic_intercept_profiled_gradient_and_hessian():
    """The profiled objective min_b f(x, b): gradient and Hessian against finite differences."""
    A, y, _ = logistic_problem(seed=15, n=300, d=6)
    prob = Logistic(torch.tensor(A), torch.tensor(y), l2=1e-2, intercept=True)
    x = torch.tensor(np.random.default_rng(0).normal(size=6) * 0.3)
    g, H = prob.grad(x), prob.hessian(x)
    eps = 1e-5
    for i in range(6):
        e = torch.zeros(6, dtype=torch.float64)
        e[i] = eps
        fd = (prob.value(x + e) - prob.value(x - e)) / (2 * eps)
        assert fd == pytest.approx(float(g[i]), rel=1e-6, abs=1e-9)
        hd = (prob.grad(x + e) - prob.grad(x - e)) / (2 * eps)
        torch.testing.assert_close(hd, H[:, i], rtol=1e-5, atol=1e-8)


def test_logistic_intercept_recovered():
    rng = np.random.default_rng(16)
    A = rng.normal(size=(3000, 20))
    w = np.zeros(20)
    w[[2, 11]] = [2.5, -2.5]
    y = (rng.random(3000) < 1 / (1 + np.exp(-(A @ w + 1.5)))).astype(float)
    for method in ("iobs", "htp"):
        res = solve(A, y, 2, method=method, loss="logistic", intercept=True, l2=0.0, tol=1e-12)
        assert res.support.tolist() == [2, 11]
        assert res.info["intercept"] == pytest.approx(1.5, abs=0.2)
        assert np.abs(res.x[[2, 11]] - w[[2, 11]]).max() < 0.3


# ----------------------------------------------------------------------------- properties
problem_strategy = st.tuples(
    st.integers(10, 40),  # n
    st.integers(5, 30),  # d
    st.integers(0, 10**6),  # seed
    st.floats(0.0, 0.9),  # rho
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem_strategy, st.sampled_from(METHODS), st.data())
def test_support_size_at_most_k(spec, method, data):
    n, d, seed, rho = spec
    k = data.draw(st.integers(1, d))
    A, y, _ = sparse_problem(n, d, min(3, d), seed, noise=0.05, rho=rho)
    opts = {"damp": 1e-2, "damp_mode": "relative"} if method == "iobs" else {}
    res = solve(A, y, k, method=method, max_iter=30, **opts)
    assert len(res.support) <= k and np.count_nonzero(res.x) <= k
    assert set(np.flatnonzero(res.x).tolist()) <= set(res.support.tolist())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem_strategy, st.sampled_from(["iht", "htp"]), st.integers(1, 5))
def test_iht_htp_monotone_on_quadratics(spec, method, k):
    """With step <= 1/L, f(T_k(x - mu g)) <= f(x) (descent lemma + best k-term
    approximation), and HTP's refit only lowers f further."""
    n, d, seed, rho = spec
    k = min(k, d)
    A, y, _ = sparse_problem(n, d, min(3, d), seed, noise=0.1, rho=rho)
    res = solve(A, y, k, method=method, max_iter=40, tol=0, history=True)
    start = 0.5 * float(y @ y)
    losses = [start, *res.history]
    assert all(b <= a * (1 + 1e-10) + 1e-12 for a, b in itertools.pairwise(losses))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem_strategy, st.integers(1, 5), st.sampled_from(["topk", "saliency", "greedy"]))
def test_obs_correction_never_worse(spec, k, rule):
    """On a quadratic with the exact Hessian and eta = 1, the corrected iterate minimises f on
    the chosen support, so it is never worse than the uncorrected one (same support)."""
    n, d, seed, rho = spec
    if n < d + 2:
        n = d + 2
    k = min(k, d)
    A, y, _ = sparse_problem(n, d, min(3, d), seed, noise=0.1, rho=rho)
    x0 = np.random.default_rng(seed).normal(size=d)
    on = solve(A, y, k, method="iobs", rule=rule, max_iter=1, x0=x0, damp=1e-9)
    off = solve(A, y, k, method="iobs", rule=rule, correction=False, max_iter=1, x0=x0, damp=1e-9)
    if rule != "greedy":  # greedy's support is chosen jointly with the correction
        assert np.array_equal(on.support, off.support)
        assert on.loss <= off.loss * (1 + 1e-9) + 1e-12


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    A, y, _ = sparse_problem(n=30, d=10, ks=2, seed=14)
    with pytest.raises(ValueError, match="k must satisfy"):
        solve(A, y, 0)
    with pytest.raises(ValueError, match="k must satisfy"):
        solve(A, y, 11)
    with pytest.raises(TypeError, match="k must be an integer"):
        solve(A, y, 2.5)
    with pytest.raises(ValueError, match="y must have shape"):
        solve(A, y[:-1], 2)
    with pytest.raises(ValueError, match="A must be"):
        solve(y, y, 2)
    bad = A.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="A contains NaN"):
        solve(bad, y, 2)
    yb = y.copy()
    yb[0] = np.inf
    with pytest.raises(ValueError, match="y contains NaN"):
        solve(A, yb, 2)
    with pytest.raises(ValueError, match="method must be"):
        solve(A, y, 2, method="lasso")
    with pytest.raises(ValueError, match="loss must be"):
        solve(A, y, 2, loss="hinge")
    with pytest.raises(ValueError, match="labels in"):
        solve(A, np.where(y > 0, 2.0, 0.0), 2, loss="logistic")
    with pytest.raises(ValueError, match="rule must be"):
        solve(A, y, 2, rule="random")
    with pytest.raises(ValueError, match="greedy"):
        solve(A, y, 2, rule="greedy", curvature="mfac")
    with pytest.raises(ValueError, match="curvature must be"):
        solve(A, y, 2, curvature="kfac")
    with pytest.raises(TypeError, match="'htp'"):
        solve(A, y, 2, method="htp", rule="topk")
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        solve(A.tolist(), y, 2)
    with pytest.raises(ValueError, match="x0 must have"):
        solve(A, y, 2, x0=np.zeros(3))
    # a singular Hessian (duplicated column) without damping
    dup = np.concatenate([A, A[:, :1]], axis=1)
    with pytest.raises(SingularHessianError, match="damp > 0"):
        solve(dup, y, 2, method="iobs")
    assert solve(dup, y, 2, method="iobs", damp=1e-6, damp_mode="relative").x.shape == (11,)
