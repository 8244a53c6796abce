"""Hugging Face models through from_model, influence and Laplace, built offline from tiny
configs: a causal language model with tied input/output embeddings (dict batches, the tied
``lm_head.weight``) and a BertForSequenceClassification (a ModelOutput with ``.logits``), against
float64 autograd loops and dense algebra."""

from __future__ import annotations

import math

import pytest
import torch

import mfac
from mfac import InverseFisher
from mfac.curvature import Laplace, example_gradients, last_layer

transformers = pytest.importorskip("transformers")

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def lm_loss(model, batch):
    return model(**batch).loss


def tiny_lm():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=24, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
        tie_word_embeddings=True, attn_implementation="eager",
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 24, (9, 5), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "labels": ids}


def tiny_bert():
    torch.manual_seed(1)
    cfg = transformers.BertConfig(
        vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=12, max_position_embeddings=16, num_labels=3,
        attn_implementation="eager",
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 20, (16, 6), generator=gen)
    y = torch.randint(0, 3, (16,), generator=gen)
    return model, x, y


def bert_loss(model, batch):
    inputs, labels = batch
    return torch.nn.functional.cross_entropy(model(inputs).logits, labels)


def flat_grad(value, params):
    grads = torch.autograd.grad(value, params, retain_graph=True)
    return torch.cat([t.reshape(-1) for t in grads])


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, before):
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


def loop_grads(model, loss_fn, batches, param):
    return torch.stack(
        [torch.autograd.grad(loss_fn(model, b), param)[0].reshape(-1) for b in batches]
    )


def test_causal_lm_tied_head_from_model_and_influence():
    model, batch = tiny_lm()
    head = model.lm_head.weight
    assert head is model.model.embed_tokens.weight  # tied
    assert last_layer(model) == ["lm_head.weight"]
    before = snapshot(model)
    op = InverseFisher.from_model(
        model, batch, lm_loss, 6, params=["lm_head.weight"], damp=0.1, dtype=F64, chunk_size=4
    )
    assert op.layout.names == ("model.embed_tokens.weight",)  # the tie resolved, by either name
    ids = batch["input_ids"]
    singles = [{"input_ids": ids[i : i + 1], "labels": ids[i : i + 1]} for i in range(9)]
    g = loop_grads(model, lm_loss, singles, head)
    torch.testing.assert_close(
        example_gradients(model, lm_loss, batch, ["lm_head.weight"], batch_size=4),
        g, rtol=1e-10, atol=1e-12,
    )  # fmt: skip
    train = {k: v[:6] for k, v in batch.items()}
    test = {k: v[6:] for k, v in batch.items()}
    scores = mfac.influence(op, model, lm_loss, train, test, batch_size=4)
    d = g.shape[1]
    fisher = 0.1 * torch.eye(d, dtype=F64) + g[:6].T @ g[:6] / 6
    exact = -g[6:] @ torch.linalg.solve(fisher, g[:6].T)
    assert float((scores - exact).norm() / exact.norm()) < 1e-9
    with pytest.raises(ValueError, match=r"tied to model\.embed_tokens\.weight"):
        InverseFisher.from_model(
            model, batch, lm_loss, 2, params=["model.embed_tokens.weight", "lm_head.weight"]
        )
    assert same_state(model, before) and model.lm_head.weight is head


def test_causal_lm_laplace_on_the_tied_head():
    model, batch = tiny_lm()
    before = snapshot(model)
    la = Laplace(model, lm_loss, prior_precision=3.0).fit(batch)
    assert la.names == ["model.embed_tokens.weight"] and la.num_data == 9
    ids = batch["input_ids"]
    singles = [{"input_ids": ids[i : i + 1], "labels": ids[i : i + 1]} for i in range(9)]
    g = loop_grads(model, lm_loss, singles, model.lm_head.weight)
    d = g.shape[1]
    precision = 3.0 * torch.eye(d, dtype=F64) + g.T @ g
    theta = la.map_vector
    expect = (
        -1.5 + 0.5 * d * math.log(3.0 / (2 * math.pi)) - 1.5 * float(theta @ theta)
        + 0.5 * d * math.log(2 * math.pi) - 0.5 * float(torch.linalg.slogdet(precision)[1])
    )  # fmt: skip
    assert la.log_marginal_likelihood(1.5) == pytest.approx(expect, rel=1e-9)
    assert la.sample(2).shape == (2, d)
    with pytest.raises(ValueError, match=r"logits of shape \(n, C\), got \(2, 5, 24\)"):
        la.predict(ids[:2])
    assert same_state(model, before)


def test_bert_sequence_classifier_laplace_predictive_and_prior_search():
    model, x, y = tiny_bert()
    before = snapshot(model)
    la = Laplace(model, bert_loss, prior_precision=2.0).fit((x, y))
    assert la.names == ["classifier.weight", "classifier.bias"]
    # GLM predictive against dense algebra: logits N(f, J P^-1 J^T), probit
    params = dict(model.named_parameters())
    chosen = [params[n] for n in la.names]
    g = torch.stack(
        [flat_grad(bert_loss(model, (x[i : i + 1], y[i : i + 1])), chosen) for i in range(16)]
    )
    d = g.shape[1]
    cov = torch.linalg.inv(2.0 * torch.eye(d, dtype=F64) + g.T @ g)
    probs = la.predict(x[:4])
    for i in range(4):
        out = model(x[i : i + 1]).logits.squeeze(0)
        jac = torch.stack([flat_grad(out[c], chosen) for c in range(3)])
        var = (jac @ cov @ jac.T).diagonal()
        expect = torch.softmax(out.detach() / torch.sqrt(1 + math.pi / 8 * var), -1)
        torch.testing.assert_close(probs[i], expect, rtol=1e-9, atol=1e-12)
    # the prior search on a ModelOutput (the failure), and dict inputs
    grid = [0.1, 1.0, 10.0]
    chosen_tau = la.optimize_prior_precision((x[8:], y[8:]), grid)
    assert chosen_tau in grid and la.prior_precision == chosen_tau
    inputs = {"input_ids": x[:3], "attention_mask": torch.ones(3, 6, dtype=torch.long)}
    torch.testing.assert_close(la.predict(inputs), la.predict(x[:3]))
    mc = la.predict(inputs, "mc", n_samples=5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mc.sum(1), torch.ones(3, dtype=F64))
    # from_model and influence with the same loss_fn
    op = InverseFisher.from_model(model, (x, y), bert_loss, 8, params=la.names, dtype=F64)
    assert mfac.influence(op, model, bert_loss, (x[:5], y[:5]), (x[5:7], y[5:7])).shape == (2, 5)
    assert same_state(model, before)
