/* The matrix products' inner loops, included by cpu_decode.c (one translation unit): the one-row GEMV, the
 * several-row GEMM tiles (float32 and bf16; bf16 dot products on AVX512_BF16; AMX tiles), which lm_linear there
 * runs on threads. */

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
