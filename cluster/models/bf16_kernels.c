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

#define R4 4     /* weight rows per tile */
#define PF4 16  /* prefetch the rows this far ahead, into L2 */
#define BIAS 128  /* bf16 bits 0x4300 | q are 128 + q exactly (q < 128): the dot products see q + 128 */

/* Rows o0 .. o0 + R4 - 1 against tokens t0 and, when two, t0 + 1 (a constant where it is inlined, so the
 * accumulators stay in registers). */
static inline __attribute__((always_inline)) void int4_tile(
        const uint16_t *x, const uint8_t *q, const uint16_t *scales, const uint16_t *zeros, const float *xs,
        uint16_t *y, int t0, const int two, int in, int out, int groups, int group, int o0, int pf) {
    const __m512i low4 = _mm512_set1_epi16(0x0F), bias = _mm512_set1_epi16(0x4300);
    const uint16_t *x0 = x + (size_t)t0 * in, *x1 = x0 + in;
    const uint8_t *qb = q + (size_t)o0 * (in / 2);
    __m512 a0[R4], a1[R4];
    for (int r = 0; r < R4; r++) a0[r] = a1[r] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512 p0[R4], p1[R4];
        for (int r = 0; r < R4; r++) p0[r] = p1[r] = _mm512_setzero_ps();
        for (int i = g * group; i < (g + 1) * group; i += 32) {
            __m512bh v0 = (__m512bh)_mm512_loadu_si512(x0 + i), v1;
            if (two) v1 = (__m512bh)_mm512_loadu_si512(x1 + i);
            if (pf && (i & 127) == 0)
                for (int r = 0; r < R4; r++)
                    _mm_prefetch((const char *)(qb + (size_t)(r + PF4) * (in / 2) + i / 2), _MM_HINT_T1);
            for (int r = 0; r < R4; r++) {
                /* 16 bytes -> [bytes, bytes >> 4] -> 32 16-bit lanes, each (its nibble) | 0x4300 */
                __m128i b = _mm_loadu_si128((const __m128i *)(qb + (size_t)r * (in / 2) + i / 2));
                __m512i lanes = _mm512_cvtepu8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(b),
                                                                              _mm_srli_epi16(b, 4), 1));
                __m512bh wv = (__m512bh)_mm512_ternarylogic_epi32(lanes, low4, bias, 0xEA);  /* (a & b) | c */
                p0[r] = _mm512_dpbf16_ps(p0[r], wv, v0);
                if (two) p1[r] = _mm512_dpbf16_ps(p1[r], wv, v1);
            }
        }
        for (int r = 0; r < R4; r++) {
            __m512 sc = _mm512_set1_ps(from_bf16(scales[(size_t)(o0 + r) * groups + g]));
            a0[r] = _mm512_fmadd_ps(p0[r], sc, a0[r]);
            if (two) a1[r] = _mm512_fmadd_ps(p1[r], sc, a1[r]);
        }
    }
    for (int r = 0; r < R4; r++) {  /* + sum_g (z_g - (8 + BIAS) s_g) * sum_{i in g} x_i, 16 groups at a time */
        const uint16_t *sr = scales + (size_t)(o0 + r) * groups, *zr = zeros + (size_t)(o0 + r) * groups;
        __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps();
        int g = 0;
        for (; g + 16 <= groups; g += 16) {
            __m512 m = _mm512_fnmadd_ps(_mm512_set1_ps(8.f + BIAS), load16(sr + g), load16(zr + g));
            c0 = _mm512_fmadd_ps(m, _mm512_loadu_ps(xs + t0 * groups + g), c0);
            if (two) c1 = _mm512_fmadd_ps(m, _mm512_loadu_ps(xs + (t0 + 1) * groups + g), c1);
        }
        float e0 = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], c0));
        float e1 = two ? _mm512_reduce_add_ps(_mm512_add_ps(a1[r], c1)) : 0;
        for (; g < groups; g++) {
            float m = from_bf16(zr[g]) - (8.f + BIAS) * from_bf16(sr[g]);
            e0 += m * xs[t0 * groups + g];
            if (two) e1 += m * xs[(t0 + 1) * groups + g];
        }
        y[(size_t)t0 * out + o0 + r] = to_bf16(e0);
        if (two) y[(size_t)(t0 + 1) * out + o0 + r] = to_bf16(e1);
    }
}

/* y[t, o] = sum_i x[t, i] * w[o, i] for int4 weights with a bf16 scale s and zero z per group of `group`
 * inputs: w = (q - 8) * s + z, q in 0..15 (cluster/models/int4.py). x [n, in] and y [n, out] are bf16.
 *
 * Why: an offloaded target's int4 self-draft spends most of a token on these products, and torch 2.13's
 * CPU int4 kernel streamed them at ~8.6 GB/s here. A row's 32 inputs sit in 16 bytes: byte j holds
 * q[j] in its low nibble and q[16 + j] in its high one, so a widening move and one bit operation turn
 * them into 32 bf16 values 128 + q (bits 0x4300 | q, exact) in x's order, for one AVX512-BF16 dot
 * product each:
 *   sum_i x_i w_i = sum_g s_g * sum_{i in g} x_i (q_i + 128) + sum_g (z_g - 136 s_g) * sum_{i in g} x_i
 * The second term uses per-group sums of x, computed once a call. Accumulation is fp32; y is rounded
 * once. group: a multiple of 32 dividing in; out: a multiple of 4; n <= 64, in / group <= 512 (the caller
 * checks). */
void int4_products(const uint16_t *x, const uint8_t *q, const uint16_t *scales, const uint16_t *zeros,
                   uint16_t *y, int n, int in, int out, int group, int threads) {
    int groups = in / group;
    float xs[64 * 512];
    for (int t = 0; t < n; t++)
        for (int g = 0; g < groups; g++) {
            float s = 0;
            for (int i = 0; i < group; i++) s += from_bf16(x[(size_t)t * in + g * group + i]);
            xs[t * groups + g] = s;
        }
    int tiles = out / R4;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < tiles; b++) {
        int pf = b * R4 + PF4 + R4 <= out;
        for (int t = 0; t < n; t += 2) {
            if (n - t >= 2) int4_tile(x, q, scales, zeros, xs, y, t, 1, in, out, groups, group, b * R4, pf && !t);
            else int4_tile(x, q, scales, zeros, xs, y, t, 0, in, out, groups, group, b * R4, pf && !t);
        }
    }
}
