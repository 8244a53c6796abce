"""Small C kernels for the CPU: the two passes over a bfloat16/float16 window, and the static
build's blocks (float64 Gram, Cholesky, inverse or triangular solve, in cache-sized panels;
see :func:`direct_gram`, :func:`direct_invert` and :func:`woodbury_gram`).

In the passes, each 16-bit entry is widened to float32 in registers (bfloat16 by a 16-bit
shift, float16 by the compiler's half-precision conversion) and accumulated in float32, so the
window is read once at half the bytes of float32:

* ``G^T c`` walks column tiles of 65536 columns: four rows at a time add into a float32 tile
  of the result (256 KiB, in L2), which is written once; long tiles keep each row's stream
  long enough for the hardware prefetcher;
* ``G @ x`` walks column tiles of x that stay in L2, four rows at a time, with sixteen float32
  partial sums per row and the rows prefetched ahead.

The C source (``csrc/lowp.c``) is built once per machine with the system C compiler
(``$CC``, else ``cc``, ``gcc`` or ``clang``) into the cache folder
(:func:`mfac._paths.cache_dir`) and loaded with ctypes; there is no Python extension module
and no dependency beyond the compiler. Threads are Python threads over disjoint column
(``G^T c``) or row (``G @ x``) ranges; ctypes releases the GIL. When no compiler is present,
the build fails, or ``MFAC_NO_COMPILE=1``, :func:`library` returns None:
:mod:`mfac.operators.kernels` uses its other paths, and the static build its batched
torch/LAPACK path.
"""

from __future__ import annotations

import ctypes
import logging
from concurrent.futures import ThreadPoolExecutor

import torch

from . import cbuild

log = logging.getLogger(__name__)

#: The C file of this library (in cbuild.CSRC).
SOURCE_FILE = "lowp.c"

#: Compiler flag sets tried in order (the first that builds wins).
_FLAG_SETS = (
    ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math"],
    ["-O3", "-fno-math-errno", "-fno-trapping-math"],
)

#: Columns (G^T c) or rows (G @ x) per thread task, below which the work is not split.
_MIN_COLUMNS = 65536
_MIN_ROWS = 4

_state: dict[str, object] = {}


_compiler = cbuild.find_compiler


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first use; None when it cannot be had."""
    return cbuild.cached_library(
        _state, "native low-precision kernel", lambda: _compiler(), _load, log
    )


def _load(compiler: str) -> ctypes.CDLL:
    lib = cbuild.load(SOURCE_FILE, _FLAG_SETS, "lowp", compiler)
    args = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4
    for name in (
        "mfac_cols_dot_bf16",
        "mfac_cols_dot_f16",
        "mfac_rows_dot_bf16",
        "mfac_rows_dot_f16",
    ):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    lib.mfac_has_f16.restype = ctypes.c_int
    gram = [ctypes.c_void_p] + [ctypes.c_int64] * 5 + [ctypes.c_double, ctypes.c_void_p]
    for name in ("mfac_direct_gram_f32", "mfac_direct_gram_f64"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = gram, ctypes.c_int
    woodbury = [ctypes.c_void_p] + [ctypes.c_int64] * 5 + [ctypes.c_void_p]
    for name in ("mfac_woodbury_gram_f32", "mfac_woodbury_gram_f64"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = woodbury, ctypes.c_int
    for name in ("mfac_woodbury_solve_f32", "mfac_woodbury_solve_f64"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = woodbury, ctypes.c_int
    factor = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_double, ctypes.c_void_p]
    for fn in (lib.mfac_woodbury_factor, lib.mfac_direct_invert):
        fn.argtypes, fn.restype = factor, ctypes.c_int
    lib.mfac_vector_width.restype = ctypes.c_int
    return lib


def supports(g: torch.Tensor) -> bool:
    """Whether the native kernels can take ``g``: a contiguous CPU bfloat16/float16 matrix."""
    if g.device.type != "cpu" or g.dim() != 2 or not g.is_contiguous():
        return False
    if g.dtype == torch.bfloat16:
        return library() is not None
    if g.dtype == torch.float16:
        lib = library()
        return lib is not None and bool(lib.mfac_has_f16())
    return False


def _pool(threads: int) -> ThreadPoolExecutor:
    """The worker threads, made again in a forked child (whose copy has no live threads)."""
    return cbuild.worker_pool(_state, threads, "mfac-kernel")


_split = cbuild.split_range


def _run(fn, g: torch.Tensor, v: torch.Tensor, out: torch.Tensor, n: int, grain: int) -> None:
    m, d = g.shape
    ranges = _split(n, torch.get_num_threads(), grain)
    args = (g.data_ptr(), v.data_ptr(), out.data_ptr(), m, d)
    if len(ranges) == 1:
        fn(*args, *ranges[0])
        return
    futures = [_pool(len(ranges)).submit(fn, *args, a, b) for a, b in ranges]
    for future in futures:
        future.result()


def _check(g: torch.Tensor, v: torch.Tensor, size: int) -> None:
    """The C code trusts its sizes: refuse anything else before it runs."""
    if not supports(g) or v.device.type != "cpu" or v.numel() != size:
        raise ValueError(
            "native kernel: needs a contiguous CPU bfloat16/float16 (m, d) matrix and a CPU "
            f"vector of {size} entries, got {tuple(g.shape)} {g.dtype} on {g.device} and "
            f"{v.numel()} entries on {v.device}"
        )


def cols_dot(g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """G^T c for a contiguous CPU bfloat16/float16 G (m, d) and c (m,): float32 (d,)."""
    _check(g, c, g.shape[0])
    lib = library()
    fn = lib.mfac_cols_dot_bf16 if g.dtype == torch.bfloat16 else lib.mfac_cols_dot_f16
    c = c.to(torch.float32).contiguous()
    out = torch.empty(g.shape[1], dtype=torch.float32)
    _run(fn, g, c, out, g.shape[1], _MIN_COLUMNS)
    return out


def rows_dot(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """G x for a contiguous CPU bfloat16/float16 G (m, d) and x (d,): float32 (m,)."""
    _check(g, x, g.shape[1])
    lib = library()
    fn = lib.mfac_rows_dot_bf16 if g.dtype == torch.bfloat16 else lib.mfac_rows_dot_f16
    x = x.to(torch.float32).contiguous()
    out = torch.empty(g.shape[0], dtype=torch.float32)
    _run(fn, g, x, out, g.shape[0], _MIN_ROWS)
    return out


# ---------------------------------------------------------------------- direct-form blocks
def supports_build(buffer: torch.Tensor) -> bool:
    """Whether the C direct-form build can read ``buffer``: a contiguous CPU float32/float64
    m x d matrix (other dtypes and devices take the batched torch path)."""
    return (
        buffer.device.type == "cpu"
        and buffer.dim() == 2
        and buffer.is_contiguous()
        and buffer.dtype in (torch.float32, torch.float64)
        and library() is not None
    )


def _blocks_in_parallel(fn, nblocks: int, head: tuple, tail: tuple) -> None:
    """``fn(*head, b_begin, b_end, *tail)`` over disjoint block ranges, one per torch thread;
    a C-side allocation failure (return value -1) becomes a MemoryError."""
    ranges = _split(nblocks, torch.get_num_threads(), 1)
    if len(ranges) == 1:
        codes = [fn(*head, *ranges[0], *tail)]
    else:
        pool = _pool(len(ranges))
        codes = [f.result() for f in [pool.submit(fn, *head, a, b, *tail) for a, b in ranges]]
    if any(code != 0 for code in codes):
        raise MemoryError("the static build could not allocate its float64 scratch (a panel)")


def _check_store(store: torch.Tensor, nblocks: int, size: int) -> None:
    """The C code trusts its sizes: refuse anything else before it runs."""
    if (
        store.device.type != "cpu"
        or store.dtype != torch.float64
        or tuple(store.shape) != (nblocks, size, size)
        or not store.is_contiguous()
    ):
        raise ValueError(
            f"native direct build: needs a contiguous CPU float64 ({nblocks}, {size}, {size}) "
            f"store, got {tuple(store.shape)} {store.dtype} on {store.device}"
        )


def _columns(buffer: torch.Tensor, start: int, width: int, what: str) -> int:
    """The address of column ``start`` of ``buffer`` (m x d), after checking that the C build
    can take it and that columns [start, start + width) exist (the C code trusts its sizes)."""
    d = buffer.shape[-1]
    if not supports_build(buffer) or start < 0 or start + width > d:
        raise ValueError(
            f"{what}: needs a contiguous CPU float32/float64 buffer holding "
            f"columns {start}..{start + width - 1}, got {tuple(buffer.shape)} "
            f"{buffer.dtype} on {buffer.device}"
        )
    return buffer.data_ptr() + start * buffer.element_size()


def _over_column_blocks(
    kernel: str,
    buffer: torch.Tensor,
    start: int,
    size: int,
    store: torch.Tensor,
    square: int,
    what: str,
    head: tuple = (),
) -> None:
    """Run ``kernel`` (its _f32 or _f64 variant, by the buffer's dtype) on every block of
    ``size`` columns from column ``start`` of ``buffer`` (m x d) and its ``square`` x
    ``square`` float64 matrix in ``store``, the blocks split over the worker threads; the
    kernel takes (columns, d, m, size, *head, store)."""
    nblocks = store.shape[0]
    m, d = buffer.shape
    ptr = _columns(buffer, start, nblocks * size, what)
    _check_store(store, nblocks, square)
    suffix = "f32" if buffer.dtype == torch.float32 else "f64"
    fn = getattr(library(), f"{kernel}_{suffix}")
    _blocks_in_parallel(fn, nblocks, (ptr, d, m, size), (*head, store.data_ptr()))


def direct_gram(buffer: torch.Tensor, start: int, size: int, store: torch.Tensor) -> None:
    """store[b] = G_b^T G_b / m in float64 for the blocks of ``size`` columns from column
    ``start`` of ``buffer`` (m x d, float32/float64); only the upper triangle (j >= i) of each
    block is written in full, which is what :func:`direct_invert` reads.

    Each block's columns are widened into a float64 m x B panel that stays in cache, and the
    Gram is formed from it by a register-blocked kernel over the upper triangle only (half the
    flops of a general product)."""
    _over_column_blocks(
        "mfac_direct_gram", buffer, start, size, store, size, "native direct build",
        (1.0 / buffer.shape[0],),
    )  # fmt: skip


def woodbury_gram(buffer: torch.Tensor, start: int, size: int, store: torch.Tensor) -> None:
    """store[b] = G_b G_b^T (m x m, float64, full symmetric) for the blocks of ``size`` columns
    from column ``start`` of ``buffer`` (m x d, float32/float64).

    Column tiles of each block are packed transposed into a float64 panel of at most 256 KiB
    and their Grams (one triangle, the direct form's kernel) are summed into the block's m x m
    result; meant for m up to a few hundred, where that result stays in cache."""
    _over_column_blocks(
        "mfac_woodbury_gram", buffer, start, size, store, buffer.shape[0], "native Woodbury Gram"
    )


def _factor_blocks(kernel: str, store: torch.Tensor, damp: float, what: str) -> torch.Tensor:
    """Run the in-place factor ``kernel`` on every square float64 block of ``store`` (damping
    ``damp`` added to the diagonal), the blocks split over the worker threads; return the
    (nblocks, size) float64 pivots it reports."""
    nblocks, size = store.shape[0], store.shape[-1]
    _check_store(store, nblocks, size)
    pivots = torch.empty(nblocks, size, dtype=torch.float64)
    lib = library()
    if lib is None:
        raise ValueError(f"{what}: no compiled library")
    _blocks_in_parallel(
        getattr(lib, kernel), nblocks, (store.data_ptr(), size), (float(damp), pivots.data_ptr())
    )
    return pivots


def woodbury_factor(store: torch.Tensor, damp: float) -> torch.Tensor:
    """Replace every block K_b of ``store`` (m x m, upper triangle read) by the upper factor U
    of K_b + damp*I = U^T U (in its upper triangle) and return the (nblocks, m) pivots, as
    :func:`direct_invert` does."""
    return _factor_blocks("mfac_woodbury_factor", store, damp, "native Woodbury factor")


def woodbury_solve(buffer: torch.Tensor, start: int, size: int, upper: torch.Tensor) -> None:
    """Overwrite the blocks of ``size`` columns from column ``start`` of ``buffer`` (m x d,
    float32/float64) by Q_b = U_b^-T G_b, with the factors of :func:`woodbury_factor`; each
    column tile is solved in float64 in cache and written back once."""
    _over_column_blocks(
        "mfac_woodbury_solve", buffer, start, size, upper, buffer.shape[0], "native Woodbury solve"
    )


def direct_invert(store: torch.Tensor, damp: float) -> torch.Tensor:
    """Replace every block A_b of ``store`` (upper triangle read) by (A_b + damp*I)^-1 in
    place (full symmetric result), and return the (nblocks, B) float64 pivots: the squares of
    the Cholesky factor's diagonal. A pivot that is not a positive finite number means the
    block is not positive definite in float64; its inverse is then meaningless.

    The same steps as LAPACK's potrf + potri (Cholesky A = U^T U, V = U^-1, A^-1 = V V^T;
    B^3 flops per block, errors of the same size), blocked eight rows at a time with
    vectorised inner loops, each block's matrices staying in cache."""
    return _factor_blocks("mfac_direct_invert", store, damp, "native direct build")
