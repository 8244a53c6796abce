"""Masks: held through fine-tuning, exported to torch.nn.utils.prune, saved and loaded
(safetensors masks, sparse checkpoints with tied weights), refusals that change nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mfac.prune as mp

from prune_models import _fresh, _loss, _same, _snapshot


def _optimizers(model: nn.Module):
    yield torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    yield torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    from mfac.optim import MFAC, MFACSGD

    yield MFACSGD(model.parameters(), lr=1e-3, ngrads=8, damp=1e-4)
    yield MFAC(model.parameters(), lr=1e-3)  # the default rule


class TiedLM(nn.Module):
    """An embedding tied to the output layer, with one hidden linear layer between."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.embed(ids))))


def _pruned_tied(prune_head: bool) -> tuple[TiedLM, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = TiedLM()
    masks = {"mid": torch.rand(8, 8) > 0.5}
    if prune_head:
        masks["head"] = torch.rand(16, 8) > 0.5
    from mfac.prune import apply_masks

    apply_masks(model, masks)
    return model, masks


@pytest.mark.usefixtures("one_thread")
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


@pytest.mark.usefixtures("one_thread")
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


@pytest.mark.usefixtures("one_thread")
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


@pytest.mark.parametrize("prune_head", [False, True])
def test_save_sparse_tied_weights_round_trip(tmp_path, prune_head) -> None:
    from mfac.prune import load_sparse, save_sparse
    from mfac.prune.masks import read_sparse

    model, masks = _pruned_tied(prune_head)
    save_sparse(model, masks, tmp_path / "s.safetensors")
    state, got = read_sparse(tmp_path / "s.safetensors")
    assert set(state) == set(model.state_dict())
    assert got.keys() == masks.keys()
    torch.manual_seed(1)
    other = TiedLM()
    load_sparse(other, tmp_path / "s.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    assert other.head.weight is other.embed.weight  # still tied


def test_save_sparse_refuses_masks_naming_no_layer(tmp_path) -> None:
    from mfac.prune import save_sparse

    model, _ = _pruned_tied(False)
    path = tmp_path / "s.safetensors"
    path.write_bytes(b"user data")
    for bad in ({"nothere": torch.ones(8, 8, dtype=torch.bool)}, {}):
        with pytest.raises(ValueError, match=r"the model does not have|masks is empty"):
            save_sparse(model, bad, path)
        assert path.read_bytes() == b"user data"
    with pytest.raises(ValueError, match="shape"):
        save_sparse(model, {"mid": torch.ones(4, 8, dtype=torch.bool)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]


def test_load_sparse_refusals_leave_model_unchanged(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from mfac.prune import load_sparse, save_sparse

    model, masks = _pruned_tied(False)
    good = tmp_path / "good.safetensors"
    save_sparse(model, masks, good)
    raw = load_file(str(good))
    cases = {
        "missing keys": {k: v for k, v in raw.items() if not k.startswith("mid.bias")},
        "extra keys": {**raw, "other.weight": torch.zeros(2)},
        "shape": {**raw, "mid.bias": torch.zeros(9)},
        "keeps": {**raw, "mid.weight::values": raw["mid.weight::values"][:-1].clone()},
    }
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as fh:
        meta = fh.metadata()
    torch.manual_seed(5)
    target = TiedLM()
    snap = _snapshot(target)
    for match, tensors in cases.items():
        path = tmp_path / f"{match.replace(' ', '_')}.safetensors"
        save_file(tensors, str(path), metadata=meta)
        with pytest.raises(ValueError, match=match):
            load_sparse(target, path)
        assert _same(target, snap), match
    wide = nn.Sequential(nn.Linear(8, 8))
    snap_wide = _snapshot(wide)
    with pytest.raises(ValueError, match="missing keys"):
        load_sparse(wide, good)
    assert _same(wide, snap_wide)
