"""The ADMM mask search (mfac.prune.admm): one iteration against the dense float64 ADMM step,
the exact optimum found from the worst start where the optimum is known (diagonal Hessian),
closer to the brute-force optimum than SparseGPT + CG on small correlated layers, the size and
pattern of the mask held, never worse than its start, refusals that leave the weight (and the
model) as they were, and ``refine="admm"`` through ``sparsegpt`` and ``oneshot``."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mfac.prune as mp
from mfac.prune.admm import admm_search, project, search_mask
from mfac.prune.methods.sparsegpt import prune_layer
from mfac.prune.refine import damped_gram, layer_error, pcg_refine

from prune_models import _chain, _run, _same, _snapshot

F64 = torch.float64


def _problem(rows: int, cols: int, samples: int, seed: int = 0):
    """Dense weights and the Gram of correlated inputs with uneven scales."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols, dtype=F64) + 0.6 * torch.randn(cols, cols, generator=gen, dtype=F64)
    x = torch.randn(samples, cols, generator=gen, dtype=F64) @ mix
    x = x * torch.linspace(0.3, 3.0, cols, dtype=F64)
    return torch.randn(rows, cols, generator=gen, dtype=F64), x.T @ x


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_one_iteration_is_the_dense_admm_step(pattern) -> None:
    """W1 = (W0 A + rho D0)(A + rho I)^-1 in the unit-diagonal coordinates, solved densely;
    D1 = the projection of W1 (V0 = 0), mapped back."""
    w0, h = _problem(6, 16, 40)
    a = damped_gram(h, 0.01)
    start_mask = torch.rand(6, 16, generator=torch.Generator().manual_seed(1)) < 0.5
    if pattern is not None:
        start_mask = project(torch.randn(6, 16), torch.ones(6, 16, dtype=torch.bool), pattern, 0)
    start = w0 * start_mask
    rho = 0.7
    s = a.diagonal().sqrt()
    a_unit = a / s[:, None] / s[None, :]
    rhs = (w0 * s) @ a_unit + rho * (start * s)
    w1 = torch.linalg.solve(a_unit + rho * torch.eye(16, dtype=F64), rhs.T).T
    keep = project(w1, torch.ones_like(start_mask), pattern, int(start_mask.sum()))
    mask, d, rep = admm_search(w0, a, start, start_mask, pattern, iters=1, rho=rho)
    assert rep.iterations == 1
    assert torch.equal(mask, keep)
    assert torch.allclose(d, w1 * keep / s, rtol=0, atol=1e-10)


def test_growth_schedule_sees_each_iteration_and_sets_rho() -> None:
    """``growth`` is called once per iteration with (rho, support entries that iteration
    changed, kept weights) and its result is the next rho; the default grows 1.3x after an
    iteration that moved over 1 % of the kept weights, else 1.1x."""
    from mfac.prune.admm import grow, two_speed

    w0, h = _problem(6, 16, 40)
    a = damped_gram(h, 0.01)
    start_mask = torch.rand(6, 16, generator=torch.Generator().manual_seed(1)) < 0.5
    count = int(start_mask.sum())
    calls: list[tuple[float, int, int]] = []

    def halve(rho: float, changed: int, kept: int) -> float:
        calls.append((rho, changed, kept))
        return rho / 2

    first, _, _ = admm_search(w0, a, w0 * start_mask, start_mask, None, iters=1, rho=0.7)
    _, _, rep = admm_search(w0, a, w0 * start_mask, start_mask, None, iters=6, rho=0.7,
                            growth=halve)  # fmt: skip
    assert len(calls) == rep.iterations
    assert [c[0] for c in calls] == pytest.approx([0.7 / 2**i for i in range(len(calls))])
    assert rep.rho == pytest.approx(0.7 / 2 ** len(calls))
    assert calls[0][1] == int((first != start_mask).sum()) > 0
    assert all(c[2] == count for c in calls)
    assert grow(1.0, 2, 100) == pytest.approx(1.3) and grow(1.0, 1, 100) == pytest.approx(1.1)
    custom = two_speed(2.0, 1.0, busy=0.1)
    assert custom(1.0, 11, 100) == 2.0 and custom(1.0, 10, 100) == 1.0


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_diagonal_hessian_nears_the_optimum_from_the_worst_start(pattern) -> None:
    """With uncorrelated inputs the optimum keeps the largest w^2 A_jj and W0 on it; from the
    mask that keeps the smallest (16x the optimum's error) the search ends within 2 % of it
    (ADMM on this non-convex set is a heuristic: near-ties may settle either way)."""
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(8, 24, generator=gen, dtype=F64)
    h = torch.diag(torch.rand(24, generator=gen, dtype=F64) * 4 + 0.1)
    a = damped_gram(h, 0.01)
    saliency = w0.square() * a.diagonal()
    every = torch.ones(8, 24, dtype=torch.bool)
    best = project(saliency, every, (2, 4) if pattern else None, 8 * 12)
    worst = project(1 / saliency, every, (2, 4) if pattern else None, 8 * 12)
    w = w0.clone()
    mask, rep = search_mask(w, worst, h, pattern=pattern, iters=100, rho=0.01, pcg_tol=1e-12)
    optimum = layer_error(w0, w0 * best, a)
    assert rep.error_start > 5 * optimum and not rep.fallback
    assert rep.error_end <= 1.02 * optimum and float((mask != best).float().mean()) < 0.03
    assert rep.error_end == pytest.approx(layer_error(w0, w, a), rel=1e-12)


def _optimum(w0: torch.Tensor, a: torch.Tensor, keep: int) -> float:
    """The least layer error over every mask of ``keep`` weights of one row (float64)."""
    best = float("inf")
    for cols in itertools.combinations(range(w0.shape[1]), keep):
        s = torch.zeros(w0.shape[1], dtype=torch.bool)
        s[list(cols)] = True
        w = torch.zeros_like(w0)
        w[0, s] = torch.linalg.solve(a[s][:, s], (w0[0] @ a)[s])
        best = min(best, layer_error(w0, w, a))
    return best


def test_closer_to_the_brute_force_optimum_than_sparsegpt() -> None:
    """One row of 10 weights keeping 4 (210 masks), 16 correlated layers: the excess of the
    searched mask over the best mask is smaller than that of SparseGPT's mask (both with
    exact weights on the mask), and the search is never worse than SparseGPT's weights. (rho
    0.1: the larger default 0.3, chosen on SmolLM2, stays nearer SparseGPT's mask here.)"""
    excess = {"sparsegpt": 0.0, "admm": 0.0}
    for seed in range(16):
        w0, h = _problem(1, 10, 14, seed)
        a = damped_gram(h, 0.01)
        best = _optimum(w0, a, 4)
        new, keep = prune_layer(w0, h, 0.6, None, 10, damp=0.01)
        exact, _ = pcg_refine(w0, keep, a, new, iters=100, tol=1e-12)
        w = w0.clone()
        _, rep = search_mask(
            w, keep, h, start=new, iters=100, rho=0.1, pcg_iters=100, pcg_tol=1e-12
        )
        assert rep.error_end <= layer_error(w0, new, a) * (1 + 1e-12)
        excess["sparsegpt"] += layer_error(w0, exact, a) / best - 1
        excess["admm"] += layer_error(w0, w, a) / best - 1
    assert excess["admm"] < 0.2 * excess["sparsegpt"]


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 6), groups=st.integers(1, 6), density=st.floats(0.1, 0.9),
    nm=st.booleans(), dead=st.integers(0, 2), seed=st.integers(0, 10_000),
)  # fmt: skip
def test_property_mask_size_pattern_and_monotone(rows, groups, density, nm, dead, seed) -> None:
    cols = 4 * groups
    w0, h = _problem(rows, cols, 3 * cols, seed)
    h[:dead] = 0.0
    h[:, :dead] = 0.0  # inputs the calibration never excites
    gen = torch.Generator().manual_seed(seed)
    pattern = (2, 4) if nm else None
    start_mask = (
        project(torch.randn(rows, cols, generator=gen, dtype=F64), torch.ones(rows, cols,
                dtype=torch.bool), pattern, 0)
        if nm
        else torch.rand(rows, cols, generator=gen) < density
    )  # fmt: skip
    a = damped_gram(h, 0.01)
    w = w0.clone()
    mask, rep = search_mask(w, start_mask, h, pattern="2:4" if nm else None, iters=30)
    assert bool((w[~mask] == 0).all())
    assert not bool(mask[:, :dead].any())
    if nm:
        assert bool((mask.reshape(rows, groups, 4).sum(-1) <= 2).all())
    else:
        assert int(mask.sum()) <= int(start_mask.sum())
        if dead == 0:
            assert int(mask.sum()) == int(start_mask.sum())
    start = layer_error(w0, w0 * start_mask * (h.diagonal() > 0), a)
    assert layer_error(w0, w, a) <= start * (1 + 1e-12) + 1e-12
    assert rep.error_end == pytest.approx(layer_error(w0, w, a), rel=1e-9, abs=1e-12)


def test_float32_weight_searches_in_float32() -> None:
    w0, h = _problem(8, 32, 80)
    keep = torch.rand(8, 32, generator=torch.Generator().manual_seed(2)) < 0.5
    w64, w32 = w0.clone(), w0.float()
    m64, _ = search_mask(w64, keep, h, iters=25)
    m32, _ = search_mask(w32, keep, h, iters=25)
    assert w32.dtype == torch.float32
    assert float((m64 != m32).float().mean()) <= 0.05  # round-off may flip a tie or two
    a = damped_gram(h, 0.01)
    assert layer_error(w0, w32, a) <= layer_error(w0, w64, a) * 1.05


def _refused(w: torch.Tensor, match: str, *args, **kwargs) -> None:
    before = w.clone()
    with pytest.raises((ValueError, TypeError), match=match):
        search_mask(w, *args, **kwargs)
    assert torch.equal(w, before)


def test_refusals_leave_the_weight_untouched() -> None:
    w0, h = _problem(4, 8, 20)
    mask = torch.rand(4, 8, generator=torch.Generator().manual_seed(0)) < 0.5
    w = w0.clone()
    _refused(w, "mask must have the weight's shape", mask[:, :4], h)
    _refused(w, "hessian must be square, 8 x 8", mask, h[:, :6])
    _refused(w, "iters must be", mask, h, iters=0)
    _refused(w, "rho must be a positive", mask, h, rho=0.0)
    _refused(w, "pcg_iters must be", mask, h, pcg_iters=0)
    _refused(w, "start must be finite", mask, h, start=w0[:2])
    _refused(w, r"violates the 2:4 pattern", torch.ones(4, 8, dtype=torch.bool), h,
             pattern="2:4")  # fmt: skip


def test_failure_inside_the_search_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    from mfac.prune import admm

    w0, h = _problem(4, 8, 20)
    mask = torch.rand(4, 8, generator=torch.Generator().manual_seed(0)) < 0.5
    w = w0.clone()

    def broken(*_a, **_k):
        raise RuntimeError("solver failed")

    monkeypatch.setattr(admm, "pcg_refine", broken)
    with pytest.raises(RuntimeError, match="solver failed"):
        search_mask(w, mask, h)
    assert torch.equal(w, w0)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_oneshot_refine_admm_keeps_budgets_and_beats_sparsegpt(pattern) -> None:
    """Single-pass calibration: ``refine="admm"`` keeps each layer's count (or the pattern),
    zeroes every weight off its mask, and ends each layer's damped error at most SparseGPT's;
    the searches and CG reports are in ``info``."""
    results, models = {}, {}
    for mode in ("none", "admm"):
        model, batches = _chain()
        results[mode] = mp.oneshot(
            model, 0.5, "sparsegpt", data=batches, loss_fn=_run, pattern=pattern,
            layers=["layers.*"], sequential=False, calib_batches=3, progress=False,
            refine=mode, admm_iters=60,
        )  # fmt: skip
        models[mode] = model
    info = results["admm"].info
    assert set(info["admm"]) == set(results["admm"].masks) == set(info["pcg"])
    # the search changed some mask (checked on the masks, not on the reported share)
    before = results["none"].masks
    assert any(not torch.equal(k, before[n]) for n, k in results["admm"].masks.items())
    for name, keep in results["admm"].masks.items():
        assert int(keep.sum()) == int(results["none"].masks[name].sum())
        weight = models["admm"].get_submodule(name).weight.detach()
        assert bool((weight[~keep] == 0).all())
        rep = info["admm"][name]
        assert rep["error_end"] <= rep["error_start"] * (1 + 1e-12)
        if pattern:
            assert bool((keep.reshape(keep.shape[0], -1, 4).sum(-1) <= 2).all())


def test_refine_admm_refusals_leave_the_model() -> None:
    model, batches = _chain()
    snap = _snapshot(model)
    for bad, match in (({"admm_iters": 0}, "admm_iters"), ({"admm_rho": -1.0}, "admm_rho"),
                       ({"refine": "bogus"}, "refine")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            mp.oneshot(
                model, 0.5, "sparsegpt", data=batches, loss_fn=_run, layers=["layers.*"],
                calib_batches=3, progress=False, **{"refine": "admm", **bad},
            )  # fmt: skip
        assert _same(model, snap)


def test_unsettled_search_is_reported_by_name() -> None:
    """A search cut off while the mask still moves is named in ``info["admm_unsettled"]`` and
    one RuntimeWarning; the mask it reached is used and the pattern still holds."""
    model, batches = _chain()
    with pytest.warns(RuntimeWarning, match="still changing after admm_iters=1"):
        res = mp.oneshot(
            model, 0.5, "sparsegpt", data=batches, loss_fn=_run, layers=["layers.*"],
            sequential=False, calib_batches=3, progress=False, refine="admm", admm_iters=1,
            admm_rho=1e-3,
        )  # fmt: skip
    unsettled = res.info["admm_unsettled"]
    assert unsettled and set(unsettled) <= set(res.masks)
    assert all(not res.info["admm"][n]["settled"] for n in unsettled)
    assert all(res.info["admm"][n]["iterations"] == 1 for n in res.masks)
