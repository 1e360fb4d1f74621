"""The host grouping of a batch's entries in one pass compiled by numba.

`group_entries` is `loss.drop_empty_rows` followed by `loss._Entries.on_host` (their numpy forms are
the specification): it drops the empty samples, merges single-feature samples for a batch mean, and
groups the entries by row and by feature. numpy does that in a dozen passes over the entries, each
with its own temporaries (argsort, cumsum, bincount, fancy indexing); here it is a few loops over
(K, C) arrays. The arrays are the same bit for bit (the float sums run in the same order, in float64
as numpy's bincount does): tests/fastpath/test_kernels.py checks it on random and edge-case batches.

numba is optional: without it, or with CIS_NUMBA=0 in the environment, `ENABLED` is False and the
loss groups its entries with numpy. With it, the kernel is compiled at its first call and cached on
disk (`cache=True`) for later processes.
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


def _compiled(function):
    """`function` compiled by numba (nopython, cached on disk), or as it is without numba."""
    return function if numba is None else numba.njit(cache=True, nogil=True)(function)


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
