"""Influence scores and the Laplace posterior against dense float64 computations on a small
model: the influence matrix, the predictive variances, the samples' covariance and the evidence."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import mfac
from mfac import InverseFisher
from mfac.curvature import Laplace, example_gradients, last_layer

F64 = torch.float64
ce = nn.functional.cross_entropy


def xent(model, batch):
    """The library's loss convention: loss_fn(model, batch), the batch's mean loss."""
    inputs, targets = batch
    return ce(model(inputs), targets)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 4, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (40,), generator=gen)
    return model, x, y


def loop_grads(model, x, y, names):
    params = dict(model.named_parameters())
    rows = []
    for i in range(x.shape[0]):
        gs = torch.autograd.grad(ce(model(x[i : i + 1]), y[i : i + 1]), [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


@pytest.mark.parametrize(("m", "block"), [(30, None), (12, None), (30, 7)])
def test_influence_matches_dense(m, block):
    model, x, y = tiny()
    train, test = (x[:30], y[:30]), (x[30:], y[30:])
    op = InverseFisher.from_model(model, train, xent, m, damp=0.05, block_size=block, dtype=F64)
    scores = mfac.influence(op, model, xent, train, test, batch_size=7)
    names = [n for n, _ in model.named_parameters()]
    g_fit = loop_grads(model, x[:m], y[:m], names)
    d = g_fit.shape[1]
    fisher = 0.05 * torch.eye(d, dtype=F64) + g_fit.T @ g_fit / m
    if block is not None:
        mask = torch.zeros(d, d, dtype=torch.bool)
        for s in range(0, d, block):
            mask[s : s + block, s : s + block] = True
        fisher = torch.where(mask, fisher, torch.zeros((), dtype=F64))
    g_tr, g_te = loop_grads(model, *train, names), loop_grads(model, *test, names)
    exact = -g_te @ torch.linalg.solve(fisher, g_tr.T)
    assert scores.shape == (10, 30)
    assert float((scores - exact).norm() / exact.norm()) < 1e-10


def test_influence_with_the_mc_fisher_matches_dense():
    """fisher="mc": the influence uses the Fisher of the drawn labels, the scores the true ones."""
    model, x, y = tiny()
    train, test = (x[:30], y[:30]), (x[30:], y[30:])
    op = InverseFisher.from_model(
        model, train, xent, 30, damp=0.05, dtype=F64, fisher="mc",
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    scores = mfac.influence(op, model, xent, train, test)
    gen = torch.Generator().manual_seed(3)
    drawn = mfac.operators.gradients.sample_labels(model, train, gen)[1]
    names = [n for n, _ in model.named_parameters()]
    g_fit = loop_grads(model, x[:30], drawn, names)
    fisher = 0.05 * torch.eye(g_fit.shape[1], dtype=F64) + g_fit.T @ g_fit / 30
    g_tr, g_te = loop_grads(model, *train, names), loop_grads(model, *test, names)
    exact = -g_te @ torch.linalg.solve(fisher, g_tr.T)
    assert float((scores - exact).norm() / exact.norm()) < 1e-10


@pytest.mark.parametrize("block", [None, 7])
def test_spectrum_of_a_model_operator(block):
    """eigenpairs and trace of an operator built from a model, against its dense Fisher."""
    model, x, y = tiny()
    op = InverseFisher.from_model(model, (x, y), xent, 12, damp=0.05, block_size=block, dtype=F64)
    names = [n for n, _ in model.named_parameters()]
    g = loop_grads(model, x[:12], y[:12], names)
    d = g.shape[1]
    fisher = 0.05 * torch.eye(d, dtype=F64) + g.T @ g / 12
    if block is not None:
        mask = torch.zeros(d, d, dtype=torch.bool)
        for s in range(0, d, block):
            mask[s : s + block, s : s + block] = True
        fisher = torch.where(mask, fisher, torch.zeros((), dtype=F64))
    vals, vecs = op.eigenpairs(5)
    exact = torch.linalg.eigvalsh(fisher).flip(0)[:5]
    assert float((vals - exact).abs().max() / exact[0]) < 1e-12
    assert float((fisher @ vecs - vecs * vals).norm() / exact[0]) < 1e-11
    named = op.unflatten(vecs[:, 0])  # the top direction, shaped like the parameters
    assert set(named) == set(names)
    assert op.trace() == pytest.approx(float(fisher.trace()), rel=1e-12)


def test_influence_refusals():
    model, x, y = tiny()
    plain = InverseFisher(torch.randn(5, 51, dtype=F64), 0.1)
    with pytest.raises(AttributeError, match="from_model"):
        mfac.influence(plain, model, xent, (x, y), (x, y))
    op = InverseFisher.from_model(model, (x, y), xent, 8, dtype=F64)
    other = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match="does not match"):
        mfac.influence(op, other, xent, (x, y), (x, y))
    bad = x.clone()
    bad[2, 0] = float("nan")
    with pytest.raises(mfac.NonFiniteGradientError):
        example_gradients(model, xent, (bad, y), ["0.weight"])


def test_last_layer_names():
    model, _, _ = tiny()
    assert last_layer(model) == ["2.weight", "2.bias"]


def dense_laplace(model, x, y, names, tau, m):
    g = loop_grads(model, x[:m], y[:m], names)
    n, d = x.shape[0], g.shape[1]
    precision = tau * torch.eye(d, dtype=F64) + n * g.T @ g / m
    return precision


@pytest.mark.parametrize("block", [None, 5])
def test_laplace_glm_predictive_and_evidence_against_dense(block):
    model, x, y = tiny(1)
    tau = 2.0
    la = Laplace(model, xent, block_size=block, prior_precision=tau).fit((x, y), num_grads=25)
    names = la.names
    precision = dense_laplace(model, x, y, names, tau, 25)
    d = precision.shape[0]
    if block is not None:
        mask = torch.zeros(d, d, dtype=torch.bool)
        for s in range(0, d, block):
            mask[s : s + block, s : s + block] = True
        precision = torch.where(mask, precision, torch.zeros((), dtype=F64))
    cov = torch.linalg.inv(precision)
    # GLM predictive: logits N(f, J cov J^T), probit approximation
    xt = x[:6]
    params = dict(model.named_parameters())
    probs = la.predict(xt, "glm")
    for i in range(6):
        out = model(xt[i : i + 1]).squeeze(0)
        jac = torch.stack(
            [
                torch.cat(
                    [
                        g.reshape(-1)
                        for g in torch.autograd.grad(
                            out[c], [params[n] for n in names], retain_graph=True
                        )
                    ]
                )
                for c in range(3)
            ]
        )
        var = (jac @ cov @ jac.T).diagonal()
        expect = torch.softmax(out.detach() / torch.sqrt(1 + math.pi / 8 * var), -1)
        torch.testing.assert_close(probs[i], expect, rtol=1e-10, atol=1e-12)
    # evidence with the dense log det of the precision
    with torch.no_grad():
        nll = float(ce(model(x), y, reduction="sum"))
    theta = la.map_vector
    expect_lml = (
        -nll
        + 0.5 * d * math.log(tau / (2 * math.pi))
        - 0.5 * tau * float(theta @ theta)
        + 0.5 * d * math.log(2 * math.pi)
        - 0.5 * float(torch.linalg.slogdet(precision)[1])
    )
    assert la.log_marginal_likelihood(nll) == pytest.approx(expect_lml, rel=1e-10)


def test_laplace_samples_follow_the_posterior():
    model, x, y = tiny(2)
    la = Laplace(model, xent, prior_precision=5.0).fit((x, y), num_grads=20)
    cov = torch.linalg.inv(dense_laplace(model, x, y, la.names, 5.0, 20))
    n = 40000
    draws = la.sample(n, torch.Generator().manual_seed(1)) - la.map_vector
    emp = draws.T @ draws / n
    diag = cov.diagonal()
    sd = torch.sqrt((diag[:, None] * diag[None, :] + cov**2) / n)
    assert bool(((emp - cov).abs() <= 4.5 * sd).all())
    # the MC predictive averages softmax over those draws; it agrees with GLM to first order
    mc = la.predict(x[:5], "mc", n_samples=2000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(mc.sum(1), torch.ones(5, dtype=F64))
    assert float((mc - la.predict(x[:5], "glm")).abs().max()) < 0.05


def test_prior_precision_is_the_validation_argmin():
    model, x, y = tiny(3)
    la = Laplace(model, xent).fit((x[:30], y[:30]))
    grid = [0.01, 1.0, 100.0]
    la.set_prior_precision(0.5)  # off the grid: optimize must move it to the chosen value
    chosen = la.optimize_prior_precision((x[30:], y[30:]), grid)
    after = la.prior_precision
    nlls = []
    for tau in grid:
        la.set_prior_precision(tau)
        p = la.predict(x[30:], "glm")
        nlls.append(float(-torch.log(p[torch.arange(10), y[30:]]).mean()))
    assert chosen == grid[nlls.index(min(nlls))] and after == chosen
    with pytest.raises(RuntimeError, match="fit"):
        Laplace(model, xent).predict(x)


def test_operators_do_not_import_the_curvature_package():
    """Layering: curvature sits on operators, never the reverse."""
    from pathlib import Path

    import mfac.operators as ops

    for path in Path(ops.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "curvature" not in "".join(
            line for line in text.splitlines() if line.lstrip().startswith(("import", "from"))
        ), path.name
