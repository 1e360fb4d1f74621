"""The fast loss: a one-layer model on a sparse batch as one autograd node, backward written out.

tests/fastpath/test_backends.py proves it equal to the reference backend in losses and gradients for every
model and option this path takes.

For h = ReLU(A x) and the readout y_hat = W h (no biases), against labels y = ReLU(x) + R x, the
per-sample loss is ||W h - u||^2 / n with u = ReLU(x) + R x. `one_layer_form` says which networks
have that form and with which A, W and R (the bias-free MLP, tied or not: A = W_in, W = W_out; the
one-layer residual MLP: A = W_in W_E^T, W = W_E W_out, R = sigma M + I - W_E W_E^T). The loss then
runs as one autograd node whose backward is written out, a few dozen kernels instead of a few hundred.

Per sample b (n features, m neurons), with G = W^T W and q_b = W^T u_b:

    loss_b = (h_b . G h_b - 2 h_b . q_b + ||u_b||^2) / n,     sum_b h_b . G h_b = <G, H^T H> (rows h_b of H)

and with s_b = 2 g_b / n for the incoming gradient g:

    dL/dh_b = s_b (G h_b - q_b)               dL/dq_b = -s_b h_b
    dL/dG   = sum_b (g_b / n) h_b h_b^T       (so dL/dW gets 2 W dL/dG)
    q_b = sum over entries c of b: ReLU(v_c) W[f_c] + v_c (R^T W)[f_c]
    A x_b = sum over entries c of b: v_c A[:, f_c]
    dL/dR = W dT^T + sum_b s_b u_b x_b^T      (T = R^T W, dT the gradient at T)

Only the active entries (row r_c, feature f_c, value v_c) of x are touched: embedding bags (a fused
gather, scale and segment sum) over C ~ B n p entries. Row B of every instance collects the padding
entries (value 0) and is dropped. On a CPU the empty samples are dropped, and a batch mean merges the
single-feature samples of each feature and sign into one (loss_b is homogeneous of degree 2 in x_b):
at B = 2048, p = 0.01, n = 100 about 737 rows remain of the 1,298 non-empty samples.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
from torch import Tensor

from cis_lightning.core.models import MLP, CCModel, ResidualMLP
from cis_lightning.core.task import SparseInput, Task
from cis_lightning.fastpath import kernels

# Device types where `one_layer_loss` prepares its entries on the host: it drops empty samples (it
# reads their count, which on a GPU would be a sync) and groups the entries with numba or numpy.
HOST_PATH_ON = ("cpu",)


def one_layer_form(model: CCModel, task: Task) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """(A (K, m, n), W (K, n, m), R (K, n, n) or None) with which `model`'s loss on `task` is that of
    y_hat = W ReLU(A x) against ReLU(x) + R x, or None where the model has no such form.

    Exact classes only: a subclass may change `forward`, which this path would not follow."""
    r = task.scaled_mixing() if task.has_mixing else None
    if type(model) is MLP:
        if model.b_hidden is not None or model.b_out is not None:
            return None
        a, w = model.effective_weights()
        return a, w, r
    if type(model) is ResidualMLP and model.n_layers == 1:
        w_e = model.w_embed
        a = torch.bmm(model.w_in.flatten(1, 2), w_e.transpose(1, 2))  # W_in W_E^T
        w = torch.bmm(w_e, model.w_out.flatten(1, 2))  # W_E W_out
        eye = torch.eye(task.n_features, device=w_e.device, dtype=w_e.dtype)
        label_map = eye - model.gram()  # labels x + ReLU(x) (+ sigma M x) minus the skip path W_E W_E^T x
        return a, w, label_map if r is None else r + label_map
    return None


def mean_loss(model: CCModel, task: Task, x: SparseInput) -> Tensor:
    """The training loss (K,), the batch mean of the per-sample loss, for a model with
    `one_layer_form`; gradients flow to its parameters and to a learned sigma."""
    a, w, r = one_layer_form(model, task)
    return one_layer_loss(a, w, r, x, mean=True)


def one_layer_loss(a: Tensor, w: Tensor, r: Tensor | None, x: SparseInput, mean: bool = False) -> Tensor:
    """Per-sample loss (K, B) of y_hat = W ReLU(A x) against ReLU(x) + R x; with `mean`, its mean
    over the batch (K,) (the training loss: nothing per sample is put back in place).

    a (K, m, n), w (K, n, m), r (K, n, n) or None (no linear part in the labels); x sparse.
    Gradients flow to a, w and r.

    An empty sample has h = 0 and u = 0, so loss 0 and no gradient: on a CPU the loss runs on the
    non-empty samples only (37% of a batch is empty at p = 0.01, n = 100) and puts their losses back
    in place. Elsewhere that would cost a host sync (the count sets a shape), so all rows run.
    """
    entries, rows = _entries(x, a.shape[0], a.dtype, mean)
    return _OneLayerLoss.apply(a, w, r, entries, rows, x.batch_size, mean)


def _entries(x: SparseInput, k: int, dtype: torch.dtype, mean: bool) -> tuple[_Entries, Tensor | None]:
    """The entries of x grouped for `_OneLayerLoss` (K instances, values in dtype), and where each of
    their rows came from (None: the rows are x's own, or `mean` needs no sources)."""
    # Not under torch.compile either: a new row count every step would recompile every step.
    if x.row.device.type not in HOST_PATH_ON or torch.compiler.is_compiling():
        return _Entries.on_device(x, k, dtype), None
    # A mean puts nothing back in place, and merges single-feature samples (`drop_empty_rows`).
    if kernels.ENABLED and x.value.dtype == dtype:
        return _Entries.grouped(x, k, mean)
    x, rows = drop_empty_rows(x, sources=not mean, merge_single=mean)
    return _Entries.on_host(x, k, dtype), rows


def drop_empty_rows(
    x: SparseInput, sources: bool = True, merge_single: bool = False
) -> tuple[SparseInput, Tensor | None]:
    """x without its empty samples, and where each of its rows came from (on the host, in numpy).

    Returns the compact input (K, R, n) with R the most non-empty samples of any instance rounded up
    to a multiple of 64 (an instance with fewer has empty filler rows at the end), and rows (K, R):
    the sample of x that each compact row is, or B for filler (None unless `sources`).

    `merge_single` (for a batch mean only, so not with `sources`): the samples with one active
    feature that share its feature and sign become one sample (`_merge_single_entry_rows`), which
    leaves about 737 of the 1,298 non-empty rows of a batch at p = 0.01, n = 100. The entries of
    the merged-away samples stay, with value 0, in the row before them (they add nothing), and the
    padding entries past the most real entries of any instance (rounded up to 64) are dropped.
    """
    if merge_single and sources:
        raise ValueError("merge_single changes the samples: only a batch mean (sources=False) may ask for it")
    row = x.row.numpy()  # (K, C), sorted per instance; padding entries have row B and come last
    k, b = row.shape[0], x.batch_size
    real = row < b
    if merge_single:
        # The draw leaves room for 10 standard deviations more entries than it expects (about 20% of
        # them padding at B = 2048, p = 0.01): keep the columns the fullest instance needs, rounded up
        # to a multiple of 64.
        width = max(64, -(-int(real.sum(axis=1).max()) // 64) * 64)
        if width < row.shape[1]:
            row, real = row[:, :width], real[:, :width]
            x = dataclasses.replace(x, row=x.row[:, :width], feature=x.feature[:, :width], value=x.value[:, :width])
    first = np.ones_like(real)
    first[:, 1:] = row[:, 1:] != row[:, :-1]
    value = x.value
    if merge_single:
        last = np.ones_like(real)
        last[:, :-1] = first[:, 1:]
        value, merged_away = _merge_single_entry_rows(x, first & last & real)
        first &= ~merged_away
    first &= real  # the first entry of every (kept) non-empty sample
    kept = _cumsum(first, axis=1)  # kept rows up to each entry; the last column: each instance's count
    # R rounded up to a multiple of 64 (at most B): a few shapes recur, so freed blocks fit again.
    n_rows = min(b, -(-int(kept[:, -1].max()) // 64) * 64) if row.size else 0
    # Merged-away entries before an instance's first kept row go to row 0 (with value 0, harmless).
    compact_row = np.maximum(kept - 1, 0)
    compact_row = np.where(real, compact_row, n_rows)  # padding stays padding: row R
    compact = SparseInput(
        row=torch.from_numpy(compact_row), feature=x.feature, value=value, batch_size=n_rows, n_features=x.n_features
    )
    if not sources:
        return compact, None
    rows = np.full((k, n_rows + 1), b, dtype=row.dtype)
    np.put_along_axis(rows, np.where(first, compact_row, n_rows), np.where(first, row, b), axis=1)
    return compact, torch.from_numpy(rows[:, :n_rows])


def _merge_single_entry_rows(x: SparseInput, single: np.ndarray) -> tuple[Tensor, np.ndarray]:
    """The values of x with its single-feature samples merged by (instance, feature, sign), and which
    entries were merged away (K, C); `single` marks the entries that are a sample's only one.

    The loss of a bias-free one-layer model against ReLU(x) + R x is positively homogeneous of
    degree 2 in x, so for v_1, ..., v_j of one sign, sum_i loss(v_i e_f) = loss(v e_f) with
    v = sign * sqrt(sum_i v_i^2), in value and in gradient: one of the j samples gets v, the others
    0 (a zero sample: loss 0, no gradient). The batch mean (over the B samples) is unchanged.
    """
    k, c = single.shape
    n = x.n_features
    index = np.flatnonzero(single)
    flat_value = x.value.numpy().reshape(-1)
    v = flat_value[index]
    cell = (index // c) * (2 * n) + 2 * x.feature.numpy().reshape(-1)[index] + (v < 0)
    square_sum = np.bincount(cell, weights=np.square(v, dtype=np.float64))
    keeper = np.empty(square_sum.shape[0], dtype=index.dtype)
    keeper[cell] = index  # one entry of each cell is written last: that one carries the cell
    kept = keeper[cell] == index
    value = flat_value.copy()
    value[index] = np.where(kept, np.copysign(np.sqrt(square_sum[cell]), v), 0)
    merged_away = np.zeros(k * c, dtype=bool)
    merged_away[index[~kept]] = True
    return torch.from_numpy(value.reshape(k, c)), merged_away.reshape(k, c)


@dataclasses.dataclass
class _Entries:
    """The active entries of K stacked instances, grouped for embedding bags both ways.

    By row (the order they come in: sorted by row), `row_start[j]` is the first entry of row j; by
    feature, `row_by_feature` and `value_by_feature` are the entries sorted by feature and
    `feature_start[f]` the first of feature f. Starts come from counts (no search). Rows and
    features are those of K stacked instances: row j of instance j // (n_rows / K), feature f of
    instance f // (n_features / K).
    """

    feature: Tensor
    row: Tensor
    value: Tensor
    relu_value: Tensor
    row_start: Tensor
    row_by_feature: Tensor
    value_by_feature: Tensor
    relu_value_by_feature: Tensor
    feature_start: Tensor
    n_rows: int
    n_features: int
    n_instances: int

    @classmethod
    def on_device(cls, x: SparseInput, k: int, dtype: torch.dtype) -> _Entries:
        """The entries of x (K instances stacked) with torch operations, on x's device; values in dtype."""
        n, b = x.n_features, x.batch_size
        instance = torch.arange(k, device=x.row.device)[:, None]
        feature = (instance * n + x.feature).reshape(-1)  # rows of a (K n, .) table
        row = (instance * (b + 1) + x.row).reshape(-1)  # rows of a (K (B + 1), .) stack
        value = x.value.reshape(-1).to(dtype)
        relu_value = value.relu()
        order = torch.sort(feature.int(), stable=True).indices
        value_by_feature = value.index_select(0, order)
        return cls(
            feature=feature,
            row=row,
            value=value,
            relu_value=relu_value,
            row_start=_starts(row, k * (b + 1)),
            row_by_feature=row.index_select(0, order),
            value_by_feature=value_by_feature,
            relu_value_by_feature=value_by_feature.relu(),
            feature_start=_starts(feature, k * n),
            n_rows=k * (b + 1),
            n_features=k * n,
            n_instances=k,
        )

    @classmethod
    def on_host(cls, x: SparseInput, k: int, dtype: torch.dtype) -> _Entries:
        """The same from the host arrays of x, computed in numpy."""
        n, b = x.n_features, x.batch_size
        local = x.feature.numpy()  # (K, C): every instance has C entries, padding included
        c = local.shape[1]
        instance = np.arange(k)[:, None]
        feature = (instance * n + local).reshape(-1)
        row = (instance * (b + 1) + x.row.numpy()).reshape(-1)
        value = x.value.to(dtype).numpy().reshape(-1)
        relu_value = np.maximum(value, 0)
        # numpy sorts small integer keys stably by radix. Each instance's entries sorted by their own
        # feature (8-bit keys for n <= 256: one counting pass), then offset, are the stable order of
        # the stacked ids, cheaper than sorting the stacked ids.
        key = local.astype(np.uint8 if n <= 2**8 else np.int16 if n <= 2**15 else np.int32)
        order = (np.argsort(key, axis=1, kind="stable") + instance * c).reshape(-1)
        u_sq = np.bincount(row, weights=np.square(relu_value, dtype=np.float64), minlength=k * (b + 1))
        value_by_feature = value[order]
        entries = cls(
            *(torch.from_numpy(a) for a in (feature, row, value, relu_value)),
            row_start=torch.from_numpy(_host_starts(row, k * (b + 1))),
            row_by_feature=torch.from_numpy(row[order]),
            value_by_feature=torch.from_numpy(value_by_feature),
            relu_value_by_feature=torch.from_numpy(np.maximum(value_by_feature, 0)),  # cheaper than a gather
            feature_start=torch.from_numpy(_host_starts(feature, k * n)),
            n_rows=k * (b + 1),
            n_features=k * n,
            n_instances=k,
        )
        # Sorting by feature keeps the instances in order, C entries each: no division needed.
        entries.__dict__["instance_by_feature"] = torch.from_numpy(np.arange(k).repeat(c))
        entries.__dict__["u_sq"] = torch.from_numpy(u_sq.astype(value.dtype))
        return entries

    @classmethod
    def grouped(cls, x: SparseInput, k: int, mean: bool) -> tuple[_Entries, Tensor | None]:
        """`on_host` of `drop_empty_rows(x, sources=not mean, merge_single=mean)` (the same arrays, from
        one compiled pass: `kernels.group_entries`), and the rows' sources (None for a mean)."""
        n = x.n_features
        arrays = kernels.group_entries(
            np.ascontiguousarray(x.row.numpy()),
            np.ascontiguousarray(x.feature.numpy()),
            np.ascontiguousarray(x.value.numpy()),
            x.batch_size,
            n,
            mean,
            not mean,
        )
        n_rows, _, *tensors, u_sq, instance_by_feature, position_in_rows, rows = arrays
        entries = cls(*(torch.from_numpy(a) for a in tensors), n_rows=k * (n_rows + 1), n_features=k * n, n_instances=k)
        entries.__dict__["u_sq"] = torch.from_numpy(u_sq)
        entries.__dict__["instance_by_feature"] = torch.from_numpy(instance_by_feature)
        entries.__dict__["position_in_rows"] = torch.from_numpy(position_in_rows)
        return entries, None if mean else torch.from_numpy(rows)

    @property
    def stride(self) -> int:
        """Rows per instance (the last one collects the padding)."""
        return self.n_rows // self.n_instances

    @functools.cached_property
    def u_sq(self) -> Tensor:
        """||ReLU(x_b)||^2 per row (n_rows,): only labels without a linear part ask for it."""
        u_sq = torch.zeros(self.n_rows, device=self.value.device, dtype=self.value.dtype)
        return u_sq.index_add_(0, self.row, self.relu_value.square())

    @functools.cached_property
    def instance_by_feature(self) -> Tensor:
        """The instance of every entry, in feature order."""
        return torch.div(self.row_by_feature, self.n_rows // self.n_instances, rounding_mode="floor")

    @functools.cached_property
    def position_in_rows(self) -> Tensor:
        """Every entry's index in a flattened (n_rows, n) stack of rows: row * n + its feature within its instance."""
        n = self.n_features // self.n_instances
        return self.row * n + self.feature % n

    def sum_by_row(self, table: Tensor, weight: Tensor) -> Tensor:
        """out[row_c] += weight_c table[feature_c]: (n_rows, width)."""
        return _bag(self.feature, table, self.row_start, weight)

    def sum_by_feature(self, table: Tensor, weight: Tensor) -> Tensor:
        """out[feature_c] += weight_c table[row_c]: (n_features, width); weight in feature order."""
        return _bag(self.row_by_feature, table, self.feature_start, weight)


def _label_sums_on_host(entries: _Entries) -> bool:
    """Whether `kernels.label_square_sums` can sum the labels' norms of these entries: numba on, the
    entries on the host, not under torch.compile."""
    return kernels.ENABLED and entries.value.device.type in HOST_PATH_ON and not torch.compiler.is_compiling()


def _starts(group: Tensor, n_groups: int) -> Tensor:
    """Index of the first entry of every group when entries are ordered by group (exclusive cumsum of counts)."""
    counts = torch.zeros(n_groups, dtype=group.dtype, device=group.device)
    counts.index_add_(0, group, torch.ones_like(group))
    return counts.cumsum(0) - counts


def _host_starts(group: np.ndarray, n_groups: int) -> np.ndarray:
    """`_starts` in numpy."""
    counts = np.bincount(group, minlength=n_groups)
    return _cumsum(counts, axis=0) - counts


def _cumsum(a: np.ndarray, axis: int) -> np.ndarray:
    """np.cumsum(a, axis) of a bool or integer array, in int64, by torch's kernel (numpy's integer
    cumsum is a scalar loop)."""
    return torch.cumsum(torch.from_numpy(a), dim=axis).numpy()


def _bag(index: Tensor, table: Tensor, starts: Tensor, weight: Tensor) -> Tensor:
    """One fused gather, scale and segment sum (no autograd: the backward is written out below)."""
    return torch.nn.functional.embedding_bag(index, table, starts, mode="sum", per_sample_weights=weight)


def _sum_of_squares(a: Tensor) -> Tensor:
    """The sum of squares of each row of a (rows,), in one pass over a (square() is a slow pow here)."""
    return torch.linalg.vector_norm(a, dim=1).square_()


def _relu_backward_(grad: Tensor, output: Tensor) -> Tensor:
    """grad where the ReLU's output is positive, else 0, in place in grad (one kernel, no new
    (K, B, m) tensor)."""
    return torch.ops.aten.threshold_backward.grad_input(grad, output, 0, grad_input=grad)


class _OneLayerLoss(torch.autograd.Function):
    # Passes over (K, B, m) tensors are what a big K pays for (memory traffic), so they are counted.
    # Batch mean: forward the ReLU (sum_b h_b . q_b from (K, n, m) bags by feature, which the backward
    # reuses); backward the ReLU mask (G h - q is fused into its product).
    # Per sample: forward ReLU, G h - 2 q, h * (G h - 2 q) and its sum; backward the ReLU mask and h * g.
    # The per-row factor 2 g_b / n of the backward goes into the per-entry weights instead (O(C)),
    # or for a batch mean, where it is one number per instance, onto the (K, n, m) bags.

    @staticmethod
    def forward(ctx, a, w, r, entries, rows, batch_size, mean):
        # entries: of x, or of its non-empty rows (then rows (K, R) says which sample each row is,
        # B for filler); batch_size: B; mean: return the mean over the batch (K,), rows unused.
        # Views of a parameter keep requires_grad even here, and an embedding bag on a table that
        # requires grad takes its slower training path: work on detached tensors.
        r_requires_grad = r is not None and r.requires_grad
        a, w, r = a.detach(), w.detach(), None if r is None else r.detach()
        k, m, n = a.shape
        value, relu_value = entries.value, entries.relu_value
        h = entries.sum_by_row(a.transpose(1, 2).contiguous().view(k * n, m), value).relu_().view(k, -1, m)
        # u_sq: ||u_b||^2 per row, or for a mean its sum over each instance's rows (K,).
        u = t = None
        if r is None:
            q = entries.sum_by_row(w.reshape(k * n, m), relu_value)  # W^T ReLU(x), (K (B + 1), m)
            u_sq = entries.u_sq.view(k, -1).sum(dim=1) if mean else entries.u_sq
        else:
            t = torch.bmm(r.transpose(1, 2), w)  # T = R^T W (K, n, m)
            # q = W^T ReLU(x) + W^T R x: entry c adds ReLU(v_c) W[f_c] + v_c T[f_c] = v_c (T + [v_c > 0] W)[f_c],
            # one bag over the table [T; T + W] (rows K n + f for a positive entry).
            table = torch.cat([t, t + w]).view(2 * k * n, m)
            q = _bag(entries.feature + (k * n) * (value > 0), table, entries.row_start, value)
            r_t = r.transpose(1, 2).contiguous()  # column f of R_k at r_t[k, f]
            if mean and not r_requires_grad and _label_sums_on_host(entries):
                # u = R x + ReLU(x) only enters through sum_b ||u_b||^2 (no gradient at R is asked
                # for): from the pairs of entries in each row, without the (K, B, n) u.
                sums = kernels.label_square_sums(
                    entries.row_start.numpy(), entries.feature.numpy(), value.numpy(), r_t.numpy(), entries.stride
                )
                u_sq = torch.from_numpy(sums).to(a.dtype)
            else:
                u = entries.sum_by_row(r_t.view(k * n, n), value)  # R x
                u.view(-1).index_add_(0, entries.position_in_rows, relu_value)  # + ReLU(x)
                # For a mean a norm reads u once, where a vecdot writes the products first.
                u_sq = _sum_of_squares(u.view(k, -1)) if mean else torch.linalg.vecdot(u, u)
        q = q.view(k, -1, m)
        ctx.entries, ctx.rows, ctx.batch_size, ctx.mean = entries, rows, batch_size, mean
        if mean:
            # sum_b h_b . q_b = <W, P> + <T, V> with the backward's bags by feature P = sum_c ReLU(v_c)
            # e_f h_r^T and V = sum_c v_c e_f h_r^T, made here instead: two (K, n m) dot products for
            # one over (K, B, m).
            h_rows = h.view(-1, m)
            p_bag = entries.sum_by_feature(h_rows, entries.relu_value_by_feature).view(k, n, m)
            hq = torch.linalg.vecdot(w.reshape(k, -1), p_bag.view(k, -1))
            v_bag = None
            if t is not None:
                v_bag = entries.sum_by_feature(h_rows, entries.value_by_feature).view(k, n, m)
                hq += torch.linalg.vecdot(t.view(k, -1), v_bag.view(k, -1))
            ctx.feature_bags = (p_bag, v_bag)
            return _batch_mean(ctx, a, w, r, h, q, u, u_sq.sub_(hq, alpha=2))
        gram = torch.bmm(w.transpose(1, 2), w)  # G = W^T W (K, m, m)
        ctx.save_for_backward(a, w, h, gram, q, r, u, None)
        g_h = torch.bmm(h, gram).sub_(q, alpha=2)  # G h - 2 q
        loss = ((h * g_h).sum(dim=2) + u_sq.view(k, -1)) / n
        if rows is None:
            return loss[:, :batch_size]
        full = torch.zeros(k, batch_size + 1, device=a.device, dtype=a.dtype)
        return full.scatter_(1, rows, loss[:, :-1])[:, :batch_size]  # filler rows land in column B

    @staticmethod
    def backward(ctx, grad):
        a, w, h, gram, q, r, u, gram_h = ctx.saved_tensors  # gram_h = H^T H for a mean, else None
        entries = ctx.entries
        k, m, n = a.shape
        # dL/dh_b = s_b (G h_b - q_b), dL/dq_b = -s_b h_b with s_b = 2 g_b / n: s_b goes into the weights.
        if ctx.mean:  # g_b = grad_k / B for every row of instance k (padding and filler rows have h = 0)
            scale = grad * (2 / (n * ctx.batch_size))  # s_b of instance k's rows (K,)
            s = scale.index_select(0, entries.instance_by_feature)
        else:
            g = torch.nn.functional.pad(grad, (0, 1))  # (K, B + 1); the padding row gets 0
            if ctx.rows is not None:  # to the rows the loss ran on: (K, R + 1), filler and padding get 0
                g = torch.nn.functional.pad(g.gather(1, ctx.rows), (0, 1))
            s = (g * (2 / n)).view(-1).index_select(0, entries.row_by_feature)
        weight = entries.value_by_feature * s
        grad_a = grad_w = grad_r = None
        if ctx.needs_input_grad[0]:
            g_h = torch.baddbmm(q, h, gram, beta=-1)  # G h - q in one pass
            d_pre = _relu_backward_(g_h, h).view(-1, m)  # through the ReLU, per unit s_b
            grad_a = entries.sum_by_feature(d_pre, weight).view(k, n, m).transpose(1, 2)
        h_rows = h.view(-1, m)
        if ctx.needs_input_grad[1]:
            if ctx.mean:  # dL/dG (K, m, m), symmetric: sum_b (g_b / n) h_b h_b^T
                d_gram = gram_h * (scale / 2)[:, None, None]
            else:
                d_gram = torch.bmm((h * (g / n)[..., None]).transpose(1, 2), h)
            grad_w = 2 * torch.bmm(w, d_gram)
            if ctx.mean:  # the bags by feature the forward made, times s_b (the same for an instance's rows)
                grad_w -= ctx.feature_bags[0] * scale.view(k, 1, 1)
            else:
                grad_w -= entries.sum_by_feature(h_rows, entries.relu_value_by_feature * s).view(k, n, m)
        if r is not None:
            if ctx.mean:
                minus_d_t = ctx.feature_bags[1] * scale.view(k, 1, 1)  # minus the gradient at T = R^T W
            else:
                minus_d_t = entries.sum_by_feature(h_rows, weight).view(k, n, m)
            grad_w, grad_r = _label_map_grads(ctx, w, r, u, weight, minus_d_t, grad_w)
        return grad_a, grad_w, grad_r, None, None, None, None


def _batch_mean(ctx, a, w, r, h, q, u, labels):
    """The batch mean (K,) from h, q (K, rows, m) and labels_k = sum_b ||u_b||^2 - 2 h_b . q_b over
    instance k's rows (padding and filler rows have loss 0), saving what the backward needs.

    sum_b h_b . G h_b = <G, H^T H>: H^T H is the backward's dL/dG up to a factor, so G h is made only
    in the backward."""
    k, m, n = a.shape
    gram = torch.bmm(w.transpose(1, 2), w)  # G = W^T W (K, m, m)
    gram_h = torch.bmm(h.transpose(1, 2), h)
    ctx.save_for_backward(a, w, h, gram, q, r, u, gram_h)
    total = torch.linalg.vecdot(gram.view(k, -1), gram_h.view(k, -1))
    return total.add_(labels).div_(n * ctx.batch_size)


def _label_map_grads(ctx, w, r, u, weight, minus_d_t, grad_w):
    """(grad_w, grad_r) of labels with a linear part R x: dL/dW gains R dT (minus_d_t: -dT, dT the
    gradient at T = R^T W, as the bags make it), and dL/dR (None unless R needs it; weight: value_c
    s_c in feature order)."""
    k, n, _ = w.shape
    grad_r = None
    if ctx.needs_input_grad[1]:
        grad_w -= torch.bmm(r, minus_d_t)
    if ctx.needs_input_grad[2]:
        # d||u_b||^2 / dR = 2 u_b x_b^T with weights g_b / n: summed into the columns f_c of R.
        d_rt = ctx.entries.sum_by_feature(u, weight).view(k, n, n)
        grad_r = d_rt.transpose(1, 2) - torch.bmm(w, minus_d_t.transpose(1, 2))
    return grad_w, grad_r
