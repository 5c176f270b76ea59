/* y[t, o] = sum_i x[t, i] * w[o, i] for bf16 x [n, in], w [out, in], y [n, out]: one token's or a few tokens'
 * products with a model's weights, the part of a decode pass that reads the weights.
 *
 * Why: at 1-12 tokens a pass is a weight read, and torch 2.13's bf16 F.linear streamed SmolLM2's weights
 * at 9-14 GB/s on the 2-core AVX-512 machine whose plain reads run at ~29 GB/s. This loop reads each
 * weight row once per call (8 rows at a time, a 2-token tile of accumulators reusing every load, the rows
 * 32 ahead prefetched into L2) and reached 23-31 GB/s there (cluster/models/native.py times it against
 * F.linear).
 *
 * Accumulation is fp32 (AVX512-BF16 dot products) and the result is rounded to bf16 once, to nearest
 * even, as F.linear does; only the order of the fp32 additions differs. in must be a multiple of 32.
 * Threads: OpenMP, the count passed in (torch's own), the runtime torch already loaded. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

#define R 8    /* weight rows per tile */
#define PF 32  /* prefetch the rows this far ahead, into L2: all of SmolLM2's products at 1 / 4 / 12 tokens
                * took 9.7 / 11.8 / 18.9 ms prefetched into L2 against 11.8 / 14.8 / 21.9 into L1 (2 threads;
                * L2 keeps more misses in flight than L1's fill buffers, so a core streams more at once). */

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
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)(pf + (size_t)r * in + i), _MM_HINT_T1);
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

/* bf16 -> fp32 for 16 values: the bf16 bits are the fp32 value's high half. */
static inline __m512 load16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* exp(x) of 16 floats, x <= 0 (scores less their maximum): 2^n * p(r) with r = x - n ln 2 and Cephes's
 * expf polynomial, relative error ~2e-7, against glibc's scalar expf, ~20 ns a call (the attention loop's
 * largest cost per key before this). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

/* Attention of g rows with w new tokens each over their cached keys and values (a paged pool), as
 * scaled-dot-product attention with a boolean mask computes it, in fp32 with the output rounded to bf16.
 *
 * Why: at a decode step torch's SDPA spent ~50 us a layer on 2 threads here for ~0.4 M multiply-adds
 * (9 query heads x 1 token x ~320 keys x 64), 1.5 ms of a 22 ms SmolLM2 token; this loop took 15 us a
 * layer at 272 keys (two threads).
 *
 *   q      token t of row r, query head h at q[(r * w + t) * q_stride + h * dim] (q/k/v's fused rows)
 *   keys, values  the layer's pool [blocks * bs, kv, dim]; row r's key p sits in block tables[r * nb + p / bs]
 *   mask   [g, stack * w, nb * bs], nonzero where allowed; query head h's token t is row (h % stack) * w + t
 *          (stack = heads / kv query heads share KV head h / stack: GQA, as the torch path stacks them)
 *   out    [g * w, heads, dim]
 * One online softmax per (row, head, token), a block of keys at a time. dim: a multiple of 16, <= 256;
 * bs <= 256. */
void bf16_attention(const uint16_t *q, int q_stride, const uint16_t *keys, const uint16_t *values,
                    const int64_t *tables, int nb, int bs, const uint8_t *mask, uint16_t *out,
                    int g, int w, int heads, int kv, int dim, float scale, int threads) {
    int stack = heads / kv, chunks = dim / 16, span = nb * bs, units = g * heads * w;
    /* One unit is ~span * dim * 2 multiply-adds: threads only where the work outweighs waking them (a
     * SmolLM2 decode step's layer, 9 units over 272 keys: 23.6 us on one thread, 15.4 on two). */
    long work = (long)units * span * dim;
    #pragma omp parallel for schedule(static) num_threads(threads) if (work > 20000)
    for (int u = 0; u < units; u++) {
        int r = u / (heads * w), h = (u / w) % heads, t = u % w, kh = h / stack;
        const uint16_t *qu = q + (size_t)(r * w + t) * q_stride + (size_t)h * dim;
        const uint8_t *m = mask + ((size_t)r * stack * w + (size_t)(h % stack) * w + t) * span;
        __m512 qf[16], acc[16];
        for (int c = 0; c < chunks; c++) {
            qf[c] = _mm512_mul_ps(load16(qu + 16 * c), _mm512_set1_ps(scale));
            acc[c] = _mm512_setzero_ps();
        }
        float best = -INFINITY, total = 0.f, sc[256];
        for (int b = 0; b < nb; b++) {
            size_t base = (size_t)tables[(size_t)r * nb + b] * bs;
            float top = -INFINITY;
            for (int i = 0; i < bs; i++) {
                if (!m[b * bs + i]) { sc[i] = -INFINITY; continue; }
                const uint16_t *k = keys + ((base + i) * kv + kh) * dim;
                __m512 s = _mm512_setzero_ps();
                for (int c = 0; c < chunks; c++) s = _mm512_fmadd_ps(qf[c], load16(k + 16 * c), s);
                sc[i] = _mm512_reduce_add_ps(s);
                if (sc[i] > top) top = sc[i];
            }
            if (top == -INFINITY) continue;
            if (top > best) {  /* a new maximum: rescale what was summed so far */
                float f = expf(best - top);
                total *= f;
                for (int c = 0; c < chunks; c++) acc[c] = _mm512_mul_ps(acc[c], _mm512_set1_ps(f));
                best = top;
            }
            for (int j = 0; j < bs; j += 16) {  /* the block's weights, 16 at a time; masked keys weigh 0 */
                __mmask16 lanes = bs - j >= 16 ? 0xFFFF : (__mmask16)((1u << (bs - j)) - 1);
                __m512 s = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), lanes, sc + j);
                __mmask16 live = _mm512_cmp_ps_mask(s, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
                __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(s, _mm512_set1_ps(best))));
                total += _mm512_reduce_add_ps(e);
                _mm512_mask_storeu_ps(sc + j, lanes, e);
            }
            for (int i = 0; i < bs; i++) {
                if (sc[i] == 0.f) continue;
                const uint16_t *v = values + ((base + i) * kv + kh) * dim;
                __m512 pv = _mm512_set1_ps(sc[i]);
                for (int c = 0; c < chunks; c++) acc[c] = _mm512_fmadd_ps(pv, load16(v + 16 * c), acc[c]);
            }
        }
        uint16_t *o = out + ((size_t)(r * w + t) * heads + h) * dim;
        float inv = total > 0 ? 1.f / total : 0.f;
        for (int c = 0; c < chunks; c++) {
            float lane[16];
            _mm512_storeu_ps(lane, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
            for (int j = 0; j < 16; j++) o[16 * c + j] = to_bf16(lane[j]);
        }
    }
}

/* HF's rotary embedding of q and k (x * cos + rotate_half(x) * sin, each product and the sum rounded to bf16
 * as torch's three bf16 ops round them), k and v written to the layer's KV pool, in one call instead of
 * ~8 torch ops a layer.
 *   qkv    [n, (heads + 2 * kv) * dim], a token's q, k and v heads side by side (the fused product's rows)
 *   cos, sin  [n, dim] (the model's rotary module's, bf16)
 *   write  [n] pool positions of the tokens' keys and values; keys, values [positions, kv, dim]
 *   q_out  [n, heads, dim], the rotated queries */
static inline void rotate(const uint16_t *x, const uint16_t *c, const uint16_t *s, uint16_t *y, int dim) {
    int half = dim / 2;
    for (int i = 0; i < dim; i++) {
        float rot = i < half ? -from_bf16(x[i + half]) : from_bf16(x[i - half]);
        float a = from_bf16(to_bf16(from_bf16(x[i]) * from_bf16(c[i])));
        float b = from_bf16(to_bf16(rot * from_bf16(s[i])));
        y[i] = to_bf16(a + b);
    }
}

void bf16_rope_write(const uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, const int64_t *write,
                     uint16_t *keys, uint16_t *values, uint16_t *q_out, int n, int heads, int kv, int dim) {
    size_t row = (size_t)(heads + 2 * kv) * dim;
    for (int t = 0; t < n; t++) {
        const uint16_t *x = qkv + t * row, *c = cos + (size_t)t * dim, *s = sin + (size_t)t * dim;
        for (int h = 0; h < heads; h++) rotate(x + (size_t)h * dim, c, s, q_out + ((size_t)t * heads + h) * dim, dim);
        uint16_t *k = keys + (size_t)write[t] * kv * dim, *v = values + (size_t)write[t] * kv * dim;
        for (int h = 0; h < kv; h++) rotate(x + (size_t)(heads + h) * dim, c, s, k + (size_t)h * dim, dim);
        memcpy(v, x + (size_t)(heads + kv) * dim, (size_t)kv * dim * 2);
    }
}

/* SwiGLU's middle: y = silu(gate) * up from gu [n, 2 * g] (gate rows then up rows, the fused product's
 * output), each op rounded to bf16 as torch's two bf16 ops round them. */
void bf16_silu_mul(const uint16_t *gu, uint16_t *y, int n, int g) {
    for (int t = 0; t < n; t++) {
        const uint16_t *gate = gu + (size_t)t * 2 * g, *up = gate + g;
        for (int i = 0; i < g; i++) {
            float a = from_bf16(gate[i]);
            float s = from_bf16(to_bf16(a / (1.f + expf(-a))));
            y[(size_t)t * g + i] = to_bf16(s * from_bf16(up[i]));
        }
    }
}
