"""The fast forms compute exactly what the direct forms compute, and the training step stays lean.

Speed itself is measured by `make bench`, never here: these tests check behaviour (equal outputs and
gradients, no host syncs on ordinary steps, no growth of live tensors, a compiled step that trains
the same weights).
"""

from __future__ import annotations

import dataclasses
import gc
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from cis_lightning import fastpath
from cis_lightning.core import rng
from cis_lightning.core import task as task_module
from cis_lightning.core.loss import mean_loss, per_sample_loss
from cis_lightning.core.mixing import Mixing
from cis_lightning.core.models import MLP, ResidualMLP
from cis_lightning.core.task import Instance, SparseInput, Task
from cis_lightning.fastpath import loss as fastpath_loss
from cis_lightning.lightning import module as module_module
from cis_lightning.lightning.cli import run
from tests.conftest import hand_made_batch, tiny_args


def _gradients(loss: torch.Tensor, parameters: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, parameters))


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """The model in float64 with every parameter moved off its init (biases become non-zero)."""
    model = model.double()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    return model


@pytest.mark.parametrize("n_layers", [1, 2])
def test_folded_residual_forward_equals_the_residual_stream_in_outputs_and_gradients(n_layers):
    model = _perturbed(ResidualMLP(n_features=20, d_embed=64, d_mlp=6, n_layers=n_layers, seeds=[0, 1]))
    x = torch.randn(2, 33, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.randn(2, 33, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    params = [model.w_in, model.w_out]
    folded, direct = model(x), model.forward_direct(x)
    assert torch.allclose(folded, direct, atol=1e-10)
    # A loss with a random target reaches every weight, both layers included.
    for a, b in zip(
        _gradients((folded - target).pow(2).sum(), params),
        _gradients((direct - target).pow(2).sum(), params),
        strict=True,
    ):
        assert torch.allclose(a, b, atol=1e-10)


def test_the_fold_uses_the_loaded_embedding():
    """W_E W_E^T is cached; loading a state dict with another W_E must refresh it."""
    a = ResidualMLP(n_features=10, d_embed=30, d_mlp=4, seeds=[0])
    b = ResidualMLP(n_features=10, d_embed=30, d_mlp=4, seeds=[5])
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 8, 10)
    assert torch.allclose(b(x), a.forward_direct(x), atol=1e-5)


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_a_sparse_draw_is_exactly_the_dense_sample(rank):
    task = Task([Instance(seed=3), Instance(feature_probability=0.05, seed=4)], 30)
    draw = task.draw(96, step=5, rank=rank, world_size=3)
    assert isinstance(draw, SparseInput)
    assert torch.equal(draw.dense(), task.sample(96, step=5, rank=rank, world_size=3))
    assert torch.equal(draw.dense(), task.sample(96, step=5)[:, 32 * rank : 32 * (rank + 1)])


@pytest.mark.parametrize("rank", [0, 1])
def test_without_empty_rows_keeps_the_non_empty_samples_in_order(rank):
    """Two instances at different p and a rank's padding entries: each instance's non-empty samples,
    in order, then empty filler rows up to the fuller instance's count."""
    task = Task([Instance(feature_probability=0.02, seed=3), Instance(feature_probability=0.05, seed=4)], 30)
    x = task.draw(96, step=5, rank=rank, world_size=2)
    compact, dense = x.without_empty_rows(), x.dense()
    counts = [int((dense[k] != 0).any(dim=1).sum()) for k in range(2)]
    assert compact.batch_size == max(counts)
    for k in range(2):
        kept = dense[k][(dense[k] != 0).any(dim=1)]
        assert torch.equal(compact.dense()[k, : counts[k]], kept)
        assert (compact.dense()[k, counts[k] :] == 0).all()


@pytest.mark.parametrize("network_name", ["mlp", "residual, 2 layers", "mlp with biases"])
def test_the_training_loss_is_the_mean_of_the_per_sample_loss_in_value_and_gradients(network_name):
    """The reference `mean_loss` (on a CPU it skips the empty samples of a homogeneous model) equals
    per_sample_loss(...).mean(1) over all samples."""
    model = _perturbed(NETWORKS[network_name]())
    task = TASKS["learned sigma, symmetric M"](False).double()
    x = task.draw(300, step=4, rank=1, world_size=3).to(torch.float64)
    params = [q for q in [*model.parameters(), task.sigma] if q.requires_grad]
    mean, per_sample = mean_loss(model, task, x), per_sample_loss(model, task, x).mean(dim=1)
    torch.testing.assert_close(mean, per_sample, rtol=1e-12, atol=1e-14)
    for a, b in zip(_gradients(mean.sum(), params), _gradients(per_sample.sum(), params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


NETWORKS = {
    "mlp": lambda: MLP(n_features=30, d_mlp=8, seeds=[0, 1]),
    "mlp with biases": lambda: MLP(n_features=30, d_mlp=8, seeds=[0, 1], hidden_bias=True, output_bias=True),
    "tied mlp": lambda: MLP(n_features=30, d_mlp=8, seeds=[0, 1], tied=True),
    "residual": lambda: ResidualMLP(n_features=30, d_embed=80, d_mlp=8, seeds=[0, 1]),
    "residual, 2 layers": lambda: ResidualMLP(n_features=30, d_embed=80, d_mlp=4, n_layers=2, seeds=[0, 1]),
}
TASKS = {
    "clean": lambda one: Task([Instance(feature_probability=0.1), Instance(feature_probability=0.05, seed=1)], 30, one),
    "learned sigma, symmetric M": lambda one: Task(
        [
            Instance(0.1, sigma=0.2, learn_sigma=True, mixing=Mixing("gaussian", symmetric=True)),
            Instance(0.05, sigma=0.1, learn_sigma=True, mixing=Mixing("low_rank", rank=3), seed=1),
        ],
        30,
        one,
    ),
}


# Every network with mixing and a learned sigma; the clean task and exactly-one-active on two of them.
CASES = [(network, "learned sigma, symmetric M", False) for network in NETWORKS] + [
    ("mlp", "clean", True),
    ("residual, 2 layers", "clean", True),
]


@pytest.mark.parametrize("network_name, task_name, one_active", CASES)
def test_the_sparse_loss_equals_the_dense_loss_in_value_and_gradients(network_name, task_name, one_active):
    """The readout form (no dense output, products over active entries only) is the same function."""
    model = _perturbed(NETWORKS[network_name]())
    task = TASKS[task_name](one_active).double()
    sparse = task.draw(200, step=3)
    sparse.value = sparse.value.double()
    dense = sparse.dense()
    params = list(model.parameters()) + ([task.sigma] if task.sigma.requires_grad else [])
    fast, slow = per_sample_loss(model, task, sparse), per_sample_loss(model, task, dense)
    assert torch.allclose(fast, slow, atol=1e-12)
    for a, b in zip(_gradients(fast.sum(), params), _gradients(slow.sum(), params), strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_drop_empty_rows_on_a_hand_made_batch():
    # Instance 0: samples 0 (two entries) and 2, one padding entry; instance 1: sample 3 only.
    x = SparseInput(
        row=torch.tensor([[0, 0, 2, 4], [3, 4, 4, 4]]),
        feature=torch.tensor([[1, 4, 0, 0], [2, 0, 0, 0]]),
        value=torch.tensor([[0.5, -0.25, 1.0, 0.0], [0.75, 0.0, 0.0, 0.0]]),
        batch_size=4,
        n_features=5,
    )
    compact, rows = fastpath_loss.drop_empty_rows(x)
    assert fastpath_loss.drop_empty_rows(x, sources=False)[1] is None  # what a batch mean asks for
    assert torch.equal(fastpath_loss.drop_empty_rows(x, sources=False)[0].row, compact.row)
    # The most non-empty samples of an instance is 2, rounded up to 64 but at most B = 4.
    assert compact.batch_size == 4
    assert compact.row.tolist() == [[0, 0, 1, 4], [0, 4, 4, 4]]  # padding goes to row R = 4
    assert rows.tolist() == [[0, 2, 4, 4], [3, 4, 4, 4]]  # filler rows come from B
    dense, empty = x.dense(), torch.zeros(5)
    assert torch.equal(
        compact.dense(),
        torch.stack(
            [torch.stack([dense[0, 0], dense[0, 2], empty, empty]), torch.stack([dense[1, 3], empty, empty, empty])]
        ),
    )
    wide = dataclasses.replace(x, row=torch.where(x.row == 4, 200, x.row), batch_size=200)
    compact, rows = fastpath_loss.drop_empty_rows(wide)
    assert compact.batch_size == 64 and rows[:, :2].tolist() == [[0, 2], [3, 200]] and (rows[:, 2:] == 200).all()


def test_merging_single_feature_samples_on_a_hand_made_batch():
    # Instance 0: samples 0, 2 (+e_1) and 3 (-e_1) have one entry each, sample 1 two, sample 4 one
    # (+e_2), one padding entry. Instance 1: two samples of -e_0, and nothing else.
    x = SparseInput(
        row=torch.tensor([[0, 1, 1, 2, 3, 4, 6], [1, 5, 6, 6, 6, 6, 6]]),
        feature=torch.tensor([[1, 0, 3, 1, 1, 2, 0], [0, 0, 0, 0, 0, 0, 0]]),
        value=torch.tensor([[0.6, 0.5, -0.25, 0.8, -0.5, 0.3, 0.0], [-0.3, -0.4, 0.0, 0.0, 0.0, 0.0, 0.0]]),
        batch_size=6,
        n_features=4,
    )
    compact, rows = fastpath_loss.drop_empty_rows(x, sources=False, merge_single=True)
    assert rows is None and compact.batch_size == 6  # 4 rows kept at most, rounded up to 64, at most B
    # +0.6 e_1 and +0.8 e_1 become one sample of 1.0 e_1 (0.36 + 0.64 = 1); -0.5 e_1 stays apart (its
    # sign differs), and so do sample 1 (two entries) and +0.3 e_2; -0.3 e_0 and -0.4 e_0 give -0.5 e_0.
    e = torch.eye(4)
    merged = [[0.5 * e[0] - 0.25 * e[3], 1.0 * e[1], -0.5 * e[1], 0.3 * e[2]], [-0.5 * e[0]]]
    for instance, expected in enumerate(merged):
        dense = compact.dense()[instance]
        kept = dense[dense.abs().sum(dim=1) > 0]
        assert kept.shape[0] == len(expected) and (dense[len(expected) :] == 0).all()  # kept rows come first
        assert torch.allclose(torch.tensor(sorted(kept.tolist())), torch.tensor(sorted(r.tolist() for r in expected)))
    # Entries stay in place: merged-away ones keep their feature with value 0 in a kept row (sorted rows).
    assert compact.row.shape == x.row.shape and torch.equal(compact.feature, x.feature)
    assert (compact.row[:, 1:] >= compact.row[:, :-1]).all() and compact.row[0, -1] == 6
    with pytest.raises(ValueError, match="merge_single"):
        fastpath_loss.drop_empty_rows(x, sources=True, merge_single=True)
    # Padding columns past the fullest instance's entries, rounded up to 64, go; the batch stays.
    padding = 130
    wide = SparseInput(
        row=torch.cat([x.row, torch.full((2, padding), 6)], dim=1),
        feature=torch.cat([x.feature, torch.zeros(2, padding, dtype=torch.long)], dim=1),
        value=torch.cat([x.value, torch.zeros(2, padding)], dim=1),
        batch_size=6,
        n_features=4,
    )
    trimmed, _ = fastpath_loss.drop_empty_rows(wide, sources=False, merge_single=True)
    assert trimmed.row.shape == (2, 64) and torch.equal(trimmed.dense(), compact.dense())
    assert torch.equal(trimmed.row[:, :7], compact.row) and (trimmed.row[:, 7:] == 6).all()
    assert fastpath_loss.drop_empty_rows(wide, sources=False)[0].row.shape == wide.row.shape  # no merge, no trim


@pytest.mark.parametrize("p", [(0.1, 0.0), (0.0, 0.0), (0.15, 0.05)])
def test_the_loss_on_the_non_empty_samples_equals_the_loss_on_all(p, monkeypatch):
    """Values and gradients of `fastpath.one_layer_loss` with and without dropping empty samples, with
    an instance whose batch is empty (a frozen instance) and with every batch empty."""
    model = _perturbed(NETWORKS["mlp"]())
    task = TASKS["learned sigma, symmetric M"](False).double()
    x = task.draw(64, step=2, rank=1, world_size=2, feature_probability=list(p))
    x.value = x.value.double()
    params = list(model.parameters()) + [task.sigma]
    results = []
    for devices in [("cpu",), ()]:
        monkeypatch.setattr(fastpath_loss, "HOST_PATH_ON", devices)
        loss = fastpath.one_layer_loss(*fastpath.one_layer_form(model, task), x)
        weights = torch.rand(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        results.append((loss, _gradients((weights * loss).sum(), params)))
    (dropped, dropped_grads), (full, full_grads) = results
    assert dropped.shape == full.shape == (2, 32)
    assert torch.allclose(dropped, full, atol=1e-12)
    for a, b in zip(dropped_grads, full_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-12)
    assert (full[[k for k, q in enumerate(p) if q == 0]] == 0).all()


@pytest.mark.parametrize("network_name", ["mlp", "residual"])
@pytest.mark.parametrize("task_name", ["clean", "learned sigma, symmetric M"])
@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("p", [(0.1, 0.05), (0.1, 0.0)])
def test_the_training_loss_is_the_batch_mean_of_the_per_sample_loss_in_value_and_gradients(
    network_name, task_name, path, p, monkeypatch
):
    """`fastpath.mean_loss` (whose backward spreads grad_k / B over the rows itself, and whose sum of
    h_b . q_b comes from the backward's bags by feature) against the reference per_sample_loss(...).mean(1),
    with a frozen (empty) instance and a rank's padding entries, on the CPU's host path (single-feature
    samples merged) and on the path other devices take; labels without a linear part (the clean MLP),
    with a fixed one (the residual model's I - W_E W_E^T) and with learned sigmas."""
    monkeypatch.setattr(fastpath_loss, "HOST_PATH_ON", () if path == "device" else ("cpu",))
    model = _perturbed(NETWORKS[network_name]())
    task = TASKS[task_name](False).double()
    x = task.draw(300, step=4, rank=1, world_size=3, feature_probability=list(p))
    x.value = x.value.double()
    params = [q for q in [*model.parameters(), task.sigma] if q.requires_grad]
    mean, per_sample = fastpath.mean_loss(model, task, x), per_sample_loss(model, task, x).mean(dim=1)
    assert mean.shape == (2,) and (mean[1] == 0) == (p[1] == 0)
    assert torch.allclose(mean, per_sample, atol=1e-14)
    weights = torch.tensor([0.7, 1.3], dtype=torch.float64)  # the instances' gradients differ
    for a, b in zip(
        _gradients((weights * mean).sum(), params), _gradients((weights * per_sample).sum(), params), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-12)


def _entries(x: SparseInput, k: int, on_host: bool) -> fastpath_loss._Entries:
    """`fastpath_loss._Entries` of x as the CPU builds them (numpy) or as other devices do (torch)."""
    build = fastpath_loss._Entries.on_host if on_host else fastpath_loss._Entries.on_device
    return build(x, k, x.value.dtype)


@pytest.mark.parametrize("on_host", [True, False])
def test_entries_of_a_hand_made_batch_are_grouped_by_row_and_by_feature(on_host):
    x = hand_made_batch()  # B = 3, n = 3: samples 0 and 2 non-empty, one padding entry
    entries = _entries(x, 1, on_host)
    assert entries.row_start.tolist() == [0, 2, 2, 3]  # rows 0..3 hold 2, 0, 1, 1 entries
    # By feature, stably: feature 0 (entries 0, 3), feature 1 (none), feature 2 (entries 1, 2).
    assert entries.feature_start.tolist() == [0, 2, 2]
    assert entries.row_by_feature.tolist() == [0, 3, 0, 2]
    assert entries.value_by_feature.tolist() == [0.5, 0.0, -1.0, 0.25]
    assert entries.u_sq.tolist() == [0.25, 0.0, 0.0625, 0.0]  # ||ReLU(x_b)||^2


@pytest.mark.parametrize("n", [30, 300])  # the host sorts 8-bit feature keys up to n = 256, 16-bit above
def test_entries_grouped_on_the_host_equal_the_device_grouping(n):
    """The numpy path of a CPU builds exactly what torch builds elsewhere, for two instances and a
    rank's share (padding entries of other ranks included)."""
    task = Task([Instance(feature_probability=0.1), Instance(feature_probability=0.05, seed=1)], n)
    x = task.draw(64, step=2, rank=1, world_size=2)
    host, device = _entries(x, 2, on_host=True), _entries(x, 2, on_host=False)
    assert (host.n_rows, host.n_features) == (device.n_rows, device.n_features) == (66, 2 * n)
    for name in ("feature", "row", "value", "relu_value", "row_start", "row_by_feature", "value_by_feature"):
        assert torch.equal(getattr(host, name), getattr(device, name)), name
    for name in ("relu_value_by_feature", "feature_start", "instance_by_feature", "position_in_rows"):
        assert torch.equal(getattr(host, name), getattr(device, name)), name
    assert torch.allclose(host.u_sq, device.u_sq, rtol=1e-6, atol=0)


@pytest.mark.parametrize("network_name", ["mlp", "tied mlp", "residual"])
@pytest.mark.parametrize("rank", [0, 2])
def test_the_per_sample_fast_loss_equals_the_dense_reference_loss(network_name, rank):
    """The hand-written backward of `fastpath.one_layer_loss` per sample, on a rank's share of a batch
    (padding entries of other ranks included), against autograd through the network's dense forward."""
    model = _perturbed(NETWORKS[network_name]())
    task = TASKS["learned sigma, symmetric M"](False).double()
    sparse = task.draw(300, step=4, rank=rank, world_size=3)
    sparse.value = sparse.value.double()
    assert (sparse.row == sparse.batch_size).any()  # padding entries present
    params = list(model.parameters()) + [task.sigma]
    fast = fastpath.one_layer_loss(*fastpath.one_layer_form(model, task), sparse)
    slow = per_sample_loss(model, task, sparse.dense())
    assert torch.allclose(fast, slow, atol=1e-12)
    weights = torch.rand(fast.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for a, b in zip(
        _gradients((weights * fast).sum(), params), _gradients((weights * slow).sum(), params), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-10)


# -- the Lightning training step ------------------------------------------------------------------------
# Every way a tensor's value reaches Python (on a GPU each one waits for the device). Not `numpy`:
# on a device tensor it raises rather than waits, and CPU-only fast paths use it (fused, Task.draw).
SYNCING = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "__index__")
SYNCS = {"count": 0}


class SyncCounter(pl.Callback):
    """Host syncs per training step: from the start of step t to the start of step t + 1 (Lightning
    writes a logging step's values to the logger after the step's callbacks)."""

    def __init__(self) -> None:
        self.per_step: dict[int, int] = {}
        self.logging_steps: set[int] = set()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0:
            self.per_step[step - 1] = SYNCS["count"]
        SYNCS["count"] = 0
        if module._logging_this_step():  # the module's own test for a logging step
            self.logging_steps.add(step)


def _callback(cli, kind: type) -> pl.Callback:
    return next(c for c in cli.trainer.callbacks if isinstance(c, kind))


def test_training_steps_that_do_not_log_make_no_host_sync(monkeypatch, tiny):
    # The path a GPU takes: the CPU's loss drops empty samples, which reads their count on the host.
    monkeypatch.setattr(fastpath_loss, "HOST_PATH_ON", ())
    monkeypatch.setattr(module_module, "HOST_DEVICES", ())
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            SYNCS["count"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    args = [*tiny("configs/mlp_embedding.yaml", steps=40), "--trainer.log_every_n_steps", "10"]
    cli = run(["fit", *args, "--trainer.callbacks+=tests.fastpath.test_performance.SyncCounter"])
    monkeypatch.undo()
    counter = _callback(cli, SyncCounter)
    assert cli.trainer.global_step == 40
    assert len(counter.per_step) == 39  # steps 0 .. 38; step 39 ends the run
    assert 1 <= len(counter.logging_steps) <= 5  # logging steps do sync (they write numbers)
    syncing = {step for step, count in counter.per_step.items() if count > 0}
    assert syncing <= counter.logging_steps, f"steps {sorted(syncing - counter.logging_steps)} synced"
    assert sum(counter.per_step.get(step, 0) for step in counter.logging_steps) > 0  # the counter does see syncs


class LiveTensors(pl.Callback):
    """The number of tensors that the garbage collector can reach, at chosen steps."""

    def __init__(self, at: list[int]) -> None:
        self.at, self.counts = set(at), {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.at:
            gc.collect()
            self.counts[trainer.global_step] = sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_live_tensors_do_not_grow_with_the_number_of_steps(tiny):
    """Ten logging steps lie between steps 20 and 70: a logged tensor kept alive would add at least ten."""
    args = [*tiny("configs/mlp_gaussian.yaml", steps=70), "--trainer.log_every_n_steps", "5", "--data.batch_size", "64"]
    cli = run(
        [
            "fit",
            *args,
            "--trainer.callbacks+=tests.fastpath.test_performance.LiveTensors",
            "--trainer.callbacks.at=[20, 70]",
        ]
    )
    probe = _callback(cli, LiveTensors)
    assert probe.counts[70] - probe.counts[20] < 10, probe.counts


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["network"]


@pytest.mark.slow  # torch.compile generates and builds C++ kernels: about 20-40 s on 2 CPU cores
def test_a_compiled_training_step_trains_the_same_weights(tmp_path):
    """`--model.compile true` (torch.compile of the loss) is the same training as the eager step."""
    weights = []
    for compile in ("false", "true"):
        args = [
            "fit",
            *tiny_args(tmp_path / compile, "configs/mlp_embedding.yaml", steps=5, log_every_n_steps=None),
            "--model.compile",
            compile,
            "--trainer.limit_val_batches",
            "0",
            "--data.batch_size",
            "128",
            "--model.network.init_args.d_mlp",
            "8",
        ]
        cli = run(args)
        weights.append(_weights(Path(cli.trainer.log_dir) / "weights.pt"))
    for name in weights[0]:
        assert torch.allclose(weights[0][name], weights[1][name], atol=1e-5), name


def test_a_compiled_draw_draws_the_same_batches():
    """`Task.draw(..., compiled=True)` (`--data.compile`) gives the eager draw's entries bit for bit,
    with a frozen instance (p = 0) and a rank's share."""
    task = Task([Instance(0.05, seed=0), Instance(0.1, seed=1)], 30)
    for step, p in [(0, None), (1, None), (2, [0.1, 0.0])]:
        eager = task.draw(96, step, rank=1, world_size=2, feature_probability=p)
        compiled = task.draw(96, step, rank=1, world_size=2, feature_probability=p, compiled=True)
        for name in ("row", "feature", "value"):
            assert torch.equal(getattr(eager, name), getattr(compiled, name)), (step, name)
        assert (compiled.row.shape[1] > 0) and (compiled.row[1] == 48).all() == (p is not None)


def test_a_compiled_dense_draw_draws_the_same_batches():
    """Above p = 0.2 the draw is dense (one uniform per entry): compiled, the same bits."""
    task = Task([Instance(0.5, seed=0), Instance(0.05, seed=1)], 30)
    for step in (0, 1):
        eager = task.draw(64, step, rank=1, world_size=2)
        assert isinstance(eager, torch.Tensor) and eager.shape == (2, 32, 30)
        assert torch.equal(task.draw(64, step, rank=1, world_size=2, compiled=True), eager)


def test_a_draw_whose_compiling_fails_warns_once_and_draws_uncompiled(monkeypatch):
    def no_compiler(function, **options):
        def compiled(*args):
            raise RuntimeError("no C++ compiler found\n(more lines)")

        return compiled

    monkeypatch.setattr(torch, "compile", no_compiler)
    draw = task_module._Compiled(task_module._dense_input)
    task = Task([Instance(0.5, seed=0)], 30)
    key, counters = task._key(0, 3)[:, None, None], rng.range_counters(8 * 30, torch.device("cpu")).view(8, 30)
    with pytest.warns(
        UserWarning, match=r"data.compile: torch.compile failed \(RuntimeError: no C\+\+ compiler found\)"
    ):
        first = draw(key, task.feature_probability, counters)
    assert torch.equal(first, task_module._dense_input(key, task.feature_probability, counters))
    assert draw.run is task_module._dense_input  # no second attempt
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no second warning
        assert torch.equal(draw(key, task.feature_probability, counters), first)


@pytest.mark.slow  # torch.compile builds the draw's C++ kernel: about 7 s on 2 CPU cores
def test_data_compile_trains_the_same_weights(tmp_path):
    """`--data.compile true` trains exactly the weights of the eager draw (the same batches)."""
    weights = []
    for compile in ("false", "true"):
        args = [
            "fit",
            *tiny_args(tmp_path / compile, steps=5, log_every_n_steps=None),
            "--data.compile",
            compile,
            "--trainer.limit_val_batches",
            "0",
        ]
        cli = run(args)
        assert cli.datamodule.compile == (compile == "true")
        weights.append(_weights(Path(cli.trainer.log_dir) / "weights.pt"))
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten operations (kernels, on a GPU) dispatched inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("network", ["mlp", "residual"])
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_a_training_step_runs_the_same_kernels_whatever_the_number_of_instances(network, backend, monkeypatch):
    """Instances are batched, never looped: draw, loss and backward of K = 16 dispatch exactly the
    operations of K = 1 (on a GPU, where a step costs launches, a sweep then costs no more launches),
    through both loss backends. Counted on the path a GPU takes: a CPU groups the fast path's entries
    on the host."""
    monkeypatch.setattr(fastpath_loss, "HOST_PATH_ON", ())

    def step_ops(k: int) -> list[str]:
        seeds = list(range(k))
        model = NETWORKS[network]().__class__(
            **({"n_features": 30, "d_mlp": 8} if network == "mlp" else {"n_features": 30, "d_embed": 80, "d_mlp": 8}),
            seeds=seeds,
        )
        task = Task([Instance(0.05, sigma=0.1, mixing=Mixing("gaussian", symmetric=True), seed=s) for s in seeds], 30)
        with _OpCounter() as counter:
            x = task.draw(256, step=7)
            loss = fastpath.mean_loss if backend == "fast" else mean_loss
            loss(model, task, x).sum().backward()
        return counter.ops

    step_ops(1)  # first calls fill caches (the counters of a batch size)
    # Layout-only operations (views and the copies a reshape may need) depend on the shapes; the
    # kernels that compute are the same.
    layout = {"aten.view.default", "aten.clone.default", "aten._unsafe_view.default", "aten.new_empty_strided.default"}
    layout |= {"aten.copy_.default", "aten._reshape_alias.default", "aten.expand.default"}
    one, sixteen = ([op for op in step_ops(k) if op not in layout] for k in (1, 16))
    assert len(one) > 10
    assert sixteen == one


class ThreadProbe(pl.Callback):
    """torch's intra-op threads at every training and validation batch."""

    def __init__(self) -> None:
        self.training: list[int] = []
        self.validation: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.training.append(torch.get_num_threads())

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.validation.append(torch.get_num_threads())


@pytest.mark.parametrize("extra, expected", [([], 2), (["--model.threads", "3"], 3)])
def test_training_runs_on_the_configured_threads_and_the_process_keeps_its_own(tiny, extra, expected):
    """model.threads sets torch's threads for training steps only; null leaves torch's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        probe = [
            "--trainer.callbacks+=tests.fastpath.test_performance.ThreadProbe",
            "--trainer.val_check_interval",
            "2",
        ]
        cli = run(["fit", *tiny("configs/mlp_clean.yaml", steps=4), *probe, *extra])
        (threads,) = (c for c in cli.trainer.callbacks if isinstance(c, ThreadProbe))
        assert threads.training == [expected] * 4
        assert threads.validation and set(threads.validation) == {2}  # both validations
        assert torch.get_num_threads() == 2  # restored after fit
    finally:
        torch.set_num_threads(before)


def test_a_failed_fit_gives_torch_its_threads_back(tiny):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(SystemExit):  # lr = 1e30: the loss of step 1 overflows, training stops
            run(["fit", *tiny("configs/mlp_clean.yaml", steps=10), "--model.lr", "1e30"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("config", ["configs/mlp_gaussian.yaml", "configs/compressed_computation.yaml"])
@pytest.mark.parametrize("precision", ["bf16-mixed", "64-true"])
def test_other_precisions_train_and_validate_through_the_reference(tiny, config, precision):
    """Mixed precision (Lightning's autocast; a sparse batch runs in the model's dtype inside it) and
    64-bit training take the reference backend, and train and validate to finite losses."""
    args = [*tiny(config, steps=6), "--trainer.precision", precision, "--trainer.val_check_interval", "3"]
    cli = run(["fit", *args])
    assert cli.model.training_backend == "reference"
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss_per_feature"])
    expected = torch.float64 if precision == "64-true" else torch.float32
    assert all(p.dtype == expected for p in cli.model.network.parameters())
