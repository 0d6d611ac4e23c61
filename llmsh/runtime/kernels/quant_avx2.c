/* Quantized dot products with AVX2 (vpmaddwd, vpmaddubsw), included by quant_decode.c on x86 CPUs without
 * AVX512-VNNI (Zen 2 and 3, Intel before Ice Lake). The design of quant_vnni.c, in 256-bit registers.
 *
 * Activations: each row of x is rounded once per call to integers q = round(x / d), |q| <= 32385 = 127 * 255, one
 * scale d per group of G weights (32 for Q8_0 and Q4_0, 256 for the K-quants). Error per element <= 1.6e-5 of the
 * group's largest, as on the VNNI path; llama.cpp's single int8 plane (~4e-3) moved the tiny test models' logits by
 * ~0.1. q is kept in one of x_form's forms:
 *   - as int16, for Q8_0 and Q4_0: their quants widened to int16 (vpmovsx/zxbw) and multiplied with vpmaddwd, 16
 *     weights an instruction, one block's scale per product;
 *   - as int16 too for the K-quants at one row of x (decode at batch 1), each 32 as its even elements then its odd
 *     ones: the quants become int16 words with masks and shifts, vpmaddwd multiplies them, and each sub-block's
 *     sum stays in a lane of its own until its scale applies, once per super-block (dot_q4k_wide, dot_q6k_wide).
 *     Half the multiplies of the planes below: Q4_K 10.5 -> 12.8 GB/s at one thread on a Zen 3;
 *   - as two int8 planes q = 255 h + l (h, l in [-127, 127]), for the K-quants at several rows of x: vpmaddubsw
 *     multiplies their unsigned quants (<= 63) by each plane and adds pairs into int16 (<= 63 x 127 x 2 = 16002,
 *     below its saturation), then vpmaddwd multiplies those pairs by the sub-block scales into int32, the same
 *     instructions for every row of x.
 * Offsets (Q4_0's -8, Q4_K's mins, Q6_K's -32) go through x's sums of q, computed once per call. At batch 1 the
 * Q4_0, Q8_0 and Q4_K run four weight rows at once (x's side shared; Q8_0 1.3x faster so on a Zen 3; Q4_K one row
 * after another, its sums in registers), Q6_K one row at a time, with software prefetch AHEAD_GROUPS rows on, as in
 * quant_vnni.c. Block layouts: ggml-common.h. */
#define HAVE_INT_DOTS 1
#define AHEAD_GROUPS 4
#define prefetch_l2(p) __builtin_prefetch((p), 0, 2)
#define PLANE_BASE 255

typedef struct {
    int16_t *q;                    /* (M, K): q itself (Q8_0 and Q4_0 multiply it as int16, vpmaddwd; the K-quants too, form 2) */
    int8_t *h, *l;                 /* (M, K): the two planes (the K-quants, vpmaddubsw) */
    float *d;                      /* (M, K / G) scales */
    int32_t *s16;                  /* (M, K / 16) sums of q over each 16 */
    int32_t *s32;                  /* (M, K / 32) sums of q over each 32 (Q4_K's mins) */
    long K, G, ld;                 /* ld: the planes' row stride (K) */
    int form;                      /* x_form's */
} xq8;

/* The forms of x that lm_qlinear builds (each at most once per call): 0, int16 q in groups of 32 (Q8_0, Q4_0);
 * 1, the two planes in groups of 256 (the K-quants at several rows of x); 2, int16 q in groups of 256, each 32 as
 * its 16 even elements then its 16 odd ones (the K-quants at one row of x: dot_q4k_wide, dot_q6k_wide) */
#define X_FORMS 3
static inline int x_form(int type, long M) {
    if (type == Q8_0 || type == Q4_0) return 0;
    return M == 1 ? 2 : 1;
}

static size_t xq8_bytes(long M, long K, int form) {
    long G = form ? QK_K : 32;
    return (size_t)M * (4 * K + sizeof(float) * (K / G) + sizeof(int32_t) * (K / 16 + K / 32)) + 64;
}

static inline int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 32 int32 (four vectors, in order) as 32 int8 in order (the values fit) */
static inline __m256i pack32(__m256i a, __m256i b, __m256i c, __m256i d) {
    __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
    return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* Round M rows of x (K floats each) into xq8 in one of x_form's forms inside mem: one scale per G (32 for form 0,
 * 256 for the others); q as int16 (in weight order, form 0; even elements of each 32 then odd ones, form 2) or
 * as the two planes (form 1). */
static void quantize_x8(const float *x, long M, long K, int form, void *mem, xq8 *out) {
    const long G = form ? QK_K : 32, ng = K / G;
    const int planes = form == 1;
    out->d = (float *)mem;
    out->s16 = (int32_t *)(out->d + M * ng);
    out->s32 = out->s16 + M * (K / 16);
    out->q = (int16_t *)(out->s32 + M * (K / 32));
    out->h = (int8_t *)(out->q + M * K);
    out->l = out->h + M * K;
    out->K = K, out->G = G, out->ld = K, out->form = form;
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 inv_base = _mm256_set1_ps(1.0f / PLANE_BASE);
    for (long m = 0; m < M; m++) {
        const float *xm = x + m * K;
        for (long g = 0; g < ng; g++) {
            __m256 amax = _mm256_setzero_ps();
            for (long i = 0; i < G; i += 8)
                amax = _mm256_max_ps(amax, _mm256_and_ps(_mm256_loadu_ps(xm + g * G + i), abs_mask));
            __m128 a4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
            a4 = _mm_max_ps(a4, _mm_movehl_ps(a4, a4));
            a4 = _mm_max_ss(a4, _mm_movehdup_ps(a4));
            float d = _mm_cvtss_f32(a4) / (127.0f * PLANE_BASE);
            __m256 id = _mm256_set1_ps(d > 0 ? 1.0f / d : 0.0f);
            out->d[m * ng + g] = d;
            for (long i = g * G; i < (g + 1) * G; i += 32) {
                __m256i q[4];
                for (int k = 0; k < 4; k++)                                                           /* nearest */
                    q[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xm + i + 8 * k), id));
                out->s16[m * (K / 16) + i / 16] = hsum_i32(_mm256_add_epi32(q[0], q[1]));
                out->s16[m * (K / 16) + i / 16 + 1] = hsum_i32(_mm256_add_epi32(q[2], q[3]));
                out->s32[m * (K / 32) + i / 32] = out->s16[m * (K / 16) + i / 16] + out->s16[m * (K / 16) + i / 16 + 1];
                if (!planes) {
                    __m256i q01 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);
                    __m256i q23 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8);
                    int16_t *to = out->q + m * K + i;
                    if (form == 2) {                                   /* the even elements, then the odd ones */
                        int16_t t[32];
                        _mm256_storeu_si256((__m256i *)t, q01);
                        _mm256_storeu_si256((__m256i *)(t + 16), q23);
                        for (int k = 0; k < 16; k++) to[k] = t[2 * k], to[16 + k] = t[2 * k + 1];
                        continue;
                    }
                    _mm256_storeu_si256((__m256i *)to, q01);
                    _mm256_storeu_si256((__m256i *)(to + 16), q23);
                    continue;
                }
                __m256i h[4], l[4];
                for (int k = 0; k < 4; k++) {
                    h[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_cvtepi32_ps(q[k]), inv_base));
                    l[k] = _mm256_sub_epi32(q[k], _mm256_mullo_epi32(h[k], _mm256_set1_epi32(PLANE_BASE)));
                }
                _mm256_storeu_si256((__m256i *)(out->h + m * K + i), pack32(h[0], h[1], h[2], h[3]));
                _mm256_storeu_si256((__m256i *)(out->l + m * K + i), pack32(l[0], l[1], l[2], l[3]));
            }
        }
    }
}

/* Block b's 32 quants as two vectors of 16 int16 in weight order: Q8_0 as stored (signed), Q4_0 its nibbles */
static inline void q8q4_quants(int type, const uint8_t *blk, __m256i *w0, __m256i *w1) {
    if (type == Q8_0) {
        *w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 2)));
        *w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 18)));
        return;
    }
    __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(blk + 2)));
    *w0 = _mm256_and_si256(v, _mm256_set1_epi16(0x0F));                     /* low nibbles: weights 0..15 */
    *w1 = _mm256_srli_epi16(v, 4);                                          /* high ones: 16..31 */
}

/* Two vectors of int32 (blocks k, k + 1) as one whose lanes 2i + k' (of each half) hold block k + k''s lanes i
 * and i + 2 summed; pair_join of two such (blocks 0, 1 and 2, 3) has block k's half-sums in lane k of each half.
 * Unpacks and adds, one uop each; vphaddd is three on Zen. */
static inline __m256i pair_sum(__m256i p0, __m256i p1) {
    return _mm256_add_epi32(_mm256_unpacklo_epi32(p0, p1), _mm256_unpackhi_epi32(p0, p1));
}

static inline __m256i pair_join(__m256i q01, __m256i q23) {
    return _mm256_add_epi32(_mm256_unpacklo_epi64(q01, q23), _mm256_unpackhi_epi64(q01, q23));
}

/* acc[r][m] += blocks b..b+n-1 (n <= 4) of rows r . x[m]. Each block's products (int32, vpmaddwd) go into one
 * lane per block, so the four blocks' scales (wd x xd) apply as one vector and Q4_0's -8 offset (-8 x's block sum)
 * joins them as integers: one conversion and one FMA per four blocks, no per-block broadcast. */
static inline __attribute__((always_inline)) void q8q4_group(int type, const uint8_t *const *rows, int R, long b,
                                                           int n, long bb, const xq8 *x, long M,
                                                           __m256 acc[4][QMAX_ROWS]) {
    const long nb = x->K / 32;
    __m128 xd[QMAX_ROWS];
    __m256i xoff[QMAX_ROWS];
    for (long m = 0; m < M; m++) {
        float d4[4] = {0, 0, 0, 0};
        int32_t o4[4] = {0, 0, 0, 0};
        const int32_t *s = x->s16 + m * (x->K / 16) + 2 * b;
        for (int k = 0; k < n; k++) d4[k] = x->d[m * nb + b + k], o4[k] = 8 * (s[2 * k] + s[2 * k + 1]);
        xd[m] = _mm_loadu_ps(d4);
        xoff[m] = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)o4));
    }
    for (int r = 0; r < R; r++) {
        uint64_t w16 = 0;                                      /* the four blocks' fp16 scales */
        for (int k = 0; k < n; k++) w16 |= (uint64_t)rd16(rows[r] + (b + k) * bb) << (16 * k);
        __m128 wd = _mm_cvtph_ps(_mm_cvtsi64_si128((long long)w16));
        __m256i q[2][QMAX_ROWS];                               /* blocks 0, 1 and 2, 3 as pair_sum's */
        for (int k = 0; k < 4; k += 2) {
            __m256i w[2][2];
            for (int i = 0; i < 2; i++) {
                w[i][0] = w[i][1] = _mm256_setzero_si256();
                if (k + i < n) q8q4_quants(type, rows[r] + (b + k + i) * bb, &w[i][0], &w[i][1]);
            }
            for (long m = 0; m < M; m++) {
                __m256i p[2];
                for (int i = 0; i < 2; i++) {
                    const int16_t *xq = x->q + m * x->ld + 32 * (b + k + i);
                    p[i] = k + i < n ? _mm256_add_epi32(
                                           _mm256_madd_epi16(w[i][0], _mm256_loadu_si256((const __m256i *)xq)),
                                           _mm256_madd_epi16(w[i][1], _mm256_loadu_si256((const __m256i *)(xq + 16))))
                                     : _mm256_setzero_si256();
                }
                q[k / 2][m] = pair_sum(p[0], p[1]);
            }
        }
        for (long m = 0; m < M; m++) {
            __m256i s = pair_join(q[0][m], q[1][m]);
            if (type == Q4_0) s = _mm256_sub_epi32(s, xoff[m]);
            __m128 d = _mm_mul_ps(wd, xd[m]);
            acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set_m128(d, d), acc[r][m]);
        }
    }
}

/* y[r * ldr + m] = row r . x[m] for R rows of Q8_0 or Q4_0 and M rows of x, four blocks a step. These multiply x's
 * int16 q directly (vpmaddwd, 16 weights an instruction): for 8-bit and smaller blocks that is fewer instructions
 * than the two byte planes (two vpmaddubsw, two vpmaddwd, a join). */
static inline __attribute__((always_inline)) void dot_q8q4(int type, const uint8_t *const *rows, int R, long K,
                                                         const xq8 *x, long M, float *y, long ldr) {
    const long bb = type == Q8_0 ? 34 : 18, nb = K / 32;
    const long ahead = AHEAD_GROUPS * R * nb * bb;     /* the rows to prefetch: this many groups of R rows on */
    __m256 acc[4][QMAX_ROWS];
    for (int r = 0; r < R; r++)
        for (long m = 0; m < M; m++) acc[r][m] = _mm256_setzero_ps();
    long b = 0;
    for (; b + 4 <= nb; b += 4) {
        if (R > 1)   /* the next R rows are one contiguous run: prefetched front to back, in step with these */
            for (long c = 0; c < 4 * R * bb; c += 64) prefetch_l2(rows[0] + ahead + R * b * bb + c);
        else
            for (long c = 0; c < 4 * bb; c += 64) prefetch_l2(rows[0] + ahead + b * bb + c);
        q8q4_group(type, rows, R, b, 4, bb, x, M, acc);
    }
    if (b < nb) q8q4_group(type, rows, R, b, (int)(nb - b), bb, x, M, acc);
    for (int r = 0; r < R; r++)
        for (long m = 0; m < M; m++) y[r * ldr + m] = hsum_ps(acc[r][m]);
}

/* vpshufb controls that spread 16-bit word a of each 128-bit lane to all eight words of the low lane and word b
 * to the high lane's */
static inline __m256i word_spread(int a, int b) {
    return _mm256_setr_epi8((char)(2 * a), (char)(2 * a + 1), (char)(2 * a), (char)(2 * a + 1), (char)(2 * a),
                            (char)(2 * a + 1), (char)(2 * a), (char)(2 * a + 1), (char)(2 * a), (char)(2 * a + 1),
                            (char)(2 * a), (char)(2 * a + 1), (char)(2 * a), (char)(2 * a + 1), (char)(2 * a),
                            (char)(2 * a + 1), (char)(2 * b), (char)(2 * b + 1), (char)(2 * b), (char)(2 * b + 1),
                            (char)(2 * b), (char)(2 * b + 1), (char)(2 * b), (char)(2 * b + 1), (char)(2 * b),
                            (char)(2 * b + 1), (char)(2 * b), (char)(2 * b + 1), (char)(2 * b), (char)(2 * b + 1),
                            (char)(2 * b), (char)(2 * b + 1));
}

/* One 32-weight piece of a K-quant super-block (unsigned quants w, the pair products' sub-block scales sc as int16
 * lanes) against x's rows at weight `at`: ah[m], al[m] += the high and low planes' scaled products. */
static inline __attribute__((always_inline)) void k_piece(__m256i w, __m256i sc, const xq8 *x, long M, long at,
                                                        __m256i *ah, __m256i *al) {
    for (long m = 0; m < M; m++) {
        __m256i xh = _mm256_loadu_si256((const __m256i *)(x->h + m * x->ld + at));
        __m256i xl = _mm256_loadu_si256((const __m256i *)(x->l + m * x->ld + at));
        ah[m] = _mm256_add_epi32(ah[m], _mm256_madd_epi16(_mm256_maddubs_epi16(w, xh), sc));
        al[m] = _mm256_add_epi32(al[m], _mm256_madd_epi16(_mm256_maddubs_epi16(w, xl), sc));
    }
}

/* A Q4_K super-block's packed 6-bit scales and mins (bytes 4..15 of the block, `raw` its first 16 bytes) as 16
 * bytes: sc 0..7, then m 0..7 (ggml's get_scale_min_k4, four at a time) */
static inline __m128i q4k_scales(__m128i raw) {
    __m128i u = _mm_srli_si128(raw, 4);                                       /* u0, u1, u2 (and 0) */
    __m128i a = _mm_shuffle_epi32(u, 0x98), c = _mm_shuffle_epi32(u, 0x50);   /* u0 u2 u1 u2; u0 u0 u1 u1 */
    return _mm_or_si128(_mm_and_si128(_mm_srlv_epi32(a, _mm_setr_epi32(0, 0, 0, 4)),
                                      _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f)),
                        _mm_and_si128(_mm_srli_epi32(c, 2), _mm_setr_epi32(0, 0x30303030, 0, 0x30303030)));
}

/* acc[m] += super-block b of a Q4_K or Q6_K row . x[m], the quants unpacked 32 at a time as they are multiplied
 * (a whole super-block unpacked first, 16 registers, spilled). The planes join as 255 h + l: Q4_K as integers (at
 * most 32 x 15 x 127 x 63 x 256 ~ 9.8e8 a lane), Q6_K in floats (its ~8e9 would overflow). The offsets (Q4_K: the
 * 8 mins against x's sums of 32, times -dmin; Q6_K: the 16 scales against the sums of 16, times -32 d) go into
 * the same sum. */
static inline __attribute__((always_inline)) void dot_superblock(int type, const uint8_t *blk, const xq8 *x, long M,
                                                               long b, __m256 *acc) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256i ah[QMAX_ROWS], al[QMAX_ROWS], offs[QMAX_ROWS];
    for (long m = 0; m < M; m++) ah[m] = al[m] = _mm256_setzero_si256();
    const long at = QK_K * b;
    float d, doff;
    if (type == Q4_K) {
        __m128i s = q4k_scales(_mm_loadu_si128((const __m128i *)blk));
        d = f16_to_f32(rd16(blk));
        doff = -f16_to_f32(rd16(blk + 2));
        __m256i s16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(s));                  /* 8 scales, both lanes */
        for (int j = 0; j < 4; j++) {        /* 32 bytes: low nibbles sub-block 2j, high ones 2j + 1 */
            __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * j));
            k_piece(_mm256_and_si256(v, low4), _mm256_shuffle_epi8(s16, word_spread(2 * j, 2 * j)), x, M,
                    at + 64 * j, ah, al);
            k_piece(_mm256_and_si256(_mm256_srli_epi16(v, 4), low4),
                    _mm256_shuffle_epi8(s16, word_spread(2 * j + 1, 2 * j + 1)), x, M, at + 64 * j + 32, ah, al);
        }
        __m256i mins = _mm256_cvtepu8_epi32(_mm_srli_si128(s, 8));
        for (long m = 0; m < M; m++) {
            __m256i sums32 = _mm256_loadu_si256((const __m256i *)(x->s32 + m * (x->K / 32) + 8 * b));
            offs[m] = _mm256_mullo_epi32(sums32, mins);
            ah[m] = _mm256_add_epi32(_mm256_mullo_epi32(ah[m], _mm256_set1_epi32(PLANE_BASE)), al[m]);
        }
    } else {
        const __m256i bits45 = _mm256_set1_epi8(0x30);
        d = f16_to_f32(rd16(blk + 208));
        doff = -32.0f * d;
        __m128i s8 = _mm_loadu_si128((const __m128i *)(blk + 192));
        for (int n = 0; n < 2; n++) {        /* 128 weights: ql 64 bytes, qh 32 bytes, scales 8n .. 8n + 7 */
            __m256i L0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * n));
            __m256i L1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * n + 32));
            __m256i H = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * n));
            __m256i s16 = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(n ? _mm_srli_si128(s8, 8) : s8));
            __m256i w[4];
            w[0] = _mm256_or_si256(_mm256_and_si256(L0, low4), _mm256_and_si256(_mm256_slli_epi16(H, 4), bits45));
            w[1] = _mm256_or_si256(_mm256_and_si256(L1, low4), _mm256_and_si256(_mm256_slli_epi16(H, 2), bits45));
            w[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(L0, 4), low4), _mm256_and_si256(H, bits45));
            w[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(L1, 4), low4),
                                   _mm256_and_si256(_mm256_srli_epi16(H, 2), bits45));
            for (int i = 0; i < 4; i++)      /* weights 128 n + 32 i ..: scales 8n + 2i (first 16), 8n + 2i + 1 */
                k_piece(w[i], _mm256_shuffle_epi8(s16, word_spread(2 * i, 2 * i + 1)), x, M, at + 128 * n + 32 * i,
                        ah, al);
        }
        __m256i sc0 = _mm256_cvtepi8_epi32(s8), sc1 = _mm256_cvtepi8_epi32(_mm_srli_si128(s8, 8));
        for (long m = 0; m < M; m++) {
            const int32_t *s16s = x->s16 + m * (x->K / 16) + 16 * b;
            offs[m] = _mm256_add_epi32(_mm256_mullo_epi32(_mm256_loadu_si256((const __m256i *)s16s), sc0),
                                       _mm256_mullo_epi32(_mm256_loadu_si256((const __m256i *)(s16s + 8)), sc1));
        }
    }
    for (long m = 0; m < M; m++) {
        float xd = x->d[m * (x->K / QK_K) + b];
        __m256 dd = _mm256_set1_ps(d * xd);
        if (type == Q4_K) {
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ah[m]), dd, acc[m]);
        } else {
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ah[m]), _mm256_set1_ps(d * xd * PLANE_BASE), acc[m]);
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(al[m]), dd, acc[m]);
        }
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(offs[m]), _mm256_set1_ps(doff * xd), acc[m]);
    }
}

/* Q4_K or Q6_K rows (x in groups of 256, one per super-block); each row's super-block is unpacked once for all
 * rows of x. */
static inline __attribute__((always_inline)) void dot_k(int type, const uint8_t *const *rows, int R, long K,
                                                      const xq8 *x, long M, float *y, long ldr) {
    const long bb = type == Q4_K ? 144 : 210, nb = K / QK_K;
    const long ahead = AHEAD_GROUPS * R * nb * bb;
    __m256 acc[4][QMAX_ROWS];
    for (int r = 0; r < R; r++)
        for (long m = 0; m < M; m++) acc[r][m] = _mm256_setzero_ps();
    for (long b = 0; b < nb; b++) {
        if (R > 1)
            for (long c = 0; c < R * bb; c += 64) prefetch_l2(rows[0] + ahead + R * b * bb + c);
        for (int r = 0; r < R; r++) {
            const uint8_t *blk = rows[r] + b * bb;
            if (R == 1) {
                for (long c = 0; c < bb; c += 64) prefetch_l2(blk + ahead + c);
                prefetch_l2(blk + ahead + bb - 1);
            }
            dot_superblock(type, blk, x, M, b, acc[r]);
        }
    }
    for (int r = 0; r < R; r++)
        for (long m = 0; m < M; m++) y[r * ldr + m] = hsum_ps(acc[r][m]);
}

#include "quant_avx2_k1.c"

static inline __attribute__((always_inline)) void dot_rows(int type, const uint8_t *const *rows, int R, long K,
                                                         const xq8 *x, long M, float *y, long ldr) {
    if (type == Q8_0 || type == Q4_0) dot_q8q4(type, rows, R, K, x, M, y, ldr);
    else if (type == Q4_K && x->form == 2) dot_q4k_wide(rows, R, K, x, y, ldr);
    else if (type == Q6_K && x->form == 2) dot_q6k_wide(rows, R, K, x, y, ldr);
    else dot_k(type, rows, R, K, x, M, y, ldr);
}

/* x's rows m0.. as an xq8 of their own */
static inline xq8 x_from_row(const xq8 *x, long m0) {
    xq8 v = *x;
    v.q += m0 * x->ld, v.h += m0 * x->ld, v.l += m0 * x->ld;
    v.d += m0 * (x->K / x->G), v.s16 += m0 * (x->K / 16), v.s32 += m0 * (x->K / 32);
    return v;
}

/* out[m * ldy + j] = row j . x[m] for rows j0..j1-1 of one segment (rows rb bytes apart). Rows of x go four at a
 * time (a constant count: their sums stay in registers; all 16 at once spilled them, ~3x slower per row), each
 * group unpacking the weight row again from L1. */
static inline __attribute__((always_inline)) void int_rows(int type, const uint8_t *w, long rb, long K, long j0,
                                                          long j1, const xq8 *x, long M, float *y, long ldy) {
    long j = j0;
    if (M == 1 && type != Q6_K)                        /* (Q6_K streams as fast one row at a time) */
        for (; j + 4 <= j1; j += 4) {
            const uint8_t *rows[4] = {w + j * rb, w + (j + 1) * rb, w + (j + 2) * rb, w + (j + 3) * rb};
            dot_rows(type, rows, 4, K, x, 1, y + j, 1);
        }
    for (; j < j1; j++) {
        const uint8_t *rows[1] = {w + j * rb};
        float out[4];
        long m = 0;
        for (; m + 4 <= M; m += 4) {
            xq8 xs = x_from_row(x, m);
            dot_rows(type, rows, 1, K, &xs, 4, out, 4);
            for (int i = 0; i < 4; i++) y[(m + i) * ldy + j] = out[i];
        }
        for (; m < M; m++) {
            xq8 xs = x_from_row(x, m);
            dot_rows(type, rows, 1, K, &xs, 1, out, 1);
            y[m * ldy + j] = out[0];
        }
    }
}
