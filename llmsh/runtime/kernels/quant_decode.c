/* Block-quantized weights (GGUF's Q8_0, Q4_0, Q4_K, Q6_K) decoded inside the matrix products, block by block.
 *
 * This file includes cpu_decode.c, so one shared library has both: the float kernels (norms, RoPE, attention) that a
 * quantized model's decode step shares with float models, and these products. Quantized matrices keep GGUF's layout:
 * one row per output feature, (out, in), each row a run of blocks along the input dimension, exactly as the file
 * stores them (the runtime maps them without conversion). A matrix may be several row segments of different types
 * (q|k|v fused where v is Q6_K and q, k are Q4_K, as Q4_K_M files have), described by lm_qseg.
 *
 * y[m, j] = sum_k x[m, k] W[j, k]. With AVX512-VNNI (quant_vnni.c, chosen when the library is built for this CPU):
 * x rounded once per call to 16-bit integers, byte dot products against the blocks' integer quants, the scales in
 * float once per block (group). With AVX2 (quant_avx2.c, also AVX-512 without VNNI): the same in 256-bit registers.
 * Elsewhere (NEON, x86 without AVX2, or -DLLMSH_FLOAT_QUANT): each block is widened to floats in registers and
 * multiplied with all M rows of x. Threads split the rows (QPIECES).
 * Prefill (many rows of x) instead decodes whole row ranges to float32 (lm_qdequant) for a GEMM in torch.
 * Block formats as ggml defines them (ggml-common.h); `gguf`'s Python `dequantize` is the reference in the tests.
 */
#include "cpu_decode.c"
#include <stdlib.h>

enum { Q4_0 = 2, Q8_0 = 8, Q4_K = 12, Q6_K = 14 };   /* GGML type ids */
#define QK_K 256
#define QMAX_ROWS 16
/* Threads take each segment's rows in QPIECES pieces per thread, each piece as a thread frees (OpenMP dynamic), not
 * one half each: on a shared machine one thread often runs late, and with ~110 products a token the other waited at
 * every one. Q4_K_M 1.1B Llama at 2 threads: 22.8 -> 28.2 tokens/s (4 pieces: 25.4, 16: 26.7); 1 thread unchanged. */
#define QPIECES 8

typedef struct {
    int type;                              /* GGML type id */
    long rows;                             /* output features in this segment */
} lm_qseg;

#ifdef __F16C__
#include <immintrin.h>
static inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float f16_to_f32(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
    if (e == 0) {                                           /* zero or subnormal: m * 2^-24 */
        float f = (float)m * (1.0f / 16777216.0f);
        memcpy(&u, &f, 4);
        u |= s;
    } else if (e == 31) {
        u = s | 0x7f800000u | (m << 13);
    } else {
        u = s | ((e + 112) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}
#endif

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* elements per block and bytes per block */
static long q_block(int type) { return type == Q4_K || type == Q6_K ? QK_K : 32; }
static long q_bytes(int type) {
    switch (type) {
        case Q8_0: return 34;
        case Q4_0: return 18;
        case Q4_K: return 144;
        case Q6_K: return 210;
    }
    return 0;
}

/* Decode n weights (n <= 256, whole blocks: up to 8 blocks of Q8_0/Q4_0, one of Q4_K/Q6_K) starting at p into y. */
static inline void decode_chunk(int type, const uint8_t *restrict p, float *restrict y, long n) {
    if (type == Q8_0) {
        for (long b = 0; b < n / 32; b++, p += 34, y += 32) {
            float d = f16_to_f32(rd16(p));
            const int8_t *q = (const int8_t *)(p + 2);
            for (int l = 0; l < 32; l++) y[l] = d * (float)q[l];
        }
    } else if (type == Q4_0) {
        for (long b = 0; b < n / 32; b++, p += 18, y += 32) {
            float d = f16_to_f32(rd16(p));
            const uint8_t *q = p + 2;
            for (int l = 0; l < 16; l++) y[l] = d * (float)((int)(q[l] & 0xF) - 8);   /* (two loops: one with */
            for (int l = 0; l < 16; l++) y[l + 16] = d * (float)((int)(q[l] >> 4) - 8);  /* both was not vectorised) */
        }
    } else if (type == Q4_K) {
        float d = f16_to_f32(rd16(p)), dmin = f16_to_f32(rd16(p + 2));
        const uint8_t *sc = p + 4, *q = p + 16;
        for (int j = 0; j < 4; j++, q += 32, y += 64) {
            int is = 2 * j;
            uint8_t s1, m1, s2, m2;                          /* 6-bit scales and mins, packed (get_scale_min_k4) */
            if (is < 4) { s1 = sc[is] & 63; m1 = sc[is + 4] & 63; }
            else { s1 = (sc[is + 4] & 0xF) | ((sc[is - 4] >> 6) << 4); m1 = (sc[is + 4] >> 4) | ((sc[is] >> 6) << 4); }
            if (is + 1 < 4) { s2 = sc[is + 1] & 63; m2 = sc[is + 5] & 63; }
            else {
                s2 = (sc[is + 5] & 0xF) | ((sc[is - 3] >> 6) << 4);
                m2 = (sc[is + 5] >> 4) | ((sc[is + 1] >> 6) << 4);
            }
            float d1 = d * s1, o1 = dmin * m1, d2 = d * s2, o2 = dmin * m2;
            for (int l = 0; l < 32; l++) {
                y[l] = d1 * (float)(q[l] & 0xF) - o1;
                y[l + 32] = d2 * (float)(q[l] >> 4) - o2;
            }
        }
    } else if (type == Q6_K) {
        const uint8_t *ql = p, *qh = p + 128;
        const int8_t *sc = (const int8_t *)(p + 192);
        float d = f16_to_f32(rd16(p + 208));
        for (int n = 0; n < 2; n++, ql += 64, qh += 32, sc += 8, y += 128) {
            for (int is = 0; is < 2; is++) {          /* 16 weights share each scale: a constant one per loop */
                float s1 = d * sc[is], s2 = d * sc[is + 2], s3 = d * sc[is + 4], s4 = d * sc[is + 6];
                for (int l = 16 * is; l < 16 * is + 16; l++) {
                    int q1 = (int)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                    int q2 = (int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                    int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                    int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                    y[l] = s1 * (float)q1;
                    y[l + 32] = s2 * (float)q2;
                    y[l + 64] = s3 * (float)q3;
                    y[l + 96] = s4 * (float)q4;
                }
            }
        }
    }
}

/* ---- dot products of quantized rows with M <= 16 float rows of x ---------------------------------------------
 * Each block is widened to float vectors in registers (never stored), then multiplied into every row of x; per-row
 * sums stay in vector registers (acc) until the row ends. The block scale multiplies a block's partial sum once
 * (d * sum(q x)) instead of every weight. */
typedef int8_t vb __attribute__((vector_size(16), aligned(1)));          /* 16 bytes, any alignment */
typedef uint8_t vub __attribute__((vector_size(16), aligned(1)));
typedef int32_t vi32 __attribute__((vector_size(64)));

#ifdef __AVX512F__
/* GCC scalarised the generic signed widening below (36 byte moves per block, seen in the assembly): one instruction */
static inline vf widen_s8(const int8_t *p) {
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#else
static inline vf widen_s8(const int8_t *p) {
    return __builtin_convertvector(__builtin_convertvector(*(const vb *)p, vi32), vf);
}
#endif
static inline vf widen_u8(vub b) { return __builtin_convertvector(__builtin_convertvector(b, vi32), vf); }
/* 16 bytes at p as 16 int32 lanes; nibble and bit work is then done on 32-bit lanes (x86 has no byte shifts, and
 * GCC turned byte-vector masks and shifts into per-byte scalar code here) */
#ifdef __AVX512F__
static inline vi32 wide(const uint8_t *p) { return (vi32)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
#else
static inline vi32 wide(const uint8_t *p) { return __builtin_convertvector(*(const vub *)p, vi32); }
#endif
static inline vf fl(vi32 v) { return __builtin_convertvector(v, vf); }

static inline float hsum(vf v) {
#ifdef __AVX512F__
    return _mm512_reduce_add_ps((__m512)v);
#else
    float s = 0.0f;
    for (int l = 0; l < VL; l++) s += v[l];
    return s;
#endif
}

/* Q4_K's 6-bit scale and min of sub-block j (ggml's get_scale_min_k4) */
static inline void scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) { *d = q[j] & 63; *m = q[j + 4] & 63; }
    else { *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4); *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4); }
}

/* Weights c*32 .. c*32+31 of a row (c counts 32-weight pieces along the row) as two float vectors. `type` is a
 * constant in every caller (always_inline), so each type gets its own loop without a switch inside. */
static inline __attribute__((always_inline)) void w32(int type, const uint8_t *row, long c, vf *w0, vf *w1) {
    if (type == Q8_0) {
        const uint8_t *b = row + c * 34;
        vf d = f16_to_f32(rd16(b)) - (vf){0};
        *w0 = widen_s8((const int8_t *)b + 2) * d;
        *w1 = widen_s8((const int8_t *)b + 18) * d;
    } else if (type == Q4_0) {
        const uint8_t *b = row + c * 18;
        vf d = f16_to_f32(rd16(b)) - (vf){0};
        vi32 q = wide(b + 2);
        *w0 = fl((q & 0xF) - 8) * d;
        *w1 = fl((q >> 4) - 8) * d;
    } else if (type == Q4_K) {
        const uint8_t *b = row + (c >> 3) * 144;
        int sub = c & 7, shift = (sub & 1) * 4;
        uint8_t sc, mn;
        scale_min_k4(sub, b + 4, &sc, &mn);
        vf d = f16_to_f32(rd16(b)) * sc - (vf){0}, o = f16_to_f32(rd16(b + 2)) * mn - (vf){0};
        const uint8_t *q = b + 16 + 32 * (sub >> 1);
        *w0 = fl((wide(q) >> shift) & 0xF) * d - o;
        *w1 = fl((wide(q + 16) >> shift) & 0xF) * d - o;
    } else {                                                        /* Q6_K */
        const uint8_t *b = row + (c >> 3) * 210;
        int sub = c & 7, n = sub >> 2, r = sub & 3;
        const uint8_t *ql = b + 64 * n + 32 * (r & 1), *qh = b + 128 + 32 * n;
        const int8_t *sc = (const int8_t *)(b + 192) + 8 * n + 2 * r;
        float d = f16_to_f32(rd16(b + 208));
        int lo_shift = r & 2 ? 4 : 0, hi_shift = 2 * r;
        vi32 q0 = ((wide(ql) >> lo_shift) & 0xF) | (((wide(qh) >> hi_shift) & 3) << 4);
        vi32 q1 = ((wide(ql + 16) >> lo_shift) & 0xF) | (((wide(qh + 16) >> hi_shift) & 3) << 4);
        *w0 = fl(q0 - 32) * (d * sc[0]);
        *w1 = fl(q1 - 32) * (d * sc[1]);
    }
}

/* Q8_0 / Q4_0 weights of block c unscaled (the block's scale multiplies the partial sum once instead) */
static inline __attribute__((always_inline)) float w32_raw(int type, const uint8_t *row, long c, vf *w0, vf *w1) {
    if (type == Q8_0) {
        const uint8_t *b = row + c * 34;
        *w0 = widen_s8((const int8_t *)b + 2);
        *w1 = widen_s8((const int8_t *)b + 18);
        return f16_to_f32(rd16(b));
    }
    const uint8_t *b = row + c * 18;
    vi32 q = wide(b + 2);
    *w0 = fl((q & 0xF) - 8);
    *w1 = fl((q >> 4) - 8);
    return f16_to_f32(rd16(b));
}

/* out[r] = row r . x for 4 rows and one x (batch-1 decode): four independent sums in flight */
static inline __attribute__((always_inline)) void dot4_rows(int type, const uint8_t *const *rows, long K,
                                                           const float *restrict x, float *out) {
    vf acc[4] = {{0}, {0}, {0}, {0}};
    if (type == Q8_0 || type == Q4_0) {
        for (long c = 0; c < K / 32; c++) {
            vf x0 = vload_f32(x + 32 * c), x1 = vload_f32(x + 32 * c + VL);
            for (int r = 0; r < 4; r++) {
                vf w0, w1;
                float d = w32_raw(type, rows[r], c, &w0, &w1);
                acc[r] += d * (w0 * x0 + w1 * x1);
            }
        }
        for (int r = 0; r < 4; r++) out[r] = hsum(acc[r]);
        return;
    }
    for (long c = 0; c < K / 32; c++) {
        vf x0 = vload_f32(x + 32 * c), x1 = vload_f32(x + 32 * c + VL);
        for (int r = 0; r < 4; r++) {
            vf w0, w1;
            w32(type, rows[r], c, &w0, &w1);
            acc[r] += w0 * x0 + w1 * x1;
        }
    }
    for (int r = 0; r < 4; r++) out[r] = hsum(acc[r]);
}

/* out[m] = row . x[m] for M <= 16 rows of x: each piece of the row is widened once for all of them */
static inline __attribute__((always_inline)) void dot_row(int type, const uint8_t *row, long K,
                                                         const float *restrict x, long M, float *out) {
    vf acc[QMAX_ROWS];
    for (long m = 0; m < M; m++) acc[m] = (vf){0};
    for (long c = 0; c < K / 32; c++) {
        vf w0, w1;
        w32(type, row, c, &w0, &w1);
        for (long m = 0; m < M; m++) {
            const float *xm = x + m * K + 32 * c;
            acc[m] += w0 * vload_f32(xm) + w1 * vload_f32(xm + VL);
        }
    }
    for (long m = 0; m < M; m++) out[m] = hsum(acc[m]);
}

/* y[:, j0:j1] = x @ rows j0..j1-1 of one segment (all rows of one type, row_bytes apart) */
static inline __attribute__((always_inline)) void seg_dot(int type, const uint8_t *w, long rb, long K, long j0,
                                                         long j1, const float *x, long M, float *y, long ldy) {
    long j = j0;
    if (M == 1)
        for (; j + 4 <= j1; j += 4) {
            const uint8_t *rows[4] = {w + j * rb, w + (j + 1) * rb, w + (j + 2) * rb, w + (j + 3) * rb};
            dot4_rows(type, rows, K, x, y + j);
        }
    for (; j < j1; j++) {
        float out[QMAX_ROWS];
        dot_row(type, w + j * rb, K, x, M, out);
        for (long m = 0; m < M; m++) y[m * ldy + j] = out[m];
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include "quant_vnni.c"
#elif defined(__AVX2__) && defined(__FMA__) && !defined(LLMSH_FLOAT_QUANT)
#include "quant_avx2.c"
#endif

static void seg_dot_any(int type, const uint8_t *w, long rb, long K, long j0, long j1, const float *x, long M,
                        float *y, long ldy) {
    switch (type) {
        case Q8_0: seg_dot(Q8_0, w, rb, K, j0, j1, x, M, y, ldy); break;
        case Q4_0: seg_dot(Q4_0, w, rb, K, j0, j1, x, M, y, ldy); break;
        case Q4_K: seg_dot(Q4_K, w, rb, K, j0, j1, x, M, y, ldy); break;
        case Q6_K: seg_dot(Q6_K, w, rb, K, j0, j1, x, M, y, ldy); break;
    }
}

/* The segment holding row j, and the address of that row. */
static inline const uint8_t *q_row(const uint8_t *w, const lm_qseg *segs, long n_seg, long K, long j, int *type) {
    for (long s = 0; s < n_seg; s++) {
        long rb = K / q_block(segs[s].type) * q_bytes(segs[s].type);
        if (j < segs[s].rows) {
            *type = segs[s].type;
            return w + j * rb;
        }
        w += segs[s].rows * rb;
        j -= segs[s].rows;
    }
    *type = -1;
    return 0;
}

/* y (M, N) [+]= x (M, K) @ W^T + bias, W the quantized (N, K) matrix at w; M <= 16. Threads share each segment's
 * rows (pieces of multiples of 16, see QPIECES). tmp: the products before they are added to y (M * N floats, only
 * when accumulating). */
void lm_qlinear(const float *x, long M, long K, const uint8_t *w, const lm_qseg *segs, long n_seg, long N,
                const void *bias, int bias_bf16, int accumulate, float *y, int n_threads) {
    float *out = y;
    float stack[QMAX_ROWS * 4096];                    /* 256 KiB: up to 4096 wide without malloc */
    float *heap = 0;
    if (accumulate) {                                  /* products go to a buffer, then y += buffer */
        if (M * N <= QMAX_ROWS * 4096) out = stack;
        else out = heap = (float *)malloc(sizeof(float) * M * N);
    }
    long row0 = 0;
#ifdef HAVE_INT_DOTS
    xq8 xq[X_FORMS] = {{0}};               /* x in each form its products read (x_form: groups of 32 or 256, orders) */
    void *xq_mem[X_FORMS] = {0};
#endif
    for (long s = 0; s < n_seg; s++) {
        int type = segs[s].type;
        long rows = segs[s].rows, rb = K / q_block(type) * q_bytes(type);
        long chunks = (rows + 15) / 16;
        long parts = QPIECES * n_threads < chunks ? QPIECES * n_threads : chunks;
#ifdef HAVE_INT_DOTS
        int form = x_form(type, M);
        if (!xq_mem[form]) {                                 /* x rounded once per call and form */
            xq_mem[form] = malloc(xq8_bytes(M, K, form));
            quantize_x8(x, M, K, form, xq_mem[form], &xq[form]);
        }
        const xq8 *xp = &xq[form];
#endif
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1) if (parts > 1 && n_threads > 1)
        for (long p = 0; p < parts; p++) {
            long a = chunks * p / parts * 16, b = chunks * (p + 1) / parts * 16;
            b = b < rows ? b : rows;
#ifdef HAVE_INT_DOTS
            switch (type) {
                case Q8_0: int_rows(Q8_0, w, rb, K, a, b, xp, M, out + row0, N); break;
                case Q4_0: int_rows(Q4_0, w, rb, K, a, b, xp, M, out + row0, N); break;
                case Q4_K: int_rows(Q4_K, w, rb, K, a, b, xp, M, out + row0, N); break;
                case Q6_K: int_rows(Q6_K, w, rb, K, a, b, xp, M, out + row0, N); break;
            }
            continue;
#endif
            seg_dot_any(type, w, rb, K, a, b, x, M, out + row0, N);
        }
        w += rows * rb;
        row0 += rows;
    }
    for (long m = 0; m < M; m++)
        for (long j = 0; j < N; j++) {
            float v = out[m * N + j] + (bias ? load(bias, j, bias_bf16) : 0.0f);
            y[m * N + j] = accumulate ? y[m * N + j] + v : v;
        }
    free(heap);
#ifdef HAVE_INT_DOTS
    for (int f = 0; f < X_FORMS; f++) free(xq_mem[f]);
#endif
}

/* rows [r0, r1) of the quantized (N, K) matrix as float32 into out ((r1 - r0), K) */
void lm_qdequant(const uint8_t *w, const lm_qseg *segs, long n_seg, long K, long r0, long r1, float *out,
                 int n_threads) {
    int parts = n_threads < r1 - r0 ? n_threads : (int)(r1 - r0);
#pragma omp parallel for num_threads(parts) schedule(static) if (parts > 1)
    for (long j = r0; j < r1; j++) {
        int type;
        const uint8_t *row = q_row(w, segs, n_seg, K, j, &type);
        for (long k0 = 0; k0 < K; k0 += QK_K) {
            long n = K - k0 < QK_K ? K - k0 : QK_K;
            decode_chunk(type, row + k0 / q_block(type) * q_bytes(type), out + (j - r0) * K + k0, n);
        }
    }
}

/* One layer's quantized matrices: the same four lm_layers uses (w_qkv, w_o, w_up, w_down), as lm_qmat. */
typedef struct {
    const uint8_t *w;
    const lm_qseg *segs;
    long n_seg;
} lm_qmat;

typedef struct {
    lm_qmat qkv, o, up, down;
} lm_qlayer;

/* lm_layers for quantized matrices: norms (Qwen3's q/k norms too), biases, RoPE (Phi's partial rotary too),
 * attention and KV cache as in lm_layers (model dtype), the four products through lm_qlinear. */
void lm_qlayers(float *x, const lm_layer *layers, const lm_qlayer *q, long n, const lm_step *s) {
    long M = s->M, D = s->dim, nh = s->n_head, nkv = s->n_kv, hd = s->head_dim, F = s->hidden;
    long qkv_width = (nh + 2 * nkv) * hd, bf = s->is_bf16, nt = s->n_threads;
    float *h = s->scratch, *qkv = h + M * D, *att = qkv + M * qkv_width, *up = att + M * nh * hd;
    float *act = up + M * 2 * F, *scores = act + M * F;
    for (long i = 0; i < n; i++) {
        const lm_layer *l = layers + i;
        const lm_qlayer *ql = q + i;
        norm(s, x, l->norm1, l->norm1_bias, h);
        lm_qlinear(h, M, D, ql->qkv.w, ql->qkv.segs, ql->qkv.n_seg, qkv_width, l->b_qkv, bf, 0, qkv, nt);
        if (l->q_norm) lm_qk_norm(qkv, M, qkv_width, nh, nkv, hd, l->q_norm, l->k_norm, bf, s->eps, 0);   /* Qwen3 */
        if (!s->is_gpt2) rope_heads(s, l, qkv, qkv_width, nh + nkv);                    /* (Phi: partial) */
        lm_attention(qkv, M, nh, nkv, hd, l->k_cache, l->v_cache, bf, s->max_seq, s->slots, s->pos, l->window,
                     l->attn_scale, scores, att, nt);
        lm_qlinear(att, M, nh * hd, ql->o.w, ql->o.segs, ql->o.n_seg, D, l->b_o, bf, 1, x, nt);
        norm(s, x, l->norm2, l->norm2_bias, h);
        if (s->is_gpt2) {
            lm_qlinear(h, M, D, ql->up.w, ql->up.segs, ql->up.n_seg, F, l->b_up, bf, 0, act, nt);
            lm_gelu(act, M * F, s->exact_gelu);
        } else {
            lm_qlinear(h, M, D, ql->up.w, ql->up.segs, ql->up.n_seg, 2 * F, l->b_up, bf, 0, up, nt);
            lm_silu_mul(up, M, F, act);
        }
        lm_qlinear(act, M, F, ql->down.w, ql->down.segs, ql->down.n_seg, D, l->b_down, bf, 1, x, nt);
    }
}
