/* CPU kernels for decoding a few tokens at a time (llmsh/runtime/kernels/__init__.py builds and loads this file).
 *
 * Why not torch's ops: at batch 1 a decode step is ~10 tiny ops per layer around GEMVs, and on CPUs torch spends
 * more time dispatching them than computing (rms_norm 39 us for 768 floats, SDPA 35-150 us), while its bfloat16
 * GEMV reaches ~0.7 of the copy bandwidth on CPUs without native bf16 (it widens through a slow generic path).
 * These kernels are C built for the machine it runs on (-O3 -march=native): GCC vector extensions for the matrix
 * products, loops the compiler vectorises for the rest, OpenMP threads where the compiler has it. Activations stay
 * float32 (bf16 matrix products of several rows round their input to bf16 on CPUs with bf16 dot products, as
 * torch does); weights and the KV cache are float32 or bfloat16 as loaded, in the runtime's own layouts: weights
 * (in, out) row-major, KV cache (max_batch, n_kv_head, max_seq_len, head_dim). The instruction set is chosen when
 * the file is compiled on the user's machine (-march=native): AVX512_BF16 dot products, AVX-512, AVX2 or NEON.
 *
 * Contents: one-row GEMV and several-row GEMM (cpu_gemm.c), lm_linear (threads over columns); exp, SiLU, GELU;
 * RMSNorm, LayerNorm; RoPE and attention (soft-capped or not) with the KV-cache write (cpu_attention.c); lm_layers,
 * which runs whole layers of every dense family in one call (GPT-2, the Llama family with Qwen3's q/k norms and
 * Phi-4's partial RoPE, Gemma 2/3 with its (1 + w) norms, post norms and GeGLU); the pieces of a mixture-of-experts
 * layer (lm_attention_half here; lm_route, lm_expert in cpu_moe.c); transposed copies (cpu_transpose.c). The other
 * files are included, not compiled apart: one translation unit, so the compiler inlines across them.
 */
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

static inline float bf16_to_f32(bf16 h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16 f32_to_bf16(float f) {   /* round to nearest even, as torch does; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

static inline float load(const void *p, long i, int is_bf16) {
    return is_bf16 ? bf16_to_f32(((const bf16 *)p)[i]) : ((const float *)p)[i];
}

/* Vectors of 16 floats through GCC's vector extensions: one AVX-512 register, two AVX2 or four NEON ones. */
typedef float vf __attribute__((vector_size(64), aligned(4)));        /* aligned(4): unaligned loads are fine */
typedef uint16_t vh __attribute__((vector_size(32), aligned(2)));
typedef uint32_t vu __attribute__((vector_size(64)));
#define VL 16
#define F32(v) (v)

/* Two-vector shuffles: clang and GCC >= 12 have __builtin_shufflevector; older GCC spells it __builtin_shuffle with
 * a mask vector. Indices 0-15 pick lanes of a, 16-31 lanes of b. */
typedef int32_t vi __attribute__((vector_size(64)));
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (vi){__VA_ARGS__})
#endif

static inline vf vload_f32(const float *p) { return *(const vf *)p; }
#ifdef __AVX512BW__
#include <immintrin.h>
/* GCC widens through two 8-lane halves (5 instructions); AVX512BW does it in one (vpmovzxwd ymm -> zmm). GPT-2's
 * linears at 16 rows (compute-bound): 69 -> 51 ms in bf16, where float32 takes 55. */
static inline vf vload_bf16(const bf16 *p) {
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
}
#else
static inline vf vload_bf16(const bf16 *p) { return (vf)(__builtin_convertvector(*(const vh *)p, vu) << 16); }
#endif

/* bf16 in pairs: 32 bf16 loaded as 16 32-bit lanes hold an even column in each lane's low half and the next (odd)
 * column in its high half, so lane << 16 is the even columns as float32 and lane & 0xffff0000 the odd ones, exactly.
 * That is one integer op per 16 weights where widening 16 at a time takes two (vpmovzxwd + shift), and a step reads
 * a whole 64-byte line of each weight row. Sums over them come out as even | odd columns, so the bf16 matrix
 * products keep each 32 columns of y in that order while they run (reorder), and put them back at the end. */
typedef uint32_t vu_any __attribute__((vector_size(64), aligned(2)));     /* 32 bf16 at any (2-byte) alignment */
static inline vf even_bf16(vu u) { return (vf)(u << 16); }
static inline vf odd_bf16(vu u) { return (vf)(u & 0xffff0000u); }

/* The orders products over bf16 weights keep y in while they run, within each 32 columns: PAIRS (even | odd
 * columns, above) and DOT (0-3, 8-11, 16-19, 24-27 | 4-7, 12-15, 20-23, 28-31: how vpunpck{l,h}wd interleave two
 * rows, gemm_bf16_dot below). */
enum { TO_PAIRS, FROM_PAIRS, TO_DOT, FROM_DOT };

/* Rows of y (ldy apart): each group of 32 of the first ncols columns (a multiple of 32) into or out of an order */
static void reorder(float *y, long M, long ncols, long ldy, int how) {
    for (long m = 0; m < M; m++)
        for (long j = 0; j < ncols; j += 2 * VL) {
            float *p = y + m * ldy + j;
            vf a = vload_f32(p), b = vload_f32(p + VL), lo, hi;
            if (how == TO_PAIRS) {
                lo = SHUFFLE(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
                hi = SHUFFLE(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
            } else if (how == FROM_PAIRS) {
                lo = SHUFFLE(a, b, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
                hi = SHUFFLE(a, b, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
            } else if (how == TO_DOT) {
                lo = SHUFFLE(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
                hi = SHUFFLE(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
            } else {
                lo = SHUFFLE(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
                hi = SHUFFLE(a, b, 8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
            }
            *(vf *)p = lo;
            *(vf *)(p + VL) = hi;
        }
}

#include "cpu_gemm.c"

/* 1 if bf16 products of several rows round x to bf16 (bf16 dot products, see gemm_bf16_dot); Python's tests ask */
int lm_bf16_dot(void) { return HAVE_BF16_DOT; }

/* Threads split the columns (whole GEMM strips, so the split costs no tail work): each streams its own slice of
 * every weight row. With OpenMP the kernels join torch's own libgomp (it is already loaded, under the same soname),
 * so n_threads = torch.get_num_threads() adds no second thread pool; without OpenMP the pragmas are ignored. */
static void linear_columns(const float *x, const uint32_t *xp, long M, long K, const void *w, long N, int is_bf16,
                           float *y, long j0, long j1) {
    if (M == 1 && is_bf16)
        gemv_bf16(x, K, (const bf16 *)w + j0, N, j1 - j0, y + j0);
    else if (M == 1)
        gemv_f32(x, K, (const float *)w + j0, N, j1 - j0, y + j0);
#if HAVE_AMX
    else if (is_bf16 && xp && M <= 16 && __atomic_load_n(&amx_state, __ATOMIC_RELAXED) == 1 && j1 - j0 >= 64 &&
             gemm_bf16_amx(xp, pairs_ld(K), M, K, (const bf16 *)w + j0, N, j1 - j0, y + j0, N)) {
        /* done on tiles */
    }
#endif
#ifdef __AVX512BF16__
    else if (is_bf16 && xp)
        gemm_bf16_dot(xp, pairs_ld(K), M, K, (const bf16 *)w + j0, N, j1 - j0, y + j0, N);
#endif
    else if (is_bf16)
        gemm_bf16(x, M, K, (const bf16 *)w + j0, N, j1 - j0, y + j0, N);
    else
        gemm_f32(x, M, K, (const float *)w + j0, N, j1 - j0, y + j0, N);
}

/* One row on several threads: each streams a contiguous run of W's rows (K split in whole panels) into its own y,
 * and the partial ys are summed (N floats a thread). Splitting the columns, as several rows do, has every thread
 * read a slice of every row: on 1.1B-Llama shapes at 2 threads (bf16) that read ~29-31 GB/s where this reads
 * ~31-34. Returns 0 (and does nothing) if the partial ys cannot be allocated. */
static int gemv_split_rows(const float *x, long K, const void *w, long N, int is_bf16, float *y, long parts) {
    float *partial = calloc((size_t)((parts - 1) * N), sizeof(float));
    if (!partial) return 0;
    long panels = K / PANEL;
#pragma omp parallel for num_threads(parts) schedule(static, 1)
    for (long p = 0; p < parts; p++) {
        long k0 = panels * p / parts * PANEL, k1 = p == parts - 1 ? K : panels * (p + 1) / parts * PANEL;
        float *yp = p ? partial + (p - 1) * N : y;
        if (is_bf16) gemv_bf16(x + k0, k1 - k0, (const bf16 *)w + k0 * N, N, N, yp);
        else gemv_f32(x + k0, k1 - k0, (const float *)w + k0 * N, N, N, yp);
    }
    for (long p = 1; p < parts; p++)
        for (long j = 0; j < N; j++) y[j] += partial[(p - 1) * N + j];
    free(partial);
    return 1;
}

void lm_linear(const float *x, long M, long K, const void *w, long N, const void *bias, int is_bf16, int accumulate,
               float *y, int n_threads) {
    if (!accumulate) memset(y, 0, (size_t)(M * N) * sizeof(float));
    long strip = NR * VL, strips = (N + strip - 1) / strip;
    long parts = n_threads < strips ? n_threads : strips;
    uint32_t *xp = NULL;
#ifdef __AVX512BF16__
    if (M > 1 && is_bf16) xp = bf16_pairs(x, M, K);           /* (NULL if out of memory: gemm_bf16 then) */
#endif
#if HAVE_AMX
    if (xp && __atomic_load_n(&amx_state, __ATOMIC_RELAXED) < 0) lm_amx(-1);    /* once, before the threads */
#endif
    if (M == 1 && n_threads > 1 && K >= 4 * PANEL * n_threads && gemv_split_rows(x, K, w, N, is_bf16, y, n_threads)) {
        /* one row, K split between the threads: done */
    } else if (parts <= 1) {
        linear_columns(x, xp, M, K, w, N, is_bf16, y, 0, N);
    } else {
#pragma omp parallel for num_threads(parts) schedule(static, 1)
        for (long p = 0; p < parts; p++) {
            long j0 = strips * p / parts * strip, j1 = strips * (p + 1) / parts * strip;
            linear_columns(x, xp, M, K, w, N, is_bf16, y, j0, j1 < N ? j1 : N);
        }
    }
    free(xp);
    if (bias)
        for (long m = 0; m < M; m++)
            for (long j = 0; j < N; j++) y[m * N + j] += load(bias, j, is_bf16);
}

/* ---- elementwise --------------------------------------------------------------------------------------------- */

/* exp(x) as 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p a degree-6 Taylor polynomial (relative error < 2e-7).
 * Written out so that loops calling it vectorise: libm's expf is a scalar call, and GCC will not vectorise floorf
 * without -fno-trapping-math, so n is rounded by adding 1.5 * 2^23 (its low mantissa bits then hold n). */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    union { float f; int32_t i; } shifted = {.f = x * 1.44269504f + 12582912.0f}, scale;
    float n = shifted.f - 12582912.0f;
    float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    scale.i = (shifted.i - 0x4B400000 + 127) << 23;                           /* 2^n */
    return p * scale.f;
}

/* tanh(z) = 1 - 2 / (e^2z + 1) through exp_approx, so that loops over it vectorise (libm's tanhf is a scalar call) */
static inline float tanh_approx(float z) { return 1.0f - 2.0f / (exp_approx(2.0f * z) + 1.0f); }

/* out[m, i] = silu(gate[m, i]) * up[m, i] for rows gu[m] = gate (F) | up (F) (the fused w13's output) */
void lm_silu_mul(const float *restrict gu, long M, long F, float *restrict out) {
    for (long m = 0; m < M; m++) {
        const float *g = gu + m * 2 * F, *u = g + F;
        float *o = out + m * F;
        for (long i = 0; i < F; i++) o[i] = g[i] / (1.0f + exp_approx(-g[i])) * u[i];
    }
}

/* x = gelu(x) in place: tanh approximation (GPT-2's gelu_new) or, with exact != 0, the erf form */
void lm_gelu(float *restrict x, long n, int exact) {
    if (exact) {
        for (long i = 0; i < n; i++) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678f));
        return;
    }
    for (long i = 0; i < n; i++) {
        x[i] = 0.5f * x[i] * (1.0f + tanh_approx(0.7978845608f * (x[i] + 0.044715f * x[i] * x[i] * x[i])));
    }
}

/* ---- norms (one row of D per token; weight and bias in the model's dtype) ------------------------------------ */

/* 1 / rms(x[0:D]), the scale of every RMSNorm here */
static inline float inv_rms(const float *restrict x, long D, float eps) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (long i = 0; i < D; i++) ss += x[i] * x[i];
    return 1.0f / sqrtf(ss / D + eps);
}

void lm_rmsnorm(const float *restrict x, long M, long D, const void *w, int is_bf16, float eps, float *restrict y) {
    for (long m = 0; m < M; m++) {
        float inv = inv_rms(x + m * D, D, eps);
        for (long i = 0; i < D; i++) y[m * D + i] = x[m * D + i] * inv * load(w, i, is_bf16);
    }
}

void lm_layernorm(const float *restrict x, long M, long D, const void *w, const void *b, int is_bf16, float eps,
                  float *restrict y) {
    for (long m = 0; m < M; m++) {
        const float *xr = x + m * D;
        float sum = 0.0f, sq = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (long i = 0; i < D; i++) sum += xr[i];
        float mean = sum / D;
#pragma omp simd reduction(+ : sq)
        for (long i = 0; i < D; i++) sq += (xr[i] - mean) * (xr[i] - mean);
        float inv = 1.0f / sqrtf(sq / D + eps);
        for (long i = 0; i < D; i++) y[m * D + i] = (xr[i] - mean) * inv * load(w, i, is_bf16) + load(b, i, is_bf16);
    }
}

#include "cpu_attention.c"

/* ---- whole layers ---------------------------------------------------------------------------------------------
 * One call runs n transformer layers for M decode tokens, so Python pays one call per step instead of ~10 per
 * layer (measured ~2 ms a step: the weights streamed through the caches evict the interpreter's working set). */

typedef struct {                           /* one layer's parameters (model dtype) and KV cache; unused ones NULL */
    const void *norm1, *norm1_bias, *w_qkv, *b_qkv, *w_o, *b_o;
    const void *norm2, *norm2_bias, *w_up, *b_up, *w_down, *b_down;   /* llama: w_up is gate|up (w13) */
    void *k_cache, *v_cache;
    long window;                           /* sliding window, 0 for full attention */
    float attn_scale;
    const void *q_norm, *k_norm;           /* Qwen3, Gemma 3: RMSNorm weights (head_dim) of each q and k head */
    const void *post_norm1, *post_norm2;   /* Gemma: RMSNorm of the attention / MLP output before the residual add */
    const float *rope_cos, *rope_sin;      /* Gemma 3: this layer's RoPE tables (local or global); NULL: the step's */
    float softcap;                         /* Gemma 2: attention logits become softcap * tanh(s / softcap); 0: none */
} lm_layer;

typedef struct {                           /* what every layer of the step shares */
    long M, dim, n_head, n_kv, head_dim, hidden, max_seq;
    int is_bf16, is_gpt2, exact_gelu;      /* gpt2: LayerNorm, no RoPE, gelu MLP; else RMSNorm, RoPE, gated MLP */
    int n_threads;
    float eps;
    const float *rope_cos, *rope_sin;
    const int64_t *pos, *slots;
    float *scratch;                        /* lm_scratch_floats() floats */
    long rotary_dim;                       /* RoPE on the first rotary_dim of each head (Phi-4); 0: all of it */
    int gemma;                             /* Gemma: RMSNorm gains (1 + w), GeGLU (tanh GELU) instead of SwiGLU */
} lm_step;

long lm_scratch_floats(long M, long dim, long n_head, long n_kv, long head_dim, long hidden, long max_seq,
                       long n_threads) {
    return M * (dim + (2 * n_head + 2 * n_kv) * head_dim + 3 * hidden) + n_threads * max_seq;
}

/* ---- the newer families' extras (Qwen3, Phi-4) --------------------------------------------------------------- */

/* RMSNorm of every q head and k head of the qkv rows (M rows of `stride` floats), in place: Qwen3 normalises each
 * head over head_dim with its own weights for q and for k, before RoPE (Gemma 3 too, with gains 1 + w). */
void lm_qk_norm(float *qkv, long M, long stride, long n_head, long n_kv, long hd, const void *q_w, const void *k_w,
                int is_bf16, float eps, int plus_one) {
    for (long m = 0; m < M; m++)
        for (long h = 0; h < n_head + n_kv; h++) {
            float *v = qkv + m * stride + h * hd, inv = inv_rms(v, hd, eps);
            const void *w = h < n_head ? q_w : k_w;
            for (long d = 0; d < hd; d++) v[d] = v[d] * inv * (load(w, d, is_bf16) + (plus_one ? 1.0f : 0.0f));
        }
}

/* y = x / rms(x) * (1 + w) over M rows of D (Gemma's RMSNorm: it stores the gain as an offset from 1) */
void lm_rmsnorm_plus_one(const float *x, long M, long D, const void *w, int is_bf16, float eps, float *y) {
    for (long m = 0; m < M; m++) {
        float inv = inv_rms(x + m * D, D, eps);
        for (long i = 0; i < D; i++) y[m * D + i] = x[m * D + i] * inv * (1.0f + load(w, i, is_bf16));
    }
}

/* x += y / rms(y) * (1 + w), row by row (Gemma's norm of a half's output before the residual add) */
static void add_normed(float *restrict x, const float *restrict y, long M, long D, const void *w, int is_bf16,
                       float eps) {
    for (long m = 0; m < M; m++) {
        float inv = inv_rms(y + m * D, D, eps);
        for (long i = 0; i < D; i++) x[m * D + i] += y[m * D + i] * inv * (1.0f + load(w, i, is_bf16));
    }
}

/* out = gelu_tanh(gate) * up over M rows of gate | up (2F floats each): Gemma's GeGLU */
static void gelu_mul(const float *restrict gu, long M, long F, float *restrict out) {
    for (long m = 0; m < M; m++) {
        const float *g = gu + m * 2 * F, *u = g + F;
        float *o = out + m * F;
        for (long i = 0; i < F; i++)
            o[i] = 0.5f * g[i] * (1.0f + tanh_approx(0.7978845608f * (g[i] + 0.044715f * g[i] * g[i] * g[i]))) * u[i];
    }
}

static void norm(const lm_step *s, const float *x, const void *w, const void *b, float *y) {
    if (s->is_gpt2)
        lm_layernorm(x, s->M, s->dim, w, b, s->is_bf16, s->eps, y);
    else if (s->gemma)
        lm_rmsnorm_plus_one(x, s->M, s->dim, w, s->is_bf16, s->eps, y);
    else
        lm_rmsnorm(x, s->M, s->dim, w, s->is_bf16, s->eps, y);
}

/* RoPE on the q and k heads: the layer's own tables (Gemma 3's local layers) or the step's, partial (Phi-4) or not */
static void rope_heads(const lm_step *s, const lm_layer *l, float *qkv, long stride, long n_heads) {
    const float *cos = l->rope_cos ? l->rope_cos : s->rope_cos, *sin = l->rope_sin ? l->rope_sin : s->rope_sin;
    if (s->rotary_dim > 0 && s->rotary_dim < s->head_dim)
        lm_rope_partial(qkv, s->M, stride, n_heads, s->head_dim, s->rotary_dim, cos, sin, s->pos);
    else
        lm_rope(qkv, s->M, stride, n_heads, s->head_dim, cos, sin, s->pos);
}

/* y = w2 applied to src (M rows of `in` floats), added to x: straight in (x += w2 src), or through the layer's post
 * norm first (Gemma: x += norm(w2 src), h as the product's scratch) */
static void project_add(const lm_step *s, const float *src, long in, const void *w, const void *b, const void *post,
                        float *x, float *h) {
    if (post) {
        lm_linear(src, s->M, in, w, s->dim, b, s->is_bf16, 0, h, s->n_threads);
        add_normed(x, h, s->M, s->dim, post, s->is_bf16, s->eps);
    } else {
        lm_linear(src, s->M, in, w, s->dim, b, s->is_bf16, 1, x, s->n_threads);
    }
}

/* Scratch (lm_scratch_floats) as h (M, dim) | qkv | attention out | gate|up (M, 2 hidden) | act (M, hidden) | scores */
typedef struct { float *h, *qkv, *att, *up, *act, *scores; } scratch_parts;
static scratch_parts parts_of(const lm_step *s) {
    scratch_parts p;
    long M = s->M, hd = s->head_dim;
    p.h = s->scratch;
    p.qkv = p.h + M * s->dim;
    p.att = p.qkv + M * (s->n_head + 2 * s->n_kv) * hd;
    p.up = p.att + M * s->n_head * hd;
    p.act = p.up + M * 2 * s->hidden;
    p.scores = p.act + M * s->hidden;
    return p;
}

/* x += attention(norm1(x)) (Gemma: post-normed): q/k head norms (Qwen3, Gemma 3), RoPE, soft-capped logits (Gemma 2) */
static void attention_half(float *x, const lm_layer *l, const lm_step *s) {
    long M = s->M, D = s->dim, nh = s->n_head, nkv = s->n_kv, hd = s->head_dim, qkv_width = (nh + 2 * nkv) * hd;
    scratch_parts p = parts_of(s);
    norm(s, x, l->norm1, l->norm1_bias, p.h);
    lm_linear(p.h, M, D, l->w_qkv, qkv_width, l->b_qkv, s->is_bf16, 0, p.qkv, s->n_threads);
    if (l->q_norm) lm_qk_norm(p.qkv, M, qkv_width, nh, nkv, hd, l->q_norm, l->k_norm, s->is_bf16, s->eps, s->gemma);
    if (!s->is_gpt2) rope_heads(s, l, p.qkv, qkv_width, nh + nkv);
    attention(p.qkv, M, nh, nkv, hd, l->k_cache, l->v_cache, s->is_bf16, s->max_seq, s->slots, s->pos, l->window,
              l->attn_scale, l->softcap, p.scores, p.att, s->n_threads);
    project_add(s, p.att, nh * hd, l->w_o, l->b_o, l->post_norm1, x, p.h);
}

/* x += mlp(norm2(x)) (Gemma: post-normed): GPT-2's gelu MLP, SwiGLU, or Gemma's GeGLU */
static void mlp_half(float *x, const lm_layer *l, const lm_step *s) {
    long M = s->M, D = s->dim, F = s->hidden;
    scratch_parts p = parts_of(s);
    norm(s, x, l->norm2, l->norm2_bias, p.h);
    if (s->is_gpt2) {
        lm_linear(p.h, M, D, l->w_up, F, l->b_up, s->is_bf16, 0, p.act, s->n_threads);
        lm_gelu(p.act, M * F, s->exact_gelu);
    } else {
        lm_linear(p.h, M, D, l->w_up, 2 * F, l->b_up, s->is_bf16, 0, p.up, s->n_threads);
        (s->gemma ? gelu_mul : lm_silu_mul)(p.up, M, F, p.act);
    }
    project_add(s, p.act, F, l->w_down, l->b_down, l->post_norm2, x, p.h);
}

/* x (M, dim) float32, updated in place: x += attention(norm1(x)); x += mlp(norm2(x)) for each of the n layers of any
 * dense family: GPT-2, the Llama family (Qwen3's q/k norms, Phi-4's partial RoPE), Gemma 2/3 (s->gemma, the post
 * norms and soft caps in each layer's struct) */
void lm_layers(float *x, const lm_layer *layers, long n, const lm_step *s) {
    for (long i = 0; i < n; i++) {
        attention_half(x, layers + i, s);
        mlp_half(x, layers + i, s);
    }
}

#include "cpu_moe.c"

#include "cpu_transpose.c"
