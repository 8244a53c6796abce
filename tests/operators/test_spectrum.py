"""The spectrum of the damped Fisher behind the operator (``eigenpairs``, ``trace``) against
dense float64 eigendecompositions, for every block form (direct, Woodbury q and g forms, the
full operator and block-diagonal ones with a shorter last block), and the refusals."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mfac import InverseFisher
from mfac.operators.spectrum import SpectrumError, rank_bound

from oracle import F64, dense_fisher

pytestmark = pytest.mark.usefixtures("one_thread")


def check_pairs(fisher: torch.Tensor, vals: torch.Tensor, vecs: torch.Tensor, tol: float) -> None:
    """Top-k eigenvalues equal the dense ones, F v = lambda v, and V^T V = I."""
    k = vals.numel()
    exact = torch.linalg.eigvalsh(fisher).flip(0)[:k]
    assert vals.dtype == F64 and vecs.dtype == F64 and vecs.shape == (fisher.shape[0], k)
    assert bool((vals[:-1] >= vals[1:]).all())
    scale = float(exact[0])
    assert float((vals - exact).abs().max()) <= tol * scale
    assert float((fisher @ vecs - vecs * vals).norm()) <= tol * scale * k**0.5
    assert float((vecs.T @ vecs - torch.eye(k, dtype=F64)).abs().max()) < 1e-12


# (m, d, block): full Woodbury, full direct (d <= m), blocked Woodbury (B > m) with a shorter
# last block, blocked direct (B <= m) with a shorter last block, mixed (last block direct).
CASES = [(8, 30, None), (40, 12, None), (5, 23, 9), (12, 29, 6), (6, 23, 10)]


@pytest.mark.parametrize(("m", "d", "block"), CASES)
@pytest.mark.parametrize("dtype", [F64, torch.bfloat16])
def test_eigenpairs_and_traces_against_dense(m, d, block, dtype):
    """float64 rows (q form) and bfloat16 rows (g form, the rounded rows): exact."""
    gen = torch.Generator().manual_seed(m + d)
    grads = torch.randn(m, d, generator=gen, dtype=F64).to(dtype)
    op = InverseFisher(grads.clone(), 0.3, block)
    fisher = dense_fisher(grads, 0.3, block)
    for k in sorted({1, 3, min(rank_bound(op), d)}):
        vals, vecs = op.eigenpairs(k)
        check_pairs(fisher, vals, vecs, 1e-12)
    assert op.trace() == pytest.approx(float(fisher.trace()), rel=1e-12)
    exact_inv = float(torch.linalg.inv(fisher).trace())
    assert op.trace(inverse=True) == pytest.approx(exact_inv, rel=1e-12)


@pytest.mark.parametrize("block", [None, 9])
def test_float32_rows_are_exact_to_their_storage(block):
    """float32 Q = L^-1 G is rounded to 24 bits, so mu_i = 1 - lambda / e_i is known to about
    1e-7 absolute and e_i = lambda / (1 - mu_i) to 1e-7 * e_i^2 / lambda (a relative 1e-7 *
    e_max / lambda, here e_max / lambda is about 200)."""
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(7, 40, generator=gen, dtype=F64).float()
    op = InverseFisher(grads.clone(), 0.05, block)
    fisher = dense_fisher(grads, 0.05, block)
    vals, vecs = op.eigenpairs(5)
    check_pairs(fisher, vals, vecs, 1e-7 * float(vals[0]) / 0.05)
    assert op.trace() == pytest.approx(float(fisher.trace()), rel=1e-7 * float(vals[0]) / 0.05)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(1, 12),
    d=st.integers(1, 30),
    block=st.one_of(st.none(), st.integers(1, 30)),
    damp=st.floats(1e-3, 10.0),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_eigenpairs_property(m, d, block, damp, seed, data):
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(m, d, generator=gen, dtype=F64)
    op = InverseFisher(grads.clone(), damp, block)
    k = data.draw(st.integers(1, min(rank_bound(op), d)))
    vals, vecs = op.eigenpairs(k)
    check_pairs(dense_fisher(grads, damp, block), vals, vecs, 1e-11)
    assert op.trace() == pytest.approx(float(dense_fisher(grads, damp, block).trace()), rel=1e-11)


@pytest.mark.parametrize("block", [None, 10])
def test_rank_deficient_rows_get_null_space_vectors(block):
    """Repeated rows and zero columns: eigenvalues at lambda get orthonormal vectors of G's
    null space (F v = lambda v), orthogonal to the others."""
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(2, 25, generator=gen, dtype=F64)
    grads = torch.cat([base, base, 2 * base])  # rank 2 in a window of 6
    grads[:, 10:20] = 0.0  # the middle block (B = 10) sees no gradient at all
    op = InverseFisher(grads.clone(), 0.2, block)
    k = min(rank_bound(op), 25)
    vals, vecs = op.eigenpairs(k)
    fisher = dense_fisher(grads, 0.2, block)
    check_pairs(fisher, vals, vecs, 1e-12)
    assert float(vals[-1]) == pytest.approx(0.2, rel=1e-12)


def test_refusals_name_the_problem_and_leave_the_operator():
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(6, 20, generator=gen, dtype=F64)
    op = InverseFisher(grads.clone(), 0.1)
    before = op.buffer.clone()
    with pytest.raises(ValueError, match="window"):
        op.eigenpairs(7)
    with pytest.raises(ValueError, match="dimension d = 5"):
        InverseFisher(torch.randn(8, 5, dtype=F64), 0.1).eigenpairs(6)
    with pytest.raises(ValueError, match="rank bound"):
        InverseFisher(grads.clone(), 0.1, 7).eigenpairs(19)  # 3 blocks: bound 6 + 6 + 6 = 18
    with pytest.raises(ValueError, match="k must be >= 1"):
        op.eigenpairs(0)
    with pytest.raises(TypeError, match="k must be an integer"):
        op.eigenpairs(2.0)
    with pytest.raises(TypeError, match="k must be an integer"):
        op.eigenpairs(True)
    assert torch.equal(op.buffer, before)
    op.buffer[2, 3] = float("nan")  # rows changed behind the operator's back
    corrupted = op.buffer.clone()
    for call in (lambda: op.eigenpairs(2), op.trace, lambda: op.trace(inverse=True)):
        with pytest.raises(SpectrumError, match="not finite"):
            call()
    assert torch.equal(op.buffer.isnan(), corrupted.isnan())
    direct = InverseFisher(torch.randn(8, 5, dtype=F64), 0.1)
    direct.buffer[0, 0] = float("inf")
    with pytest.raises(SpectrumError, match="not finite"):
        direct.eigenpairs(2)
    with pytest.raises(SpectrumError, match="not finite"):
        direct.trace()


@pytest.mark.parametrize("block", [None, 13, 5])
def test_tiled_passes_agree(block, monkeypatch):
    """Column tiles and block chunks far smaller than the rows give the same spectrum."""
    import mfac.operators.spectrum as spectrum

    monkeypatch.setattr(spectrum, "_TILE_BYTES", 8 * 8 * 7)
    gen = torch.Generator().manual_seed(9)
    grads = torch.randn(8, 50, generator=gen, dtype=F64)
    op = InverseFisher(grads.clone(), 0.2, block)
    fisher = dense_fisher(grads, 0.2, block)
    vals, vecs = op.eigenpairs(6)
    check_pairs(fisher, vals, vecs, 1e-12)
    assert op.trace() == pytest.approx(float(fisher.trace()), rel=1e-12)
