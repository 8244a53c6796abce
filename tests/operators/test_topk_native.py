"""The top-k window's C kernels and its C path, against float64 dense oracles and the torch path."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mfac._validation import NonFiniteGradientError
from mfac.operators import sparse_native, tiled
from mfac.operators.topk import (
    SMALL_SELECT,
    TopKSlidingInverseFisher,
    _native_select,
    candidate_cap,
    largest_positions,
    topk_indices,
)

from oracle import hard_vector

F64 = torch.float64
pytestmark = pytest.mark.skipif(
    sparse_native.library() is None, reason="no C compiler: the window runs its torch path"
)
VALUE_DTYPES = [torch.float32, torch.bfloat16] + (
    [torch.float16] if tiled.supports(torch.float16, torch.device("cpu")) else []
)


def woodbury_oracle(rows: torch.Tensor, damp: float, x: torch.Tensor) -> torch.Tensor:
    """F^-1 x for F = damp*I + G^T G / m, in float64 from the dense rows (the d x d inverse
    does not fit at these d): (x - G^T (m damp I + G G^T)^-1 G x) / damp."""
    g, x = rows.to(F64), x.to(F64)
    m = g.shape[0]
    inner = g @ g.T + m * damp * torch.eye(m, dtype=F64)
    return (x - g.T @ torch.linalg.solve(inner, g @ x)) / damp


def _rows(m: int, k: int, d: int, dtype: torch.dtype, index_dtype: torch.dtype, seed: int):
    """m rows of k distinct ascending coordinates (the last one empty: zeros at 0..k-1, as a
    slot never written holds)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(d, generator=gen)[:k].sort().values for _ in range(m)])
    vals = torch.randn(m, k, generator=gen)
    if m > 1:
        idx[-1], vals[-1] = torch.arange(k), 0.0
    return vals.to(dtype), idx.to(index_dtype)


def _dense(vals: torch.Tensor, idx: torch.Tensor, d: int) -> torch.Tensor:
    out = torch.zeros(vals.shape[0], d, dtype=F64)
    return out.index_put_(
        (torch.arange(vals.shape[0])[:, None].expand_as(idx), idx.long()),
        vals.to(F64),
        accumulate=True,
    )


def _layout(vals: torch.Tensor, idx: torch.Tensor, d: int) -> tiled.TiledRows:
    """The rows in the tile-major layout, written a group at a time."""
    m, k = vals.shape
    rows = tiled.TiledRows(d, m, k, vals.dtype, idx.dtype)
    for g in range(rows.groups):
        a = g * rows.rows
        b = a + rows.group_rows(g)
        rows.write_group(g, vals[a:b], idx[a:b])
    return rows


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 40),
    d=st.sampled_from([1, 7, 4096, 4097, 20_000, 70_001, 140_000]),
    density=st.sampled_from([0.001, 0.01, 0.3, 1.0]),
    dtype=st.sampled_from(VALUE_DTYPES),
    threads=st.sampled_from([1, 2]),
    replaced=st.integers(0, 6),
    seed=st.integers(0, 2**16),
)
def test_kernels_match_the_float64_oracle(m, d, density, dtype, threads, replaced, seed) -> None:
    """G x (dense and sparse x) and G^T c of the tile-major layout equal the dense float64
    products up to float32 rounding, for int16 and int32 indices, tiles cut anywhere, groups
    (and a short last group) of any size, rows replaced after the layout was written (the
    spare block rotating through the groups), and any thread count; every row reads back."""
    k = max(1, min(d, round(density * d)))
    index_dtype = TopKSlidingInverseFisher.index_dtype(d)
    vals, idx = _rows(m, k, d, dtype, index_dtype, seed)
    rows = _layout(vals, idx, d)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(replaced):
        slot = int(torch.randint(m, (1,), generator=gen))
        idx[slot] = torch.randperm(d, generator=gen)[:k].sort().values.to(index_dtype)
        vals[slot] = torch.randn(k, generator=gen).to(dtype)
        rows.replace(slot, idx[slot].long(), vals[slot])
    rows.check()
    dense = _dense(vals, idx, d)
    x = torch.randn(d, generator=gen)
    sidx = torch.randperm(d, generator=gen)[: max(1, d // 3)].sort().values
    sval = torch.randn(sidx.numel(), generator=gen)
    xs = torch.zeros(d).index_put_((sidx,), sval)
    c = torch.randn(m, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got_x = rows.gather(x=x)
        got_s = rows.gather(sparse=(sidx, sval))
        got_t = rows.scatter(c)
    finally:
        torch.set_num_threads(before)
    scale = float(vals.float().abs().sum()) + 1.0
    torch.testing.assert_close(got_x, dense @ x.to(F64), rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(got_s, dense @ xs.to(F64), rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(got_t.to(F64), dense.T @ c.to(F64), rtol=0, atol=1e-5 * scale)
    for slot in range(m):
        got_vals, got_idx = rows.row(slot)
        assert torch.equal(got_idx, idx[slot]) and torch.equal(got_vals, vals[slot])


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 40),
    d=st.sampled_from([4096, 4097, 20_000, 70_001, 140_000]),
    density=st.sampled_from([0.001, 0.01, 0.05]),
    x_density=st.sampled_from([0.0005, 0.01, 0.2, 1.0]),
    dtype=st.sampled_from(VALUE_DTYPES),
    seed=st.integers(0, 2**16),
)
def test_a_sparse_x_gives_exactly_its_dense_forms_products(
    m, d, density, x_density, dtype, seed
) -> None:
    """G x for a sparse x (alone, and beside a dense x in one sweep) equals G x for the same
    vector stored densely, bit for bit: the sweep that skips the entries missing x (a bitmap
    of x's tile, where the tile has 4096 coordinates) drops only exact zeros, in the same order."""
    k = max(1, min(d, round(density * d)))
    vals, idx = _rows(m, k, d, dtype, TopKSlidingInverseFisher.index_dtype(d), seed)
    rows = _layout(vals, idx, d)
    gen = torch.Generator().manual_seed(seed + 1)
    sidx = torch.randperm(d, generator=gen)[: max(1, round(x_density * d))].sort().values
    sval = torch.randn(sidx.numel(), generator=gen)
    xs = torch.zeros(d).index_put_((sidx,), sval)
    x = torch.randn(d, generator=gen)
    alone = rows.gather(sparse=(sidx, sval))
    dense_x, beside, cross = rows.gather(x=x, sparse=(sidx, sval))
    assert torch.equal(alone, rows.gather(x=xs))
    assert torch.equal(beside, alone)
    assert torch.equal(dense_x, rows.gather(x=x))
    assert cross == pytest.approx(float(x.double() @ xs.double()), rel=1e-5, abs=1e-5)


def test_kernels_do_not_depend_on_the_thread_count() -> None:
    """Groups (G x) and tiles (G^T c) split across threads: bit-identical results."""
    d, m, k = 300_000, 24, 3000
    vals, idx = _rows(m, k, d, torch.float32, torch.int32, 0)
    rows = _layout(vals, idx, d)
    x, c = torch.randn(d), torch.randn(m)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append((rows.gather(x=x), rows.scatter(c)))
    finally:
        torch.set_num_threads(before)
    for g, s in results[1:]:
        assert torch.equal(g, results[0][0]) and torch.equal(s, results[0][1])


@settings(max_examples=20, deadline=None)
@given(
    d=st.integers(1, 5000),
    t=st.floats(0.0, 3.0),
    cap=st.integers(0, 6000),
    seed=st.integers(0, 2**16),
)
def test_selection_pass(d: int, t: float, cap: int, seed: int) -> None:
    """acc = e + g bit for bit; the listed coordinates are those with |acc| >= t, ascending,
    cut at cap with the full count; list_range agrees; NaN and Inf are flagged."""
    gen = torch.Generator().manual_seed(seed)
    e, g, acc = torch.randn(d, generator=gen), torch.randn(d, generator=gen), torch.empty(d)
    cand, _, count, bad = sparse_native.select_values(e, g, acc, t, cap, values=False)
    t32 = float(torch.tensor(t, dtype=torch.float32))
    want = torch.nonzero((e + g).abs() >= t32).squeeze(1)
    assert torch.equal(acc, e + g) and not bad
    assert count == want.numel() and torch.equal(cand, want[:cap])
    listed, n = sparse_native.list_range(acc, t32, math.inf, cap)
    assert n == count and torch.equal(listed, want[:cap])
    for poison in (math.nan, math.inf, -math.inf):
        g2 = g.clone()
        g2[seed % d] = poison
        assert sparse_native.select_values(e, g2, acc, t, cap, values=False)[3]


@settings(max_examples=20, deadline=None)
@given(
    d=st.integers(70_000, 250_000),
    density=st.sampled_from([0.0001, 0.001, 0.01, 0.1, 0.24]),
    kind=st.sampled_from(["normal", "ties", "sparse", "spike", "constant"]),
    seed=st.integers(0, 2**16),
)
def test_native_selection_is_exact(d: int, density: float, kind: str, seed: int) -> None:
    """The C selection keeps k distinct coordinates, ascending, whose magnitudes are the k
    largest (the smallest kept >= the largest dropped) -- also when the sampled threshold
    misjudges (heavy ties, constant vectors: the bisection path) -- and it picks the same
    coordinates as the torch path whenever the sample holds."""
    g = hard_vector(d, kind, torch.Generator().manual_seed(seed))
    e = torch.zeros(d)
    k = max(1, round(density * d))
    acc = torch.empty(d)
    idx, picked = _native_select(e, g, acc, k)
    assert idx.numel() == k and torch.equal(idx, idx.unique())  # distinct and ascending
    assert torch.equal(picked, acc[idx]) and torch.equal(acc, e + g)
    kept = torch.zeros(d, dtype=torch.bool)
    kept[idx] = True
    mag = g.abs()
    if k < d:
        assert float(mag[kept].min()) >= float(mag[~kept].max())
    ref = topk_indices(mag, k).sort().values
    if kind in ("normal", "spike"):
        assert torch.equal(idx, ref)


def test_kth_largest_is_exact() -> None:
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(100_003, generator=gen)
    a[::7] = 0.0
    for k in (1, 2, 500, 14_286, 100_003):
        want = float(a.abs().topk(k).values[-1])
        assert sparse_native.kth_largest(a, k) == want


# ---------------------------------------------------------------------- the window's C path
D = SMALL_SELECT + 4321  # above the plain-topk size, so the C selection runs


def _window(dtype=torch.float32, m: int = 5, k: int = 700, damp: float = 1e-2):
    op = TopKSlidingInverseFisher(D, m, k, damp, dtype=dtype)
    assert op.native
    return op


@pytest.mark.parametrize("dtype", VALUE_DTYPES)
def test_window_matches_the_float64_oracle_over_wraparounds(dtype: torch.dtype) -> None:
    """Over 4 wrap-arounds: c + e_new = e_old + g, c keeps the k largest |e_old + g|, rows stay
    sorted, K matches the stored rows, and the step equals F^-1 c of the dense float64 rows;
    ihvp(x) too."""
    m, k, damp = 5, 700, 1e-2
    op = _window(dtype, m, k, damp)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4 * m + 2):
        g = torch.randn(D, generator=gen) * (1.0 + 10.0 * torch.rand(1, generator=gen))
        e_old, slot = op.error.clone(), op.factor.next_slot
        a = e_old + g
        step = op.push_ihvp(g)
        rows = op.dense_rows().to(F64)
        c = rows[slot]
        assert int((c != 0).sum()) <= k
        kept = c != 0
        assert float(a.abs()[kept].min()) >= float(a.abs()[~kept].max())
        torch.testing.assert_close(c.float() + op.error, a)
        assert all(bool((op.row(r)[1].diff() > 0).all()) for r in range(m))
        gram = rows @ rows.T + m * damp * torch.eye(m, dtype=F64)
        torch.testing.assert_close(op.factor.gram, gram, rtol=1e-5, atol=1e-4)
        want = woodbury_oracle(rows, damp, c)
        torch.testing.assert_close(
            step.to(F64), want, rtol=1e-4, atol=1e-4 * float(want.abs().max())
        )
    x = torch.randn(D, generator=gen)
    want = woodbury_oracle(op.dense_rows(), damp, x)
    torch.testing.assert_close(op.ihvp(x).to(F64), want, rtol=1e-4, atol=1e-3)


def test_c_path_agrees_with_the_torch_path() -> None:
    """Same gradients through the C path and the torch path: identical rows and errors (the
    same selection), steps equal up to float32 rounding."""
    a, b = _window(), _window()
    b.to_torch_path()
    gen = torch.Generator().manual_seed(1)
    for _ in range(12):
        g = torch.randn(D, generator=gen)
        sa, sb = a.push_ihvp(g), b.push_ihvp(g)
        for slot in range(a.window):
            assert all(map(torch.equal, a.row(slot), b.row(slot)))
        assert torch.equal(a.error, b.error)
        torch.testing.assert_close(sa, sb, rtol=1e-4, atol=1e-5 * float(sb.abs().max()))


def test_bit_identical_resume_on_the_c_path() -> None:
    a = _window()
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(D, generator=gen) for _ in range(14)]
    for g in grads[:7]:
        a.push_ihvp(g)
    b = _window()
    b.load_state_dict(a.state_dict())
    for g in grads[7:]:
        assert torch.equal(a.push_ihvp(g), b.push_ihvp(g))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]) if torch.is_tensor(value) else True


def test_loading_unsorted_rows_sorts_them_and_keeps_the_matrix() -> None:
    """A state whose rows are not in coordinate order (any valid state) loads with its rows
    sorted, the same dense rows, and the C products of the dense rows."""
    a = _window()
    a.to_torch_path()  # its state holds (m, k) rows
    gen = torch.Generator().manual_seed(4)
    for _ in range(7):
        a.push_ihvp(torch.randn(D, generator=gen))
    state = a.state_dict()
    perm = torch.randperm(a.k, generator=gen)
    state["values"], state["indices"] = state["values"][:, perm], state["indices"][:, perm]
    b = _window()
    b.load_state_dict(state)
    assert b.native and all(bool((b.row(r)[1].diff() > 0).all()) for r in range(b.window))
    assert torch.equal(b.dense_rows(), a.dense_rows())
    x = torch.randn(D, generator=gen)
    torch.testing.assert_close(b.ihvp(x), a.ihvp(x))


@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_refused_gradient_leaves_everything_unchanged(poison: float) -> None:
    op = _window()
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        op.push_ihvp(torch.randn(D, generator=gen))
    before = {k: v.clone() for k, v in op.state_dict().items() if torch.is_tensor(v)}
    g = torch.randn(D, generator=gen)
    g[123] = poison
    g_before = g.clone()
    with pytest.raises(NonFiniteGradientError):
        op.push_ihvp(g)
    assert (
        torch.equal(
            g,
            g_before,
        )
        if not math.isnan(poison)
        else bool(g.isnan()[123])
    )
    for key, value in op.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, before[key]), key


def test_returned_step_is_never_overwritten_while_held() -> None:
    """The C path reuses its result buffer only once nothing outside holds it: a held step,
    a view of it or a NumPy array of it keeps its values after later pushes."""
    op = _window()
    gen = torch.Generator().manual_seed(6)
    held = op.push_ihvp(torch.randn(D, generator=gen))
    copy = held.clone()
    view = op.push_ihvp(torch.randn(D, generator=gen))[5:]
    view_copy = view.clone()
    array = op.push_ihvp(torch.randn(D, generator=gen)).numpy()
    array_copy = array.copy()
    for _ in range(3):
        op.push_ihvp(torch.randn(D, generator=gen))
    assert torch.equal(held, copy) and torch.equal(view, view_copy)
    assert (array == array_copy).all()


def test_required_bytes_counts_the_step() -> None:
    """The estimate covers the window (its groups, the spare group and the run offsets), three
    d-sized float32 vectors, the m x m matrices and the selection's candidates; a window over
    the budget is refused before allocating."""
    d, m, k = 134_515_008, 1024, 1_345_150
    need = TopKSlidingInverseFisher.required_bytes(d, m, k, torch.bfloat16)
    window = tiled.layout_bytes(m, k, d, 2, 4)
    assert window >= m * k * 6 * (1 + tiled.plan(m, k, d)[1] / m)  # the spare group
    floor = window + 3 * d * 4 + 4 * m * m * 8 + candidate_cap(k) * 8
    assert floor <= need <= floor * 1.05
    with pytest.raises(MemoryError, match=r"needs .* GiB .* over the memory budget"):
        TopKSlidingInverseFisher(d, m, k, dtype=torch.bfloat16, memory_budget=need - 1)


# ---------------------------------------------------------------------- selection with values
@settings(max_examples=30, deadline=None)
@given(
    d=st.integers(1, 3000),
    shift=st.integers(0, 15),
    t=st.floats(0.0, 3.0),
    cap=st.integers(0, 4000),
    seed=st.integers(0, 2**16),
)
def test_selection_with_values(d: int, shift: int, t: float, cap: int, seed: int) -> None:
    """select_values: acc = e + g bit for bit (also where acc does not start on a 64-byte
    line, so the aligned vector body and the unaligned head and tail all run), the listed
    coordinates and their acc values, ascending, cut at cap with the full count; a NaN or Inf
    anywhere is flagged."""
    gen = torch.Generator().manual_seed(seed)
    e, g = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    acc = torch.empty(d + 16)[shift : shift + d]
    cand, cval, count, bad = sparse_native.select_values(e, g, acc, t, cap)
    t32 = float(torch.tensor(t, dtype=torch.float32))
    want = torch.nonzero((e + g).abs() >= t32).squeeze(1)
    assert torch.equal(acc, e + g) and not bad
    assert count == want.numel() and torch.equal(cand, want[:cap])
    assert torch.equal(cval, (e + g)[want[:cap]])
    for poison in (math.nan, math.inf, -math.inf):
        g2 = g.clone()
        g2[seed % d] = poison
        assert sparse_native.select_values(e, g2, acc, t, cap)[3]


def test_selection_does_not_depend_on_the_thread_count() -> None:
    """Parts of the vector go to threads; candidates, values and acc come out bit-identical."""
    d = 3 * 2**20 + 77
    gen = torch.Generator().manual_seed(8)
    e, g = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            acc = torch.empty(d)
            cand, cval, count, bad = sparse_native.select_values(e, g, acc, 2.5, 20_000)
            results.append((acc, cand, cval, count, bad))
    finally:
        torch.set_num_threads(before)
    want = torch.nonzero((e + g).abs() >= 2.5).squeeze(1)
    assert results[0][3] == want.numel() and torch.equal(results[0][1], want[:20_000])
    for acc, cand, cval, count, bad in results[1:]:
        assert torch.equal(acc, results[0][0]) and torch.equal(cand, results[0][1])
        assert torch.equal(cval, results[0][2]) and count == results[0][3] and not bad


@settings(max_examples=20, deadline=None)
@given(d=st.integers(1, 50_000), frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_sub_at_matches_torch(d: int, frac: float, seed: int) -> None:
    """a[idx] -= v in C equals torch's indexed subtraction bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d, generator=gen)
    idx = torch.randperm(d, generator=gen)[: round(frac * d)].sort().values
    v = torch.randn(idx.numel(), generator=gen)
    want = a.clone()
    want[idx] -= v
    sparse_native.sub_at(a, idx, v)
    assert torch.equal(a, want)


def test_portable_build_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels built without the host's vector extensions (the scalar selection loop and
    sums, no AVX-512) give the same selection bit for bit and the same products up to
    rounding."""
    from mfac.operators import cbuild

    compiler = cbuild.find_compiler()
    portable = sparse_native._load(compiler, (["-O2"],), "sparse-portable")
    portable_tiled = tiled._load(compiler, (["-O2", "-fno-tree-vectorize"],), "tiled-portable")
    d, m, k = 200_003, 6, 2_000
    vals, idx = _rows(m, k, d, torch.float32, torch.int32, 9)
    rows = _layout(vals, idx, d)
    gen = torch.Generator().manual_seed(10)
    e, g, x, c = (torch.randn(n, generator=gen) for n in (d, d, d, m))
    native = [
        sparse_native.select_values(e, g, torch.empty(d), 2.0, 50_000),
        rows.gather(x=x),
        rows.scatter(c),
    ]
    monkeypatch.setitem(sparse_native._state, "lib", portable)
    monkeypatch.setitem(tiled._state, "lib", portable_tiled)
    acc = torch.empty(d)
    cand, cval, count, bad = sparse_native.select_values(e, g, acc, 2.0, 50_000)
    assert torch.equal(acc, e + g) and count == native[0][2] and not bad
    assert torch.equal(cand, native[0][0]) and torch.equal(cval, native[0][1])
    scale = float(vals.abs().sum())
    tol = {"rtol": 0, "atol": 1e-6 * scale}  # float32 sums, with and without fused multiply-add
    torch.testing.assert_close(rows.gather(x=x), native[1], **tol)
    torch.testing.assert_close(rows.scatter(c), native[2], **tol)


# ---------------------------------------------------------------------- the k largest, ties
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 5000),
    k=st.integers(1, 6000),
    levels=st.sampled_from([0, 3, 50]),
    seed=st.integers(0, 2**16),
)
def test_k_largest_keeps_the_lowest_coordinates_among_ties(
    n: int, k: int, levels: int, seed: int
) -> None:
    """keep_largest (C) and largest_positions (torch) pick the same entries: every magnitude
    above the k-th largest and, among the ties at it, the lowest coordinates; ascending."""
    gen = torch.Generator().manual_seed(seed)
    cand = torch.randperm(4 * n, generator=gen)[:n].sort().values
    cval = torch.randn(n, generator=gen)
    if levels:  # few distinct magnitudes: many ties (both signs)
        cval = torch.randint(-levels, levels + 1, (n,), generator=gen).float()
    idx, val = sparse_native.keep_largest(cand, cval, k)
    keep = min(k, n)
    mag = cval.abs()
    kth = mag.sort(descending=True).values[keep - 1]
    want = (mag > kth).nonzero().squeeze(1)
    ties = (mag == kth).nonzero().squeeze(1)[: keep - want.numel()]
    want = torch.cat([want, ties]).sort().values
    assert torch.equal(idx, cand[want]) and torch.equal(val, cval[want])
    assert torch.equal(largest_positions(mag, keep), want)


# ---------------------------------------------------------------------- the layout in states
def _pushed(op: TopKSlidingInverseFisher, n: int, seed: int) -> TopKSlidingInverseFisher:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        op.push_ihvp(torch.randn(D, generator=gen))
    return op


def test_states_load_across_the_two_layouts() -> None:
    """A C-path state (tile-major) loads into a torch-path window and back: the same rows and
    K, and the same steps afterwards (up to the paths' float32 rounding)."""
    c_path = _pushed(_window(m=5), 8, 20)
    torch_path = _window(m=5)
    torch_path.to_torch_path()
    torch_path.load_state_dict(c_path.state_dict())
    assert torch.equal(torch_path.dense_rows(), c_path.dense_rows())
    back = _window(m=5)
    back.load_state_dict(torch_path.state_dict())
    assert torch.equal(back.dense_rows(), c_path.dense_rows())
    assert torch.equal(back.factor.gram, c_path.factor.gram)
    g = torch.randn(D, generator=torch.Generator().manual_seed(21))
    want = c_path.push_ihvp(g)
    for op in (torch_path, back):
        tol = 1e-5 * float(want.abs().max())
        torch.testing.assert_close(op.push_ihvp(g), want, rtol=1e-4, atol=tol)


def _edit_starts(state):
    state["starts"][0, 1] += 1


def _swap_blocks(state):
    state["block_of"][0] = state["block_of"][1]


def _reverse_a_run(state):
    groups = state["block_of"].numel() - 1
    rows = state["starts"].shape[1] // groups - 1
    b = int(state["block_of"][0])
    q, e = int(state["starts"][0, 0]), int(state["starts"][0, 1])
    run = state["indices"].view(-1)[b * rows * state["indices"].shape[1] :][q:e]
    run.copy_(run.flip(0))


@pytest.mark.parametrize(
    ("corrupt", "field", "torch_path"),
    [
        (_edit_starts, "starts", False),
        (_swap_blocks, "block_of", False),
        (_reverse_a_run, "indices", False),
        # the torch path unpacks the layout with torch and checks the offsets there (a run out
        # of order is no error for it: the row holds the same entries)
        (_edit_starts, "starts", True),
        (_swap_blocks, "block_of", True),
    ],
)
def test_a_broken_layout_is_refused_and_changes_nothing(corrupt, field: str, torch_path) -> None:
    saved = _pushed(_window(m=5), 7, 22).state_dict()
    state = {key: v.clone() if torch.is_tensor(v) else v for key, v in saved.items()}
    corrupt(state)
    kept = {key: v.clone() if torch.is_tensor(v) else v for key, v in state.items()}
    op = _window(m=5)
    if torch_path:
        op.to_torch_path()
    op = _pushed(op, 3, 23)
    before = {key: v.clone() if torch.is_tensor(v) else v for key, v in op.state_dict().items()}
    with pytest.raises(ValueError, match=field):
        op.load_state_dict(state)
    for key, value in op.state_dict().items():
        assert torch.equal(value, before[key]) if torch.is_tensor(value) else value == before[key]
    for key, value in state.items():  # the given state is not modified either
        assert torch.equal(value, kept[key]) if torch.is_tensor(value) else value == kept[key]


def test_write_rows_refuses_bad_rows_before_writing() -> None:
    op = _pushed(_window(m=5), 6, 24)
    rows = op.dense_rows()
    good_idx = torch.arange(op.k).unsqueeze(0) * 3
    vals = torch.ones(1, op.k)
    for idx, match in (
        (good_idx.flip(1), "strictly ascending"),
        (good_idx + D, "strictly ascending"),
        (good_idx[:, :-1], "values and indices"),
    ):
        with pytest.raises(ValueError, match=match):
            op.write_rows(2, vals, idx)
    with pytest.raises(ValueError, match="outside the window"):
        op.write_rows(5, vals, good_idx)
    with pytest.raises(ValueError, match="NaN"):
        op.write_rows(2, vals * math.nan, good_idx)
    assert torch.equal(op.dense_rows(), rows)


def test_push_gather_is_push_then_gather_in_one_sweep() -> None:
    """push_gather(g, x) leaves the same window as push(g) and returns gather(x) of the updated
    window (up to float32 rounding), on the C path and on the torch path."""
    gen = torch.Generator().manual_seed(25)
    grads = [torch.randn(D, generator=gen) for _ in range(9)]
    xs = [torch.randn(D, generator=gen) for _ in range(9)]
    for torch_path in (False, True):
        fused, plain = _window(m=4), _window(m=4)
        if torch_path:
            fused.to_torch_path()
            plain.to_torch_path()
        for g, x in zip(grads, xs, strict=True):
            got = fused.push_gather(g, x)
            plain.push(g)
            want = plain.gather(x)
            assert torch.equal(fused.dense_rows(), plain.dense_rows())
            assert torch.equal(fused.error, plain.error)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_scatter_plus_adds_the_vector_tile_by_tile() -> None:
    """scatter(c, out, plus=p) = scatter(c) + p on both paths; a bad ``plus`` is refused by
    name and ``out`` is left as it was."""
    gen = torch.Generator().manual_seed(26)
    c = torch.randn(4, generator=gen, dtype=F64)
    plus = torch.randn(D, generator=gen)
    for torch_path in (False, True):
        op = _window(m=4)
        if torch_path:
            op.to_torch_path()
        _pushed(op, 5, 27)
        out = torch.full((D,), 7.0)
        want = op.scatter(c) + plus
        torch.testing.assert_close(op.scatter(c, out=out, plus=plus), want)
        torch.testing.assert_close(out, want)
        kept = out.clone()
        with pytest.raises(ValueError, match="plus"):
            op.scatter(c, out=out, plus=plus.double())
        assert torch.equal(out, kept)


@pytest.mark.parametrize("target", ["fresh", "used", "torch-path"])
def test_a_partly_filled_state_loads_in_chunks_bit_identically(target: str) -> None:
    """A state of 10 rows of a 24-row window (groups of 3 rows: the filled rows end inside a
    group) loads a chunk at a time into a fresh window, a full one and a torch-path one: every
    slot then holds the saved row (the 14 others empty), K is the saved K, and the same window
    type steps on bit-identically."""
    source = _pushed(_window(m=24), 10, 30)
    assert source.rows.rows == 3 and source.filled == 10
    op = _window(m=24)
    if target == "torch-path":
        op.to_torch_path()
    if target == "used":
        op = _pushed(op, 30, 31)
    op.load_state_dict(source.state_dict())
    for slot in range(24):
        assert all(map(torch.equal, op.row(slot), source.row(slot)))
    assert torch.equal(op.factor.gram, source.factor.gram) and torch.equal(op.error, source.error)
    g = torch.randn(D, generator=torch.Generator().manual_seed(32))
    want = source.push_ihvp(g)
    if target == "torch-path":
        torch.testing.assert_close(
            op.push_ihvp(g), want, rtol=1e-4, atol=1e-5 * float(want.abs().max())
        )
    else:
        assert torch.equal(op.push_ihvp(g), want)


@pytest.mark.parametrize(("first", "n"), [(0, 24), (10, 14), (4, 1), (7, 0), (23, 1)])
def test_row_chunks_cover_the_rows_and_end_on_group_boundaries(first: int, n: int) -> None:
    op = _window(m=24)  # groups of 3 rows
    chunks = op._row_chunks(first, n)
    rows = [r for at, size in chunks for r in range(at, at + size)]
    assert rows == list(range(first, first + n))
    assert all(size >= 1 and at // 3 == (at + size - 1) // 3 for at, size in chunks)
    assert all((at + size) % 3 == 0 for at, size in chunks[:-1])
