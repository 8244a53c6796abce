"""SparseGPT: prune_layer against a dense float64 reference, dead inputs, damping escalation and
its refusals (model restored), the Cholesky factor, conv layers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mfac.prune._layers import find_targets
from mfac.prune.methods.sparsegpt import (
    calibration_damp,
    damped_inverse_factor,
    prune_layer,
    sparsegpt,
)

from prune_models import _chain, _layers, _run, _same, _snapshot

F64 = torch.float64


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


def test_sparsegpt_all_zero_inputs_mask_matches_weights() -> None:
    """A layer whose inputs are all zero: its reported mask and sparsity match the weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 4)).double()
    with torch.no_grad():
        model[0].weight.zero_()  # the second layer sees only its bias-free zero inputs
    batches = [torch.randn(16, 8, dtype=F64) for _ in range(2)]
    masks, _ = sparsegpt(model, batches, _run, 0.5, layers=["1"], calib_batches=2, progress=False)
    w = model[1].weight
    assert torch.equal(masks["1"], w != 0)
    assert abs(1 - float(masks["1"].float().mean()) - 0.5) < 1e-9


def test_sparsegpt_dead_inputs_pruned_first_and_counted() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=gen, dtype=F64)
    x[:, :2] = 0.0  # two dead inputs
    w = torch.randn(3, 8, generator=gen, dtype=F64) + 3.0
    h = 2 * x.T @ x / 50
    new, keep = prune_layer(w, h, 0.5, block=8)
    assert damped_inverse_factor(h, 0.01)[2] == 0.01  # no escalation needed
    assert not bool(keep[:, :2].any())  # removing them costs nothing
    assert int((~keep).sum()) == 12
    assert torch.equal(keep, new != 0)


def test_sparsegpt_cholesky_escalates_damping(monkeypatch) -> None:
    model, batches = _chain()
    real = torch.linalg.cholesky_ex
    calls = {"n": 0}

    def flaky(a, *args, **kwargs):
        calls["n"] += 1
        out, info = real(a, *args, **kwargs)
        return (out, torch.ones_like(info)) if calls["n"] == 1 else (out, info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", flaky)
    info: dict[str, object] = {}
    with pytest.warns(RuntimeWarning, match=r"layers.0.up: Cholesky.*damp=0.1"):
        sparsegpt(
            model, batches, _run, 0.5, layers=_layers, calib_batches=3, progress=False, info=info
        )
    assert info["damp_escalated"] == {"layers.0.up": pytest.approx(0.1)}
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_calibration_damp_switches_at_ten_tokens_per_input() -> None:
    assert calibration_damp(639, 64) == 0.1
    assert calibration_damp(640, 64) == 0.01
    assert calibration_damp(16384, 1536) == 0.01  # 128 windows of 128 tokens, SmolLM2's MLP
    assert calibration_damp(4096, 576) == 0.1  # 32 windows, its attention inputs


def test_auto_damp_is_each_layers_own_damping() -> None:
    # 8 batches of 4 x 3 tokens: 96 tokens, at least 10 per input of the 8-wide `up` layers
    # (0.01) and fewer than 10 per input of the 12-wide `down` layers (0.1); in one pass every
    # layer sees the dense model's inputs, so each must equal the run at its own damping
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 5, dtype=F64) for _ in range(8)]
    runs = {}
    for damp in (None, 0.01, 0.1):
        model, _ = _chain()
        info: dict[str, object] = {}
        sparsegpt(
            model, batches, _run, 0.5, layers=_layers, calib_batches=8, sequential=False,
            damp=damp, progress=False, info=info,
        )  # fmt: skip
        runs[damp] = (dict(model.named_parameters()), info)
    params, info = runs[None]
    expect = {n: 0.01 if n.endswith(".up") else 0.1 for n in info["damp"]}
    assert info["damp"] == expect and len(expect) == 6
    for name, value in expect.items():
        weight = name + ".weight"
        assert torch.equal(params[weight], runs[value][0][weight]), name
    assert "damp" not in runs[0.01][1]


def test_sparsegpt_unfactorable_raises_and_restores(monkeypatch) -> None:
    model, batches = _chain()
    snap = _snapshot(model)
    real = torch.linalg.cholesky_ex
    calls = {"n": 0}

    def fail_later(a, *args, **kwargs):
        calls["n"] += 1
        out, info = real(a, *args, **kwargs)
        return (out, torch.ones_like(info)) if calls["n"] > 3 else (out, info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", fail_later)
    with pytest.raises(
        ValueError, match=r"not positive definite even at damp=100 \(started at 0.01"
    ):
        sparsegpt(model, batches, _run, 0.5, layers=_layers, calib_batches=3, progress=False)
    assert _same(model, snap)


def test_sparsegpt_nonfinite_inputs_named_and_restored() -> None:
    model, batches = _chain()
    snap = _snapshot(model)
    bad = [b.clone() for b in batches]
    bad[1][0, 0, 0] = math.nan
    with pytest.raises(ValueError, match=r"layers\.0\.up: the calibration Hessian holds NaN"):
        sparsegpt(model, bad, _run, 0.5, layers=_layers, calib_batches=3, progress=False)
    assert _same(model, snap)


def test_lower_triangular_inverse_and_factor() -> None:
    from mfac.prune.methods.sparsegpt import damped_inverse_factor, lower_triangular_inverse

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 300, generator=gen, dtype=F64)
    low = torch.linalg.cholesky(a @ a.T / 300 + torch.eye(300, dtype=F64))
    inv = lower_triangular_inverse(low, leaf=16)
    assert torch.allclose(inv @ low, torch.eye(300, dtype=F64), atol=1e-10)
    assert bool((inv.triu(1) == 0).all())
    h = a @ a.T / 300
    u, dead, used = damped_inverse_factor(h, 0.01)
    hd = h + 0.01 * float(h.diagonal().mean()) * torch.eye(300, dtype=F64)
    assert not bool(dead.any()) and used == 0.01
    assert bool((u.tril(-1) == 0).all())  # upper triangular, U^T U = (H + damp)^-1
    assert torch.allclose(u.T @ u, torch.linalg.inv(hd), atol=1e-10)


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
