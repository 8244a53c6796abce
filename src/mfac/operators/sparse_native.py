"""C kernels for the top-k window's selection on the CPU (the sweeps over the rows are in
:mod:`mfac.operators.tiled`).

The selection pass forms a = e + g (streaming stores with AVX-512), flags NaN/Inf, and lists
the coordinates with |a| >= t together with their a in one sweep, so the kept values need no
later gather from a; :func:`keep_largest` picks the k largest of those candidates by a radix
select, and :func:`sub_at` leaves e = a - c. Threads take disjoint parts of the vector. The
source is built once per machine with the system C compiler into the cache folder and loaded
with ctypes; without a compiler, or with ``MFAC_NO_COMPILE=1``, :func:`library` returns None
and the window uses its torch path.
"""

from __future__ import annotations

import ctypes
import logging
import math
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

from . import cbuild

log = logging.getLogger(__name__)

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* The coordinates (plus base) with lo <= |a| <= hi, a over [0, n): the first cap of them go to
   cand (cap may be 0, to count only); the count is returned. */
int64_t mfac_sp_list(const float *a, int64_t n, float lo, float hi, int64_t base, int64_t *cand,
                     int64_t cap) {
    int64_t c = 0;
    for (int64_t i0 = 0; i0 < n; i0 += 64) {
        int64_t i1 = i0 + 64 < n ? i0 + 64 : n, hit = 0;
        for (int64_t i = i0; i < i1; ++i) {
            float v = a[i] < 0.0f ? -a[i] : a[i];
            hit += (v >= lo) & (v <= hi);
        }
        if (!hit) continue;
        if (c >= cap) { c += hit; continue; }
        for (int64_t i = i0; i < i1; ++i) {
            float v = a[i] < 0.0f ? -a[i] : a[i];
            if (v >= lo && v <= hi) {
                if (c < cap) cand[c] = base + i;
                ++c;
            }
        }
    }
    return c;
}

/* a = e + g over [0, n); the coordinates (plus base) with |a| >= t go to cand and, when cval
   is not NULL, their a to cval (the first cap of them; the count is returned); *bad is set
   when some a is NaN or +-Inf. With AVX-512, 16 at a time: a is written with streaming stores
   where it is 64-byte aligned (no read of a's old lines), the hits of a block are packed in
   registers and stored whole. */
int64_t mfac_sp_select(const float *e, const float *g, float *a, int64_t n, float t,
                       int64_t base, int64_t *cand, float *cval, int64_t cap, int32_t *bad) {
    int64_t c = 0, i = 0;
    int nonfinite = 0;
#if defined(__AVX512F__)
    for (; i < n && ((uintptr_t)(a + i) & 63); ++i) {
        float v = e[i] + g[i];
        a[i] = v;
        nonfinite |= !(v - v == 0.0f);
        if (v >= t || v <= -t) {
            if (c < cap) { cand[c] = base + i; if (cval) cval[c] = v; }
            ++c;
        }
    }
    {
        const __m512 tv = _mm512_set1_ps(t);
        const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
        __m512 zero = _mm512_setzero_ps(); /* v - v summed: NaN once any v is NaN or Inf */
        for (; i + 16 <= n; i += 16) {
            __m512 v = _mm512_add_ps(_mm512_loadu_ps(e + i), _mm512_loadu_ps(g + i));
            _mm512_stream_ps(a + i, v);
            zero = _mm512_add_ps(zero, _mm512_sub_ps(v, v));
            __mmask16 hit = _mm512_cmp_ps_mask(_mm512_abs_ps(v), tv, _CMP_GE_OQ);
            if (!hit) continue;
            int nh = __builtin_popcount(hit);
            if (c + 16 <= cap) {
                __m512i at = _mm512_add_epi64(_mm512_set1_epi64(base + i), lane);
                __mmask8 lo = (__mmask8)(hit & 0xFF), hi = (__mmask8)(hit >> 8);
                _mm512_storeu_si512(cand + c, _mm512_maskz_compress_epi64(lo, at));
                _mm512_storeu_si512(cand + c + __builtin_popcount(lo),
                                    _mm512_maskz_compress_epi64(
                                        hi, _mm512_add_epi64(at, _mm512_set1_epi64(8))));
                if (cval) _mm512_storeu_ps(cval + c, _mm512_maskz_compress_ps(hit, v));
            } else {
                float tmp[16];
                _mm512_storeu_ps(tmp, v);
                for (int l = 0; l < 16; ++l)
                    if ((hit >> l) & 1) {
                        if (c + 0 < cap) { cand[c] = base + i + l; if (cval) cval[c] = tmp[l]; }
                        ++c;
                    }
                continue;
            }
            c += nh;
        }
        _mm_sfence();
        nonfinite |= _mm512_cmp_ps_mask(zero, zero, _CMP_UNORD_Q) != 0;
    }
#endif
    for (int64_t i0 = i; i0 < n; i0 += 64) {
        int64_t i1 = i0 + 64 < n ? i0 + 64 : n;
        int hit = 0, nf = 0;
        for (int64_t j = i0; j < i1; ++j) {
            float v = e[j] + g[j];
            a[j] = v;
            hit |= (v >= t) | (v <= -t);
            nf |= !(v - v == 0.0f);
        }
        nonfinite |= nf;
        if (hit)
            for (int64_t j = i0; j < i1; ++j)
                if (a[j] >= t || a[j] <= -t) {
                    if (c < cap) { cand[c] = base + j; if (cval) cval[c] = a[j]; }
                    ++c;
                }
    }
    *bad = nonfinite;
    return c;
}

/* Of n candidates (ascending coordinates cand, values cval), the k of largest |cval| into
   (idx, val), in ascending order; ties at the k-th magnitude keep the lowest coordinates.
   The k-th magnitude comes from a two-pass radix select on the bit patterns of |cval| (for
   non-negative floats ordered like their values). Returns 1 without memory, else 0. */
int mfac_sp_keep_largest(const int64_t *cand, const float *cval, int64_t n, int64_t k,
                         int64_t *idx, float *val) {
    uint32_t *hist = calloc(65536, sizeof(uint32_t));
    if (!hist) return 1;
    if (k >= n) {
        memcpy(idx, cand, (size_t)n * sizeof(int64_t));
        memcpy(val, cval, (size_t)n * sizeof(float));
        free(hist);
        return 0;
    }
    for (int64_t i = 0; i < n; ++i) {
        uint32_t b; memcpy(&b, cval + i, 4);
        ++hist[(b & 0x7FFFFFFFu) >> 16];
    }
    int64_t above = 0, hi = 65535;
    for (; hi > 0 && above + hist[hi] < k; --hi) above += hist[hi];
    memset(hist, 0, 65536 * sizeof(uint32_t));
    for (int64_t i = 0; i < n; ++i) {
        uint32_t b; memcpy(&b, cval + i, 4);
        b &= 0x7FFFFFFFu;
        if ((int64_t)(b >> 16) == hi) ++hist[b & 0xFFFFu];
    }
    int64_t lo = 65535;
    for (; lo > 0 && above + hist[lo] < k; --lo) above += hist[lo];
    uint32_t kth = ((uint32_t)hi << 16) | (uint32_t)lo;
    int64_t ties = k - above, c = 0; /* entries at kth to keep, lowest coordinates first */
    for (int64_t i = 0; i < n; ++i) {
        uint32_t b; memcpy(&b, cval + i, 4);
        b &= 0x7FFFFFFFu;
        if (b > kth || (b == kth && ties-- > 0)) { idx[c] = cand[i]; val[c] = cval[i]; ++c; }
    }
    free(hist);
    return 0;
}

/* a[idx[q]] -= v[q] for q in [0, n) (the error feedback's e = a - c at the kept coordinates). */
void mfac_sp_sub_at(float *a, const int64_t *idx, const float *v, int64_t n) {
    for (int64_t q = 0; q < n; ++q) {
        if (q + 16 < n) __builtin_prefetch(a + idx[q + 16], 1, 3);
        a[idx[q]] -= v[q];
    }
}
"""

#: Compiler flag sets tried in order (the first that builds wins).
_FLAG_SETS = (
    ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math"],
    ["-O3", "-fno-math-errno", "-fno-trapping-math"],
)

_state: dict[str, object] = {}


_compiler = cbuild.find_compiler


def _load(
    compiler: str, flag_sets: tuple[list[str], ...] = _FLAG_SETS, stem: str = "sparse"
) -> ctypes.CDLL:
    """The kernel library built with the first of ``flag_sets`` that compiles (tests build a
    portable one too, without the host's vector extensions), with its argument types set."""
    lib = cbuild.load(SOURCE, flag_sets, stem, compiler)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.mfac_sp_select.argtypes = [p, p, p, i64, ctypes.c_float, i64, p, p, i64, p]
    lib.mfac_sp_select.restype = i64
    lib.mfac_sp_list.argtypes = [p, i64, ctypes.c_float, ctypes.c_float, i64, p, i64]
    lib.mfac_sp_list.restype = i64
    lib.mfac_sp_keep_largest.argtypes = [p, p, i64, i64, p, p]
    lib.mfac_sp_keep_largest.restype = ctypes.c_int
    lib.mfac_sp_sub_at.argtypes = [p, p, p, i64]
    lib.mfac_sp_sub_at.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first use; None when it cannot be had."""
    return cbuild.cached_library(_state, "native top-k kernels", lambda: _compiler(), _load, log)


#: Huge-page size on x86-64 and arm64 Linux; buffers of at least HUGE_MIN bytes are aligned
#: to it and advised to use huge pages.
HUGE_PAGE = 2 * 2**20
HUGE_MIN = 8 * HUGE_PAGE
_MADV_HUGEPAGE = 14


def _madvise():
    fn = _state.get("madvise", False)
    if fn is False:
        fn = None
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fn = libc.madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
            except (OSError, AttributeError):
                fn = None
        _state["madvise"] = fn
    return fn


def empty_huge(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised CPU tensor whose memory the kernel is asked to back with huge pages
    (Linux ``madvise(MADV_HUGEPAGE)``, before any page is touched), aligned to 2 MiB.

    The window's sweeps touch a new 4 KiB page every few hundred entries; with huge pages the
    address translations stay cached (a page walk under virtualisation costs about as much as
    reading a page). Elsewhere, or for small buffers, a plain ``torch.empty``."""
    numel = math.prod(shape)
    size = torch.empty((), dtype=dtype).element_size()
    advise = _madvise() if device.type == "cpu" else None
    if advise is None or numel * size < HUGE_MIN or HUGE_PAGE % size:
        return torch.empty(shape, dtype=dtype, device=device)
    pad = HUGE_PAGE // size
    raw = torch.empty(numel + pad, dtype=dtype)
    start = (-raw.data_ptr() % HUGE_PAGE) // size
    # the aligned part as a tensor of its own (not a view: no base keeps a second reference)
    out = torch.empty(0, dtype=dtype).set_(raw.untyped_storage(), start, shape)
    del raw
    advise(out.data_ptr(), (numel * size) // HUGE_PAGE * HUGE_PAGE, _MADV_HUGEPAGE)
    return out


def _pool(threads: int) -> ThreadPoolExecutor:
    """The worker threads, made again in a forked child (whose copy has no live threads)."""
    return cbuild.worker_pool(_state, threads, "mfac-topk")


_split = cbuild.split_range


def select_values(
    error: torch.Tensor,
    grad: torch.Tensor,
    acc: torch.Tensor,
    threshold: float,
    cap: int,
    values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, int, bool]:
    """acc = error + grad (float32, contiguous), and the ascending coordinates with
    |acc| >= threshold with acc there (float32; None when ``values`` is False), read in the
    same pass instead of gathered from acc afterwards: (the first ``cap`` coordinates, their
    acc, the total count, whether acc holds a NaN or Inf)."""
    n = acc.numel()
    parts = _split(n, torch.get_num_threads(), 1 << 20)
    bufs = [torch.empty(cap, dtype=torch.int64) for _ in parts]
    vbufs = [torch.empty(cap if values else 0, dtype=torch.float32) for _ in parts]
    bads = torch.zeros(len(parts), dtype=torch.int32)
    counts = [0] * len(parts)
    lib = library()

    def one(p: int) -> None:
        a, b = parts[p]
        counts[p] = lib.mfac_sp_select(
            error.data_ptr() + 4 * a, grad.data_ptr() + 4 * a, acc.data_ptr() + 4 * a, b - a,
            threshold, a, bufs[p].data_ptr(), vbufs[p].data_ptr() if values else None, cap,
            bads.data_ptr() + 4 * p,
        )  # fmt: skip

    if len(parts) == 1:
        one(0)
    else:
        for f in [_pool(len(parts)).submit(one, p) for p in range(len(parts))]:
            f.result()
    total = sum(counts)
    if len(parts) == 1:
        cand, cval = bufs[0][: min(cap, total)], vbufs[0][: min(cap, total)]
    else:
        pairs = list(zip(bufs, vbufs, counts, strict=True))
        cand = torch.cat([b[: min(cap, c)] for b, _, c in pairs])[:cap]
        cval = torch.cat([v[: min(cap, c)] for _, v, c in pairs])[:cap] if values else None
    return cand, (cval if values else None), total, bool(bads.any())


def keep_largest(
    cand: torch.Tensor, cval: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Of the candidates (ascending int64 coordinates ``cand``, float32 values ``cval``), the
    k of largest magnitude, in ascending order (ties at the k-th magnitude: the lowest
    coordinates), with their values: a radix select in C, no sort."""
    n = cand.numel()
    idx = torch.empty(min(k, n), dtype=torch.int64)
    val = torch.empty(min(k, n), dtype=torch.float32)
    cand, cval = cand.contiguous(), cval.contiguous()
    if library().mfac_sp_keep_largest(
        cand.data_ptr(), cval.data_ptr(), n, min(k, n), idx.data_ptr(), val.data_ptr()
    ):
        raise MemoryError("native top-k kernel: could not allocate its histogram")
    return idx, val


def sub_at(a: torch.Tensor, idx: torch.Tensor, v: torch.Tensor) -> None:
    """a[idx] -= v in place, for a contiguous float32 vector, int64 coordinates (ascending
    reads best) and float32 values of the same length."""
    lib = library()
    lib.mfac_sp_sub_at(a.data_ptr(), idx.data_ptr(), v.data_ptr(), idx.numel())


def list_range(a: torch.Tensor, lo: float, hi: float, cap: int) -> tuple[torch.Tensor, int]:
    """The ascending coordinates with lo <= |a| <= hi of a contiguous float32 vector: (the
    first ``cap`` of them, their total count). ``cap = 0`` only counts (no buffer)."""
    out = torch.empty(max(cap, 0), dtype=torch.int64)
    lib = library()
    n = lib.mfac_sp_list(a.data_ptr(), a.numel(), lo, hi, 0, out.data_ptr(), max(cap, 0))
    return out[: min(cap, n)], int(n)


def kth_largest(a: torch.Tensor, k: int) -> float:
    """The k-th largest |a| of a finite contiguous float32 vector, exactly, without a copy:
    a bisection over the bit patterns of non-negative floats (ordered like their values),
    one counting pass per step (at most 32)."""
    lo, hi = 0, 0x7F800000  # count(|a| >= float(lo)) >= k; count(|a| >= float(hi)) < k
    as_float = torch.empty(1, dtype=torch.int32)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        as_float[0] = mid
        t = float(as_float.view(torch.float32)[0])
        if list_range(a, t, float("inf"), 0)[1] >= k:
            lo = mid
        else:
            hi = mid
    as_float[0] = lo
    return float(as_float.view(torch.float32)[0])


__all__ = [
    "empty_huge",
    "keep_largest",
    "kth_largest",
    "library",
    "list_range",
    "select_values",
    "sub_at",
]
