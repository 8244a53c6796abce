"""The sliding-window inverse Fisher: exactness, wrap-around invariants, exact resume."""

from __future__ import annotations

import io
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mfac
from mfac.operators import kernels

from oracle import dense_inverse_fisher, rel_err


def stream(seed: int, dim: int):
    gen = torch.Generator().manual_seed(seed)
    step = 0
    while True:
        step += 1
        yield torch.randn(dim, generator=gen) * (1 + step % 7)


@pytest.fixture
def eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_compiled", {"rows": None, "cols": None})


def test_first_step_is_normalised_gradient() -> None:
    op = mfac.SlidingInverseFisher(50, 8, damp=1e-2)
    g = torch.randn(50)
    expected = 8 * g.double() / (8 * 1e-2 + g.double().norm() ** 2)
    assert rel_err(op.push_ihvp(g), expected) < 1e-6


def test_exact_after_thousands_of_wraparounds() -> None:
    window, dim, damp = 4, 40, 1e-3
    op = mfac.SlidingInverseFisher(dim, window, damp)
    grads = stream(0, dim)
    for _ in range(8003):  # 2000 wrap-arounds, ending mid-window
        op.push(next(grads))
    assert op.next_slot == 8003 % window and op.num_pushed == 8003
    static = mfac.InverseFisher(op.grads.clone(), damp)
    x = torch.randn(dim, 3)
    assert rel_err(op.ihvp(x), static.ihvp(x).double()) < 1e-5
    assert rel_err(op.ihvp(x), dense_inverse_fisher(op.grads, damp) @ x.double()) < 1e-5
    # K is rebuilt row by row, so it equals a from-scratch Gram of the window (no drift).
    fresh = op.grads.double() @ op.grads.double().T
    fresh.diagonal().add_(window * damp)
    assert rel_err(op.gram, fresh) < 1e-6


@settings(
    max_examples=int(os.environ.get("MFAC_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    window=st.integers(1, 24),
    dim=st.integers(1, 400),
    pushes=st.integers(1, 120),
    log_damp=st.floats(-4, 0),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**20),
)
def test_push_ihvp_matches_oracle_of_stored_window(
    window: int,
    dim: int,
    pushes: int,
    log_damp: float,
    dtype: torch.dtype,
    seed: int,
    device: torch.device,
) -> None:
    kernels._compiled.update({"rows": None, "cols": None})
    damp = 10.0**log_damp
    op = mfac.SlidingInverseFisher(dim, window, damp, dtype=dtype, device=device)
    grads = stream(seed, dim)
    for _ in range(pushes):
        g = next(grads)
        y = op.push_ihvp(g.to(device))
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    stored = op.grads.double().cpu()  # the oracle runs on the CPU
    dense = dense_inverse_fisher(stored, damp)  # F of the stored (rounded) rows
    exact = dense @ g.to(dtype).double()
    if dim < 2 * window:
        # Linearly dependent rows: c = m K^-1 e_r has a component ~1/(m damp) along G's left
        # null space, which the float32 pass G^T c cancels only up to its own rounding.
        gram = stored @ stored.T
        gram.diagonal().add_(window * damp)
        slot = (op.next_slot - 1) % window  # the row push_ihvp just wrote
        unit = torch.eye(window, dtype=torch.float64)[:, slot]
        coeff = window * torch.linalg.solve(gram, unit)
        sigma = torch.linalg.matrix_norm(stored, ord=2)
        tol += 8 * 2.0**-24 * float(sigma * coeff.norm() / exact.norm())
    assert rel_err(y, exact) <= tol
    if dim > 2 * window:
        # A generic x has a component outside the window's span, so (x - G^T c)/lambda does
        # not cancel. For x inside the span (always when dim <= window) the Woodbury form
        # loses ~eps*|x|/(lambda*|F^-1 x|) digits; push_ihvp, checked above, never cancels.
        x = torch.randn(dim, 2, generator=torch.Generator().manual_seed(seed))
        y = op.ihvp(x.to(device))
        assert rel_err(y, dense @ x.double()) <= (1e-5 if dtype == torch.float32 else 1e-4)


def test_resume_is_bit_identical() -> None:
    dim, window = 300, 16
    reference = mfac.SlidingInverseFisher(dim, window, 1e-4)
    grads = list(zip(range(60), stream(3, dim), strict=False))
    outputs = [reference.push_ihvp(g) for _, g in grads]

    first = mfac.SlidingInverseFisher(dim, window, 1e-4)
    for _, g in grads[:37]:
        first.push_ihvp(g)
    blob = io.BytesIO()
    torch.save(first.state_dict(), blob)
    blob.seek(0)
    resumed = mfac.SlidingInverseFisher(dim, window, 1e-4)
    resumed.load_state_dict(torch.load(blob))
    for (_, g), expected in zip(grads[37:], outputs[37:], strict=True):
        assert torch.equal(resumed.push_ihvp(g), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_low_precision_kernel_matches_tiled(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    g = torch.randn(12, 70_000).to(dtype)
    x = torch.randn(70_000, 1)
    c = torch.randn(12, 1)
    kernels._compiled.clear()
    fast_rows, fast_cols = kernels.rows_dot(g, x), kernels.cols_dot(g, c)
    exact_rows = g.double() @ x.double()
    exact_cols = g.double().T @ c.double()
    assert rel_err(fast_rows, exact_rows) < 1e-5 and rel_err(fast_cols, exact_cols) < 1e-6
    assert rel_err(kernels._rows_dot_eager(g, x), exact_rows) < 1e-5
    assert rel_err(kernels._cols_dot_eager(g, c), exact_cols) < 1e-6


def test_memory_error_before_allocation() -> None:
    with pytest.raises(MemoryError, match="memory budget"):
        mfac.SlidingInverseFisher(10**9, 1024, memory_budget=2**30)
