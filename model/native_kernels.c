/* CPU kernels for the decode step on x86-64 with AVX2, FMA and F16C, built at first use by model/native.py (the
4-bit products also have AVX512-VNNI and AVX-VNNI tiles, picked at run time where the CPU has them), and, at the
end, bf16 products for bf16 models on CPUs with AMX or AVX512-BF16.

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
#include <omp.h>
#include <stdint.h>
#include <string.h>

/* 4-bit weights in llama.cpp's Q4_1 blocks of 32: w[i] = q[i] * d + m, q in 0..15, d and m in fp16. Rows go in
   groups of 8 (the last one padded with zero rows), stored group after group, and a group of k inputs (nb = k / 32
   blocks) block after block, 160 bytes a block:
   - the 8 rows' scales d (fp16), then their 8 minimums m;
   - 128 bytes of nibbles in 4 chunks of 32: chunk t holds, for row j = 0..7, that row's bytes 4t..4t+3, where a
     row's byte i holds q[i] in its low nibble and q[i + 16] in its high one.
   So one 32-byte load gives 4 codes of each of 8 rows (low nibbles: inputs 4t..4t+3; high: 16+4t..16+4t+3), and a
   product with 4 broadcast activation bytes (maddubs) lands each row's partial sum in its own lanes: a block's 8
   sub-products add up in 16-bit lanes, and one convert and one FMA per block give 8 outputs (ggml's "repacked"
   Q4_0 x 8 layout does the same on AVX2), where a row-at-a-time dot product needs a reduction per row and block. */
#define QK 32
#define GROUP 8
#define GROUP_BLOCK_BYTES 160
/* Row-wise work (norms, activation quantization, SiLU, residual adds) is split between the threads from this many
   rows on: for a prompt of 256 tokens it was ~15% of the step done by one thread while the others spun at the next
   barrier; for a few decode rows the fork costs more than it saves. Each row is still computed by one thread. */
#define PARALLEL_ROWS 8

static inline const uint8_t *group_block(const uint8_t *w, int64_t nb, int64_t g, int64_t b) {
    return w + (g * nb + b) * GROUP_BLOCK_BYTES;
}

/* Where row j's scale, minimum and nibble byte i (0..15) lie in a group's block. */
static inline int64_t scale_offset(int64_t j) { return 2 * j; }
static inline int64_t min_offset(int64_t j) { return 16 + 2 * j; }
static inline int64_t nibble_offset(int64_t j, int i) { return 32 + (i / 4) * 32 + j * 4 + i % 4; }

int smollm_abi_version(void) { return 10; }

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

/* Quantize rows of fp32 weights w (n, k) into groups of 8 rows (ceil(n / 8) * nb * 160 bytes): per block
   d = (max - min) / 15, m = min, both rounded to fp16 first so that the codes are chosen against the scale the
   kernel will use. Padding rows are zero. */
void smollm_q4_quantize(const float *w, int64_t n, int64_t k, uint8_t *out) {
    const int64_t nb = k / QK, groups = (n + GROUP - 1) / GROUP;
    memset(out, 0, (size_t)(groups * nb * GROUP_BLOCK_BYTES));
    for (int64_t r = 0; r < n; r++) {
        const int64_t g = r / GROUP, j = r % GROUP;
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *blk = (uint8_t *)group_block(out, nb, g, b);
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
            memcpy(blk + scale_offset(j), &dh, 2);
            memcpy(blk + min_offset(j), &mh, 2);
            for (int i = 0; i < 16; i++) blk[nibble_offset(j, i)] = (uint8_t)(q[i] | (q[i + 16] << 4));
        }
    }
}

/* The fp32 weights (n, k) that the groups of blocks stand for. */
void smollm_q4_dequantize(const uint8_t *w, int64_t n, int64_t k, float *out, int nthreads) {
    const int64_t nb = k / QK;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const int64_t g = r / GROUP, j = r % GROUP;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = group_block(w, nb, g, b);
            uint16_t dh, mh;
            memcpy(&dh, blk + scale_offset(j), 2);
            memcpy(&mh, blk + min_offset(j), 2);
            const float d = half_to_float(dh), m = half_to_float(mh);
            float *y = out + r * k + b * QK;
            for (int i = 0; i < 16; i++) {
                const uint8_t byte = blk[nibble_offset(j, i)];
                y[i] = fmaf((float)(byte & 0x0f), d, m);
                y[i + 16] = fmaf((float)(byte >> 4), d, m);
            }
        }
    }
}

/* Activations go in as 8-bit blocks of 32 (llama.cpp's Q8 activations): per row and block a scale xd = max|x| / 127
   and codes xq = round(x / xd); the block sums of the fp32 activations (xsum) are kept exact for the weights'
   minimum. A block's dot product is then s = sum_i q[i] * xq[i] in integers (maddubs: 32 products, no overflow as
   15 * 127 * 2 < 32767) and y += d * xd * s + m * xsum. */
static void quantize_rows_q8(const float *x, int64_t rows, int64_t k, int8_t *xq, float *xd, float *xsum,
                             int nthreads) {
    const int64_t nb = k / QK;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows >= PARALLEL_ROWS)
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

static inline __m256i broadcast4(const int8_t *x) {
    int32_t v;
    memcpy(&v, x, 4);
    return _mm256_set1_epi32(v);
}

/* acc[r] += (d * xd) * s + m * xsum for one block: its 8 rows' scales d and minimums m, and each activation row's
   integer sums s (8 lanes of int32, one per weight row). */
static inline __attribute__((always_inline)) void q4_block_accumulate(const uint8_t *blk, const __m256i *s, int R,
                                                                      const float *xd, const float *xsum,
                                                                      int64_t nb, int64_t b, __m256 *acc) {
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
    const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16)));
    for (int r = 0; r < R; r++) {
        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(xd[r * nb + b])), _mm256_cvtepi32_ps(s[r]), acc[r]);
        acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(xsum[r * nb + b]), acc[r]);
    }
}

/* Stores a tile's R rows of 8 outputs (the first `width` of them in a padded last group). */
static inline __attribute__((always_inline)) void q4_tile_store(const __m256 *acc, int R, float *y, int64_t ldy,
                                                                int width) {
    for (int r = 0; r < R; r++) {
        if (width == GROUP) {
            _mm256_storeu_ps(y + r * ldy, acc[r]);
        } else {
            float tmp[GROUP];
            _mm256_storeu_ps(tmp, acc[r]);
            memcpy(y + r * ldy, tmp, (size_t)width * sizeof(float));
        }
    }
}

/* y[r, 8 outputs of group g] for a tile of R rows (1..4) of quantized activations. Per block the 8 sub-products
   (maddubs: pairs of u8 x s8, at most 2 * 15 * 127 each) add up in 16-bit lanes (8 * 3810 < 32767), pairs of lanes
   give each output's integer dot product s (madd), and acc += (d * xd) * s, then acc += m * xsum. Every output
   sees the same operations whatever R is and wherever its row sits in the tile. */
static inline __attribute__((always_inline)) void q4_group_tile(const uint8_t *w, int64_t nb, int64_t g,
                                                                const int8_t *xq, const float *xd, const float *xsum,
                                                                int64_t k, int R, float *y, int64_t ldy, int width) {
    const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = group_block(w, nb, g, b);
        __m256i sums[4];
        for (int t = 0; t < 4; t++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(blk + 32 + 32 * t));
            const __m256i lo = _mm256_and_si256(raw, low4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
            for (int r = 0; r < R; r++) {
                const int8_t *xb = xq + r * k + b * QK;
                const __m256i part = _mm256_add_epi16(_mm256_maddubs_epi16(lo, broadcast4(xb + 4 * t)),
                                                      _mm256_maddubs_epi16(hi, broadcast4(xb + 16 + 4 * t)));
                sums[r] = t == 0 ? part : _mm256_add_epi16(sums[r], part);
            }
        }
        for (int r = 0; r < R; r++) sums[r] = _mm256_madd_epi16(sums[r], ones);
        q4_block_accumulate(blk, sums, R, xd, xsum, nb, b, acc);
    }
    q4_tile_store(acc, R, y, ldy, width);
}

/* The body of a q4_group_rows function: every row tile of group g with TILE, tiles of 4 rows and then the rest as
   one tile, R a constant in each call so that the tile's loops unroll (a macro: C has no templates). */
#define Q4_GROUP_ROWS_BODY(TILE)                                                                                  \
    int64_t r = 0;                                                                                                \
    for (; r + 4 <= rows; r += 4) TILE(w, nb, g, xq + r * k, xd + r * nb, xsum + r * nb, k, 4, yg + r * n, n, width); \
    switch (rows - r) {                                                                                           \
    case 3: TILE(w, nb, g, xq + r * k, xd + r * nb, xsum + r * nb, k, 3, yg + r * n, n, width); break;           \
    case 2: TILE(w, nb, g, xq + r * k, xd + r * nb, xsum + r * nb, k, 2, yg + r * n, n, width); break;           \
    case 1: TILE(w, nb, g, xq + r * k, xd + r * nb, xsum + r * nb, k, 1, yg + r * n, n, width); break;           \
    default: break;                                                                                               \
    }

static void q4_group_rows(const uint8_t *w, int64_t nb, int64_t g, const int8_t *xq, const float *xd,
                          const float *xsum, int64_t k, int64_t rows, float *yg, int64_t n, int width) {
    Q4_GROUP_ROWS_BODY(q4_group_tile)
}

/* The same tile with vpdpbusd, as AVX512-VNNI (EVEX, on 256-bit registers: AVX512VL; Cascade Lake, Ice Lake,
   Sapphire Rapids, Zen 4 on) or AVX-VNNI (VEX: Alder Lake and later Intel client CPUs, which lack AVX-512): each
   row's 4 u8 x s8 products of a chunk go straight into its 32-bit lane, one instruction where AVX2 takes two
   maddubs and an add, and the 16-bit-to-32-bit madd at the end of a block goes away. The integer sums are exact
   either way, so every output is bit for bit the AVX2 tile's. Defines NAME (the tile) and NAME_rows (every row
   tile of a group) for a target and its intrinsic; chosen at run time (`smollm_q4_isa`). */
#define DEFINE_Q4_VNNI_TILE(NAME, TARGET, DPBUSD)                                                                 \
    static inline __attribute__((always_inline)) __attribute__((target(TARGET))) void NAME(                       \
        const uint8_t *w, int64_t nb, int64_t g, const int8_t *xq, const float *xd, const float *xsum, int64_t k, \
        int R, float *y, int64_t ldy, int width) {                                                                \
        const __m256i low4 = _mm256_set1_epi8(0x0f);                                                              \
        __m256 acc[4];                                                                                            \
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();                                                 \
        for (int64_t b = 0; b < nb; b++) {                                                                        \
            const uint8_t *blk = group_block(w, nb, g, b);                                                        \
            __m256i sums[4];                                                                                      \
            for (int r = 0; r < R; r++) sums[r] = _mm256_setzero_si256();                                         \
            for (int t = 0; t < 4; t++) {                                                                         \
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(blk + 32 + 32 * t));                     \
                const __m256i lo = _mm256_and_si256(raw, low4);                                                   \
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);                             \
                for (int r = 0; r < R; r++) {                                                                     \
                    const int8_t *xb = xq + r * k + b * QK;                                                       \
                    sums[r] = DPBUSD(sums[r], lo, broadcast4(xb + 4 * t));                                        \
                    sums[r] = DPBUSD(sums[r], hi, broadcast4(xb + 16 + 4 * t));                                   \
                }                                                                                                 \
            }                                                                                                     \
            q4_block_accumulate(blk, sums, R, xd, xsum, nb, b, acc);                                              \
        }                                                                                                         \
        q4_tile_store(acc, R, y, ldy, width);                                                                     \
    }                                                                                                             \
    static __attribute__((target(TARGET))) void NAME##_rows(const uint8_t *w, int64_t nb, int64_t g,              \
                                                            const int8_t *xq, const float *xd, const float *xsum, \
                                                            int64_t k, int64_t rows, float *yg, int64_t n,        \
                                                            int width) {                                          \
        Q4_GROUP_ROWS_BODY(NAME)                                                                                  \
    }

DEFINE_Q4_VNNI_TILE(q4_tile_avx512vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", _mm256_dpbusd_epi32)
/* AVX-VNNI's and AMX's intrinsics came with GCC 11 and clang 12: an older compiler builds the other kernels without
   them (the AVX-VNNI tile here, the bf16 products at the end). */
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define HAVE_NEWER_X86_INTRINSICS 1
#else
#define HAVE_NEWER_X86_INTRINSICS 0
#endif
#if HAVE_NEWER_X86_INTRINSICS
#define HAVE_AVXVNNI 1
DEFINE_Q4_VNNI_TILE(q4_tile_avxvnni, "avx2,fma,f16c,avxvnni", _mm256_dpbusd_avx_epi32)
#else
#define HAVE_AVXVNNI 0
#endif

/* The 4-bit kernels, by index: 0 AVX2, 1 AVX512-VNNI, 2 AVX-VNNI (model/native.py's Q4_ISAS). */
enum { Q4_AVX2, Q4_AVX512VNNI, Q4_AVXVNNI, Q4_ISA_COUNT };

static int q4_isa_supported(int isa) {
    __builtin_cpu_init();
    switch (isa) {
    case Q4_AVX2: return 1;
    case Q4_AVX512VNNI: return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
#if HAVE_AVXVNNI
    case Q4_AVXVNNI: return __builtin_cpu_supports("avxvnni");
#endif
    default: return 0;
    }
}

/* Which of a family's kernels runs (the 4-bit products', the bf16 products'): the first in `preference` (best
   first, the last always supported) that this CPU and build have, asked at first use; a pin sets another, refused
   where the CPU or build lacks it (tests compare the kernels; model/native.py keeps them within what a run
   restricts torch and oneDNN to). */
typedef struct {
    int (*supported)(int isa);
    const int *preference;
    int count; /* kernels in the family */
    int current; /* -1 until first asked */
} kernel_choice;

static int kernel_in_use(kernel_choice *c) {
    if (c->current < 0) {
        int i = 0;
        while (!c->supported(c->preference[i]))
            i++;
        c->current = c->preference[i];
    }
    return c->current;
}

static int kernel_pin(kernel_choice *c, int isa) {
    if (isa >= 0 && isa < c->count && c->supported(isa))
        c->current = isa;
    return kernel_in_use(c);
}

static const int q4_preference[] = {Q4_AVX512VNNI, Q4_AVXVNNI, Q4_AVX2};
static kernel_choice q4_kernel = {q4_isa_supported, q4_preference, Q4_ISA_COUNT, -1};

/* The 4-bit kernel smollm_q4_matmul runs. */
int smollm_q4_isa(void) { return kernel_in_use(&q4_kernel); }

/* Pins the 4-bit kernel to `isa`; returns the one in use. */
int smollm_q4_set_isa(int isa) { return kernel_pin(&q4_kernel, isa); }

/* y (rows, n) = x (rows, k) @ W.T with W (n, k) in groups of 4-bit blocks; k a multiple of 32. `scratch` holds
   rows * (k / 4 + 2 * k / 32) floats (the quantized activations, their scales and block sums). */
void smollm_q4_matmul(const float *x, int64_t rows, int64_t k, const uint8_t *w, int64_t n, float *y, float *scratch,
                      int nthreads) {
    const int64_t nb = k / QK, groups = (n + GROUP - 1) / GROUP;
    float *xd = scratch, *xsum = scratch + rows * nb;
    int8_t *xq = (int8_t *)(scratch + 2 * rows * nb);
    const int isa = smollm_q4_isa();
    quantize_rows_q8(x, rows, k, xq, xd, xsum, nthreads);
    /* Threads split the groups of weight rows, so each streams its own part of the weights once (a group's blocks
       stay in L1 while every tile of activation rows passes over them); the activations stay cached. */
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const int width = (int)(n - g * GROUP < GROUP ? n - g * GROUP : GROUP);
        if (isa == Q4_AVX512VNNI)
            q4_tile_avx512vnni_rows(w, nb, g, xq, xd, xsum, k, rows, y + g * GROUP, n, width);
#if HAVE_AVXVNNI
        else if (isa == Q4_AVXVNNI)
            q4_tile_avxvnni_rows(w, nb, g, xq, xd, xsum, k, rows, y + g * GROUP, n, width);
#endif
        else
            q4_group_rows(w, nb, g, xq, xd, xsum, k, rows, y + g * GROUP, n, width);
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

/* The KV cache holds fp32 or fp16 (`half`: a compile-time constant in each caller, so each kind gets its own loops).
   fp16 halves what attention reads, which at 64 streams is most of its time; the values are rounded once, when
   written (round to nearest even, as torch's .to(float16)), and widened exactly when read. */
static inline __attribute__((always_inline)) __m256 kv_load8(const void *cache, int64_t i, const int half) {
    if (half) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)cache + i)));
    return _mm256_loadu_ps((const float *)cache + i);
}

static inline __attribute__((always_inline)) float kv_at(const void *cache, int64_t i, const int half) {
    return half ? _cvtsh_ss(((const uint16_t *)cache)[i]) : ((const float *)cache)[i];
}

static inline __attribute__((always_inline)) void kv_store(void *cache, int64_t at, const float *x, int64_t n,
                                                           const int half) {
    if (!half) {
        memcpy((float *)cache + at, x, (size_t)n * sizeof(float));
        return;
    }
    uint16_t *dst = (uint16_t *)cache + at;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) dst[i] = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
}

static inline __attribute__((always_inline)) float kv_dot(const float *q, const void *keys, int64_t at, int64_t n,
                                                          const int half) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), kv_load8(keys, at + i, half), acc);
    float s = hsum256(acc);
    for (; i < n; i++) s += q[i] * kv_at(keys, at + i, half);
    return s;
}

/* One query head against its key/value head for one row: q (head_dim) attends keys 0..len-1 at `base` of the caches
   (fp32, or fp16 when `half`); `score` holds len floats; writes y (head_dim). The same operations for every head
   whatever the batch, and the same results whether the keys are read from an fp16 cache or from their exact fp32
   widening (`attention_rows` does either). */
static inline __attribute__((always_inline)) void attend_head(const float *q, const void *k_cache, const void *v_cache,
                                                              int64_t base, int64_t len, int64_t head_dim, float scale,
                                                              float *score, float *y, const int half) {
    float top = -INFINITY;
    int64_t t = 0;
    if (head_dim % 8 == 0) {
        /* Four keys at a time: each query load serves four products, and one reduction gives four scores. */
        for (; t + 4 <= len; t += 4) {
            const int64_t k0 = base + t * head_dim;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t i = 0; i < head_dim; i += 8) {
                const __m256 qv = _mm256_loadu_ps(q + i);
                a0 = _mm256_fmadd_ps(qv, kv_load8(k_cache, k0 + i, half), a0);
                a1 = _mm256_fmadd_ps(qv, kv_load8(k_cache, k0 + head_dim + i, half), a1);
                a2 = _mm256_fmadd_ps(qv, kv_load8(k_cache, k0 + 2 * head_dim + i, half), a2);
                a3 = _mm256_fmadd_ps(qv, kv_load8(k_cache, k0 + 3 * head_dim + i, half), a3);
            }
            const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
            const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
            _mm_storeu_ps(score + t, _mm_mul_ps(sums, _mm_set1_ps(scale)));
            for (int j = 0; j < 4; j++) top = score[t + j] > top ? score[t + j] : top;
        }
    }
    for (; t < len; t++) {
        score[t] = kv_dot(q, k_cache, base + t * head_dim, head_dim, half) * scale;
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
    /* y = sum_t p_t * v_t, 64 outputs at a time kept in registers over every key (storing y back after each key
       made this loop store-bound: at 64 streams it was a quarter of the step). Each output still sees the
       same FMAs in the same order. */
    int64_t i0 = 0;
    for (; i0 + 64 <= head_dim; i0 += 64) {
        __m256 acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
        for (int64_t t = 0; t < len; t++) {
            const __m256 p = _mm256_set1_ps(score[t] * inv);
            const int64_t v = base + t * head_dim + i0;
            for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(p, kv_load8(v_cache, v + 8 * j, half), acc[j]);
        }
        for (int j = 0; j < 8; j++) _mm256_storeu_ps(y + i0 + 8 * j, acc[j]);
    }
    for (int64_t i = i0; i < head_dim; i++) y[i] = 0.0f;
    for (int64_t t = 0; i0 < head_dim && t < len; t++) {
        const float p = score[t] * inv;
        const int64_t v = base + t * head_dim;
        int64_t i = i0;
        for (; i + 8 <= head_dim; i += 8)
            _mm256_storeu_ps(y + i, _mm256_fmadd_ps(_mm256_set1_ps(p), kv_load8(v_cache, v + i, half),
                                                    _mm256_loadu_ps(y + i)));
        for (; i < head_dim; i++) y[i] += p * kv_at(v_cache, v + i, half);
    }
}

/* Floats smollm_attention_decode needs in `scratch`: each row and head's rotated query and scores, and each thread's
   fp32 copy of one key/value head's keys and values (the grouped fp16 mode below). */
int64_t smollm_attention_scratch(int64_t rows, int64_t n_head, int64_t head_dim, int64_t kv_len, int64_t nthreads) {
    return rows * n_head * (head_dim + kv_len) + nthreads * 2 * kv_len * head_dim;
}

/* Rows and key/value heads from which an fp16 cache is read once per key/value head (per thread, widened into fp32
   and shared by its query heads) rather than once per query head; below it, per query head, which splits the work
   of a row or two over the threads more evenly. The two give the same bits. */
#define GROUPED_TASKS_PER_THREAD 4

/* One decode token per row, for every row and head of one layer:
   - qkv (rows, (n_head + 2 * n_kv_head) * head_dim): the fused projection's output, queries then keys then values;
   - cos, sin (rows, head_dim): each row's rotary tables at its position;
   - k_cache, v_cache (max_slots, n_kv_head, max_len, head_dim), fp32 or (half) fp16: the layer's cache; row r
     writes its rotated key and its value at (slots[r], head, positions[r]) and attends keys 0..positions[r] of its
     own slot;
   - out (rows, n_head * head_dim). `scratch` holds smollm_attention_scratch(...) floats, kv_len > every position. */
static inline __attribute__((always_inline)) void attention_rows(const float *qkv, int64_t rows, int64_t n_head,
                                                                 int64_t n_kv_head, int64_t head_dim, const float *cos,
                                                                 const float *sin, void *k_cache, void *v_cache,
                                                                 int64_t max_len, const int64_t *slots,
                                                                 const int64_t *positions, int64_t kv_len, float *out,
                                                                 float *scratch, int nthreads, const int half) {
    const int64_t width = (n_head + 2 * n_kv_head) * head_dim;
    const int64_t n_rep = n_head / n_kv_head;
    const float scale = 1.0f / sqrtf((float)head_dim);
    float *wide = scratch + rows * n_head * (head_dim + kv_len); /* nthreads x (keys, values) x kv_len x head_dim */
    /* Every row's key and value first (a prompt's tokens attend each other's), split between the threads: done by
       one thread it was ~5% of a 64-row step with the other spinning at the next barrier. */
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows >= PARALLEL_ROWS)
    for (int64_t task = 0; task < rows * n_kv_head; task++) {
        const int64_t r = task / n_kv_head, h = task % n_kv_head;
        const float *kr = qkv + r * width + n_head * head_dim, *vr = kr + n_kv_head * head_dim;
        float *rotated = scratch + task * (head_dim + kv_len); /* free until the attention below uses it */
        const int64_t at = ((slots[r] * n_kv_head + h) * max_len + positions[r]) * head_dim;
        rope(kr + h * head_dim, cos + r * head_dim, sin + r * head_dim, head_dim, rotated);
        kv_store(k_cache, at, rotated, head_dim, half);
        kv_store(v_cache, at, vr + h * head_dim, head_dim, half);
    }
    if (half && rows * n_kv_head >= GROUPED_TASKS_PER_THREAD * (int64_t)nthreads) {
        /* An fp16 cache: each key/value head's keys and values are widened once (exactly) and read by its n_rep
           query heads from this thread's fp32 copy, instead of being loaded and widened n_rep times.
           A task costs its row's context length, and a batch mixes long and short ones (the oldest streams, often
           first in it, are the longest), so tasks go one at a time to whichever thread is free (below, a key/value
           head's n_rep query heads at a time, which read the same keys) rather than in two fixed halves. 64 rows,
           30 layers, 2 threads on the AMX Xeon: the first half of the rows at 380 positions and the second at 40
           took 53.1 ms in halves and 34.3 one at a time (fp32 cache, per query head: 85.8 and 53.6); positions
           200-240, 35.3 and 35.6 (fp32: 55.8 and 54.0; one query head at a time there, 86.9: two threads reading
           the same keys). A task is still computed whole by one thread: the same bits. */
#pragma omp parallel for num_threads(nthreads) schedule(dynamic)
        for (int64_t task = 0; task < rows * n_kv_head; task++) {
            const int64_t r = task / n_kv_head, kvh = task % n_kv_head;
            const int64_t len = positions[r] + 1, n = len * head_dim;
            const int64_t base = (slots[r] * n_kv_head + kvh) * max_len * head_dim;
            float *keys = wide + (int64_t)omp_get_thread_num() * 2 * kv_len * head_dim, *values = keys + kv_len * head_dim;
            int64_t i = 0;
            for (; i + 8 <= n; i += 8) {
                _mm256_storeu_ps(keys + i, kv_load8(k_cache, base + i, 1));
                _mm256_storeu_ps(values + i, kv_load8(v_cache, base + i, 1));
            }
            for (; i < n; i++) {
                keys[i] = kv_at(k_cache, base + i, 1);
                values[i] = kv_at(v_cache, base + i, 1);
            }
            for (int64_t h = kvh * n_rep; h < (kvh + 1) * n_rep; h++) {
                float *q = scratch + (r * n_head + h) * (head_dim + kv_len);
                rope(qkv + r * width + h * head_dim, cos + r * head_dim, sin + r * head_dim, head_dim, q);
                attend_head(q, keys, values, 0, len, head_dim, scale, q + head_dim, out + (r * n_head + h) * head_dim,
                            0);
            }
        }
        return;
    }
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, n_rep)
    for (int64_t task = 0; task < rows * n_head; task++) {
        const int64_t r = task / n_head, h = task % n_head, kvh = h / n_rep;
        float *q = scratch + task * (head_dim + kv_len);
        rope(qkv + r * width + h * head_dim, cos + r * head_dim, sin + r * head_dim, head_dim, q);
        const int64_t base = (slots[r] * n_kv_head + kvh) * max_len * head_dim; /* this head's keys and values */
        attend_head(q, k_cache, v_cache, base, positions[r] + 1, head_dim, scale, q + head_dim,
                    out + task * head_dim, half);
    }
}

void smollm_attention_decode(const float *qkv, int64_t rows, int64_t n_head, int64_t n_kv_head, int64_t head_dim,
                             const float *cos, const float *sin, void *k_cache, void *v_cache, int kv_half,
                             int64_t max_len, const int64_t *slots, const int64_t *positions, int64_t kv_len,
                             float *out, float *scratch, int nthreads) {
    if (kv_half)
        attention_rows(qkv, rows, n_head, n_kv_head, head_dim, cos, sin, k_cache, v_cache, max_len, slots, positions,
                       kv_len, out, scratch, nthreads, 1);
    else
        attention_rows(qkv, rows, n_head, n_kv_head, head_dim, cos, sin, k_cache, v_cache, max_len, slots, positions,
                       kv_len, out, scratch, nthreads, 0);
}

/* y = weight * x / sqrt(mean(x^2) + eps), row by row: (rows, dim) fp32. */
static void rms_norm_rows(const float *x, int64_t rows, int64_t dim, const float *weight, float eps, float *y,
                          int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows >= PARALLEL_ROWS)
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

void smollm_rms_norm(const float *x, int64_t rows, int64_t dim, const float *weight, float eps, float *y) {
    rms_norm_rows(x, rows, dim, weight, eps, y, 1);
}

/* x += y, (rows, dim). */
static void add_rows(float *x, const float *y, int64_t rows, int64_t dim, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = r * dim; i < (r + 1) * dim; i++) x[i] += y[i];
}

/* Scratch floats smollm_decode_layer needs for `rows` rows. */
int64_t smollm_decode_layer_scratch(int64_t rows, int64_t dim, int64_t n_head, int64_t n_kv_head, int64_t head_dim,
                                    int64_t hidden, int64_t kv_len, int64_t nthreads) {
    const int64_t widest = hidden > dim ? hidden : dim;
    return rows * (dim + (n_head + 2 * n_kv_head) * head_dim + n_head * head_dim + 3 * hidden + widest / 4 +
                   2 * widest / QK) +
           smollm_attention_scratch(rows, n_head, head_dim, kv_len, nthreads);
}

/* One transformer block for one decode token per row, every projection in 4-bit blocks, x (rows, dim) updated in
   place: x += wo(attention(rope(wqkv(norm(x))))); x += w2(silu(gate) * up), [gate, up] = w13(norm(x)). The same
   kernels as the separate calls above, in the order the PyTorch block runs them. */
void smollm_decode_layer(float *x, int64_t rows, int64_t dim, const float *attn_norm, const float *ffn_norm, float eps,
                         const uint8_t *wqkv, const uint8_t *wo, const uint8_t *w13, const uint8_t *w2,
                         int64_t n_head, int64_t n_kv_head, int64_t head_dim, int64_t hidden, const float *cos,
                         const float *sin, void *k_cache, void *v_cache, int kv_half, int64_t max_len,
                         const int64_t *slots, const int64_t *positions, int64_t kv_len, float *scratch,
                         int nthreads) {
    const int64_t q_width = n_head * head_dim, qkv_width = (n_head + 2 * n_kv_head) * head_dim;
    float *h = scratch;                                  /* rows x dim */
    float *qkv = h + rows * dim;                         /* rows x qkv_width */
    float *att_scratch = qkv + rows * qkv_width;         /* smollm_attention_scratch(...) */
    float *att = att_scratch + smollm_attention_scratch(rows, n_head, head_dim, kv_len, nthreads); /* rows x q_width */
    float *gate_up = att + rows * q_width;               /* rows x 2 hidden */
    float *act = gate_up + rows * 2 * hidden;            /* rows x hidden */
    float *mm = act + rows * hidden;                     /* q4 matmul scratch */
    float *out = qkv;                                    /* rows x dim, reusing qkv once attention has read it */

    rms_norm_rows(x, rows, dim, attn_norm, eps, h, nthreads);
    smollm_q4_matmul(h, rows, dim, wqkv, qkv_width, qkv, mm, nthreads);
    smollm_attention_decode(qkv, rows, n_head, n_kv_head, head_dim, cos, sin, k_cache, v_cache, kv_half, max_len,
                            slots, positions, kv_len, att, att_scratch, nthreads);
    smollm_q4_matmul(att, rows, q_width, wo, dim, out, mm, nthreads);
    add_rows(x, out, rows, dim, nthreads);

    rms_norm_rows(x, rows, dim, ffn_norm, eps, h, nthreads);
    smollm_q4_matmul(h, rows, dim, w13, 2 * hidden, gate_up, mm, nthreads);
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; r++)
        silu_mul(gate_up + r * 2 * hidden, gate_up + r * 2 * hidden + hidden, hidden, act + r * hidden);
    smollm_q4_matmul(act, rows, hidden, w2, dim, out, mm, nthreads);
    add_rows(x, out, rows, dim, nthreads);
}

/* Every block of the model for one decode token per row (smollm_decode_layer, layer after layer): the per-layer
   weights come as arrays of n_layer pointers, the cache as its whole (n_layer, max_slots, n_kv_head, max_len,
   head_dim) buffers, fp32 or (kv_half) fp16. */
void smollm_decode_layers(float *x, int64_t rows, int64_t dim, int64_t n_layer, const float *const *attn_norms,
                          const float *const *ffn_norms, float eps, const uint8_t *const *wqkv,
                          const uint8_t *const *wo, const uint8_t *const *w13, const uint8_t *const *w2,
                          int64_t n_head, int64_t n_kv_head, int64_t head_dim, int64_t hidden, const float *cos,
                          const float *sin, void *k_cache, void *v_cache, int kv_half, int64_t max_slots,
                          int64_t max_len, const int64_t *slots, const int64_t *positions, int64_t kv_len,
                          float *scratch, int nthreads) {
    const int64_t layer_bytes = max_slots * n_kv_head * max_len * head_dim * (kv_half ? 2 : 4);
    for (int64_t l = 0; l < n_layer; l++)
        smollm_decode_layer(x, rows, dim, attn_norms[l], ffn_norms[l], eps, wqkv[l], wo[l], w13[l], w2[l], n_head,
                            n_kv_head, head_dim, hidden, cos, sin, (char *)k_cache + l * layer_bytes,
                            (char *)v_cache + l * layer_bytes, kv_half, max_len, slots, positions, kv_len, scratch,
                            nthreads);
}

/* bf16 products for bf16 models, on AMX tiles (Sapphire Rapids and later Xeons) or with AVX512-BF16's vdpbf16ps
   (Cooper Lake, Zen 4 and later: AVX512-BF16 without AMX).

   Why by hand: oneDNN's bf16 GEMM picks its kernel by row count (on AMX one for up to 32 rows, others above,
   depending on the shape and the threads; on AVX512-BF16 alone even 2 rows differ from 1), and the kernels sum in
   different orders, so a row's result changed with the rows around it and a greedy request's tokens with its
   batch. Here every output sums its inputs in one order whatever the number of rows: a row's bits never depend on
   its batch. On AMX, TDPBF16PS runs over the inputs 32 at a time into fp32; with AVX512-BF16, VDPBF16PS adds one
   input pair after the other into each output's fp32 lane. (The two instruction sets need not give the same bits:
   each is batch-invariant on its own CPU.) Measured on the AMX Xeon (2 threads, the 135M model's 121
   projections): the AMX tiles take 16.7 / 16.7 / 27.8 / 79.0 ms for 1 / 16 / 64 / 320 rows against oneDNN's
   23.6 / 25.7 / 32.8 / 66.0.

   Weights are packed in groups of 16 output rows (the group count rounded up to even, zero rows added), each group
   input pair after input pair: the 16 rows' (w[2p], w[2p+1]) in 64 bytes, which is one row of an AMX B tile (so 16
   pairs are one tile) and one 512-bit register of VDPBF16PS's weight operand. On AMX a tile of 16 activation rows
   by 32 inputs is the A tile, and two C tiles hold 16 rows by 32 outputs; with AVX512-BF16 up to BF16_TILE_ROWS
   rows by 32 outputs stay in registers, each row's input pair broadcast. */
#if HAVE_NEWER_X86_INTRINSICS
#define HAVE_BF16_KERNELS 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#else
#define HAVE_BF16_KERNELS 0
#endif

/* The bf16 kernels, by index (model/native.py's BF16_ISAS): 0 none, 1 AVX512-BF16, 2 AMX. */
enum { BF16_NONE, BF16_AVX512, BF16_AMX, BF16_ISA_COUNT };

/* Whether this CPU, OS and build run `isa`: AVX512-BF16 with AVX512 F, BW and VL (the OS saving their registers,
   which __builtin_cpu_supports checks); AMX also needs AMX-TILE, AMX-BF16 and the kernel's permission for tile
   state, asked once. */
static int bf16_isa_supported(int isa) {
#if HAVE_BF16_KERNELS
    static int amx = -1;
    unsigned a, b, c, d;
    __builtin_cpu_init();
    const int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512vl") && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a >> 5 & 1);
    switch (isa) {
    case BF16_NONE: return 1;
    case BF16_AVX512: return avx512;
    case BF16_AMX:
        if (amx < 0)
            amx = avx512 && __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 24 & 1) && (d >> 22 & 1) &&
                  syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
        return amx;
    default: return 0;
    }
#else
    return isa == BF16_NONE;
#endif
}

static const int bf16_preference[] = {BF16_AMX, BF16_AVX512, BF16_NONE};
static kernel_choice bf16_kernel = {bf16_isa_supported, bf16_preference, BF16_ISA_COUNT, -1};

/* The bf16 kernel smollm_bf16_matmul runs (none: no AVX512-BF16). */
int smollm_bf16_isa(void) { return kernel_in_use(&bf16_kernel); }

/* Pins the bf16 kernel to `isa`; returns the one in use. */
int smollm_bf16_set_isa(int isa) { return kernel_pin(&bf16_kernel, isa); }

/* Elements (uint16) the packed form of an (n, k) weight takes. */
int64_t smollm_bf16_packed_elems(int64_t n, int64_t k) { return ((n + 31) / 32) * 32 * k; }

/* w (n, k) bf16, k even, into `out` (smollm_bf16_packed_elems) in the layout above. */
void smollm_bf16_pack(const uint16_t *w, int64_t n, int64_t k, uint16_t *out) {
    const int64_t groups = ((n + 31) / 32) * 2, pairs = k / 2;
    for (int64_t g = 0; g < groups; g++)
        for (int64_t p = 0; p < pairs; p++)
            for (int64_t j = 0; j < 16; j++) {
                const int64_t row = g * 16 + j;
                uint16_t *dst = out + (g * pairs + p) * 32 + 2 * j;
                dst[0] = row < n ? w[row * k + 2 * p] : 0;
                dst[1] = row < n ? w[row * k + 2 * p + 1] : 0;
            }
}

#if HAVE_BF16_KERNELS
typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* The AMX products: `pad` holds nthreads * 16 * k bf16 (the last row tile's rows, zero-padded to 16). */
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bf16,avx512bw,avx512vl"))) static void
bf16_matmul_amx(const uint16_t *x, int64_t rows, int64_t k, const uint16_t *w, int64_t n, uint16_t *y, uint16_t *pad,
                int nthreads) {
    const int64_t pairs = k / 2, steps = k / 32, col_tiles = (n + 31) / 32, row_tiles = (rows + 15) / 16;
#pragma omp parallel num_threads(nthreads)
    {
        tile_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette_id = 1;
        for (int t = 0; t < 5; t++) { /* C0, C1, A, B0, B1: 16 rows of 64 bytes each */
            cfg.rows[t] = 16;
            cfg.colsb[t] = 64;
        }
        _tile_loadconfig(&cfg);
        uint16_t *own_pad = pad + (int64_t)omp_get_thread_num() * 16 * k;
        float c[2][16 * 16] __attribute__((aligned(64)));
        /* Threads split the output columns first, so each streams its own part of the weights once. */
#pragma omp for schedule(static)
        for (int64_t task = 0; task < col_tiles * row_tiles; task++) {
            const int64_t ct = task / row_tiles, r0 = (task % row_tiles) * 16;
            const int64_t rr = rows - r0 < 16 ? rows - r0 : 16;
            const uint16_t *a = x + r0 * k;
            if (rr < 16) {
                memcpy(own_pad, a, sizeof(uint16_t) * (size_t)(rr * k));
                memset(own_pad + rr * k, 0, sizeof(uint16_t) * (size_t)((16 - rr) * k));
                a = own_pad;
            }
            const uint16_t *b0 = w + (2 * ct) * pairs * 32, *b1 = b0 + pairs * 32;
            _tile_zero(0);
            _tile_zero(1);
            for (int64_t s = 0; s < steps; s++) {
                _tile_loadd(2, a + s * 32, k * 2);
                _tile_loadd(3, b0 + s * 16 * 32, 64);
                _tile_loadd(4, b1 + s * 16 * 32, 64);
                _tile_dpbf16ps(0, 2, 3);
                _tile_dpbf16ps(1, 2, 4);
            }
            _tile_stored(0, c[0], 64);
            _tile_stored(1, c[1], 64);
            const int64_t c0 = ct * 32, width = n - c0 < 32 ? n - c0 : 32;
            for (int64_t r = 0; r < rr; r++) {
                uint16_t out[32];
                _mm256_storeu_si256((__m256i *)out, (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(c[0] + r * 16)));
                _mm256_storeu_si256((__m256i *)(out + 16), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(c[1] + r * 16)));
                memcpy(y + (r0 + r) * n + c0, out, sizeof(uint16_t) * (size_t)width);
            }
        }
        _tile_release();
    }
}

/* Rows of activations a VDPBF16PS tile holds: 2 x BF16_TILE_ROWS accumulators, 2 weight registers and a broadcast
   within the 32 vector registers, each weight load serving this many rows. */
#define BF16_TILE_ROWS 6

/* y[R rows, the 32 outputs from c0] for the weight groups b0, b1 (16 outputs each): each output's lane adds its
   input pairs in order, p = 0, 1, ..., whatever R is and wherever its row sits in the tile. */
static inline __attribute__((always_inline)) __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void
bf16_tile_avx512(const uint16_t *x, int64_t k, const uint16_t *b0, const uint16_t *b1, const int R, uint16_t *y,
                 int64_t n, int64_t c0) {
    __m512 acc0[BF16_TILE_ROWS], acc1[BF16_TILE_ROWS];
    for (int r = 0; r < R; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < k / 2; p++) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(b0 + p * 32), w1 = (__m512bh)_mm512_loadu_si512(b1 + p * 32);
        for (int r = 0; r < R; r++) {
            int32_t pair;
            memcpy(&pair, x + r * k + 2 * p, sizeof pair);
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
            acc0[r] = _mm512_dpbf16_ps(acc0[r], xv, w0);
            acc1[r] = _mm512_dpbf16_ps(acc1[r], xv, w1);
        }
    }
    const int64_t width = n - c0 < 32 ? n - c0 : 32;
    const __mmask16 m0 = width >= 16 ? 0xffff : (__mmask16)((1u << width) - 1);
    const __mmask16 m1 = width >= 32 ? 0xffff : width <= 16 ? 0 : (__mmask16)((1u << (width - 16)) - 1);
    for (int r = 0; r < R; r++) {
        _mm256_mask_storeu_epi16(y + r * n + c0, m0, (__m256i)_mm512_cvtneps_pbh(acc0[r]));
        _mm256_mask_storeu_epi16(y + r * n + c0 + 16, m1, (__m256i)_mm512_cvtneps_pbh(acc1[r]));
    }
}

/* The AVX512-BF16 products: row tiles of BF16_TILE_ROWS, then the rest as one tile, R a constant in each call so
   that the tile's loops unroll. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void
bf16_matmul_avx512(const uint16_t *x, int64_t rows, int64_t k, const uint16_t *w, int64_t n, uint16_t *y,
                   int nthreads) {
    const int64_t pairs = k / 2, col_tiles = (n + 31) / 32;
    const int64_t row_tiles = (rows + BF16_TILE_ROWS - 1) / BF16_TILE_ROWS;
    /* Threads split the output columns first, so each streams its own part of the weights once. */
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t task = 0; task < col_tiles * row_tiles; task++) {
        const int64_t ct = task / row_tiles, r0 = (task % row_tiles) * BF16_TILE_ROWS;
        const uint16_t *a = x + r0 * k, *b0 = w + (2 * ct) * pairs * 32, *b1 = b0 + pairs * 32;
        uint16_t *out = y + r0 * n;
        switch (rows - r0 < BF16_TILE_ROWS ? rows - r0 : BF16_TILE_ROWS) {
        case 6: bf16_tile_avx512(a, k, b0, b1, 6, out, n, ct * 32); break;
        case 5: bf16_tile_avx512(a, k, b0, b1, 5, out, n, ct * 32); break;
        case 4: bf16_tile_avx512(a, k, b0, b1, 4, out, n, ct * 32); break;
        case 3: bf16_tile_avx512(a, k, b0, b1, 3, out, n, ct * 32); break;
        case 2: bf16_tile_avx512(a, k, b0, b1, 2, out, n, ct * 32); break;
        default: bf16_tile_avx512(a, k, b0, b1, 1, out, n, ct * 32); break;
        }
    }
}
#endif

/* y (rows, n) bf16 = x (rows, k) bf16 @ W.T, W packed; k a multiple of 32; `pad` holds nthreads * 16 * k bf16 (used
   on AMX). On the kernel smollm_bf16_isa() names; never called where that is none (model/native.py refuses to pack
   there). */
void smollm_bf16_matmul(const uint16_t *x, int64_t rows, int64_t k, const uint16_t *w, int64_t n, uint16_t *y,
                        uint16_t *pad, int nthreads) {
#if HAVE_BF16_KERNELS
    switch (smollm_bf16_isa()) {
    case BF16_AMX: bf16_matmul_amx(x, rows, k, w, n, y, pad, nthreads); return;
    case BF16_AVX512: bf16_matmul_avx512(x, rows, k, w, n, y, nthreads); return;
    default: break;
    }
#endif
    (void)x, (void)rows, (void)k, (void)w, (void)n, (void)y, (void)pad, (void)nthreads;
}
