"""Layer-wise pruners (Wanda, SparseGPT, OWL budgets) against direct float64 implementations,
the block-by-block sequential schedule, and refusals that leave the model as it was."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mfac.prune import calibration
from mfac.prune.methods.sparsegpt import damped_inverse_factor, prune_layer, sparsegpt
from mfac.prune.methods.wanda import WandaConfig, wanda

F64 = torch.float64


class Block(nn.Module):
    """A residual block called with a keyword argument, like a transformer layer."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return x + scale * self.down(torch.relu(self.up(x)))


class Chain(nn.Module):
    def __init__(self, width: int = 8, hidden: int = 12, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(5, width)
        self.layers = nn.ModuleList(Block(width, hidden) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.layers:
            h = block(h, scale=0.5)
        return h


def _chain(seed: int = 0) -> tuple[Chain, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = Chain().double()
    batches = [torch.randn(4, 3, 5, dtype=F64) for _ in range(3)]
    return model, batches


def _run(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch)


def _layers(name: str, _m: nn.Module) -> bool:
    return name.startswith("layers.")


# --------------------------------------------------------------------------- direct oracles
def _naive_wanda_layer(w: torch.Tensor, x: torch.Tensor, sparsity: float, nm=None) -> torch.Tensor:
    """Keep-mask by explicit loops: score |w_ij| * sqrt(sum_t x_tj^2), per row."""
    rows, cols = w.shape
    norms = [math.sqrt(sum(float(x[t, j]) ** 2 for t in range(x.shape[0]))) for j in range(cols)]
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for i in range(rows):
        scores = [(abs(float(w[i, j])) * norms[j], j) for j in range(cols)]
        if nm is None:
            for _, j in sorted(scores)[: round(sparsity * cols)]:
                keep[i, j] = False
        else:
            n, m = nm
            for g in range(0, cols, m):
                for _, j in sorted(scores[g : g + m])[: m - n]:
                    keep[i, j] = False
    return keep


def _naive_sequential(model: Chain, batches, prune_fn) -> dict[str, torch.Tensor]:
    """Prune block after block by hand: inputs of each linear computed from the pruned blocks
    before it (the dense block's up-projection feeds its down-projection)."""
    masks = {}
    hs = [model.inp(b) for b in batches]
    for k, block in enumerate(model.layers):
        x_up = torch.cat([h.reshape(-1, h.shape[-1]) for h in hs])
        x_down = torch.relu(block.up(x_up))
        for name, lin, x in (("up", block.up, x_up), ("down", block.down, x_down)):
            keep = prune_fn(lin.weight.detach(), x)
            masks[f"layers.{k}.{name}"] = keep
        for name, lin in (("up", block.up), ("down", block.down)):
            with torch.no_grad():
                lin.weight.mul_(masks[f"layers.{k}.{name}"].to(F64))
        hs = [block(h, scale=0.5) for h in hs]
    return masks


@pytest.mark.parametrize(
    ("sparsity", "nm"), [(0.3, None), (0.5, None), (0.75, None), (0.5, (2, 4))]
)
def test_wanda_one_pass_matches_loops(sparsity, nm) -> None:
    model, batches = _chain(1)
    ref = Chain().double()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        feats = {}
        hooks = [
            m.register_forward_hook(lambda mod, a, o, n=n: feats.setdefault(n, []).append(a[0]))
            for n, m in ref.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("layers.")
        ]
        for b in batches:
            ref(b)
        for h in hooks:
            h.remove()
    masks, _ = wanda(
        model, batches, _run, sparsity if nm is None else None, WandaConfig(3, sequential=False),
        pattern=nm, layers=_layers,
    )  # fmt: skip
    mods = dict(ref.named_modules())
    for name, keep in masks.items():
        x = torch.cat([a.reshape(-1, a.shape[-1]) for a in feats[name]])
        expect = _naive_wanda_layer(mods[name].weight.detach(), x, sparsity, nm)
        assert torch.equal(keep, expect), name
        w = dict(model.named_modules())[name].weight
        assert torch.equal(w, mods[name].weight * expect)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_wanda_sequential_matches_block_by_block_loops(nm) -> None:
    model, batches = _chain(2)
    ref = Chain().double()
    ref.load_state_dict(model.state_dict())
    info: dict[str, object] = {}
    masks, _ = wanda(
        model, batches, _run, 0.5, WandaConfig(3), pattern=nm, layers=_layers, info=info
    )
    assert info["schedule"] == "sequential-blocks"
    with torch.no_grad():
        expect = _naive_sequential(ref, batches, lambda w, x: _naive_wanda_layer(w, x, 0.5, nm))
    assert masks.keys() == expect.keys()
    for name in masks:
        assert torch.equal(masks[name], expect[name]), name
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_sequential_block_replay_equals_full_passes(monkeypatch) -> None:
    """Replaying captured block inputs gives the same masks and weights as re-running the whole
    model for every block (the fallback when blocks do not form a chain)."""
    results = []
    for chain in (True, False):
        model, batches = _chain(3)
        if not chain:
            monkeypatch.setattr(calibration, "_is_chain", lambda *a: False)
        info: dict[str, object] = {}
        masks, _ = sparsegpt(
            model, batches, _run, 0.6, layers=_layers, block=4, calib_batches=3,
            progress=False, info=info,
        )  # fmt: skip
        assert info["schedule"] == ("sequential-blocks" if chain else "sequential-full-passes")
        results.append((masks, [p.detach().clone() for p in model.parameters()]))
    for name in results[0][0]:
        assert torch.equal(results[0][0][name], results[1][0][name])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def test_sequential_on_hugging_face_decoder() -> None:
    """A tiny Llama (kv-cache kwargs, rotary embeddings passed as kwargs): block replay agrees
    with full passes and the pruned model's loss stays finite."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    ids = [
        torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)
    ]

    def fwd(m: nn.Module, b: torch.Tensor) -> object:
        return m(input_ids=b, labels=b).loss

    outs = []
    for chain in (True, False):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
        info: dict[str, object] = {}
        old = calibration._is_chain
        if not chain:
            calibration._is_chain = lambda *a: False  # type: ignore[assignment]
        try:
            masks, _ = wanda(
                model,
                ids,
                fwd,
                0.5,
                WandaConfig(3),
                layers=lambda n, _m: ".layers." in n,
                info=info,
            )
        finally:
            calibration._is_chain = old  # type: ignore[assignment]
        outs.append((info["schedule"], masks, float(fwd(model, ids[0]).detach())))
    assert outs[0][0] == "sequential-blocks"
    assert outs[1][0] == "sequential-full-passes"
    for name in outs[0][1]:
        assert torch.equal(outs[0][1][name], outs[1][1][name]), name
    assert math.isfinite(outs[0][2]) and abs(outs[0][2] - outs[1][2]) < 1e-5


# --------------------------------------------------------------------------- refusals
def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_nm_contradicting_sparsity_refused_model_unchanged() -> None:
    model, batches = _chain()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="contradicts the N:M pattern 2:4"):
        wanda(model, batches, _run, 0.8, pattern=(2, 4), layers=_layers)
    assert _same(model, snap)


def test_nm_width_not_divisible_names_layer_and_exclude() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    snap = _snapshot(model)
    batches = [torch.randn(4, 6, dtype=F64)]
    for fn in (wanda, sparsegpt):
        with pytest.raises(ValueError, match=r"\('0', 6\).*exclude"):
            fn(model, batches, _run, None, pattern=(2, 4))
        assert _same(model, snap)


def test_small_calibration_set_warns() -> None:
    model, batches = _chain()
    with pytest.warns(UserWarning, match="holds 3 batches, fewer than the 8 requested"):
        wanda(model, batches, _run, 0.5, WandaConfig(8), layers=_layers)


def test_wanda_config_validates() -> None:
    with pytest.raises(ValueError, match="calib_batches"):
        WandaConfig(0)
    with pytest.raises(TypeError, match="sequential"):
        WandaConfig(sequential="yes")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- SparseGPT faults
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


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 5),
    groups=st.integers(1, 4),
    sparsity=st.sampled_from([0.0, 0.25, 0.5, 0.9]),
    seed=st.integers(0, 2**16),
)
def test_row_keep_property(rows, groups, sparsity, seed) -> None:
    """Every row drops exactly round(s * cols) weights, each dropped score <= each kept one;
    N:M keeps exactly N per group."""
    from mfac.prune.methods.wanda import row_keep

    cols = 4 * groups
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (rows, cols), generator=gen).to(F64)
    keep = row_keep(scores, sparsity, None)
    for i in range(rows):
        assert int((~keep[i]).sum()) == round(sparsity * cols)
        if 0 < int(keep[i].sum()) < cols:
            assert float(scores[i][~keep[i]].max()) <= float(scores[i][keep[i]].min())
    nm = row_keep(scores, 0.5, (2, 4))
    assert bool((nm.reshape(rows, -1, 4).sum(2) == 2).all())


def test_no_warnings_with_enough_calibration() -> None:
    model, batches = _chain()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wanda(model, batches, _run, 0.5, WandaConfig(3), layers=_layers)


# --------------------------------------------------------------------------- OWL
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


# --------------------------------------------------------------------------- files
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


def test_save_pretrained_sparse_loads_without_mfac(tmp_path) -> None:
    """The folder loads with transformers alone (mfac made unimportable in the child), gives the
    pruned model's logits, and reports the sparsity counted from the saved weights."""
    import json
    import os
    import subprocess
    import sys

    transformers = pytest.importorskip("transformers")
    from mfac.prune.export import save_pretrained_sparse

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = [
        torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)
    ]
    masks, _ = wanda(
        model, ids, lambda m, b: m(input_ids=b), None, WandaConfig(2),
        pattern=(2, 4), layers=lambda n, _m: ".layers." in n,
    )  # fmt: skip
    folder = tmp_path / "out"
    rec = save_pretrained_sparse(model, masks, folder, {"method": "wanda", "pattern": "2:4"})
    assert rec["sparsity"] == pytest.approx(0.5)
    assert json.loads((folder / "mfac_recipe.json").read_text())["recipe"]["method"] == "wanda"
    assert "mfac" not in (folder / "config.json").read_text()
    with torch.no_grad():
        expect = model(input_ids=ids[0]).logits
    torch.save(ids[0], tmp_path / "ids.pt")
    code = (
        "import sys, torch; sys.modules['mfac'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad(): out = m(input_ids=ids).logits\n"
        f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.allclose(torch.load(tmp_path / "out.pt"), expect, atol=1e-5)
    with pytest.raises(FileExistsError, match="not empty"):
        save_pretrained_sparse(model, masks, folder)


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


def test_shared_input_statistics_equal_separate() -> None:
    """Layers reading one input tensor (q/k/v) get the Gram of that input, computed once."""

    class Fan(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 4), nn.Linear(6, 5), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.a(x)) + self.b(x).sum(-1, keepdim=True)

    torch.manual_seed(0)
    model = Fan().double()
    xs = [torch.randn(7, 6, dtype=F64) for _ in range(3)]
    from mfac.prune._layers import find_targets

    targets = find_targets(model)
    stats = calibration.InputStats(targets, "gram")
    with torch.no_grad():
        for x in xs:
            model(x)
    stats.remove()
    x_all = torch.cat(xs)
    for name in ("a", "b"):
        gram, count = stats.get(name)
        assert count == 21
        assert torch.allclose(gram, x_all.T @ x_all, atol=1e-12)
    assert stats.get("a")[0] is not stats.get("b")[0]
    hidden = model.a(x_all).detach()
    assert torch.allclose(stats.get("c")[0], hidden.T @ hidden, atol=1e-12)


def test_owl_sparsegpt_preset_is_owl_then_sequential_sparsegpt() -> None:
    from mfac.prune import oneshot
    from mfac.prune.budgets.owl import OWLConfig, owl_sparsities
    from mfac.prune.methods.presets import OWLSparseGPTConfig

    opts = {"calib_batches": 3, "block": 4, "owl_threshold": 2.0, "owl_spread": 0.1}
    for nm in (None, (2, 4)):
        model, batches = _chain(6)
        ref, _ = _chain(6)
        res = oneshot(
            model, 0.5, "owl-sparsegpt", data=batches, loss_fn=_run, pattern=nm,
            layers=_layers, progress=False, **opts,
        )  # fmt: skip
        budget: object = 0.5
        if nm is None:
            budget = owl_sparsities(ref, batches, _run, 0.5, OWLConfig(2.0, 0.1, 3), layers=_layers)
            assert res.info["owl_group_sparsity"]
            assert "owl" in res.timings
        else:
            assert "skipped" in str(res.info["owl"])
        expect, _ = sparsegpt(
            ref, batches, _run, budget, layers=_layers, pattern=nm, block=4, calib_batches=3,
            damp=0.1, progress=False,
        )  # fmt: skip
        assert all(torch.equal(res.masks[n], expect[n]) for n in res.masks)
        assert all(
            torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters(), strict=True)
        )
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="contradicts"):
        oneshot(
            model, 0.8, "owl-sparsegpt", data=batches, loss_fn=_run, pattern=(2, 4),
            layers=_layers, **opts,
        )  # fmt: skip
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    with pytest.raises(ValueError, match="damp"):
        OWLSparseGPTConfig(damp=0.0)


def test_nested_restore_takes_one_snapshot_and_restores() -> None:
    """oneshot guards the weights once; the layer-wise pruner inside it takes no second copy,
    and an error still leaves the weights as they were before the outer call."""
    from mfac.prune.restore import restored_on_error

    w = torch.ones(3)
    with pytest.raises(RuntimeError, match="inner"):
        with restored_on_error([w]):
            w.fill_(2.0)
            try:
                with restored_on_error([w]):
                    w.fill_(3.0)
                    raise RuntimeError("inner")
            except RuntimeError:
                assert torch.equal(w, torch.full((3,), 3.0))  # inner wrote nothing back
                raise
    assert torch.equal(w, torch.ones(3))
    with restored_on_error([w]):  # no error: nothing is written back
        w.fill_(5.0)
    assert torch.equal(w, torch.full((3,), 5.0))


def _loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).square().mean()


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


def test_fisher_budget_refuses_a_loss_that_is_not_a_scalar() -> None:
    from mfac.prune import oneshot

    model, batches = _chain(4)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="scalar loss"):
        oneshot(model, 0.5, "sparsegpt", data=batches, loss_fn=_run, layers=_layers,
                budget="fisher", calib_batches=3, progress=False)  # fmt: skip
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_fisher_sparsegpt_preset_is_fisher_budgets_then_sequential_sparsegpt() -> None:
    from mfac.prune import oneshot

    model, batches = _chain(5)
    ref, _ = _chain(5)
    res = oneshot(model, 0.6, "fisher-sparsegpt", data=batches, loss_fn=_loss, layers=_layers,
                  calib_batches=3, block=4, progress=False)  # fmt: skip
    expect = oneshot(ref, 0.6, "sparsegpt", data=batches, loss_fn=_loss, layers=_layers,
                     calib_batches=3, block=4, budget="fisher", damp=0.1, sequential=True,
                     progress=False)  # fmt: skip
    assert res.method == "fisher-sparsegpt" and res.info["fisher_group_sparsity"]
    assert all(torch.equal(res.masks[n], expect.masks[n]) for n in expect.masks)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters(), strict=True))
