/* bf16 <-> fp32 for the kernels in this folder: bf16 tensors are uint16 here. Rounding is to nearest-even,
 * as torch's bf16 casts do. (native/build.py hashes this header with each source that includes it.) */
#ifndef DT_BF16_H
#define DT_BF16_H
#include <stdint.h>
#include <string.h>

static inline float dt_bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t dt_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays a (quiet) NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                          /* round to nearest even */
    return (uint16_t)(u >> 16);
}
#endif
