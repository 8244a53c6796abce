"""What a recovery result's ``converged`` and ``info["stop"]`` promise, and the refusals of
degenerate inputs (issue 14): an all-zero A, data whose loss overflows float64, and iterates that
diverge are never reported as converged, and a refusal leaves A and y untouched."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mfac.recovery import solve

METHODS = ["iobs", "iht", "niht", "htp", "cosamp", "omp"]
SETTLED = {"tolerance", "support_repeated", "gradient", "callback"}
UNSETTLED = {"max_iter", "k_atoms", "non_finite"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _options(method: str) -> dict:
    return {"damp": 1e-6} if method == "iobs" else {}


@pytest.mark.parametrize("loss", ["least_squares", "logistic"])
@pytest.mark.parametrize("method", METHODS)
def test_all_zero_design_is_refused_and_untouched(method, loss):
    A = np.zeros((12, 6))
    y = np.ones(12)
    A0, y0 = A.copy(), y.copy()
    with pytest.raises(ValueError, match="A is all zero"):
        solve(A, y, 2, method=method, loss=loss)
    assert np.array_equal(A, A0) and np.array_equal(y, y0)


@pytest.mark.parametrize("scale", [1e154, 1e160])
@pytest.mark.parametrize("method", METHODS)
def test_overflowing_scale_is_refused(method, scale):
    """The reported case: cosamp at extreme scale said converged=True with loss=inf."""
    rng = np.random.default_rng(0)
    A, y = rng.normal(size=(40, 20)) * scale, rng.normal(size=40) * scale
    with pytest.raises(ValueError, match="overflow"):
        solve(A, y, 3, method=method, max_iter=50, **_options(method))


def test_underflowing_scale_is_refused_not_nan():
    rng = np.random.default_rng(0)
    A, y = rng.normal(size=(40, 20)) * 1e-160, rng.normal(size=40) * 1e-160
    with pytest.raises(ValueError, match="underflow"):
        solve(A, y, 3, method="iht")


def test_diverging_iterates_are_not_converged():
    """A step three times 1/L diverges until the loss overflows: never converged."""
    rng = np.random.default_rng(0)
    A, y = rng.normal(size=(40, 20)), rng.normal(size=40)
    res = solve(A, y, 3, method="iht", step_scale=3.0, max_iter=5000, tol=0)
    assert not res.converged and res.info["stop"] == "non_finite"


def test_unfittable_y_reports_its_residual():
    """The reported case: htp and omp said converged=True at a 47 % residual. HTP reaches a
    genuine fixed point (its support repeats), which is what converged means, and the residual
    is reported beside it; OMP merely uses up its k atoms, which is no longer convergence."""
    rng = np.random.default_rng(0)
    A, y = rng.normal(size=(50, 100)), rng.normal(size=50)  # no 5-sparse x fits y
    htp = solve(A, y, 5, method="htp", max_iter=200)
    assert htp.converged and htp.info["stop"] in {"support_repeated", "tolerance"}
    resid = np.linalg.norm(A @ htp.x - y) / np.linalg.norm(y)
    assert htp.info["relative_residual"] == pytest.approx(resid, rel=1e-12) and resid > 0.4
    # the fixed point: one more HTP step from x returns x itself
    again = solve(A, y, 5, method="htp", max_iter=1, x0=htp.x)
    np.testing.assert_allclose(again.x, htp.x, rtol=0, atol=1e-12)
    omp = solve(A, y, 5, method="omp")
    assert not omp.converged and omp.info["stop"] == "k_atoms"
    assert omp.info["relative_residual"] > 0.4


def test_omp_exact_fit_is_converged_by_its_gradient_test():
    rng = np.random.default_rng(3)
    A = rng.normal(size=(60, 30))
    w = np.zeros(30)
    w[[2, 7, 11]] = [1.0, -2.0, 1.5]
    res = solve(A, A @ w, 3, method="omp")
    assert res.converged and res.info["stop"] == "gradient"
    assert res.info["relative_residual"] < 1e-12


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(METHODS),
    seed=st.integers(0, 10_000),
    noise=st.sampled_from([0.0, 0.1, 10.0]),
    max_iter=st.integers(1, 60),
)
def test_converged_matches_the_stop_reason(method, seed, noise, max_iter):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(30, 20))
    w = np.zeros(20)
    w[rng.choice(20, 3, replace=False)] = rng.normal(size=3) + 2.0
    y = A @ w + noise * rng.normal(size=30)
    res = solve(A, y, 3, method=method, max_iter=max_iter, **_options(method))
    assert res.info["stop"] in (SETTLED if res.converged else UNSETTLED)
    if res.converged:
        assert np.isfinite(res.loss) and res.iterations <= max_iter
    if res.info["stop"] == "max_iter":
        assert res.iterations == max_iter
