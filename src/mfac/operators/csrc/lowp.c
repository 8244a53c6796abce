/* The low-precision passes over an m x d bfloat16/float16 window (G^T c and G x, float32
   accumulation), and the static build's float64 blocks (Gram, Cholesky, inverse, triangular
   solve). Built and loaded at run time by mfac/operators/native.py (cbuild.py); every exported
   function trusts the sizes it is given, which the Python side checks first. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "half_floats.h"

/* COL_TILE: columns of G^T c summed in one float32 tile of the result (256 KiB, held in L2),
   long enough that each row's stream keeps the hardware prefetcher busy. ROW_TILE: columns of
   x held in L2 while G x walks the rows. LANES: float32 partial sums per row in G x. */
#define COL_TILE 65536
#define ROW_TILE 16384
#define LANES 16

int mfac_has_f16(void) { return MFAC_HAS_F16; }

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

/* Plain C on every CPU: the compiler vectorises this loop itself, and hand-written AVX-512
   intrinsics were no faster (docs/operators.md). */
COLS_DOT(mfac_cols_dot_bf16, from_bf16)
COLS_DOT(mfac_cols_dot_f16, from_f16)

/* float64 vectors of 8 lanes, any alignment (GCC/Clang vector extensions: AVX-512 registers
   with -march=native on such CPUs, pairs or quads of narrower registers elsewhere). */
typedef double v8d __attribute__((vector_size(64), aligned(8)));
#define PANEL 8
/* Gram tiles: GRAM_ROWS rows by GRAM_COLS columns (16 accumulators of 8 lanes, a size chosen
   by measurement: docs/operators.md). Factor panels: PANEL rows at a time. */
#define GRAM_COLS 16
#define GRAM_ROWS 8

static inline int64_t round_up(int64_t x, int64_t k) { return (x + k - 1) / k * k; }

/* C[i][j] = alpha * sum_r P[r][i] P[r][j] for j >= i (row-major B x B, upper triangle; some
   entries below the diagonal of the diagonal tiles are written too). P is m x bp, zero-padded. */
static void gram_upper(const double *P, int64_t m, int64_t B, int64_t bp, double alpha,
                       double *C, int triangular, int accumulate) {
    double tmp[GRAM_ROWS][GRAM_COLS];
    for (int64_t i0 = 0; i0 < B; i0 += GRAM_ROWS) {
        for (int64_t j0 = i0 / GRAM_COLS * GRAM_COLS; j0 < B; j0 += GRAM_COLS) {
            v8d acc[GRAM_ROWS][GRAM_COLS / 8];
            for (int a = 0; a < GRAM_ROWS; ++a)
                for (int b = 0; b < GRAM_COLS / 8; ++b) acc[a][b] = (v8d){0};
            const int64_t r0 = triangular ? j0 : 0; /* P lower triangular: rows < j0 add 0 */
            const double *row = P + r0 * bp;
            for (int64_t r = r0; r < m; ++r, row += bp) {
                v8d x[GRAM_COLS / 8];
                for (int b = 0; b < GRAM_COLS / 8; ++b) x[b] = *(const v8d *)(row + j0 + 8 * b);
                for (int a = 0; a < GRAM_ROWS; ++a) {
                    const double s = row[i0 + a];
                    for (int b = 0; b < GRAM_COLS / 8; ++b) acc[a][b] += s * x[b];
                }
            }
            for (int a = 0; a < GRAM_ROWS; ++a)
                for (int b = 0; b < GRAM_COLS / 8; ++b)
                    *(v8d *)&tmp[a][8 * b] = alpha * acc[a][b];
            const int64_t rows = B - i0 < GRAM_ROWS ? B - i0 : GRAM_ROWS;
            const int64_t cols = B - j0 < GRAM_COLS ? B - j0 : GRAM_COLS;
            for (int64_t ii = 0; ii < rows; ++ii) {
                double *c = C + (i0 + ii) * B + j0;
                if (accumulate)
                    for (int64_t jj = 0; jj < cols; ++jj) c[jj] += tmp[ii][jj];
                else
                    memcpy(c, tmp[ii], (size_t)cols * sizeof(double));
            }
        }
    }
}

#define DIRECT_GRAM(NAME, T)                                                                   \
int NAME(const T *g, int64_t ld, int64_t m, int64_t B, int64_t b_begin, int64_t b_end,      \
         double alpha, double *out) {                                                        \
    const int64_t bp = round_up(B, GRAM_COLS);                                               \
    double *P = calloc((size_t)(m * bp), sizeof(double));                                    \
    if (!P) return -1;                                                                       \
    for (int64_t b = b_begin; b < b_end; ++b) {                                              \
        const T *src = g + b * B;                                                            \
        for (int64_t r = 0; r < m; ++r)                                                      \
            for (int64_t j = 0; j < B; ++j) P[r * bp + j] = (double)src[r * ld + j];         \
        gram_upper(P, m, B, bp, alpha, out + b * B * B, 0, 0);                                     \
    }                                                                                        \
    free(P);                                                                                 \
    return 0;                                                                                \
}
DIRECT_GRAM(mfac_direct_gram_f32, float)
DIRECT_GRAM(mfac_direct_gram_f64, double)

/* Woodbury blocks (B > m): out[b] = G_b G_b^T (m x m, full symmetric) for blocks [b_begin,
   b_end) of B columns. Column tiles of each block are packed transposed (rows of the panel are
   columns of G) into a float64 panel that stays in cache, and their Grams, upper triangle
   only, are summed into out[b] with the same kernel as the direct form. */
#define WOODBURY_GRAM(NAME, T)                                                                 \
int NAME(const T *g, int64_t ld, int64_t m, int64_t B, int64_t b_begin, int64_t b_end,      \
         double *out) {                                                                      \
    const int64_t bp = round_up(m, GRAM_COLS);                                               \
    int64_t w = (32768 / bp) / 8 * 8; /* panel of at most 256 KiB */                          \
    if (w < 8) w = 8;                                                                        \
    double *P = calloc((size_t)(w * bp), sizeof(double));                                    \
    if (!P) return -1;                                                                       \
    for (int64_t b = b_begin; b < b_end; ++b) {                                              \
        double *C = out + b * m * m;                                                         \
        for (int64_t c0 = 0; c0 < B; c0 += w) {                                              \
            const int64_t wc = B - c0 < w ? B - c0 : w;                                      \
            const T *src = g + b * B + c0;                                                   \
            for (int64_t i0 = 0; i0 < m; i0 += 8)                                            \
                for (int64_t r0 = 0; r0 < wc; r0 += 8)                                       \
                    for (int64_t i = i0; i < i0 + 8 && i < m; ++i)                           \
                        for (int64_t r = r0; r < r0 + 8 && r < wc; ++r)                      \
                            P[r * bp + i] = (double)src[i * ld + r];                         \
            gram_upper(P, wc, m, bp, 1.0, C, 0, c0 > 0);                                     \
        }                                                                                    \
        for (int64_t i = 0; i < m; ++i)                                                      \
            for (int64_t j = i + 1; j < m; ++j) C[j * m + i] = C[i * m + j];                 \
    }                                                                                        \
    free(P);                                                                                 \
    return 0;                                                                                \
}
WOODBURY_GRAM(mfac_woodbury_gram_f32, float)
WOODBURY_GRAM(mfac_woodbury_gram_f64, double)

/* In place: the upper triangle of A (row-major B x B) becomes U with A = U^T U (left-looking
   Cholesky, PANEL rows at a time: the rows above the panel update it in one product with
   eight rows by sixteen columns of accumulators, then the panel is factored row by row). piv
   receives the pivots d_p (U[p][p]^2): a pivot that is not positive and finite means A is not
   positive definite in float64. Entries below the diagonal are never read. Up: PANEL x B. */
static void cholesky_upper(double *A, int64_t B, double *piv, double *Up) {
    for (int64_t K = 0; K < B; K += PANEL) {
        const int64_t kw = B - K < PANEL ? B - K : PANEL;
        if (K > 0) {
            for (int64_t k = 0; k < K; ++k)
                for (int64_t r = 0; r < PANEL; ++r)
                    Up[k * PANEL + r] = r < kw ? A[k * B + K + r] : 0.0;
            int64_t j = K;
            for (; j + 16 <= B; j += 16) {
                v8d acc[PANEL][2];
                for (int r = 0; r < PANEL; ++r) {
                    const int64_t row = K + (r < kw ? r : 0);
                    acc[r][0] = *(v8d *)(A + row * B + j);
                    acc[r][1] = *(v8d *)(A + row * B + j + 8);
                }
                for (int64_t k = 0; k < K; ++k) {
                    const v8d u0 = *(const v8d *)(A + k * B + j);
                    const v8d u1 = *(const v8d *)(A + k * B + j + 8);
                    for (int r = 0; r < PANEL; ++r) {
                        acc[r][0] -= Up[k * PANEL + r] * u0;
                        acc[r][1] -= Up[k * PANEL + r] * u1;
                    }
                }
                for (int r = 0; r < kw; ++r) {
                    *(v8d *)(A + (K + r) * B + j) = acc[r][0];
                    *(v8d *)(A + (K + r) * B + j + 8) = acc[r][1];
                }
            }
            for (; j + 8 <= B; j += 8) {
                v8d acc[PANEL];
                for (int r = 0; r < PANEL; ++r)
                    acc[r] = *(v8d *)(A + (K + (r < kw ? r : 0)) * B + j);
                for (int64_t k = 0; k < K; ++k) {
                    const v8d u0 = *(const v8d *)(A + k * B + j);
                    for (int r = 0; r < PANEL; ++r) acc[r] -= Up[k * PANEL + r] * u0;
                }
                for (int r = 0; r < kw; ++r) *(v8d *)(A + (K + r) * B + j) = acc[r];
            }
            for (; j < B; ++j) /* fewer than 8 columns left: four partial sums per entry */
                for (int64_t r = 0; r < kw; ++r) {
                    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
                    int64_t k = 0;
                    for (; k + 4 <= K; k += 4) {
                        s0 += Up[k * PANEL + r] * A[k * B + j];
                        s1 += Up[(k + 1) * PANEL + r] * A[(k + 1) * B + j];
                        s2 += Up[(k + 2) * PANEL + r] * A[(k + 2) * B + j];
                        s3 += Up[(k + 3) * PANEL + r] * A[(k + 3) * B + j];
                    }
                    for (; k < K; ++k) s0 += Up[k * PANEL + r] * A[k * B + j];
                    A[(K + r) * B + j] -= (s0 + s1) + (s2 + s3);
                }
        }
        for (int64_t p = K; p < K + kw; ++p) {
            double *ap = A + p * B;
            for (int64_t l = K; l < p; ++l) {
                const double f = A[l * B + p];
                const double *al = A + l * B;
                for (int64_t j = p; j < B; ++j) ap[j] -= f * al[j];
            }
            const double d = ap[p];
            piv[p] = d;
            const double u = __builtin_sqrt(d), inv = 1.0 / u;
            ap[p] = u;
            for (int64_t j = p + 1; j < B; ++j) ap[j] *= inv;
        }
    }
}

/* V = U^-1 for the upper triangular U in A's upper triangle (row-major, stride B), written to
   the upper triangle of V (stride bp; its other entries are zero and stay zero), PANEL rows at
   a time from the bottom: V[i][j] = (delta_ij - sum_{i<k<=j} U[i][k] V[k][j]) / U[i][i]. The
   part over rows below the panel is one product (eight accumulators of 8 columns); Up holds
   the panel's entries of U, transposed. */
static void invert_upper(const double *U, int64_t B, double *V, int64_t bp, double *Up) {
    for (int64_t K = (B - 1) / PANEL * PANEL; K >= 0; K -= PANEL) {
        const int64_t kw = B - K < PANEL ? B - K : PANEL, E = K + kw;
        for (int64_t k = E; k < B; ++k)
            for (int64_t r = 0; r < PANEL; ++r) Up[k * PANEL + r] = U[(K + r) * B + k];
        for (int64_t j = E; j < B; j += 8) { /* kw == PANEL here: E is a multiple of 8 */
            v8d acc[PANEL];
            for (int r = 0; r < PANEL; ++r) acc[r] = (v8d){0};
            const int64_t stop = j + 8 < B ? j + 8 : B;
            for (int64_t k = E; k < stop; ++k) {
                const v8d v = *(const v8d *)(V + k * bp + j);
                for (int r = 0; r < PANEL; ++r) acc[r] += Up[k * PANEL + r] * v;
            }
            for (int r = 0; r < PANEL; ++r) *(v8d *)(V + (K + r) * bp + j) = -acc[r];
        }
        for (int64_t r = kw - 1; r >= 0; --r) {
            const int64_t i = K + r;
            double *vi = V + i * bp;
            for (int64_t j = i + 1; j < E; ++j) vi[j] = 0.0;
            for (int64_t l = r + 1; l < kw; ++l) {
                const double f = U[i * B + K + l];
                const double *vl = V + (K + l) * bp;
                for (int64_t j = K + l; j < B; ++j) vi[j] -= f * vl[j];
            }
            const double inv = 1.0 / U[i * B + i];
            for (int64_t j = i + 1; j < B; ++j) vi[j] *= inv;
            vi[i] = inv;
        }
    }
}

/* A <- (A + damp*I)^-1 for a symmetric positive definite A given by its upper triangle: the
   Cholesky factor U, its inverse V, and A^-1 = V V^T = X^T X with X = V^T (lower triangular),
   formed by the Gram kernel over X's rows; then mirrored into a full symmetric matrix. B^3
   flops in all, as LAPACK's potrf + potri, with every step's inner loops vectorised. */
static void cholesky_inverse(double *A, int64_t B, double damp, double *piv, double *V,
                             double *X, double *Up, int64_t bp) {
    for (int64_t i = 0; i < B; ++i) A[i * B + i] += damp;
    cholesky_upper(A, B, piv, Up);
    invert_upper(A, B, V, bp, Up);
    for (int64_t i0 = 0; i0 < B; i0 += 8) /* X = V^T, 8 x 8 tiles */
        for (int64_t k0 = i0; k0 < B; k0 += 8)
            for (int64_t i = i0; i < i0 + 8 && i < B; ++i)
                for (int64_t k = k0 > i ? k0 : i; k < k0 + 8 && k < B; ++k)
                    X[k * bp + i] = V[i * bp + k];
    gram_upper(X, B, B, bp, 1.0, A, 1, 0);
    for (int64_t i0 = 0; i0 < B; i0 += 8) { /* mirror the upper triangle, 8 x 8 tiles */
        const int64_t i1 = i0 + 8 < B ? i0 + 8 : B;
        for (int64_t j0 = i0; j0 < B; j0 += 8) {
            const int64_t j1 = j0 + 8 < B ? j0 + 8 : B;
            for (int64_t i = i0; i < i1; ++i)
                for (int64_t j = j0 > i + 1 ? j0 : i + 1; j < j1; ++j) A[j * B + i] = A[i * B + j];
        }
    }
}

int mfac_direct_invert(double *a, int64_t B, int64_t b_begin, int64_t b_end, double damp,
                       double *piv) {
    const int64_t bp = round_up(B, GRAM_COLS);
    double *work = calloc((size_t)(2 * B * bp + PANEL * B), sizeof(double));
    if (!work) return -1;
    double *V = work, *X = work + B * bp, *Up = work + 2 * B * bp;
    for (int64_t b = b_begin; b < b_end; ++b)
        cholesky_inverse(a + b * B * B, B, damp, piv + b * B, V, X, Up, bp);
    free(work);
    return 0;
}

/* Woodbury blocks: in place, K_b + damp*I = U^T U for every block's m x m K_b (upper triangle
   read; U written to it), with the pivots as for the direct form. */
int mfac_woodbury_factor(double *a, int64_t m, int64_t b_begin, int64_t b_end, double damp,
                         double *piv) {
    double *Up = malloc((size_t)(PANEL * m) * sizeof(double));
    if (!Up) return -1;
    for (int64_t b = b_begin; b < b_end; ++b) {
        double *A = a + b * m * m;
        for (int64_t i = 0; i < m; ++i) A[i * m + i] += damp;
        cholesky_upper(A, m, piv + b * m, Up);
    }
    free(Up);
    return 0;
}

/* Woodbury blocks: G_b <- Q_b = U_b^-T G_b in place (U_b from mfac_woodbury_factor), column
   tiles of each block widened into a float64 m x w panel that stays in cache (at most 256
   KiB), solved PANEL rows at a time (the rows above the panel in one product: eight rows by
   sixteen columns of accumulators), and written back in the buffer's precision. */
#define WOODBURY_SOLVE(NAME, T)                                                                \
int NAME(T *g, int64_t ld, int64_t m, int64_t B, int64_t b_begin, int64_t b_end,            \
         const double *u) {                                                                  \
    int64_t w = (32768 / m) / 16 * 16;                                                       \
    if (w < 16) w = 16;                                                                      \
    double *Q = calloc((size_t)(m * w + m * PANEL), sizeof(double));                        \
    if (!Q) return -1;                                                                       \
    double *Lp = Q + m * w;                                                                  \
    for (int64_t b = b_begin; b < b_end; ++b) {                                              \
        const double *U = u + b * m * m;                                                     \
        for (int64_t c0 = 0; c0 < B; c0 += w) {                                              \
            const int64_t wc = B - c0 < w ? B - c0 : w, wv = wc / 16 * 16;                   \
            T *src = g + b * B + c0;                                                         \
            for (int64_t i = 0; i < m; ++i)                                                  \
                for (int64_t r = 0; r < wc; ++r) Q[i * w + r] = (double)src[i * ld + r];     \
            for (int64_t K = 0; K < m; K += PANEL) {                                         \
                const int64_t kw = m - K < PANEL ? m - K : PANEL;                            \
                if (K > 0) {                                                                 \
                    for (int64_t k = 0; k < K; ++k)                                          \
                        for (int64_t r = 0; r < PANEL; ++r)                                  \
                            Lp[k * PANEL + r] = r < kw ? U[k * m + K + r] : 0.0;             \
                    for (int64_t j = 0; j < wv; j += 16) {                                   \
                        v8d acc[PANEL][2];                                                   \
                        for (int r = 0; r < PANEL; ++r) {                                    \
                            const int64_t row = K + (r < kw ? r : 0);                        \
                            acc[r][0] = *(v8d *)(Q + row * w + j);                           \
                            acc[r][1] = *(v8d *)(Q + row * w + j + 8);                       \
                        }                                                                    \
                        for (int64_t k = 0; k < K; ++k) {                                    \
                            const v8d q0 = *(const v8d *)(Q + k * w + j);                    \
                            const v8d q1 = *(const v8d *)(Q + k * w + j + 8);                \
                            for (int r = 0; r < PANEL; ++r) {                                \
                                acc[r][0] -= Lp[k * PANEL + r] * q0;                         \
                                acc[r][1] -= Lp[k * PANEL + r] * q1;                         \
                            }                                                                \
                        }                                                                    \
                        for (int r = 0; r < kw; ++r) {                                       \
                            *(v8d *)(Q + (K + r) * w + j) = acc[r][0];                       \
                            *(v8d *)(Q + (K + r) * w + j + 8) = acc[r][1];                   \
                        }                                                                    \
                    }                                                                        \
                    for (int64_t r = 0; r < kw; ++r)                                         \
                        for (int64_t j = wv; j < wc; ++j) {                                  \
                            double s = Q[(K + r) * w + j];                                   \
                            for (int64_t k = 0; k < K; ++k) s -= Lp[k * PANEL + r] * Q[k * w + j]; \
                            Q[(K + r) * w + j] = s;                                          \
                        }                                                                    \
                }                                                                            \
                for (int64_t r = 0; r < kw; ++r) {                                           \
                    const int64_t i = K + r;                                                 \
                    double *qi = Q + i * w;                                                  \
                    for (int64_t l = 0; l < r; ++l) {                                        \
                        const double f = U[(K + l) * m + i];                                 \
                        const double *ql = Q + (K + l) * w;                                  \
                        for (int64_t j = 0; j < wc; ++j) qi[j] -= f * ql[j];                 \
                    }                                                                        \
                    const double inv = 1.0 / U[i * m + i];                                   \
                    for (int64_t j = 0; j < wc; ++j) qi[j] *= inv;                           \
                }                                                                            \
            }                                                                                \
            for (int64_t i = 0; i < m; ++i)                                                  \
                for (int64_t r = 0; r < wc; ++r) src[i * ld + r] = (T)Q[i * w + r];         \
        }                                                                                    \
    }                                                                                        \
    free(Q);                                                                                 \
    return 0;                                                                                \
}
WOODBURY_SOLVE(mfac_woodbury_solve_f32, float)
WOODBURY_SOLVE(mfac_woodbury_solve_f64, double)
