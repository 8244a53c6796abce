"""OBS maths of the pruners against dense float64 oracles: the M-FAC pruner's summed updates,
mfac-exact's greedy OBC inside blocks, and SparseGPT's column-by-column layer-wise OBS."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mfac import InverseFisher
from mfac.prune._layers import Layout, current_masks, find_targets
from mfac.prune.methods.mfac_exact import block_inverses, exact_step
from mfac.prune.methods.mfac_obs import obs_step
from mfac.prune.methods.sparsegpt import prune_layer

from oracle import dense_block_inverse_fisher, dense_inverse_fisher

F64 = torch.float64


def _setup(shape: tuple[int, int], m: int, block: int | None, damp: float, seed: int = 0):
    """A one-layer model, its layout, random gradients and the operator over them."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(shape[1], shape[0], bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(shape, generator=gen, dtype=F64))
    targets = find_targets(model)
    priors = current_masks(targets)
    layout = Layout(targets, priors, block)
    grads = torch.randn(m, layout.dim, generator=gen, dtype=F64)
    grads[:, 0] *= 5.0  # uneven curvature, so OBS and magnitude disagree
    dense = dense_inverse_fisher(grads, damp)
    fisher = InverseFisher(grads.clone(), damp, block)
    return model, targets, priors, layout, grads, dense, fisher


def test_single_weight_obs_is_constrained_quadratic_minimum() -> None:
    """Removing one weight: the OBS update is the exact minimiser of the quadratic
    1/2 (w' - w)^T F (w' - w) subject to w'_q = 0, and q has the lowest saliency."""
    model, targets, priors, layout, _grads, hinv, fisher = _setup((3, 4), 6, None, 0.1)
    w = model.weight.detach().reshape(-1).clone()
    f = torch.linalg.inv(hinv)
    rho = w.square() / (2 * hinv.diagonal())
    q = int(rho.argmin())
    obs_step(targets, [priors[targets[0].name]], fisher, layout, 1 / 12)
    # constrained minimum: free coordinates solve F_ff (w'_f - w_f) = F_fq w_q
    free = [i for i in range(12) if i != q]
    expect = w.clone()
    expect[q] = 0.0
    expect[free] = w[free] + torch.linalg.solve(f[free][:, free], f[free, q] * w[q])
    got = model.weight.detach().reshape(-1)
    assert torch.allclose(got, expect, atol=1e-9, rtol=1e-9)


def test_summed_single_weight_updates_match_formula() -> None:
    """Dropping a set P: delta = F^-1 t with t_q = -w_q / [F^-1]_qq on P (the paper's pruner)."""
    model, targets, priors, layout, _grads, hinv, fisher = _setup((4, 8), 16, None, 0.05)
    w = model.weight.detach().reshape(-1).clone()
    rho = w.square() / (2 * hinv.diagonal())
    drop = rho.argsort()[:12]
    t = torch.zeros(32, dtype=F64)
    t[drop] = -w[drop] / hinv.diagonal()[drop]
    expect = w + hinv @ t
    expect[drop] = 0.0
    masks = obs_step(targets, [priors[targets[0].name]], fisher, layout, 12 / 32)
    assert torch.allclose(model.weight.detach().reshape(-1), expect, atol=1e-9)
    assert int((~masks[0]).sum()) == 12


def _greedy_reference(
    hinv: torch.Tensor, w: torch.Tensor, count: int
) -> tuple[torch.Tensor, list[int], float]:
    """Plain dense greedy OBS in float64: remove the lowest w^2/(2 Hinv_qq) one at a time."""
    h, w = hinv.clone(), w.clone()
    removed: list[int] = []
    total = 0.0
    for _ in range(count):
        loss = [
            math.inf if i in removed else float(w[i] ** 2 / (2 * h[i, i])) for i in range(len(w))
        ]
        p = min(range(len(w)), key=lambda i: loss[i])
        total += loss[p]
        w = w - w[p] / h[p, p] * h[:, p]
        w[p] = 0.0
        h = h - torch.outer(h[:, p], h[p, :]) / h[p, p]
        removed.append(p)
    return w, removed, total


@pytest.mark.parametrize("m", [5, 40])  # Woodbury form (B > m) and direct form (B <= m)
def test_exact_one_block_equals_dense_greedy(m: int) -> None:
    model, targets, priors, layout, _grads, hinv, fisher = _setup((4, 6), m, 24, 0.02, seed=m)
    w = model.weight.detach().reshape(-1).clone()
    exact_step(targets, [priors[targets[0].name]], fisher, layout, 0.5)
    ref, removed, loss = _greedy_reference(hinv, w, 12)
    got = model.weight.detach().reshape(-1)
    assert torch.allclose(got, ref, atol=1e-8)
    assert set((got == 0).nonzero().flatten().tolist()) == set(removed)
    # sequential greedy removal == joint OBS removal of the whole set (correlated update)
    p = torch.tensor(sorted(removed))
    joint = w - hinv[:, p] @ torch.linalg.solve(hinv[p][:, p], w[p])
    assert torch.allclose(got, joint, atol=1e-8)
    assert loss == pytest.approx(0.5 * float(w[p] @ torch.linalg.solve(hinv[p][:, p], w[p])))


def test_exact_global_threshold_across_blocks() -> None:
    """Several blocks: the global threshold removes exactly the budget, each block follows its
    own greedy order."""
    model, targets, priors, layout, grads, _, fisher = _setup((4, 8), 12, 8, 0.05, seed=3)
    hinv = dense_block_inverse_fisher(grads, 0.05, 8)
    w = model.weight.detach().reshape(-1).clone()
    masks = exact_step(targets, [priors[targets[0].name]], fisher, layout, 0.5)
    got = model.weight.detach().reshape(-1)
    counts = [int((~masks[0].reshape(-1)[b * 8 : (b + 1) * 8]).sum()) for b in range(4)]
    assert sum(counts) == 16
    for b in range(4):
        sl = slice(b * 8, (b + 1) * 8)
        ref, _, _ = _greedy_reference(hinv[sl, sl], w[sl], counts[b])
        assert torch.allclose(got[sl], ref, atol=1e-8)


def test_batched_block_inverses_equal_submatrix() -> None:
    for m in (4, 64):  # Woodbury and direct forms
        grads = torch.randn(m, 96, dtype=torch.float32)
        fisher = InverseFisher(grads.clone(), 1e-2, 32, damp_mode="relative")
        batched = block_inverses(fisher, 0, 3)
        for b in range(3):
            sub = fisher.submatrix(torch.arange(b * 32, (b + 1) * 32))
            assert torch.allclose(batched[b], sub, rtol=1e-6, atol=1e-6 * float(sub.abs().max()))


def test_exact_nm_is_valid() -> None:
    model, targets, priors, layout, _grads, _hinv, fisher = _setup((2, 8), 30, 16, 0.05, seed=5)
    masks = exact_step(targets, [priors[targets[0].name]], fisher, layout, 0.0, pattern=(2, 4))
    groups = masks[0].reshape(-1, 4).sum(1)
    assert bool((groups == 2).all())
    assert bool((model.weight.detach().reshape(-1, 4) != 0).sum(1).le(2).all())


# --------------------------------------------------------------------------- SparseGPT
def _sparsegpt_reference(w: torch.Tensor, h: torch.Tensor, sparsity: float, block: int, nm=None):
    """The same algorithm written with explicit inverses of the trailing Hessian sub-matrices
    (no Cholesky): column j uses Hj^-1 = inv(H[j:, j:]), error w_ij / [Hj^-1]_00 spread as
    -err * [Hj^-1]_{0,:}; masks per block by w^2 / [Hj^-1]_00 at the block start."""
    w = w.to(F64).clone()
    h = h.to(F64).clone()
    h.diagonal().add_(0.01 * float(h.diagonal().mean()))
    rows, cols = w.shape
    keep = torch.ones(rows, cols, dtype=torch.bool)
    trailing = [torch.linalg.inv(h[j:, j:]) for j in range(cols)]
    diag = torch.tensor([float(t[0, 0]) for t in trailing], dtype=F64)
    for c0 in range(0, cols, block):
        c1 = min(c0 + block, cols)
        if nm is None:
            score = w[:, c0:c1].square() / diag[c0:c1]
            k = round(sparsity * score.numel())
            flat = torch.ones(score.numel(), dtype=torch.bool)
            flat[score.reshape(-1).argsort()[:k]] = False
            keep[:, c0:c1] = flat.view(score.shape)
        for j in range(c0, c1):
            if nm is not None and (j - c0) % nm[1] == 0:
                score = w[:, j : j + nm[1]].square() / diag[j : j + nm[1]]
                drop = score.argsort(dim=1)[:, : nm[1] - nm[0]]
                keep[:, j : j + nm[1]].scatter_(1, drop, False)
            err = torch.where(keep[:, j], 0.0, w[:, j]) / trailing[j][0, 0]
            w[:, j:] -= err[:, None] * trailing[j][0][None, :]
            w[:, j] = torch.where(keep[:, j], w[:, j], 0.0)
    return w, keep


@pytest.mark.parametrize(
    ("sparsity", "nm", "block"), [(0.5, None, 4), (0.7, None, 16), (0.0, (2, 4), 8)]
)
def test_prune_layer_matches_dense_reference(sparsity, nm, block) -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(200, 16, generator=gen, dtype=F64) @ torch.randn(
        16, 16, generator=gen, dtype=F64
    )
    h = 2 * x.T @ x / 200
    w = torch.randn(6, 16, generator=gen, dtype=F64)
    new, keep = prune_layer(w, h, sparsity, nm, block)
    ref_w, ref_keep = _sparsegpt_reference(w, h, sparsity, block, nm)
    assert torch.equal(keep, ref_keep)
    assert torch.allclose(new, ref_w, atol=1e-9)
    assert bool((new[~keep] == 0).all())
    # the layer-wise reconstruction loss beats plain masking at the same mask
    err_obs = float(((new - w) @ x.T).norm())
    err_mask = float(((w * keep - w) @ x.T).norm())
    assert err_obs <= err_mask + 1e-12


def test_prune_layer_float32_close_to_float64() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 32, generator=gen)
    w = torch.randn(8, 32, generator=gen)
    h = 2 * x.T @ x / 300
    new32, keep32 = prune_layer(w, h, 0.5)
    new64, keep64 = prune_layer(w.double(), h.double(), 0.5)
    assert new32.dtype == torch.float32
    assert torch.equal(keep32, keep64)
    assert torch.allclose(new32.double(), new64, atol=1e-5)


def test_conv_hessian_from_patches_and_model_runner() -> None:
    """Conv2d calibration inputs are the im2col patches: H = 2 X^T X / n with X built by an
    explicit loop over output positions; the runner then prunes every layer per column block."""
    from mfac.prune.methods.sparsegpt import HessianRecorder, sparsegpt

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, stride=2), nn.Flatten(), nn.Linear(64, 8))
    x = torch.randn(3, 2, 8, 8)
    targets = find_targets(model)
    rec = HessianRecorder(targets[:1])
    with torch.no_grad():
        model(x)
    rec.remove()
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    rows = [
        padded[b, :, i : i + 3, j : j + 3].reshape(-1)
        for b in range(3)
        for i in range(0, 8, 2)
        for j in range(0, 8, 2)
    ]
    patches = torch.stack(rows).double()
    expect = 2 * patches.T @ patches / patches.shape[0]
    assert torch.allclose(rec.hessian(targets[0].name), expect, atol=1e-5)
    masks, timings = sparsegpt(model, [x], lambda m, b: m(b), 0.5, block=16, progress=False)
    for name, keep in masks.items():
        assert abs(1 - float(keep.float().mean()) - 0.5) < 0.02
        assert bool((dict(model.named_modules())[name].weight[~keep] == 0).all())
    assert set(timings) == {"collect", "precompute", "prune"}


def test_lowest_selects_exactly_count_with_ties() -> None:
    from mfac.prune.patterns import lowest

    gen = torch.Generator().manual_seed(2)
    for n, count in [(10, 0), (10, 10), (50, 17), (1000, 500)]:
        values = torch.randint(0, 7, (n,), generator=gen).double()  # many ties
        values[:3] = -math.inf
        sel = lowest(values, count)
        assert int(sel.sum()) == count
        if 0 < count < n:
            assert float(values[sel].max()) <= float(values[~sel].min())


def test_exact_same_result_in_one_block_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunking only bounds memory: one block per chunk gives the same weights and masks."""
    import mfac.prune.methods.mfac_exact as exact_mod

    results = []
    for chunk_bytes in (exact_mod.CHUNK_BYTES, 16 * 8 * 8):  # all blocks at once, then one
        monkeypatch.setattr(exact_mod, "CHUNK_BYTES", chunk_bytes)
        model, targets, priors, layout, _, _, fisher = _setup((4, 8), 12, 8, 0.05, seed=3)
        masks = exact_step(targets, [priors[targets[0].name]], fisher, layout, 0.6)
        results.append((model.weight.detach().clone(), masks[0].clone()))
    assert torch.equal(results[0][1], results[1][1])
    assert torch.allclose(results[0][0], results[1][0], atol=1e-12)


def test_joint_removal_lu_fallback_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the Cholesky of hinv[S, S] reports lost definiteness, the LU fallback gives the same
    joint OBS removal (the guard is reachable and right)."""
    from mfac.prune.methods.mfac_exact import greedy_obs, joint_removal

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 16, 24, dtype=F64, generator=gen)
    hinv = torch.linalg.inv(a @ a.transpose(1, 2) / 24 + 0.05 * torch.eye(16, dtype=F64))
    w = torch.randn(3, 16, dtype=F64, generator=gen)
    real = torch.ones(3, 16, dtype=torch.bool)
    _, order = greedy_obs(hinv, w, real, 16)
    counts = torch.tensor([5, 9, 12])
    expect_w, expect_removed = joint_removal(hinv, w, order, counts)
    real_cholesky_ex = torch.linalg.cholesky_ex

    def failing(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        factor, info = real_cholesky_ex(x)
        return factor, torch.ones_like(info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    got_w, got_removed = joint_removal(hinv, w, order, counts)
    assert torch.equal(got_removed, expect_removed)
    assert int(got_removed.sum()) == 26
    assert torch.allclose(got_w, expect_w, atol=1e-10)
