/* The top-k window's sweeps over its tile-major group layout (G x, G^T c), and the row
   updates of that layout (replace, pack, zero, row, check), for every value type (float32,
   bfloat16, float16) and index type (int32, int16): mfac_tw_<kernel>_<value>_<index>. Built and
   loaded at run time by mfac/operators/tiled.py (cbuild.py), which describes the layout; every
   exported function trusts the layout and sizes it is given (check validates a loaded one). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "half_floats.h"
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
   the window's lines brought there ahead of time would evict it. */
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
            for (int64_t q = s0; q < sp; ++q)                                                \
                *xs += (double)sval[q] * (double)xt[sidx[q] - t0];                           \
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
    float *ot = aligned_alloc(64, ((size_t)tile * sizeof(float) + 63) / 64 * 64);            \
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
    (void)d; /* zero rows sit at coordinates 0..k-1: only k bounds the tiles */              \
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
    (void)d; (void)tile; (void)nr; /* a row's runs are read off the offsets */               \
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
