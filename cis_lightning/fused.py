"""The training loss of a one-layer model on a sparse batch, with a hand-written backward.

For h = ReLU(A x) and the readout y_hat = W h (no biases), against labels y = ReLU(x) + R x, the
per-sample loss is ||W h - u||^2 / n with u = ReLU(x) + R x. `evaluation._readout_loss` computes it
with autograd; here the same algebra runs as one autograd node whose backward is written out, so a
training step costs a few dozen kernels instead of a few hundred (on a CPU, and in launches on a GPU,
a step of this model costs per-kernel overhead far more than arithmetic).

Per sample b (n features, m neurons), with G = W^T W and q_b = W^T u_b:

    loss_b = (h_b . G h_b - 2 h_b . q_b + ||u_b||^2) / n

and with s_b = 2 g_b / n for the incoming gradient g:

    dL/dh_b = s_b (G h_b - q_b)               dL/dq_b = -s_b h_b
    dL/dG   = sum_b (g_b / n) h_b h_b^T       (so dL/dW gets 2 W dL/dG)
    q_b = sum over entries c of b: ReLU(v_c) W[f_c] + v_c (R^T W)[f_c]
    A x_b = sum over entries c of b: v_c A[:, f_c]
    dL/dR = W dT^T + sum_b s_b u_b x_b^T      (T = R^T W, dT the gradient at T)

Only the active entries (row r_c, feature f_c, value v_c) of x are touched: embedding bags (a fused
gather, scale and segment sum) over C ~ B n p entries. Row B of every instance collects the padding
entries (value 0) and is dropped.
Tested against the dense autograd form in tests/test_performance.py.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cis_lightning.task import SparseInput

# Device types where `one_layer_loss` drops empty samples first (it reads their count on the host).
DROP_EMPTY_ROWS_ON = ("cpu",)


def one_layer_loss(a: Tensor, w: Tensor, r: Tensor | None, x: SparseInput) -> Tensor:
    """Per-sample loss (K, B) of y_hat = W ReLU(A x) against ReLU(x) + R x.

    a (K, m, n), w (K, n, m), r (K, n, n) or None (no linear part in the labels); x sparse.
    Gradients flow to a, w and r.

    An empty sample has h = 0 and u = 0, so loss 0 and no gradient: on a CPU the loss runs on the
    non-empty samples only (37% of a batch is empty at p = 0.01, n = 100) and puts their losses back
    in place. Elsewhere that would cost a host sync (the count sets a shape), so all rows run.
    """
    batch_size, rows = x.batch_size, None
    # Not under torch.compile either: a new row count every step would recompile every step.
    if x.row.device.type in DROP_EMPTY_ROWS_ON and not torch.compiler.is_compiling():
        x, rows = drop_empty_rows(x)
    k, n = a.shape[0], a.shape[2]
    instance = torch.arange(k, device=a.device)[:, None]
    entries = _Entries(
        feature=(instance * n + x.feature).reshape(-1),  # rows of a (K n, .) table
        row=(instance * (x.batch_size + 1) + x.row).reshape(-1),  # rows of a (K (B + 1), .) stack
        value=x.value.reshape(-1).to(a.dtype),
        n_rows=k * (x.batch_size + 1),
        n_features=k * n,
    )
    return _OneLayerLoss.apply(a, w, r, entries, rows, batch_size)


def drop_empty_rows(x: SparseInput) -> tuple[SparseInput, Tensor]:
    """x without its empty samples, and where each of its rows came from.

    Returns the compact input (K, R, n) with R the most non-empty samples of any instance rounded up
    to a multiple of 64 (an instance with fewer has empty filler rows at the end), and rows (K, R):
    the sample of x that each compact row is, or B for filler. Reads R on the host (a sync on a GPU).
    """
    k, b = x.row.shape[0], x.batch_size
    row = x.row  # (K, C), sorted per instance; padding entries have row B and come last
    real = row < b
    first = torch.ones_like(real)
    first[:, 1:] = row[:, 1:] != row[:, :-1]
    first &= real  # the first entry of every non-empty sample
    compact_row = torch.cumsum(first, dim=1) - 1
    # R rounded up to a multiple of 64 (at most B): a few shapes recur, so freed blocks fit again.
    n_rows = min(b, -(-int(first.sum(dim=1).max()) // 64) * 64) if row.numel() else 0
    compact_row = torch.where(real, compact_row, n_rows)  # padding stays padding: row R
    rows = torch.full((k, n_rows + 1), b, dtype=row.dtype, device=row.device)
    rows.scatter_(1, torch.where(first, compact_row, n_rows), torch.where(first, row, b))
    compact = SparseInput(row=compact_row, feature=x.feature, value=x.value, batch_size=n_rows, n_features=x.n_features)
    return compact, rows[:, :n_rows]


class _Entries:
    """The active entries of K stacked instances, grouped for embedding bags both ways.

    By row (the order they come in: sorted by row), `row_start[j]` is the first entry of row j; by
    feature, `row_by_feature` and `value_by_feature` are the entries sorted by feature and
    `feature_start[f]` the first of feature f. Starts come from counts (no search).
    """

    def __init__(self, feature: Tensor, row: Tensor, value: Tensor, n_rows: int, n_features: int):
        self.feature, self.row, self.value, self.n_rows, self.n_features = feature, row, value, n_rows, n_features
        self.row_start = _starts(row, n_rows)
        order = _grouping_order(feature, n_features)
        self.row_by_feature = row.index_select(0, order)
        self.value_by_feature = value.index_select(0, order)
        self.feature_start = _starts(feature, n_features)

    def sum_by_row(self, table: Tensor, weight: Tensor) -> Tensor:
        """out[row_c] += weight_c table[feature_c]: (n_rows, width)."""
        return _bag(self.feature, table, self.row_start, weight)

    def sum_by_feature(self, table: Tensor, weight: Tensor) -> Tensor:
        """out[feature_c] += weight_c table[row_c]: (n_features, width); weight in feature order."""
        return _bag(self.row_by_feature, table, self.feature_start, weight)


def _grouping_order(group: Tensor, n_groups: int) -> Tensor:
    """A permutation that makes the entries of each group contiguous (a stable sort of the group ids).

    On a CPU, torch.sort of a few thousand fresh keys costs about 75 us (a comparison sort whose
    branches the data defeats); numpy sorts 16-bit keys stably by radix in about 10 us. Elsewhere,
    and for more than 2^15 groups, torch.sort.
    """
    if group.device.type == "cpu" and n_groups <= 2**15:
        return torch.from_numpy(np.argsort(group.numpy().astype(np.int16), kind="stable"))
    return torch.sort(group.int(), stable=True).indices


def _starts(group: Tensor, n_groups: int) -> Tensor:
    """Index of the first entry of every group when entries are ordered by group (exclusive cumsum of counts)."""
    counts = torch.zeros(n_groups, dtype=group.dtype, device=group.device)
    counts.index_add_(0, group, torch.ones_like(group))
    return counts.cumsum(0) - counts


def _bag(index: Tensor, table: Tensor, starts: Tensor, weight: Tensor) -> Tensor:
    """One fused gather, scale and segment sum (no autograd: the backward is written out below)."""
    return torch.nn.functional.embedding_bag(index, table, starts, mode="sum", per_sample_weights=weight)


def _relu_backward(grad: Tensor, output: Tensor) -> Tensor:
    """grad where the ReLU's output is positive, else 0 (one kernel)."""
    return torch.ops.aten.threshold_backward(grad, output, 0)


class _OneLayerLoss(torch.autograd.Function):
    # Passes over (K, B, m) tensors are what a big K pays for (memory traffic), so they are counted:
    # forward ReLU, t = G h - 2 q, h * t and its sum; backward t + q, the ReLU mask and h * g.
    # The per-row factor 2 g_b / n of the backward goes into the per-entry weights instead (O(C)).

    @staticmethod
    def forward(ctx, a, w, r, entries, rows, batch_size):
        # entries: of x, or of its non-empty rows (then rows (K, R) says which sample each row is,
        # B for filler); batch_size: B.
        # Views of a parameter keep requires_grad even here, and an embedding bag on a table that
        # requires grad takes its slower training path: work on detached tensors.
        a, w, r = a.detach(), w.detach(), None if r is None else r.detach()
        k, m, n = a.shape
        value, relu_value = entries.value, entries.value.relu()
        h = (
            entries.sum_by_row(a.transpose(1, 2).contiguous().view(k * n, m), value).relu_().view(k, -1, m)
        )  # (K, B + 1, m)
        q = entries.sum_by_row(w.reshape(k * n, m), relu_value)  # W^T ReLU(x)
        u = None
        if r is None:
            u_sq = torch.zeros(entries.n_rows, device=a.device, dtype=a.dtype)
            u_sq.index_add_(0, entries.row, relu_value.square())
        else:
            q += entries.sum_by_row((r.transpose(1, 2) @ w).reshape(k * n, m), value)  # + W^T R x
            u = entries.sum_by_row(r.transpose(1, 2).contiguous().view(k * n, n), value)  # R x
            u.view(-1).index_add_(0, entries.row * n + entries.feature % n, relu_value)  # + ReLU(x)
            u_sq = u.square().sum(dim=1)
        q = q.view(k, -1, m)
        t = torch.bmm(h, w.transpose(1, 2) @ w).sub_(q, alpha=2)  # G h - 2 q
        loss = ((h * t).sum(dim=2) + u_sq.view(k, -1)) / n
        ctx.entries, ctx.rows = entries, rows
        ctx.save_for_backward(a, w, h, t, q, r, u)
        if rows is None:
            return loss[:, :batch_size]
        full = torch.zeros(k, batch_size + 1, device=a.device, dtype=a.dtype)
        return full.scatter_(1, rows, loss[:, :-1])[:, :batch_size]  # filler rows land in column B

    @staticmethod
    def backward(ctx, grad):
        a, w, h, t, q, r, u = ctx.saved_tensors
        entries = ctx.entries
        k, m, n = a.shape
        g = torch.nn.functional.pad(grad, (0, 1))  # (K, B + 1); the padding row gets 0
        if ctx.rows is not None:  # to the rows the loss ran on: (K, R + 1), filler and padding get 0
            g = torch.nn.functional.pad(g.gather(1, ctx.rows), (0, 1))
        # dL/dh_b = s_b (G h_b - q_b), dL/dq_b = -s_b h_b with s_b = 2 g_b / n: s_b goes into the weights.
        s = (g * (2 / n)).view(-1).index_select(0, entries.row_by_feature)
        weight, relu_weight = entries.value_by_feature * s, entries.value_by_feature.relu() * s
        grad_a = grad_w = grad_r = None
        if ctx.needs_input_grad[0]:
            d_pre = _relu_backward(t + q, h).view(-1, m)  # (G h - q) through the ReLU, per unit s_b
            grad_a = entries.sum_by_feature(d_pre, weight).view(k, n, m).transpose(1, 2)
        h_rows = h.view(-1, m)
        if ctx.needs_input_grad[1]:
            d_gram = torch.bmm((h * (g / n)[..., None]).transpose(1, 2), h)  # (K, m, m), symmetric
            grad_w = 2 * torch.bmm(w, d_gram)
            grad_w -= entries.sum_by_feature(h_rows, relu_weight).view(k, n, m)
        if r is not None:
            d_t = -entries.sum_by_feature(h_rows, weight).view(k, n, m)  # gradient at T = R^T W
            if ctx.needs_input_grad[1]:
                grad_w += torch.bmm(r, d_t)
            if ctx.needs_input_grad[2]:
                # d||u_b||^2 / dR = 2 u_b x_b^T with weights g_b / n: summed into the columns f_c of R.
                d_rt = entries.sum_by_feature(u, weight).view(k, n, n)
                grad_r = torch.bmm(w, d_t.transpose(1, 2)) + d_rt.transpose(1, 2)
        return grad_a, grad_w, grad_r, None, None, None
