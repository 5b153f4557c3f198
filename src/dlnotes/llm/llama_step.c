/* One llama decoding step in C for x86 CPUs with AVX2, FMA and F16C: the whole token (every layer, the output
 * matrix) in one call, on the GGUF file's own 4- and 8-bit blocks, with fp32 activations and sums.
 * dlnotes/llm/native.py builds this file with the system's C compiler, packs the weights and calls
 * `llama_step`; LlamaDecoder uses it where it builds and runs (native.py says why and what it measured).
 *
 * Formats (one block = 32 consecutive weights of a row, K along the row):
 *   Q4_1  weight = d * q + m, q in 0..15; per block 16 bytes (byte j: q of k = j low, q of k = j + 16 high),
 *         d and m fp16 in arrays of their own
 *   Q8_0  weight = d * q, q in -127..127; per block 32 bytes, d fp16
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 32

typedef struct {
    const uint8_t *q;   /* (N, K/2) nibbles */
    const uint16_t *d;  /* (N, K/32) fp16 */
    const uint16_t *m;  /* (N, K/32) fp16 */
} Q41;

typedef struct {
    const int8_t *q;    /* (N, K) */
    const uint16_t *d;  /* (N, K/32) fp16 */
} Q80;

/* Everything one step reads; the layer arrays hold every layer one after the other (same shapes). */
typedef struct {
    int layers, dim, ffn, heads, kv_heads, head_dim, vocab, threads;  /* ffn: the MLP's width F */
    float eps;
    const float *embed;       /* (V, D) */
    const float *attn_norm;   /* (L, D) */
    const float *mlp_norm;    /* (L, D) */
    const float *norm;        /* (D,) */
    Q41 qkv, o, gate_up, down; /* per layer: ((H + 2 KV) hd, D), (D, H hd), (2 F, D), (D, F) */
    Q80 lm_head;              /* (V, D) */
} Model;

static float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* y (N,) = w (N, K) x, rows split between the threads. Per block, sum(q x) in 8 fp32 lanes, then
 * d * sum(q x) + m * sum(x): each weight becomes a float once, scales are applied per block */
static void matvec_q41(Q41 w, int n, int k, const float *x, float *y, int threads) {
    const int blocks = k / BLOCK;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int row = 0; row < n; row++) {
        const uint8_t *q = w.q + (size_t)row * k / 2;
        const uint16_t *d = w.d + (size_t)row * blocks, *m = w.m + (size_t)row * blocks;
        __m256 acc = _mm256_setzero_ps(), xsum = _mm256_setzero_ps();
        for (int b = 0; b < blocks; b++) {
            const float *xb = x + b * BLOCK;
            __m256 part = _mm256_setzero_ps(), xs = _mm256_setzero_ps();
            for (int j = 0; j < 2; j++) {  /* bytes 8j..8j+7: weights 8j.. low, 16+8j.. high */
                __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + b * 16 + 8 * j)));
                __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, _mm256_set1_epi32(15)));
                __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
                __m256 xlo = _mm256_loadu_ps(xb + 8 * j), xhi = _mm256_loadu_ps(xb + 16 + 8 * j);
                part = _mm256_fmadd_ps(lo, xlo, _mm256_fmadd_ps(hi, xhi, part));
                xs = _mm256_add_ps(xs, _mm256_add_ps(xlo, xhi));
            }
            acc = _mm256_fmadd_ps(part, _mm256_set1_ps(_cvtsh_ss(d[b])), acc);
            xsum = _mm256_fmadd_ps(xs, _mm256_set1_ps(_cvtsh_ss(m[b])), xsum);
        }
        y[row] = hsum(_mm256_add_ps(acc, xsum));
    }
}

/* The same for Q8_0 rows: y = sum over blocks of d * sum(q x) */
static void matvec_q80(Q80 w, int n, int k, const float *x, float *y, int threads) {
    const int blocks = k / BLOCK;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int row = 0; row < n; row++) {
        const int8_t *q = w.q + (size_t)row * k;
        const uint16_t *d = w.d + (size_t)row * blocks;
        __m256 acc = _mm256_setzero_ps();
        for (int b = 0; b < blocks; b++) {
            __m256 part = _mm256_setzero_ps();
            for (int j = 0; j < 4; j++) {  /* 8 weights at a time, as floats */
                __m128i bytes = _mm_loadl_epi64((const __m128i *)(q + b * BLOCK + 8 * j));
                __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
                part = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + b * BLOCK + 8 * j), part);
            }
            acc = _mm256_fmadd_ps(part, _mm256_set1_ps(_cvtsh_ss(d[b])), acc);
        }
        y[row] = hsum(acc);
    }
}

static void rms_norm(float *out, const float *x, const float *w, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float scale = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * scale * w[i];
}

/* RoPE on one head: the pairs (i, i + hd/2) rotate; `sin` has its first half negated (decoders.py) */
static void rope(float *x, const float *cos, const float *sin, int hd) {
    int half = hd / 2;
    for (int i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] + b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* Each query head attends over positions 0..pos of its key/value head; cache rows are (KV, hd) per position */
static void attention(const Model *M, const float *q, const float *keys, const float *values, int positions,
                      float *scores, float *out) {
    const int hd = M->head_dim, kv = M->kv_heads, group = M->heads / M->kv_heads;
    const float scale = 1.0f / sqrtf((float)hd);
    #pragma omp parallel for num_threads(M->threads) schedule(static)
    for (int h = 0; h < M->heads; h++) {
        const float *qh = q + h * hd;
        const int g = h / group;
        float *s = scores + (size_t)h * positions, best = -INFINITY, total = 0.0f;
        for (int t = 0; t < positions; t++) {
            const float *k = keys + ((size_t)t * kv + g) * hd;
            float dot = 0.0f;
            for (int i = 0; i < hd; i++) dot += qh[i] * k[i];
            s[t] = dot * scale;
            best = fmaxf(best, s[t]);
        }
        for (int t = 0; t < positions; t++) {
            s[t] = expf(s[t] - best);
            total += s[t];
        }
        float *oh = out + h * hd;
        for (int i = 0; i < hd; i++) oh[i] = 0.0f;
        for (int t = 0; t < positions; t++) {
            const float *v = values + ((size_t)t * kv + g) * hd, p = s[t] / total;
            for (int i = 0; i < hd; i++) oh[i] += p * v[i];
        }
    }
}

/* Scratch space the caller allocates: scratch_floats(M, max_len) floats */
int scratch_floats(const Model *M, int max_len) {
    int qkv = (M->heads + 2 * M->kv_heads) * M->head_dim, widest = 2 * M->ffn;
    return 3 * M->dim + qkv + M->heads * M->head_dim + widest + M->heads * max_len;
}

/* Token `token` at position `pos`, whose RoPE rows are `cos` and `sin` (hd,): its keys and values go into `cache`
 * (L, 2, max_len, KV, hd); the logits (V,) of the next token into `logits`. */
void llama_step(const Model *M, int token, int pos, const float *cos, const float *sin, float *cache, int max_len,
                float *logits, float *scratch) {
    const int D = M->dim, F = M->ffn, H = M->heads, KV = M->kv_heads, hd = M->head_dim;
    const int qkv_rows = (H + 2 * KV) * hd, widest = 2 * F;
    float *x = scratch, *normed = x + D, *delta = normed + D, *qkv = delta + D, *att = qkv + qkv_rows;
    float *wide = att + H * hd, *scores = wide + widest;
    const size_t layer_cache = (size_t)2 * max_len * KV * hd;

    memcpy(x, M->embed + (size_t)token * D, D * sizeof(float));
    for (int l = 0; l < M->layers; l++) {
        float *keys = cache + l * layer_cache, *values = keys + (size_t)max_len * KV * hd;
        Q41 qkv_w = {M->qkv.q + (size_t)l * qkv_rows * D / 2, M->qkv.d + (size_t)l * qkv_rows * D / BLOCK,
                     M->qkv.m + (size_t)l * qkv_rows * D / BLOCK};
        Q41 o_w = {M->o.q + (size_t)l * D * H * hd / 2, M->o.d + (size_t)l * D * H * hd / BLOCK,
                   M->o.m + (size_t)l * D * H * hd / BLOCK};
        Q41 gu_w = {M->gate_up.q + (size_t)l * widest * D / 2, M->gate_up.d + (size_t)l * widest * D / BLOCK,
                    M->gate_up.m + (size_t)l * widest * D / BLOCK};
        Q41 down_w = {M->down.q + (size_t)l * D * F / 2, M->down.d + (size_t)l * D * F / BLOCK,
                      M->down.m + (size_t)l * D * F / BLOCK};

        rms_norm(normed, x, M->attn_norm + l * D, D, M->eps);
        matvec_q41(qkv_w, qkv_rows, D, normed, qkv, M->threads);
        for (int h = 0; h < H + KV; h++) rope(qkv + h * hd, cos, sin, hd);  /* the query and key heads */
        memcpy(keys + (size_t)pos * KV * hd, qkv + H * hd, KV * hd * sizeof(float));
        memcpy(values + (size_t)pos * KV * hd, qkv + (H + KV) * hd, KV * hd * sizeof(float));
        attention(M, qkv, keys, values, pos + 1, scores, att);
        matvec_q41(o_w, D, H * hd, att, delta, M->threads);
        for (int i = 0; i < D; i++) x[i] += delta[i];

        rms_norm(normed, x, M->mlp_norm + l * D, D, M->eps);
        matvec_q41(gu_w, widest, D, normed, wide, M->threads);
        for (int i = 0; i < F; i++) {
            float gate = wide[i];
            wide[i] = gate / (1.0f + expf(-gate)) * wide[F + i];  /* SiLU(gate) * up */
        }
        matvec_q41(down_w, D, F, wide, delta, M->threads);
        for (int i = 0; i < D; i++) x[i] += delta[i];
    }
    rms_norm(normed, x, M->norm, D, M->eps);
    matvec_q80(M->lm_head, M->vocab, D, normed, logits, M->threads);
}
