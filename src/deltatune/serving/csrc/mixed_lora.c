/* Fused mixed-adapter LoRA for x86 CPUs with AVX2 + FMA, fp32 (see deltatune/serving/cpu_kernel.py).
 *
 * For every row i of a batch and every token t of that row:
 *     h      = x[i, t, :] · At_i          (At_i: in × r, the row's A transposed)
 *     y[i,t] += h · Bt_i                  (Bt_i: r × out, the row's Bᵀ times its scaling)
 *
 * Why hand-written: the shrink x·Aᵀ is a GEMM with an output only r = 16 wide, a shape for which
 * MKL's sgemm/bmm reaches ~60% of the throughput it gets on the base layer's GEMM on this
 * project's CPU. A 6-token × 16-column register tile (12 accumulators, A's row loaded once per k
 * and each token's x broadcast) keeps the FMA units busy, and doing the expand for the same 6
 * tokens right away adds into rows of y that are still in L1. The work is split over
 * (row, 6-token tile) pairs with OpenMP; the library is linked against torch's own libgomp so
 * both share one thread pool.
 *
 * With ``init`` non-NULL the update overwrites y instead: y[i,t] = init + h · Bt_i, y is never read
 * (init: out floats, the layer's bias or zeros). The caller then lets the base GEMM accumulate into
 * y (addmm_ with beta = 1), so y makes one trip through memory instead of three: measured per layer
 * (b = 32 × 128 tokens, caches flushed), 512 -> 512 costs 1.02-1.07x of the base layer this way
 * against 1.07-1.12x for "base GEMM, then y +=".
 *
 * Layout contract (checked by the Python caller): r is a multiple of 8 and at most DT_MAX_R;
 * tokens are contiguous within a row (token stride = in for x, out for y); every pointer is to fp32.
 */
#include <immintrin.h>
#include <stdint.h>

#define DT_TILE 6
#define DT_MAX_R 256

/* h[a][j0 .. j0+16) for the 6 tokens x0..x5 over k = 0..in (one 16-column block of At). */
static inline void shrink6x16(const float *const xs[DT_TILE], const float *at, int64_t at_k, int64_t in,
                              float h[DT_TILE][DT_MAX_R], int64_t j0) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const float *x0 = xs[0], *x1 = xs[1], *x2 = xs[2], *x3 = xs[3], *x4 = xs[4], *x5 = xs[5];
    for (int64_t k = 0; k < in; k++) {
        const __m256 a0 = _mm256_loadu_ps(at + k * at_k), a1 = _mm256_loadu_ps(at + k * at_k + 8);
        __m256 v;
        v = _mm256_broadcast_ss(x0 + k); c00 = _mm256_fmadd_ps(v, a0, c00); c01 = _mm256_fmadd_ps(v, a1, c01);
        v = _mm256_broadcast_ss(x1 + k); c10 = _mm256_fmadd_ps(v, a0, c10); c11 = _mm256_fmadd_ps(v, a1, c11);
        v = _mm256_broadcast_ss(x2 + k); c20 = _mm256_fmadd_ps(v, a0, c20); c21 = _mm256_fmadd_ps(v, a1, c21);
        v = _mm256_broadcast_ss(x3 + k); c30 = _mm256_fmadd_ps(v, a0, c30); c31 = _mm256_fmadd_ps(v, a1, c31);
        v = _mm256_broadcast_ss(x4 + k); c40 = _mm256_fmadd_ps(v, a0, c40); c41 = _mm256_fmadd_ps(v, a1, c41);
        v = _mm256_broadcast_ss(x5 + k); c50 = _mm256_fmadd_ps(v, a0, c50); c51 = _mm256_fmadd_ps(v, a1, c51);
    }
    _mm256_storeu_ps(&h[0][j0], c00); _mm256_storeu_ps(&h[0][j0 + 8], c01);
    _mm256_storeu_ps(&h[1][j0], c10); _mm256_storeu_ps(&h[1][j0 + 8], c11);
    _mm256_storeu_ps(&h[2][j0], c20); _mm256_storeu_ps(&h[2][j0 + 8], c21);
    _mm256_storeu_ps(&h[3][j0], c30); _mm256_storeu_ps(&h[3][j0 + 8], c31);
    _mm256_storeu_ps(&h[4][j0], c40); _mm256_storeu_ps(&h[4][j0 + 8], c41);
    _mm256_storeu_ps(&h[5][j0], c50); _mm256_storeu_ps(&h[5][j0 + 8], c51);
}

/* One token, 8 columns of At: the remainder cases (short tiles, r % 16 == 8). */
static inline void shrink1x8(const float *x, const float *at, int64_t at_k, int64_t in, float *h) {
    __m256 c0 = _mm256_setzero_ps(), c1 = c0;  /* two chains hide the FMA latency */
    int64_t k = 0;
    for (; k + 1 < in; k += 2) {
        c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k), _mm256_loadu_ps(at + k * at_k), c0);
        c1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 1), _mm256_loadu_ps(at + (k + 1) * at_k), c1);
    }
    if (k < in) c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k), _mm256_loadu_ps(at + k * at_k), c0);
    _mm256_storeu_ps(h, _mm256_add_ps(c0, c1));
}

/* y[a][o0 .. o0+16) += h[a][:r] · Bt[:, o0 .. o0+16) for a full 6-token tile. */
static inline void expand6x16(float *const ys[DT_TILE], const float *bt, int64_t bt_j, int64_t r,
                              float h[DT_TILE][DT_MAX_R], int64_t o0, const float *init) {
    __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
    if (init == 0) {
        c00 = _mm256_loadu_ps(ys[0] + o0); c01 = _mm256_loadu_ps(ys[0] + o0 + 8);
        c10 = _mm256_loadu_ps(ys[1] + o0); c11 = _mm256_loadu_ps(ys[1] + o0 + 8);
        c20 = _mm256_loadu_ps(ys[2] + o0); c21 = _mm256_loadu_ps(ys[2] + o0 + 8);
        c30 = _mm256_loadu_ps(ys[3] + o0); c31 = _mm256_loadu_ps(ys[3] + o0 + 8);
        c40 = _mm256_loadu_ps(ys[4] + o0); c41 = _mm256_loadu_ps(ys[4] + o0 + 8);
        c50 = _mm256_loadu_ps(ys[5] + o0); c51 = _mm256_loadu_ps(ys[5] + o0 + 8);
    } else {  /* overwrite: y = init + h·B̃ (init is the bias, or zeros) */
        c00 = c10 = c20 = c30 = c40 = c50 = _mm256_loadu_ps(init + o0);
        c01 = c11 = c21 = c31 = c41 = c51 = _mm256_loadu_ps(init + o0 + 8);
    }
    for (int64_t j = 0; j < r; j++) {
        const __m256 b0 = _mm256_loadu_ps(bt + j * bt_j + o0), b1 = _mm256_loadu_ps(bt + j * bt_j + o0 + 8);
        __m256 v;
        v = _mm256_broadcast_ss(&h[0][j]); c00 = _mm256_fmadd_ps(v, b0, c00); c01 = _mm256_fmadd_ps(v, b1, c01);
        v = _mm256_broadcast_ss(&h[1][j]); c10 = _mm256_fmadd_ps(v, b0, c10); c11 = _mm256_fmadd_ps(v, b1, c11);
        v = _mm256_broadcast_ss(&h[2][j]); c20 = _mm256_fmadd_ps(v, b0, c20); c21 = _mm256_fmadd_ps(v, b1, c21);
        v = _mm256_broadcast_ss(&h[3][j]); c30 = _mm256_fmadd_ps(v, b0, c30); c31 = _mm256_fmadd_ps(v, b1, c31);
        v = _mm256_broadcast_ss(&h[4][j]); c40 = _mm256_fmadd_ps(v, b0, c40); c41 = _mm256_fmadd_ps(v, b1, c41);
        v = _mm256_broadcast_ss(&h[5][j]); c50 = _mm256_fmadd_ps(v, b0, c50); c51 = _mm256_fmadd_ps(v, b1, c51);
    }
    _mm256_storeu_ps(ys[0] + o0, c00); _mm256_storeu_ps(ys[0] + o0 + 8, c01);
    _mm256_storeu_ps(ys[1] + o0, c10); _mm256_storeu_ps(ys[1] + o0 + 8, c11);
    _mm256_storeu_ps(ys[2] + o0, c20); _mm256_storeu_ps(ys[2] + o0 + 8, c21);
    _mm256_storeu_ps(ys[3] + o0, c30); _mm256_storeu_ps(ys[3] + o0 + 8, c31);
    _mm256_storeu_ps(ys[4] + o0, c40); _mm256_storeu_ps(ys[4] + o0 + 8, c41);
    _mm256_storeu_ps(ys[5] + o0, c50); _mm256_storeu_ps(ys[5] + o0 + 8, c51);
}

/* One token, columns o0 .. o_end of y (any width): the remainder cases. */
static inline void expand1(float *y, const float *bt, int64_t bt_j, int64_t r, const float *h, int64_t o0,
                           int64_t o_end, const float *init) {
    int64_t o = o0;
    for (; o + 8 <= o_end; o += 8) {
        __m256 c = _mm256_loadu_ps((init ? init : y) + o);
        for (int64_t j = 0; j < r; j++) c = _mm256_fmadd_ps(_mm256_broadcast_ss(h + j), _mm256_loadu_ps(bt + j * bt_j + o), c);
        _mm256_storeu_ps(y + o, c);
    }
    for (; o < o_end; o++) {
        float s = init ? init[o] : y[o];
        for (int64_t j = 0; j < r; j++) s += h[j] * bt[j * bt_j + o];
        y[o] = s;
    }
}

int dt_max_rank(void) { return DT_MAX_R; }

int dt_mixed_lora(float *y, const float *x, const float *At, const float *Bt, int64_t b, int64_t L, int64_t in,
                  int64_t out, int64_t r, int64_t x_row, int64_t y_row, int64_t at_row, int64_t at_k,
                  int64_t bt_row, int64_t bt_j, const float *init, int nthreads) {
    if (r % 8 != 0 || r > DT_MAX_R || r <= 0) return 1;
    const int64_t tiles = (L + DT_TILE - 1) / DT_TILE;
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < b; i++) {
        for (int64_t q = 0; q < tiles; q++) {
            float h[DT_TILE][DT_MAX_R];
            const int64_t t0 = q * DT_TILE;
            const int n = (int)(L - t0 < DT_TILE ? L - t0 : DT_TILE);
            const float *at = At + i * at_row, *bt = Bt + i * bt_row;
            const float *xs[DT_TILE];
            float *ys[DT_TILE];
            for (int a = 0; a < n; a++) {
                xs[a] = x + i * x_row + (t0 + a) * in;
                ys[a] = y + i * y_row + (t0 + a) * out;
            }
            if (n == DT_TILE) {
                int64_t j = 0;
                for (; j + 16 <= r; j += 16) shrink6x16(xs, at + j, at_k, in, h, j);
                for (; j < r; j += 8)
                    for (int a = 0; a < n; a++) shrink1x8(xs[a], at + j, at_k, in, &h[a][j]);
                int64_t o = 0;
                for (; o + 16 <= out; o += 16) expand6x16(ys, bt, bt_j, r, h, o, init);
                for (int a = 0; a < n; a++) expand1(ys[a], bt, bt_j, r, h[a], o, out, init);
            } else {
                for (int a = 0; a < n; a++) {
                    for (int64_t j = 0; j < r; j += 8) shrink1x8(xs[a], at + j, at_k, in, &h[a][j]);
                    expand1(ys[a], bt, bt_j, r, h[a], 0, out, init);
                }
            }
        }
    }
    return 0;
}
