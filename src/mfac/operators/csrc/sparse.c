/* The top-k window's selection: a = e + g with the candidates |a| >= t (mfac_sp_select), a
   count or list of the coordinates in a magnitude range (mfac_sp_list), the k largest of the
   candidates (mfac_sp_keep_largest) and e = a - c at the kept coordinates (mfac_sp_sub_at).
   Built and loaded at run time by mfac/operators/sparse_native.py (cbuild.py); every exported
   function trusts the sizes it is given. */
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
