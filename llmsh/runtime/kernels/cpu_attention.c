/* RoPE and attention over the KV cache (with its write), included by cpu_decode.c (one translation unit). */

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
