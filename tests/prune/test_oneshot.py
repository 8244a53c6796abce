"""mfac.prune.oneshot end to end: every method, N:M validity, masks that hold, torch.prune
export, safetensors round trips, paging past a memory budget, bad input, and the real property
users come for (mfac beats magnitude on a trained model)."""

from __future__ import annotations

import itertools

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import mfac.prune as mp
from mfac.prune._layers import Layout, current_masks, find_targets
from mfac.prune.collect import collect_gradients

METHODS = ["magnitude", "diag-fisher", "mfac", "mfac-exact", "sparsegpt"]


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run far faster on one intra-op thread on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    """A small MLP trained on sklearn digits (train / test split, 32-sample batches)."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=gen)
    tr, te = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(40):
        for idx in torch.randperm(1400, generator=gen).split(100):
            opt.zero_grad()
            _loss(model, (x[tr][idx], y[tr][idx])).backward()
            opt.step()
    batches = [(x[tr][i], y[tr][i]) for i in torch.randint(0, 1400, (64, 32), generator=gen)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return model, state, batches, (x[te], y[te])


def _acc(model: nn.Module, test) -> float:
    with torch.no_grad():
        return float((model(test[0]).argmax(1) == test[1]).float().mean())


def _fresh(digits) -> nn.Module:
    model, state, _, _ = digits
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("method", METHODS)
def test_every_method_hits_the_sparsity(digits, method) -> None:
    model = _fresh(digits)
    res = (
        mp.oneshot(model, 0.6, method, data=digits[2], loss_fn=_loss, num_grads=32)
        if method
        not in (
            "magnitude",
            "sparsegpt",
        )
        else mp.oneshot(model, 0.6, method, data=digits[2], loss_fn=_loss)
    )
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert set(res.masks) == set(names)
    for name in names:
        w = dict(model.named_modules())[name].weight
        assert bool((w[~res.masks[name]] == 0).all())
    if method == "sparsegpt":  # per-layer budget
        assert all(abs(s - 0.6) < 0.01 for s in res.layer_sparsity.values())
    else:
        assert abs(res.sparsity - 0.6) < 1e-3
    assert set(res.timings) >= {"collect", "precompute", "prune", "total"}
    assert _acc(model, digits[3]) > 0.5


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_masks_valid(digits, method, pattern) -> None:
    model = _fresh(digits)
    n, m = (int(v) for v in pattern.split(":"))
    kw = {"num_grads": 16} if method in ("diag-fisher", "mfac", "mfac-exact") else {}
    res = mp.oneshot(model, None, method, data=digits[2], loss_fn=_loss, pattern=pattern, **kw)
    for name, mask in res.masks.items():
        groups = mask.reshape(-1, m).sum(1)
        assert bool((groups == n).all()), name
        w = dict(model.named_modules())[name].weight
        assert bool(((w != 0).reshape(-1, m).sum(1) <= n).all())


def test_magnitude_global_and_layer_scope(digits) -> None:
    model = _fresh(digits)
    res = mp.oneshot(model, 0.5, "magnitude", scope="layer")
    assert all(abs(s - 0.5) < 0.01 for s in res.layer_sparsity.values())
    model = _fresh(digits)
    res = mp.oneshot(model, 0.5, "magnitude")
    kept = torch.cat([model[i].weight.detach().abs().reshape(-1) for i in (0, 2, 4)])
    assert float(kept[kept > 0].min()) >= float(
        torch.cat([digits[1][f"{i}.weight"].abs().reshape(-1) for i in (0, 2, 4)]).median()
    )


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


def test_collected_rows_are_masked_gradients(digits) -> None:
    model = _fresh(digits)
    mp.oneshot(model, 0.5, "magnitude")
    model.train()
    targets = find_targets(model)
    layout = Layout(targets, current_masks(targets), 16)
    buf = collect_gradients(model, _loss, digits[2][:3], layout, 3, progress=False)
    assert model.training  # mode restored
    model.eval()
    model.zero_grad()
    _loss(model, digits[2][1]).backward()
    expect = layout.gather([t.param.grad for t in targets])
    assert torch.allclose(buf.tensor[1], expect)
    assert layout.dim % 16 == 0 and layout.dim < sum(t.numel for t in targets)


def test_recompute_and_density_steps(digits) -> None:
    steps = mp.density_steps(1.0, 0.1, 4)
    assert steps[-1] == pytest.approx(0.9)
    dens = [1 - s for s in steps]
    assert all(abs(dens[i + 1] / dens[i] - dens[0]) < 1e-12 for i in range(3))
    model = _fresh(digits)
    res = mp.oneshot(model, 0.8, "mfac", data=digits[2], loss_fn=_loss, num_grads=16, recompute=3)
    assert abs(res.sparsity - 0.8) < 1e-3


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


def test_previous_masks_are_kept(digits) -> None:
    model = _fresh(digits)
    first = mp.oneshot(model, 0.5, "magnitude")
    second = mp.oneshot(model, 0.8, "mfac", data=digits[2], loss_fn=_loss, num_grads=16)
    for name in first.masks:
        assert not bool((second.masks[name] & ~first.masks[name]).any())


# --------------------------------------------------------------------------- masks
def _optimizers(model: nn.Module):
    yield torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    yield torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    from mfac.optim import MFAC

    yield MFAC(model.parameters(), lr=1e-3, ngrads=8, damp=1e-4, mode="paper")
    yield MFAC(model.parameters(), lr=1e-3)  # the default rule


def test_masks_hold_through_finetuning(digits) -> None:
    for i in range(3):
        model = _fresh(digits)
        opt_list = list(_optimizers(model))
        if i >= len(opt_list):
            break
        opt = opt_list[i]
        # stale optimizer state from dense training first: momentum on soon-pruned weights
        mp.finetune(model, _loss, digits[2][:3], opt, 3)
        res = mp.oneshot(model, 0.8, "mfac", data=digits[2], loss_fn=_loss, num_grads=16)
        if hasattr(opt, "set_masks"):
            opt.set_masks({dict(model.named_modules())[n].weight: m for n, m in res.masks.items()})
        mp.finetune(model, _loss, digits[2], opt, 20, res.masks)
        for name, mask in res.masks.items():
            w = dict(model.named_modules())[name].weight
            assert bool((w[~mask] == 0).all()), (type(opt).__name__, name)
            assert bool((w[mask] != 0).any())


def test_torch_prune_export_keeps_obs_corrections(digits) -> None:
    model = _fresh(digits)
    res = mp.oneshot(model, 0.7, "mfac", data=digits[2], loss_fn=_loss, num_grads=16)
    pruned = [model[i].weight.detach().clone() for i in (0, 2, 4)]
    out = model(digits[3][0]).detach()
    mp.to_torch_prune(model, res.masks)
    for i, w in zip((0, 2, 4), pruned, strict=True):
        assert torch.equal(model[i].weight_orig.detach(), w)  # corrected values, not pre-pruning
        assert torch.equal(model[i].weight_mask.bool(), res.masks[str(i)])
    assert torch.equal(model(digits[3][0]).detach(), out)
    # pruning again on top of a torch-pruned model keeps the reparametrisation consistent
    res2 = mp.oneshot(model, 0.8, "magnitude")
    mp.to_torch_prune(model, res2.masks)
    assert torch.equal(model[0].weight_mask.bool(), res2.masks["0"])
    mp.bake(model)
    assert not hasattr(model[0], "weight_orig")
    assert torch.equal(model[0].weight != 0, res2.masks["0"])


def test_safetensors_round_trips(digits, tmp_path) -> None:
    model = _fresh(digits)
    res = mp.oneshot(model, 0.75, "mfac", data=digits[2], loss_fn=_loss, num_grads=16)
    mp.save_masks(res.masks, tmp_path / "m.safetensors")
    loaded = mp.load_masks(tmp_path / "m.safetensors")
    assert all(torch.equal(loaded[n], res.masks[n]) for n in res.masks)
    mp.save_sparse(model, res.masks, tmp_path / "ckpt.safetensors")
    dense_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert (tmp_path / "ckpt.safetensors").stat().st_size < 0.5 * dense_bytes
    state = {k: v.clone() for k, v in model.state_dict().items()}
    other = _fresh(digits)
    masks = mp.load_sparse(other, tmp_path / "ckpt.safetensors")
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())
    assert all(torch.equal(masks[n], res.masks[n]) for n in res.masks)


def test_gradual_cubic_schedule_holds_masks(digits) -> None:
    sched = mp.cubic_schedule(0.9, 4)
    assert sched[-1] == pytest.approx(0.9) and all(a < b for a, b in itertools.pairwise(sched))
    model = _fresh(digits)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    seen = []

    def tune(m: nn.Module, masks: dict[str, torch.Tensor], step: int) -> None:
        mp.finetune(m, _loss, digits[2], opt, 10, masks)
        seen.append(step)

    results = mp.gradual(
        model, 0.9, "mfac", data=digits[2], loss_fn=_loss, steps=3, finetune_fn=tune, num_grads=16
    )
    assert seen == [0, 1, 2]
    assert abs(results[-1].sparsity - 0.9) < 1e-3
    for name, mask in results[-1].masks.items():
        assert bool((dict(model.named_modules())[name].weight[~mask] == 0).all())


# --------------------------------------------------------------------------- bad input
def _state(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _unchanged(model: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sparsity": 1.0}, ValueError, r"\[0, 1\)"),
        ({"sparsity": -0.1}, ValueError, r"\[0, 1\)"),
        ({"sparsity": float("nan")}, ValueError, r"\[0, 1\)"),
        ({"sparsity": 0.5, "pattern": "4:4"}, ValueError, "N < M"),
        ({"sparsity": 0.5, "pattern": "3:2"}, ValueError, "N < M"),
        ({"sparsity": 0.5, "pattern": "2:5"}, ValueError, "divisible by 5"),
        ({"sparsity": 0.5, "pattern": "two"}, ValueError, "N:M"),
        ({"sparsity": 0.5, "method": "obs"}, ValueError, "unknown method"),
        ({"sparsity": 0.5, "method": "mfac", "blocksize": 3}, TypeError, "unknown options"),
        ({"sparsity": 0.5, "method": "mfac", "data": None}, ValueError, "needs data"),
        ({"sparsity": 0.5, "method": "mfac", "damp": 0.0}, ValueError, "damp"),
        ({"sparsity": 0.5, "method": "mfac-exact", "block_size": 5000}, ValueError, "block_size"),
        ({"sparsity": 0.5, "method": "mfac", "layer_groups": 1}, ValueError, "layer_groups"),
        (
            {"sparsity": None, "method": "mfac-exact", "pattern": "2:4", "block_size": 6},
            ValueError,
            "divisible by M",
        ),
    ],
)
def test_bad_input_leaves_model_untouched(digits, kwargs, error, match) -> None:
    model = _fresh(digits)
    before = _state(model)
    call = {"method": "magnitude", "data": digits[2], "loss_fn": _loss, **kwargs}
    sparsity = call.pop("sparsity")
    method = call.pop("method")
    with pytest.raises(error, match=match):
        mp.oneshot(model, sparsity, method, **call)
    assert _unchanged(model, before)


def test_exhausted_generator_is_a_clear_error(digits) -> None:
    model = _fresh(digits)
    before = _state(model)
    with pytest.raises(ValueError, match="ran out after 3 batches"):
        mp.oneshot(model, 0.5, "mfac", data=iter(digits[2][:3]), loss_fn=_loss, num_grads=8)
    assert _unchanged(model, before)


def test_no_prunable_layers() -> None:
    with pytest.raises(ValueError, match="no prunable layers"):
        mp.oneshot(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), 0.5, "magnitude")


@pytest.mark.parametrize("method", ["diag-fisher", "mfac", "mfac-exact"])
def test_nan_loss_leaves_model_untouched(digits, method) -> None:
    model = _fresh(digits)
    model.train()
    before = _state(model)
    calls = {"n": 0}

    def nan_later(m: nn.Module, batch) -> torch.Tensor:
        calls["n"] += 1  # finite for the first sub-step, NaN in the second (after an update)
        loss = _loss(m, batch)
        return loss * float("nan") if calls["n"] > 8 else loss

    kw = {} if method == "diag-fisher" else {"recompute": 2}
    if method == "diag-fisher":
        calls["n"] = 5
    with pytest.raises(ValueError, match="non-finite loss"):
        mp.oneshot(model, 0.8, method, data=digits[2], loss_fn=nan_later, num_grads=8, **kw)
    assert _unchanged(model, before)
    assert model.training


def test_per_sample_rows_match_single_sample_gradients(digits) -> None:
    """torch.func per-sample rows equal the gradients of one-sample batches, in order."""
    model = _fresh(digits)
    targets = find_targets(model)
    layout = Layout(targets, current_masks(targets))
    data = [(b[0][:3], b[1][:3]) for b in digits[2][:2]]
    buf = collect_gradients(model, _loss, data, layout, 5, progress=False, per_sample=True)
    singles = [(x[i : i + 1], y[i : i + 1]) for x, y in data for i in range(3)][:5]
    ref = collect_gradients(model, _loss, singles, layout, 5, progress=False)
    assert torch.allclose(buf.tensor, ref.tensor, atol=1e-6)
    res = mp.oneshot(model, 0.7, "mfac", data=data, loss_fn=_loss, num_grads=6, per_sample=True)
    assert abs(res.sparsity - 0.7) < 1e-3


def test_oneshot_iobs_matches_the_dnn_variant(digits) -> None:
    import copy

    from mfac.prune import iobs_prune

    batches = digits[2]
    train, val = batches[:8], batches[8:12]
    via_oneshot, direct = copy.deepcopy(_fresh(digits)), copy.deepcopy(_fresh(digits))
    kwargs = {"iterations": 2, "dense_steps": 5, "lr": 1e-3}
    res = mp.oneshot(via_oneshot, 0.8, "iobs", data=train, loss_fn=_loss, val_data=val, **kwargs)
    ref = iobs_prune(direct, 0.8, data=train, loss_fn=_loss, val_data=val, **kwargs)
    assert res.method == "iobs" and res.info["best_iteration"] == ref.best_iteration
    assert res.sparsity == pytest.approx(0.8, abs=0.01)
    for name, mask in ref.masks.items():
        assert torch.equal(res.masks[name], mask)
    for a, b in zip(via_oneshot.parameters(), direct.parameters(), strict=True):
        assert torch.equal(a, b)
    before = _state(via_oneshot)
    with pytest.raises(TypeError, match="unknown options"):
        mp.oneshot(via_oneshot, 0.8, "iobs", data=train, loss_fn=_loss, block_size=4)
    assert _unchanged(via_oneshot, before)


@pytest.mark.parametrize("sequential", [True, False])
def test_iobs_first_iterate_is_sparsegpt_in_the_same_mode(digits, sequential: bool) -> None:
    """One I-OBS iteration is one SparseGPT projection, sequential or not, as asked; and the
    two modes differ on a multi-layer model (so the flag reaches the projection)."""
    import copy

    batches = digits[2][:6]
    iobs_model, sgpt_model = copy.deepcopy(_fresh(digits)), copy.deepcopy(_fresh(digits))
    mp.oneshot(iobs_model, 0.7, "iobs", data=batches, loss_fn=_loss, iterations=1,
               sequential=sequential)  # fmt: skip
    mp.oneshot(sgpt_model, 0.7, "sparsegpt", data=batches, loss_fn=_loss, progress=False,
               calib_batches=len(batches), sequential=sequential)  # fmt: skip
    for a, b in zip(iobs_model.parameters(), sgpt_model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    other = copy.deepcopy(_fresh(digits))
    mp.oneshot(other, 0.7, "iobs", data=batches, loss_fn=_loss, iterations=1,
               sequential=not sequential)  # fmt: skip
    assert any(
        not torch.allclose(a, b, atol=1e-6)
        for a, b in zip(iobs_model.parameters(), other.parameters(), strict=True)
    )


def test_iobs_excludes_the_layers_it_is_told_to(digits) -> None:
    """I-OBS takes ``exclude`` like every one-shot method (its N:M width error suggests it):
    an excluded layer keeps its weights and gets no mask, through both entry points."""
    import copy

    from mfac.prune import iobs_prune

    batches = digits[2][:6]
    first = find_targets(_fresh(digits))[0].name
    for run in ("oneshot", "iobs_prune"):
        model = copy.deepcopy(_fresh(digits))
        kept = model.get_submodule(first).weight.detach().clone()
        kw = {"data": batches, "loss_fn": _loss, "iterations": 1, "exclude": (first,)}
        res = (mp.oneshot(model, 0.7, "iobs", **kw) if run == "oneshot"
               else iobs_prune(model, 0.7, **kw))  # fmt: skip
        assert first not in res.masks and res.masks, run
        assert torch.equal(model.get_submodule(first).weight, kept), run
