"""Calibration capture: the stage-by-stage replay equals full passes (also on a Hugging Face
decoder), shared input statistics, warnings about small calibration sets."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from mfac.prune import calibration
from mfac.prune.methods.sparsegpt import sparsegpt
from mfac.prune.methods.wanda import WandaConfig, wanda

from prune_models import _chain, _layers, _run

F64 = torch.float64


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


def test_small_calibration_set_warns() -> None:
    model, batches = _chain()
    with pytest.warns(UserWarning, match="holds 3 batches, fewer than the 8 requested"):
        wanda(model, batches, _run, 0.5, WandaConfig(8), layers=_layers)


def test_no_warnings_with_enough_calibration() -> None:
    model, batches = _chain()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wanda(model, batches, _run, 0.5, WandaConfig(3), layers=_layers)


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
