/* y[t, o] = sum_i x[t, i] * w[o, i] for bf16 x [n, in], w [out, in], y [n, out]: one token's or a few tokens'
 * products with a model's weights, the part of a decode pass that reads the weights.
 *
 * Why: at 1-12 tokens a pass is a weight read, and torch 2.13's bf16 F.linear streamed SmolLM2's weights
 * at 9-14 GB/s on the 2-core AVX-512 machine whose plain reads run at ~29 GB/s. This loop reads each
 * weight row once per call (8 rows at a time, a 2-token tile of accumulators reusing every load, the rows
 * 32 ahead prefetched) and reached 18-28 GB/s there (cluster/models/native.py times it against F.linear).
 *
 * Accumulation is fp32 (AVX512-BF16 dot products) and the result is rounded to bf16 once, to nearest
 * even, as F.linear does; only the order of the fp32 additions differs. in must be a multiple of 32.
 * Threads: OpenMP, the count passed in (torch's own), the runtime torch already loaded. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

#define R 8    /* weight rows per tile */
#define PF 32  /* prefetch the rows this far ahead */

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);  /* round to nearest even (no NaNs reach here) */
    return (uint16_t)(u >> 16);
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Rows o0 .. o0 + R - 1 against tokens t0 and, when two, t0 + 1: each weight load feeds both. */
static inline void tile(const uint16_t *x, const uint16_t *wb, const uint16_t *pf, uint16_t *y,
                        int t0, int two, int in, int out, int o0) {
    __m512 a0[R], a1[R];
    for (int r = 0; r < R; r++) a0[r] = a1[r] = _mm512_setzero_ps();
    const uint16_t *x0 = x + (size_t)t0 * in, *x1 = x0 + in;
    for (int i = 0; i < in; i += 32) {
        if (pf)
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)(pf + (size_t)r * in + i), _MM_HINT_T0);
        __m512bh v0 = (__m512bh)_mm512_loadu_si512(x0 + i);
        if (two) {
            __m512bh v1 = (__m512bh)_mm512_loadu_si512(x1 + i);
            for (int r = 0; r < R; r++) {
                __m512bh wv = (__m512bh)_mm512_loadu_si512(wb + (size_t)r * in + i);
                a0[r] = _mm512_dpbf16_ps(a0[r], wv, v0);
                a1[r] = _mm512_dpbf16_ps(a1[r], wv, v1);
            }
        } else {
            for (int r = 0; r < R; r++)
                a0[r] = _mm512_dpbf16_ps(a0[r], (__m512bh)_mm512_loadu_si512(wb + (size_t)r * in + i), v0);
        }
    }
    for (int r = 0; r < R; r++) {
        y[(size_t)t0 * out + o0 + r] = to_bf16(_mm512_reduce_add_ps(a0[r]));
        if (two) y[(size_t)(t0 + 1) * out + o0 + r] = to_bf16(_mm512_reduce_add_ps(a1[r]));
    }
}

void bf16_products(const uint16_t *x, const uint16_t *w, uint16_t *y, int n, int in, int out, int threads) {
    int tiles = out / R;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < tiles; b++) {
        int o0 = b * R;
        const uint16_t *wb = w + (size_t)o0 * in;
        const uint16_t *pf = o0 + PF + R <= out ? w + (size_t)(o0 + PF) * in : 0;
        for (int t = 0; t < n; t += 2)
            tile(x, wb, t == 0 ? pf : 0, y, t, n - t >= 2, in, out, o0);
    }
    for (int o = tiles * R; o < out; o++)  /* the last out % R rows, plainly */
        for (int t = 0; t < n; t++) {
            float s = 0;
            for (int i = 0; i < in; i++) s += from_bf16(x[(size_t)t * in + i]) * from_bf16(w[(size_t)o * in + i]);
            y[(size_t)t * out + o] = to_bf16(s);
        }
}

/* HF's RMSNorm for bf16 rows x [n, dim]: normalise in fp32, round to bf16, then scale by the bf16 weight
 * (the product rounded to bf16), as LlamaRMSNorm computes it, in one call instead of four torch ops
 * (18 -> 4 us a call on 2 threads here, 61 calls a SmolLM2 pass). Only the order of the fp32 sum of squares
 * differs from torch's. */
void bf16_rms_norm(const uint16_t *x, const uint16_t *w, uint16_t *y, int n, int dim, float eps) {
    for (int t = 0; t < n; t++) {
        const uint16_t *xt = x + (size_t)t * dim;
        uint16_t *yt = y + (size_t)t * dim;
        float ss = 0;
        for (int i = 0; i < dim; i++) { float v = from_bf16(xt[i]); ss += v * v; }
        float scale = 1.0f / sqrtf(ss / dim + eps);
        for (int i = 0; i < dim; i++)
            yt[i] = to_bf16(from_bf16(w[i]) * from_bf16(to_bf16(from_bf16(xt[i]) * scale)));
    }
}
