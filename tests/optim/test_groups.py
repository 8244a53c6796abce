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


def _names(model: nn.Module, groups: list[dict]) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [sorted(names[id(p)] for p in g["params"]) for g in groups]


def test_the_head_is_found_wherever_the_embedding_is_registered():
    """Without get_output_embeddings the head is the last registered 2-D weight that is not an
    embedding's: an nn.Embedding registered after the head is not taken for it."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(8, 8)
            self.head = nn.Linear(8, 5)
            self.table = nn.Embedding(5, 8)  # registered last, used first

    net = Net()
    assert _names(net, hidden_groups(net)) == [
        ["body.weight"], ["body.bias", "head.bias", "head.weight", "table.weight"]
    ]


def test_attention_input_projections_are_hidden():
    """nn.MultiheadAttention's in_proj_weight (a raw 2-D parameter, not a ``weight``) is hidden
    with its out_proj.weight, as torch.optim.Muon's ``p.ndim == 2`` selection would; with
    kdim/vdim the separate q, k and v projections are."""
    net = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), nn.Linear(8, 3))
    hidden, rest = _names(net, hidden_groups(net))
    assert hidden == sorted(
        f"0.{n}" for n in ("self_attn.in_proj_weight", "self_attn.out_proj.weight",
                           "linear1.weight", "linear2.weight")
    )  # fmt: skip
    assert "1.weight" in rest and "0.self_attn.in_proj_bias" in rest
    cross = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, kdim=4, vdim=6),
                           "head": nn.Linear(8, 2)})  # fmt: skip
    hidden, _ = _names(cross, hidden_groups(cross))
    projections = ("k_proj_weight", "out_proj.weight", "q_proj_weight", "v_proj_weight")
    assert hidden == [f"attn.{x}" for x in projections]


def test_tied_and_frozen_parameters():
    """A head tied to the embedding is the embedding (in the rest, once); frozen parameters are
    in neither group; a model whose only Linear is its head has nothing hidden."""

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(11, 8)
            self.mid = nn.Linear(8, 8)
            self.out = nn.Linear(8, 11, bias=False)
            self.out.weight = self.emb.weight

    lm = LM()
    assert _names(lm, hidden_groups(lm)) == [["mid.weight"], ["emb.weight", "mid.bias"]]
    lm.emb.weight.requires_grad_(False)
    assert _names(lm, hidden_groups(lm)) == [["mid.weight"], ["mid.bias"]]
    head_only = nn.Sequential(nn.Embedding(5, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    groups = hidden_groups(head_only)
    assert len(groups) == 1 and "orthogonalize" not in groups[0]


def test_an_embedding_bag_is_a_table_not_a_hidden_matrix():
    """nn.EmbeddingBag (not an nn.Embedding subclass) is an input table like nn.Embedding."""
    net = nn.ModuleDict({"bag": nn.EmbeddingBag(10, 8), "mid": nn.Linear(8, 8),
                         "head": nn.Linear(8, 2)})  # fmt: skip
    assert _names(net, hidden_groups(net))[0] == ["mid.weight"]
