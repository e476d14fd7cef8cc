/* 4-bit (NF4/FP4) blockwise dequantization on x86 CPUs (see deltatune/native/dequant.py).
 *
 *   out[v] = code[nibble(v)] * absmax[v / blocksize]     for v in [0, n)
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
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define DT_SERIAL_BELOW 65536 /* values: below this, waking the second thread costs more than it saves */

static inline uint16_t dt_round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays a (quiet) NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                          /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* Values [v0, v1) of one block (v0 even), scale s: the scalar path and every vector path's tail. */
static inline void dt_scalar(const uint8_t *packed, const float *code, float s, int64_t v0, int64_t v1,
                             float *out32, uint16_t *out16) {
    for (int64_t v = v0; v < v1; v++) {
        const uint8_t byte = packed[v >> 1];
        const float x = code[(v & 1) ? (byte & 15) : (byte >> 4)] * s;
        if (out32) out32[v] = x;
        else out16[v] = dt_round_bf16(x);
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

static void dt_block(const uint8_t *packed, const float *code, float s, int64_t v0, int64_t v1, float *out32,
                     uint16_t *out16) {
    int64_t v = v0;
#ifdef __AVX512F__
    const __m512 lut = _mm512_loadu_ps(code), scale = _mm512_set1_ps(s);
    /* outputs 0..15 take hi[0], lo[0], ..., hi[7], lo[7]; outputs 16..31 the rest (lo = index + 16) */
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (; v + 32 <= v1; v += 32) {
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(packed + (v >> 1))));
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), lut);
        const __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)), lut);
        const __m512 a = _mm512_mul_ps(_mm512_permutex2var_ps(hi, first, lo), scale);
        const __m512 b = _mm512_mul_ps(_mm512_permutex2var_ps(hi, second, lo), scale);
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
