/* CPU kernels for the decode step on x86-64 with AVX2, FMA and F16C, built at first use by model/native.py.

Why hand-written: on CPUs without native bf16 the stock weight-only int4 kernel streams 4-bit weights at ~4 GB/s
and wants bf16 activations, and a one-token step spends as long again in ~4,000 small tensor ops around the
matmuls (model/native.py has the figures). These kernels read a block-quantized weight once per step with 8-bit
activations (as llama.cpp's), and run every transformer block of a step (norms, projections, rotary embedding,
cache write, attention over each row's own keys, MLP) in one call.

Every output row is computed by the same sequence of floating-point operations whatever the number of rows in the
call and whichever thread computes it, so a sequence's result does not depend on the batch it is in. Built with
-ffp-contract=off so that no product is fused into an add unless written as an FMA here.
*/

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* 4-bit weights in llama.cpp's Q4_1 blocks of 32: w[i] = q[i] * d + m, q in 0..15, d and m in fp16. A weight row of
   k inputs (nb = k / 32 blocks, 20 * nb bytes) keeps its nb scales d, then its nb minimums m, then nb times 16 bytes
   of nibbles, byte j of a block holding q[j] in its low nibble and q[j + 16] in its high one: the scales and
   minimums of a row then load 8 at a time. */
#define QK 32

static inline const uint16_t *row_scales(const uint8_t *row) { return (const uint16_t *)row; }
static inline const uint16_t *row_mins(const uint8_t *row, int64_t nb) { return (const uint16_t *)row + nb; }
static inline const uint8_t *row_nibbles(const uint8_t *row, int64_t nb) { return row + 4 * nb; }

int smollm_abi_version(void) { return 4; }

int smollm_block_bytes(void) { return 20; }

static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v);
    __m128 hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 shuf = _mm_movehdup_ps(lo);
    __m128 sums = _mm_add_ps(lo, shuf);
    shuf = _mm_movehl_ps(shuf, sums);
    sums = _mm_add_ss(sums, shuf);
    return _mm_cvtss_f32(sums);
}

static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

/* e^x, 8 lanes: Cephes' expf (a degree-6 polynomial after range reduction by ln 2), within 2 ulp of libm's;
   inputs clamped to +-88.376 (the result then saturates towards 0 or 2.4e38 instead of overflowing). */
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0f));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(scale));
}

/* out[i] = silu(gate[i]) * up[i] = gate / (1 + e^-gate) * up. */
static inline void silu_mul(const float *gate, const float *up, int64_t n, float *out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
        const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
    }
    for (; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* Quantize rows of fp32 weights w (n, k) into blocks (n, k / 32): per block d = (max - min) / 15, m = min, both
   rounded to fp16 first so that the codes are chosen against the scale the kernel will use. */
void smollm_q4_quantize(const float *w, int64_t n, int64_t k, uint8_t *out) {
    const int64_t nb = k / QK;
    for (int64_t r = 0; r < n; r++) {
        uint8_t *row = out + r * nb * 20;
        uint16_t *ds = (uint16_t *)row, *ms = ds + nb;
        uint8_t *qs = row + 4 * nb;
        for (int64_t b = 0; b < nb; b++) {
            const float *x = w + r * k + b * QK;
            float lo = x[0], hi = x[0];
            for (int i = 1; i < QK; i++) {
                lo = x[i] < lo ? x[i] : lo;
                hi = x[i] > hi ? x[i] : hi;
            }
            uint16_t dh = _cvtss_sh((hi - lo) / 15.0f, _MM_FROUND_TO_NEAREST_INT);
            uint16_t mh = _cvtss_sh(lo, _MM_FROUND_TO_NEAREST_INT);
            float d = half_to_float(dh), m = half_to_float(mh);
            float inv = d > 0.0f ? 1.0f / d : 0.0f;
            uint8_t q[QK];
            for (int i = 0; i < QK; i++) {
                float v = nearbyintf((x[i] - m) * inv);
                q[i] = (uint8_t)(v < 0.0f ? 0.0f : (v > 15.0f ? 15.0f : v));
            }
            ds[b] = dh;
            ms[b] = mh;
            for (int j = 0; j < 16; j++) qs[b * 16 + j] = (uint8_t)(q[j] | (q[j + 16] << 4));
        }
    }
}

/* The fp32 weights (n, k) that blocks (n, k / 32) stand for. */
void smollm_q4_dequantize(const uint8_t *w, int64_t n, int64_t k, float *out, int nthreads) {
    const int64_t nb = k / QK;
    const __m128i low4 = _mm_set1_epi8(0x0f);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *row = w + r * nb * 20;
        const uint8_t *qs = row_nibbles(row, nb);
        for (int64_t b = 0; b < nb; b++) {
            const __m256 d = _mm256_set1_ps(half_to_float(row_scales(row)[b]));
            const __m256 m = _mm256_set1_ps(half_to_float(row_mins(row, nb)[b]));
            const __m128i raw = _mm_loadu_si128((const __m128i *)(qs + b * 16));
            const __m128i lo = _mm_and_si128(raw, low4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
            const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
            float *y = out + r * k + b * QK;
            for (int j = 0; j < 4; j++) {
                const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[j]));
                _mm256_storeu_ps(y + 8 * j, _mm256_fmadd_ps(q, d, m));
            }
        }
    }
}

/* Activations go in as 8-bit blocks of 32 (llama.cpp's Q8 activations): per row and block a scale xd = max|x| / 127
   and codes xq = round(x / xd); the block sums of the fp32 activations (xsum) are kept exact for the weights'
   minimum. A block's dot product is then s = sum_i q[i] * xq[i] in integers (maddubs: 32 products, no overflow as
   15 * 127 * 2 < 32767) and y += d * xd * s + m * xsum. */
static void quantize_rows_q8(const float *x, int64_t rows, int64_t k, int8_t *xq, float *xd, float *xsum) {
    const int64_t nb = k / QK;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = x + r * k + b * QK;
            const __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
            const __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
            __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, absmask), _mm256_and_ps(v1, absmask)),
                                      _mm256_max_ps(_mm256_and_ps(v2, absmask), _mm256_and_ps(v3, absmask)));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            const float amax = _mm_cvtss_f32(m4);
            const float d = amax / 127.0f;
            const __m256 inv = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
            /* Round to nearest even (the default rounding mode): codes in -127..127. */
            const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inv));
            const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv));
            const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, inv));
            const __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, inv));
            const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
            _mm256_storeu_si256((__m256i *)(xq + r * k + b * QK), _mm256_permutevar8x32_epi32(packed, order));
            xd[r * nb + b] = d;
            xsum[r * nb + b] = hsum256(_mm256_add_ps(_mm256_add_ps(v0, v1), _mm256_add_ps(v2, v3)));
        }
    }
}

/* sum_i h[i] * f[i] for fp16 h and fp32 f. */
static inline float dot_half(const uint16_t *h, const float *f, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))), _mm256_loadu_ps(f + i), acc);
    float s = hsum256(acc);
    for (; i < n; i++) s = fmaf(half_to_float(h[i]), f[i], s);
    return s;
}

/* out[i] = h[i] * f[i] for fp16 h and fp32 f. */
static inline void mul_half(const uint16_t *h, const float *f, int64_t n, float *out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))),
                                                _mm256_loadu_ps(f + i)));
    for (; i < n; i++) out[i] = half_to_float(h[i]) * f[i];
}

/* A block's 32 codes as bytes: low lane q[0..15] (low nibbles), high lane q[16..31] (high nibbles), matching the
   order of the activation codes. */
static inline __m256i unpack_nibbles(const uint8_t *qs) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0f));
}

/* sum_i q[i] * x[i] over a block as 8 float lanes: u8 x s8 pairs (maddubs), then pairs of pairs (madd). */
static inline __m256 block_dot(__m256i q, const int8_t *x) {
    const __m256i pairs = _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)x));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

/* y[r, c] for a tile of R rows (1..4) of quantized activations and one weight row. Per block the integer dot
   product s goes in as acc += (d * xd) * s; the minimums' share, sum_b m[b] * xsum[b], is one dot product per row. */
#define MAX_BLOCKS 512 /* k up to 16384 */
static inline __attribute__((always_inline)) void q4_row_tile(const uint8_t *wrow, int64_t nb, const int8_t *xq,
                                                              const float *xd, const float *xsum, int64_t k, int R,
                                                              float *y, int64_t ldy) {
    const uint8_t *qs = row_nibbles(wrow, nb);
    float scale[4][MAX_BLOCKS];
    /* Two accumulators per row, for even and odd blocks: one chain of dependent FMAs would cost its latency per
       block, more than the block's other work. */
    __m256 even[4], odd[4];
    for (int r = 0; r < R; r++) {
        mul_half(row_scales(wrow), xd + r * nb, nb, scale[r]);
        even[r] = _mm256_setzero_ps();
        odd[r] = _mm256_setzero_ps();
    }
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        const __m256i q0 = unpack_nibbles(qs + b * 16), q1 = unpack_nibbles(qs + b * 16 + 16);
        for (int r = 0; r < R; r++) {
            const int8_t *xb = xq + r * k + b * QK;
            even[r] = _mm256_fmadd_ps(_mm256_set1_ps(scale[r][b]), block_dot(q0, xb), even[r]);
            odd[r] = _mm256_fmadd_ps(_mm256_set1_ps(scale[r][b + 1]), block_dot(q1, xb + QK), odd[r]);
        }
    }
    if (b < nb) {
        const __m256i q = unpack_nibbles(qs + b * 16);
        for (int r = 0; r < R; r++)
            even[r] = _mm256_fmadd_ps(_mm256_set1_ps(scale[r][b]), block_dot(q, xq + r * k + b * QK), even[r]);
    }
    __m256 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_add_ps(even[r], odd[r]);
    for (int r = 0; r < R; r++) y[r * ldy] = hsum256(acc[r]) + dot_half(row_mins(wrow, nb), xsum + r * nb, nb);
}

/* y (rows, n) = x (rows, k) @ W.T with W (n, k) in 4-bit blocks (n, k / 32); k a multiple of 32. `scratch` holds
   rows * (k / 4 + 2 * k / 32) floats (the quantized activations, their scales and block sums). */
void smollm_q4_matmul(const float *x, int64_t rows, int64_t k, const uint8_t *w, int64_t n, float *y, float *scratch,
                      int nthreads) {
    const int64_t nb = k / QK;
    float *xd = scratch, *xsum = scratch + rows * nb;
    int8_t *xq = (int8_t *)(scratch + 2 * rows * nb);
    quantize_rows_q8(x, rows, k, xq, xd, xsum);
    /* Threads split the weight rows, so each streams its own part of the weights once; the x rows stay cached. */
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t c = 0; c < n; c++) {
        const uint8_t *wrow = w + c * nb * 20;
        int64_t r = 0;
        for (; r + 4 <= rows; r += 4)
            q4_row_tile(wrow, nb, xq + r * k, xd + r * nb, xsum + r * nb, k, 4, y + r * n + c, n);
        switch (rows - r) {
        case 3: q4_row_tile(wrow, nb, xq + r * k, xd + r * nb, xsum + r * nb, k, 3, y + r * n + c, n); break;
        case 2: q4_row_tile(wrow, nb, xq + r * k, xd + r * nb, xsum + r * nb, k, 2, y + r * n + c, n); break;
        case 1: q4_row_tile(wrow, nb, xq + r * k, xd + r * nb, xsum + r * nb, k, 1, y + r * n + c, n); break;
        default: break;
        }
    }
}

/* Rotary embedding in Hugging Face's layout (the two halves of a head rotate together), written as the eager
   model computes it: x * cos + rotate_half(x) * sin, each product rounded before the add. */
static inline void rope(const float *x, const float *cos, const float *sin, int64_t head_dim, float *out) {
    const int64_t half = head_dim / 2;
    for (int64_t i = 0; i < half; i++) {
        out[i] = x[i] * cos[i] + (-x[i + half]) * sin[i];
        out[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
    }
}

static inline float dot(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum256(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* One decode token per row, for every row and head of one layer:
   - qkv (rows, (n_head + 2 * n_kv_head) * head_dim): the fused projection's output, queries then keys then values;
   - cos, sin (rows, head_dim): each row's rotary tables at its position;
   - k_cache, v_cache (max_slots, n_kv_head, max_len, head_dim): the layer's cache; row r writes its rotated key and
     its value at (slots[r], head, positions[r]) and attends keys 0..positions[r] of its own slot;
   - out (rows, n_head * head_dim). `scratch` holds rows * n_head * (head_dim + kv_len) floats, kv_len > every
     position. */
void smollm_attention_decode(const float *qkv, int64_t rows, int64_t n_head, int64_t n_kv_head, int64_t head_dim,
                             const float *cos, const float *sin, float *k_cache, float *v_cache, int64_t max_len,
                             const int64_t *slots, const int64_t *positions, int64_t kv_len, float *out,
                             float *scratch, int nthreads) {
    const int64_t width = (n_head + 2 * n_kv_head) * head_dim;
    const int64_t n_rep = n_head / n_kv_head;
    const float scale = 1.0f / sqrtf((float)head_dim);
    for (int64_t r = 0; r < rows; r++) {
        const float *kr = qkv + r * width + n_head * head_dim;
        const float *vr = kr + n_kv_head * head_dim;
        for (int64_t h = 0; h < n_kv_head; h++) {
            const int64_t at = ((slots[r] * n_kv_head + h) * max_len + positions[r]) * head_dim;
            rope(kr + h * head_dim, cos + r * head_dim, sin + r * head_dim, head_dim, k_cache + at);
            memcpy(v_cache + at, vr + h * head_dim, (size_t)head_dim * sizeof(float));
        }
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t task = 0; task < rows * n_head; task++) {
        const int64_t r = task / n_head, h = task % n_head, kvh = h / n_rep;
        const int64_t len = positions[r] + 1;
        float *q = scratch + task * (head_dim + kv_len);
        float *score = q + head_dim;
        rope(qkv + r * width + h * head_dim, cos + r * head_dim, sin + r * head_dim, head_dim, q);
        const float *keys = k_cache + (slots[r] * n_kv_head + kvh) * max_len * head_dim;
        const float *values = v_cache + (slots[r] * n_kv_head + kvh) * max_len * head_dim;
        float top = -INFINITY;
        int64_t t = 0;
        if (head_dim % 8 == 0) {
            /* Four keys at a time: each query load serves four products, and one reduction gives four scores. */
            for (; t + 4 <= len; t += 4) {
                const float *k0 = keys + t * head_dim;
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t i = 0; i < head_dim; i += 8) {
                    const __m256 qv = _mm256_loadu_ps(q + i);
                    a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + i), a0);
                    a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + head_dim + i), a1);
                    a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 2 * head_dim + i), a2);
                    a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 3 * head_dim + i), a3);
                }
                const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
                const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
                _mm_storeu_ps(score + t, _mm_mul_ps(sums, _mm_set1_ps(scale)));
                for (int j = 0; j < 4; j++) top = score[t + j] > top ? score[t + j] : top;
            }
        }
        for (; t < len; t++) {
            score[t] = dot(q, keys + t * head_dim, head_dim) * scale;
            top = score[t] > top ? score[t] : top;
        }
        __m256 sum8 = _mm256_setzero_ps();
        int64_t u = 0;
        for (; u + 8 <= len; u += 8) {
            const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(score + u), _mm256_set1_ps(top)));
            _mm256_storeu_ps(score + u, e);
            sum8 = _mm256_add_ps(sum8, e);
        }
        float total = hsum256(sum8);
        for (; u < len; u++) {
            score[u] = expf(score[u] - top);
            total += score[u];
        }
        const float inv = 1.0f / total;
        float *y = out + r * n_head * head_dim + h * head_dim;
        for (int64_t i = 0; i < head_dim; i++) y[i] = 0.0f;
        for (int64_t t = 0; t < len; t++) {
            const float p = score[t] * inv;
            const float *v = values + t * head_dim;
            int64_t i = 0;
            for (; i + 8 <= head_dim; i += 8)
                _mm256_storeu_ps(y + i, _mm256_fmadd_ps(_mm256_set1_ps(p), _mm256_loadu_ps(v + i), _mm256_loadu_ps(y + i)));
            for (; i < head_dim; i++) y[i] += p * v[i];
        }
    }
}

/* y = weight * x / sqrt(mean(x^2) + eps), row by row: (rows, dim) fp32. */
void smollm_rms_norm(const float *x, int64_t rows, int64_t dim, const float *weight, float eps, float *y) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        __m256 acc = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= dim; i += 8) {
            const __m256 v = _mm256_loadu_ps(xr + i);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float s = hsum256(acc);
        for (; i < dim; i++) s += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(s / (float)dim + eps);
        float *yr = y + r * dim;
        for (i = 0; i < dim; i++) yr[i] = weight[i] * (xr[i] * inv);
    }
}

/* Scratch floats smollm_decode_layer needs for `rows` rows. */
int64_t smollm_decode_layer_scratch(int64_t rows, int64_t dim, int64_t n_head, int64_t n_kv_head, int64_t head_dim,
                                    int64_t hidden, int64_t kv_len) {
    const int64_t widest = hidden > dim ? hidden : dim;
    return rows * (dim + (n_head + 2 * n_kv_head) * head_dim + n_head * (head_dim + kv_len) + n_head * head_dim +
                   3 * hidden + widest / 4 + 2 * widest / QK);
}

/* One transformer block for one decode token per row, every projection in 4-bit blocks, x (rows, dim) updated in
   place: x += wo(attention(rope(wqkv(norm(x))))); x += w2(silu(gate) * up), [gate, up] = w13(norm(x)). The same
   kernels as the separate calls above, in the order the PyTorch block runs them. */
void smollm_decode_layer(float *x, int64_t rows, int64_t dim, const float *attn_norm, const float *ffn_norm, float eps,
                         const uint8_t *wqkv, const uint8_t *wo, const uint8_t *w13, const uint8_t *w2,
                         int64_t n_head, int64_t n_kv_head, int64_t head_dim, int64_t hidden, const float *cos,
                         const float *sin, float *k_cache, float *v_cache, int64_t max_len, const int64_t *slots,
                         const int64_t *positions, int64_t kv_len, float *scratch, int nthreads) {
    const int64_t q_width = n_head * head_dim, qkv_width = (n_head + 2 * n_kv_head) * head_dim;
    float *h = scratch;                                  /* rows x dim */
    float *qkv = h + rows * dim;                         /* rows x qkv_width */
    float *att_scratch = qkv + rows * qkv_width;         /* rows x n_head x (head_dim + kv_len) */
    float *att = att_scratch + rows * n_head * (head_dim + kv_len); /* rows x q_width */
    float *gate_up = att + rows * q_width;               /* rows x 2 hidden */
    float *act = gate_up + rows * 2 * hidden;            /* rows x hidden */
    float *mm = act + rows * hidden;                     /* q4 matmul scratch */
    float *out = qkv;                                    /* rows x dim, reusing qkv once attention has read it */

    smollm_rms_norm(x, rows, dim, attn_norm, eps, h);
    smollm_q4_matmul(h, rows, dim, wqkv, qkv_width, qkv, mm, nthreads);
    smollm_attention_decode(qkv, rows, n_head, n_kv_head, head_dim, cos, sin, k_cache, v_cache, max_len, slots,
                            positions, kv_len, att, att_scratch, nthreads);
    smollm_q4_matmul(att, rows, q_width, wo, dim, out, mm, nthreads);
    for (int64_t i = 0; i < rows * dim; i++) x[i] += out[i];

    smollm_rms_norm(x, rows, dim, ffn_norm, eps, h);
    smollm_q4_matmul(h, rows, dim, w13, 2 * hidden, gate_up, mm, nthreads);
    for (int64_t r = 0; r < rows; r++)
        silu_mul(gate_up + r * 2 * hidden, gate_up + r * 2 * hidden + hidden, hidden, act + r * hidden);
    smollm_q4_matmul(act, rows, hidden, w2, dim, out, mm, nthreads);
    for (int64_t i = 0; i < rows * dim; i++) x[i] += out[i];
}

/* Every block of the model for one decode token per row (smollm_decode_layer, layer after layer): the per-layer
   weights come as arrays of n_layer pointers, the cache as its whole (n_layer, max_slots, n_kv_head, max_len,
   head_dim) buffers. */
void smollm_decode_layers(float *x, int64_t rows, int64_t dim, int64_t n_layer, const float *const *attn_norms,
                          const float *const *ffn_norms, float eps, const uint8_t *const *wqkv,
                          const uint8_t *const *wo, const uint8_t *const *w13, const uint8_t *const *w2,
                          int64_t n_head, int64_t n_kv_head, int64_t head_dim, int64_t hidden, const float *cos,
                          const float *sin, float *k_cache, float *v_cache, int64_t max_slots, int64_t max_len,
                          const int64_t *slots, const int64_t *positions, int64_t kv_len, float *scratch,
                          int nthreads) {
    const int64_t layer_size = max_slots * n_kv_head * max_len * head_dim;
    for (int64_t l = 0; l < n_layer; l++)
        smollm_decode_layer(x, rows, dim, attn_norms[l], ffn_norms[l], eps, wqkv[l], wo[l], w13[l], w2[l], n_head,
                            n_kv_head, head_dim, hidden, cos, sin, k_cache + l * layer_size, v_cache + l * layer_size,
                            max_len, slots, positions, kv_len, scratch, nthreads);
}
