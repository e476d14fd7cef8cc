/* Dropout's elementwise work on x86 CPUs (see deltatune/native/dropout.py).
 *
 *   dt_keep_mask      mask[i] = 1 with probability 1 - p: a counter-based hash, no generator state
 *   dt_masked_scale   out = mask ? x * keep : 0           (the dropped input x~ = x * mask / (1 - p))
 *   dt_masked_add     acc += mask ? keep * t : 0          (its gradient term, added in place)
 *
 * Why compiled: torch's CPU generator is one serial Mersenne Twister, so drawing a mask does not scale
 * with threads and cost 0.7-1.0 ms per 4x256x512 mask on this project's 2-core Zen 5, which was most of
 * LoRA dropout's overhead per training step; torch.where with a bool mask and a scalar runs at a
 * fraction of memory speed. Here each element's bits come from SplitMix64's finaliser applied to
 * seed + word * golden ratio (the generator SplitMix64 itself is, so each word is as random as its
 * sequence), which vectorises (AVX-512DQ's 64-bit multiply) and parallelises with no shared state:
 * the mask depends only on (seed, index), never on the thread count.
 *
 * Each 64-bit word feeds four elements, its four 16-bit quarters read as int16 (uniform on
 * [-2^15, 2^15)); element 4w + q is kept when quarter q >= threshold, threshold = round(p * 2^16) - 2^15.
 *
 * bf16 tensors are uint16 here: products are formed in fp32 and rounded to nearest-even, as torch's
 * bf16 elementwise ops do.
 */
#include <stdint.h>
#include <string.h>

#include "dt_bf16.h"

#define DT_GOLDEN 0x9e3779b97f4a7c15ULL
#define DT_SERIAL_BELOW 65536 /* elements: below this, waking the second thread costs more than it saves */

static inline uint64_t dt_mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* The four keep bytes of word w, packed little-endian (byte q = element 4w + q). */
static inline uint32_t dt_keep4(uint64_t seed, int64_t w, int32_t threshold) {
    const uint64_t z = dt_mix(seed + (uint64_t)w * DT_GOLDEN);
    uint32_t out = 0;
    for (int q = 0; q < 4; q++)
        out |= (uint32_t)((int32_t)(int16_t)(uint16_t)(z >> (16 * q)) >= threshold) << (8 * q);
    return out;
}

void dt_keep_mask(uint8_t *mask, int64_t n, uint64_t seed, int32_t threshold, int threads) {
    const int64_t words = n / 4;
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= DT_SERIAL_BELOW)
    for (int64_t w = 0; w < words; w++) {
        const uint32_t bytes = dt_keep4(seed, w, threshold);
        memcpy(mask + 4 * w, &bytes, 4);
    }
    const uint32_t last = dt_keep4(seed, words, threshold); /* the cut last word: n % 4 elements */
    for (int64_t i = 4 * words; i < n; i++) mask[i] = (uint8_t)(last >> (8 * (i - 4 * words)));
}

void dt_masked_scale_f32(const float *x, const uint8_t *mask, float *out, int64_t n, float keep, int threads) {
#pragma omp parallel for simd num_threads(threads) schedule(static) if (n >= DT_SERIAL_BELOW)
    for (int64_t i = 0; i < n; i++) out[i] = mask[i] ? x[i] * keep : 0.0f;
}

void dt_masked_add_f32(float *acc, const float *t, const uint8_t *mask, int64_t n, float keep, int threads) {
#pragma omp parallel for simd num_threads(threads) schedule(static) if (n >= DT_SERIAL_BELOW)
    for (int64_t i = 0; i < n; i++) acc[i] += mask[i] ? keep * t[i] : 0.0f;
}

void dt_masked_scale_bf16(const uint16_t *x, const uint8_t *mask, uint16_t *out, int64_t n, float keep,
                          int threads) {
#pragma omp parallel for simd num_threads(threads) schedule(static) if (n >= DT_SERIAL_BELOW)
    for (int64_t i = 0; i < n; i++) out[i] = mask[i] ? dt_f32_to_bf16(dt_bf16_to_f32(x[i]) * keep) : 0;
}

void dt_masked_add_bf16(uint16_t *acc, const uint16_t *t, const uint8_t *mask, int64_t n, float keep,
                        int threads) {
#pragma omp parallel for simd num_threads(threads) schedule(static) if (n >= DT_SERIAL_BELOW)
    for (int64_t i = 0; i < n; i++)
        if (mask[i]) acc[i] = dt_f32_to_bf16(dt_bf16_to_f32(acc[i]) + keep * dt_bf16_to_f32(t[i]));
}
