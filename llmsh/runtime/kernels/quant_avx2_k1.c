/* The K-quants' products at one row of x (decode at batch 1) with AVX2, from x in form 2 (int16, each 32 as its
 * even elements then its odd ones): included by quant_avx2.c, whose helpers (pair_sum, pair_join, hsum_ps,
 * prefetch_l2) they use. Why int16 and not the two planes: quant_avx2.c's opening comment. */

/* The bb bytes of a block (a row's super-block) at p, on their way to L2 */
static inline void prefetch_block(const uint8_t *p, long bb) {
    for (long c = 0; c < bb; c += 64) prefetch_l2(p + c);
    prefetch_l2(p + bb - 1);
}

/* y[r * ldr] = row r . x for R rows of Q4_K and one row of x in form 2 (int16, each 32 as evens then odds). The
 * quants are widened to int16 by masks and shifts of 16-bit words (word i of a 32-byte run: nibbles of weights 2i
 * and 2i + 1 of one sub-block, and of the next sub-block in its high nibbles), multiplied with x by vpmaddwd, 16
 * weights an instruction; the planes took two vpmaddubsw and two vpmaddwd per 32 weights, this takes two
 * vpmaddwd. Each sub-block's products stay apart (one lane each, pair_sum and pair_join) until its scale and
 * min apply as one vector per super-block, in integers: at most 32 x 15 x 32385 x 63 ~ 9.8e8 a lane. */
static inline __attribute__((always_inline)) void dot_q4k_wide(const uint8_t *const *rows, int R, long K,
                                                             const xq8 *x, float *y, long ldr) {
    const long bb = 144, nb = K / QK_K;
    const long ahead = AHEAD_GROUPS * nb * bb;          /* (R rows are one run: this prefetches four rows on) */
    const __m256i low4 = _mm256_set1_epi16(0x000F), high4 = _mm256_set1_epi16(0x00F0);
    for (int r = 0; r < R; r++) {      /* a row at a time: its sums stay in registers (x is in L1 for all rows) */
        __m256 acc = _mm256_setzero_ps(), acc_min = _mm256_setzero_ps();
        for (long b = 0; b < nb; b++) {
            const uint8_t *blk = rows[r] + b * bb;
            prefetch_block(blk + ahead, bb);
            const int16_t *xb = x->q + QK_K * b;
            __m256i p[4];
            for (int j = 0; j < 4; j++) {    /* 32 bytes: low nibbles sub-block 2j, high ones 2j + 1 */
                __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * j));
                __m256i v8 = _mm256_srli_epi16(v, 8);
                const __m256i *xj = (const __m256i *)(xb + 64 * j);
                __m256i s0 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(v, low4), _mm256_loadu_si256(xj)),
                                              _mm256_madd_epi16(_mm256_and_si256(v8, low4), _mm256_loadu_si256(xj + 1)));
                __m256i s1 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(v, high4), _mm256_loadu_si256(xj + 2)),
                                              _mm256_madd_epi16(_mm256_and_si256(v8, high4), _mm256_loadu_si256(xj + 3)));
                p[j] = pair_sum(s0, s1);
            }
            __m256i q03 = pair_join(p[0], p[1]), q47 = pair_join(p[2], p[3]);   /* half-sums of sub-blocks */
            __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(q03, q47, 0x20),
                                            _mm256_permute2x128_si256(q03, q47, 0x31));
            sums = _mm256_srav_epi32(sums, _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4));   /* (16 n: exact) */
            __m128i raw = _mm_loadu_si128((const __m128i *)blk);            /* d, dmin, the 12 bytes of scales */
            __m128i sc = q4k_scales(raw);                                     /* sc 0..7, m 0..7 */
            __m256i scaled = _mm256_mullo_epi32(sums, _mm256_cvtepu8_epi32(sc));
            __m256i offs = _mm256_mullo_epi32(_mm256_loadu_si256((const __m256i *)(x->s32 + 8 * b)),
                                              _mm256_cvtepu8_epi32(_mm_srli_si128(sc, 8)));
            __m128 dd = _mm_mul_ps(_mm_cvtph_ps(raw), _mm_set1_ps(x->d[b]));    /* d xd, dmin xd */
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(scaled), _mm256_broadcastss_ps(dd), acc);
            acc_min = _mm256_fmadd_ps(_mm256_cvtepi32_ps(offs), _mm256_broadcastss_ps(_mm_movehdup_ps(dd)), acc_min);
        }
        y[r * ldr] = hsum_ps(_mm256_sub_ps(acc, acc_min));
    }
}

/* y[r * ldr] = row r . x for R rows of Q6_K and one row of x in form 2, as dot_q4k_wide: each 32 quants built as
 * bytes (4 low bits, 2 high), then their even and odd bytes as int16 words (a mask, a shift) for vpmaddwd. Sixteen
 * scales of 16 weights: a 32-weight run's products hold its first 16 in the low half of the vector, its next 16 in
 * the high half, so the joined sums come in sub-block order 0 2 4 6 1 3 5 7 (and 8 ..), and the scales are put in
 * that order to meet them. A sub-block's sum reaches 16 x 63 x 32385 ~ 3.3e7, times a scale (|s| <= 128) more than
 * int32 holds: the scales apply in floats. The -32 offset: the scales against x's sums of 16, as in dot_superblock. */
static inline __attribute__((always_inline)) void dot_q6k_wide(const uint8_t *const *rows, int R, long K,
                                                             const xq8 *x, float *y, long ldr) {
    const long bb = 210, nb = K / QK_K;
    const long ahead = AHEAD_GROUPS * nb * bb;
    const __m256i low4 = _mm256_set1_epi8(0x0F), bits45 = _mm256_set1_epi8(0x30), low8 = _mm256_set1_epi16(0x00FF);
    const __m128i sub_order = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
    for (int r = 0; r < R; r++) {
        __m256 acc = _mm256_setzero_ps(), acc_off = _mm256_setzero_ps();
        for (long b = 0; b < nb; b++) {
            const uint8_t *blk = rows[r] + b * bb;
            prefetch_block(blk + ahead, bb);
            const int16_t *xb = x->q + QK_K * b;
            __m256i p[4];
            for (int n = 0; n < 2; n++) {    /* 128 weights: ql 64 bytes, qh 32 bytes */
                __m256i L0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * n));
                __m256i L1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * n + 32));
                __m256i H = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * n));
                __m256i w[4], sums[4];
                w[0] = _mm256_or_si256(_mm256_and_si256(L0, low4), _mm256_and_si256(_mm256_slli_epi16(H, 4), bits45));
                w[1] = _mm256_or_si256(_mm256_and_si256(L1, low4), _mm256_and_si256(_mm256_slli_epi16(H, 2), bits45));
                w[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(L0, 4), low4), _mm256_and_si256(H, bits45));
                w[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(L1, 4), low4),
                                       _mm256_and_si256(_mm256_srli_epi16(H, 2), bits45));
                for (int i = 0; i < 4; i++) {  /* weights 128 n + 32 i ..: even ones, then odd ones */
                    const __m256i *xr = (const __m256i *)(xb + 128 * n + 32 * i);
                    sums[i] = _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(w[i], low8), _mm256_loadu_si256(xr)),
                                               _mm256_madd_epi16(_mm256_srli_epi16(w[i], 8), _mm256_loadu_si256(xr + 1)));
                }
                p[2 * n] = pair_sum(sums[0], sums[1]);
                p[2 * n + 1] = pair_sum(sums[2], sums[3]);
            }
            __m128i s8 = _mm_loadu_si128((const __m128i *)(blk + 192)), so = _mm_shuffle_epi8(s8, sub_order);
            __m256 dd = _mm256_set1_ps(f16_to_f32(rd16(blk + 208)) * x->d[b]);
            __m256 f0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(so)), dd);
            __m256 f1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(so, 8))), dd);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pair_join(p[0], p[1])), f0, acc);     /* sub-blocks 0 .. 7 */
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pair_join(p[2], p[3])), f1, acc);     /* 8 .. 15 */
            const int32_t *s16s = x->s16 + 16 * b;
            __m256i offs = _mm256_add_epi32(
                _mm256_mullo_epi32(_mm256_loadu_si256((const __m256i *)s16s), _mm256_cvtepi8_epi32(s8)),
                _mm256_mullo_epi32(_mm256_loadu_si256((const __m256i *)(s16s + 8)),
                                   _mm256_cvtepi8_epi32(_mm_srli_si128(s8, 8))));
            acc_off = _mm256_fmadd_ps(_mm256_cvtepi32_ps(offs), dd, acc_off);
        }
        y[r * ldr] = hsum_ps(_mm256_fnmadd_ps(acc_off, _mm256_set1_ps(32.0f), acc));
    }
}
