"""The C kernels of the CPU path (`cis_lightning.native`) compute what the numpy and torch forms compute.

The draw bit for bit, the entry bookkeeping array for array, the loss and its gradients up to float32
rounding (the bags sum in another order); a failed build falls back with one warning.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from cis_lightning import evaluation, fused, native, rng
from cis_lightning import task as task_module
from cis_lightning.main import run
from cis_lightning.mixing import Mixing
from cis_lightning.models import MLP, ResidualMLP
from cis_lightning.task import Instance, SparseInput, Task
from tests.conftest import hand_made_batch, tiny_args

ENTRY_FIELDS = (
    "feature",
    "row",
    "value",
    "relu_value",
    "row_start",
    "row_by_feature",
    "value_by_feature",
    "relu_value_by_feature",
    "feature_start",
    "instance_by_feature",
    "u_sq",
)


@pytest.fixture(scope="module")
def lib():
    built = native.library()
    assert built is not None, "the test machine has a C compiler: the kernels must build"
    return built


def _two_instances(**mixing) -> Task:
    return Task([Instance(0.1, **mixing), Instance(0.05, seed=1, **mixing)], 30)


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2), (2, 3)])
@pytest.mark.parametrize("p", [(0.1, 0.05), (0.01, 0.0)])  # p = 0: a frozen instance draws nothing
def test_the_c_draw_is_the_numpy_draw_bit_for_bit(lib, rank, world_size, p):
    task, batch_size, n = _two_instances(), 600, 30
    local = batch_size // world_size
    mean = batch_size * n * max(p)
    count = math.ceil(mean + 10 * math.sqrt(mean) + 10)
    counters = rng.range_counters(2 * count, "numpy")
    log1m_p = np.log1p(-np.array(p))
    for step in range(5):
        key = task._key(0, step)[:, None].numpy()
        with np.errstate(divide="ignore"):
            expected = task_module._active_entries(key, log1m_p, counters, batch_size * n, count, n, local, rank)
        base = task._stream_base(0)  # C hashes the step's key itself
        drawn = native.active_entries(lib, base, step, log1m_p, counters, batch_size * n, count, n, local, rank)
        for want, got in zip(expected, drawn, strict=True):
            assert got.dtype == torch.from_numpy(want).dtype and np.array_equal(got.numpy(), want)
    draw = {"rank": rank, "world_size": world_size, "feature_probability": list(p)}
    with native.turned_off():
        numpy_batch = task.draw(batch_size, 3, **draw)
    c_batch = task.draw(batch_size, 3, **draw)
    for name in ("row", "feature", "value"):
        assert torch.equal(getattr(c_batch, name), getattr(numpy_batch, name)), name


def _numpy_entries(x: SparseInput, k: int) -> fused._Entries:
    """What the C bookkeeping builds, in numpy: single-feature samples merged (C always merges)."""
    compact, _ = fused.drop_empty_rows(x, sources=False, merge_single=True)
    return fused._Entries.on_host(compact, k, torch.float32)


@pytest.mark.parametrize("rank, world_size, p", [(0, 1, (0.1, 0.05)), (1, 3, (0.1, 0.0)), (0, 1, (0.0, 0.0))])
def test_c_bookkeeping_builds_the_numpy_entries_array_for_array(lib, rank, world_size, p):
    """Empty samples dropped, rows rounded up to 64, single-feature samples merged, grouped
    by row and by feature: the same arrays, with a frozen instance, a rank's padding entries, and a
    batch with no entries at all."""
    x = _two_instances().draw(300, step=4, rank=rank, world_size=world_size, feature_probability=list(p))
    want, got = _numpy_entries(x, 2), fused._Entries.from_native(lib, x, 2)
    assert (got.n_rows, got.n_features, got.n_instances) == (want.n_rows, want.n_features, want.n_instances)
    for name in ENTRY_FIELDS:
        a, b = getattr(want, name), getattr(got, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_c_bookkeeping_of_a_hand_made_batch():
    x = hand_made_batch()  # B = 3, n = 3: samples 0 and 2 non-empty, one padding entry
    entries = fused._Entries.from_native(native.library(), x, 1)
    # Two non-empty samples: R = min(B, 2 rounded up to 64) = 3 rows (the last a filler) and the padding row.
    # Sample 2, the only single-feature sample of its (feature, sign), merges into itself: 0.25 stays.
    assert entries.n_rows == 4 and entries.row.tolist() == [0, 0, 1, 3]
    assert entries.row_start.tolist() == [0, 2, 3, 3]
    assert entries.feature_start.tolist() == [0, 2, 2]  # feature 0: entries 0 and 3; feature 2: 1 and 2
    assert entries.row_by_feature.tolist() == [0, 3, 0, 1]
    assert entries.value_by_feature.tolist() == [0.5, 0.0, -1.0, 0.25]
    assert entries.relu_value_by_feature.tolist() == [0.5, 0.0, 0.0, 0.25]
    assert entries.u_sq.tolist() == [0.25, 0.0625, 0.0, 0.0]  # ||ReLU(x_b)||^2


def test_c_merging_drops_the_padding_columns_past_the_fullest_instance_rounded_up_to_64(lib):
    # Two instances of B = 4, n = 3, 200 columns: instance 0 has 3 real entries, instance 1 none.
    row = torch.full((2, 200), 4)
    row[0, :3] = torch.tensor([0, 1, 3])
    feature = torch.zeros(2, 200, dtype=torch.long)
    feature[0, :3] = torch.tensor([2, 2, 1])
    value = torch.zeros(2, 200)
    value[0, :3] = torch.tensor([0.6, 0.8, -0.5])
    x = SparseInput(row=row, feature=feature, value=value, batch_size=4, n_features=3)
    want, got = _numpy_entries(x, 2), fused._Entries.from_native(lib, x, 2)
    assert got.feature.shape == (2 * 64,)
    for name in ENTRY_FIELDS:
        assert torch.equal(getattr(want, name), getattr(got, name)), name
    # Samples 0 and 1 (feature 2, positive) became one of value sqrt(0.6^2 + 0.8^2) = 1, kept by the later one.
    assert got.value[:3].tolist() == [0.0, 1.0, -0.5]


NETWORKS = {
    "mlp": lambda: MLP(n_features=30, d_mlp=8, seeds=[0, 1]),
    "tied mlp": lambda: MLP(n_features=30, d_mlp=8, seeds=[0, 1], tied=True),
    "residual": lambda: ResidualMLP(n_features=30, d_embed=80, d_mlp=8, seeds=[0, 1]),
}


def _counting(monkeypatch, name: str) -> list[int]:
    """Calls of native.<name> from here on."""
    calls, function = [], getattr(native, name)
    monkeypatch.setattr(native, name, lambda *args: calls.append(1) or function(*args))
    return calls


@pytest.mark.parametrize("network_name", list(NETWORKS))
@pytest.mark.parametrize("learned_mixing", [False, True])
@pytest.mark.parametrize("p", [(0.1, 0.05), (0.1, 0.0)])
@pytest.mark.parametrize("bags", ["C", "torch"])
def test_the_loss_with_c_kernels_equals_the_numpy_and_torch_loss(
    lib, network_name, learned_mixing, p, bags, monkeypatch
):
    """The training loss (batch mean, float32) and its gradients, the weights', and sigma's through
    the labels' linear part R x, against the float64 numpy and torch form; a frozen instance too.
    Bags in C (K B < MERGE_SINGLE_FROM) or in torch on the C bookkeeping (a sweep's size)."""
    monkeypatch.setattr(fused, "MERGE_SINGLE_FROM", 10**9 if bags == "C" else 0)
    mixing = {"sigma": 0.2, "learn_sigma": True, "mixing": Mixing("gaussian", symmetric=True)} if learned_mixing else {}
    task, model = _two_instances(**mixing), NETWORKS[network_name]()
    x = task.draw(300, step=4, feature_probability=list(p))
    params = list(model.parameters()) + ([task.sigma] if learned_mixing else [])
    prepared, bagged = _counting(monkeypatch, "prepare"), _counting(monkeypatch, "hidden_cross")
    loss = evaluation.mean_loss(model, task, x)
    grads = torch.autograd.grad((loss * torch.tensor([0.7, 1.3])).sum(), params)
    assert prepared == [1] and len(bagged) == (bags == "C")  # the C path ran
    model64, task64 = model.double(), task.double()
    x64 = SparseInput(x.row, x.feature, x.value.double(), x.batch_size, x.n_features)
    loss64 = evaluation.mean_loss(model64, task64, x64)
    params64 = list(model64.parameters()) + ([task64.sigma] if learned_mixing else [])
    grads64 = torch.autograd.grad((loss64 * torch.tensor([0.7, 1.3], dtype=torch.float64)).sum(), params64)
    assert torch.allclose(loss.double(), loss64, rtol=1e-5, atol=1e-8)
    assert (loss[1] == 0) == (p[1] == 0)
    for got, want in zip(grads, grads64, strict=True):
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-6 * want.abs().max())


@pytest.mark.parametrize("network_name", ["mlp", "tied mlp", "residual"])
@pytest.mark.parametrize("learned_mixing", [False, True])
def test_one_instance_with_c_kernels_equals_the_numpy_and_torch_loss(lib, network_name, learned_mixing, monkeypatch):
    """K = 1, as every config trains, with the bags in C. A tied MLP's W = A^T is a strided view of
    A, which at K = 1 reshapes to a (n, m) table without a copy: the kernels must get it dense."""
    mixing = {"sigma": 0.2, "learn_sigma": True, "mixing": Mixing("gaussian", symmetric=True)} if learned_mixing else {}
    task = Task([Instance(0.1, **mixing)], 30)
    model = {
        "mlp": lambda: MLP(n_features=30, d_mlp=8),
        "tied mlp": lambda: MLP(n_features=30, d_mlp=8, tied=True),
        "residual": lambda: ResidualMLP(n_features=30, d_embed=80, d_mlp=8),
    }[network_name]()
    x = task.draw(300, step=2)
    bagged = _counting(monkeypatch, "hidden_cross")
    loss = evaluation.mean_loss(model, task, x)
    grads = torch.autograd.grad(loss.sum(), list(model.parameters()) + ([task.sigma] if learned_mixing else []))
    assert len(bagged) == 1  # the C bags ran
    model64, task64 = model.double(), task.double()
    x64 = SparseInput(x.row, x.feature, x.value.double(), x.batch_size, x.n_features)
    loss64 = evaluation.mean_loss(model64, task64, x64)
    params64 = list(model64.parameters()) + ([task64.sigma] if learned_mixing else [])
    grads64 = torch.autograd.grad(loss64.sum(), params64)
    assert torch.allclose(loss.double(), loss64, rtol=1e-5, atol=1e-8)
    for got, want in zip(grads, grads64, strict=True):
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-6 * want.abs().max())


def test_the_kernels_refuse_a_strided_array_instead_of_reading_it_as_dense():
    with pytest.raises(ValueError, match="contiguous"):
        native._ptr(torch.zeros(3, 4).t())
    with pytest.raises(ValueError, match="contiguous"):
        native._ptr(np.zeros((3, 4))[:, ::2])
    assert native._ptr(torch.zeros(3, 4)) != 0


def test_float32_batch_means_take_the_c_path_with_c_bags_below_merge_single_from(monkeypatch):
    prepared, bagged = _counting(monkeypatch, "prepare"), _counting(monkeypatch, "hidden_cross")
    task, model = _two_instances(), MLP(n_features=30, d_mlp=8, seeds=[0, 1])
    x = task.draw(300, step=1)
    evaluation.per_sample_loss(model, task, x)  # per sample: numpy
    evaluation.mean_loss(model.double(), task.double(), SparseInput(x.row, x.feature, x.value.double(), 300, 30))
    assert prepared == [] and bagged == []
    monkeypatch.setattr(fused, "MERGE_SINGLE_FROM", 0)
    evaluation.mean_loss(model.float(), task.float(), x)  # at a sweep's size: C bookkeeping, torch's bags
    assert prepared == [1] and bagged == []
    monkeypatch.setattr(fused, "MERGE_SINGLE_FROM", 10**9)
    evaluation.mean_loss(model, task, x)
    assert prepared == [1, 1] and bagged == [1]


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """library() built anew into tmp_path (and the usual one again after the test)."""
    monkeypatch.setenv("CIS_NATIVE_CACHE", str(tmp_path))
    native._library.cache_clear()
    yield tmp_path
    native._library.cache_clear()


def test_the_library_is_built_once_per_source_into_the_cache(fresh_build):
    first = native._build()
    assert first.parent == fresh_build and first.is_file()
    built_at = first.stat().st_mtime_ns
    assert native._build() == first and first.stat().st_mtime_ns == built_at  # loaded, not rebuilt
    assert [p.name for p in fresh_build.iterdir()] == [first.name]  # no temporary file left


def test_a_failed_build_warns_once_and_the_numpy_forms_draw_the_same_batch(fresh_build, monkeypatch):
    task = _two_instances()
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with native.turned_off():
        expected = task.draw(300, 2)
    with pytest.warns(UserWarning, match="C kernels .* could not be built") as caught:
        assert native.library() is None
        assert native.library() is None
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = task.draw(300, 2)
    assert torch.equal(x.row, expected.row) and torch.equal(x.value, expected.value)
    assert list(fresh_build.iterdir()) == []  # nothing half-written


def test_cis_native_0_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv("CIS_NATIVE", "0")
    assert native.library() is None
    monkeypatch.delenv("CIS_NATIVE")
    assert native.library() is not None
    with native.turned_off():
        assert native.library() is None
    assert native.library() is not None


def test_cis_fit_with_and_without_the_kernels_trains_the_same_weights(tmp_path, monkeypatch):
    """The real CLI, 30 steps of the residual model: the same run up to float32 rounding."""
    weights, calls = [], []
    prepare = native.prepare
    monkeypatch.setattr(native, "prepare", lambda *args: calls.append(setting) or prepare(*args))
    for setting in ("1", "0"):
        monkeypatch.setenv("CIS_NATIVE", setting)
        save_dir = tmp_path / setting
        args = tiny_args(save_dir, "configs/compressed_computation.yaml", steps=30)
        run(["fit", *args, "--trainer.limit_val_batches", "0", "--model.network.init_args.d_embed", "200"])
        (path,) = save_dir.rglob("weights.pt")
        weights.append(torch.load(path, weights_only=True)["network"])
    with_c, without = weights
    for name, value in without.items():
        assert torch.allclose(with_c[name], value, rtol=1e-4, atol=1e-6), name
    assert set(calls) == {"1"} and len(calls) == 30  # every training step of the first run, none of the second
