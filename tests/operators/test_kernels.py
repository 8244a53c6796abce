"""The low-precision passes G @ x and G^T c: every path (native C kernel, torch.compile, tiled
fallback) against float64 oracles, and the fallback when no compiler can be had."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mfac
from mfac.operators import kernels, native

from oracle import rel_err


@pytest.fixture
def fresh_native(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """The native library is looked up again (in an empty cache folder) and restored after."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("MFAC_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_compiled", {})
    return tmp_path


def oracle(g: torch.Tensor, c: torch.Tensor, x: torch.Tensor):
    gd = g.double()
    return gd.T @ c.double(), gd @ x.double()


def _problem(m: int, d: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(m, 1, generator=gen))  # rows of different sizes
    g = (torch.randn(m, d, generator=gen) * scale).to(dtype)
    return g, torch.randn(m, generator=gen), torch.randn(d, generator=gen)


needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler here")


@needs_native
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(1, 11),
    d=st.sampled_from([1, 15, 16, 17, 4095, 4097, 16385, 70_001]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_native_passes_match_float64(
    m: int, d: int, dtype: torch.dtype, threads: int, seed: int
) -> None:
    # m not a multiple of the kernels' 4 rows, d across the 16-lane, 4096- and 16384-column
    # tiles, and 2 threads splitting rows and columns.
    if dtype == torch.float16 and not native.supports(torch.zeros(1, 1, dtype=dtype)):
        return
    g, c, x = _problem(m, d, dtype, seed)
    exact_cols, exact_rows = oracle(g, c, x)
    before, grain = torch.get_num_threads(), native._MIN_COLUMNS
    torch.set_num_threads(threads)
    native._MIN_COLUMNS = 1000  # small problems are split too
    try:
        if d >= 2000 and threads == 2:
            assert len(native._split(d, threads, native._MIN_COLUMNS)) == 2  # split in two
        cols, rows = native.cols_dot(g, c), native.rows_dot(g, x)
    finally:
        torch.set_num_threads(before)
        native._MIN_COLUMNS = grain
    assert cols.dtype == rows.dtype == torch.float32
    # Entry-wise float32 summation bounds, against the sums of absolute terms (a single row's
    # dot product may cancel, so a relative error of the result alone says little).
    a = g.double().abs()
    assert bool(((cols.double() - exact_cols).abs() <= 1e-6 * (a.T @ c.double().abs())).all())
    assert bool(((rows.double() - exact_rows).abs() <= 1e-5 * (a @ x.double().abs())).all())


@needs_native
def test_dispatch_takes_native_for_one_vector_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    g, c, x = _problem(9, 5000, torch.bfloat16, 1)
    calls = []
    monkeypatch.setattr(kernels, "_compiled", {})
    for name in ("cols_dot", "rows_dot"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    exact_cols, exact_rows = oracle(g, c, x)
    assert rel_err(kernels.cols_dot(g, c[:, None]), exact_cols[:, None]) < 1e-6
    assert rel_err(kernels.rows_dot(g, x[:, None]), exact_rows[:, None]) < 1e-5
    assert calls == ["cols_dot", "rows_dot"]
    # A strided G (not contiguous) is not the native kernel's: the other paths take it.
    wide = torch.zeros(9, 10_000, dtype=torch.bfloat16)
    wide[:, ::2] = g
    calls.clear()
    assert rel_err(kernels.cols_dot(wide[:, ::2], c[:, None]), exact_cols[:, None]) < 1e-6
    assert calls == []


def test_compiled_path_matches_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    # The torch.compile path (the CUDA path, and k in 2..4 on the CPU), with the native kernel
    # ruled out; it falls back to the tiled pass by itself where it cannot compile.
    monkeypatch.setattr(native, "supports", lambda g: False)
    monkeypatch.setattr(kernels, "_compiled", {})
    g, c, x = _problem(13, 5000, torch.bfloat16, 2)
    exact_cols, exact_rows = oracle(g, c, x)
    assert rel_err(kernels.cols_dot(g, c[:, None]), exact_cols[:, None]) < 1e-6
    assert rel_err(kernels.rows_dot(g, x[:, None]), exact_rows[:, None]) < 1e-5


def test_no_compile_env_gives_no_library(fresh_native, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MFAC_NO_COMPILE", "1")
    assert native.library() is None
    assert not native.supports(torch.zeros(2, 2, dtype=torch.bfloat16))
    assert not any(fresh_native.rglob("*.so"))  # nothing was built


def test_without_a_compiler_the_fallback_runs(
    fresh_native, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setenv("MFAC_NO_COMPILE", "1")  # and no torch.compile either
    g, c, x = _problem(7, 3000, torch.bfloat16, 3)
    exact_cols, exact_rows = oracle(g, c, x)
    assert native.library() is None
    assert rel_err(kernels.cols_dot(g, c[:, None]), exact_cols[:, None]) < 1e-6
    assert rel_err(kernels.rows_dot(g, x[:, None]), exact_rows[:, None]) < 1e-5
    # The whole window runs on the fallback: the step matches the dense oracle.
    op = mfac.SlidingInverseFisher(3000, 4, 1e-2, dtype=torch.bfloat16)
    for row in g[:4].float():
        y = op.push_ihvp(row)
    stored = op.grads.double()
    dense = torch.linalg.inv(1e-2 * torch.eye(3000, dtype=torch.float64) + stored.T @ stored / 4)
    assert rel_err(y, dense @ g[3].double()) < 1e-4


def test_a_broken_compiler_warns_and_falls_back(
    fresh_native, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(native, "_compiler", lambda: "/bin/false")
    with caplog.at_level(logging.WARNING, logger="mfac.operators.native"):
        assert native.library() is None
    assert "native low-precision kernel unavailable" in caplog.text
    assert not any(fresh_native.rglob("*.so"))  # no half-written library is left behind
    g, c, x = _problem(5, 2000, torch.bfloat16, 4)
    exact_cols, _ = oracle(g, c, x)
    assert rel_err(kernels.cols_dot(g, c[:, None]), exact_cols[:, None]) < 1e-6


@needs_native
def test_library_is_built_once_and_cached(fresh_native) -> None:
    lib = native.library()
    assert lib is not None
    built = list((fresh_native / "kernels").glob("lowp-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native._state.clear()  # a new process: loads the cached file, builds nothing
    assert native.library() is not None
    assert built[0].stat().st_mtime_ns == stamp
    assert list((fresh_native / "kernels").glob("lowp-*.so")) == built


@needs_native
def test_threads_are_made_again_after_a_fork() -> None:
    # A forked child inherits the pool object but none of its threads; the kernel notices by
    # the process id and makes a new pool (a real fork is not used: torch's own OpenMP pool
    # does not survive one).
    g, c, x = _problem(8, 140_000, torch.bfloat16, 5)
    exact_cols, _ = oracle(g, c, x)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        native.cols_dot(g, c)
        parent_pool = native._state["pool"]
        native._state["pid"] = -1  # as seen from a child
        cols = native.cols_dot(g, c)
        assert native._state["pool"] is not parent_pool
    finally:
        torch.set_num_threads(before)
    assert rel_err(cols, exact_cols) < 1e-6


@needs_native
def test_portable_build_matches_float64(fresh_native, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without -march=native the plain C loops are compiled (no AVX-512 intrinsics): the code
    # that runs on other CPUs, checked here too.
    monkeypatch.setattr(native, "_FLAG_SETS", native._FLAG_SETS[1:])
    lib = native.library()
    assert lib is not None and lib.mfac_vector_width() == 0
    for m, d, dtype in [(7, 70_001, torch.bfloat16), (5, 4097, torch.float16)]:
        if dtype == torch.float16 and not lib.mfac_has_f16():
            continue
        g, c, x = _problem(m, d, dtype, m)
        exact_cols, exact_rows = oracle(g, c, x)
        assert rel_err(native.cols_dot(g, c), exact_cols) < 1e-6
        assert rel_err(native.rows_dot(g, x), exact_rows) < 1e-5


@needs_native
def test_native_refuses_mismatched_sizes() -> None:
    g = torch.zeros(4, 100, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="vector of 4 entries"):
        native.cols_dot(g, torch.zeros(5))
    with pytest.raises(ValueError, match="vector of 100 entries"):
        native.rows_dot(g, torch.zeros(99))
    with pytest.raises(ValueError, match="contiguous CPU"):
        native.rows_dot(g.float(), torch.zeros(100))


@settings(max_examples=20, deadline=None)
@given(size=st.integers(0, 5000), piece=st.sampled_from([1, 7, 1024]), wide=st.booleans())
def test_squared_norm_equals_float64(size: int, piece: int, wide: bool) -> None:
    x = torch.randn(size, generator=torch.Generator().manual_seed(size)) + 0.5
    x = x.double() if wide else x
    want = float((x.double() ** 2).sum())
    tol = 1e-12 if wide else 1e-5  # float32 pieces round within a piece only
    assert abs(kernels.squared_norm(x, piece) - want) <= tol * max(want, 1.0)


def test_squared_norm_stays_exact_where_a_float32_dot_drifts() -> None:
    """Positive terms: one float32 dot's error grows with the length, the pieces' does not; a
    window's K diagonal (row 0 pushed, row 1 empty: K00 - K11 = |g|^2) is formed with it."""
    gen = torch.Generator().manual_seed(0)
    n = 4_000_003
    x = torch.randn(n, generator=gen) * (1 + 10 * torch.rand(n, generator=gen) ** 8) + 0.3
    want = float((x.double() ** 2).sum())
    assert abs(kernels.squared_norm(x) - want) / want < 1e-7
    window = mfac.operators.SlidingInverseFisher(n, 2, 1e-4)
    window.push(x)
    gram = window.state_dict()["gram"]
    assert abs(float(gram[0, 0] - gram[1, 1]) - want) / want < 1e-7
