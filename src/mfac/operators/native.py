"""A small C kernel for the two passes over a bfloat16/float16 window on the CPU.

Each 16-bit entry is widened to float32 in registers (bfloat16 by a 16-bit shift, float16 by
the compiler's half-precision conversion) and accumulated in float32, so the window is read
once at half the bytes of float32:

* ``G^T c`` walks column tiles of 65536 columns: four rows at a time add into a float32 tile
  of the result (256 KiB, in L2), which is written once; long tiles keep each row's stream
  long enough for the hardware prefetcher (4096-column tiles were 1.5x slower in one run);
* ``G @ x`` walks column tiles of x that stay in L2, four rows at a time, with sixteen float32
  partial sums per row and the rows prefetched ahead.

The C source is built once per machine with the system C compiler (``$CC``, else ``cc``,
``gcc`` or ``clang``) into the cache folder (:func:`mfac._paths.cache_dir`) and loaded with
ctypes; there is no Python extension module and no dependency beyond the compiler. Threads are
Python threads over disjoint column (``G^T c``) or row (``G @ x``) ranges; ctypes releases the
GIL. When no compiler is present, the build fails, or ``MFAC_NO_COMPILE=1``, :func:`library`
returns None and :mod:`mfac.operators.kernels` uses its other paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .._paths import atomic_file, cache_dir

log = logging.getLogger(__name__)

SOURCE = r"""
#include <stdint.h>
#include <string.h>

#define COL_TILE 65536
#define ROW_TILE 16384
#define LANES 16

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#if defined(__FLT16_MAX__)
static inline float from_f16(uint16_t h) {
    _Float16 v;
    memcpy(&v, &h, sizeof v);
    return (float)v;
}
int mfac_has_f16(void) { return 1; }
#else
static inline float from_f16(uint16_t h) { (void)h; return 0.0f; }
int mfac_has_f16(void) { return 0; }
#endif

/* out[j] = sum_i c[i] * g[i, j] for columns j in [j_begin, j_end); g is m x d row-major. */
#define COLS_DOT(NAME, CONV)                                                                   \
void NAME(const uint16_t *g, const float *c, float *out, int64_t m, int64_t d,              \
          int64_t j_begin, int64_t j_end) {                                                  \
    float acc[COL_TILE];                                                                     \
    for (int64_t j0 = j_begin; j0 < j_end; j0 += COL_TILE) {                                 \
        int64_t w = j_end - j0 < COL_TILE ? j_end - j0 : COL_TILE;                           \
        for (int64_t j = 0; j < w; ++j) acc[j] = 0.0f;                                       \
        int64_t i = 0;                                                                       \
        for (; i + 4 <= m; i += 4) {                                                         \
            const uint16_t *r0 = g + i * d + j0, *r1 = r0 + d, *r2 = r1 + d, *r3 = r2 + d;   \
            const float c0 = c[i], c1 = c[i + 1], c2 = c[i + 2], c3 = c[i + 3];              \
            for (int64_t j = 0; j < w; ++j)                                                  \
                acc[j] += c0 * CONV(r0[j]) + c1 * CONV(r1[j])                                \
                        + c2 * CONV(r2[j]) + c3 * CONV(r3[j]);                               \
        }                                                                                    \
        for (; i < m; ++i) {                                                                 \
            const uint16_t *r0 = g + i * d + j0;                                             \
            const float c0 = c[i];                                                           \
            for (int64_t j = 0; j < w; ++j) acc[j] += c0 * CONV(r0[j]);                      \
        }                                                                                    \
        memcpy(out + j0, acc, (size_t)w * sizeof(float));                                    \
    }                                                                                        \
}

/* out[i] = sum_j g[i, j] * x[j] for rows i in [i_begin, i_end). */
#define ROWS_DOT(NAME, CONV)                                                                   \
void NAME(const uint16_t *g, const float *x, float *out, int64_t m, int64_t d,              \
          int64_t i_begin, int64_t i_end) {                                                  \
    (void)m;                                                                                 \
    for (int64_t i = i_begin; i < i_end; ++i) out[i] = 0.0f;                                 \
    for (int64_t j0 = 0; j0 < d; j0 += ROW_TILE) {                                           \
        int64_t w = d - j0 < ROW_TILE ? d - j0 : ROW_TILE;                                   \
        int64_t body = w - w % LANES;                                                        \
        const float *xt = x + j0;                                                            \
        int64_t i = i_begin;                                                                 \
        for (; i + 4 <= i_end; i += 4) {                                                     \
            const uint16_t *r0 = g + i * d + j0, *r1 = r0 + d, *r2 = r1 + d, *r3 = r2 + d;   \
            float s0[LANES] = {0}, s1[LANES] = {0}, s2[LANES] = {0}, s3[LANES] = {0};       \
            for (int64_t j = 0; j < body; j += LANES)                                        \
                for (int l = 0; l < LANES; ++l) {                                            \
                    const float xv = xt[j + l];                                              \
                    s0[l] += CONV(r0[j + l]) * xv;                                           \
                    s1[l] += CONV(r1[j + l]) * xv;                                           \
                    s2[l] += CONV(r2[j + l]) * xv;                                           \
                    s3[l] += CONV(r3[j + l]) * xv;                                           \
                }                                                                            \
            float t0 = 0.0f, t1 = 0.0f, t2 = 0.0f, t3 = 0.0f;                                \
            for (int l = 0; l < LANES; ++l) {                                                \
                t0 += s0[l]; t1 += s1[l]; t2 += s2[l]; t3 += s3[l];                          \
            }                                                                                \
            for (int64_t j = body; j < w; ++j) {                                             \
                const float xv = xt[j];                                                      \
                t0 += CONV(r0[j]) * xv; t1 += CONV(r1[j]) * xv;                              \
                t2 += CONV(r2[j]) * xv; t3 += CONV(r3[j]) * xv;                              \
            }                                                                                \
            out[i] += t0; out[i + 1] += t1; out[i + 2] += t2; out[i + 3] += t3;              \
        }                                                                                    \
        for (; i < i_end; ++i) {                                                             \
            const uint16_t *r0 = g + i * d + j0;                                             \
            float s0[LANES] = {0};                                                           \
            for (int64_t j = 0; j < body; j += LANES)                                        \
                for (int l = 0; l < LANES; ++l) s0[l] += CONV(r0[j + l]) * xt[j + l];        \
            float t0 = 0.0f;                                                                 \
            for (int l = 0; l < LANES; ++l) t0 += s0[l];                                     \
            for (int64_t j = body; j < w; ++j) t0 += CONV(r0[j]) * xt[j];                    \
            out[i] += t0;                                                                    \
        }                                                                                    \
    }                                                                                        \
}

#if defined(__AVX512F__)
#include <immintrin.h>
/* Sixteen 16-bit entries widened to float32 in registers. */
static inline __m512 load16_bf16(const uint16_t *p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
static inline __m512 load16_f16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

#define ROWS_DOT_AVX512(NAME, LOAD, CONV)                                                      \
void NAME(const uint16_t *g, const float *x, float *out, int64_t m, int64_t d,              \
          int64_t i_begin, int64_t i_end) {                                                  \
    (void)m;                                                                                 \
    for (int64_t i = i_begin; i < i_end; ++i) out[i] = 0.0f;                                 \
    for (int64_t j0 = 0; j0 < d; j0 += ROW_TILE) {                                           \
        int64_t w = d - j0 < ROW_TILE ? d - j0 : ROW_TILE;                                   \
        int64_t body = w - w % 16;                                                           \
        const float *xt = x + j0;                                                            \
        int64_t i = i_begin;                                                                 \
        for (; i + 4 <= i_end; i += 4) {                                                     \
            const uint16_t *r0 = g + i * d + j0, *r1 = r0 + d, *r2 = r1 + d, *r3 = r2 + d;   \
            __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;                      \
            for (int64_t j = 0; j < body; j += 16) {                                         \
                const __m512 xv = _mm512_loadu_ps(xt + j);                                   \
                _mm_prefetch((const char *)(r0 + j + 256), _MM_HINT_T0);\
                _mm_prefetch((const char *)(r1 + j + 256), _MM_HINT_T0);\
                _mm_prefetch((const char *)(r2 + j + 256), _MM_HINT_T0);\
                _mm_prefetch((const char *)(r3 + j + 256), _MM_HINT_T0);\
                s0 = _mm512_fmadd_ps(LOAD(r0 + j), xv, s0);                                  \
                s1 = _mm512_fmadd_ps(LOAD(r1 + j), xv, s1);                                  \
                s2 = _mm512_fmadd_ps(LOAD(r2 + j), xv, s2);                                  \
                s3 = _mm512_fmadd_ps(LOAD(r3 + j), xv, s3);                                  \
            }                                                                                \
            float t0 = _mm512_reduce_add_ps(s0), t1 = _mm512_reduce_add_ps(s1);              \
            float t2 = _mm512_reduce_add_ps(s2), t3 = _mm512_reduce_add_ps(s3);              \
            for (int64_t j = body; j < w; ++j) {                                             \
                const float xv = xt[j];                                                      \
                t0 += CONV(r0[j]) * xv; t1 += CONV(r1[j]) * xv;                              \
                t2 += CONV(r2[j]) * xv; t3 += CONV(r3[j]) * xv;                              \
            }                                                                                \
            out[i] += t0; out[i + 1] += t1; out[i + 2] += t2; out[i + 3] += t3;              \
        }                                                                                    \
        for (; i < i_end; ++i) {                                                             \
            const uint16_t *r0 = g + i * d + j0;                                             \
            __m512 s0 = _mm512_setzero_ps();                                                 \
            for (int64_t j = 0; j < body; j += 16)                                           \
                s0 = _mm512_fmadd_ps(LOAD(r0 + j), _mm512_loadu_ps(xt + j), s0);             \
            float t0 = _mm512_reduce_add_ps(s0);                                             \
            for (int64_t j = body; j < w; ++j) t0 += CONV(r0[j]) * xt[j];                    \
            out[i] += t0;                                                                    \
        }                                                                                    \
    }                                                                                        \
}

ROWS_DOT_AVX512(mfac_rows_dot_bf16, load16_bf16, from_bf16)
ROWS_DOT_AVX512(mfac_rows_dot_f16, load16_f16, from_f16)
int mfac_vector_width(void) { return 512; }
#else
ROWS_DOT(mfac_rows_dot_bf16, from_bf16)
ROWS_DOT(mfac_rows_dot_f16, from_f16)
int mfac_vector_width(void) { return 0; }
#endif

/* Plain C: the compiler's vectorisation of this loop beat AVX-512 intrinsics in one run. */
COLS_DOT(mfac_cols_dot_bf16, from_bf16)
COLS_DOT(mfac_cols_dot_f16, from_f16)
"""

#: Compiler flag sets tried in order (the first that builds wins).
_FLAG_SETS = (
    ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math"],
    ["-O3", "-fno-math-errno", "-fno-trapping-math"],
)

#: Columns (G^T c) or rows (G @ x) per thread task, below which the work is not split.
_MIN_COLUMNS = 65536
_MIN_ROWS = 4

_state: dict[str, object] = {}


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """What the built code depends on: the instruction set (``-march=native``)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def _build(compiler: str, target: Path) -> None:
    """Compile SOURCE into the shared library ``target`` (written atomically), trying each
    flag set in turn; raise with the compiler's messages when none builds."""
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = Path(tmp) / "mfac_lowp.c", Path(tmp) / "mfac_lowp.so"
        src.write_text(SOURCE)
        for flags in _FLAG_SETS:
            cmd = [compiler, *flags, "-fPIC", "-shared", str(src), "-o", str(lib)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                with atomic_file(target) as out:
                    shutil.copyfile(lib, out)
                return
            errors.append(done.stderr.strip()[-300:])
    raise RuntimeError("the C compiler failed: " + " | ".join(errors))


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first use; None when it cannot be had."""
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    lib = None
    if os.environ.get("MFAC_NO_COMPILE") != "1" and sys.platform != "win32":
        compiler = _compiler()
        if compiler is not None:
            try:
                lib = _load(compiler)
            except Exception as exc:  # no working compiler, or the library does not load
                log.warning("native low-precision kernel unavailable (%s)", exc)
                lib = None
    _state["lib"] = lib
    return lib


def _load(compiler: str) -> ctypes.CDLL:
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    key = hashlib.sha256(
        "\n".join([SOURCE, compiler, version, repr(_FLAG_SETS), _cpu_signature()]).encode()
    ).hexdigest()[:20]
    target = cache_dir() / "kernels" / f"lowp-{key}.so"
    if not target.exists():
        _build(compiler, target)
    lib = ctypes.CDLL(str(target))
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
    pool = _state.get("pool")
    size = getattr(pool, "_max_workers", 0)
    if pool is None or _state.get("pid") != os.getpid() or size < threads:
        if pool is not None and _state.get("pid") == os.getpid():
            pool.shutdown(wait=False)  # type: ignore[attr-defined]
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mfac-kernel")
        _state["pool"], _state["pid"] = pool, os.getpid()
    return pool  # type: ignore[return-value]


def _split(n: int, parts: int, grain: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, n // grain))
    edges = [n * p // parts for p in range(parts + 1)]
    if grain > 1:  # keep the inner boundaries on multiples of the grain
        edges = [edges[0]] + [e - e % grain for e in edges[1:-1]] + [edges[-1]]
    return [(a, b) for a, b in itertools.pairwise(edges) if b > a]


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
