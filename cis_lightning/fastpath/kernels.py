"""The fast path's host kernels, compiled by numba: the grouping of a batch's entries, and the labels' norms.

`group_entries` is `loss.drop_empty_rows` followed by `loss._Entries.on_host` (their numpy forms are
the specification): it drops the empty samples, merges single-feature samples for a batch mean, and
groups the entries by row and by feature. numpy does that in a dozen passes over the entries, each
with its own temporaries (argsort, cumsum, bincount, fancy indexing); here it is a few loops over
(K, C) arrays. The arrays are the same bit for bit (the float sums run in the same order, in float64
as numpy's bincount does): tests/fastpath/test_kernels.py checks it on random and edge-case batches.

`label_square_sums` is sum_b ||R x_b + ReLU(x_b)||^2 per instance from the pairs of entries in each
row, which a batch mean against fixed labels R x + ReLU(x) needs (and nothing else of R x); its
specification is the dense labels' norm, to rounding (its dot products are vectorised).

numba is optional: without it, or with CIS_NUMBA=0 in the environment, `ENABLED` is False and the
loss groups its entries with numpy and makes R x with embedding bags. With it, each kernel is
compiled at its first call and cached on disk (`cache=True`) for later processes.
"""

from __future__ import annotations

import contextlib
import math
import os

import numpy as np

numba = None
if os.environ.get("CIS_NUMBA", "1") != "0":  # not even imported when off (LLVM costs resident memory)
    with contextlib.suppress(ImportError):  # numba is optional: the numpy form does the same
        import numba

# Read by the loss at every call, so that tests (or a user) can switch it at run time.
ENABLED = numba is not None


def _compiled(function=None, *, fastmath=False):
    """`function` compiled by numba (nopython, cached on disk), or as it is without numba. fastmath
    lets LLVM reorder float sums (vectorised dot products): only for a kernel whose contract is the
    reference's values to rounding, not its bits."""
    if function is None:
        return lambda f: _compiled(f, fastmath=fastmath)
    return function if numba is None else numba.njit(cache=True, nogil=True, fastmath=fastmath)(function)


@_compiled
def group_entries(row, feature, value, batch_size, n_features, merge_single, sources):  # pragma: no cover (numba)
    """The entries of the non-empty samples of K instances, grouped for `loss._Entries`.

    In: row, feature (K, C) int64, row sorted per instance with the padding entries (row B) last;
    value (K, C) float; B = batch_size, n = n_features. merge_single: for a batch mean, merge the
    single-feature samples of each (instance, feature, sign) into one of value sign sqrt(sum v^2) and
    keep only the first W columns (the most real entries of any instance rounded up to 64, at least
    64, at most C; else W = C). sources: also say which sample each compact row is.

    Returns (R, W, feature, row, value, relu_value, row_start, row_by_feature, value_by_feature,
    relu_value_by_feature, feature_start, u_sq, instance_by_feature, position_in_rows, rows) with R
    the kept rows per instance (the most of any instance rounded up to 64, at most B), entries
    stacked (K W,) with ids of K (R + 1) rows and K n features, row_start (K (R + 1)), feature_start
    (K n), u_sq (K (R + 1)), and rows (K, R) the source sample of each compact row (B for filler;
    (K, 0) unless sources).
    """
    k, c = row.shape
    b, n = batch_size, n_features
    width = c
    if merge_single:
        most_real = 0
        for i in range(k):
            count = 0
            for j in range(c):
                count += row[i, j] < b
            most_real = max(most_real, count)
        width = min(c, max(64, -(-most_real // 64) * 64))
    # first[i, j]: entry j starts a kept sample (a real one, not merged away).
    first = np.zeros((k, width), dtype=np.bool_)
    for i in range(k):
        for j in range(width):
            first[i, j] = j == 0 or row[i, j] != row[i, j - 1]
    merged = value[:, :width].copy()
    if merge_single:
        square_sum = np.zeros(k * 2 * n)
        keeper = np.zeros(k * 2 * n, dtype=np.int64)
        single = np.zeros((k, width), dtype=np.bool_)
        for i in range(k):
            for j in range(width):
                last = j == width - 1 or row[i, j + 1] != row[i, j]
                if first[i, j] and last and row[i, j] < b:
                    single[i, j] = True
                    v = merged[i, j]
                    cell = i * 2 * n + 2 * feature[i, j] + (v < 0)
                    square_sum[cell] += np.float64(v) * np.float64(v)
                    keeper[cell] = i * width + j  # the last entry of a cell carries it
        for i in range(k):
            for j in range(width):
                if single[i, j]:
                    v = merged[i, j]
                    cell = i * 2 * n + 2 * feature[i, j] + (v < 0)
                    if keeper[cell] == i * width + j:
                        merged[i, j] = math.copysign(math.sqrt(square_sum[cell]), v)
                    else:
                        merged[i, j] = 0
                        first[i, j] = False  # merged away: it stays, value 0, in the row before it
    most_kept = 0
    for i in range(k):
        count = 0
        for j in range(width):
            first[i, j] = first[i, j] and row[i, j] < b
            count += first[i, j]
        most_kept = max(most_kept, count)
    n_rows = min(b, -(-most_kept // 64) * 64) if k * width > 0 else 0
    stride = n_rows + 1
    rows = np.full((k, n_rows if sources else 0), b, dtype=row.dtype)
    size = k * width
    feature_out = np.empty(size, dtype=np.int64)
    row_out = np.empty(size, dtype=np.int64)
    relu_value = np.empty(size, dtype=value.dtype)
    position = np.empty(size, dtype=np.int64)
    row_start = np.zeros(k * stride, dtype=np.int64)  # counts first, then starts
    feature_start = np.zeros(k * n, dtype=np.int64)
    u_sq = np.zeros(k * stride)
    for i in range(k):
        kept = 0
        for j in range(width):
            e = i * width + j
            kept += first[i, j]
            local_row = (kept - 1 if kept > 0 else 0) if row[i, j] < b else n_rows
            if sources and first[i, j]:
                rows[i, local_row] = row[i, j]
            row_out[e] = i * stride + local_row
            feature_out[e] = i * n + feature[i, j]
            position[e] = row_out[e] * n + feature[i, j]
            v = merged[i, j]
            relu_value[e] = 0 if v <= 0 else v  # np.maximum(v, 0): NaN stays, -0.0 becomes 0
            u_sq[row_out[e]] += np.float64(relu_value[e]) * np.float64(relu_value[e])
            row_start[row_out[e]] += 1
            feature_start[feature_out[e]] += 1
    _exclusive_cumsum(row_start)
    _exclusive_cumsum(feature_start)
    # Stable counting sort by feature: instance i's entries stay the i-th block of `width`.
    slot = feature_start.copy()
    row_by_feature = np.empty(size, dtype=np.int64)
    value_flat = merged.reshape(size)
    value_by_feature = np.empty(size, dtype=value.dtype)
    relu_by_feature = np.empty(size, dtype=value.dtype)
    for e in range(size):
        s = slot[feature_out[e]]
        slot[feature_out[e]] = s + 1
        row_by_feature[s] = row_out[e]
        value_by_feature[s] = value_flat[e]
        relu_by_feature[s] = relu_value[e]
    instance_by_feature = np.empty(size, dtype=np.int64)
    for e in range(size):
        instance_by_feature[e] = e // width
    return (
        n_rows,
        width,
        feature_out,
        row_out,
        value_flat,
        relu_value,
        row_start,
        row_by_feature,
        value_by_feature,
        relu_by_feature,
        feature_start,
        u_sq.astype(value.dtype),
        instance_by_feature,
        position,
        rows,
    )


@_compiled
def _exclusive_cumsum(counts):  # pragma: no cover (numba)
    """counts -> the index of each group's first entry, in place."""
    total = 0
    for g in range(counts.shape[0]):
        count = counts[g]
        counts[g] = total
        total += count


@_compiled(fastmath=True)
def label_square_sums(row_start, feature, value, rt, stride):  # pragma: no cover (numba)
    """sum_b ||R x_b + ReLU(x_b)||^2 over each instance's rows (K,) float64, from the entries alone.

    In: entries grouped by row as `loss._Entries` holds them (row_start (K stride,), feature (global
    ids i n + f) and value by row; the last row of every instance collects the padding and is
    skipped); rt (K, n, n) with rt[i, f] = column f of R_i, contiguous.

    Only the active entries of a row enter (c, c' its entries, f_c their features, v_c their values):

        ||u_b||^2 = sum_c v_c^2 ||R[:, f_c]||^2 + ReLU(v_c)^2 (2 R[f_c, f_c] + 1)
                  + 2 sum_{c < c'} v_c v_c' R[:, f_c] . R[:, f_c']
                                   + ReLU(v_c) v_c' R[f_c, f_c'] + ReLU(v_c') v_c R[f_c', f_c]

    so R x_b, a dense (rows, n) array the size of the batch, is never made: the cost is n per pair
    of entries in a row (about one pair per sample at n p = 1) instead of n per entry, plus n^2 per
    instance for the column norms.
    """
    k, n, _ = rt.shape
    out = np.zeros(k)
    norms = np.empty(n, dtype=np.float64)
    for i in range(k):
        for f in range(n):
            norm = rt.dtype.type(0)
            for t in range(n):
                norm += rt[i, f, t] * rt[i, f, t]
            norms[f] = norm
        total = 0.0
        for j in range(i * stride, (i + 1) * stride - 1):
            end = row_start[j + 1]
            for c in range(row_start[j], end):
                f, v = feature[c] - i * n, np.float64(value[c])
                relu_v = max(v, 0.0)
                total += v * v * norms[f] + relu_v * relu_v * (2.0 * rt[i, f, f] + 1.0)
                for c2 in range(c + 1, end):
                    f2, v2 = feature[c2] - i * n, np.float64(value[c2])
                    dot = rt.dtype.type(0)
                    for t in range(n):
                        dot += rt[i, f, t] * rt[i, f2, t]
                    total += 2.0 * (v * v2 * dot + relu_v * v2 * rt[i, f2, f] + max(v2, 0.0) * v * rt[i, f, f2])
        out[i] = total
    return out
