"""C kernels for the top-k window's passes on the CPU: G x, G^T c and the selection pass.

The window's rows hold sorted coordinates, so both products walk the d coordinates in tiles
(4096 to 65536 coordinates, at most 256 KiB of float32, in L2; see :func:`plan`) and, per
tile, every row's run of entries inside it (a cursor per row moves forward only; the run of
the row a few places ahead is prefetched a cache line per block of the row being summed, so the
prefetches never come in a burst). The dense vector is then touched once per tile instead
of at m k scattered places: G x reads x once and the window once; G^T c writes each tile of
the result once (zeroed in cache) and reads the window once. The selection pass forms
a = e + g (streaming stores with AVX-512), flags NaN/Inf, and lists the coordinates with
|a| >= t together with their a in one sweep, so the kept values need no later gather from a.

Accumulation order is fixed (rows in order within a tile, tiles in order), so results do
not depend on the thread count: threads take disjoint row ranges (G x) or tile ranges (G^T c).
The source is built once per machine with the system C compiler into the cache folder and
loaded with ctypes; without a compiler, or with ``MFAC_NO_COMPILE=1``, :func:`library`
returns None and the window uses its torch path.
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

#: Coordinates per tile (a multiple of 64; tile ranges of threads start on multiples of it).
TILE = 65536
#: Shortest tile (coordinates) a sweep uses.
MIN_TILE = 4096
#: Entries per row and tile the tile length aims at (16384 coordinates at 1 % density).
RUN = 160

SOURCE = cbuild.HALF_FLOATS + r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define LANES 16
#define AHEAD 4
#define PF_LOCALITY 3

static inline float cv_f32(float v) { return v; }
int mfac_sp_has_f16(void) { return MFAC_HAS_F16; }

/* Prefetch of the run of the row AHEAD places later (its n entries from q on: indices and
   values), spread over the blocks of the row being summed, one cache line of each per block
   (PF_STEP), the rest after the row (PF_REST): a burst of a whole run's prefetches at the
   row's start fills the miss buffers and stalls the sums behind it. */
#define PF_BEGIN(IR, VR, Q, N)                                                               \
    const char *pf_i = NULL, *pf_v = NULL, *pf_ie = NULL, *pf_ve = NULL;                     \
    do {                                                                                     \
        if ((N) > 0) {                                                                       \
            pf_i = (const char *)((uintptr_t)((IR) + (Q)) & ~(uintptr_t)63);                 \
            pf_v = (const char *)((uintptr_t)((VR) + (Q)) & ~(uintptr_t)63);                 \
            pf_ie = (const char *)((IR) + (Q) + (N));                                        \
            pf_ve = (const char *)((VR) + (Q) + (N));                                        \
        }                                                                                    \
    } while (0)
#define PF_STEP()                                                                            \
    do {                                                                                     \
        if (pf_i < pf_ie) { __builtin_prefetch(pf_i, 0, PF_LOCALITY); pf_i += 64; }          \
        if (pf_v < pf_ve) { __builtin_prefetch(pf_v, 0, PF_LOCALITY); pf_v += 64; }          \
    } while (0)
#define PF_REST()                                                                            \
    do {                                                                                     \
        for (; pf_i < pf_ie; pf_i += 64) __builtin_prefetch(pf_i, 0, PF_LOCALITY);           \
        for (; pf_v < pf_ve; pf_v += 64) __builtin_prefetch(pf_v, 0, PF_LOCALITY);           \
    } while (0)

/* First q in [p, k) with ir[q] >= bound (ir ascending): gallop from p, then bisect. */
#define SEEK(IT)                                                                             \
static inline int64_t seek_##IT(const IT *ir, int64_t p, int64_t k, int64_t bound) {        \
    if (p >= k || (int64_t)ir[p] >= bound) return p;                                         \
    int64_t lo = p, step = 1;                                                                \
    while (lo + step < k && (int64_t)ir[lo + step] < bound) { lo += step; step <<= 1; }      \
    int64_t hi = lo + step < k ? lo + step : k;                                              \
    while (hi - lo > 1) {                                                                    \
        int64_t mid = lo + (hi - lo) / 2;                                                    \
        if ((int64_t)ir[mid] < bound) lo = mid; else hi = mid;                               \
    }                                                                                        \
    return hi;                                                                               \
}
SEEK(int16_t)
SEEK(int32_t)

/* out[r] = sum_q v[r, q] x[i[r, q]] for rows [r0, r1). x is dense (x != NULL), or the
   sparse vector (sidx ascending, sval) of sk entries, spread per tile into a buffer. */
#define GATHER(NAME, VT, IT, CONV)                                                           \
int NAME(const VT *vals, const IT *idx, int64_t k, int64_t r0, int64_t r1, const float *x,   \
         const int64_t *sidx, const float *sval, int64_t sk, int64_t d, int64_t tile,        \
         double *out) {                                                                      \
    int64_t n = r1 - r0, sp = 0, run = k * tile / (d > 0 ? d : 1) + 16;                     \
    volatile float sink = 0.0f;                                                              \
    int64_t *cur = calloc((size_t)(n > 0 ? n : 1), sizeof(int64_t));                        \
    float *buf = x ? NULL : calloc((size_t)tile, sizeof(float));                             \
    if (!cur || (!x && !buf)) { free(cur); free(buf); return 1; }                            \
    for (int64_t r = 0; r < n; ++r) out[r0 + r] = 0.0;                                      \
    for (int64_t t0 = 0; t0 < d; t0 += tile) {                                               \
        int64_t t1 = t0 + tile < d ? t0 + tile : d, s0 = sp;                                 \
        const float *xt;                                                                     \
        if (x) {                                                                             \
            xt = x + t0;                                                                     \
            float touch = 0.0f; /* stream the tile into cache before the random reads */     \
            for (int64_t j = 0; j < t1 - t0; j += 16) touch += xt[j];                        \
            sink += touch;                                                                   \
        } else {                                                                             \
            while (sp < sk && sidx[sp] < t1) { buf[sidx[sp] - t0] = sval[sp]; ++sp; }        \
            if (sp == s0) continue;                                                          \
            xt = buf;                                                                        \
        }                                                                                    \
        for (int64_t r = 0; r < n; ++r) {                                                    \
            const IT *ir = idx + (r0 + r) * k;                                               \
            const VT *vr = vals + (r0 + r) * k;                                              \
            int64_t pr = r + AHEAD < n ? r + AHEAD : r, pc = pr > r ? cur[pr] : k;           \
            int64_t left = k - pc;                                                           \
            PF_BEGIN(idx + (r0 + pr) * k, vals + (r0 + pr) * k, pc, run < left ? run : left); \
            int64_t q = cur[r];                                                              \
            if (q < k && (int64_t)ir[q] < t0) q = seek_##IT(ir, q, k, t0); /* skipped tiles */ \
            int32_t off = (int32_t)t0;                                                       \
            float s[LANES] = {0};                                                            \
            /* whole blocks while the block's last entry is inside the tile, then one by one */ \
            for (; q + LANES <= k && (int64_t)ir[q + LANES - 1] < t1; q += LANES) {          \
                PF_STEP();                                                                   \
                for (int l = 0; l < LANES; ++l)                                              \
                    s[l] += CONV(vr[q + l]) * xt[(int32_t)ir[q + l] - off];                  \
            }                                                                                \
            for (; q < k && (int64_t)ir[q] < t1; ++q)                                        \
                s[0] += CONV(vr[q]) * xt[(int32_t)ir[q] - off];                              \
            PF_REST();                                                                       \
            int64_t e = q;                                                                   \
            float tot = 0.0f;                                                                \
            for (int l = 0; l < LANES; ++l) tot += s[l];                                     \
            out[r0 + r] += (double)tot;                                                      \
            cur[r] = e;                                                                      \
        }                                                                                    \
        if (!x) for (int64_t q = s0; q < sp; ++q) buf[sidx[q] - t0] = 0.0f;                  \
    }                                                                                        \
    free(cur);                                                                               \
    free(buf);                                                                               \
    return 0;                                                                                \
}

/* out[j] = sum_r coef[r] v[r, q] over the entries with i[r, q] = j, for the tiles starting in
   [t_begin, t_end); every coordinate of those tiles is written (zeros included). */
#define SCATTER(NAME, VT, IT, CONV)                                                          \
int NAME(const VT *vals, const IT *idx, int64_t r0, int64_t m, int64_t k, const float *coef,  \
         int64_t t_begin, int64_t t_end, int64_t d, int64_t tile, int32_t accumulate,        \
         float *out) {                                                                       \
    int64_t *cur = calloc((size_t)(m > 0 ? m : 1), sizeof(int64_t));                        \
    int64_t run = k * tile / (d > 0 ? d : 1) + 16;                                           \
    if (!cur) return 1;                                                                      \
    vals += r0 * k;                                                                          \
    idx += r0 * k;                                                                           \
    coef += r0;                                                                              \
    for (int64_t t0 = t_begin; t0 < t_end; t0 += tile) {                                     \
        int64_t t1 = t0 + tile < d ? t0 + tile : d;                                          \
        float *ot = out + t0;                                                                \
        if (!accumulate) memset(ot, 0, (size_t)(t1 - t0) * sizeof(float));                   \
        for (int64_t r = 0; r < m; ++r) {                                                    \
            const IT *ir = idx + r * k;                                                      \
            const VT *vr = vals + r * k;                                                     \
            int64_t pr = r + AHEAD < m ? r + AHEAD : r, pc = pr > r ? cur[pr] : k;           \
            int64_t left = k - pc;                                                           \
            PF_BEGIN(idx + pr * k, vals + pr * k, pc, run < left ? run : left);              \
            int64_t q = cur[r];                                                              \
            if (q < k && (int64_t)ir[q] < t0) q = seek_##IT(ir, q, k, t0);                   \
            int32_t off = (int32_t)t0;                                                       \
            float c = coef[r];                                                               \
            if (c != 0.0f) {                                                                 \
                for (; q + LANES <= k && (int64_t)ir[q + LANES - 1] < t1; q += LANES) {      \
                    PF_STEP();                                                               \
                    for (int l = 0; l < LANES; ++l)                                          \
                        ot[(int32_t)ir[q + l] - off] += c * CONV(vr[q + l]);                 \
                }                                                                            \
                for (; q < k && (int64_t)ir[q] < t1; ++q)                                    \
                    ot[(int32_t)ir[q] - off] += c * CONV(vr[q]);                             \
            } else {                                                                         \
                q = seek_##IT(ir, q, k, t1);                                                 \
            }                                                                                \
            PF_REST();                                                                       \
            int64_t e = q;                                                                   \
            cur[r] = e;                                                                      \
        }                                                                                    \
    }                                                                                        \
    free(cur);                                                                               \
    return 0;                                                                                \
}

/* Every (value, index) type pair, each kernel once: mfac_sp_<kernel>_<value>_<index>. */
#define EACH_TYPE_PAIR(KERNEL, kernel)                                                       \
    KERNEL(mfac_sp_##kernel##_f32_i32, float, int32_t, cv_f32)                               \
    KERNEL(mfac_sp_##kernel##_bf16_i32, uint16_t, int32_t, from_bf16)                        \
    KERNEL(mfac_sp_##kernel##_f16_i32, uint16_t, int32_t, from_f16)                          \
    KERNEL(mfac_sp_##kernel##_f32_i16, float, int16_t, cv_f32)                               \
    KERNEL(mfac_sp_##kernel##_bf16_i16, uint16_t, int16_t, from_bf16)                        \
    KERNEL(mfac_sp_##kernel##_f16_i16, uint16_t, int16_t, from_f16)

EACH_TYPE_PAIR(GATHER, gather)
EACH_TYPE_PAIR(SCATTER, scatter)

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
_VALUE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_INDEX_NAMES = {torch.int32: "i32", torch.int16: "i16"}
#: Rows (G x) per thread task below which the work is not split.
_MIN_ROWS = 8

_state: dict[str, object] = {}


_compiler = cbuild.find_compiler


def _load(
    compiler: str, flag_sets: tuple[list[str], ...] = _FLAG_SETS, stem: str = "sparse"
) -> ctypes.CDLL:
    """The kernel library built with the first of ``flag_sets`` that compiles (tests build a
    portable one too, without the host's vector extensions), with its argument types set."""
    lib = cbuild.load(SOURCE, flag_sets, stem, compiler)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for v in _VALUE_NAMES.values():
        for i in _INDEX_NAMES.values():
            gather = getattr(lib, f"mfac_sp_gather_{v}_{i}")
            gather.argtypes = [p, p, i64, i64, i64, p, p, p, i64, i64, i64, p]
            gather.restype = ctypes.c_int
            scatter = getattr(lib, f"mfac_sp_scatter_{v}_{i}")
            scatter.argtypes = [p, p, i64, i64, i64, p, i64, i64, i64, i64, ctypes.c_int32, p]
            scatter.restype = ctypes.c_int
    lib.mfac_sp_select.argtypes = [p, p, p, i64, ctypes.c_float, i64, p, p, i64, p]
    lib.mfac_sp_select.restype = i64
    lib.mfac_sp_list.argtypes = [p, i64, ctypes.c_float, ctypes.c_float, i64, p, i64]
    lib.mfac_sp_list.restype = i64
    lib.mfac_sp_keep_largest.argtypes = [p, p, i64, i64, p, p]
    lib.mfac_sp_keep_largest.restype = ctypes.c_int
    lib.mfac_sp_sub_at.argtypes = [p, p, p, i64]
    lib.mfac_sp_sub_at.restype = None
    lib.mfac_sp_has_f16.restype = ctypes.c_int
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


def supports(values: torch.Tensor, indices: torch.Tensor) -> bool:
    """Whether the kernels take this window: contiguous CPU (m, k) values in float32,
    bfloat16 or float16 and int16/int32 indices, and a library that loads."""
    if values.device.type != "cpu" or indices.device.type != "cpu":
        return False
    if values.dim() != 2 or values.shape != indices.shape:
        return False
    if not (values.is_contiguous() and indices.is_contiguous()):
        return False
    if values.dtype not in _VALUE_NAMES or indices.dtype not in _INDEX_NAMES:
        return False
    lib = library()
    if lib is None:
        return False
    return values.dtype != torch.float16 or bool(lib.mfac_sp_has_f16())


def _pool(threads: int) -> ThreadPoolExecutor:
    """The worker threads, made again in a forked child (whose copy has no live threads)."""
    return cbuild.worker_pool(_state, threads, "mfac-topk")


_split = cbuild.split_range


def _run(calls: list[tuple]) -> None:
    fn = calls[0][0]
    if len(calls) == 1:
        results = [fn(*calls[0][1:])]
    else:
        futures = [_pool(len(calls)).submit(c[0], *c[1:]) for c in calls]
        results = [f.result() for f in futures]
    if any(results):
        raise MemoryError("native top-k kernel: could not allocate its cursors")


def _fn(kind: str, values: torch.Tensor, indices: torch.Tensor):
    lib = library()
    suffix = f"{_VALUE_NAMES[values.dtype]}_{_INDEX_NAMES[indices.dtype]}"
    return getattr(lib, f"mfac_sp_{kind}_{suffix}")


def plan(m: int, k: int, dim: int, entry_bytes: int) -> tuple[int, int]:
    """(tile, rows per block) of a sweep: tiles long enough that each row has about RUN
    entries in one (long runs stream well; short tiles keep the tile and the runs in cache).
    One block of all rows measured best; the row blocks stay for callers that want them."""
    del entry_bytes
    tile = MIN_TILE
    while tile < TILE and tile * k < RUN * dim:
        tile *= 2
    return tile, m


def _entry_bytes(values: torch.Tensor, indices: torch.Tensor) -> int:
    return values.element_size() + indices.element_size()


def gather(
    values: torch.Tensor,
    indices: torch.Tensor,
    dim: int,
    x: torch.Tensor | None = None,
    sparse: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """G x (float64, (m,)) for a dense float32 x of ``dim`` entries, or for a sparse x given as
    ``(ascending int64 coordinates, float32 values)``. Rows must hold ascending coordinates."""
    m, k = values.shape
    out = torch.empty(m, dtype=torch.float64)
    if x is not None:
        xp, sp, vp, sk = x.data_ptr(), None, None, 0
    else:
        sidx, sval = sparse  # type: ignore[misc]
        xp, sp, vp, sk = None, sidx.data_ptr(), sval.data_ptr(), sidx.numel()
    tile, rows = plan(m, k, dim, _entry_bytes(values, indices))
    fn = _fn("gather", values, indices)
    base = (values.data_ptr(), indices.data_ptr(), k)
    tail = (xp, sp, vp, sk, dim, tile, out.data_ptr())
    blocks = [(a, min(m, a + rows)) for a in range(0, m, rows)]
    threads = torch.get_num_threads()
    if threads > 1 and len(blocks) < threads:
        blocks = _split(m, threads, _MIN_ROWS)
    calls = [(fn, *base, a, b, *tail) for a, b in blocks]
    for i in range(0, len(calls), threads):
        _run(calls[i : i + threads])
    return out


def scatter(
    values: torch.Tensor,
    indices: torch.Tensor,
    dim: int,
    coeff: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """G^T c (float32, (dim,)) for c of shape (m,), written into ``out`` when given (a
    contiguous float32 vector of ``dim`` entries). Rows must hold ascending coordinates.
    Row blocks add in order, so every coordinate sums its rows in row order."""
    m, k = values.shape
    coeff = coeff.to(torch.float32).contiguous()
    if out is None:
        out = torch.empty(dim, dtype=torch.float32)
    tile, rows = plan(m, k, dim, _entry_bytes(values, indices))
    fn = _fn("scatter", values, indices)
    tiles = -(-dim // tile)
    parts = _split(tiles, torch.get_num_threads(), 1)
    ptrs = (values.data_ptr(), indices.data_ptr())
    for r0 in range(0, m, rows):
        n = min(m, r0 + rows) - r0
        head = (*ptrs, r0, n, k, coeff.data_ptr())
        _run(
            [
                (fn, *head, a * tile, min(dim, b * tile), dim, tile, int(r0 > 0), out.data_ptr())
                for a, b in parts
            ]
        )
    return out


def select(
    error: torch.Tensor, grad: torch.Tensor, acc: torch.Tensor, threshold: float, cap: int
) -> tuple[torch.Tensor, int, bool]:
    """acc = error + grad (float32, contiguous), and the ascending coordinates with
    |acc| >= threshold: returns (the first ``cap`` of them, their total count, whether acc
    holds a NaN or Inf)."""
    cand, _, total, bad = select_values(error, grad, acc, threshold, cap, values=False)
    return cand, total, bad


def select_values(
    error: torch.Tensor,
    grad: torch.Tensor,
    acc: torch.Tensor,
    threshold: float,
    cap: int,
    values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, int, bool]:
    """:func:`select`, also returning acc at the listed coordinates (float32; None when
    ``values`` is False), read in the same pass instead of gathered from acc afterwards:
    (coordinates, their acc, total count, whether acc holds a NaN or Inf)."""
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
    "TILE",
    "empty_huge",
    "gather",
    "keep_largest",
    "kth_largest",
    "library",
    "list_range",
    "plan",
    "scatter",
    "select",
    "select_values",
    "sub_at",
    "supports",
]
