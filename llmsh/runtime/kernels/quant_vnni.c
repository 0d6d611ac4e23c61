/* Quantized dot products with AVX512-VNNI (vpdpbusd, vpmaddubsw + vpdpwssd), included by quant_decode.c.
 *
 * Activations: each row of x is rounded once per call to 16-bit integers q = round(x / d) (|q| <= 32639 = 127 * 257),
 * one scale d per group of G weights (G = 32 for Q8_0 and Q4_0, whose blocks have float scales anyway; G = 256 for
 * the K-quants, whose sub-block scales are small integers that then multiply inside the integer sums). q is kept as
 * two int8 planes, q = 256 h + l (h in [-127, 127], l in [-128, 127]), because the byte instructions multiply four
 * times the weights per instruction that int16 ones do and the weights then never need widening: a product is two
 * byte dot products, one per plane. Rounding error per element <= 1.5e-5 of the group's largest: far below the
 * weights' own rounding, so logits stay within a tight tolerance of the float reference (llama.cpp's single int8 plane, error
 * ~4e-3, moved the tiny test models' logits by ~0.1).
 *
 * Weights stay in GGUF's blocks; each kernel unpacks a block's quants to unsigned bytes in registers (Q8_0: + 128,
 * Q4_0 and Q4_K: the nibbles, Q6_K: the 6-bit values) and takes the offsets (-128, -8, Q4_K's mins, -32) through
 * the sums of q over 16 weights, computed once per call on the x side. At batch 1 the 4-bit types run four weight
 * rows at once (four independent chains in flight: alone they are compute-bound), Q8_0 and Q6_K one row at a time
 * (bandwidth-bound: one sequential stream keeps the hardware prefetcher going, four interleaved ones did not, ~15%);
 * up to 16 rows of x share each unpacked block. While rows are read, rows AHEAD_GROUPS groups further are
 * prefetched into L2 (`prefetch_l2`): one row at a time, that row at the same offset; four rows at a time, the
 * group's four rows, which are one contiguous run, front to back in step with these (as four strided streams it was
 * ~40% slower for Q4_0; with no software prefetch at all, ~2x slower). Four groups ahead into L2 against one group
 * into L1, one run of 48 matrices of 11264 x 2048 (more than the caches hold) on an AMX Xeon, GB/s: one thread
 * Q6_K 9.2 -> 10.5, Q8_0 9.7 -> 11.0, Q4_0 8.3 -> 8.8, Q4_K 8.3 -> 8.6 (the memory's read limit there: 11.2); two
 * threads Q6_K 16.4 -> 19.7, Q8_0 18.4 -> 20.3, Q4_0 15.6 -> 16.4, Q4_K 15.6 -> 15.9; eight rows of x: no change.
 * (One row, ~1.7 KB for Q6_K, was too short a lead to hide memory's latency; L1 has too few fill buffers to keep
 * enough lines in flight.) Block layouts: ggml-common.h. */
#define HAVE_INT_DOTS 1
#define AHEAD_GROUPS 4
#define prefetch_l2(p) __builtin_prefetch((p), 0, 2)


typedef struct {
    int8_t *h, *l;                 /* (M, K + 128): the two planes, zero-padded (a last group of < 4 blocks) */
    float *d;                      /* (M, K / G) scales */
    int32_t *s16;                  /* (M, K / 16) sums of q over each 16 */
    int32_t *ns;                   /* Q8_0/Q4_0 layout: per four blocks, -(sum of q) of each in lanes 0, 4, 8, 12 */
    float *dv;                     /* and their four scales, each in 4 lanes (16 floats per four blocks) */
    long K, G, ld;                 /* ld: the planes' row stride (K + 128) */
} xq8;

/* The forms of x that lm_qlinear builds (each at most once per call): 0 for Q8_0 and Q4_0 (groups of 32, their
 * order), 1 for the K-quants (groups of 256) */
#define X_FORMS 2
static inline int x_form(int type, long M) {
    (void)M;
    return type == Q4_K || type == Q6_K;
}

static size_t xq8_bytes(long M, long K, int form) {
    long G = form ? QK_K : 32;
    return (size_t)M * (2 * (K + 128) + sizeof(float) * (K / G) + sizeof(int32_t) * (K / 16) +
                        2 * 64 * (size_t)(K / 128 + 1)) + 64;
}

/* Round M rows of x (K floats each) into xq8 planes with one scale per G (32 for form 0, 256 for form 1) inside mem.
 * For Q8_0 and Q4_0 (form 0) the planes hold each 128 weights (four blocks a..d) in the order dot_q8q4 gathers the quants:
 * a 0-15, b 0-15, c 0-15, d 0-15, a 16-31, b 16-31, c 16-31, d 16-31. */
static void quantize_x8(const float *x, long M, long K, int form, void *mem, xq8 *out) {
    const long G = form ? QK_K : 32, q4 = !form;
    long ng = K / G, ld = K + 128;
    out->d = (float *)mem;
    out->s16 = (int32_t *)(out->d + M * ng);
    out->ns = out->s16 + M * (K / 16);
    out->dv = (float *)(out->ns + M * 16 * (K / 128 + 1));
    out->h = (int8_t *)(out->dv + M * 16 * (K / 128 + 1));
    out->l = out->h + M * ld;
    out->K = K, out->G = G, out->ld = ld;
    for (long m = 0; m < M; m++) {
        const float *xm = x + m * K;
        int8_t *h = out->h + m * ld, *l = out->l + m * ld;
        memset(h + (K & ~127L), 0, 128 + (K & 127));     /* (q4's order leaves gaps in a last partial 128) */
        memset(l + (K & ~127L), 0, 128 + (K & 127));
        for (long g = 0; g < ng; g++) {
            __m512 amax = _mm512_setzero_ps();
            for (long i = 0; i < G; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(xm + g * G + i)));
            float a = _mm512_reduce_max_ps(amax), d = a / 32639.0f;
            __m512 id = _mm512_set1_ps(d > 0 ? 1.0f / d : 0.0f);
            out->d[m * ng + g] = d;
            for (long i = g * G; i < (g + 1) * G; i += 16) {
                __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xm + i), id));     /* nearest */
                __m512i hi = _mm512_srai_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(128)), 8);
                __m512i lo = _mm512_sub_epi32(q, _mm512_slli_epi32(hi, 8));
                long o = i & 127, at = q4 ? (i - o) + (o & 16) * 4 + (o >> 5) * 16 : i;   /* see dot_q8q4 */
                _mm_storeu_si128((__m128i *)(h + at), _mm512_cvtepi32_epi8(hi));
                _mm_storeu_si128((__m128i *)(l + at), _mm512_cvtepi32_epi8(lo));
                out->s16[m * (K / 16) + i / 16] = _mm512_reduce_add_epi32(q);
            }
        }
        if (!q4) continue;
        long nb = K / 32, nv = 16 * (K / 128 + 1);
        int32_t *ns = out->ns + m * nv;
        float *dv = out->dv + m * nv;
        memset(ns, 0, sizeof(int32_t) * nv);
        memset(dv, 0, sizeof(float) * nv);
        for (long b = 0; b < nb; b++)
            for (int k = 0; k < 4; k++) {
                ns[4 * b + k] = k ? 0 : -(out->s16[m * (K / 16) + 2 * b] + out->s16[m * (K / 16) + 2 * b + 1]);
                dv[4 * b + k] = out->d[m * ng + b];
            }
    }
}

/* 16 bytes at each of p, p + st, p + 2 st, p + 3 st as one vector */
static inline __m512i load4x16(const uint8_t *p, long st) {
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)p));
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + st)), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 2 * st)), 2);
    return _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 3 * st)), 3);
}

/* y[r * ldr + m] = row r . x[m] for R rows of Q8_0 or Q4_0 and M rows of x, four blocks (a, b, c, d) a step.
 * Their quants are gathered as two vectors of unsigned bytes, [a, b, c, d] weights 0-15 and [a, b, c, d] weights
 * 16-31 (Q4_0: the low and the high nibbles; Q8_0: q + 128), the order quantize_x8 writes x in, so both products
 * land in the same lanes (4 per block) and the float work (scales, convert, multiply-add) is done once per four
 * blocks; the four f16 scales come from one word permute. A last group of fewer than four blocks runs on a
 * zero-padded copy (zero scales). */
static inline __attribute__((always_inline)) void dot_q8q4(int type, const uint8_t *const *rows, int R, long K,
                                                         const xq8 *x, long M, float *y, long ldr) {
    const long bb = type == Q8_0 ? 34 : 18, nb = K / 32, sh = type == Q8_0 ? 7 : 3;   /* offsets 128, 8 */
    const long ahead = AHEAD_GROUPS * R * nb * bb;     /* the rows to prefetch: this many groups of R rows on */
    const __m512i sidx = _mm512_mullo_epi16(_mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                             3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                                            _mm512_set1_epi16((short)(bb / 2)));      /* words 0, 1, 2, 3 blocks on */
    __m512 acc[4][QMAX_ROWS];
    for (int r = 0; r < R; r++)
        for (long m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps();
    uint8_t tail[4][4 * 34] __attribute__((aligned(64)));
    for (long b = 0; b < nb; b += 4) {
        long nq = nb - b < 4 ? nb - b : 4;
        __m512i lo[4], hi[4];
        __m512 ws[4];
        if (R > 1)   /* the next R rows are one contiguous run: prefetched front to back, in step with these */
            for (long c = 0; c < R * 4 * bb; c += 64) prefetch_l2(rows[0] + ahead + R * b * bb + c);
        for (int r = 0; r < R; r++) {
            const uint8_t *blk = rows[r] + b * bb;
            if (R == 1) {
                prefetch_l2(blk + ahead);
                prefetch_l2(blk + ahead + 64);
                prefetch_l2(blk + ahead + 4 * bb - 1);
            }
            if (nq < 4) {
                memset(tail[r], 0, sizeof tail[r]);
                memcpy(tail[r], blk, nq * bb);
                blk = tail[r];
            }
            __m512i raw;
            if (type == Q8_0) {
                const __m512i flip = _mm512_set1_epi8((char)0x80);
                lo[r] = _mm512_xor_si512(load4x16(blk + 2, bb), flip);
                hi[r] = _mm512_xor_si512(load4x16(blk + 18, bb), flip);
                raw = _mm512_permutex2var_epi16(_mm512_loadu_si512((const void *)blk), sidx,
                                                _mm512_loadu_si512((const void *)(blk + 64)));
            } else {
                const __m512i low4 = _mm512_set1_epi8(0x0F);
                __m512i v = load4x16(blk + 2, bb);
                lo[r] = _mm512_and_si512(v, low4);
                hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                raw = _mm512_permutexvar_epi16(sidx, _mm512_loadu_si512((const void *)blk));
            }
            ws[r] = _mm512_cvtph_ps(_mm512_castsi512_si256(raw));                 /* [da, db, dc, dd] x 4 */
        }
        for (long m = 0; m < M; m++) {
            const int8_t *h = x->h + m * x->ld + 32 * b, *l = x->l + m * x->ld + 32 * b;
            long nv = 16 * (K / 128 + 1);
            __m512i init = _mm512_slli_epi32(_mm512_loadu_si512((const void *)(x->ns + m * nv + 4 * b)), sh);
            __m512 xd = _mm512_loadu_ps(x->dv + m * nv + 4 * b);
            __m512i xh0 = _mm512_loadu_si512((const void *)h), xl0 = _mm512_loadu_si512((const void *)l);
            __m512i xh1 = _mm512_loadu_si512((const void *)(h + 64)), xl1 = _mm512_loadu_si512((const void *)(l + 64));
            for (int r = 0; r < R; r++) {
                __m512i ph = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[r], xh0), hi[r], xh1);
                __m512i pl = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(init, lo[r], xl0), hi[r], xl1);
                __m512i f = _mm512_add_epi32(_mm512_slli_epi32(ph, 8), pl);
                acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(f), _mm512_mul_ps(ws[r], xd), acc[r][m]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (long m = 0; m < M; m++) y[r * ldr + m] = _mm512_reduce_add_ps(acc[r][m]);
}

/* Q4_K's 8 six-bit scales (bytes 0..7) and mins (8..15) from its 12 packed bytes (get_scale_min_k4's packing).
 * Built in a register: four 4-byte stores read back as one 16-byte load cannot be store-forwarded (a stall each
 * super-block). */
static inline __m128i q4k_scales(const uint8_t *p) {
    uint32_t u0, u1, u2;
    memcpy(&u0, p, 4), memcpy(&u1, p + 4, 4), memcpy(&u2, p + 8, 4);
    return _mm_setr_epi32((int)(u0 & 0x3f3f3f3fu),                                       /* sc 0..3 */
                          (int)((u2 & 0x0f0f0f0fu) | (((u0 >> 6) & 0x03030303u) << 4)),  /* sc 4..7 */
                          (int)(u1 & 0x3f3f3f3fu),                                       /* m 0..3 */
                          (int)(((u2 >> 4) & 0x0f0f0f0fu) | (((u1 >> 6) & 0x03030303u) << 4)));   /* m 4..7 */
}

/* word lanes [v[a] x 16 | v[b] x 16] of the 16-bit words v */
static inline __m512i spread2(__m512i v, int a, int b) {
    return _mm512_permutexvar_epi16(_mm512_mask_blend_epi16(0xFFFF0000u, _mm512_set1_epi16((short)a),
                                                            _mm512_set1_epi16((short)b)), v);
}

/* word lanes [v[a] x 8 | v[a+1] x 8 | v[a+2] x 8 | v[a+3] x 8] */
static inline __m512i spread4(__m512i v, int a) {
    const __m512i idx = _mm512_set_epi16(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2,
                                         1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_permutexvar_epi16(_mm512_add_epi16(idx, _mm512_set1_epi16((short)a)), v);
}

/* One K-quant super-block of a row unpacked: 4 x 64 unsigned weights, their sub-block scales spread to the word
 * lanes of vpmaddubsw's output, the scale d, and the offset term's per-lane factors and scale (Q4_K: the 8 mins
 * against the sums of 32, times -dmin; Q6_K: the 16 scales against the sums of 16, times -32 d). */
typedef struct {
    __m512i w[4], sc[4], off;
    float d, doff;
} ksb;

static inline __attribute__((always_inline)) void unpack_k(int type, const uint8_t *blk, ksb *k) {
    const __m512i low4 = _mm512_set1_epi8(0x0F), bits45 = _mm512_set1_epi8(0x30);
    if (type == Q4_K) {
        __m128i s = q4k_scales(blk + 4);
        k->d = f16_to_f32(rd16(blk));
        k->doff = -f16_to_f32(rd16(blk + 2));
        __m512i s16 = _mm512_cvtepu8_epi16(_mm256_castsi128_si256(s));
        const __m512i shift = _mm512_mask_blend_epi16(0xFFFF0000u, _mm512_setzero_si512(), _mm512_set1_epi16(4));
        for (int j = 0; j < 4; j++) {        /* [32 bytes, 32 bytes >> 4]: sub-blocks 2j | 2j+1 */
            __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * j)));
            k->w[j] = _mm512_and_si512(_mm512_srlv_epi16(v, shift), low4);
            k->sc[j] = spread2(s16, 2 * j, 2 * j + 1);
        }
        k->off = _mm512_cvtepu8_epi32(_mm_srli_si128(s, 8));                          /* mins, lanes 0..7 */
        return;
    }
    k->d = f16_to_f32(rd16(blk + 208));
    k->doff = -32.0f * k->d;
    __m128i s8 = _mm_loadu_si128((const __m128i *)(blk + 192));
    __m512i s16 = _mm512_cvtepi8_epi16(_mm256_castsi128_si256(s8));
    const __m512i up = _mm512_mask_blend_epi16(0xFFFF0000u, _mm512_set1_epi16(4), _mm512_set1_epi16(2));
    const __m512i dn = _mm512_mask_blend_epi16(0xFFFF0000u, _mm512_set1_epi16(0), _mm512_set1_epi16(2));
    for (int n = 0; n < 2; n++) {
        __m512i L = _mm512_loadu_si512((const void *)(blk + 64 * n));
        __m512i H = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * n)));
        __m512i ha = _mm512_and_si512(_mm512_sllv_epi16(H, up), bits45);
        __m512i hb = _mm512_and_si512(_mm512_srlv_epi16(H, dn), bits45);
        k->w[2 * n] = _mm512_ternarylogic_epi32(L, low4, ha, 0xEA);                     /* (L & 15) | ha */
        k->w[2 * n + 1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(L, 4), low4, hb, 0xEA);
        k->sc[2 * n] = spread4(s16, 8 * n);
        k->sc[2 * n + 1] = spread4(s16, 8 * n + 4);
    }
    k->off = _mm512_cvtepi8_epi32(s8);                                                   /* 16 scales */
}

/* The x side of super-block b: both planes' 4 x 64 bytes, the sums the offsets need (Q4_K: of 32, lanes 0..7;
 * Q6_K: of 16) and the scale. */
typedef struct {
    __m512i h[4], l[4], sums;
    float d;
} kx;

static inline __attribute__((always_inline)) void load_kx(int type, const xq8 *x, long m, long b, kx *o) {
    const int8_t *h = x->h + m * x->ld + QK_K * b, *l = x->l + m * x->ld + QK_K * b;
    for (int j = 0; j < 4; j++) {
        o->h[j] = _mm512_loadu_si512((const void *)(h + 64 * j));
        o->l[j] = _mm512_loadu_si512((const void *)(l + 64 * j));
    }
    __m512i sv = _mm512_loadu_si512((const void *)(x->s16 + m * (x->K / 16) + 16 * b));
    if (type == Q4_K) {                                                        /* pairs of 16 -> sums of 32 */
        sv = _mm512_add_epi32(sv, _mm512_srli_epi64(sv, 32));
        sv = _mm512_maskz_permutexvar_epi32(0x00FF, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 0, 0, 0, 0, 0, 0, 0), sv);
    }
    o->sums = sv;
    o->d = x->d[m * (x->K / QK_K) + b];
}

/* acc += this super-block's products: [0] the planes, [1] the offsets, [2] Q6_K's low plane. Q4_K joins the planes
 * as integers, 256 h + l (a lane's plane sum is at most 4 x 2 x 63 x 2 x 15 x 128 ~ 1.9e6, so 256 h + l < 2^31): one
 * convert and one multiply-add instead of two. Q6_K's 6-bit weights and signed 8-bit scales (~1.6e7) would overflow,
 * so its planes stay apart in floats. */
static inline __attribute__((always_inline)) void dot_ksb(int type, const ksb *k, const kx *xs, __m512 acc[3]) {
    __m512i ah = _mm512_setzero_si512(), al = _mm512_setzero_si512();
    for (int j = 0; j < 4; j++) {
        ah = _mm512_dpwssd_epi32(ah, _mm512_maddubs_epi16(k->w[j], xs->h[j]), k->sc[j]);
        al = _mm512_dpwssd_epi32(al, _mm512_maddubs_epi16(k->w[j], xs->l[j]), k->sc[j]);
    }
    __m512 dd = _mm512_set1_ps(k->d * xs->d);
    if (type == Q4_K) {
        acc[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(ah, 8), al)), dd, acc[0]);
    } else {
        acc[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ah), dd, acc[0]);                  /* (x 256 at the end) */
        acc[2] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(al), dd, acc[2]);
    }
    acc[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_mullo_epi32(xs->sums, k->off)),
                             _mm512_set1_ps(k->doff * xs->d), acc[1]);
}

/* Q4_K or Q6_K rows (K-quants: x in groups of 256, one per super-block). With R rows (batch 1) x's side of a
 * super-block is loaded once for all of them; with M rows of x each row's super-block is unpacked once. */
static inline __attribute__((always_inline)) void dot_k(int type, const uint8_t *const *rows, int R, long K,
                                                      const xq8 *x, long M, float *y, long ldr) {
    const long bb = type == Q4_K ? 144 : 210, nb = K / QK_K;
    const long ahead = AHEAD_GROUPS * R * nb * bb;     /* the rows to prefetch: this many groups of R rows on */
    __m512 acc[4][QMAX_ROWS][3];
    for (int r = 0; r < R; r++)
        for (long m = 0; m < M; m++) acc[r][m][0] = acc[r][m][1] = acc[r][m][2] = _mm512_setzero_ps();
    for (long b = 0; b < nb; b++) {
        kx xs;
        memset(&xs, 0, sizeof xs);                   /* (loaded below: once, or per row of x) */
        if (M == 1) load_kx(type, x, 0, b, &xs);
        if (R > 1)
            for (long c = 0; c < R * bb; c += 64) prefetch_l2(rows[0] + ahead + R * b * bb + c);
        for (int r = 0; r < R; r++) {
            const uint8_t *blk = rows[r] + b * bb;
            if (R == 1) {
                for (long c = 0; c < bb; c += 64) prefetch_l2(blk + ahead + c);
                prefetch_l2(blk + ahead + bb - 1);
            }
            ksb k;
            unpack_k(type, blk, &k);
            for (long m = 0; m < M; m++) {
                if (M > 1) load_kx(type, x, m, b, &xs);
                dot_ksb(type, &k, &xs, acc[r][m]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (long m = 0; m < M; m++) {
            __m512 planes = type == Q4_K ? acc[r][m][0] : _mm512_fmadd_ps(acc[r][m][0], _mm512_set1_ps(256.0f), acc[r][m][2]);
            y[r * ldr + m] = _mm512_reduce_add_ps(_mm512_add_ps(planes, acc[r][m][1]));
        }
}

static inline __attribute__((always_inline)) void dot_rows(int type, const uint8_t *const *rows, int R, long K,
                                                         const xq8 *x, long M, float *y, long ldr) {
    if (type == Q8_0 || type == Q4_0) dot_q8q4(type, rows, R, K, x, M, y, ldr);
    else dot_k(type, rows, R, K, x, M, y, ldr);
}

/* out[m * ldy + j] = row j . x[m] for rows j0..j1-1 of one segment (rows rb bytes apart) */
static inline __attribute__((always_inline)) void int_rows(int type, const uint8_t *w, long rb, long K, long j0,
                                                           long j1, const xq8 *x, long M, float *y, long ldy) {
    long j = j0;
    if (M == 1 && (type == Q4_0 || type == Q4_K))  /* 4-bit: compute-bound alone; the wider types stream */
        for (; j + 4 <= j1; j += 4) {                  /* faster one row at a time (the hardware prefetcher) */
            const uint8_t *rows[4] = {w + j * rb, w + (j + 1) * rb, w + (j + 2) * rb, w + (j + 3) * rb};
            dot_rows(type, rows, 4, K, x, 1, y + j, 1);
        }
    for (; j < j1; j++) {
        const uint8_t *rows[1] = {w + j * rb};
        float out[QMAX_ROWS];
        if (M == 1) dot_rows(type, rows, 1, K, x, 1, out, 1);       /* (a constant M: x's side in registers) */
        else dot_rows(type, rows, 1, K, x, M, out, M);
        for (long m = 0; m < M; m++) y[m * ldy + j] = out[m];
    }
}
