/* Fused mixed-adapter LoRA in bf16, for x86 CPUs with AVX512-BF16 (see deltatune/serving/cpu_kernel.py).
 *
 * The same update as mixed_lora.c, for bf16 tensors: for every row i of a batch and token t of that row,
 *     h      = x[i, t, :] · At_i          (At_i: in × r, bf16; fp32 sums, then rounded to bf16)
 *     y[i,t] += h · Bt_i                  (Bt_i: r × out, bf16, scaled; fp32 sums, then rounded to bf16)
 * which is what torch's bf16 bmm path computes (two products, each rounded to bf16 once).
 *
 * Why: in bf16 the base layer's GEMM runs ~2x faster than in fp32 on this project's CPU, so the
 * low-rank update must too, or its share of the layer doubles. torch's bf16 bmm at r = 16 is the
 * thin shape oneDNN handles worst. Here VDPBF16PS multiplies 32 bf16 pairs and adds them into 16 fp32
 * sums per instruction: the shrink takes pairs along the input dimension (x[k], x[k+1] broadcast,
 * At's rows k and k+1 interleaved in a register), the expand pairs along r. Tiles of 8 tokens share
 * each interleaved factor register, and each tile's update is added into rows of y still in L1.
 *
 * With ``init`` non-NULL y is overwritten: y[i,t] = init + h · Bt_i, y never read (init: out bf16
 * values, the bias or zeros), so the caller's base GEMM can accumulate into y afterwards.
 *
 * Layout contract (checked by the Python caller): r is a multiple of 8 and at most DT_MAX_R; tokens
 * are contiguous within a row (token stride = in for x, out for y); every pointer is to bf16.
 * Built separately from mixed_lora.c, with -mavx512f -mavx512bw -mavx512vl -mavx512bf16, and only
 * called where torch reports AVX512-BF16.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define DT_TILE 8
#define DT_MAX_R 256

typedef uint16_t bf16;

typedef int32_t __attribute__((may_alias, aligned(2))) pair32;  /* two adjacent bf16, read as one 32-bit value */

static const short INTERLEAVE[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                     8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

/* Two 16-column rows (r0: row k, r1: row k+1) interleaved as VDPBF16PS reads them: lane i holds
 * (row k col i, row k+1 col i). */
static inline __m512bh interleave(__m256i r0, __m256i r1) {
    const __m512i idx = _mm512_loadu_si512(INTERLEAVE);
    return (__m512bh)_mm512_permutexvar_epi16(idx, _mm512_inserti64x4(_mm512_castsi256_si512(r0), r1, 1));
}

static inline __m512 widen(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }

static inline __m256i narrow(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

/* acc[t] += Σ_k v_t[k] · M[k][c0 .. c0+16) over k = 0..n for T vectors v_t (bf16, contiguous) and the
 * (n × ld) bf16 matrix M, masked to the valid columns. Pairs along k: the pair (v_t[k], v_t[k+1]) is
 * broadcast from memory, M's rows k and k+1 interleaved once for all T. An odd n ends with a pair
 * padded with zero. */
static inline __attribute__((always_inline)) void dot_block(__m512 acc[DT_TILE], const bf16 *const v[DT_TILE],
                                                            const bf16 *m, int64_t ld, int64_t n, int64_t c0,
                                                            __mmask16 mask, const int T) {
    int64_t k = 0;
    for (; k + 1 < n; k += 2) {
        const __m512bh b = interleave(_mm256_maskz_loadu_epi16(mask, m + k * ld + c0),
                                      _mm256_maskz_loadu_epi16(mask, m + (k + 1) * ld + c0));
        for (int t = 0; t < T; t++)
            acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)_mm512_set1_epi32(*(const pair32 *)(v[t] + k)), b);
    }
    if (k < n) {
        const __m512bh b = interleave(_mm256_maskz_loadu_epi16(mask, m + k * ld + c0), _mm256_setzero_si256());
        for (int t = 0; t < T; t++)
            acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)_mm512_set1_epi32((int)v[t][k]), b);
    }
}

static inline __mmask16 columns(int64_t width, int64_t c0) {
    return width - c0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (width - c0)) - 1);
}

/* h[t][j0 .. j0+16) = x_t · At[:, j0 .. j0+16), rounded to bf16, for T tokens. */
static inline __attribute__((always_inline)) void shrink(const bf16 *const xs[DT_TILE], const bf16 *at, int64_t at_k,
                                                         int64_t in, int64_t r, bf16 h[DT_TILE][DT_MAX_R],
                                                         int64_t j0, const int T) {
    const __mmask16 mask = columns(r, j0);
    __m512 acc[DT_TILE];
    for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
    dot_block(acc, xs, at, at_k, in, j0, mask, T);
    for (int t = 0; t < T; t++) _mm256_mask_storeu_epi16(&h[t][j0], mask, narrow(acc[t]));
}

/* y[t][o0 .. o0+16) = (init or y[t]) + h[t][:r] · Bt[:, o0 .. o0+16), for the first n of T tokens. */
static inline __attribute__((always_inline)) void expand(bf16 *const ys[DT_TILE], int n, const bf16 *bt, int64_t bt_j,
                                                         int64_t r, bf16 h[DT_TILE][DT_MAX_R], int64_t o0,
                                                         int64_t out, const bf16 *init, const int T) {
    const __mmask16 mask = columns(out, o0);
    const bf16 *hs[DT_TILE];
    __m512 acc[DT_TILE];
    for (int t = 0; t < T; t++) {
        hs[t] = h[t];
        acc[t] = widen(_mm256_maskz_loadu_epi16(mask, (init ? init : ys[t]) + o0));
    }
    dot_block(acc, hs, bt, bt_j, r, o0, mask, T);
    for (int t = 0; t < T && t < n; t++) _mm256_mask_storeu_epi16(ys[t] + o0, mask, narrow(acc[t]));
}

int dt_max_rank_bf16(void) { return DT_MAX_R; }

int dt_mixed_lora_bf16(bf16 *y, const bf16 *x, const bf16 *At, const bf16 *Bt, int64_t b, int64_t L, int64_t in,
                       int64_t out, int64_t r, int64_t x_row, int64_t y_row, int64_t at_row, int64_t at_k,
                       int64_t bt_row, int64_t bt_j, const bf16 *init, int nthreads) {
    if (r % 8 != 0 || r > DT_MAX_R || r <= 0) return 1;
    const int64_t tiles = (L + DT_TILE - 1) / DT_TILE;
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < b; i++) {
        for (int64_t q = 0; q < tiles; q++) {
            bf16 h[DT_TILE][DT_MAX_R];
            const int64_t t0 = q * DT_TILE;
            const int n = (int)(L - t0 < DT_TILE ? L - t0 : DT_TILE);
            const bf16 *at = At + i * at_row, *bt = Bt + i * bt_row;
            const bf16 *xs[DT_TILE];
            bf16 *ys[DT_TILE];
            for (int a = 0; a < DT_TILE; a++) {  /* a short tile repeats its last token (never stored) */
                const int64_t t = t0 + (a < n ? a : n - 1);
                xs[a] = x + i * x_row + t * in;
                ys[a] = y + i * y_row + t * out;
            }
            if (n == DT_TILE) {
                for (int64_t j = 0; j < r; j += 16) shrink(xs, at, at_k, in, r, h, j, DT_TILE);
                for (int64_t o = 0; o < out; o += 16) expand(ys, n, bt, bt_j, r, h, o, out, init, DT_TILE);
            } else {  /* decode steps and the end of a row: one token at a time */
                for (int a = 0; a < n; a++) {
                    const bf16 *x1[DT_TILE] = {xs[a]};
                    bf16 *y1[DT_TILE] = {ys[a]};
                    bf16 h1[DT_TILE][DT_MAX_R];
                    for (int64_t j = 0; j < r; j += 16) shrink(x1, at, at_k, in, r, h1, j, 1);
                    for (int64_t o = 0; o < out; o += 16) expand(y1, 1, bt, bt_j, r, h1, o, out, init, 1);
                }
            }
        }
    }
    return 0;
}
