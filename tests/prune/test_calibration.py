"""Calibration capture: the stage-by-stage replay equals full passes (also on a Hugging Face
decoder), shared input statistics, warnings about small calibration sets."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from mfac.prune import calibration
from mfac.prune.methods.sparsegpt import sparsegpt
from mfac.prune.methods.wanda import WandaConfig, wanda

from prune_models import _chain, _layers, _run

F64 = torch.float64


def _forced(*_a: object) -> calibration.Plan:
    return calibration.Plan([], [], [], reason="forced by the test")


def _replay_equals_full_passes(
    monkeypatch: pytest.MonkeyPatch,
    prune: Callable[[dict[str, object]], tuple[nn.Module, dict[str, torch.Tensor]]],
    atol: float,
) -> dict[str, torch.Tensor]:
    """``prune(info)`` builds a fresh model, prunes it and returns (model, masks); run once with
    the planned schedule (sequential-blocks, no warning) and once with full passes forced. The
    masks must be equal and the weights within ``atol``; returns the planned run's masks."""
    results = []
    for forced in (False, True):
        if forced:
            monkeypatch.setattr(calibration, "plan", _forced)
        info: dict[str, object] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if forced else "error")
            model, masks = prune(info)
        assert info["schedule"] == ("sequential-full-passes" if forced else "sequential-blocks")
        results.append((masks, [p.detach().clone() for p in model.parameters()]))
    (masks, weights), (full_masks, full_weights) = results
    assert masks.keys() == full_masks.keys()
    for name in masks:
        assert torch.equal(masks[name], full_masks[name]), name
    for a, b in zip(weights, full_weights, strict=True):
        assert torch.allclose(a, b, atol=atol)
    return masks


def test_sequential_block_replay_equals_full_passes(monkeypatch) -> None:
    """Replaying captured block inputs gives the same masks and weights as re-running the whole
    model for every block (the fallback when blocks do not form a chain)."""

    def prune(info: dict[str, object]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        model, batches = _chain(3)
        masks, _ = sparsegpt(
            model, batches, _run, 0.6, layers=_layers, block=4, calib_batches=3,
            progress=False, info=info,
        )  # fmt: skip
        return model, masks

    _replay_equals_full_passes(monkeypatch, prune, atol=1e-12)


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
        old = calibration.plan
        if not chain:
            calibration.plan = _forced  # type: ignore[assignment]
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
            calibration.plan = old  # type: ignore[assignment]
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


@pytest.mark.parametrize("layers", [None, ["layers.*"]])
def test_layers_before_the_stack_keep_block_replay(monkeypatch, layers) -> None:
    """An input projection before the blocks (``inp``) is pruned first from forwards stopped at
    the first block; the blocks are still replayed, and the result equals full passes."""

    def prune(info: dict[str, object]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        model, batches = _chain(1)
        masks, _ = sparsegpt(
            model, batches, _run, 0.6, layers=layers, block=4, calib_batches=3,
            progress=False, info=info,
        )  # fmt: skip
        return model, masks

    masks = _replay_equals_full_passes(monkeypatch, prune, atol=1e-12)
    assert ("inp" in masks) == (layers is None)


def _encoder_or_decoder(kind: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=64,
        )  # fmt: skip
        return transformers.BertForMaskedLM(cfg).double()
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).double()


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_stack_and_head_replay_equals_full_passes(monkeypatch, kind: str) -> None:
    """A BERT encoder (blocks called with positional masks) and a decoder with its LM head
    asked for: the blocks are replayed from one capture, the head pruned after them from one
    forward; masks and weights equal the full-pass schedule's."""
    ids = [torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(i))
           for i in range(3)]  # fmt: skip

    def fwd(m: nn.Module, b: torch.Tensor) -> object:
        return m(input_ids=b)

    head = "cls.predictions.transform.dense" if kind == "bert" else "lm_head"
    layers = [head, "*.layers.*" if kind == "llama" else "*.layer.*"]

    def prune(info: dict[str, object]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        model = _encoder_or_decoder(kind).eval()
        masks, _ = sparsegpt(
            model, ids, fwd, 0.5, layers=layers, calib_batches=3, progress=False, info=info
        )
        assert head in masks and list(masks)[-1] == head
        return model, masks

    _replay_equals_full_passes(monkeypatch, prune, atol=1e-10)


def _assert_falls_back(build: type[nn.Module], reason: str) -> None:
    """Sequential SparseGPT on ``build()`` (float64, 3 batches of (8, 4)) takes full passes,
    and both the warning and ``info["schedule_reason"]`` name ``reason``."""
    torch.manual_seed(0)
    model = build().double()
    batches = [torch.randn(8, 4, dtype=F64) for _ in range(3)]
    info: dict[str, object] = {}
    with pytest.warns(UserWarning, match="re-runs the whole model") as caught:
        sparsegpt(model, batches, _run, 0.5, calib_batches=3, progress=False, info=info)
    assert info["schedule"] == "sequential-full-passes"
    assert reason in str(info["schedule_reason"])
    assert any(reason in str(w.message) for w in caught)


def test_fallback_warns_and_says_why() -> None:
    """Blocks that do not chain (a block run twice) fall back to full passes, with a warning
    and the reason in ``info``."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(2)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in [self.layers[0], self.layers[1], self.layers[1]]:
                x = block(x)
            return x

    _assert_falls_back(Twice, "layers.1 runs 2 times")


def test_an_argument_not_carried_by_the_previous_output_falls_back() -> None:
    """A block argument that changes from block to block without coming from the previous
    block's output (here a per-block scale) cannot be replayed: full passes, and the reason
    names the argument."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, object]:
            return self.lin(x) * scale, x

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Scaled() for _ in range(3)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for i, block in enumerate(self.layers):
                x = block(x, scale=torch.tensor(1.0 + i, dtype=x.dtype))[0]
            return x

    _assert_falls_back(Stack, "layers.1 gets another keyword argument 'scale' than layers.0")


@pytest.mark.parametrize("layers", [["encoder.*"], None, ["*.block.*", "lm_head"]])
def test_t5_replays_its_stacks_and_equals_full_passes(monkeypatch, layers) -> None:
    """T5 (float64): its later blocks take the position biases the first block computes (the
    replay threads them from each block's output), and its decoder stack, calibrated after
    the encoder's (``layers=None``: both stacks), reads the pruned encoder's output; the LM
    head, asked for, comes after both. The stacks are replayed (``sequential-blocks``, no
    warning), with the masks and weights of full passes."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    ids = [torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(i))
           for i in range(3)]  # fmt: skip

    def prune(info: dict[str, object]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = transformers.T5ForConditionalGeneration(cfg).double().eval()
        masks, _ = sparsegpt(
            model, ids, lambda m, b: m(input_ids=b, labels=b), 0.5, calib_batches=3,
            progress=False, info=info, layers=layers,
        )  # fmt: skip
        return model, masks

    masks = _replay_equals_full_passes(monkeypatch, prune, atol=1e-10)
    assert any(n.startswith("decoder.") for n in masks) == (layers != ["encoder.*"])


class _BiasBlock(nn.Module):
    """A block that takes a ``bias`` the first block computes and passes on in its output (as
    T5 passes its position bias); ``as_list``: the output is a list, not a tuple; with
    ``use_cache`` the output carries a cache entry before the bias (as T5 blocks did in
    transformers 4.40, where the layout depends on ``use_cache``)."""

    def __init__(self, as_list: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.as_list = as_list

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, use_cache: bool = False
    ) -> object:
        if bias is None:
            bias = x.mean(0, keepdim=True)
        h = torch.tanh(self.lin(x) + bias)
        if self.as_list:
            return [h, bias]
        return (h, "cache entry", bias) if use_cache else (h, bias)


class _BiasStack(nn.Module):
    """Three ``_BiasBlock``s threading the bias; ``use_cache`` as a decoder's forward takes it,
    the stack reading the bias where the block's layout puts it."""

    def __init__(self, as_list: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_BiasBlock(as_list) for _ in range(3)])

    def forward(self, x: torch.Tensor, use_cache: bool = True) -> torch.Tensor:
        bias = None
        for block in self.layers:
            out = block(x, bias=bias, use_cache=use_cache)
            x, bias = out[0], out[-1]
        return x


@pytest.mark.parametrize("as_list", [True, False])
def test_threaded_argument_replays_from_list_and_use_cache_outputs(monkeypatch, as_list) -> None:
    """The bias the blocks pass on is threaded through the replay when the block returns a
    list, and when the block's output layout depends on ``use_cache`` (the replay must call
    the blocks as the traced forward did, or the threaded index points elsewhere): masks and
    weights equal full passes'."""

    def prune(info: dict[str, object]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = _BiasStack(as_list).double()
        batches = [torch.randn(8, 4, dtype=F64) for _ in range(3)]
        masks, _ = sparsegpt(
            model, batches, _run, 0.5, calib_batches=3, progress=False, info=info
        )
        return model, masks

    masks = _replay_equals_full_passes(monkeypatch, prune, atol=1e-12)
    assert set(masks) == {f"layers.{i}.lin" for i in range(3)}


class _EncoderDecoder(nn.Module):
    """Two stacks of ``_BiasBlock``-like blocks threading ``bias`` under one name from different
    output positions: the encoder's blocks return (hidden, bias), the decoder's (hidden, cache
    entry, bias); the decoder reads the encoder's output."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleList([_BiasBlock(as_list=False) for _ in range(3)])
        self.decoder = nn.ModuleList([_BiasBlock(as_list=False) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, bias = x, None
        for block in self.encoder:
            h, bias = block(h, bias=bias)
        y, bias = x + h, None
        for block in self.decoder:
            y, _, bias = block(y, bias=bias, use_cache=True)
        return y


def test_stacks_thread_an_argument_from_their_own_output_positions(monkeypatch) -> None:
    """Each stack threads its arguments from where its own blocks put them (the encoder's bias
    at output 1, the decoder's at output 2): both stacks are replayed, with the masks and
    weights of full passes."""

    def prune(info: dict[str, object]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = _EncoderDecoder().double()
        batches = [torch.randn(8, 4, dtype=F64) for _ in range(3)]
        masks, _ = sparsegpt(
            model, batches, _run, 0.5, calib_batches=3, progress=False, info=info
        )
        return model, masks

    masks = _replay_equals_full_passes(monkeypatch, prune, atol=1e-12)
    assert len(masks) == 6
