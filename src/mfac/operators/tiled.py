"""The top-k window's rows in a tile-major layout, and the C sweeps over it (CPU).

The d coordinates are cut into tiles (a power of two, 4096 to 65536 coordinates, so that a
tile of a dense float32 vector sits in L1 or L2). Rows are kept in groups of ``B`` consecutive
slots; a group's entries are stored tile by tile, and within a tile row by row, each row's run
in ascending coordinates. A sweep (G x, G^T c) visits a tile once and reads each group's
entries for it as one contiguous segment (prefetched two segments ahead), instead of m short
runs scattered over m row buffers. G x gathers from the tile with AVX-512 where the CPU has it
(a portable loop otherwise); each tile of G^T c is summed in a buffer of its own and stored
once. For a sparse x (the new row's products), a tile of 4096 coordinates is also held as a
bitmap in eight AVX-512 registers: a block of 16 entries gathers from x only where the bitmap
says one of them meets a nonzero of x (about 15 % of blocks at 1 % density), so that G x costs
a few register permutes per block instead of a gather. Only exact zeros are skipped, in the
same order: the sums equal those of x stored densely, bit for bit.

Replacing a row rewrites its group into a spare block (one pass over B k entries) and the
spare becomes the group's block; the ring's order is unchanged. Groups of at most 32 rows keep
that rewrite about 3 % of a sweep at m = 1024, and at least 8 groups keep the spare block
within 1/8 of the window.

Accumulation order is fixed (rows in slot order within a tile, tiles in order), so results do
not depend on the thread count: threads take disjoint group ranges (G x) or tile ranges (G^T c).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from . import cbuild

log = logging.getLogger(__name__)

#: Tile lengths (coordinates) a layout may use.
MIN_TILE, MAX_TILE = 4096, 65536
#: Entries per row and tile the tile length aims at (4096 coordinates at 1 % density).
RUN = 32
#: Most rows in a group: the sweeps measured no faster with more, and replacing a row
#: rewrites its group.
MAX_ROWS = 32
#: Fewest groups: the spare group costs at most 1 / MIN_GROUPS of the window's memory.
MIN_GROUPS = 8

SOURCE = cbuild.HALF_FLOATS + r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float cv_f32(float v) { return v; }
int mfac_tw_has_f16(void) { return MFAC_HAS_F16; }

/* Group g lives in block blk[g]: values vb + blk[g] B k, indices ib + blk[g] B k. Its run
   offsets for tile t are the nr + 1 ints at sb + t SW + g (B + 1) (SW = groups (B + 1)): run
   (t, j) of row j is [st[j], st[j + 1]), st[nr] is the next tile's st[0], the last is nr k.
   The offsets of all groups for a tile are contiguous, so a sweep reads them as one stream. */
#define LAYOUT_ARGS(VT, IT) const VT *vb, const IT *ib, const int32_t *sb, const int64_t *blk, \
                    int64_t B, int64_t m, int64_t k, int64_t nt, int64_t d, int64_t tile
#define SW (((m + B - 1) / B) * (B + 1))
#define GROUP(g, VT, IT) int64_t nr = m - (g) * B < B ? m - (g) * B : B, b = blk[g];         \
    const VT *v = vb + b * B * k; const IT *ix = ib + b * B * k;                             \
    const int32_t *s = sb + (g) * (B + 1)

/* Prefetch of the next group's segment of a tile (values and indices), one cache line of
   each per block of entries summed, so that the stream of segments never waits on a cold
   start; what is left after the group is issued at once. */
#ifndef PF_AHEAD
#define PF_AHEAD 2
#endif
typedef struct { const char *v, *ve, *i, *ie; } prefetch_t;
static inline void pf_step(prefetch_t *p) {
    if (p->v < p->ve) { __builtin_prefetch(p->v, 0, 3); p->v += 64; }
    if (p->i < p->ie) { __builtin_prefetch(p->i, 0, 3); p->i += 64; }
}
static inline void pf_rest(prefetch_t *p) { while (p->v < p->ve || p->i < p->ie) pf_step(p); }
/* The scatter's prefetch stops at L2: its tile of the result is read and written in L1, and
   the window's lines brought there ahead of time evict it (measured slower). */
static inline void pf_step_l2(prefetch_t *p) {
    if (p->v < p->ve) { __builtin_prefetch(p->v, 0, 2); p->v += 64; }
    if (p->i < p->ie) { __builtin_prefetch(p->i, 0, 2); p->i += 64; }
}
static inline void pf_rest_l2(prefetch_t *p) {
    while (p->v < p->ve || p->i < p->ie) pf_step_l2(p);
}
/* PF := the segment of group G in tile T (empty when T is past the last tile). */
#define SEGMENT(PF, G, T, VT, IT) do {                                                       \
    (PF).v = (PF).ve = (PF).i = (PF).ie = NULL;                                              \
    if ((T) < nt) {                                                                          \
        int64_t nr_ = m - (G) * B < B ? m - (G) * B : B, b_ = blk[G];                        \
        const int32_t *s_ = sb + (T) * SW + (G) * (B + 1);                                   \
        const VT *v_ = vb + b_ * B * k; const IT *i_ = ib + b_ * B * k;                      \
        (PF).v = (const char *)((uintptr_t)(v_ + s_[0]) & ~(uintptr_t)63);                   \
        (PF).ve = (const char *)(v_ + s_[nr_]);                                              \
        (PF).i = (const char *)((uintptr_t)(i_ + s_[0]) & ~(uintptr_t)63);                   \
        (PF).ie = (const char *)(i_ + s_[nr_]);                                              \
    }                                                                                        \
} while (0)

/* sum_q v[q] xt[ix[q] - off] over one run [q, e): with AVX-512, 16 entries at a time (a gather
   from the tile, which sits in L1); else 8 scalar partial sums. The order is fixed per build. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
static inline __m512 lv_f32(const float *p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
static inline __m512 lv_bf16(const uint16_t *p, __mmask16 k) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}
static inline __m512 lv_f16(const uint16_t *p, __mmask16 k) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}
static inline __m512i li_i32(const int32_t *p, __mmask16 k) {
    return _mm512_maskz_loadu_epi32(k, p);
}
static inline __m512i li_i16(const int16_t *p, __mmask16 k) {
    return _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(k, (const void *)p));
}
#define LV_cv_f32 lv_f32
#define LV_from_bf16 lv_bf16
#define LV_from_f16 lv_f16
#define LI_int32_t li_i32
#define LI_int16_t li_i16
#define RUN_DOT_DEF(VT, IT, CONV)                                                            \
static inline float dot_##CONV##_##IT(const VT *v, const IT *ix, int64_t q, int64_t e,      \
                                      const float *xt, int32_t off, prefetch_t *pf) {        \
    __m512 acc = _mm512_setzero_ps();                                                        \
    __m512i shift = _mm512_set1_epi32(off);                                                  \
    for (; q + 16 <= e; q += 16) {                                                           \
        pf_step(pf);                                                                         \
        __m512i at = _mm512_sub_epi32(LI_##IT(ix + q, 0xFFFF), shift);                       \
        acc = _mm512_fmadd_ps(LV_##CONV(v + q, 0xFFFF), _mm512_i32gather_ps(at, xt, 4), acc); \
    }                                                                                        \
    if (q < e) {                                                                             \
        __mmask16 k = (__mmask16)((1u << (e - q)) - 1);                                      \
        __m512i at = _mm512_sub_epi32(LI_##IT(ix + q, k), shift);                            \
        __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, at, xt, 4);             \
        acc = _mm512_fmadd_ps(LV_##CONV(v + q, k), xv, acc);                                 \
    }                                                                                        \
    return _mm512_reduce_add_ps(acc);                                                        \
}                                                                                            \
static inline void dot2_##CONV##_##IT(const VT *v, const IT *ix, int64_t q, int64_t e,      \
                                      const float *xt, const float *yt, int32_t off,         \
                                      prefetch_t *pf, float *sx, float *sy) {                \
    __m512 ax = _mm512_setzero_ps(), ay = _mm512_setzero_ps();                               \
    __m512i shift = _mm512_set1_epi32(off);                                                  \
    for (; q + 16 <= e; q += 16) {                                                           \
        pf_step(pf);                                                                         \
        __m512i at = _mm512_sub_epi32(LI_##IT(ix + q, 0xFFFF), shift);                       \
        __m512 val = LV_##CONV(v + q, 0xFFFF);                                               \
        ax = _mm512_fmadd_ps(val, _mm512_i32gather_ps(at, xt, 4), ax);                       \
        ay = _mm512_fmadd_ps(val, _mm512_i32gather_ps(at, yt, 4), ay);                       \
    }                                                                                        \
    if (q < e) {                                                                             \
        __mmask16 k = (__mmask16)((1u << (e - q)) - 1);                                      \
        __m512i at = _mm512_sub_epi32(LI_##IT(ix + q, k), shift);                            \
        __m512 val = LV_##CONV(v + q, k);                                                    \
        __m512 zero = _mm512_setzero_ps();                                                   \
        ax = _mm512_fmadd_ps(val, _mm512_mask_i32gather_ps(zero, k, at, xt, 4), ax);         \
        ay = _mm512_fmadd_ps(val, _mm512_mask_i32gather_ps(zero, k, at, yt, 4), ay);         \
    }                                                                                        \
    *sx = _mm512_reduce_add_ps(ax);                                                          \
    *sy = _mm512_reduce_add_ps(ay);                                                          \
}
/* A sparse x's tile of BM_TILE coordinates as a bitmap in 8 registers (128 words): which
   lanes of a block of entries meet a nonzero of x, by register permutes instead of a gather.
   The gather then runs only for blocks with a hit (about 15 % of them at 1 % density), with
   the other lanes zero as before: the sums are the same, bit for bit. */
#define BM_TILE 4096
typedef struct { __m512i w[8]; } tile_bits_t;
static inline void bits_load(tile_bits_t *bm, const uint32_t *words) {
    for (int i = 0; i < 8; ++i) bm->w[i] = _mm512_loadu_si512((const void *)(words + 16 * i));
}
static inline __mmask16 bits_hit(const tile_bits_t *bm, __m512i at) {
    __m512i w = _mm512_srli_epi32(at, 5);
    __m512i t0 = _mm512_permutex2var_epi32(bm->w[0], w, bm->w[1]);
    __m512i t1 = _mm512_permutex2var_epi32(bm->w[2], w, bm->w[3]);
    __m512i t2 = _mm512_permutex2var_epi32(bm->w[4], w, bm->w[5]);
    __m512i t3 = _mm512_permutex2var_epi32(bm->w[6], w, bm->w[7]);
    __mmask16 b5 = _mm512_test_epi32_mask(w, _mm512_set1_epi32(32));
    __mmask16 b6 = _mm512_test_epi32_mask(w, _mm512_set1_epi32(64));
    __m512i lo = _mm512_mask_blend_epi32(b5, t0, t1), hi = _mm512_mask_blend_epi32(b5, t2, t3);
    __m512i word = _mm512_mask_blend_epi32(b6, lo, hi);
    __m512i bit = _mm512_sllv_epi32(_mm512_set1_epi32(1),
                                    _mm512_and_si512(at, _mm512_set1_epi32(31)));
    return _mm512_test_epi32_mask(word, bit);
}
#define HAVE_TILE_BITS 1
#define RUN_DOT_BITS_DEF(VT, IT, CONV)                                                       \
static inline float dotb_##CONV##_##IT(const VT *v, const IT *ix, int64_t q, int64_t e,     \
                                       const float *xt, int32_t off, prefetch_t *pf,         \
                                       const tile_bits_t *bm) {                              \
    __m512 acc = _mm512_setzero_ps(), zero = _mm512_setzero_ps();                            \
    __m512i shift = _mm512_set1_epi32(off);                                                  \
    for (; q + 16 <= e; q += 16) {                                                           \
        pf_step(pf);                                                                         \
        __m512i at = _mm512_sub_epi32(LI_##IT(ix + q, 0xFFFF), shift);                       \
        __mmask16 h = bits_hit(bm, at);                                                      \
        if (h)                                                                               \
            acc = _mm512_fmadd_ps(LV_##CONV(v + q, 0xFFFF),                                  \
                                  _mm512_mask_i32gather_ps(zero, h, at, xt, 4), acc);        \
    }                                                                                        \
    if (q < e) {                                                                             \
        __mmask16 k = (__mmask16)((1u << (e - q)) - 1);                                      \
        __m512i at = _mm512_sub_epi32(LI_##IT(ix + q, k), shift);                            \
        __mmask16 h = bits_hit(bm, at) & k;                                                  \
        if (h)                                                                               \
            acc = _mm512_fmadd_ps(LV_##CONV(v + q, k),                                       \
                                  _mm512_mask_i32gather_ps(zero, h, at, xt, 4), acc);        \
    }                                                                                        \
    return _mm512_reduce_add_ps(acc);                                                        \
}                                                                                            \
static inline void dot2b_##CONV##_##IT(const VT *v, const IT *ix, int64_t q, int64_t e,     \
                                       const float *xt, const float *yt, int32_t off,        \
                                       prefetch_t *pf, float *sx, float *sy,                 \
                                       const tile_bits_t *bm) {                              \
    __m512 ax = _mm512_setzero_ps(), ay = _mm512_setzero_ps(), zero = _mm512_setzero_ps();   \
    __m512i shift = _mm512_set1_epi32(off);                                                  \
    for (; q + 16 <= e; q += 16) {                                                           \
        pf_step(pf);                                                                         \
        __m512i at = _mm512_sub_epi32(LI_##IT(ix + q, 0xFFFF), shift);                       \
        __m512 val = LV_##CONV(v + q, 0xFFFF);                                               \
        __mmask16 h = bits_hit(bm, at);                                                      \
        ax = _mm512_fmadd_ps(val, _mm512_i32gather_ps(at, xt, 4), ax);                       \
        if (h) ay = _mm512_fmadd_ps(val, _mm512_mask_i32gather_ps(zero, h, at, yt, 4), ay);  \
    }                                                                                        \
    if (q < e) {                                                                             \
        __mmask16 k = (__mmask16)((1u << (e - q)) - 1);                                      \
        __m512i at = _mm512_sub_epi32(LI_##IT(ix + q, k), shift);                            \
        __m512 val = LV_##CONV(v + q, k);                                                    \
        __mmask16 h = bits_hit(bm, at) & k;                                                  \
        ax = _mm512_fmadd_ps(val, _mm512_mask_i32gather_ps(zero, k, at, xt, 4), ax);         \
        if (h) ay = _mm512_fmadd_ps(val, _mm512_mask_i32gather_ps(zero, h, at, yt, 4), ay);  \
    }                                                                                        \
    *sx = _mm512_reduce_add_ps(ax);                                                          \
    *sy = _mm512_reduce_add_ps(ay);                                                          \
}
#else
#define RUN_DOT_DEF(VT, IT, CONV)                                                            \
static inline float dot_##CONV##_##IT(const VT *v, const IT *ix, int64_t q, int64_t e,      \
                                      const float *xt, int32_t off, prefetch_t *pf) {        \
    float a[8] = {0};                                                                        \
    for (; q + 8 <= e; q += 8) {                                                             \
        pf_step(pf);                                                                         \
        for (int l = 0; l < 8; ++l) a[l] += CONV(v[q + l]) * xt[(int32_t)ix[q + l] - off];   \
    }                                                                                        \
    for (; q < e; ++q) a[0] += CONV(v[q]) * xt[(int32_t)ix[q] - off];                        \
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));                \
}                                                                                            \
static inline void dot2_##CONV##_##IT(const VT *v, const IT *ix, int64_t q, int64_t e,      \
                                      const float *xt, const float *yt, int32_t off,         \
                                      prefetch_t *pf, float *sx, float *sy) {                \
    float a[4] = {0}, b[4] = {0};                                                            \
    for (; q + 4 <= e; q += 4) {                                                             \
        pf_step(pf);                                                                         \
        for (int l = 0; l < 4; ++l) {                                                        \
            float val = CONV(v[q + l]);                                                      \
            int32_t at = (int32_t)ix[q + l] - off;                                           \
            a[l] += val * xt[at];                                                            \
            b[l] += val * yt[at];                                                            \
        }                                                                                    \
    }                                                                                        \
    for (; q < e; ++q) {                                                                     \
        a[0] += CONV(v[q]) * xt[(int32_t)ix[q] - off];                                       \
        b[0] += CONV(v[q]) * yt[(int32_t)ix[q] - off];                                       \
    }                                                                                        \
    *sx = (a[0] + a[1]) + (a[2] + a[3]);                                                     \
    *sy = (b[0] + b[1]) + (b[2] + b[3]);                                                     \
}
#define BM_TILE 0
typedef struct { int unused; } tile_bits_t;
static inline void bits_load(tile_bits_t *bm, const uint32_t *words) { (void)bm; (void)words; }
#define RUN_DOT_BITS_DEF(VT, IT, CONV)
#endif
#define RUN_DOTS_DEF(VT, IT, CONV) RUN_DOT_DEF(VT, IT, CONV) RUN_DOT_BITS_DEF(VT, IT, CONV)
RUN_DOTS_DEF(float, int32_t, cv_f32)
RUN_DOTS_DEF(uint16_t, int32_t, from_bf16)
RUN_DOTS_DEF(uint16_t, int32_t, from_f16)
RUN_DOTS_DEF(float, int16_t, cv_f32)
RUN_DOTS_DEF(uint16_t, int16_t, from_bf16)
RUN_DOTS_DEF(uint16_t, int16_t, from_f16)
#define RUN_DOT(VT, IT, CONV, v, ix, q, e, xt, off, pf) dot_##CONV##_##IT(v, ix, q, e, xt, off, pf)
#define RUN_DOT2(VT, IT, CONV, v, ix, q, e, xt, yt, off, pf, sx, sy)                          \
    dot2_##CONV##_##IT(v, ix, q, e, xt, yt, off, pf, sx, sy)
#if defined(HAVE_TILE_BITS)
#define RUN_DOTB(VT, IT, CONV, v, ix, q, e, xt, off, pf, bm)                                 \
    dotb_##CONV##_##IT(v, ix, q, e, xt, off, pf, bm)
#define RUN_DOT2B(VT, IT, CONV, v, ix, q, e, xt, yt, off, pf, sx, sy, bm)                     \
    dot2b_##CONV##_##IT(v, ix, q, e, xt, yt, off, pf, sx, sy, bm)
#else
#define RUN_DOTB(VT, IT, CONV, v, ix, q, e, xt, off, pf, bm)                                 \
    RUN_DOT(VT, IT, CONV, v, ix, q, e, xt, off, pf)
#define RUN_DOT2B(VT, IT, CONV, v, ix, q, e, xt, yt, off, pf, sx, sy, bm)                     \
    RUN_DOT2(VT, IT, CONV, v, ix, q, e, xt, yt, off, pf, sx, sy)
#endif

/* The tile of a dense x read once in order before the random reads (a sparse window touches
   few of its lines, each a miss otherwise); kept out of line, so that the sweeps' loops are
   compiled as without it. */
#if defined(__GNUC__)
__attribute__((noinline))
#endif
static void stream_tile(const float *xt, int64_t n) {
    volatile float sink = 0.0f;
    float touch = 0.0f;
    for (int64_t j = 0; j < n; j += 16) touch += xt[j];
    sink += touch;
}

/* out[r] = sum_q v[r, q] x[i[r, q]] for the rows of groups [g0, g1), x dense (x != NULL) or
   the sparse vector (sidx ascending, sval) of sk entries, spread per tile into a buffer (sidx
   != NULL). Given both, out takes the dense products and out2 the sparse ones, from one read
   of the window, and *xs (when not NULL) the product of x with the sparse vector itself. */
#define GATHER(NAME, VT, IT, CONV)                                                           \
int NAME(LAYOUT_ARGS(VT, IT), int64_t g0, int64_t g1, const float *x, const int64_t *sidx,   \
         const float *sval, int64_t sk, double *out, double *out2, double *xs) {             \
    int64_t r0 = g0 * B, r1 = g1 * B < m ? g1 * B : m, sp = 0;                               \
    int both = x && sidx, bits = sidx && tile == BM_TILE;                                    \
    uint32_t words[128];                                                                     \
    tile_bits_t bm;                                                                          \
    float *buf = sidx ? calloc((size_t)tile, sizeof(float)) : NULL;                          \
    if (sidx && !buf) return 1;                                                              \
    for (int64_t r = r0; r < r1; ++r) { out[r] = 0.0; if (both) out2[r] = 0.0; }             \
    if (xs) *xs = 0.0;                                                                       \
    for (int64_t t = 0; t < nt; ++t) {                                                       \
        int64_t t0 = t * tile, t1 = t0 + tile < d ? t0 + tile : d, s0 = sp;                  \
        if (sidx) while (sp < sk && sidx[sp] < t1) { buf[sidx[sp] - t0] = sval[sp]; ++sp; }  \
        if (!x && sp == s0) continue; /* no entries of the sparse x in this tile */          \
        if (bits) {                                                                          \
            memset(words, 0, sizeof(words));                                                 \
            for (int64_t q = s0; q < sp; ++q)                                                \
                words[(sidx[q] - t0) >> 5] |= 1u << ((sidx[q] - t0) & 31);                   \
            bits_load(&bm, words);                                                           \
        }                                                                                    \
        const float *xt = x ? x + t0 : buf, *yt = both && sp > s0 ? buf : NULL;              \
        if (x) stream_tile(xt, t1 - t0);                                                     \
        if (xs && both)                                                                      \
            for (int64_t q = s0; q < sp; ++q) *xs += (double)sval[q] * xt[sidx[q] - t0];     \
        int32_t off = (int32_t)t0;                                                           \
        for (int64_t g = g0; g < g1; ++g) {                                                  \
            GROUP(g, VT, IT);                                                                \
            const int32_t *st = s + t * SW;                                                  \
            prefetch_t pf;                                                                   \
            {   int64_t ng = g1 - g0, at = (g - g0) + PF_AHEAD;                              \
                SEGMENT(pf, g0 + at % ng, t + at / ng, VT, IT); }                            \
            for (int64_t j = 0; j < nr; ++j) {                                               \
                int64_t q = st[j], e = st[j + 1];                                            \
                if (yt) {                                                                    \
                    float sx, sy;                                                            \
                    if (bits)                                                                \
                        RUN_DOT2B(VT, IT, CONV, v, ix, q, e, xt, yt, off, &pf, &sx, &sy, &bm); \
                    else                                                                     \
                        RUN_DOT2(VT, IT, CONV, v, ix, q, e, xt, yt, off, &pf, &sx, &sy);     \
                    out[g * B + j] += (double)sx;                                            \
                    out2[g * B + j] += (double)sy;                                           \
                } else if (bits && !x) {                                                     \
                    out[g * B + j] +=                                                        \
                        (double)RUN_DOTB(VT, IT, CONV, v, ix, q, e, xt, off, &pf, &bm);       \
                } else {                                                                     \
                    out[g * B + j] += (double)RUN_DOT(VT, IT, CONV, v, ix, q, e, xt, off, &pf); \
                }                                                                            \
            }                                                                                \
            pf_rest(&pf);                                                                    \
        }                                                                                    \
        if (sidx) for (int64_t q = s0; q < sp; ++q) buf[sidx[q] - t0] = 0.0f;                \
    }                                                                                        \
    free(buf);                                                                               \
    return 0;                                                                                \
}

/* A finished tile of the result, plus the same tile of ``add`` when it is not NULL, written to
   memory: with AVX-512 by streaming stores where the destination is 64-byte aligned (the
   result is not read back into cache first). */
static inline void store_tile(float *dst, const float *src, const float *add, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i < n && ((uintptr_t)(dst + i) & 63); ++i) dst[i] = src[i] + (add ? add[i] : 0.0f);
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(src + i);
        if (add) v = _mm512_add_ps(v, _mm512_loadu_ps(add + i));
        _mm512_stream_ps(dst + i, v);
    }
#endif
    for (; i < n; ++i) dst[i] = src[i] + (add ? add[i] : 0.0f);
}
static inline void store_fence(void) {
#if defined(__AVX512F__)
    _mm_sfence();
#endif
}

/* out[j] = add[j] + sum_r coef[r] v[r, q] over the entries with i[r, q] = j (add may be
   NULL: zero), for tiles [ta, tb); every coordinate of those tiles is written. The tile is
   summed in a buffer of its own (in L1) and then stored. */
#define SCATTER(NAME, VT, IT, CONV)                                                          \
int NAME(LAYOUT_ARGS(VT, IT), int64_t ta, int64_t tb, const float *coef, const float *add,  \
         float *out) {                                                                       \
    int64_t groups = (m + B - 1) / B;                                                        \
    float *ot = aligned_alloc(64, (size_t)((tile * sizeof(float) + 63) / 64 * 64));          \
    if (!ot) return 1;                                                                       \
    for (int64_t t = ta; t < tb; ++t) {                                                      \
        int64_t t0 = t * tile, t1 = t0 + tile < d ? t0 + tile : d;                           \
        int32_t off = (int32_t)t0;                                                           \
        memset(ot, 0, (size_t)(t1 - t0) * sizeof(float));                                    \
        for (int64_t g = 0; g < groups; ++g) {                                               \
            GROUP(g, VT, IT);                                                                \
            const int32_t *st = s + t * SW;                                                  \
            prefetch_t pf;                                                                   \
            {   int64_t at = g + PF_AHEAD, pt = t + at / groups;                             \
                SEGMENT(pf, at % groups, pt < tb ? pt : nt, VT, IT); }                       \
            for (int64_t j = 0; j < nr; ++j) {                                               \
                float c = coef[g * B + j];                                                   \
                int64_t q = st[j], e = st[j + 1];                                            \
                if (c == 0.0f) continue;                                                     \
                for (; q + 8 <= e; q += 8) {                                                 \
                    pf_step_l2(&pf);                                                         \
                    for (int l = 0; l < 8; ++l)                                              \
                        ot[(int32_t)ix[q + l] - off] += c * CONV(v[q + l]);                  \
                }                                                                            \
                for (; q < e; ++q) ot[(int32_t)ix[q] - off] += c * CONV(v[q]);               \
            }                                                                                \
            pf_rest_l2(&pf);                                                                 \
        }                                                                                    \
        store_tile(out + t0, ot, add ? add + t0 : NULL, t1 - t0);                            \
    }                                                                                        \
    store_fence();                                                                           \
    free(ot);                                                                                \
    return 0;                                                                                \
}

/* Group g rewritten into block dst with row j replaced by the sorted row (ni, nv) of k
   entries; its offsets are rewritten in place (each tile's are read before they change). */
#define REPLACE(NAME, VT, IT, CONV)                                                          \
void NAME(LAYOUT_ARGS(VT, IT), int64_t g, int64_t dst, int64_t j, const int64_t *ni,         \
          const VT *nv) {                                                                    \
    GROUP(g, VT, IT);                                                                        \
    VT *dv = (VT *)vb + dst * B * k; IT *di = (IT *)ib + dst * B * k;                        \
    int64_t p = 0, c = 0;                                                                    \
    for (int64_t t = 0; t < nt; ++t) {                                                       \
        int32_t *st = (int32_t *)s + t * SW;                                                 \
        int64_t t1 = (t + 1) * tile < d ? (t + 1) * tile : d;                                \
        for (int64_t jj = 0; jj < nr; ++jj) {                                                \
            int64_t q = st[jj], n = st[jj + 1] - q;                                          \
            st[jj] = (int32_t)p;                                                             \
            if (jj == j) {                                                                   \
                for (; c < k && ni[c] < t1; ++c, ++p) { dv[p] = nv[c]; di[p] = (IT)ni[c]; }  \
            } else {                                                                         \
                memcpy(dv + p, v + q, (size_t)n * sizeof(VT));                               \
                memcpy(di + p, ix + q, (size_t)n * sizeof(IT));                              \
                p += n;                                                                      \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    for (int64_t t = 0; t + 1 < nt; ++t) /* each tile's end is the next tile's start */      \
        ((int32_t *)s)[t * SW + nr] = s[(t + 1) * SW];                                       \
    ((int32_t *)s)[(nt - 1) * SW + nr] = (int32_t)p;                                         \
}

/* Group g written into its block from nr row-major rows (rv, ri: nr x k, each ascending). */
#define PACK(NAME, VT, IT, CONV)                                                             \
int NAME(LAYOUT_ARGS(VT, IT), int64_t g, const VT *rv, const IT *ri) {                       \
    GROUP(g, VT, IT);                                                                        \
    VT *dv = (VT *)v; IT *di = (IT *)ix;                                                     \
    int64_t *cur = calloc((size_t)nr, sizeof(int64_t)), p = 0;                               \
    if (!cur) return 1;                                                                      \
    for (int64_t t = 0; t < nt; ++t) {                                                       \
        int32_t *st = (int32_t *)s + t * SW;                                                 \
        int64_t t1 = (t + 1) * tile < d ? (t + 1) * tile : d;                                \
        if (t > 0) st[-SW + nr] = (int32_t)p;                                                \
        for (int64_t j = 0; j < nr; ++j) {                                                   \
            const IT *rij = ri + j * k; const VT *rvj = rv + j * k;                          \
            st[j] = (int32_t)p;                                                              \
            for (int64_t q = cur[j]; q < k && (int64_t)rij[q] < t1; ++q, ++p) {              \
                dv[p] = rvj[q]; di[p] = rij[q]; cur[j] = q + 1;                              \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    ((int32_t *)s)[(nt - 1) * SW + nr] = (int32_t)p;                                         \
    free(cur);                                                                               \
    return 0;                                                                                \
}

/* Group g's nr zero rows, each at the coordinates 0..k-1. */
#define ZERO(NAME, VT, IT, CONV)                                                             \
void NAME(LAYOUT_ARGS(VT, IT), int64_t g) {                                                  \
    GROUP(g, VT, IT);                                                                        \
    VT *dv = (VT *)v; IT *di = (IT *)ix;                                                     \
    int64_t p = 0;                                                                           \
    for (int64_t t = 0; t < nt; ++t) {                                                       \
        int32_t *st = (int32_t *)s + t * SW;                                                 \
        int64_t t0 = t * tile, t1 = t0 + tile < k ? t0 + tile : k;                           \
        if (t > 0) st[-SW + nr] = (int32_t)p;                                                \
        for (int64_t j = 0; j < nr; ++j) {                                                   \
            st[j] = (int32_t)p;                                                              \
            for (int64_t c = t0; c < t1; ++c, ++p) { dv[p] = (VT)0; di[p] = (IT)c; }         \
        }                                                                                    \
    }                                                                                        \
    ((int32_t *)s)[(nt - 1) * SW + nr] = (int32_t)p;                                         \
}

/* Row j of group g, row-major: its k values and indices, ascending. */
#define ROW(NAME, VT, IT, CONV)                                                              \
void NAME(LAYOUT_ARGS(VT, IT), int64_t g, int64_t j, VT *ov, IT *oi) {                       \
    GROUP(g, VT, IT);                                                                        \
    int64_t p = 0;                                                                           \
    for (int64_t t = 0; t < nt; ++t) {                                                       \
        const int32_t *st = s + t * SW;                                                      \
        int64_t q = st[j], n = st[j + 1] - q;                                                \
        memcpy(ov + p, v + q, (size_t)n * sizeof(VT));                                       \
        memcpy(oi + p, ix + q, (size_t)n * sizeof(IT));                                      \
        p += n;                                                                              \
    }                                                                                        \
}

/* 0 when group g is a valid layout. First the offsets: from 0, non-decreasing, each tile's
   end the next tile's start, ending at nr k, every row k entries (else 1 + 4 t, t the first
   bad tile, or 3 for the totals); then each run inside its tile and strictly ascending (else
   2 + 4 t); -1 without memory. */
#define CHECK(NAME, VT, IT, CONV)                                                            \
int64_t NAME(LAYOUT_ARGS(VT, IT), int64_t g) {                                               \
    GROUP(g, VT, IT);                                                                        \
    (void)v;                                                                                 \
    int64_t *count = calloc((size_t)nr, sizeof(int64_t)), prev = 0, bad = 0;                 \
    if (!count) return -1;                                                                   \
    for (int64_t t = 0; t < nt && !bad; ++t) {                                               \
        const int32_t *st = s + t * SW;                                                      \
        if (st[0] != prev) bad = 1 + 4 * t;                                                  \
        for (int64_t j = 0; j < nr && !bad; ++j) {                                           \
            if (st[j + 1] < st[j] || st[j + 1] > nr * k) bad = 1 + 4 * t;                    \
            count[j] += st[j + 1] - st[j];                                                   \
        }                                                                                    \
        prev = st[nr];                                                                       \
    }                                                                                        \
    if (!bad && prev != nr * k) bad = 3;                                                     \
    for (int64_t j = 0; j < nr && !bad; ++j) if (count[j] != k) bad = 3;                     \
    for (int64_t t = 0; t < nt && !bad; ++t) {                                               \
        const int32_t *st = s + t * SW;                                                      \
        int64_t t0 = t * tile, t1 = t0 + tile < d ? t0 + tile : d;                           \
        for (int64_t j = 0; j < nr && !bad; ++j)                                             \
            for (int64_t p = st[j]; p < st[j + 1]; ++p) {                                    \
                int64_t i = ix[p];                                                           \
                if (i < t0 || i >= t1 || (p > st[j] && i <= (int64_t)ix[p - 1])) {          \
                    bad = 2 + 4 * t; break;                                                  \
                }                                                                            \
            }                                                                                \
    }                                                                                        \
    free(count);                                                                             \
    return bad;                                                                              \
}

/* Every (value, index) type pair, each kernel once: mfac_tw_<kernel>_<value>_<index>. */
#define EACH_TYPE_PAIR(KERNEL, kernel)                                                       \
    KERNEL(mfac_tw_##kernel##_f32_i32, float, int32_t, cv_f32)                               \
    KERNEL(mfac_tw_##kernel##_bf16_i32, uint16_t, int32_t, from_bf16)                        \
    KERNEL(mfac_tw_##kernel##_f16_i32, uint16_t, int32_t, from_f16)                          \
    KERNEL(mfac_tw_##kernel##_f32_i16, float, int16_t, cv_f32)                               \
    KERNEL(mfac_tw_##kernel##_bf16_i16, uint16_t, int16_t, from_bf16)                        \
    KERNEL(mfac_tw_##kernel##_f16_i16, uint16_t, int16_t, from_f16)

EACH_TYPE_PAIR(GATHER, gather)
EACH_TYPE_PAIR(SCATTER, scatter)
EACH_TYPE_PAIR(REPLACE, replace)
EACH_TYPE_PAIR(PACK, pack)
EACH_TYPE_PAIR(ROW, row)
EACH_TYPE_PAIR(CHECK, check)
EACH_TYPE_PAIR(ZERO, zero)
"""

_VALUE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_INDEX_NAMES = {torch.int32: "i32", torch.int16: "i16"}
#: Compiler flag sets tried in order (the first that builds wins). No auto-vectorisation: the
#: compiler's vector gathers and scatters of the scalar loops measured slower (G c's AVX-512
#: gathers are written out with intrinsics).
_FLAG_SETS = (
    ["-O3", "-march=native", "-fno-tree-vectorize", "-fno-math-errno", "-fno-trapping-math"],
    ["-O3", "-fno-tree-vectorize", "-fno-math-errno", "-fno-trapping-math"],
)

_state: dict[str, object] = {}


def _load(
    compiler: str, flag_sets: tuple[list[str], ...] = _FLAG_SETS, stem: str = "tiled"
) -> ctypes.CDLL:
    """The kernel library built with the first of ``flag_sets`` that compiles (tests build a
    portable one too), with its argument types set."""
    lib = cbuild.load(SOURCE, flag_sets, stem, compiler)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    layout = [p, p, p, p, i64, i64, i64, i64, i64, i64]
    extra = {
        "gather": ([i64, i64, p, p, p, i64, p, p, p], ctypes.c_int),
        "scatter": ([i64, i64, p, p, p], ctypes.c_int),
        "replace": ([i64, i64, i64, p, p], None),
        "pack": ([i64, p, p], ctypes.c_int),
        "row": ([i64, i64, p, p], None),
        "check": ([i64], i64),
        "zero": ([i64], None),
    }
    for v in _VALUE_NAMES.values():
        for i in _INDEX_NAMES.values():
            for kernel, (args, restype) in extra.items():
                fn = getattr(lib, f"mfac_tw_{kernel}_{v}_{i}")
                fn.argtypes = layout + args
                fn.restype = restype
    lib.mfac_tw_has_f16.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first use; None when it cannot be had."""
    return cbuild.cached_library(
        _state, "tiled top-k kernels", cbuild.find_compiler, _load, log
    )


def supports(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the C kernels take a window of ``dtype`` values on ``device``."""
    if device.type != "cpu" or dtype not in _VALUE_NAMES:
        return False
    lib = library()
    if lib is None:
        return False
    return dtype != torch.float16 or bool(lib.mfac_tw_has_f16())


def plan(m: int, k: int, dim: int) -> tuple[int, int]:
    """(tile, rows per group) of a layout: tiles long enough that a row has about RUN entries
    in one (MIN_TILE..MAX_TILE coordinates); groups of at most MAX_ROWS rows, at least
    MIN_GROUPS of them (where m allows), and a group's entries addressable by int32 offsets."""
    tile = MIN_TILE
    while tile < MAX_TILE and tile * k < RUN * dim:
        tile *= 2
    rows = max(1, min(MAX_ROWS, m // MIN_GROUPS, (2**31 - 1) // k))
    return tile, rows


def layout_bytes(m: int, k: int, dim: int, value_bytes: int, index_bytes: int) -> int:
    """Bytes of a tiled window: the groups' blocks and the spare (values and indices) and the
    int32 run offsets (rows + 1 per group and tile)."""
    tile, rows = plan(m, k, dim)
    groups = -(-m // rows)
    tiles = -(-dim // tile)
    return (groups + 1) * rows * k * (value_bytes + index_bytes) + tiles * groups * (rows + 1) * 4


class TiledRows:
    """m sparse rows of k entries each over d coordinates, in the tile-major group layout.

    ``values``/``indices`` hold groups + 1 blocks of ``rows`` x k entries each (one is the
    spare), ``block_of`` says which block holds each group (its last entry: the spare), and
    ``starts`` (tiles, groups * (rows + 1)) the run offsets, each tile's of all groups
    together. Slot r is row r % rows of group r // rows."""

    def __init__(
        self,
        dim: int,
        window: int,
        k: int,
        dtype: torch.dtype,
        index_dtype: torch.dtype,
        empty: Callable[[tuple[int, int], torch.dtype], torch.Tensor] | None = None,
    ) -> None:
        self._set_shape(dim, window, k)
        blocks = self.groups + 1
        empty = empty or (lambda shape, dt: torch.empty(shape, dtype=dt))
        self.values = empty((blocks * self.rows, k), dtype)
        self.indices = empty((blocks * self.rows, k), index_dtype)
        self.starts = torch.zeros(self.tiles, self.groups * (self.rows + 1), dtype=torch.int32)
        self.block_of = torch.arange(blocks, dtype=torch.int64)  # the last is the spare
        for g in range(self.groups):
            self._call("zero", g)
        spare = slice(self.groups * self.rows, blocks * self.rows)
        self.values[spare].zero_()  # touched now, not in the first replace
        self.indices[spare].zero_()

    @classmethod
    def over(
        cls, dim: int, window: int, k: int, tensors: dict[str, torch.Tensor]
    ) -> TiledRows | None:
        """A layout over existing tensors (``values``, ``indices``, ``starts``, ``block_of``:
        a saved state), without copying; None unless their shapes and dtypes are what this
        version lays out for (dim, window, k) with those value and index dtypes."""
        rows = cls.__new__(cls)
        rows._set_shape(dim, window, k)
        try:
            values, indices = tensors["values"], tensors["indices"]
            starts, block_of = tensors["starts"], tensors["block_of"]
        except KeyError:
            return None
        block_rows = (rows.groups + 1) * rows.rows
        if (
            tuple(values.shape) != (block_rows, k)
            or tuple(indices.shape) != (block_rows, k)
            or tuple(starts.shape) != (rows.tiles, rows.groups * (rows.rows + 1))
            or starts.dtype != torch.int32
            or tuple(block_of.shape) != (rows.groups + 1,)
            or block_of.dtype != torch.int64
            or values.dtype not in _VALUE_NAMES
            or indices.dtype not in _INDEX_NAMES
            or any(
                t.device.type != "cpu" or not t.is_contiguous()
                for t in (values, indices, starts, block_of)
            )
        ):
            return None
        rows.values, rows.indices, rows.starts, rows.block_of = values, indices, starts, block_of
        return rows

    def _set_shape(self, dim: int, window: int, k: int) -> None:
        """The layout's sizes for (dim, window, k): :func:`plan`'s tile and group size, the
        number of tiles and of groups."""
        self.dim, self.window, self.k = dim, window, k
        self.tile, self.rows = plan(window, k, dim)
        self.tiles = -(-dim // self.tile)
        self.groups = -(-window // self.rows)

    # ------------------------------------------------------------------ plumbing
    @property
    def spare(self) -> int:
        """The block no group uses."""
        return int(self.block_of[self.groups])

    def group_rows(self, g: int) -> int:
        """Rows of group g (the last group may hold fewer)."""
        return min(self.rows, self.window - g * self.rows)

    def _fn(self, kernel: str):
        lib = library()
        suffix = f"{_VALUE_NAMES[self.values.dtype]}_{_INDEX_NAMES[self.indices.dtype]}"
        return getattr(lib, f"mfac_tw_{kernel}_{suffix}")

    def _layout(self) -> tuple:
        return (
            self.values.data_ptr(), self.indices.data_ptr(), self.starts.data_ptr(),
            self.block_of.data_ptr(), self.rows, self.window, self.k, self.tiles, self.dim,
            self.tile,
        )  # fmt: skip

    def _call(self, kernel: str, *args: Any) -> Any:
        return self._fn(kernel)(*self._layout(), *args)

    def _run(self, kernel: str, parts: list[tuple]) -> None:
        """One call per part, on the worker threads when there are several."""
        fn, layout = self._fn(kernel), self._layout()
        if len(parts) == 1:
            results = [fn(*layout, *parts[0])]
        else:
            pool = cbuild.worker_pool(_state, len(parts), "mfac-tiled")
            results = [f.result() for f in [pool.submit(fn, *layout, *a) for a in parts]]
        if any(results):
            raise MemoryError("tiled top-k kernel: could not allocate its buffers")

    # ------------------------------------------------------------------ sweeps
    def gather(
        self, x: torch.Tensor | None = None, sparse: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, float]:
        """G x (float64, (m,)) for a dense contiguous float32 x of d entries, or a sparse x
        given as ``(ascending int64 coordinates, float32 values)``; given both, from one sweep
        (the window is read once): (G x, G x_sparse, x . x_sparse)."""
        if x is None and sparse is None:
            raise ValueError("gather needs x, sparse or both")
        both = x is not None and sparse is not None
        out = torch.empty(self.window, dtype=torch.float64)
        out2 = torch.empty(self.window if both else 0, dtype=torch.float64)
        cross = torch.zeros(1, dtype=torch.float64)
        sidx, sval = sparse if sparse is not None else (None, None)
        ptrs = (
            x.data_ptr() if x is not None else None,
            sidx.data_ptr() if sidx is not None else None,
            sval.data_ptr() if sval is not None else None,
            sidx.numel() if sidx is not None else 0,
            out.data_ptr(),
            out2.data_ptr() if both else None,
        )
        parts = cbuild.split_range(self.groups, torch.get_num_threads(), 1)
        # x . x_sparse once, by the part that starts at group 0
        calls = [(a, b, *ptrs, cross.data_ptr() if both and a == 0 else None) for a, b in parts]
        self._run("gather", calls)
        return (out, out2, float(cross)) if both else out

    def scatter(
        self,
        coeff: torch.Tensor,
        out: torch.Tensor | None = None,
        plus: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """G^T c (float32, (d,)) for c of shape (m,), plus ``plus`` when given (added per tile
        while the tile is in cache: no extra pass over d), written into ``out`` when given.
        ``out`` and ``plus`` are contiguous float32 vectors of d entries."""
        coeff = coeff.to(torch.float32).contiguous()
        if out is None:
            out = torch.empty(self.dim, dtype=torch.float32)
        add = plus.data_ptr() if plus is not None else None
        parts = cbuild.split_range(self.tiles, torch.get_num_threads(), 1)
        self._run("scatter", [(a, b, coeff.data_ptr(), add, out.data_ptr()) for a, b in parts])
        return out

    # ------------------------------------------------------------------ rows
    def replace(self, slot: int, idx: torch.Tensor, vals: torch.Tensor) -> None:
        """Row ``slot`` := the k entries (ascending int64 ``idx``, ``vals`` in the stored
        dtype): its group is rewritten into the spare block, which then becomes the group's."""
        g, j = divmod(slot, self.rows)
        idx, vals = idx.contiguous(), vals.contiguous()
        spare = self.spare
        self._call("replace", g, spare, j, idx.data_ptr(), vals.data_ptr())
        self.block_of[self.groups], self.block_of[g] = self.block_of[g].clone(), spare

    def row(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of row ``slot``, k each, ascending coordinates."""
        g, j = divmod(slot, self.rows)
        vals = torch.empty(self.k, dtype=self.values.dtype)
        idx = torch.empty(self.k, dtype=self.indices.dtype)
        self._call("row", g, j, vals.data_ptr(), idx.data_ptr())
        return vals, idx

    def group(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of group g's rows, row-major ((rows, k) each)."""
        n = self.group_rows(g)
        vals = torch.empty(n, self.k, dtype=self.values.dtype)
        idx = torch.empty(n, self.k, dtype=self.indices.dtype)
        for j in range(n):
            self._call("row", g, j, vals[j].data_ptr(), idx[j].data_ptr())
        return vals, idx

    def write_group(self, g: int, values: torch.Tensor, indices: torch.Tensor) -> None:
        """Group g := the row-major rows ``values``/``indices`` ((rows of g, k), each row's
        coordinates strictly ascending), written in place."""
        n = self.group_rows(g)
        if tuple(values.shape) != (n, self.k) or tuple(indices.shape) != (n, self.k):
            raise ValueError(f"group {g} holds {n} rows of {self.k} entries")
        values = values.to(self.values.dtype).contiguous()
        indices = indices.to(self.indices.dtype).contiguous()
        if self._call("pack", g, values.data_ptr(), indices.data_ptr()):
            raise MemoryError("tiled top-k kernel: could not allocate its cursors")

    def check(self) -> None:
        """Raise, naming the field, unless every group is a valid layout: ``starts`` (offsets
        from 0, non-decreasing, k entries per row) and ``indices`` (each run inside its tile
        and strictly ascending, so every coordinate lies in [0, d))."""
        for g in range(self.groups):
            bad = int(self._call("check", g))
            if bad < 0:
                raise MemoryError("tiled top-k kernel: could not allocate its counters")
            if bad:
                tile = (bad - 1) // 4
                if bad % 4 == 2:
                    raise ValueError(
                        f"indices: group {g}, tile {tile}: a coordinate outside its tile or "
                        f"out of order (rows need ascending coordinates in [0, {self.dim}))"
                    )
                where = f", tile {tile}" if bad % 4 == 1 else ""
                raise ValueError(f"starts: group {g}{where} does not describe k entries per row")

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks (values, indices) and their offsets."""
        return (
            self.values.numel() * self.values.element_size()
            + self.indices.numel() * self.indices.element_size()
            + self.starts.numel() * 4
        )

    def state(self) -> dict[str, torch.Tensor]:
        """The layout's tensors, by reference."""
        return {
            "values": self.values,
            "indices": self.indices,
            "starts": self.starts,
            "block_of": self.block_of,
        }


def state_shape(state: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(groups, rows per group) of a saved layout, read off its tensors: ``block_of`` names
    groups + 1 blocks, ``starts`` holds rows + 1 offsets per group and tile (rows is 0 when
    there are no groups)."""
    groups = state["block_of"].numel() - 1
    return groups, (state["starts"].shape[-1] // groups - 1 if groups > 0 else 0)


def unpack_group(
    values: torch.Tensor, indices: torch.Tensor, starts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A group's rows in row-major order ((rows, k) values and indices) with torch (any
    device), from its block (``values``/``indices``, at least rows x k entries) and its offsets
    ((tiles, rows + 1)): a stable sort of the entries by row keeps each row's tiles in order.
    Raises ValueError naming ``starts`` unless the offsets describe ``k`` entries per row."""
    rows, k = starts.shape[1] - 1, values.shape[-1]
    s = starts.long()
    lengths = (s[:, 1:] - s[:, :-1]).reshape(-1)
    if (
        int(s[0, 0]) != 0
        or bool((lengths < 0).any())
        or not torch.equal(s[1:, 0], s[:-1, -1])
        or int(s[-1, -1]) != rows * k
        or not bool((lengths.view(-1, rows).sum(dim=0) == k).all())
    ):
        raise ValueError(f"starts: a group's offsets do not describe {k} entries per row")
    row_of = torch.arange(lengths.numel(), device=lengths.device) % rows
    entry_row = torch.repeat_interleave(row_of, lengths)
    order = torch.sort(entry_row, stable=True).indices.to(values.device)
    n = entry_row.numel()
    flat_v, flat_i = values.reshape(-1)[:n], indices.reshape(-1)[:n]
    return flat_v[order].view(rows, -1), flat_i[order].view(rows, -1)


__all__ = [
    "TiledRows", "layout_bytes", "library", "plan", "state_shape", "supports", "unpack_group"
]
