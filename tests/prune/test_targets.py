"""Targets: a Hugging Face model's blocks by default (its LM head, tied or not, only when
named), names and glob patterns checked against the model, tied weights named as such."""

from __future__ import annotations

import pytest
import torch

from mfac.prune import oneshot
from mfac.prune._layers import block_lists, find_targets

from prune_models import _chain

transformers = pytest.importorskip("transformers")


def _llama(tied: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("tied", [True, False])
def test_hugging_face_default_is_the_blocks(tied: bool) -> None:
    model = _llama(tied)
    assert block_lists(model) == ["model.layers"]
    names = [t.name for t in find_targets(model)]
    assert len(names) == 14 and all(n.startswith("model.layers.") for n in names)
    head = find_targets(model, ["lm_head"])
    assert [t.name for t in head] == ["lm_head"]
    assert head[0].tied == (("model.embed_tokens.weight",) if tied else ())
    assert len(find_targets(model, ["*"])) == 15


def test_plain_modules_keep_every_layer() -> None:
    model, _ = _chain()
    assert find_targets(model)[0].name == "inp"


def test_globs_containers_and_exclude() -> None:
    model = _llama(True)
    mlp = [t.name for t in find_targets(model, ["model.layers.*.mlp.*"])]
    assert len(mlp) == 6 and all(".mlp." in n for n in mlp)
    block = [t.name for t in find_targets(model, ["model.layers.1"])]
    assert len(block) == 7 and all(n.startswith("model.layers.1.") for n in block)
    kept = [t.name for t in find_targets(model, exclude=["*.k_proj", "model.layers.0"])]
    assert len(kept) == 6 and not any("k_proj" in n for n in kept)
    assert find_targets(model, exclude=["lm_head"])  # a real layer, already left out: fine


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"exclude": ["lm_haed"]}, ["exclude: 'lm_haed'", "did you mean 'lm_head'"]),
        ({"layers": ["model.layers.*.mlp.gate"]}, ["layers:", "matches no prunable layer"]),
        ({"layers": ["model.embed_tokens"]}, ["Embedding", "tied to lm_head"]),
    ],
)
def test_unknown_names_are_one_clear_error(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        find_targets(_llama(True), **kwargs)
    for w in words:
        assert w in str(err.value)


def test_pruning_a_tied_head_warns_and_reports_it() -> None:
    model = _llama(True)
    with pytest.warns(UserWarning, match="lm_head.weight is tied to model.embed_tokens.weight"):
        res = oneshot(model, 0.5, "magnitude", layers=["lm_head"])
    assert res.info["tied"] == {"lm_head": ["model.embed_tokens.weight"]}
    assert float((model.model.embed_tokens.weight == 0).float().mean()) == pytest.approx(0.5)
