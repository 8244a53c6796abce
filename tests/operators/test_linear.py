"""The inverse Fisher as a linear operator (``@``, SciPy, log det F, square root and sampling)
and built from a model (per-example and per-batch gradients, the parameter layout, refusals),
each checked against a dense float64 computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import mfac
from mfac import InverseFisher, NonFiniteGradientError

from oracle import F64, dense_block_inverse_fisher, dense_fisher, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")


def grads_for(m, d, seed, dtype=F64, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, d, generator=gen, dtype=F64) * scale).to(dtype)


# (m, d, block): full Woodbury, full direct (d <= m), blocked Woodbury (B > m) with a shorter
# last block, blocked direct (B <= m) with a shorter last block.
CASES = [(8, 30, None), (40, 12, None), (5, 23, 9), (12, 29, 6)]


@pytest.mark.parametrize(("m", "d", "block"), CASES)
def test_products_scipy_logdet_sqrt_against_dense(m, d, block):
    damp = 0.3
    grads = grads_for(m, d, seed=m + d)
    exact_f = dense_fisher(grads, damp, block)
    exact_inv = dense_block_inverse_fisher(grads, damp, block)
    op = InverseFisher(grads.clone(), damp, block)
    x = torch.randn(d, dtype=F64)
    X = torch.randn(d, 4, dtype=F64)
    assert rel_err(op @ x, exact_inv @ x) < 1e-12
    assert rel_err(op @ X, exact_inv @ X) < 1e-12
    lin = op.to_scipy()
    assert lin.shape == (d, d)
    np.testing.assert_allclose(lin.matvec(x.numpy()), (exact_inv @ x).numpy(), rtol=1e-11)
    np.testing.assert_allclose(lin @ X.numpy(), (exact_inv @ X).numpy(), rtol=1e-11)
    np.testing.assert_allclose(lin.rmatvec(x.numpy()), (exact_inv @ x).numpy(), rtol=1e-11)
    sign, logabs = torch.linalg.slogdet(exact_f)
    assert sign > 0
    assert op.logdet() == pytest.approx(float(logabs), rel=1e-11, abs=1e-10)
    S = op.apply_sqrt(torch.eye(d, dtype=F64))
    assert rel_err(S @ S.T, exact_inv) < 1e-11
    assert rel_err(op.apply_sqrt(x), S @ x) < 1e-12


def test_low_precision_storage_uses_the_kept_factor():
    """bfloat16 rows keep G as stored plus float64 L: exact for the rounded rows."""
    m, d, damp = 6, 40, 0.05
    grads = grads_for(m, d, seed=3, dtype=torch.bfloat16)
    for block in (None, 16):
        op = InverseFisher(grads.clone(), damp, block)
        exact_f = dense_fisher(grads, damp, block)
        exact_inv = dense_block_inverse_fisher(grads, damp, block)
        assert op.logdet() == pytest.approx(float(torch.linalg.slogdet(exact_f)[1]), rel=1e-11)
        S = op.apply_sqrt(torch.eye(d, dtype=F64))
        assert rel_err(S @ S.T, exact_inv) < 1e-10


def test_float32_storage_within_its_precision():
    m, d, damp = 16, 200, 1e-2
    grads = grads_for(m, d, seed=4)
    op = InverseFisher(grads.float().contiguous(), damp)
    exact_f = dense_fisher(grads.float(), damp, None)
    exact_inv = dense_block_inverse_fisher(grads.float(), damp, None)
    assert op.logdet() == pytest.approx(float(torch.linalg.slogdet(exact_f)[1]), rel=1e-5)
    S = op.apply_sqrt(torch.eye(d, dtype=F64))
    assert rel_err(S @ S.T, exact_inv) < 1e-5


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(1, 12),
    d=st.integers(1, 30),
    block=st.one_of(st.none(), st.integers(1, 35)),
    damp=st.sampled_from([1e-3, 0.1, 10.0]),
    seed=st.integers(0, 1000),
)
def test_logdet_and_square_root_property(m, d, block, damp, seed):
    grads = grads_for(m, d, seed)
    op = InverseFisher(grads.clone(), damp, block)
    exact_f = dense_fisher(grads, damp, block)
    assert op.logdet() == pytest.approx(float(torch.linalg.slogdet(exact_f)[1]), rel=1e-9, abs=1e-9)
    S = op.apply_sqrt(torch.eye(d, dtype=F64))
    exact_inv = dense_block_inverse_fisher(grads, damp, block)
    assert rel_err(S @ S.T, exact_inv) < 1e-9


@pytest.mark.parametrize("block", [None, 4])
def test_samples_have_covariance_f_inverse(block):
    """Empirical covariance of 40000 draws within a 4-sigma band of F^-1, entry by entry."""
    m, d, damp = 3, 7, 0.5
    grads = grads_for(m, d, seed=9)
    exact_inv = dense_block_inverse_fisher(grads, damp, block)
    op = InverseFisher(grads.clone(), damp, block)
    n = 40000
    draws = op.sample(n, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (n, d) and draws.dtype == F64
    cov = draws.T @ draws / n
    # Var of the product x_i x_j is C_ii C_jj + C_ij^2 for a Gaussian.
    diag = exact_inv.diagonal()
    sd = torch.sqrt((diag[:, None] * diag[None, :] + exact_inv**2) / n)
    assert bool(((cov - exact_inv).abs() <= 4 * sd).all())
    assert float(draws.mean(0).abs().max()) < 4 * float(diag.max().sqrt()) / math.sqrt(n)
    again = op.sample(n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_sample_refuses_bad_n():
    op = InverseFisher(grads_for(3, 5, 0), 1.0)
    for bad in (0, -1, 2.5):
        with pytest.raises((ValueError, TypeError), match=r"^n must be (an integer )?>= 1"):
            op.sample(bad)


# ----------------------------------------------------------------------------- from_model
class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(5, 4)
        self.out = nn.Linear(4, 3)
        self.register_buffer("shift", torch.full((5,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x + self.shift)))


def xent(model, batch):
    """The library's loss convention: loss_fn(model, batch), the batch's mean loss."""
    inputs, targets = batch
    return nn.functional.cross_entropy(model(inputs), targets)


def tiny_data(n=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def loop_gradients(model, x, y, names):
    """Per-example gradients by a plain autograd loop (the oracle)."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(x.shape[0]):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        gs = torch.autograd.grad(loss, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows).to(F64)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, before):
    now = model.state_dict()
    return now.keys() == before.keys() and all(
        torch.equal(now[k].view(torch.uint8), before[k].view(torch.uint8)) for k in before
    )


def test_from_model_per_example_matches_autograd_loop():
    torch.manual_seed(0)
    model = TinyNet().double()
    x, y = tiny_data()
    x = x.double()
    before = snapshot(model)
    op = InverseFisher.from_model(model, (x, y), xent, 12, damp=0.1, dtype=F64, chunk_size=5)
    assert same_state(model, before)
    assert all(p.grad is None for p in model.parameters())
    names = [n for n, _ in model.named_parameters()]
    assert op.layout.names == tuple(names)
    grads = loop_gradients(model, x[:12], y[:12], names)
    exact = dense_block_inverse_fisher(grads, 0.1, None)
    v = torch.randn(op.dim, dtype=F64)
    assert rel_err(op @ v, exact @ v) < 1e-10
    # layout: unflatten gives named tensors shaped like the parameters; flatten inverts it
    parts = op.unflatten(v)
    assert list(parts) == names
    assert all(parts[n].shape == p.shape for n, p in model.named_parameters())
    assert torch.equal(op.flatten(parts), v)
    gs = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    assert op.flatten(gs).shape == (op.dim,)


def test_from_model_blocked_subset_and_batches():
    torch.manual_seed(1)
    model = TinyNet().double()
    x, y = tiny_data(32, seed=1)
    x = x.double()
    op = InverseFisher.from_model(
        model,
        (x, y),
        xent,
        9,
        params=[model.out.weight, model.out.bias],
        block_size=5,
        damp=0.02,
        damp_mode="relative",
        dtype=F64,
    )
    names = ["out.weight", "out.bias"]
    assert op.layout.names == tuple(names) and op.dim == 15
    grads = loop_gradients(model, x[:9], y[:9], names)
    damp = 0.02 * float(grads.square().mean())
    exact = dense_block_inverse_fisher(grads, damp, 5)
    v = torch.randn(15, dtype=F64)
    assert rel_err(op @ v, exact @ v) < 1e-10
    # per-batch gradients: one row per batch of the iterable
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 32, 4)]
    opb = InverseFisher.from_model(model, batches, xent, 6, per_sample=False, damp=0.1, dtype=F64)
    rows = []
    for xb, yb in batches[:6]:
        gs = torch.autograd.grad(nn.functional.cross_entropy(model(xb), yb), model.parameters())
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    exact_b = dense_block_inverse_fisher(torch.stack(rows), 0.1, None)
    w = torch.randn(opb.dim, dtype=F64)
    assert rel_err(opb @ w, exact_b @ w) < 1e-10


def test_from_model_refusals_leave_the_model_as_it_was():
    torch.manual_seed(2)
    model = TinyNet()
    x, y = tiny_data()
    before = snapshot(model)
    ce = xent
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        InverseFisher.from_model(model, (x, y), ce, 4)
    for p in model.parameters():
        p.requires_grad_(True)
    with pytest.raises(ValueError, match="one number per"):
        InverseFisher.from_model(
            model,
            (x, y),
            lambda net, b: (
                nn.functional.cross_entropy(net(b[0]), b[1], reduction="none") * torch.ones(2)
            ),
            4,
        )
    with pytest.raises(ValueError, match="one number per"):
        InverseFisher.from_model(
            model, (x, y), lambda net, b: net(b[0]).sum(-1), 4, per_sample=False
        )
    bad_x = x.clone()
    bad_x[3, 1] = float("inf")
    with pytest.raises(NonFiniteGradientError, match=r"gradients \[3\].*hidden.weight"):
        InverseFisher.from_model(model, (bad_x, y), ce, 8)
    with pytest.raises(ValueError, match="fewer than num_grads"):
        InverseFisher.from_model(model, (x, y), ce, 21)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        InverseFisher.from_model(model, (x, y), ce, 4, params=["nope"])
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        InverseFisher.from_model(lambda t: t, (x, y), ce, 4)
    assert same_state(model, before)
    assert all(p.grad is None for p in model.parameters())


def test_layout_errors_and_plain_operator_has_none():
    op = InverseFisher(grads_for(3, 5, 0), 1.0)
    with pytest.raises(AttributeError, match="from_model"):
        op.unflatten(torch.zeros(5, dtype=F64))
    model = TinyNet()
    op = InverseFisher.from_model(model, tiny_data(), xent, 3)
    with pytest.raises(ValueError, match="expected shape"):
        op.unflatten(torch.zeros(op.dim + 1))
    with pytest.raises(KeyError, match="missing"):
        op.flatten({"out.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"out\.bias has shape"):
        op.flatten({**op.unflatten(torch.zeros(op.dim)), "out.bias": torch.zeros(4)})
    assert mfac.InverseFisher is InverseFisher


def test_direct_blocks_read_through_the_public_product():
    """The fallback that reads F^-1's blocks through ``ihvp`` equals the stored inverses."""
    from mfac.operators.linear import _DirectFactor

    op = InverseFisher(grads_for(12, 29, 5), 0.2, 6)
    for group in op.groups:
        assert group.direct
        assert rel_err(_DirectFactor._read_blocks(op, group), group.inverse) < 1e-13
