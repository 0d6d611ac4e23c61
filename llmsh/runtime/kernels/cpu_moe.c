/* A mixture-of-experts layer's pieces (attention half, routing, one expert), included by cpu_decode.c (one
 * translation unit). */

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
