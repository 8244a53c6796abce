"""Budgets: OWL against a direct implementation and its properties; the diagonal-Fisher budget
against a direct computation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mfac.prune.methods.sparsegpt import sparsegpt

from prune_models import Chain, _chain, _layers, _run, _same, _snapshot
from prune_models import _chain_loss as _loss

F64 = torch.float64


def _direct_owl(model: Chain, batches, sparsity: float, m: float, lam: float) -> dict[str, float]:
    """OWL by loops: scores |w_ij| * ||x_j|| per block, outlier share, affine map, and the mean
    restored by a root finder on the clipped weighted mean."""
    from scipy.optimize import brentq

    ratios, sizes, names = [], [], []
    hs = [model.inp(b) for b in batches]
    for k, block in enumerate(model.layers):
        x_up = torch.cat([h.reshape(-1, h.shape[-1]) for h in hs])
        x_down = torch.relu(block.up(x_up))
        scores = []
        for lin, x in ((block.up, x_up), (block.down, x_down)):
            w = lin.weight.detach()
            for i in range(w.shape[0]):
                for j in range(w.shape[1]):
                    scores.append(abs(float(w[i, j])) * math.sqrt(float((x[:, j] ** 2).sum())))
        mean = sum(scores) / len(scores)
        ratios.append(sum(s > m * mean for s in scores) / len(scores))
        sizes.append(block.up.weight.numel() + block.down.weight.numel())
        names.append([f"layers.{k}.up", f"layers.{k}.down"])
        hs = [block(h, scale=0.5) for h in hs]
    lo_r, hi_r = min(ratios), max(ratios)
    raw = [sparsity + lam * (1 - 2 * (r - lo_r) / (hi_r - lo_r)) for r in ratios]
    lo, hi = sparsity - lam, sparsity + lam

    def gap(c: float) -> float:
        vals = [min(max(v + c, lo), hi) for v in raw]
        return sum(n * v for n, v in zip(sizes, vals, strict=True)) / sum(sizes) - sparsity

    c = brentq(gap, -1, 1, xtol=1e-14)
    out = {}
    for group, v in zip(names, raw, strict=True):
        for n in group:
            out[n] = min(max(v + c, lo), hi)
    return out


def test_owl_matches_direct_implementation() -> None:
    from mfac.prune.budgets.owl import OWLConfig, owl_sparsities

    model, batches = _chain(4)
    snap = _snapshot(model)
    info: dict[str, object] = {}
    got = owl_sparsities(
        model, batches, _run, 0.6, OWLConfig(threshold=2.0, spread=0.1, calib_batches=3),
        layers=_layers, info=info,
    )  # fmt: skip
    assert _same(model, snap)  # measuring changes nothing
    ratios = list(info["owl_ratios"].values())  # type: ignore[union-attr]
    assert len(set(ratios)) > 1  # the test exercises unequal budgets
    with torch.no_grad():
        expect = _direct_owl(model, batches, 0.6, 2.0, 0.1)
    assert got.keys() == expect.keys()
    for n in got:
        assert got[n] == pytest.approx(expect[n], abs=1e-9), n
    # the budgets drive a layer-wise pruner layer by layer, overall sparsity preserved
    masks, _ = sparsegpt(
        model, batches, _run, got, layers=_layers, block=4, calib_batches=3, progress=False
    )
    for n, keep in masks.items():
        assert abs(1 - float(keep.float().mean()) - got[n]) < 0.02, n
    total = sum(k.numel() for k in masks.values())
    assert abs(sum(int((~k).sum()) for k in masks.values()) / total - 0.6) < 0.02


@settings(max_examples=60, deadline=None)
@given(
    ratios=st.lists(st.floats(0, 0.2), min_size=1, max_size=12),
    sparsity=st.floats(0.05, 0.95),
    spread=st.floats(0.0, 0.3),
    seed=st.integers(0, 100),
)
def test_owl_budgets_properties(ratios, sparsity, spread, seed) -> None:
    """Budgets stay in [S - lambda, S + lambda], keep the weighted mean, and never give a
    block with more outliers a higher sparsity."""
    from mfac.prune.budgets.owl import MAX_SPARSITY, owl_budgets

    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 100, (len(ratios),), generator=gen).tolist()
    hi = min(sparsity + spread, MAX_SPARSITY)
    out = owl_budgets(ratios, sizes, sparsity, spread)
    assert all(max(sparsity - spread, 0) - 1e-12 <= v <= hi + 1e-12 for v in out)
    mean = sum(n * v for n, v in zip(sizes, out, strict=True)) / sum(sizes)
    assert mean == pytest.approx(sparsity, abs=1e-9)
    order = sorted(range(len(ratios)), key=lambda i: ratios[i])
    for a, b in itertools.pairwise(order):
        if ratios[a] < ratios[b]:
            assert out[a] >= out[b] - 1e-12


def test_owl_config_validates() -> None:
    from mfac.prune.budgets.owl import OWLConfig

    for bad in ({"threshold": 0}, {"spread": 1.0}, {"calib_batches": 0}, {"granularity": "x"}):
        with pytest.raises(ValueError):
            OWLConfig(**bad)  # type: ignore[arg-type]


def test_fisher_budgets_match_a_direct_computation_and_change_nothing() -> None:
    """budget="fisher": per-block shares kept by the global ranking of w^2 * sum_b g_b^2
    (computed here by hand, one batch at a time), mapped by owl_budgets; weights, .grad and
    the train/eval mode are as before; oneshot prunes to exactly those budgets."""
    from mfac.prune import oneshot
    from mfac.prune._layers import find_targets
    from mfac.prune.budgets import fisher_sparsities
    from mfac.prune.budgets.owl import owl_budgets

    model, batches = _chain(3)
    targets = find_targets(model, _layers)
    fisher = {t.name: torch.zeros_like(t.param) for t in targets}
    for b in batches:
        model.zero_grad()
        _loss(model, b).backward()
        for t in targets:
            fisher[t.name] += t.param.grad.square()
    scores = {t.name: t.param.detach().square() * fisher[t.name] for t in targets}
    flat = torch.cat([v.reshape(-1) for v in scores.values()]).sort().values
    threshold = flat[int(0.6 * flat.numel()) - 1]
    blocks = sorted({n.rsplit(".", 1)[0] for n in scores})  # layers.0, layers.1, ...
    members = {b: [n for n in scores if n.startswith(b + ".")] for b in blocks}
    kept = [sum(int((scores[n] > threshold).sum()) for n in members[b]) for b in blocks]
    sizes = [sum(scores[n].numel() for n in members[b]) for b in blocks]
    expect = owl_budgets([k / s for k, s in zip(kept, sizes, strict=True)], sizes, 0.6, 0.1)

    marker = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), marker, strict=True):
        p.grad = g.clone()
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    info: dict = {}
    got = fisher_sparsities(model, batches, _loss, 0.6, spread=0.1, layers=_layers, info=info)
    for block, budget in zip(blocks, expect, strict=True):
        for name in scores:
            if name.startswith(block + "."):
                assert got[name] == pytest.approx(budget, abs=1e-12)
    assert list(info["fisher_group_sparsity"].values()) == pytest.approx(expect, abs=1e-12)
    assert len(set(expect)) > 1  # the blocks do get different budgets
    total = sum(t.numel for t in targets)
    assert sum(got[t.name] * t.numel for t in targets) / total == pytest.approx(0.6, abs=1e-9)
    assert model.training
    for p, b, g in zip(model.parameters(), before, marker, strict=True):
        assert torch.equal(p, b) and torch.equal(p.grad, g)

    ref, _ = _chain(3)
    masks, _ = sparsegpt(ref, batches, _loss, got, layers=_layers, calib_batches=3, progress=False)
    res = oneshot(model, 0.6, "sparsegpt", data=batches, loss_fn=_loss, layers=_layers,
                  budget="fisher", owl_spread=0.1, calib_batches=3, progress=False)  # fmt: skip
    assert "fisher" in res.timings and res.info["fisher_group_sparsity"]
    assert all(torch.equal(res.masks[n], masks[n]) for n in masks)


@pytest.mark.parametrize("budget", ["fisher", "owl"])
def test_budget_batches_reads_a_prefix_of_the_calibration(budget: str) -> None:
    """budget_batches=k: the budgets are those computed from the first k calibration batches
    alone, while the pruning itself still reads every calibration batch."""
    from mfac.prune import oneshot

    _, batches = _chain(5)
    key, common = f"{budget}_group_sparsity", {
        "loss_fn": _loss, "layers": _layers, "budget": budget, "owl_spread": 0.1,
        "owl_threshold": 2.0, "progress": False,
    }  # fmt: skip
    few = oneshot(_chain(5)[0], 0.6, "sparsegpt", data=batches[:2], calib_batches=2, **common)
    res = oneshot(_chain(5)[0], 0.6, "sparsegpt", data=batches, calib_batches=3, budget_batches=2,
                  **common)  # fmt: skip
    assert res.info[key] == few.info[key]
    assert res.info["budget_batches"] == 2 and res.info["calib_batches"] == 3
    full = oneshot(_chain(5)[0], 0.6, "sparsegpt", data=batches, calib_batches=3, **common)
    assert full.info["budget_batches"] == 3
    assert full.info[key] != few.info[key]  # the third batch does move the budgets
    # same budgets, more batches for the layer solves: the masks are those of 3 batches
    ref, _ = _chain(5)
    budgets = {n: float((~m).sum()) / m.numel() for n, m in res.masks.items()}
    masks, _ = sparsegpt(ref, batches, _loss, budgets, layers=_layers, calib_batches=3,
                         progress=False)  # fmt: skip
    assert all(torch.equal(res.masks[n], masks[n]) for n in masks)


def test_budget_batches_is_capped_by_calib_batches_and_preset_default() -> None:
    """budget_batches is an upper bound: above calib_batches the budgets read every calibration
    batch; fisher-sparsegpt reads at most 32 by default, the base method all of them."""
    from mfac.prune import oneshot
    from mfac.prune.methods.presets import FisherSparseGPTConfig
    from mfac.prune.methods.sparsegpt import SparseGPTConfig

    _, batches = _chain(5)
    common = {"loss_fn": _loss, "layers": _layers, "budget": "fisher", "progress": False}
    big = oneshot(_chain(5)[0], 0.6, "sparsegpt", data=batches, calib_batches=3,
                  budget_batches=40, **common)  # fmt: skip
    full = oneshot(_chain(5)[0], 0.6, "sparsegpt", data=batches, calib_batches=3, **common)
    assert big.info["budget_batches"] == 3
    assert big.info["fisher_group_sparsity"] == full.info["fisher_group_sparsity"]
    assert FisherSparseGPTConfig().budget_batches == 32
    assert SparseGPTConfig().budget_batches is None


def test_fisher_budget_refuses_a_loss_that_is_not_a_scalar() -> None:
    from mfac.prune import oneshot

    model, batches = _chain(4)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="scalar loss"):
        oneshot(model, 0.5, "sparsegpt", data=batches, loss_fn=_run, layers=_layers,
                budget="fisher", calib_batches=3, progress=False)  # fmt: skip
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("block", [16, 40, 1000])
def test_mfac_saliency_matches_a_dense_float64_oracle(block: int) -> None:
    """fisher_saliency="mfac": w^2 / (2 [F^-1]_ii) with F = lam I + G_b^T G_b / m formed and
    inverted densely in float64 per block of ``block`` coordinates of one layer (the last block
    of a layer shorter; 1000: one block per layer), lam = damp * mean diag(G^T G / m) over all
    pruned weights, G one float32 gradient per batch; the budgets rank these scores."""
    from mfac.prune import oneshot
    from mfac.prune._layers import find_targets
    from mfac.prune.budgets import fisher_sparsities
    from mfac.prune.budgets.fisher import _budgets_from_scores, mfac_saliencies

    model, batches = _chain(5)
    targets = find_targets(model, _layers)
    grads: dict[str, list[torch.Tensor]] = {t.name: [] for t in targets}
    for b in batches:
        model.zero_grad()
        _loss(model, b).backward()
        for t in targets:  # the collector stores float32 rows
            grads[t.name].append(t.param.grad.reshape(-1).float().double())
    model.zero_grad()
    m, damp = len(batches), 0.05
    g = {n: torch.stack(v) for n, v in grads.items()}
    lam = damp * sum(float(v.square().sum()) for v in g.values()) / (
        m * sum(v.shape[1] for v in g.values())
    )
    expect = []
    for t in targets:
        gl = g[t.name]
        inv_diag = torch.empty(gl.shape[1], dtype=F64)
        for start in range(0, gl.shape[1], block):
            gb = gl[:, start : start + block]
            f = lam * torch.eye(gb.shape[1], dtype=F64) + gb.T @ gb / m
            inv_diag[start : start + block] = torch.linalg.inv(f).diagonal()
        w = t.param.detach().reshape(-1).double()
        expect.append(w.square() / (2 * inv_diag))
    got = mfac_saliencies(model, batches, _loss, targets, block_size=block, damp=damp)
    for e, s, t in zip(expect, got, targets, strict=True):
        assert s.shape == t.shape and s.dtype == F64
        # the operator keeps L^-1 G in the buffer's float32: agreement to float32 round-off
        assert torch.allclose(s.reshape(-1), e, rtol=1e-5, atol=0)
    info: dict = {}
    budgets = fisher_sparsities(
        model, batches, _loss, 0.6, spread=0.1, layers=_layers, info=info, saliency="mfac",
        block_size=block, damp=damp,
    )  # fmt: skip
    assert budgets == _budgets_from_scores(targets, [s.reshape(-1) for s in got], 0.6, 0.1, None)
    oracle = _budgets_from_scores(targets, expect, 0.6, 0.1, None)
    assert all(budgets[n] == pytest.approx(oracle[n], abs=0.02) for n in budgets)
    assert all(p.grad is None for p in model.parameters())
    res = oneshot(model, 0.6, "sparsegpt", data=batches, loss_fn=_loss, layers=_layers,
                  budget="fisher", owl_spread=0.1, calib_batches=3, fisher_saliency="mfac",
                  fisher_block=block, fisher_damp=damp, progress=False)  # fmt: skip
    assert res.info["fisher_group_sparsity"] == info["fisher_group_sparsity"]


def test_mfac_saliency_refusals() -> None:
    from mfac.prune.budgets import fisher_sparsities

    model, batches = _chain(5)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="saliency must be one of diag, mfac"):
        fisher_sparsities(model, batches, _loss, 0.5, layers=_layers, saliency="kfac")
    with pytest.raises(ValueError, match="non-finite"):
        fisher_sparsities(model, batches, lambda mo, b: _loss(mo, b) * float("nan"), 0.5,
                          layers=_layers, saliency="mfac")  # fmt: skip
    calls = []

    def counted(mo, b):
        calls.append(b)
        return _loss(mo, b)

    # bad damping or block size: refused by name before any gradient is taken
    for kwargs, match in (({"damp": -1.0}, "damp must be a positive"),
                          ({"damp": 0.0}, "damp must be a positive"),
                          ({"block_size": 0}, "block_size must be >= 1")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            fisher_sparsities(model, batches, counted, 0.5, layers=_layers, saliency="mfac",
                              **kwargs)  # fmt: skip
    assert calls == []
    assert _same(model, snap)
