"""The static inverse Fisher against a dense float64 oracle, on many random problems."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mfac
from mfac.operators import blocks, kernels, native

from oracle import dense_block_inverse_fisher, rel_err

# float32: the worst error hypothesis has found is 1.5e-5, a Woodbury block one column wider
# than m (m = 296, damp 1e-6, condition number ~4e8; the rounding bound u * kappa is ~25).
TOL = {torch.float32: 3e-5, torch.float64: 1e-10, torch.bfloat16: 1e-4, torch.float16: 1e-4}


@st.composite
def problems(draw: st.DrawFn) -> dict:
    m = draw(st.integers(1, 300))
    d = draw(st.integers(1, 3000))
    relation = draw(st.sampled_from(["full", "below_m", "equal_m", "above_m", "any"]))
    block = {
        "full": None,
        "below_m": max(1, m - draw(st.integers(1, 5))),
        "equal_m": m,
        "above_m": m + draw(st.integers(1, 7)),
        "any": draw(st.integers(1, d + 3)),
    }[relation]
    damp = 10.0 ** draw(st.floats(-8, 0))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]))
    correlated = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(m=m, d=d, block=block, damp=damp, dtype=dtype, correlated=correlated, seed=seed)


def make_grads(m: int, d: int, dtype: torch.dtype, correlated: bool, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(m, d, generator=gen, dtype=torch.float64)
    if correlated and m > 1:  # gradients share a few directions, as real ones do
        basis = torch.randn(max(1, m // 4), d, generator=gen, dtype=torch.float64)
        g = 0.1 * g + torch.randn(m, basis.shape[0], generator=gen, dtype=torch.float64) @ basis
    scale = torch.exp(torch.randn(m, 1, generator=gen, dtype=torch.float64))
    return (g * scale).to(dtype)


@pytest.fixture(autouse=True)
def _eager_low_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hypothesis draws many shapes; the tiled path avoids one compile per shape."""
    monkeypatch.setattr(kernels, "_compiled", {"rows": None, "cols": None})


@settings(
    max_examples=int(__import__("os").environ.get("MFAC_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(p=problems())
def test_every_query_matches_dense_oracle(p: dict, device: torch.device) -> None:
    stored = make_grads(p["m"], p["d"], p["dtype"], p["correlated"], p["seed"])  # CPU copy
    grads = stored.clone().to(device)  # float32 grads are overwritten in place
    op = mfac.InverseFisher(grads, p["damp"], p["block"])
    assert op.device.type == device.type
    dense = dense_block_inverse_fisher(stored, p["damp"], p["block"])
    tol = TOL[p["dtype"]]
    gen = torch.Generator().manual_seed(p["seed"] + 1)

    x = torch.randn(p["d"], 3, generator=gen)
    assert rel_err(op.ihvp(x.to(device)), dense @ x.double()) <= tol
    assert rel_err(op.ihvp(x[:, 0].to(device)), dense @ x[:, 0].double()) <= tol
    assert rel_err(op.diag(), dense.diagonal()) <= tol

    idx = torch.randint(0, p["d"], (min(p["d"], 12),), generator=gen)
    assert rel_err(op.submatrix(idx), dense[idx][:, idx]) <= tol
    i, j = int(idx[0]), int(idx[-1])
    bound = math.sqrt(float(dense[i, i] * dense[j, j]))  # |F^-1_ij| <= sqrt(F^-1_ii F^-1_jj)
    assert abs(op.entry(i, j) - float(dense[i, j])) <= tol * bound


def test_in_place_and_forms() -> None:
    grads = torch.randn(16, 100)
    original = grads.clone()
    full = mfac.InverseFisher(grads, 1e-3)
    assert grads.data_ptr() == full.buffer.data_ptr()  # consumed in place, no m x d copy
    assert not torch.equal(grads, original)  # overwritten by Q
    blocked = mfac.InverseFisher(original.clone(), 1e-3, block_size=8)  # 8 <= m: direct
    assert all(g.direct for g in blocked.groups)
    assert blocked.nbytes == 16 * 100 * 4 + (12 * 8 * 8 + 4 * 4) * 8
    woodbury = mfac.InverseFisher(original.clone(), 1e-3, block_size=40)  # 40, 40, 20 > 16
    assert not any(g.direct for g in woodbury.groups)
    assert [(g.nblocks, g.size) for g in woodbury.groups] == [(2, 40), (1, 20)]
    assert "woodbury" in repr(woodbury)


def test_relative_damping_scales_by_mean_diagonal(device: torch.device) -> None:
    grads = torch.randn(10, 50, dtype=torch.float64) * 3
    mean_diag = float((grads**2).sum()) / (10 * 50)
    op = mfac.InverseFisher(grads.clone().to(device), 0.01, damp_mode="relative")
    assert op.damp == pytest.approx(0.01 * mean_diag, rel=1e-12)
    dense = dense_block_inverse_fisher(grads, op.damp, None)
    assert rel_err(op.diag(), dense.diagonal()) < 1e-10


def test_float64_storage_is_near_exact(device: torch.device) -> None:
    grads = torch.randn(40, 200, dtype=torch.float64)
    dense = dense_block_inverse_fisher(grads, 1e-6, 64)
    op = mfac.InverseFisher(grads.clone().to(device), 1e-6, 64)
    x = torch.randn(200, dtype=torch.float64)
    assert rel_err(op.ihvp(x.to(device)), dense @ x) < 1e-10


@pytest.mark.parametrize("block", [None, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_contiguous_right_hand_sides(
    block: int | None, dtype: torch.dtype, device: torch.device
) -> None:
    grads = torch.randn(8, 40)
    dense = dense_block_inverse_fisher(grads, 1e-3, block)
    op = mfac.InverseFisher(grads.clone().to(device), 1e-3, block)
    x = torch.randn(3, 40, dtype=dtype, device=device).T  # (40, 3), not contiguous
    assert rel_err(op.ihvp(x), dense @ x.double().cpu()) < 1e-5


# ------------------------------------------------- refusals leave inputs as they were
def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits, so that a comparison also tells -0.0 from 0.0 and NaN from NaN."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.contiguous().view(ints).clone()


def dependent_tail(dtype: torch.dtype) -> torch.Tensor:
    """4 x 21 gradients: two random Woodbury blocks of 8, then a block of 5 whose rows are all
    [1, 1, 1, 1, 0], so that its K = 4*ones + m*damp*I is singular in float64 at tiny damp."""
    grads = torch.randn(4, 21, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads[:, 16:20] = 1.0
    grads[:, 20] = 0.0
    return grads.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_that_does_not_factor_leaves_grads_bit_identical(
    dtype: torch.dtype, device: torch.device
) -> None:
    # The first group (blocks 0 and 1) factors; the second group (the tail block) does not. The
    # first group's Q must not have been written over G before the tail was factored.
    grads = dependent_tail(dtype).to(device)
    before = bits(grads)
    with pytest.raises(mfac.operators.static.FisherFactorError) as err:
        mfac.InverseFisher(grads, 1e-20, block_size=8)
    message = str(err.value)
    assert "damp=1e-20" in message and "coordinates 16..20" in message
    assert "linearly dependent" in message and "unchanged" in message
    assert torch.equal(bits(grads), before)
    # The same rows with damping above float64 rounding build, and match the oracle.
    stored = grads.cpu().clone()
    op = mfac.InverseFisher(grads, 1e-3, block_size=8)
    dense = dense_block_inverse_fisher(stored, 1e-3, 8)
    assert rel_err(op.diag(), dense.diagonal()) < TOL[dtype]


def test_direct_block_that_does_not_factor_names_damp_and_leaves_grads(
    device: torch.device,
) -> None:
    # B = 3 <= m = 6: direct form, every block of rank one
    grads = torch.ones(6, 12, dtype=torch.float64, device=device)
    before = bits(grads)
    with pytest.raises(ValueError, match=r"damp=1e-30.*linearly dependent"):
        mfac.InverseFisher(grads, 1e-30, block_size=3)
    assert torch.equal(bits(grads), before)


def test_gram_overflow_is_named_overflow_not_damping(device: torch.device) -> None:
    # Every row's squared norm is finite (1.44e308), but their sum in F_00 overflows float64.
    grads = torch.zeros(4, 4, dtype=torch.float64)
    grads[:, 0] = 1.2e154
    grads[:, 1:] = torch.randn(4, 3, dtype=torch.float64)
    grads = grads.to(device)
    before = bits(grads)
    with pytest.raises(ValueError, match="overflow float64") as err:
        mfac.InverseFisher(grads, 1e10, block_size=2)
    assert "increase damp" not in str(err.value)
    assert torch.equal(bits(grads), before)


def test_row_norm_overflow_is_named_overflow_not_nan() -> None:
    grads = torch.randn(3, 10, dtype=torch.float64)
    grads[1] = 1e200  # finite entries, squared norm inf
    before = bits(grads)
    with pytest.raises(ValueError, match="overflow float64") as err:
        mfac.InverseFisher(grads, 1e-3)
    assert not isinstance(err.value, mfac.operators.static.NonFiniteGradientError)
    assert torch.equal(bits(grads), before)


def test_grads_that_require_grad_are_refused_untouched() -> None:
    grads = torch.randn(4, 30, requires_grad=True)
    before = bits(grads.detach())
    with pytest.raises(ValueError, match=r"requires grad.*detach"):
        mfac.InverseFisher(grads, 1e-3)
    assert torch.equal(bits(grads.detach()), before)


def test_ihvp_overflow_is_named_and_operator_unchanged(device: torch.device) -> None:
    op = mfac.InverseFisher(torch.randn(4, 50, device=device), 1e-8)
    q = bits(op.buffer)
    x = torch.full((50,), 1e32, device=device)
    x_before = bits(x)
    with pytest.raises(OverflowError, match="overflows float32"):
        op.ihvp(x)
    assert torch.equal(bits(op.buffer), q) and torch.equal(bits(x), x_before)


def test_scratch_over_available_memory_is_refused_before_writing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    grads = torch.randn(20, 300)
    before = bits(grads)
    from mfac.operators import static

    monkeypatch.setattr(static, "default_memory_budget", lambda: 1000)
    with pytest.raises(MemoryError, match=r"m x m.*Nothing was written"):
        mfac.InverseFisher(grads, 1e-3)
    assert torch.equal(bits(grads), before)


def test_memory_accounting_counts_the_float64_matrices() -> None:
    from mfac.operators.blocks import BlockGroup

    woodbury = BlockGroup(0, 4, 50, 20, 1e-3)  # 4 blocks of 50 > m = 20
    assert woodbury.factor_bytes() == 4 * 20 * 20 * 8
    assert woodbury.scratch_bytes() >= 8 * (4 * 20 * 50 + 3 * 4 * 20 * 20)
    direct = BlockGroup(0, 4, 10, 20, 1e-3)
    assert direct.stored_bytes() == 4 * 10 * 10 * 8
    assert direct.scratch_bytes() >= 8 * (4 * 20 * 10 + 3 * 4 * 10 * 10)


# ------------------------------------------------------------------ low-precision passes
@pytest.mark.parametrize(
    ("dtype", "m", "k"), [(torch.bfloat16, 13, 1), (torch.bfloat16, 21, 3), (torch.float16, 1, 1)]
)
def test_low_precision_passes_match_float64(
    dtype: torch.dtype, m: int, k: int, device: torch.device
) -> None:
    # m not a multiple of the compiled G^T c kernel's 8-row chunks, k columns up to 3.
    gen = torch.Generator().manual_seed(m * 10 + k)
    g = torch.randn(m, 5000, generator=gen).to(dtype)
    c, x = torch.randn(m, k, generator=gen), torch.randn(5000, k, generator=gen)
    exact_cols = g.double().T @ c.double()
    exact_rows = g.double() @ x.double()
    gd, cd, xd = g.to(device), c.to(device), x.to(device)
    kernels._compiled.clear()  # compiled (falls back to eager by itself where it cannot)
    assert rel_err(kernels.cols_dot(gd, cd), exact_cols) < 1e-6
    assert rel_err(kernels.rows_dot(gd, xd), exact_rows) < 1e-5  # float32 sums over d
    assert rel_err(kernels._cols_dot_eager(gd, cd, columns=777), exact_cols) < 1e-6
    assert rel_err(kernels._rows_dot_eager(gd, xd), exact_rows) < 1e-5


# ------------------------------------------------------------------ the fused build
def test_relative_damping_of_float32_gradients_uses_float64_sums() -> None:
    grads = torch.randn(12, 700) * 1e3
    mean_diag = float(grads.double().square().sum()) / (12 * 700)
    op = mfac.InverseFisher(grads.clone(), 0.01, 64, damp_mode="relative")
    assert op.damp == pytest.approx(0.01 * mean_diag, rel=1e-12)


def test_nan_in_a_later_tile_is_named_before_an_earlier_block_that_does_not_factor() -> None:
    # m = 8, B = 4: a float64 tile holds 32768 blocks, so block 0 (rank one, damping far below
    # float64 rounding) is factored, and fails, one tile before the NaN in the last block.
    m, size, nblocks = 8, 4, 40_000
    grads = torch.randn(m, size * nblocks)
    grads[:, :size] = 1e6
    grads[3, -1] = float("nan")
    before = bits(grads)
    with pytest.raises(mfac.operators.static.NonFiniteGradientError, match=r"rows \[3\]"):
        mfac.InverseFisher(grads, 1e-20, size)
    assert torch.equal(bits(grads), before)
    grads[3, -1] = 0.0  # without the NaN, the failing block is named
    with pytest.raises(mfac.operators.static.FisherFactorError, match="block 0 of size 4"):
        mfac.InverseFisher(grads, 1e-20, size)


# ------------------------------------------------------------------ the direct form's C build
needs_native_direct = pytest.mark.skipif(
    not native.supports_build(torch.zeros(1, 1)), reason="no C compiler here"
)


def _lapack_build_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks take the batched torch/LAPACK path (the CUDA and no-compiler path)."""
    monkeypatch.setattr(blocks, "native_build_enabled", lambda: False)


@needs_native_direct
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(1, 70),
    size=st.integers(1, 40),
    nblocks=st.integers(1, 3),
    tail=st.integers(0, 39),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    damp=st.floats(-6, 0).map(lambda e: 10.0**e),
    correlated=st.booleans(),
    threads=st.sampled_from([1, 2]),
    mode=st.sampled_from(["absolute", "relative"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_native_direct_build_matches_float64_and_the_torch_path(
    m: int,
    size: int,
    nblocks: int,
    tail: int,
    dtype: torch.dtype,
    damp: float,
    correlated: bool,
    threads: int,
    mode: str,
    seed: int,
) -> None:
    # Block sizes across the kernels' 8-row, 16-column and 8-pivot edges, a shorter tail block,
    # m from B upwards, two threads splitting the blocks, and both damping modes (relative
    # damping is read off the C Grams' traces).
    size = min(size, m)
    tail = tail % size
    d = size * nblocks + tail
    stored = make_grads(m, d, dtype, correlated, seed)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        op = mfac.InverseFisher(stored.clone(), damp, size, damp_mode=mode)
    finally:
        torch.set_num_threads(before)
    assert all(g.direct and g.native for g in op.groups)
    with pytest.MonkeyPatch.context() as patch:
        _lapack_build_path(patch)
        reference = mfac.InverseFisher(stored.clone(), damp, size, damp_mode=mode)
    assert not any(g.native for g in reference.groups)
    assert op.damp == pytest.approx(reference.damp, rel=1e-12)
    dense = dense_block_inverse_fisher(stored, op.damp, size)
    # As accurate as the LAPACK path (within 4x its error against the oracle), and within the
    # suite's float32 tolerance / 1e-10 whenever LAPACK is.
    tol = TOL[dtype]
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(d, 2, generator=gen, dtype=dtype)
    idx = torch.randint(0, d, (min(d, 10),), generator=gen)
    queries = {
        "ihvp": (lambda o: o.ihvp(x), dense @ x.double()),
        "diag": (lambda o: o.diag(), dense.diagonal()),
        "submatrix": (lambda o: o.submatrix(idx), dense[idx][:, idx]),
        "inverses": (
            lambda o: torch.cat([g.inverse.reshape(-1) for g in o.groups]),
            torch.cat(
                [
                    dense[a : a + g.size, a : a + g.size].reshape(-1)
                    for g in op.groups
                    for a in range(g.start, g.stop, g.size)
                ]
            ),
        ),
    }
    for name, (query, exact) in queries.items():
        ours, lapack = rel_err(query(op), exact), rel_err(query(reference), exact)
        assert ours <= max(tol, 4 * lapack), (name, ours, lapack)
    for group in op.groups:  # full symmetric inverses, as the torch path stores them
        assert torch.equal(group.inverse, group.inverse.transpose(1, 2))


@needs_native_direct
@pytest.mark.parametrize("path", ["native", "torch"])
def test_direct_block_that_does_not_factor_is_named_by_both_paths(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # m = 6, B = 4: blocks 0, 1 and 3 are random, block 2 has four equal columns (rank one),
    # so at damp 1e-20 its pivots are rounding noise; both paths name block 2 and write nothing.
    if path == "torch":
        _lapack_build_path(monkeypatch)
    grads = torch.randn(6, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads[:, 8:12] = grads[:, 8:9]
    before = bits(grads)
    with pytest.raises(mfac.operators.static.FisherFactorError) as err:
        mfac.InverseFisher(grads, 1e-20, block_size=4)
    message = str(err.value)
    assert "block 2 of size 4 (coordinates 8..11)" in message and "damp=1e-20" in message
    assert "linearly dependent" in message and "increase damp" in message
    assert torch.equal(bits(grads), before)
    op = mfac.InverseFisher(grads, 1e-3, block_size=4)  # damping above rounding: it builds
    assert all(g.native == (path == "native") for g in op.groups)
    assert rel_err(op.diag(), dense_block_inverse_fisher(grads, 1e-3, 4).diagonal()) < 1e-10


@needs_native_direct
def test_native_direct_build_refuses_mismatched_tensors_before_running() -> None:
    grads = torch.randn(8, 12)
    with pytest.raises(ValueError, match=r"\(3, 4, 4\) store"):
        native.direct_gram(grads, 0, 4, torch.empty(3, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"columns 4\.\.15"):  # past the buffer's 12 columns
        native.direct_gram(grads, 4, 4, torch.empty(3, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="float32/float64 buffer"):
        native.direct_gram(grads.bfloat16(), 0, 4, torch.empty(3, 4, 4, dtype=torch.float64))
    store = torch.empty(3, 4, 4)  # float32
    with pytest.raises(ValueError, match="float64"):
        native.direct_invert(store, 1e-3)


def test_direct_build_without_a_compiler_takes_the_torch_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(native, "library", lambda: None)
    stored = torch.randn(20, 50, dtype=torch.float64)
    op = mfac.InverseFisher(stored.clone(), 1e-3, block_size=8)
    assert all(g.direct and not g.native for g in op.groups)
    dense = dense_block_inverse_fisher(stored, 1e-3, 8)
    assert rel_err(op.diag(), dense.diagonal()) < 1e-10


@pytest.mark.skipif(sys.platform != "linux", reason="transparent huge pages are Linux's")
def test_float64_store_is_advised_onto_huge_pages() -> None:
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[never]" in mode.read_text():
        pytest.skip("transparent huge pages are off on this machine")
    store = mfac.operators.static._float64_store((4, 1024, 1024), torch.device("cpu"), 2**40, "x")
    store.fill_(1.5)  # first touch after the advice
    start = -(-store.data_ptr() // 2**21) * 2**21  # the first whole 2 MiB page inside it
    flags: list[str] = []
    mapping = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            mapping = lo <= start < hi
        elif mapping and head == "VmFlags:":
            flags = line.split()[1:]
    # "hg": the mapping carries MADV_HUGEPAGE. Whether the kernel then finds free 2 MiB pages
    # depends on the machine's memory fragmentation, so AnonHugePages is not asserted.
    assert "hg" in flags
    assert float(store.sum()) == 1.5 * 4 * 2**20


@needs_native_direct
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(1, 40),
    extra=st.integers(1, 60),
    nblocks=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    damp=st.floats(-6, 0).map(lambda e: 10.0**e),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**31 - 1),
)
def test_native_woodbury_gram_matches_float64_and_the_torch_path(
    m: int, extra: int, nblocks: int, dtype: torch.dtype, damp: float, threads: int, seed: int
) -> None:
    # B > m: Woodbury blocks, whose Grams G_b G_b^T the C kernel forms (m <= 256).
    size = m + extra
    d = size * nblocks
    stored = make_grads(m, d, dtype, True, seed)
    dense = dense_block_inverse_fisher(stored, damp, size)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        op = mfac.InverseFisher(stored.clone(), damp, size)
    finally:
        torch.set_num_threads(before)
    assert all(not g.direct and g.native for g in op.groups)
    with pytest.MonkeyPatch.context() as patch:
        _lapack_build_path(patch)
        reference = mfac.InverseFisher(stored.clone(), damp, size)
    assert not any(g.native for g in reference.groups)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(d, 2, generator=gen, dtype=dtype)
    for query, exact in ((lambda o: o.ihvp(x), dense @ x.double()), (lambda o: o.diag(), None)):
        exact = dense.diagonal() if exact is None else exact
        ours, lapack = rel_err(query(op), exact), rel_err(query(reference), exact)
        assert ours <= max(TOL[dtype], 4 * lapack), (ours, lapack)


@needs_native_direct
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_woodbury_gram_sums_every_column_tile(dtype: torch.dtype) -> None:
    # m = 200: the kernel packs 152 columns at a time, so B = 401 takes three tiles, the last
    # one short; the result is the full symmetric float64 Gram of each block.
    gen = torch.Generator().manual_seed(7)
    grads = torch.randn(200, 2 * 401 + 5, generator=gen, dtype=torch.float64).to(dtype)
    store = torch.full((2, 200, 200), float("nan"), dtype=torch.float64)
    native.woodbury_gram(grads, 5, 401, store)
    cols = grads[:, 5:].double().view(200, 2, 401).permute(1, 0, 2)
    exact = cols @ cols.transpose(1, 2)
    assert rel_err(store, exact) < 1e-14
    assert torch.equal(store, store.transpose(1, 2))
