/* DoRA's elementwise backward on x86 CPUs (see deltatune/native/dora.py).
 *
 * With g = dL/dy (n x out), y the layer's output, b its bias (or none) and c = m / ||W + s B A|| (out,):
 *   gc[i, j]  = g[i, j] * c[j]                    (the gradient the LoRA part sees)
 *   colsum[j] = sum_i g[i, j] * (y[i, j] - b[j])   (dL/dm = colsum / m, in the caller)
 * in one pass over g and y, where torch takes four (g * z, its column sum, g * c, and y - b with a bias).
 *
 * Each thread owns a block of columns (a multiple of 16) for every row, so the sums need no reduction
 * across threads and their order does not depend on the thread count. Products and sums are fp32; for
 * bf16 tensors gc is rounded to nearest-even once.
 */
#include <stdint.h>
#include <string.h>
#include <omp.h>

#define DT_SERIAL_BELOW 65536 /* elements: below this, waking the second thread costs more than it saves */

static inline float dt_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t dt_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays a (quiet) NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                          /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* Columns [j0, j1) of thread t of nt. */
static inline void dt_columns(int64_t out, int t, int nt, int64_t *j0, int64_t *j1) {
    const int64_t per = ((out + nt - 1) / nt + 15) / 16 * 16;
    *j0 = t * per < out ? t * per : out;
    *j1 = *j0 + per < out ? *j0 + per : out;
}

void dt_dora_grad_f32(const float *g, const float *y, const float *bias, const float *scale, float *gc,
                      float *colsum, int64_t n, int64_t out, int threads) {
#pragma omp parallel num_threads(threads) if (n * out >= DT_SERIAL_BELOW)
    {
        int64_t j0, j1;
        dt_columns(out, omp_get_thread_num(), omp_get_num_threads(), &j0, &j1);
        for (int64_t j = j0; j < j1; j++) colsum[j] = 0.0f;
        for (int64_t i = 0; i < n; i++) {
            const float *gi = g + i * out, *yi = y + i * out;
            float *ci = gc + i * out;
#pragma omp simd
            for (int64_t j = j0; j < j1; j++) {
                colsum[j] += gi[j] * (bias ? yi[j] - bias[j] : yi[j]);
                ci[j] = gi[j] * scale[j];
            }
        }
    }
}

void dt_dora_grad_bf16(const uint16_t *g, const uint16_t *y, const uint16_t *bias, const uint16_t *scale,
                       uint16_t *gc, float *colsum, int64_t n, int64_t out, int threads) {
#pragma omp parallel num_threads(threads) if (n * out >= DT_SERIAL_BELOW)
    {
        int64_t j0, j1;
        dt_columns(out, omp_get_thread_num(), omp_get_num_threads(), &j0, &j1);
        for (int64_t j = j0; j < j1; j++) colsum[j] = 0.0f;
        for (int64_t i = 0; i < n; i++) {
            const uint16_t *gi = g + i * out, *yi = y + i * out;
            uint16_t *ci = gc + i * out;
#pragma omp simd
            for (int64_t j = j0; j < j1; j++) {
                const float gv = dt_f32(gi[j]);
                colsum[j] += gv * (bias ? dt_f32(yi[j]) - dt_f32(bias[j]) : dt_f32(yi[j]));
                ci[j] = dt_bf16(gv * dt_f32(scale[j]));
            }
        }
    }
}
