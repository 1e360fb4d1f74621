"""The numba kernels equal their specification: the grouping its numpy form bit for bit, the labels'
norms the dense labels' to rounding; and the loss is the same with numba on and off.

`kernels.group_entries` is `loss.drop_empty_rows` followed by `loss._Entries.on_host` in one
compiled pass; every array it returns must be the numpy form's, exactly (the same integers, the same
float sums in the same order), on drawn batches and on the edge cases: an empty batch, an instance
or every instance without active features, single-feature samples that merge, K = 1 and K > 1.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cis_lightning import fastpath
from cis_lightning.core.mixing import Mixing
from cis_lightning.core.models import MLP, ResidualMLP
from cis_lightning.core.task import Instance, SparseInput, Task
from cis_lightning.fastpath import kernels, loss

pytestmark = pytest.mark.skipif(kernels.numba is None, reason="numba is not installed")

FIELDS = [f.name for f in dataclasses.fields(loss._Entries)]
CACHED = ("u_sq", "instance_by_feature", "position_in_rows")


def _numpy_form(x: SparseInput, mean: bool) -> tuple[loss._Entries, torch.Tensor | None]:
    compact, rows = loss.drop_empty_rows(x, sources=not mean, merge_single=mean)
    return loss._Entries.on_host(compact, x.row.shape[0], x.value.dtype), rows


def _assert_same(x: SparseInput, mean: bool) -> None:
    expected, expected_rows = _numpy_form(x, mean)
    got, rows = loss._Entries.grouped(x, x.row.shape[0], mean)
    for name in (*FIELDS, *CACHED):
        a, b = getattr(got, name), getattr(expected, name)
        if isinstance(a, int):
            assert a == b, name
        else:  # the same dtype, shape and bits
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert np.array_equal(a.numpy().view(np.uint8), b.numpy().view(np.uint8)), name
    assert (rows is None) == (expected_rows is None)
    if rows is not None:
        assert torch.equal(rows, expected_rows)


def _batch(rows: list[list[int]], features: list[list[int]], values: list[list[float]], b: int, n: int) -> SparseInput:
    return SparseInput(
        row=torch.tensor(rows, dtype=torch.long).reshape(len(rows), -1),
        feature=torch.tensor(features, dtype=torch.long).reshape(len(rows), -1),
        value=torch.tensor(values, dtype=torch.float32).reshape(len(rows), -1),
        batch_size=b,
        n_features=n,
    )


@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("p", [0.002, 0.01, 0.1, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouping_drawn_batches_equals_the_numpy_form(mean, k, p, dtype):
    task = Task([Instance(p * (1 + i) / k, seed=i) for i in range(k)], 40, False)
    for step in range(3):
        x = task.draw(300, step=step)
        _assert_same(dataclasses.replace(x, value=x.value.to(dtype)), mean)


@pytest.mark.parametrize("mean", [True, False])
def test_grouping_exactly_one_active_batches_equals_the_numpy_form(mean):
    task = Task([Instance(0.01, seed=i) for i in range(3)], 7, True)  # many single samples of each feature
    _assert_same(task.draw(500, step=2), mean)


EDGE_CASES = [
    # an empty batch: no entries at all
    _batch([[], []], [[], []], [[], []], b=8, n=3),
    # every sample empty: only padding
    _batch([[4, 4, 4]], [[0, 0, 0]], [[0.0, 0.0, 0.0]], b=4, n=3),
    # one instance empty, the other with single-feature samples of both signs and a shared feature
    _batch(
        [[6, 6, 6, 6, 6], [0, 1, 2, 3, 6]],
        [[0, 0, 0, 0, 0], [2, 2, 2, 1, 0]],
        [[0.0] * 5, [0.5, -0.25, 0.75, 0.1, 0.0]],
        b=6,
        n=3,
    ),
    # K = 1: a two-feature sample, three singles of one cell, no padding, B = 1 row per sample
    _batch([[0, 0, 1, 2, 3]], [[1, 0, 2, 2, 2]], [[0.3, -0.6, 0.2, 0.4, 0.9]], b=4, n=3),
    # one feature only (n = 1), every sample a single
    _batch([[0, 1, 2, 3, 4, 5]], [[0] * 6], [[0.5, -0.5, 0.25, -1.0, 1.0, 0.0]], b=6, n=1),
]


@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize("batch", EDGE_CASES)
def test_grouping_edge_cases_equals_the_numpy_form(batch, mean):
    _assert_same(batch, mean)


def test_the_width_is_trimmed_to_the_fullest_instance_as_numpy_does():
    x = Task([Instance(0.01, seed=i) for i in range(2)], 30, False).draw(400, step=0)
    b = x.batch_size
    pad = 200
    wide = SparseInput(
        row=torch.cat([x.row, torch.full((2, pad), b)], dim=1),
        feature=torch.cat([x.feature, torch.zeros(2, pad, dtype=torch.long)], dim=1),
        value=torch.cat([x.value, torch.zeros(2, pad)], dim=1),
        batch_size=b,
        n_features=x.n_features,
    )
    _assert_same(wide, mean=True)
    assert loss._Entries.grouped(wide, 2, True)[0].feature.shape[0] < 2 * wide.row.shape[1]


NETWORKS = {
    "mlp": lambda k: MLP(n_features=30, d_mlp=8, seeds=list(range(k))),
    "residual": lambda k: ResidualMLP(n_features=30, d_embed=60, d_mlp=8, seeds=list(range(k))),
}


@pytest.mark.parametrize("network", list(NETWORKS))
@pytest.mark.parametrize("mean", [True, False])
def test_the_loss_is_bit_identical_with_numba_on_and_off(network, mean, monkeypatch):
    k = 3
    model = NETWORKS[network](k)
    task = Task(
        [Instance(0.03, seed=i, sigma=0.1, learn_sigma=True, mixing=Mixing("gaussian")) for i in range(k)], 30, False
    )
    x = task.draw(512, step=1)
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        losses = fastpath.one_layer_loss(*fastpath.one_layer_form(model, task), x, mean=mean)
        params = [*model.parameters(), task.sigma]
        grads = torch.autograd.grad(losses.sum(), [p for p in params if p.requires_grad])
        results.append((losses.detach(), grads))
    (on, on_grads), (off, off_grads) = results
    assert torch.equal(on, off)
    for a, b in zip(on_grads, off_grads, strict=True):
        assert torch.equal(a, b)


def _dense_label_square_sums(x: SparseInput, r: torch.Tensor) -> torch.Tensor:
    """sum_b ||R x_b + ReLU(x_b)||^2 per instance from the dense batch: the specification."""
    dense = x.dense().double()  # (K, B, n)
    u = dense @ r.double().transpose(1, 2) + dense.relu()
    return u.square().sum(dim=(1, 2))


def _label_square_sums(x: SparseInput, r: torch.Tensor, grouped: bool) -> torch.Tensor:
    k = x.row.shape[0]
    entries = loss._Entries.grouped(x, k, True)[0] if grouped else loss._Entries.on_host(x, k, x.value.dtype)
    r_t = r.transpose(1, 2).contiguous()
    sums = kernels.label_square_sums(
        entries.row_start.numpy(), entries.feature.numpy(), entries.value.numpy(), r_t.numpy(), entries.stride
    )
    return torch.from_numpy(sums)


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("p", [0.01, 0.1, 0.2])  # up to the densest sparse draw
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_label_square_sums_equal_the_dense_labels_norms(grouped, p, dtype):
    k, n = 3, 40
    task = Task([Instance(p, seed=i, sigma=0.3, mixing=Mixing("gaussian")) for i in range(k)], n, False)
    x = task.draw(256, step=2)
    x = dataclasses.replace(x, value=x.value.to(dtype))
    # A dense R with a diagonal of its own, as the residual network's label map I - W_E W_E^T + sigma M has.
    r = (task.scaled_mixing() + 0.5 * torch.randn(k, n, n, generator=torch.Generator().manual_seed(1))).to(dtype)
    expected = _dense_label_square_sums(x, r)  # grouping merges single samples: the sum is unchanged
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(_label_square_sums(x, r, grouped), expected, rtol=rtol, atol=0)


@pytest.mark.parametrize("batch", EDGE_CASES)
def test_label_square_sums_of_the_edge_cases(batch):
    r = torch.randn(batch.row.shape[0], batch.n_features, batch.n_features, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        _label_square_sums(batch, r, True), _dense_label_square_sums(batch, r), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("network", list(NETWORKS))
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_the_labels_norms_come_from_the_kernel_only_for_a_fixed_mixing_and_equal_the_bags(
    network, learn_sigma, monkeypatch
):
    k = 3
    model = NETWORKS[network](k).double()
    mixing = Mixing("gaussian")
    task = Task(
        [Instance(0.05, seed=i, sigma=0.2, learn_sigma=learn_sigma, mixing=mixing) for i in range(k)], 30, False
    )
    task = task.double()
    x = task.draw(512, step=1).to(torch.float64)
    calls = []
    kernel = kernels.label_square_sums
    monkeypatch.setattr(kernels, "label_square_sums", lambda *args: calls.append(1) or kernel(*args))
    results = []
    for enabled in (True, False):  # off: the labels R x + ReLU(x) are made by embedding bags
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        losses = fastpath.mean_loss(model, task, x)
        params = [p for p in [*model.parameters(), task.sigma] if p.requires_grad]
        results.append((losses.detach(), torch.autograd.grad(losses.sum(), params)))
    assert len(calls) == (0 if learn_sigma else 1)  # a learned sigma needs R x for its gradient
    (on, on_grads), (off, off_grads) = results
    torch.testing.assert_close(on, off, rtol=1e-12, atol=0)
    for a, b in zip(on_grads, off_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
