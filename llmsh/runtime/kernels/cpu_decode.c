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
 * Contents: one-row GEMV, several-row GEMM, lm_linear (threads over columns); exp, SiLU, GELU; RMSNorm, LayerNorm;
 * RoPE; attention (soft-capped or not) with the KV-cache write; lm_layers, which runs whole layers of every dense
 * family in one call (GPT-2, the Llama family with Qwen3's q/k norms and Phi-4's partial RoPE, Gemma 2/3 with its
 * (1 + w) norms, post norms and GeGLU); and the pieces of a mixture-of-experts layer (lm_attention_half, lm_route,
 * lm_expert).
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

/* ---- y (M, N) [+]= x (M, K) @ W (K, N) + bias ------------------------------------------------------------------
 * One row (batch-1 decode) is memory-bound: the aim is to stream the weights at the memory bandwidth. A panel of
 * PANEL weight rows is read together, 64 bytes of each row a step; y is loaded and stored once per panel, and two
 * accumulators keep two FMA chains in flight. What decides the speed is the prefetch: while a panel runs, each load
 * is paired with a software prefetch of the next panel's lines in address order (its rows x this slice's columns,
 * one line per line consumed, so the next panel is in L2 when it starts). The hardware prefetcher alone, or software
 * prefetches a fixed distance along each row, left the narrow matrices cold at each panel's start: their rows are
 * 2 KB, a panel's 16 of them are 16 short streams. Measured on Qwen3-0.6B's shapes (28 layers of bf16 weights
 * streamed from memory, one thread, a 2-core Zen 4 VM whose memcpy moves ~22 GB/s counting read + write): the
 * narrow o and down projections (1024 columns) from 15-17 to 24-25 GB/s, the wide ones (4096-6144) from 21-24 to
 * 25-26, float32 from 21.6 to 24 GB/s; 8-row panels beat 4 and 16 in both dtypes, and prefetching into L1 instead
 * of L2, or the next panel's rows column by column instead of in address order, were no faster than before. */
#define PANEL 8

/* The next panel's lines, in address order: `next` its first row, `lpr` lines per row of this slice */
typedef struct { const char *next; long ld_bytes, lpr, row, col; } ahead;

static inline ahead ahead_of(const void *next, long ld_bytes, long row_bytes) {
    return (ahead){(const char *)next, ld_bytes, (row_bytes + 63) / 64, 0, 0};
}

static inline void prefetch_next(ahead *a) {            /* one line further; past the matrix's end it is harmless */
    __builtin_prefetch(a->next + a->row * a->ld_bytes + a->col * 64, 0, 2);
    if (++a->col == a->lpr) {
        a->col = 0;
        a->row++;
    }
}

/* y[0:N] += x[0:rows] @ W[0:rows, 0:N] (float32 weights, rows <= PANEL) */
static inline __attribute__((always_inline)) void gemv_f32_panel(const float *restrict x, const float *restrict W,
                                                                   long ld, long N, long rows, float *restrict y) {
    vf xb[PANEL];
    for (long r = 0; r < rows; r++) xb[r] = x[r] - (vf){0};               /* broadcast: x - 0 is x */
    ahead a = ahead_of(W + rows * ld, ld * 4, N * 4);
    long j = 0;
    for (; j + VL <= N; j += VL) {
        vf a0 = vload_f32(y + j), a1 = {0};
        for (long r = 0; r < rows; r += 2) {
            prefetch_next(&a);
            a0 += xb[r] * vload_f32(W + r * ld + j);
            if (r + 1 < rows) {
                prefetch_next(&a);
                a1 += xb[r + 1] * vload_f32(W + (r + 1) * ld + j);
            }
        }
        *(vf *)(y + j) = a0 + a1;
    }
    for (; j < N; j++)
        for (long r = 0; r < rows; r++) y[j] += x[r] * W[r * ld + j];
}

static void gemv_f32(const float *restrict x, long K, const float *restrict w, long ld, long N, float *restrict y) {
    long i0 = 0;
    for (; i0 + PANEL <= K; i0 += PANEL) gemv_f32_panel(x + i0, w + i0 * ld, ld, N, PANEL, y);
    if (i0 < K) gemv_f32_panel(x + i0, w + i0 * ld, ld, N, K - i0, y);
}

/* The one-row product over bf16 weights: as above, 32 columns (a cache line of each row) a step, read in pairs: 32
 * bf16 loaded as 16 32-bit lanes widen with one integer op per 16 weights (even_bf16, odd_bf16) where vpmovzxwd
 * took two, so the sums come out even | odd and y is kept in that order while the product runs (reorder). */
static inline __attribute__((always_inline)) void gemv_bf16_panel(const float *restrict x, const bf16 *restrict W,
                                                                    long ld, long N, long full, long rows,
                                                                    float *restrict y) {
    vf xb[PANEL];
    for (long r = 0; r < rows; r++) xb[r] = x[r] - (vf){0};               /* broadcast: x - 0 is x */
    ahead a = ahead_of(W + rows * ld, ld * 2, N * 2);
    for (long j = 0; j < full; j += 2 * VL) {
        vf e0 = vload_f32(y + j), o0 = vload_f32(y + j + VL), e1 = {0}, o1 = {0};
        for (long r = 0; r < rows; r += 2) {
            prefetch_next(&a);
            vu u = *(const vu_any *)(W + r * ld + j);
            e0 += xb[r] * even_bf16(u);
            o0 += xb[r] * odd_bf16(u);
            if (r + 1 < rows) {
                prefetch_next(&a);
                vu v = *(const vu_any *)(W + (r + 1) * ld + j);
                e1 += xb[r + 1] * even_bf16(v);
                o1 += xb[r + 1] * odd_bf16(v);
            }
        }
        *(vf *)(y + j) = e0 + e1;
        *(vf *)(y + j + VL) = o0 + o1;
    }
    for (long j = full; j < N; j++)                                        /* columns past the last 32 */
        for (long r = 0; r < rows; r++) y[j] += x[r] * bf16_to_f32(W[r * ld + j]);
}

static void gemv_bf16(const float *restrict x, long K, const bf16 *restrict w, long ld, long N, float *restrict y) {
    long full = N - N % (2 * VL), i0 = 0;
    reorder(y, 1, full, N, TO_PAIRS);
    for (; i0 + PANEL <= K; i0 += PANEL) gemv_bf16_panel(x + i0, w + i0 * ld, ld, N, full, PANEL, y);
    if (i0 < K) gemv_bf16_panel(x + i0, w + i0 * ld, ld, N, full, K - i0, y);
    reorder(y, 1, full, N, FROM_PAIRS);
}

/* ---- several rows: a register-blocked GEMM ----------------------------------------------------------------------
 * With M > 1 rows the work per weight grows while the bytes do not. MKL's sgemm took 93 ms (M=4) and 120 ms
 * (M=16) for GPT-2's linears where streaming them costs 45 ms. A micro-tile keeps MR x (NR vectors) of y in
 * registers while it walks KC rows of W: each weight vector is loaded (and widened, for bf16) once for MR rows of
 * x. KC = 16 rows stream from memory together, as in the one-row path (32 or 64 were 20-50% slower); measured
 * 58 ms at M=4 and 98 ms at M=16, where this VM's FMA peak (40 GFLOP/s) is the bound. GCC's vector extensions
 * keep it portable: 16-float vectors are one AVX-512 register, two AVX2 or four NEON ones. */
#define MR 4
#define NR 4
#define KC 16
#define GEMM_TILE 8192                                                  /* columns of y per pass */
/* The float32 tiles' vectors are one register each, NV_F32 of them a row: 4 x 4 of AVX-512's 32 registers, 4 x 2
 * of AVX2's 16, 4 x 4 of NEON's 32. (64-byte GCC vectors on AVX2, two registers each, GCC kept in memory where they
 * sit in an array, as the tile's sums do: 5-11x slower than torch on a Zen 3.) */
#if defined(__AVX512F__)
typedef float vn __attribute__((vector_size(64)));
typedef float vn_u __attribute__((vector_size(64), aligned(4)));
#define NV_F32 NR
#define KC_MANY_ROWS KC
#define PACK_MANY_ROWS 0
#define IN_REGISTER(v)
#else
#if defined(__AVX__)
typedef float vn __attribute__((vector_size(32)));
typedef float vn_u __attribute__((vector_size(32), aligned(4)));
#define NV_F32 2
#else
typedef float vn __attribute__((vector_size(16)));
typedef float vn_u __attribute__((vector_size(16), aligned(4)));
#define NV_F32 4
#endif
/* Past MR rows of x each tile's call repeats for every MR of them: 64 rows of W a call (not 16) amortise it, copied
 * into one run first (W's rows, ld a multiple of 1024 floats apart, share an L1 set and evicted each other between
 * the calls). And each weight vector is loaded into a register once for the tile's rows, where GCC folded a load of
 * it into every row's FMA. GPT-2's 768 x 3072 at 16 rows, one thread of a Zen 3: 31 -> 16 ms (torch 21 ms). */
#define KC_MANY_ROWS (4 * KC)
#define PACK_MANY_ROWS 1
#if defined(__x86_64__)
#define IN_REGISTER(v) __asm__("" : "+x"(v))
#else
#define IN_REGISTER(v)
#endif
#endif

#define LANES(VT) ((long)(sizeof(VT) / sizeof(float)))

/* y[0:rows, 0:NV vectors] += x[0:rows, 0:kc] @ W[0:kc, 0:NV vectors] for rows <= MR (a constant in each
 * instance), in vectors of type VT */
#define LOADW_F32(w, W, NV)                                                                                   \
    for (int v = 0; v < NV; v++) {                                                                            \
        w[v] = *(const vn_u *)((W) + v * LANES(vn));                                                          \
        IN_REGISTER(w[v]);                                                                                    \
    }
#define LOADW_BF16_PAIRS(w, W, NV)                                                                            \
    for (int v = 0; v < NV; v += 2) {                                                                         \
        vu u = *(const vu_any *)((W) + v * VL);                                                               \
        w[v] = even_bf16(u);                                                                                  \
        w[v + 1] = odd_bf16(u);                                                                               \
    }

#define DEFINE_MICRO(name, T, LOADW, ROWS, VT, VTU, NV)                                                      \
    static inline void name(const float *x, long ldx, long kc, const T *W, long ldw, float *y, long ldy) {   \
        VT acc[ROWS][NV];                                                                                     \
        for (int m = 0; m < ROWS; m++)                                                                        \
            for (int v = 0; v < NV; v++) acc[m][v] = *(const VTU *)(y + m * ldy + v * LANES(VT));            \
        for (long k = 0; k < kc; k++) {                                                                       \
            VT w[NV];                                                                                         \
            LOADW(w, W + k * ldw, NV);                                                                        \
            for (int m = 0; m < ROWS; m++) {                                                                  \
                VT xb = x[m * ldx + k] - (VT){0};      /* a broadcast: x - 0 is exactly x */                  \
                for (int v = 0; v < NV; v++) acc[m][v] += xb * w[v];                                          \
            }                                                                                                 \
        }                                                                                                     \
        for (int m = 0; m < ROWS; m++)                                                                        \
            for (int v = 0; v < NV; v++) *(VTU *)(y + m * ldy + v * LANES(VT)) = acc[m][v];                  \
    }

#define DEFINE_GEMM(name, T, LOADW, cvt, PAIRS, VT, VTU, NV, KC_MANY, PACK)                                  \
    DEFINE_MICRO(name##_1, T, LOADW, 1, VT, VTU, NV)                                                         \
    DEFINE_MICRO(name##_2, T, LOADW, 2, VT, VTU, NV)                                                         \
    DEFINE_MICRO(name##_3, T, LOADW, 3, VT, VTU, NV)                                                         \
    DEFINE_MICRO(name##_4, T, LOADW, 4, VT, VTU, NV)                                                         \
    static void name(const float *x, long M, long K, const T *w, long ld, long N, float *y, long ldy) {     \
        long strip = NV * LANES(VT), full = N - N % strip, kcb = M > MR ? KC_MANY : KC;                      \
        if (PAIRS) reorder(y, M, full, ldy, TO_PAIRS);                                                       \
        for (long t0 = 0; t0 < N; t0 += GEMM_TILE) {                                                         \
            long t1 = t0 + GEMM_TILE < N ? t0 + GEMM_TILE : N;                                               \
            for (long k0 = 0; k0 < K; k0 += kcb) {                                                           \
                long kc = K - k0 < kcb ? K - k0 : kcb;                                                       \
                for (long j0 = t0; j0 < t1 && j0 < full; j0 += strip) {                                      \
                    const T *W = w + k0 * ld + j0;                                                           \
                    long ldw = ld;                                                                           \
                    T packed[PACK ? KC_MANY * NV * LANES(VT) : 1];                                           \
                    if (PACK && M > MR) {                                                                    \
                        for (long k = 0; k < kc; k++) memcpy(packed + k * strip, W + k * ld, sizeof(T) * strip); \
                        W = packed, ldw = strip;                                                             \
                    }                                                                                        \
                    long m = 0;                                                                              \
                    for (; m + MR <= M; m += MR) name##_4(x + m * K + k0, K, kc, W, ldw, y + m * ldy + j0, ldy);\
                    const float *xm = x + m * K + k0;                                                        \
                    float *ym = y + m * ldy + j0;                                                            \
                    switch (M - m) {                                                                         \
                        case 3: name##_3(xm, K, kc, W, ldw, ym, ldy); break;                                  \
                        case 2: name##_2(xm, K, kc, W, ldw, ym, ldy); break;                                  \
                        case 1: name##_1(xm, K, kc, W, ldw, ym, ldy); break;                                  \
                    }                                                                                        \
                }                                                                                            \
                for (long m = 0; m < M; m++)                 /* columns past the last full strip */          \
                    for (long k = k0; k < k0 + kc; k++)                                                      \
                        for (long j = t0 > full ? t0 : full; j < t1; j++)                                    \
                            y[m * ldy + j] += x[m * K + k] * cvt(w[k * ld + j]);                             \
            }                                                                                                \
        }                                                                                                    \
        if (PAIRS) reorder(y, M, full, ldy, FROM_PAIRS);                                                     \
    }

DEFINE_GEMM(gemm_f32, float, LOADW_F32, F32, 0, vn, vn_u, NV_F32, KC_MANY_ROWS, PACK_MANY_ROWS)
#if defined(__AVX512F__)
DEFINE_GEMM(gemm_bf16, bf16, LOADW_BF16_PAIRS, bf16_to_f32, 1, vf, vf, NR, KC, 0)   /* y in pairs order while it runs */
#else
/* Elsewhere bf16 weights are widened in column order into the float32 tiles' vectors (vpmovzxwd and a shift on
 * AVX2: two instructions where the pairs take one, but the 16-float vectors the pairs need were kept in memory, as
 * float32's were). GPT-2's 768 x 3072 in bf16, one thread of a Zen 3: 4 rows 63 -> 5.8 ms, 16 rows 255 -> 22 ms
 * (torch 233, 926). */
typedef uint16_t vn_bf16 __attribute__((vector_size(sizeof(vn) / 2), aligned(2)));
typedef uint32_t vn_u32 __attribute__((vector_size(sizeof(vn))));
#define LOADW_BF16(w, W, NV)                                                                                  \
    for (int v = 0; v < NV; v++) {                                                                            \
        w[v] = (vn)(__builtin_convertvector(*(const vn_bf16 *)((W) + v * LANES(vn)), vn_u32) << 16);          \
        IN_REGISTER(w[v]);                                                                                    \
    }
DEFINE_GEMM(gemm_bf16, bf16, LOADW_BF16, bf16_to_f32, 0, vn, vn_u, NV_F32, KC_MANY_ROWS, PACK_MANY_ROWS)
#endif

/* Threads split the columns (whole GEMM strips, so the split costs no tail work): each streams its own slice of
 * every weight row. With OpenMP the kernels join torch's own libgomp (it is already loaded, under the same soname),
 * so n_threads = torch.get_num_threads() adds no second thread pool; without OpenMP the pragmas are ignored. */
#ifdef __AVX512BF16__
/* ---- several rows over bf16 weights with bf16 dot products (AVX512_BF16: Zen 4 and later, Cooper Lake, Sapphire
 * Rapids and later) -----------------------------------------------------------------------------------------------
 * vdpbf16ps multiplies 32 pairs of bf16 and adds each pair's sum into a float32 lane: 32 multiply-adds an
 * instruction where an FMA does 16, and the weights need no widening. Its other operand is bf16 too, so these
 * products round x to bf16 first, as torch's bf16 matmuls do (one rounding of each input, relative 2^-9; sums stay
 * float32); one row (gemv_bf16) is memory-bound and keeps x in float32. Pairs run along K: x is packed once per
 * call as (x[k], x[k+1]) pairs (xp), and rows k, k+1 of W are interleaved in registers (vpunpck{l,h}wd), which puts
 * each 32 columns in DOT order; y stays in that order while the product runs. The tiles are gemm's (MR x NR
 * vectors of y in registers over KC rows of W). Gemma 2-shaped linears at 16 rows: 255 ms with the pairs GEMM, 136 ms
 * with these, oneDNN's bf16 matmul 156 ms in the same run. */
#include <immintrin.h>
#define HAVE_BF16_DOT 1
#define DEFINE_MICRO_DOT(name, ROWS)                                                                         \
    static inline void name(const uint32_t *xp, long ldx, long kc, const bf16 *W, long ldw, float *y, long ldy) { \
        __m512 acc[ROWS][NR];                                                                                 \
        for (int m = 0; m < ROWS; m++)                                                                        \
            for (int v = 0; v < NR; v++) acc[m][v] = _mm512_loadu_ps(y + m * ldy + v * VL);                   \
        for (long k = 0; k < kc; k += 2) {                                                                    \
            __m512i w[NR];                                                                                    \
            for (int v = 0; v < NR; v += 2) {                                                                 \
                __m512i a = _mm512_loadu_si512(W + k * ldw + v * VL);                                        \
                __m512i b = k + 1 < kc ? _mm512_loadu_si512(W + (k + 1) * ldw + v * VL) : _mm512_setzero_si512(); \
                w[v] = _mm512_unpacklo_epi16(a, b);                                                           \
                w[v + 1] = _mm512_unpackhi_epi16(a, b);                                                       \
            }                                                                                                 \
            for (int m = 0; m < ROWS; m++) {                                                                  \
                __m512bh xb = (__m512bh)_mm512_set1_epi32((int)xp[m * ldx + k / 2]);                          \
                for (int v = 0; v < NR; v++) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], (__m512bh)w[v], xb);    \
            }                                                                                                 \
        }                                                                                                     \
        for (int m = 0; m < ROWS; m++)                                                                        \
            for (int v = 0; v < NR; v++) _mm512_storeu_ps(y + m * ldy + v * VL, acc[m][v]);                   \
    }
DEFINE_MICRO_DOT(gemm_dot_1, 1)
DEFINE_MICRO_DOT(gemm_dot_2, 2)
DEFINE_MICRO_DOT(gemm_dot_3, 3)
DEFINE_MICRO_DOT(gemm_dot_4, 4)

/* y (M, N, rows ldy apart) += x @ w as gemm_bf16, x given as its bf16 pairs xp (M rows ldx = pairs_ld(K) apart) */
static void gemm_bf16_dot(const uint32_t *xp, long ldx, long M, long K, const bf16 *w, long ld, long N, float *y,
                          long ldy) {
    long strip = NR * VL, full = N - N % strip;
    /* Rows of W a pass: KC streams of W at a few rows, where the weights come from memory; at 16 rows the tile of y
     * (16 x GEMM_TILE floats, 512 KB) is re-read and re-written from L2 every pass, so longer passes: 64 rows took
     * Gemma-0.5B-shaped products from ~100 to ~110 GFLOP/s and its 32000-wide head from 88 to 94 (8 rows or fewer
     * lost up to half at 64). The sums run in the same order either way. */
    long kc_rows = M > 8 ? 4 * KC : KC;
    reorder(y, M, full, ldy, TO_DOT);
    for (long t0 = 0; t0 < N; t0 += GEMM_TILE) {
        long t1 = t0 + GEMM_TILE < N ? t0 + GEMM_TILE : N;
        for (long k0 = 0; k0 < K; k0 += kc_rows) {               /* even: k0 / 2 is the pair index */
            long kc = K - k0 < kc_rows ? K - k0 : kc_rows;
            for (long j0 = t0; j0 < t1 && j0 < full; j0 += strip) {
                const bf16 *W = w + k0 * ld + j0;
                const uint32_t *xk = xp + k0 / 2;
                long m = 0;
                for (; m + MR <= M; m += MR) gemm_dot_4(xk + m * ldx, ldx, kc, W, ld, y + m * ldy + j0, ldy);
                switch (M - m) {
                    case 3: gemm_dot_3(xk + m * ldx, ldx, kc, W, ld, y + m * ldy + j0, ldy); break;
                    case 2: gemm_dot_2(xk + m * ldx, ldx, kc, W, ld, y + m * ldy + j0, ldy); break;
                    case 1: gemm_dot_1(xk + m * ldx, ldx, kc, W, ld, y + m * ldy + j0, ldy); break;
                }
            }
            for (long m = 0; m < M; m++)                          /* columns past the last full strip */
                for (long k = k0; k < k0 + kc; k++) {
                    uint32_t pair = xp[m * ldx + k / 2];
                    float xk = bf16_to_f32((bf16)(k % 2 ? pair >> 16 : pair));
                    for (long j = t0 > full ? t0 : full; j < t1; j++) y[m * ldy + j] += xk * bf16_to_f32(w[k * ld + j]);
                }
        }
    }
    reorder(y, M, full, ldy, FROM_DOT);
}

/* pairs a row of bf16_pairs holds: (K + 1) / 2 rounded up to 16 (one AMX tile row), the rest zeros */
static long pairs_ld(long K) { return ((K + 1) / 2 + 15) & ~15L; }

/* x (M, K) as bf16 pairs (M, pairs_ld(K)), zero-padded (an odd K's last pair too) */
static uint32_t *bf16_pairs(const float *x, long M, long K) {
    long ldx = pairs_ld(K);
    uint32_t *xp = calloc((size_t)(M * ldx), sizeof(uint32_t));
    if (!xp) return NULL;
    for (long m = 0; m < M; m++)
        for (long i = 0; i < (K + 1) / 2; i++) {
            uint32_t lo = f32_to_bf16(x[m * K + 2 * i]), hi = 2 * i + 1 < K ? f32_to_bf16(x[m * K + 2 * i + 1]) : 0;
            xp[m * ldx + i] = lo | hi << 16;
        }
    return xp;
}
#else
#define HAVE_BF16_DOT 0
#endif

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__) && defined(__linux__)
/* ---- several rows over bf16 weights on AMX tiles (Sapphire Rapids and later) ------------------------------------
 * One tdpbf16ps multiplies a tile of up to 16 rows x 32 bf16 of x by 32 x 16 bf16 of W into 16 x 16 float sums:
 * 8192 multiply-adds in ~16 cycles, where vdpbf16ps does 32 a cycle. At 16 rows the vdpbf16ps GEMM above is
 * compute-bound (~36 GFLOP/s here, GPT-2 bf16 batch 16 at 0.65x transformers, whose oneDNN matmuls use AMX); with
 * tiles the weights' memory stream is the bound again. Same numerics as gemm_bf16_dot: x rounded to bf16, float
 * sums. W's tiles want rows k, k+1 interleaved (VNNI pairs): the pass below builds them for 128 rows x 512
 * columns of W at a time in a 128 KB buffer (L2; one per call and thread), with the same unpack as the dot GEMM,
 * so y is in its DOT order here too, and four 16-column accumulator tiles cover 64 columns. Linux lends the 8 KB
 * tile state only when asked (arch_prctl ARCH_REQ_XCOMP_PERM); where that fails the dot GEMM runs. */
#include <sys/syscall.h>
#include <unistd.h>
#define HAVE_AMX 1
#define AMX_KC 128                          /* rows of W a pass: four B tiles' heights */
#define AMX_NC 512                          /* columns of W a pass: eight 64-column strips */

typedef struct __attribute__((packed)) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

static int amx_state = -1;                  /* -1: not asked yet, 0: off or refused, 1: on (atomic: ctypes calls
                                               may come from several Python threads at once) */

/* Whether the AMX GEMM runs: want -1 asks, 0 turns it off, 1 on (if the kernel grants the tiles). */
int lm_amx(int want) {
    if (want == 0) __atomic_store_n(&amx_state, 0, __ATOMIC_RELAXED);
    else if (want == 1 || __atomic_load_n(&amx_state, __ATOMIC_RELAXED) < 0)
        __atomic_store_n(&amx_state, syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                             18 /* XFEATURE_XTILEDATA */) == 0, __ATOMIC_RELAXED);
    return __atomic_load_n(&amx_state, __ATOMIC_RELAXED);
}


/* y (M <= 16 rows, ldy apart) += x @ w over N columns, x as bf16_pairs (ldx): whole 64-column strips on tiles, the
 * columns past them through gemm_bf16_dot; 0 (y untouched) if the tiles' buffer cannot be allocated */
static int gemm_bf16_amx(const uint32_t *xp, long ldx, long M, long K, const bf16 *w, long ld, long N, float *y,
                         long ldy) {
    uint8_t *amx_buffer = aligned_alloc(64, AMX_KC * AMX_NC * sizeof(bf16));   /* the B tiles of one pass */
    if (!amx_buffer) return 0;
    long full = N & ~63L;
    if (full < N) gemm_bf16_dot(xp, ldx, M, K, w + full, ld, N - full, y + full, ldy);
    N = full;
    reorder(y, M, N, ldy, TO_DOT);
    __asm__ volatile("" ::: "memory");      /* GCC's _tile_loadd does not say it reads memory: y, then W's tiles */
    amx_config cfg = {.palette = 1};
    for (int t = 0; t < 6; t++) {           /* 0: x, 1: W, 2-5: y */
        cfg.rows[t] = (uint8_t)(t == 1 ? 16 : M);
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
    for (long t0 = 0; t0 < N; t0 += AMX_NC) {
        long nc = N - t0 < AMX_NC ? N - t0 : AMX_NC;
        for (long k0 = 0; k0 < K; k0 += AMX_KC) {
            long kc = K - k0 < AMX_KC ? K - k0 : AMX_KC, groups = (kc + 31) / 32;
            /* tile (strip s, K group g, part c) at ((s * 4 + g) * 4 + c) KB: row r = rows k0 + 32 g + 2 r, + 1 */
            for (long r2 = 0; r2 < groups * 16; r2++) {
                long k = k0 + 2 * r2;
                for (long q = 0; q < nc / 32; q++) {
                    __m512i a = k < K ? _mm512_loadu_si512(w + k * ld + t0 + 32 * q) : _mm512_setzero_si512();
                    __m512i b = k + 1 < K ? _mm512_loadu_si512(w + (k + 1) * ld + t0 + 32 * q) : _mm512_setzero_si512();
                    uint8_t *tile = amx_buffer + (((q / 2) * 4 + r2 / 16) * 4 + 2 * (q % 2)) * 1024 + (r2 % 16) * 64;
                    _mm512_store_si512(tile, _mm512_unpacklo_epi16(a, b));
                    _mm512_store_si512(tile + 1024, _mm512_unpackhi_epi16(a, b));
                }
            }
            __asm__ volatile("" ::: "memory");
            for (long s = 0; s < nc / 64; s++) {
                float *ys = y + t0 + 64 * s;
                _tile_loadd(2, ys, ldy * 4);
                _tile_loadd(3, ys + 16, ldy * 4);
                _tile_loadd(4, ys + 32, ldy * 4);
                _tile_loadd(5, ys + 48, ldy * 4);
                for (long g = 0; g < groups; g++) {
                    const uint8_t *tiles = amx_buffer + (s * 4 + g) * 4 * 1024;
                    _tile_loadd(0, xp + (k0 + 32 * g) / 2, ldx * 4);
                    _tile_loadd(1, tiles, 64);
                    _tile_dpbf16ps(2, 0, 1);
                    _tile_loadd(1, tiles + 1024, 64);
                    _tile_dpbf16ps(3, 0, 1);
                    _tile_loadd(1, tiles + 2048, 64);
                    _tile_dpbf16ps(4, 0, 1);
                    _tile_loadd(1, tiles + 3072, 64);
                    _tile_dpbf16ps(5, 0, 1);
                }
                _tile_stored(2, ys, ldy * 4);
                _tile_stored(3, ys + 16, ldy * 4);
                _tile_stored(4, ys + 32, ldy * 4);
                _tile_stored(5, ys + 48, ldy * 4);
            }
        }
    }
    _tile_release();
    free(amx_buffer);
    reorder(y, M, N, ldy, FROM_DOT);
    return 1;
}
#else
#define HAVE_AMX 0
int lm_amx(int want) { (void)want; return 0; }
#endif

/* 1 if bf16 products of several rows round x to bf16 (bf16 dot products, see gemm_bf16_dot); Python's tests ask */
int lm_bf16_dot(void) { return HAVE_BF16_DOT; }

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

/* ---- attention ------------------------------------------------------------------------------------------------ */

/* RoPE on the first `rot` dims of each head (tables (max_seq, rot)); the other hd - rot dims pass unchanged. */
void lm_rope_partial(float *x, long M, long stride, long n_heads, long hd, long rot, const float *cos,
                     const float *sin, const int64_t *pos) {
    float tmp[512];
    long half = rot / 2;
    for (long m = 0; m < M; m++) {
        const float *c = cos + pos[m] * rot, *s = sin + pos[m] * rot;
        for (long h = 0; h < n_heads; h++) {
            float *v = x + m * stride + h * hd;
            memcpy(tmp, v, sizeof(float) * rot);
            for (long d = 0; d < half; d++) v[d] = tmp[d] * c[d] + tmp[d + half] * s[d];
            for (long d = half; d < rot; d++) v[d] = tmp[d] * c[d] + tmp[d - half] * s[d];
        }
    }
}

/* RoPE in place on the first n_heads heads of each row of x (rows stride apart): x*cos + roll(x, hd/2)*sin, with
 * the runtime's signed-sin table (llama.rope_tables), rows of the (max_seq, hd) float32 tables picked by pos[m]. */
void lm_rope(float *x, long M, long stride, long n_heads, long hd, const float *cos, const float *sin,
             const int64_t *pos) {
    lm_rope_partial(x, M, stride, n_heads, hd, hd, cos, sin, pos);
}

/* Lane i of the result = the sum of a[i]'s 16 lanes: a transpose-and-add tree, 15 adds and 30 shuffles for 16 sums
 * where one horizontal sum per vector costs ~8 dependent operations. Each level halves the lanes per source. */
static inline vf sum_lanes16(const vf *a) {
    vf b[8], c[4], d[2];
    for (int i = 0; i < 8; i++)
        b[i] = SHUFFLE(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               SHUFFLE(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++)
        c[i] = SHUFFLE(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               SHUFFLE(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)
        d[i] = SHUFFLE(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               SHUFFLE(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return SHUFFLE(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           SHUFFLE(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* s = exp(s - max(s)) over n scores, in place; returns 1 / their sum */
static inline float softmax_in_place(float *restrict s, long n) {
    float top = -INFINITY, total = 0.0f;
#pragma omp simd reduction(max : top)
    for (long j = 0; j < n; j++) top = s[j] > top ? s[j] : top;
#pragma omp simd reduction(+ : total)
    for (long j = 0; j < n; j++) {
        s[j] = exp_approx(s[j] - top);
        total += s[j];
    }
    return 1.0f / total;
}

/* Attention of one query head over cache positions lo..p of its kv group (K, V: (max_seq, hd) rows of type T):
 * o = softmax(scale * K q) V, scores being scratch. Head sizes that are a multiple of 16 (up to MAX_VEC_HD) run in
 * vectors: scores 16 positions at a time (one vector of partial sums per position, summed by sum_lanes16), the
 * weighted sum of V rows in registers; head sizes 64 and 128 get their own copies, with the vector count a constant
 * the compiler unrolls. Per-position horizontal sums and o's loads and stores had made this ~40 ns per position and
 * head at position 143 in bf16 (0.47 ms of a 22 ms Llama-110M bf16 step at position 80, growing with the context);
 * now 10-17 ns (float32: 23 -> 8 ns). Other head sizes take plain loops.
 * Past the caches a long context is a read of memory: while the scores read K, the same rows of V are prefetched, so
 * the weighted sum finds them in L2 instead of starting a second stream from memory (GPT-2 124M, 64 rows at ~260
 * positions, one layer: bf16 3.3 -> 2.6 ms, float32 4.7 -> 4.2 ms, the latter 24 GB/s of K and V on 2 cores). */
/* Gemma 2's attention-logit soft cap, in place: s = cap * tanh(s / cap) */
static inline void softcap_in_place(float *restrict s, long n, float cap) {
    for (long j = 0; j < n; j++) s[j] = cap * tanh_approx(s[j] / cap);
}

#define MAX_VEC_HD 256
#define DEFINE_ATTEND_HEAD(name, T, vload, cvt)                                                               \
    static inline __attribute__((always_inline)) void name##_vec(                                            \
        const float *restrict q, const T *restrict K, const T *restrict V, long lo, long p, long nc,           \
        float scale, float cap, float *restrict scores, float *restrict o) {                                  \
        long hd = nc * VL;                                                                                    \
        vf qv[MAX_VEC_HD / VL], acc[MAX_VEC_HD / VL];                                                         \
        for (long c = 0; c < nc; c++) qv[c] = vload_f32(q + c * VL) * scale;                                  \
        for (long j0 = lo; j0 <= p; j0 += VL) {                                                               \
            long nj = p + 1 - j0 < VL ? p + 1 - j0 : VL;                                                      \
            vf part[VL];                                                                                      \
            for (long jj = 0; jj < VL; jj++) {                                                                \
                vf s = {0};                                                                                   \
                if (jj < nj)                                                                                  \
                    for (long c = 0; c < nc; c++) {                                                           \
                        s += qv[c] * vload(K + (j0 + jj) * hd + c * VL);                                      \
                        if (c * VL * sizeof(T) % 64 == 0) /* once a cache line (bf16: a line is two vectors) */ \
                            __builtin_prefetch(V + (j0 + jj) * hd + c * VL);                                  \
                    }                                                                                         \
                part[jj] = s;                                                                                 \
            }                                                                                                 \
            vf s = sum_lanes16(part);                                                                         \
            memcpy(scores + j0, &s, sizeof(float) * nj);                                                      \
        }                                                                                                     \
        if (cap > 0) softcap_in_place(scores + lo, p + 1 - lo, cap);                                          \
        float inv = softmax_in_place(scores + lo, p + 1 - lo);                                                \
        for (long c = 0; c < nc; c++) acc[c] = (vf){0};                                                       \
        for (long j = lo; j <= p; j++) {                                                                      \
            vf w = scores[j] * inv - (vf){0};                                                                 \
            for (long c = 0; c < nc; c++) acc[c] += w * vload(V + j * hd + c * VL);                            \
        }                                                                                                     \
        for (long c = 0; c < nc; c++) *(vf *)(o + c * VL) = acc[c];                                           \
    }                                                                                                         \
    static void name(const float *restrict q, const T *restrict K, const T *restrict V, long lo, long p,       \
                     long hd, float scale, float cap, float *restrict scores, float *restrict o) {             \
        if (hd % VL == 0 && hd <= MAX_VEC_HD) {                                                               \
            long nc = hd / VL;                                                                                \
            if (nc == 4)                                                                                      \
                name##_vec(q, K, V, lo, p, 4, scale, cap, scores, o);                                         \
            else if (nc == 8)                                                                                 \
                name##_vec(q, K, V, lo, p, 8, scale, cap, scores, o);                                         \
            else                                                                                              \
                name##_vec(q, K, V, lo, p, nc, scale, cap, scores, o);                                        \
            return;                                                                                           \
        }                                                                                                     \
        for (long j = lo; j <= p; j++) {                                                                      \
            float s = 0.0f;                                                                                   \
            _Pragma("omp simd reduction(+ : s)") for (long d = 0; d < hd; d++) s += q[d] * cvt(K[j * hd + d]); \
            scores[j] = s * scale;                                                                            \
        }                                                                                                     \
        if (cap > 0) softcap_in_place(scores + lo, p + 1 - lo, cap);                                          \
        float inv = softmax_in_place(scores + lo, p + 1 - lo);                                                \
        memset(o, 0, sizeof(float) * hd);                                                                     \
        for (long j = lo; j <= p; j++) {                                                                      \
            float wj = scores[j] * inv;                                                                       \
            for (long d = 0; d < hd; d++) o[d] += wj * cvt(V[j * hd + d]);                                    \
        }                                                                                                     \
    }

DEFINE_ATTEND_HEAD(attend_head_f32, float, vload_f32, F32)
DEFINE_ATTEND_HEAD(attend_head_bf16, bf16, vload_bf16, bf16_to_f32)

/* Each row m's query heads (q rows q_stride floats apart, heads hd apart) attend over cache positions lo..pos[m]
 * (lo > 0 under a sliding window: j > pos - window) of its kv group in slot slots[m]; out rows n_head * hd; scores:
 * n_threads x max_seq floats. Threads take the (row, head) pairs a few at a time as they free (OpenMP dynamic): the
 * rows of a batch are at different positions, so equal counts of pairs are unequal work. */
static void attend_rows(const float *q_rows, long q_stride, long M, long n_head, long n_kv, long hd,
                        const void *k_cache, const void *v_cache, int is_bf16, long max_seq, const int64_t *slots,
                        const int64_t *pos, long window, float scale, float cap, float *restrict scores,
                        float *restrict out, int n_threads) {
    long rep = n_head / n_kv;
    int parts = n_threads < M * n_head ? n_threads : (int)(M * n_head);
#pragma omp parallel num_threads(parts) if (parts > 1)
    {
        float *my_scores = scores;
#ifdef _OPENMP
        my_scores += omp_get_thread_num() * max_seq;                  /* scores holds n_threads rows */
#endif
#pragma omp for schedule(dynamic, 4)
        for (long mh = 0; mh < M * n_head; mh++) {
            long m = mh / n_head, h = mh % n_head, p = pos[m];
            long lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
            long base = (slots[m] * n_kv + h / rep) * max_seq * hd;
            const float *q = q_rows + m * q_stride + h * hd;
            float *o = out + m * n_head * hd + h * hd;
            if (is_bf16)
                attend_head_bf16(q, (const bf16 *)k_cache + base, (const bf16 *)v_cache + base, lo, p, hd, scale,
                                 cap, my_scores, o);
            else
                attend_head_f32(q, (const float *)k_cache + base, (const float *)v_cache + base, lo, p, hd, scale,
                                cap, my_scores, o);
        }
    }
}

/* One decode token per row m: write its k, v into the cache at (slots[m], :, pos[m]), then attend_rows. qkv rows
 * are q heads | k heads | v heads, (n_head + 2 n_kv) * hd floats. */
static void attention(const float *qkv, long M, long n_head, long n_kv, long hd, void *k_cache, void *v_cache,
                      int is_bf16, long max_seq, const int64_t *slots, const int64_t *pos, long window, float scale,
                      float cap, float *restrict scores, float *restrict out, int n_threads) {
    long stride = (n_head + 2 * n_kv) * hd;
    for (long m = 0; m < M; m++) {                         /* this step's keys and values first: all heads read them */
        const float *k_new = qkv + m * stride + n_head * hd, *v_new = k_new + n_kv * hd;
        for (long g = 0; g < n_kv; g++) {
            long at = ((slots[m] * n_kv + g) * max_seq + pos[m]) * hd;
            for (long d = 0; d < hd; d++) {
                if (is_bf16) {
                    ((bf16 *)k_cache)[at + d] = f32_to_bf16(k_new[g * hd + d]);
                    ((bf16 *)v_cache)[at + d] = f32_to_bf16(v_new[g * hd + d]);
                } else {
                    ((float *)k_cache)[at + d] = k_new[g * hd + d];
                    ((float *)v_cache)[at + d] = v_new[g * hd + d];
                }
            }
        }
    }
    attend_rows(qkv, stride, M, n_head, n_kv, hd, k_cache, v_cache, is_bf16, max_seq, slots, pos, window, scale, cap,
                scores, out, n_threads);
}

void lm_attention(const float *qkv, long M, long n_head, long n_kv, long hd, void *k_cache, void *v_cache,
                  int is_bf16, long max_seq, const int64_t *slots, const int64_t *pos, long window, float scale,
                  float *restrict scores, float *restrict out, int n_threads) {
    attention(qkv, M, n_head, n_kv, hd, k_cache, v_cache, is_bf16, max_seq, slots, pos, window, scale, 0.0f, scores,
              out, n_threads);
}

/* The attention of M decode rows whose keys and values are already in the cache (the torch modules wrote them):
 * q (M, n_head * hd) float32, the rest as attend_rows; cap > 0 soft-caps the logits (Gemma 2). Larger batches run
 * their matrix products in torch and this part here: torch's CPU attention for one query token per row cost 3-6x
 * this (64 rows of GPT-2 124M, 152 positions: 8.8 against 1.5 ms a layer in bfloat16). */
void lm_attend(const float *q, long M, long n_head, long n_kv, long hd, const void *k_cache, const void *v_cache,
               int is_bf16, long max_seq, const int64_t *slots, const int64_t *pos, long window, float scale, float cap,
               float *restrict scores, float *restrict out, int n_threads) {
    attend_rows(q, n_head * hd, M, n_head, n_kv, hd, k_cache, v_cache, is_bf16, max_seq, slots, pos, window, scale,
                cap, scores, out, n_threads);
}

/* lm_attention with Gemma 2's soft-capped logits: cap * tanh(scale q.k / cap), then softmax and the sum of V */
void lm_attention_softcap(const float *qkv, long M, long n_head, long n_kv, long hd, void *k_cache, void *v_cache,
                          int is_bf16, long max_seq, const int64_t *slots, const int64_t *pos, long window,
                          float scale, float cap, float *restrict scores, float *restrict out, int n_threads) {
    attention(qkv, M, n_head, n_kv, hd, k_cache, v_cache, is_bf16, max_seq, slots, pos, window, scale, cap, scores,
              out, n_threads);
}

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

/* ---- mixtures of experts (Mixtral, Qwen3-MoE) ---------------------------------------------------------------------
 * A layer is split where the router sits: the attention half here, routing in Python (a few floats per token; the
 * pager must page each chosen expert in before it runs), then one call per chosen expert. */

/* x += attention(norm1(x)) as in lm_layers, then h = norm2(x): the MLP's input, which the router reads too */
void lm_attention_half(float *x, const lm_layer *l, const lm_step *s, float *h_out) {
    attention_half(x, l, s);
    norm(s, x, l->norm2, l->norm2_bias, h_out);
}

/* The router: for each of M rows of h, softmax(h gate) over E experts (gate (D, E)), the k largest (the lower index
 * first on ties) into chosen[m k ..] and their probabilities into weights[m k ..], renormalised to sum 1 if `norm`,
 * rounded to bf16 if `round_bf16` (Qwen3-MoE rounds them to the model dtype). scratch: M * E floats. */
void lm_route(const float *h, long M, long D, const void *gate, long E, long k, int norm, int round_bf16,
              int is_bf16, int64_t *chosen, float *weights, float *scratch) {
    lm_linear(h, M, D, gate, E, NULL, is_bf16, 0, scratch, 1);
    for (long m = 0; m < M; m++) {
        float *p = scratch + m * E, inv = softmax_in_place(p, E), total = 0.0f;
        for (long e = 0; e < E; e++) p[e] *= inv;
        for (long t = 0; t < k; t++) {
            long best = -1;
            for (long e = 0; e < E; e++)
                if (p[e] >= 0.0f && (best < 0 || p[e] > p[best])) best = e;
            chosen[m * k + t] = best;
            weights[m * k + t] = p[best];
            total += p[best];
            p[best] = -1.0f;                              /* taken */
        }
        for (long t = 0; t < k; t++) {
            float w = norm ? weights[m * k + t] / total : weights[m * k + t];
            weights[m * k + t] = round_bf16 ? bf16_to_f32(f32_to_bf16(w)) : w;
        }
    }
}

/* One expert on the n (row, choice) pairs that chose it: sel[r] indexes the router's M x k outputs, so the row is
 * sel[r] / k and its weight weights[sel[r]]; x[row] += weight * w2(silu(w1 h[row]) * w3 h[row]), with w13 = w1 | w3
 * (D, 2F) and w2 (F, D). scratch: n * (D + 3F + D) floats. */
void lm_expert(const float *h, long D, const int64_t *sel, long n, long k, const float *weights, const void *w13,
               const void *w2, long F, int is_bf16, float *x, float *scratch, int n_threads) {
    float *in = scratch, *up = in + n * D, *act = up + n * 2 * F, *y = act + n * F;
    for (long r = 0; r < n; r++) memcpy(in + r * D, h + sel[r] / k * D, sizeof(float) * D);
    lm_linear(in, n, D, w13, 2 * F, NULL, is_bf16, 0, up, n_threads);
    lm_silu_mul(up, n, F, act);
    lm_linear(act, n, F, w2, D, NULL, is_bf16, 0, y, n_threads);
    for (long r = 0; r < n; r++)
        for (long i = 0; i < D; i++) x[sel[r] / k * D + i] += weights[sel[r]] * y[r * D + i];
}

/* One mixture-of-experts layer's MLP side: the router (gate (dim, n_experts)) and each expert's gate|up (dim, 2 F)
 * and down (F, dim) matrices; gate NULL for a dense layer (Qwen3-MoE's mlp_only_layers: the lm_layer's w_up and
 * w_down, hidden s->hidden). */
typedef struct {
    const void *gate;
    const void *const *w13, *const *w2;    /* n_experts addresses each */
} lm_moe;

typedef struct {                           /* what every MoE layer of the step shares */
    long n_experts, top_k, expert_size;
    int norm_topk, round_bf16;             /* lm_route's norm and round_bf16 */
} lm_moe_step;

/* x (M, dim), in place, through n whole MoE layers without a page hook, one call a step as lm_layers: per layer
 * lm_attention_half, lm_route, then each chosen expert in increasing order on the rows that chose it (the order
 * the per-call path in fast_decode.py adds them in, so both give the same floats). Returns 0, or -1 (x untouched)
 * if its scratch could not be allocated. */
int lm_moe_layers(float *x, const lm_layer *layers, const lm_moe *moe, long n, const lm_step *s,
                  const lm_moe_step *e) {
    long M = s->M, D = s->dim, E = e->n_experts, k = e->top_k;
    long F = e->expert_size > s->hidden ? e->expert_size : s->hidden;
    size_t floats = (size_t)(M * D + M * E + M * k + M + M * (2 * D + 3 * F));
    float *h = malloc(sizeof(float) * floats);
    int64_t *chosen = malloc(sizeof(int64_t) * (size_t)(M * k + M));
    if (!h || !chosen) {
        free(h);
        free(chosen);
        return -1;
    }
    float *logits = h + M * D, *weights = logits + M * E, *ones = weights + M * k, *scratch = ones + M;
    int64_t *sel = chosen + M * k;
    for (long m = 0; m < M; m++) ones[m] = 1.0f;
    for (long i = 0; i < n; i++) {
        lm_attention_half(x, layers + i, s, h);
        if (!moe[i].gate) {                                         /* a dense layer: every row, weight 1 */
            for (long m = 0; m < M; m++) sel[m] = m;
            lm_expert(h, D, sel, M, 1, ones, layers[i].w_up, layers[i].w_down, s->hidden, s->is_bf16, x, scratch,
                      s->n_threads);
            continue;
        }
        lm_route(h, M, D, moe[i].gate, E, k, e->norm_topk, e->round_bf16, s->is_bf16, chosen, weights, logits);
        for (long j = 0; j < E; j++) {
            long rows = 0;
            for (long t = 0; t < M * k; t++)
                if (chosen[t] == j) sel[rows++] = t;                /* (row, choice) = (t / k, t % k) */
            if (rows)
                lm_expert(h, D, sel, rows, k, weights, moe[i].w13[j], moe[i].w2[j], e->expert_size, s->is_bf16, x,
                          scratch, s->n_threads);
        }
    }
    free(h);
    free(chosen);
    return 0;
}

/* ---- transposed copies (loading and paging in Llama-family matrices, which checkpoints store (out, in)) --------
 * dst (cols, rows; rows ld_dst apart) = src (rows, cols; rows ld_src apart) transposed, elements of `size` bytes (2
 * or 4). torch's copy of a transposed view goes element by element at ~1.3-2.7 GB/s (GPT-2's 150 MiB embedding took
 * 84 ms of a 113 ms page-in), scalar 32 x 32 tiles reached 3.3 GB/s (float32) and 1.1 (bf16); with AVX-512, 16 x 16
 * blocks are transposed in registers (unpack, shuffle, two 128-bit lane shuffles: the usual sequence), bf16 widened
 * to 32 bits for it and narrowed back. Edges go element by element. */
#ifdef __AVX512F__
#include <immintrin.h>
static inline void transpose_16x16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int k = 0; k < 4; k++) {
        t[k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88);
        t[4 + k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);
        t[8 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
        t[12 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
    }
    for (int k = 0; k < 4; k++) {
        r[k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0x88);
        r[8 + k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0xDD);
        r[4 + k] = _mm512_shuffle_f32x4(t[4 + k], t[12 + k], 0x88);
        r[12 + k] = _mm512_shuffle_f32x4(t[4 + k], t[12 + k], 0xDD);
    }
}

static inline void block_4(const uint32_t *src, long ld_src, uint32_t *dst, long ld_dst) {
    __m512 r[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps((const float *)(src + i * ld_src));
    transpose_16x16(r);
    for (int j = 0; j < 16; j++) _mm512_storeu_ps((float *)(dst + j * ld_dst), r[j]);
}

static inline void block_2(const uint16_t *src, long ld_src, uint16_t *dst, long ld_dst) {
    __m512 r[16];
    for (int i = 0; i < 16; i++)
        r[i] = _mm512_castsi512_ps(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(src + i * ld_src))));
    transpose_16x16(r);
    for (int j = 0; j < 16; j++)
        _mm256_storeu_si256((__m256i *)(dst + j * ld_dst), _mm512_cvtepi32_epi16(_mm512_castps_si512(r[j])));
}
#define BLOCK_2 block_2
#define BLOCK_4 block_4
#define HAVE_BLOCK 1
#else
#define HAVE_BLOCK 0
#define BLOCK_2(src, lds, dst, ldd) ((void)0)
#define BLOCK_4(src, lds, dst, ldd) ((void)0)
#endif

/* 16 x 16 blocks in 64 x 64 tiles (both sides in L1), a band of BAND source rows at a time, column tiles outer: each
 * destination row is then written BAND elements at a stretch (4 KB for float32) instead of 64, so far fewer pages
 * and partial lines are touched per pass. GPT-2's 150 MiB embedding (50257 x 768 float32): 40 ms with 64-row
 * bands, 28 ms with these (one thread, Zen 4). */
#define TILE 64
#define BAND 1024
#define DEFINE_TRANSPOSE(name, T, BLOCK)                                                                        \
    static void name(const T *restrict src, long rows, long cols, long ld_src, T *restrict dst, long ld_dst) { \
        for (long b0 = 0; b0 < rows; b0 += BAND)                                                               \
            for (long j0 = 0; j0 < cols; j0 += TILE)                                                           \
                for (long i0 = b0; i0 < rows && i0 < b0 + BAND; i0 += TILE) {                                  \
                    long i1 = i0 + TILE < rows ? i0 + TILE : rows, j1 = j0 + TILE < cols ? j0 + TILE : cols;    \
                    long bi = HAVE_BLOCK ? i0 + (i1 - i0) / 16 * 16 : i0;                                      \
                    long bj = HAVE_BLOCK ? j0 + (j1 - j0) / 16 * 16 : j0;                                      \
                    for (long i = i0; i < bi; i += 16)                                                         \
                        for (long j = j0; j < bj; j += 16)                                                     \
                            BLOCK(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst);                 \
                    for (long j = j0; j < j1; j++)                             /* the edges */                 \
                        for (long i = (j < bj ? bi : i0); i < i1; i++) dst[j * ld_dst + i] = src[i * ld_src + j]; \
                }                                                                                              \
    }
DEFINE_TRANSPOSE(transpose_2, uint16_t, BLOCK_2)
DEFINE_TRANSPOSE(transpose_4, uint32_t, BLOCK_4)

/* Staged: STAGE source rows at a time are transposed into an aligned (cols, STAGE) buffer (L2), and each of its
 * rows is then copied to its place (copy_out). Written directly, a destination whose rows are not 64-byte aligned
 * (GPT-2's vocabulary of 50257: most rows) makes most 64-byte stores split across two lines: on a Sapphire Rapids
 * Xeon that took GPT-2's embedding to ~170 ms (~70 ms with aligned rows); staged, ~35 ms. */
#define STAGE 128

/* memcpy for the staged rows: the whole lines of dst with streaming stores, which skip reading each destination
 * line before writing it (~57 -> ~35 ms for GPT-2's embedding; the copy is far larger than the caches anyway) */
static void copy_out(char *dst, const char *src, long n) {
#ifdef __AVX512F__
    long head = (long)((64 - ((uintptr_t)dst & 63)) & 63);
    head = head < n ? head : n;
    memcpy(dst, src, (size_t)head);
    for (dst += head, src += head, n -= head; n >= 64; n -= 64, dst += 64, src += 64)
        _mm512_stream_si512((__m512i *)dst, _mm512_loadu_si512(src));
#endif
    memcpy(dst, src, (size_t)n);
}

/* 0 on success, -1 for an element size other than 2 or 4 */
int lm_transpose(const void *src, long rows, long cols, long ld_src, void *dst, long ld_dst, int size) {
    if (size != 2 && size != 4) return -1;
    char *stage = rows > STAGE && cols <= 16384 ? aligned_alloc(64, (size_t)(cols * STAGE * size)) : NULL;
    for (long b0 = 0; b0 < rows; b0 += stage ? STAGE : rows) {
        long n = stage && rows - b0 > STAGE ? STAGE : rows - b0;
        const char *from = (const char *)src + b0 * ld_src * size;
        char *to = stage ? stage : (char *)dst;
        long ld_to = stage ? STAGE : ld_dst;
        if (size == 2) transpose_2((const uint16_t *)from, n, cols, ld_src, (uint16_t *)to, ld_to);
        else transpose_4((const uint32_t *)from, n, cols, ld_src, (uint32_t *)to, ld_to);
        if (stage)
            for (long j = 0; j < cols; j++)
                copy_out((char *)dst + (j * ld_dst + b0) * size, stage + j * STAGE * size, n * size);
    }
#ifdef __AVX512F__
    _mm_sfence();                                       /* the streaming stores are visible before we return */
#endif
    free(stage);
    return 0;
}
