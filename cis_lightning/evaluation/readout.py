"""The faster evaluation form: a bias-free one-layer network's loss written on the active entries of x.

The evaluator's one seam to it is `readout_form(model, task)`: the form where it is exact and
enabled, else None, and the evaluator then runs the network's own forward (`core.loss`), the
definition. CIS_EVALUATION_FORM=reference turns the form off everywhere (for checking a number
against the definition); tests/evaluation/test_fast_evaluation.py proves the two equal.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as nn_functional
from torch import Tensor

from cis_lightning.core.models import MLP, CCModel, ResidualMLP
from cis_lightning.core.task import Task

FORM_SWITCH = "CIS_EVALUATION_FORM"  # "auto" (default) or "reference"


def readout_form(model: CCModel, task: Task) -> ReadoutForm | None:
    """The `ReadoutForm` of `model` on `task`, or None where it does not apply or CIS_EVALUATION_FORM=reference."""
    if os.environ.get(FORM_SWITCH, "auto") == "reference":
        return None
    return ReadoutForm.of(model, task)


# A chunk of a stratum batch holds at most this many numbers per intermediate (rows x instances x
# width): memory stays bounded whatever K and the batch size are.
_CHUNK_NUMBERS = 2**22


class ReadoutForm:
    """The loss of a one-hidden-layer, bias-free network written on the active entries of x.

    For weights W_in (K, h, n), W_out (K, n, h) and a mixing S (K, n, n) with
    per_sample_loss(x) = ||W_out ReLU(W_in x) - ReLU(x) - S x||^2 / n, expanding the square gives

        n loss = h^T (W_out^T W_out) h - 2 h . (W_out^T ReLU(x) + (S^T W_out)^T x) + ||ReLU(x) + S x||^2,

    h = ReLU(W_in x). With k active entries every product with x is an embedding bag over k rows of
    a table, and the (K, B, n) output and labels are never formed: a stratum of k << n active
    features costs O(k (h + n) + h^2) per sample and instance instead of O(n h + n^2). The network's
    own forward stays the definition; `of` builds the form only where the identity is exact (a
    bias-free MLP, tied or not, and a one-layer residual MLP, whose W_E W_E^T x term moves into
    S = I - W_E W_E^T), and tests/evaluation prove the two equal.

    A dense batch (`dense_losses`) takes the same loss unexpanded but fused: W_out h - S x - ReLU(x)
    is one product of [h, x] with [W_out^T; -S^T] added to -ReLU(x), and its squared norm one pass.
    """

    def __init__(self, w_in: Tensor, w_out: Tensor, mixing: Tensor | None):
        k, h, n = w_in.shape
        self.n_features, self.n_instances, self.d_hidden = n, k, h
        self.w_in, self.w_out, self.mixing = w_in, w_out, mixing
        # The tables are made contiguous: for K = 1 the reshapes are strided views, on which an
        # embedding bag takes a much slower path.
        self.table_in = w_in.permute(2, 0, 1).reshape(n, k * h).contiguous()  # row i: W_in[:, :, i] of every instance
        self.gram = torch.bmm(w_out.transpose(1, 2), w_out)  # (K, h, h)
        readout = [w_out] if mixing is None else [w_out, torch.bmm(mixing.transpose(1, 2), w_out)]
        self.table_out = torch.cat([r.permute(1, 0, 2).reshape(n, k * h) for r in readout])  # (n or 2n, K h)
        self.table_mixing = None if mixing is None else mixing.permute(2, 0, 1).reshape(n, k * n).contiguous()
        # [W_out^T; -S^T] (K, h + n, n): the output minus the linear part of the labels, from [h, x]
        readout = [w_out.transpose(1, 2)] + ([] if mixing is None else [-mixing.transpose(1, 2)])
        self.readout_minus_mixing = torch.cat(readout, dim=1)

    @staticmethod
    def of(model: CCModel, task: Task) -> ReadoutForm | None:
        """The form of `model` on `task`'s labels, or None where it is not exact (biases, several layers,
        baselines: they evaluate through their forward). Exact classes only: a subclass may change
        `forward`, which this form would not follow. Built in the weights' own dtype even under mixed
        precision (autocast would make its products bf16)."""
        with torch.autocast(task.mixing.device.type, enabled=False):
            if type(model) is MLP and model.homogeneous:
                w_in, w_out = model.effective_weights()
                mixing = task.scaled_mixing() if task.has_mixing else None
            elif type(model) is ResidualMLP and model.n_layers == 1:
                w_in, w_out = model.effective_weights()
                mixing = model.effective_mixing() + (task.scaled_mixing() if task.has_mixing else 0)
            else:
                return None
            dtype = task.mixing.dtype
            mixing = None if mixing is None else mixing.detach().to(dtype)
            return ReadoutForm(w_in.detach().to(dtype), w_out.detach().to(dtype), mixing)

    def select(self, instances: Sequence[int] | None) -> ReadoutForm:
        """The form of `instances` only (all for None)."""
        if instances is None:
            return self
        index = list(instances)
        return ReadoutForm(self.w_in[index], self.w_out[index], None if self.mixing is None else self.mixing[index])

    @torch.no_grad()
    def losses(self, feature: Tensor, value: Tensor) -> Tensor:
        """per_sample_loss (K, B) of the samples whose active entries are feature, value (B, k), shared
        by all instances (a padding entry has value 0)."""
        device = value.device.type
        if torch.is_autocast_enabled(device):  # the form is exact only in the weights' own dtype
            with torch.autocast(device, enabled=False):
                return self.losses(feature, value)
        n, k, h = self.n_features, self.n_instances, self.d_hidden
        value = value.to(self.w_in.dtype)
        rows = _chunk_rows(k * max(h, n if self.mixing is not None else h))
        out = []
        for f, v in zip(feature.split(rows), value.split(rows), strict=True):
            b, positive = f.shape[0], torch.relu(v)
            pre = nn_functional.embedding_bag(f, self.table_in, per_sample_weights=v, mode="sum")
            hidden = torch.relu(pre).view(b, k, h).transpose(0, 1)  # (K, b, h)
            if self.mixing is None:
                bag, weight = f, positive
            else:
                bag, weight = torch.cat([f, f + n], dim=1), torch.cat([positive, v], dim=1)
            readout = nn_functional.embedding_bag(bag, self.table_out, per_sample_weights=weight, mode="sum")
            # h^T W_out^T W_out h - 2 h . W_out^T y = h . (G h - 2 W_out^T y): one product, one dot product
            centred = torch.baddbmm(readout.view(b, k, h).transpose(0, 1), hidden, self.gram, beta=-2)
            quadratic = torch.linalg.vecdot(hidden, centred)
            if self.mixing is None:
                label = positive.pow(2).sum(dim=1)[None]  # ||ReLU(x)||^2
            else:
                y = nn_functional.embedding_bag(f, self.table_mixing, per_sample_weights=v, mode="sum").view(b, k, n)
                y.scatter_add_(2, f[:, None].expand(b, k, f.shape[1]), positive[:, None].expand(b, k, f.shape[1]))
                label = torch.linalg.vector_norm(y, dim=-1).square_().T  # ||ReLU(x) + S x||^2, one pass over y
            out.append((quadratic + label) / n)
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def dense_losses(self, x: Tensor) -> Tensor:
        """per_sample_loss (K, B) of the dense samples x (B, n), shared by all instances."""
        device = x.device.type
        if torch.is_autocast_enabled(device):  # the form is exact only in the weights' own dtype
            with torch.autocast(device, enabled=False):
                return self.dense_losses(x)
        n, k, h = self.n_features, self.n_instances, self.d_hidden
        x = x.to(self.w_in.dtype)
        out = []
        for chunk in x.split(_chunk_rows(k * (2 * h + 2 * n))):
            b = chunk.shape[0]
            stacked = chunk[None].expand(k, b, n)
            hidden = torch.relu(torch.bmm(stacked, self.w_in.transpose(1, 2)))  # (K, b, h)
            inputs = hidden if self.mixing is None else torch.cat([hidden, stacked], dim=2)  # [h, x]
            error = torch.baddbmm(torch.relu(stacked), inputs, self.readout_minus_mixing, beta=-1)
            out.append(torch.linalg.vector_norm(error, dim=2).square_() / n)
        return torch.cat(out, dim=1)


def _chunk_rows(numbers: int) -> int:
    """Rows of a chunk whose intermediates hold `numbers` numbers per row: at most about
    `_CHUNK_NUMBERS` in all, and at least one row."""
    return max(1, _CHUNK_NUMBERS // max(1, numbers))


def active_entries_of(x: Tensor, active: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The non-zero entries of x (B, n): feature, value (B, w), w the most in any row, in increasing
    feature order; rows with fewer are padded with (feature 0, value 0). `active`: x != 0 if known."""
    b, n = x.shape
    active = x != 0 if active is None else active
    width = int(active.sum(dim=1).max()) if b else 0
    slot = torch.where(active, active.cumsum(dim=1) - 1, width)  # the inactive ones go to a spare column
    feature = torch.zeros(b, width + 1, dtype=torch.int64, device=x.device)
    feature.scatter_(1, slot, torch.arange(n, device=x.device).expand(b, n))
    value = torch.zeros(b, width + 1, dtype=x.dtype, device=x.device).scatter_(1, slot, x)
    return feature[:, :width], value[:, :width]
