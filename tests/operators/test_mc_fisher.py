"""``InverseFisher.from_model(..., fisher="mc")``: gradients at labels drawn from the model's
predictive distribution (the Monte Carlo true Fisher), against the empirical Fisher at the same
drawn labels, against the exact true Fisher of a tiny classifier, and the refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mfac import InverseFisher
from mfac.operators.gradients import sample_labels

from oracle import F64, dense_inverse_fisher, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")
ce = nn.functional.cross_entropy


def xent(model, batch):
    inputs, targets = batch
    return ce(model(inputs), targets)


def tiny(seed=0, n=30):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return model, x, y


def loop_grads(model, x, y):
    rows = []
    for i in range(x.shape[0]):
        gs = torch.autograd.grad(ce(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def test_mc_is_the_empirical_fisher_at_the_drawn_labels():
    model, x, y = tiny()
    op = InverseFisher.from_model(
        model, (x, y), xent, 30, damp=0.1, dtype=F64, chunk_size=7, fisher="mc",
        generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(5)  # the same draws, chunk by chunk
    drawn = torch.cat(
        [sample_labels(model, (x[s : s + 7], y[s : s + 7]), gen)[1] for s in range(0, 30, 7)]
    )
    assert not torch.equal(drawn, y)
    exact = dense_inverse_fisher(loop_grads(model, x, drawn), 0.1)
    probe = torch.randn(op.dim, 3, dtype=F64)
    assert rel_err(op @ probe, exact @ probe) < 1e-12
    empirical = InverseFisher.from_model(model, (x, drawn), xent, 30, damp=0.1, dtype=F64)
    assert rel_err(empirical @ probe, op @ probe) < 1e-12


def test_mc_converges_to_the_true_fisher():
    """One input repeated: the mean of g g^T over drawn labels tends to sum_c p_c g_c g_c^T."""
    model, x, _ = tiny(n=1)
    n = 6000
    xs = x.expand(n, 4).contiguous()
    ys = torch.zeros(n, dtype=torch.long)
    op = InverseFisher.from_model(
        model, (xs, ys), xent, n, damp=1.0, dtype=F64, chunk_size=1000, fisher="mc",
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    with torch.no_grad():
        probs = torch.softmax(model(x), -1)[0]
    per_class = loop_grads(model, x.expand(3, 4), torch.arange(3))
    true_fisher = torch.eye(op.dim, dtype=F64) + (per_class.T * probs) @ per_class
    vals, _ = op.eigenpairs(3)
    exact = torch.linalg.eigvalsh(true_fisher).flip(0)[:3]
    # The rank-2 part is a 3-point multinomial average over 6000 draws: about 3 % per entry.
    assert rel_err(vals - 1.0, exact - 1.0) < 0.08
    assert op.trace() == pytest.approx(float(true_fisher.trace()), rel=0.05)


def test_hugging_face_dicts_and_a_custom_sampler():
    model, x, y = tiny()

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, features):
            return type("Out", (), {"logits": self.inner(features)})()

    def hf_loss(m, batch):
        return ce(m(features=batch["features"]).logits, batch["labels"])

    gen = torch.Generator().manual_seed(1)
    op = InverseFisher.from_model(
        Wrapped(), {"features": x, "labels": y}, hf_loss, 30, damp=0.1, dtype=F64,
        fisher="mc", generator=gen,
    )  # fmt: skip
    ref = InverseFisher.from_model(
        model, (x, y), xent, 30, damp=0.1, dtype=F64, fisher="mc",
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    probe = torch.randn(op.dim, dtype=F64)
    assert rel_err(op @ probe, ref @ probe) < 1e-12

    def always_zero(m, batch, generator):
        return (batch[0], torch.zeros_like(batch[1]))

    op0 = InverseFisher.from_model(
        model, (x, y), xent, 30, damp=0.1, dtype=F64, fisher="mc", sample_fn=always_zero
    )
    emp0 = InverseFisher.from_model(model, (x, torch.zeros_like(y)), xent, 30, damp=0.1, dtype=F64)
    assert rel_err(op0 @ probe, emp0 @ probe) < 1e-12


def test_mc_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double().train()
    x = torch.randn(20, 4, dtype=F64)
    y = torch.randint(0, 3, (20,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    InverseFisher.from_model(model, (x, y), xent, 4, per_sample=False, chunk_size=5, fisher="mc")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_mc_refusals():
    model, x, y = tiny()
    with pytest.raises(ValueError, match="fisher must be 'empirical' or 'mc'"):
        InverseFisher.from_model(model, (x, y), xent, 10, fisher="true")
    with pytest.raises(ValueError, match="fisher='mc' only"):
        InverseFisher.from_model(model, (x, y), xent, 10, sample_fn=sample_labels)
    with pytest.raises(ValueError, match="integer class targets"):
        InverseFisher.from_model(model, (x, y.double()), xent, 10, fisher="mc")
    regressor = nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)).double()  # (n,) outputs
    with pytest.raises(ValueError, match=r"logits of shape \(n, C\)"):
        InverseFisher.from_model(regressor, (x, y), xent, 10, fisher="mc")
    with pytest.raises(TypeError, match="dicts with 'labels'"):
        InverseFisher.from_model(model, {"x": x}, xent, 10, fisher="mc")

    def drop_one(m, batch, generator):
        return (batch[0][1:], batch[1][1:])

    with pytest.raises(ValueError, match="sample_fn returned a batch of"):
        InverseFisher.from_model(model, (x, y), xent, 10, fisher="mc", sample_fn=drop_one)

    def per_example_losses(m, batch):
        return ce(m(batch[0]), batch[1], reduction="none")

    with pytest.raises(ValueError, match="scalar tensor"):
        InverseFisher.from_model(
            model, (x, y), per_example_losses, 10, per_sample=False, fisher="mc"
        )
    with pytest.raises(ValueError, match="fewer than num_grads"):
        InverseFisher.from_model(model, (x, y), xent, 31, fisher="mc")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
