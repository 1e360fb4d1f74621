/* The CPU training step's host work in C: the sparse draw, the entry bookkeeping and the embedding
 * bags of the one-layer loss (cis_lightning/native.py builds this file and calls it by ctypes).
 *
 * Each function is the same computation as a numpy or torch form in the package, and tested against
 * it (tests/test_native.py): cis_active_entries is task._active_entries (the same bits),
 * cis_prepare is fused.drop_empty_rows(merge_single=True) + _Entries.on_host (the same arrays),
 * cis_hidden_cross and cis_feature_grads are the embedding bags of fused._OneLayerLoss (the same
 * sums, in another order).
 * Shapes: K instances, C entries per instance, B samples, n features, m neurons; "stacked" arrays
 * hold the K instances one after another. Single-threaded: the bags run here only below
 * fused.MERGE_SINGLE_FROM samples (K = 1), where a call costs microseconds; a sweep's bookkeeping
 * (cis_prepare) is one pass over its entries. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* rng.uniform_at: 53 bits of mix64(key + counter), as (bits + 0.5) 2^-53 (exact in a double). */
static inline double uniform_at(uint64_t key, int64_t counter) {
    return ((double)(mix64(key + (uint64_t)counter) >> 11) + 0.5) * 0x1p-53;
}

/* task._active_entries on host arrays: row, feature (int64) and value (float) of (K, count), with
 * instance k's key rng.step_key(base, step) = mix64(base[k] ^ step_hash) (step_hash:
 * rng.step_hash(step)). The gaps between active entries of the flattened (B n) batch are geometric,
 * floor(log u / log(1 - p)); entries of other ranks and past the batch become padding (row `local`,
 * feature 0, value 0) at the end, where the stable sort by row of the numpy form puts them. */
void cis_active_entries(int64_t K, const int64_t *base, int64_t step_hash, const double *log1m_p,
                        const int64_t *counters, int64_t count, int64_t total, int64_t n, int64_t local, int64_t rank,
                        int64_t *row, int64_t *feature, float *value) {
    for (int64_t k = 0; k < K; k++) {
        uint64_t key = mix64((uint64_t)base[k] ^ (uint64_t)step_hash);
        int64_t position = -1, kept = 0;
        int64_t *row_k = row + k * count, *feature_k = feature + k * count;
        float *value_k = value + k * count;
        for (int64_t c = 0; c < count; c++) {
            double gap = floor(log(uniform_at(key, counters[c])) / log1m_p[k]);
            position += (int64_t)(gap < (double)total ? gap : (double)total) + 1;
            int64_t r = position / n - rank * local;
            if (r >= 0 && r < local) {
                row_k[kept] = r;
                feature_k[kept] = position % n;
                value_k[kept] = (float)(2.0 * uniform_at(key, counters[count + c]) - 1.0);
                kept++;
            }
        }
        for (int64_t c = kept; c < count; c++) {
            row_k[c] = local;
            feature_k[c] = 0;
            value_k[c] = 0.0f;
        }
    }
}

/* fused.drop_empty_rows(x, sources=False, merge_single=True) then _Entries.on_host: the entries of
 * the non-empty samples of K instances, grouped by row and by feature. In: row, feature (K, C)
 * sorted by row per instance (padding row B last), value (K, C). The single-feature samples of each
 * (instance, feature, sign) become one of value sign sqrt(sum v^2) (the others 0, their rows
 * dropped), and only the first W = min(C, the most real entries of any instance rounded up to 64,
 * at least 64) columns are kept. Returns R, the rows kept per instance (the most
 * kept samples of any instance rounded up to 64, at most B), and sets *width = W; the stacked
 * outputs then use K (R + 1) rows (row R of each instance: padding), K n features, K W entries:
 *   feature_out, row_out, value_out, relu_out (K W): the entries in their order, stacked ids;
 *   row_start (K (R + 1)), u_sq (K (R + 1)): each row's first entry, and ||ReLU(x_b)||^2;
 *   row_by_feature, value_by_feature, relu_by_feature (K W): the entries stably sorted by feature;
 *   feature_start (K n); counts (K n, scratch).
 * They lie one after another, in that order, in two arenas (so that the caller allocates two arrays,
 * not eleven): ints (3 K C + 2 K n + K (B + 1)) holds feature_out, row_out, row_by_feature,
 * feature_start, counts and row_start; floats (4 K C + K (B + 1)) holds value_out, relu_out,
 * value_by_feature, relu_by_feature and u_sq. Returns -1 if scratch memory runs out. */
int64_t cis_prepare(int64_t K, int64_t C, int64_t B, int64_t n, const int64_t *row, const int64_t *feature,
                    const float *value, int64_t *width, int64_t *ints, float *floats) {
    int64_t most_real = 0;
    for (int64_t k = 0; k < K; k++) {
        int64_t c = 0;
        while (c < C && row[k * C + c] < B) c++;
        if (c > most_real) most_real = c;
    }
    int64_t W = (most_real + 63) / 64 * 64;
    if (W < 64) W = 64;
    if (W > C) W = C;
    *width = W;
    int64_t *feature_out = ints, *row_out = ints + K * W, *row_by_feature = ints + 2 * K * W;
    int64_t *feature_start = ints + 3 * K * W, *counts = feature_start + K * n, *row_start = counts + K * n;
    float *value_out = floats, *relu_out = floats + K * W, *value_by_feature = floats + 2 * K * W;
    float *relu_by_feature = floats + 3 * K * W, *u_sq = floats + 4 * K * W;
    /* Kept rows start at an entry whose row differs from the previous entry's; merged-away ones do not. */
    unsigned char *starts_row = malloc((size_t)(K * W) + 1);
    double *square_sum = calloc((size_t)(K * 2 * n) + 1, sizeof(double));
    int64_t *keeper = malloc(((size_t)(K * 2 * n) + 1) * sizeof(int64_t));
    if (starts_row == NULL || square_sum == NULL || keeper == NULL) {
        free(starts_row);
        free(square_sum);
        free(keeper);
        return -1;
    }
    for (int64_t k = 0; k < K; k++) {
        const int64_t *r = row + k * C;
        for (int64_t c = 0; c < W; c++) {
            starts_row[k * W + c] = r[c] < B && (c == 0 || r[c] != r[c - 1]);
            value_out[k * W + c] = value[k * C + c];
        }
    }
    /* The single-feature samples: sums of squares per cell, in entry order; the last one keeps. */
    for (int64_t pass = 0; pass < 2; pass++) {
        for (int64_t k = 0; k < K; k++) {
            const int64_t *r = row + k * C, *f = feature + k * C;
            for (int64_t c = 0; c < W; c++) {
                int64_t i = k * W + c;
                int alone = starts_row[i] && (c == W - 1 || r[c + 1] != r[c]);
                if (!alone) continue;
                float v = value_out[i];
                int64_t cell = k * 2 * n + 2 * f[c] + (v < 0.0f);
                if (pass == 0) {
                    square_sum[cell] += (double)v * (double)v;
                    keeper[cell] = i;
                } else if (keeper[cell] == i) {
                    value_out[i] = (float)copysign(sqrt(square_sum[cell]), (double)v);
                } else {
                    value_out[i] = 0.0f;
                    starts_row[i] = 0; /* merged away: it stays, value 0, in the row before it */
                }
            }
        }
    }
    int64_t most = 0;
    for (int64_t k = 0; k < K; k++) {
        int64_t rows = 0;
        for (int64_t c = 0; c < W; c++) rows += starts_row[k * W + c];
        if (rows > most) most = rows;
    }
    int64_t R = (most + 63) / 64 * 64;
    if (R > B) R = B;
    if (K * C == 0) R = 0;
    int64_t stride = R + 1;
    memset(counts, 0, (size_t)(K * n) * sizeof(int64_t));
    for (int64_t j = 0; j < K * stride; j++) row_start[j] = 0; /* counts first, then starts */
    for (int64_t k = 0; k < K; k++) {
        const int64_t *r = row + k * C, *f = feature + k * C;
        int64_t kept = 0;
        for (int64_t c = 0; c < W; c++) {
            int64_t i = k * W + c;
            kept += starts_row[i];
            int64_t out_row = k * stride + (r[c] < B ? (kept > 0 ? kept - 1 : 0) : R);
            row_out[i] = out_row;
            feature_out[i] = k * n + f[c];
            relu_out[i] = value_out[i] > 0.0f ? value_out[i] : 0.0f;
            row_start[out_row]++;
            counts[k * n + f[c]]++;
        }
    }
    free(starts_row);
    free(square_sum);
    free(keeper);
    /* ||ReLU(x_b)||^2 per row, summed in float64 in entry order (numpy's bincount), then float. */
    int64_t entry = 0;
    for (int64_t j = 0; j < K * stride; j++) {
        double sum = 0.0;
        int64_t first = entry, end = entry + row_start[j];
        for (; entry < end; entry++) sum += (double)relu_out[entry] * (double)relu_out[entry];
        row_start[j] = first;
        u_sq[j] = (float)sum;
    }
    int64_t start = 0;
    for (int64_t g = 0; g < K * n; g++) {
        feature_start[g] = start;
        start += counts[g];
        counts[g] = feature_start[g]; /* the next free slot of group g */
    }
    for (int64_t i = 0; i < K * W; i++) {
        int64_t slot = counts[feature_out[i]]++;
        row_by_feature[slot] = row_out[i];
        value_by_feature[slot] = value_out[i];
        relu_by_feature[slot] = relu_out[i];
    }
    return R;
}

/* The forward's bags by row, with the ReLU: for every stacked row j of instance k (c: its entries),
 *   h_j = ReLU(sum_c value_c at[feature_c]),  q_j = sum_c (relu_c w[feature_c] + value_c t[feature_c])
 *   u_j = sum_c value_c rt[feature_c] + ReLU(x_j)   (the labels; without rt, u_j = ReLU(x_j))
 * and labels[k] = sum over instance k's rows of ||u_j||^2 - 2 h_j . q_j. at = A^T, w, t = R^T W
 * stacked (K n, m); rt = R^T stacked (K n, n). t and rt may be NULL (labels without R x), and u
 * (K rows, n) too (u not kept). */
void cis_hidden_cross(int64_t K, int64_t rows_per_instance, int64_t m, int64_t n, int64_t n_entries,
                      const int64_t *row_start, const int64_t *feature, const float *value, const float *relu,
                      const float *at, const float *w, const float *t, const float *rt, float *h, float *q, float *u,
                      float *labels) {
    int64_t n_rows = K * rows_per_instance;
    float scratch[rt != NULL && u == NULL ? n : 1];
    for (int64_t k = 0; k < K; k++) {
        double sum = 0.0;
        for (int64_t j = k * rows_per_instance; j < (k + 1) * rows_per_instance; j++) {
            int64_t start = row_start[j], end = j + 1 < n_rows ? row_start[j + 1] : n_entries;
            float *restrict h_j = h + j * m, *restrict q_j = q + j * m;
            float *restrict u_j = u != NULL ? u + j * n : scratch;
            if (start == end) { /* an empty (filler or padding) row */
                memset(h_j, 0, (size_t)m * sizeof(float));
                memset(q_j, 0, (size_t)m * sizeof(float));
                if (u != NULL) memset(u_j, 0, (size_t)n * sizeof(float));
                continue;
            }
            for (int64_t c = start; c < end; c++) {
                const float *restrict a_f = at + feature[c] * m, *restrict w_f = w + feature[c] * m;
                float v = value[c], r = relu[c];
                if (c == start) { /* the first entry sets the row (most rows have one) */
                    for (int64_t i = 0; i < m; i++) {
                        h_j[i] = v * a_f[i];
                        q_j[i] = r * w_f[i];
                    }
                } else {
                    for (int64_t i = 0; i < m; i++) {
                        h_j[i] += v * a_f[i];
                        q_j[i] += r * w_f[i];
                    }
                }
                if (t != NULL) {
                    const float *restrict t_f = t + feature[c] * m;
                    for (int64_t i = 0; i < m; i++) q_j[i] += v * t_f[i];
                }
            }
            float dot = 0.0f, u_sq = 0.0f;
#pragma omp simd reduction(+ : dot) /* partial sums in SIMD lanes (-fopenmp-simd), not one chain */
            for (int64_t i = 0; i < m; i++) {
                h_j[i] = h_j[i] > 0.0f ? h_j[i] : 0.0f;
                dot += h_j[i] * q_j[i];
            }
            if (rt != NULL) {
                for (int64_t c = start; c < end; c++) {
                    const float *restrict rt_f = rt + feature[c] * n;
                    float v = value[c];
                    if (c == start) {
                        for (int64_t i = 0; i < n; i++) u_j[i] = v * rt_f[i];
                    } else {
                        for (int64_t i = 0; i < n; i++) u_j[i] += v * rt_f[i];
                    }
                }
                for (int64_t c = start; c < end; c++) u_j[feature[c] - k * n] += relu[c];
#pragma omp simd reduction(+ : u_sq)
                for (int64_t i = 0; i < n; i++) u_sq += u_j[i] * u_j[i];
            } else { /* ||ReLU(x_j)||^2: the entries of a sample are distinct features */
                for (int64_t c = start; c < end; c++) u_sq += relu[c] * relu[c];
            }
            sum += (double)u_sq - 2.0 * (double)dot;
        }
        labels[k] = (float)sum;
    }
}

/* The backward's bags by feature, with G h - q and the ReLU's mask: for every stacked feature f of
 * instance k, over the entries c of f (r their rows),
 *   grad_a[k, :, f] = scale_k sum_c value_c [h_r > 0] (gh_r - q_r),  grad_w[f] = scale_k sum_c relu_c h_r,
 *   grad_t[f] = scale_k sum_c value_c h_r   (if grad_t is not NULL: labels with R x)
 * with gh = h G (torch's bmm). grad_a (K, m, n) as A is laid out (so that autograd keeps it as it is),
 * grad_w and grad_t (K n, m). */
void cis_feature_grads(int64_t K, int64_t n, int64_t m, int64_t n_entries, const int64_t *feature_start,
                       const int64_t *row_by_feature, const float *value_by_feature, const float *relu_by_feature,
                       const float *scale, const float *gh, const float *q, const float *h, float *grad_a,
                       float *grad_w, float *grad_t) {
    int64_t n_groups = K * n;
    float ga[m];
    for (int64_t k = 0; k < K; k++) {
        float s = scale[k];
        for (int64_t f = k * n; f < (k + 1) * n; f++) {
            int64_t end = f + 1 < n_groups ? feature_start[f + 1] : n_entries;
            float *restrict gw = grad_w + f * m;
            for (int64_t i = 0; i < m; i++) ga[i] = gw[i] = 0.0f;
            float *restrict gt = grad_t != NULL ? grad_t + f * m : NULL;
            if (gt != NULL)
                for (int64_t i = 0; i < m; i++) gt[i] = 0.0f;
            for (int64_t c = feature_start[f]; c < end; c++) {
                int64_t r = row_by_feature[c] * m;
                const float *restrict gh_r = gh + r, *restrict q_r = q + r, *restrict h_r = h + r;
                float v = value_by_feature[c], u = relu_by_feature[c];
                for (int64_t i = 0; i < m; i++) {
                    ga[i] += h_r[i] > 0.0f ? v * (gh_r[i] - q_r[i]) : 0.0f;
                    gw[i] += u * h_r[i];
                }
                if (gt != NULL)
                    for (int64_t i = 0; i < m; i++) gt[i] += v * h_r[i];
            }
            float *restrict ga_f = grad_a + k * m * n + (f - k * n);
            for (int64_t i = 0; i < m; i++) {
                ga_f[i * n] = s * ga[i];
                gw[i] *= s;
            }
            if (gt != NULL)
                for (int64_t i = 0; i < m; i++) gt[i] *= s;
        }
    }
}
