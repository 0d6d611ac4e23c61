/* Transposed copies of matrices for loading and paging, included by cpu_decode.c (one translation unit). */

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
