"""mfac-exact: the greedy correlated OBS inside Fisher blocks against dense references."""

from __future__ import annotations

import math

import pytest
import torch

from mfac import InverseFisher
from mfac.prune.methods.mfac_exact import block_inverses, exact_step

from oracle import dense_block_inverse_fisher
from prune_models import _setup

F64 = torch.float64


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
