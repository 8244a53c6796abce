"""`hidden_groups`: which of a model's parameters take the orthogonalized step."""

from __future__ import annotations

import pytest
from torch import nn

from mfac.optim import hidden_groups


def test_hidden_groups_of_a_plain_network():
    """Every Linear's weight but the last one (the head) is hidden; biases are not."""
    net = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 2))
    hidden, rest = hidden_groups(net)
    assert hidden["orthogonalize"] is True and "orthogonalize" not in rest
    assert hidden["params"] == [net[0].weight, net[2].weight]
    assert rest["params"] == [net[0].bias, net[2].bias, net[4].weight, net[4].bias]
    net[0].weight.requires_grad_(False)
    assert hidden_groups(net)[0]["params"] == [net[2].weight]  # frozen: in neither group
    with pytest.raises(ValueError, match=r"exclude pattern '0.wieght' matches no parameter"):
        hidden_groups(net, exclude=["0.wieght"])
    assert len(hidden_groups(net, exclude="2.*")) == 1  # nothing hidden left: one group


def test_hidden_groups_of_hugging_face_models():
    """The blocks' matrices are hidden; embeddings (tied heads included), position tables, the
    classifier head, biases and norms are not; ``exclude`` takes globs."""
    transformers = pytest.importorskip("transformers")
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=40, n_positions=8, n_embd=8, n_layer=2, n_head=2, bos_token_id=0,
        eos_token_id=0,
    ))  # fmt: skip
    names = {id(p): n for n, p in gpt.named_parameters()}
    groups = hidden_groups(gpt)
    hidden = sorted(names[id(p)] for p in groups[0]["params"])
    assert groups[0]["orthogonalize"] and "orthogonalize" not in groups[1]
    assert hidden == sorted(
        f"transformer.h.{i}.{m}.weight"
        for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )  # fmt: skip
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(gpt.parameters()))

    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=16, num_labels=3,
    ))  # fmt: skip
    names = {id(p): n for n, p in bert.named_parameters()}
    groups = hidden_groups(bert, exclude=["bert.pooler.*"])
    hidden = {names[id(p)] for p in groups[0]["params"]}
    assert "classifier.weight" not in hidden and "bert.pooler.dense.weight" not in hidden
    assert not any("embeddings" in n for n in hidden)
    assert "bert.encoder.layer.0.attention.self.query.weight" in hidden
    assert len(hidden) == 6  # q, k, v, attention output, intermediate, output
