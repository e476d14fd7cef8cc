/* 4-bit (NF4/FP4) blockwise dequantization on x86 CPUs (see deltatune/native/dequant.py).
 *
 *   dt_dequant4   out[v] = code[nibble(v)] * absmax[v / blocksize]     for v in [0, n): one tile of W
 *   dt_linear4    y = x · Wᵀ for few input rows, W dequantized in registers and never stored
 *
 * Byte i of ``packed`` holds values 2i (high nibble) and 2i + 1 (low nibble), bitsandbytes' layout; the
 * product is formed in fp32 and, for bf16 output, rounded to nearest-even once: the same bits as the
 * torch path (gather both levels of a byte, multiply by the block's absmax, cast).
 *
 * Why compiled: the torch path is four passes over a tile (widen the codes to int32, gather, scale,
 * cast), each a fork/join of torch's threads. Here a tile is one pass: with AVX-512 the 16 levels sit
 * in one register and each nibble is looked up with a permute, 32 values per 16 bytes.
 */
#include <stdint.h>
#include <string.h>

#include "dt_bf16.h"

/* No fused multiply-add where the source writes a product and a sum: a block's double-quantized absmax is
 * level * nested + offset rounded twice, as torch computes it (the dot products use explicit FMA intrinsics). */
#ifdef __GNUC__
#ifndef __clang__
#pragma GCC optimize("fp-contract=off")
#endif
#endif
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define DT_ROWS 8 /* input rows per pass over a row of W in dt_linear4 */
#define DT_SERIAL_BELOW 65536 /* values: below this, waking the second thread costs more than it saves */

/* Values [v0, v1) of one block (v0 even), scale s: the scalar path and every vector path's tail. */
static inline void dt_scalar(const uint8_t *packed, const float *code, float s, int64_t v0, int64_t v1,
                             float *out32, uint16_t *out16) {
    for (int64_t v = v0; v < v1; v++) {
        const uint8_t byte = packed[v >> 1];
        const float x = code[(v & 1) ? (byte & 15) : (byte >> 4)] * s;
        if (out32) out32[v] = x;
        else out16[v] = dt_f32_to_bf16(x);
    }
}

#ifdef __AVX512F__
static inline __m256i dt_round_bf16_x16(__m512 x) { /* finite inputs: codes times a finite absmax */
    __m512i u = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}
#endif

#ifdef __AVX512F__
/* The 32 values of 16 code bytes times s, in order, as two vectors: the 16 levels sit in one register and
 * each nibble is a permute; the high nibble of a byte comes first. */
static inline void dt_decode32(const uint8_t *bytes16, __m512 lut, __m512 s, __m512 *w0, __m512 *w1) {
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bytes16));
    const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), lut);
    const __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)), lut);
    *w0 = _mm512_mul_ps(_mm512_permutex2var_ps(hi, first, lo), s);
    *w1 = _mm512_mul_ps(_mm512_permutex2var_ps(hi, second, lo), s);
}
#endif

static void dt_block(const uint8_t *packed, const float *code, float s, int64_t v0, int64_t v1, float *out32,
                     uint16_t *out16) {
    int64_t v = v0;
#ifdef __AVX512F__
    const __m512 lut = _mm512_loadu_ps(code), scale = _mm512_set1_ps(s);
    for (; v + 32 <= v1; v += 32) {
        __m512 a, b;
        dt_decode32(packed + (v >> 1), lut, scale, &a, &b);
        if (out32) {
            _mm512_storeu_ps(out32 + v, a);
            _mm512_storeu_ps(out32 + v + 16, b);
        } else {
            _mm256_storeu_si256((__m256i *)(out16 + v), dt_round_bf16_x16(a));
            _mm256_storeu_si256((__m256i *)(out16 + v + 16), dt_round_bf16_x16(b));
        }
    }
#endif
    dt_scalar(packed, code, s, v, v1, out32, out16);
}

/* n values from the start of a block: ``packed`` and ``absmax`` point at that block. out32 or out16 is NULL. */
static void dt_dequant4(const uint8_t *packed, const float *absmax, const float *code, int64_t n, int64_t blocksize,
                        float *out32, uint16_t *out16, int threads) {
    const int64_t blocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= DT_SERIAL_BELOW)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t v1 = (b + 1) * blocksize < n ? (b + 1) * blocksize : n;
        dt_block(packed, code, absmax[b], b * blocksize, v1, out32, out16);
    }
}

void dt_dequant4_f32(const uint8_t *packed, const float *absmax, const float *code, int64_t n, int64_t blocksize,
                     float *out, int threads) {
    dt_dequant4(packed, absmax, code, n, blocksize, out, NULL, threads);
}

void dt_dequant4_bf16(const uint8_t *packed, const float *absmax, const float *code, int64_t n, int64_t blocksize,
                      uint16_t *out, int threads) {
    dt_dequant4(packed, absmax, code, n, blocksize, NULL, out, threads);
}

/* dt_linear4: y = x · Wᵀ for few rows of x. For each output feature o (a row of W, split over OpenMP threads)
 * and 32 values of that row at a time: decode them in registers, scale by their block's absmax, multiply into up
 * to DT_ROWS input rows' fp32 accumulators. W is read once as its 4-bit codes, an eighth of fp32's bytes, and
 * never written: at a few rows a dense fp32 layer is bound by reading its weight, so this beats it.
 * Contract (checked by the caller): in % 32 == 0 (32 values never straddle a block: blocksizes are powers of
 * two >= 32); x (n, in) and y (n, out) contiguous, fp32 or bf16 alike; fp32 accumulation, bf16 rounded once.
 * A block's absmax is read as fp32, or decoded from double quantization here (a decode step would otherwise
 * redo it in torch for the whole layer at every call: a quarter to a third of the call's time). */

/* The blocks' absmax: fp32 values (f32), or 8-bit codes into the dynamic map times the nested block's scale,
 * plus the offset (QLoRA's double quantization, nested blocks of 256). */
typedef struct {
    const float *f32;
    const uint8_t *codes;
    const float *map, *nested;
    float offset;
} dt_scales;

static inline float dt_scale(const dt_scales *a, int64_t block) {
    if (!a->codes) return a->f32[block];
    const float level = a->map[a->codes[block]] * a->nested[block / 256];
    return level + a->offset;
}

/* Rows r0..r0+m of x (fp32 copies, xs[m][in]) times row o of W: out[j] for j < m. */
static void dt_dot_row(const float *xs, int64_t in, int m, const uint8_t *codes, const dt_scales *absmax,
                       int64_t first_value, int64_t blocksize, const float *code, float *out) {
#ifdef __AVX512F__
    __m512 acc[DT_ROWS];
    for (int j = 0; j < m; j++) acc[j] = _mm512_setzero_ps();
    const __m512 lut = _mm512_loadu_ps(code);
    for (int64_t k = 0; k < in; k += 32) {
        __m512 w0, w1;
        dt_decode32(codes + k / 2, lut, _mm512_set1_ps(dt_scale(absmax, (first_value + k) / blocksize)), &w0, &w1);
        for (int j = 0; j < m; j++) {
            const float *xj = xs + j * in + k;
            acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(xj), w0, acc[j]);
            acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(xj + 16), w1, acc[j]);
        }
    }
    for (int j = 0; j < m; j++) out[j] = _mm512_reduce_add_ps(acc[j]);
#else
    for (int j = 0; j < m; j++) out[j] = 0.0f;
    for (int64_t k = 0; k < in; k++) {
        const uint8_t byte = codes[k / 2];
        const float w = code[(k & 1) ? (byte & 15) : (byte >> 4)] * dt_scale(absmax, (first_value + k) / blocksize);
        for (int j = 0; j < m; j++) out[j] += xs[j * in + k] * w;
    }
#endif
}

/* x: n x in (fp32 if xf else bf16 xh), y likewise n x out. xs: an fp32 scratch of n x in for bf16 x (the
 * caller's; unused for fp32). */
static void dt_linear4(const float *xf, const uint16_t *xh, const uint8_t *packed, const dt_scales *absmax,
                       const float *code, float *yf, uint16_t *yh, float *xs, int64_t n, int64_t in, int64_t out,
                       int64_t blocksize, int threads) {
    const float *xv = xf;
    if (xh) {
        for (int64_t i = 0; i < n * in; i++) xs[i] = dt_bf16_to_f32(xh[i]);
        xv = xs;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const uint8_t *codes = packed + o * in / 2;
        for (int64_t r0 = 0; r0 < n; r0 += DT_ROWS) {
            const int m = n - r0 < DT_ROWS ? (int)(n - r0) : DT_ROWS;
            float dots[DT_ROWS];
            dt_dot_row(xv + r0 * in, in, m, codes, absmax, o * in, blocksize, code, dots);
            for (int j = 0; j < m; j++) {
                if (yf) yf[(r0 + j) * out + o] = dots[j];
                else yh[(r0 + j) * out + o] = dt_f32_to_bf16(dots[j]);
            }
        }
    }
}

void dt_linear4_f32(const float *x, const uint8_t *packed, const float *absmax, const uint8_t *absmax_codes,
                    const float *map, const float *nested, float offset, const float *code, float *y, float *scratch,
                    int64_t n, int64_t in, int64_t out, int64_t blocksize, int threads) {
    const dt_scales scales = {absmax, absmax_codes, map, nested, offset};
    dt_linear4(x, NULL, packed, &scales, code, y, NULL, scratch, n, in, out, blocksize, threads);
}

void dt_linear4_bf16(const uint16_t *x, const uint8_t *packed, const float *absmax, const uint8_t *absmax_codes,
                     const float *map, const float *nested, float offset, const float *code, uint16_t *y,
                     float *scratch, int64_t n, int64_t in, int64_t out, int64_t blocksize, int threads) {
    const dt_scales scales = {absmax, absmax_codes, map, nested, offset};
    dt_linear4(NULL, x, packed, &scales, code, NULL, y, scratch, n, in, out, blocksize, threads);
}
