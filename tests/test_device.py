"""The windows, the bfloat16 passes and both optimizers on the device chosen with
``--device`` (CPU by default, ``make gpu-check`` runs them on CUDA), each against a float64
oracle computed on the CPU; and the memory check reads the free memory of a CUDA device."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mfac
from mfac.operators import SlidingInverseFisher, TopKSlidingInverseFisher
from mfac.operators.blocks import inverse_from_cholesky
from mfac.operators.kernels import cols_dot, rows_dot
from mfac.operators.memory import check_fits

from oracle import dense_inverse_fisher, rel_err

F64 = torch.float64


def test_sliding_window_stays_exact_over_wraparounds(device: torch.device) -> None:
    """The O(m^2) update of K^-1 on the device matches the float64 oracle after 200 passes
    of the ring, with gradients whose sizes span six orders of magnitude."""
    m, dim, damp = 8, 40, 1e-3
    op = SlidingInverseFisher(dim, m, damp, device=device)
    gen = torch.Generator().manual_seed(0)
    for t in range(200 * m + 3):
        g = torch.randn(dim, generator=gen) * 10.0 ** float(
            torch.randint(-3, 3, (1,), generator=gen)
        )
        y = op.push_ihvp(g.to(device))
        if t % 401 == 0:
            want = dense_inverse_fisher(op.grads.cpu(), damp) @ g.double()
            assert y.device.type == device.type
            assert rel_err(y.cpu(), want) < 1e-5, t


@pytest.mark.parametrize("density", [1.0, 0.25])
def test_topk_window_matches_oracle_of_its_rows(device: torch.device, density: float) -> None:
    """The top-k window's F^-1 on the device equals the dense float64 inverse of the sparse
    rows it holds (k = d: of the gradients themselves), over wrap-around."""
    m, dim, damp = 5, 64, 1e-2
    k = max(1, int(density * dim))
    op = TopKSlidingInverseFisher(dim, m, k, damp, device=device)
    gen = torch.Generator().manual_seed(1)
    rows = torch.zeros(m, dim, dtype=F64)
    for t in range(3 * m + 2):
        g = torch.randn(dim, generator=gen)
        op.push(g.to(device))
        rows[t % m] = g.double()
        held = rows if density == 1.0 else op.dense_rows().cpu().double()
        x = torch.randn(dim, generator=gen)
        assert (
            rel_err(op.ihvp(x.to(device)).cpu(), dense_inverse_fisher(held, damp) @ x.double())
            < 1e-5
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_pass_products_match_float64(device: torch.device, dtype: torch.dtype) -> None:
    """G @ X and G^T @ C over a low-precision window on the device equal the float64 products
    of the same stored values (float32 accumulation: relative error near 1e-6)."""
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(16, 5000, generator=gen).to(dtype)
    x, c = torch.randn(5000, 2, generator=gen), torch.randn(16, 2, generator=gen)
    exact_rows = g.double() @ x.double()
    exact_cols = g.double().T @ c.double()
    assert rel_err(rows_dot(g.to(device), x.to(device)).cpu(), exact_rows) < 1e-5
    assert rel_err(cols_dot(g.to(device), c.to(device)).cpu(), exact_cols) < 1e-5


def test_mfac_step_on_device_is_the_dense_formula(device: torch.device) -> None:
    """Paper M-FAC on the device: after m + 2 steps of a fixed gradient sequence the update of
    the last step is lr * (damp I + G^T G / m)^-1 g, G the last m gradients (float64 oracle)."""
    m, lr, damp = 4, 0.1, 1e-2
    p = nn.Parameter(torch.zeros(30, device=device))
    opt = mfac.MFACSGD([p], lr=lr, ngrads=m, damp=damp)
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(30, generator=gen) for _ in range(m + 2)]
    for g in grads:
        before = p.detach().cpu().double().clone()
        p.grad = g.to(device)
        opt.step()
    window = torch.stack(grads[-m:]).double()
    want = lr * dense_inverse_fisher(window, damp) @ grads[-1].double()
    assert rel_err(before - p.detach().cpu().double(), want) < 1e-5


def test_scaled_mfac_on_device_matches_cpu(device: torch.device) -> None:
    """MFAC on the device takes the same steps as on the CPU (float32 rounding)."""
    torch.manual_seed(4)
    model_cpu = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    model_dev = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(device)
    model_dev.load_state_dict(model_cpu.state_dict())
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    opts = [mfac.MFAC(mdl.parameters(), lr=1e-2, ngrads=4) for mdl in (model_cpu, model_dev)]
    for _ in range(7):
        for mdl, opt, dev in zip((model_cpu, model_dev), opts, ("cpu", device), strict=True):
            opt.zero_grad()
            nn.functional.cross_entropy(mdl(x.to(dev)), y.to(dev)).backward()
            opt.step()
    for a, b in zip(model_cpu.parameters(), model_dev.parameters(), strict=True):
        assert rel_err(b.detach().cpu(), a.detach()) < 1e-4


def test_cuda_memory_check_reads_free_device_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the default budget is the device's free memory (read before allocating), and
    the error names it; an explicit budget still wins. Runs without a GPU (the reading is
    replaced)."""
    free = 3 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 8 * 2**30))
    cuda = torch.device("cuda:0")
    check_fits(free - 1, "a window", None, cuda)
    with pytest.raises(MemoryError, match=r"free memory of cuda:0; 3\.00 GiB free on cuda:0"):
        check_fits(free + 1, "a window", None, cuda)
    check_fits(free + 1, "a window", free + 2, cuda)
    with pytest.raises(MemoryError, match="memory_budget"):
        check_fits(2 * free, "a window", free, cuda)


@pytest.mark.parametrize("triangular", [False, True])
def test_both_block_inversions_match_float64(device: torch.device, triangular: bool) -> None:
    """The block inverse from a Cholesky factor, by potri (CPU) or by a batched triangular
    solve (GPU), equals the float64 inverse of each damped Gram block."""
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(6, 40, 16, generator=gen, dtype=F64)
    mats = g.transpose(1, 2) @ g / 40 + 1e-3 * torch.eye(16, dtype=F64)
    chol = torch.linalg.cholesky(mats.to(device))
    out = torch.empty_like(chol)
    inverse_from_cholesky(chol, out, triangular=triangular)
    assert rel_err(out.cpu(), torch.linalg.inv(mats)) < 1e-10
