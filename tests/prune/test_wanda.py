"""Wanda against direct float64 loops (one pass and stage by stage), its row selection and its
config."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mfac.prune.methods.wanda import WandaConfig, wanda

from prune_models import Chain, _chain, _layers, _run

F64 = torch.float64


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


def test_wanda_config_validates() -> None:
    with pytest.raises(ValueError, match="calib_batches"):
        WandaConfig(0)
    with pytest.raises(TypeError, match="sequential"):
        WandaConfig(sequential="yes")  # type: ignore[arg-type]


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
