"""M-FAC OBS (method="mfac"): the OBS update against its closed forms, and end to end on a
trained MLP (it beats magnitude; recomputation sub-steps; layer groups and paging match RAM)."""

from __future__ import annotations

import pytest
import torch

import mfac.prune as mp
from mfac.prune.methods.mfac_obs import obs_step

from prune_models import _acc, _fresh, _loss, _setup

F64 = torch.float64


@pytest.mark.usefixtures("one_thread")
def test_mfac_beats_magnitude_on_trained_digits(digits) -> None:
    """The property users come for: more accuracy left at the same (high) sparsity."""
    model = _fresh(digits)
    mp.oneshot(model, 0.9, "magnitude")
    acc_mag = _acc(model, digits[3])
    model = _fresh(digits)
    mp.oneshot(model, 0.9, "mfac", data=digits[2], loss_fn=_loss, num_grads=64, recompute=4)
    acc_mfac = _acc(model, digits[3])
    model = _fresh(digits)
    mp.oneshot(model, 0.9, "mfac-exact", data=digits[2], loss_fn=_loss, num_grads=64)
    acc_exact = _acc(model, digits[3])
    assert acc_mfac > acc_mag + 0.1, (acc_mfac, acc_mag)
    assert acc_exact > acc_mag + 0.1, (acc_exact, acc_mag)


@pytest.mark.usefixtures("one_thread")
def test_recompute_and_density_steps(digits) -> None:
    steps = mp.density_steps(1.0, 0.1, 4)
    assert steps[-1] == pytest.approx(0.9)
    dens = [1 - s for s in steps]
    assert all(abs(dens[i + 1] / dens[i] - dens[0]) < 1e-12 for i in range(3))
    model = _fresh(digits)
    res = mp.oneshot(model, 0.8, "mfac", data=digits[2], loss_fn=_loss, num_grads=16, recompute=3)
    assert abs(res.sparsity - 0.8) < 1e-3


@pytest.mark.usefixtures("one_thread")
def test_layer_groups_and_paging_match_in_ram(digits, tmp_path) -> None:
    """A buffer over the memory budget is memory-mapped; the result is the same."""
    model = _fresh(digits)
    ref = mp.oneshot(model, 0.7, "mfac", data=digits[2], loss_fn=_loss, num_grads=16, scope="layer")
    w_ref = [p.detach().clone() for p in model.parameters()]
    model = _fresh(digits)
    res = mp.oneshot(
        model,
        0.7,
        "mfac",
        data=digits[2],
        loss_fn=_loss,
        num_grads=16,
        scope="layer",
        memory_budget=1024,
        spill_dir=tmp_path,
    )
    assert res.info["memory_mapped"] is True
    for a, b in zip(w_ref, model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    model = _fresh(digits)
    grouped = mp.oneshot(
        model,
        0.7,
        "mfac",
        data=digits[2],
        loss_fn=_loss,
        num_grads=16,
        scope="layer",
        layer_groups=1,
    )
    assert all(abs(s - 0.7) < 0.01 for s in grouped.layer_sparsity.values())
    assert ref.masks.keys() == grouped.masks.keys()


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
