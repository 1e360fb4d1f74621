"""Two real DDP processes (gloo on CPU) give the single-process run: same data, same gradient, same weights.

One DDP launch serves every test here (process start-up is slow): this file run as a script is the
driver, `cis fit` then `cis test` of its last checkpoint under `--trainer.strategy ddp --trainer.devices 2`;
Lightning starts the second rank by running the same command again. `RecordRanks` saves what each
rank saw.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from cis_lightning.core.loss import per_sample_loss
from cis_lightning.core.models import MLP
from cis_lightning.core.task import Stream
from cis_lightning.lightning.cli import run
from tests.conftest import REPO, tiny_args

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter", "ignore:The dirpath has changed")

BATCH = 256  # the global batch; each of the 2 ranks draws 128 rows of it
SEEDS = [0, 1]  # two instances


class RecordRanks(pl.Callback):
    """Saves, per rank, its step-0 batch and (all-reduced) gradient, the mixing matrices and its final weights."""

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            self.batch = (batch.dense() if hasattr(batch, "dense") else batch).detach().clone()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:  # after backward, so after DDP's all-reduce
            self.grads = {n: p.grad.clone() for n, p in pl_module.network.named_parameters() if p.grad is not None}

    def on_train_end(self, trainer, pl_module) -> None:
        record = {"batch": self.batch, "grads": self.grads, "mixing": pl_module.task.mixing.clone(), "pid": os.getpid()}
        record |= {"weights": {k: v.clone() for k, v in pl_module.network.state_dict().items()}}
        record |= {"world_size": trainer.world_size}
        torch.save(record, self.directory / f"rank{trainer.global_rank}.pt")


def cis_args(save_dir: Path) -> list[str]:
    # 4 evaluation batches, so that each rank evaluates two of them.
    return [
        *tiny_args(save_dir, steps=6),
        "--data.batch_size",
        str(BATCH),
        "--data.grid",
        f'{{"seed": {SEEDS}}}',
        "--data.eval_batch_size",
        "1024",
    ]


DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


def results(log_dir: Path) -> list[dict]:
    with open(log_dir / "results.csv") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ddp")
    record = ["--trainer.callbacks+=tests.lightning.test_ddp.RecordRanks", "--trainer.callbacks.directory", str(root)]
    command = [sys.executable, str(Path(__file__)), *cis_args(root / "runs"), *DDP, *record]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(2)]
    test_dirs = sorted(p.parent for p in (root / "runs").rglob("results.csv"))
    return {"output": done.stdout + done.stderr, "ranks": ranks, "test_dirs": test_dirs, "root": root}


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """The same fit and test in this one process."""
    save_dir = tmp_path_factory.mktemp("single")
    fit = run(["fit", *cis_args(save_dir)])
    weights = {k: v.clone() for k, v in fit.model.network.state_dict().items()}
    test = run(["test", *cis_args(save_dir), "--ckpt_path", fit.trainer.checkpoint_callback.last_model_path])
    return {"task": fit.datamodule.task, "weights": weights, "results": results(Path(test.trainer.log_dir))}


def test_two_gloo_processes_train_and_test(ddp):
    assert "distributed_backend=gloo" in ddp["output"]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in ddp["output"]
    assert [r["world_size"] for r in ddp["ranks"]] == [2, 2]
    assert ddp["ranks"][0]["pid"] != ddp["ranks"][1]["pid"]
    assert "Traceback" not in ddp["output"]


def test_each_rank_draws_its_half_of_the_single_process_global_batch(ddp, single):
    halves = [r["batch"] for r in ddp["ranks"]]
    assert [h.shape for h in halves] == [(len(SEEDS), BATCH // 2, 100)] * 2
    global_batch = single["task"].sample(BATCH, 0, Stream.TRAIN)  # what one process draws at step 0
    assert torch.equal(torch.cat(halves, dim=1), global_batch)
    assert not torch.equal(halves[0], halves[1])


def test_the_mixing_matrix_is_identical_on_every_rank(ddp, single):
    assert torch.equal(ddp["ranks"][0]["mixing"], ddp["ranks"][1]["mixing"])
    assert torch.equal(ddp["ranks"][0]["mixing"], single["task"].mixing)


def test_the_all_reduced_gradient_is_the_gradient_of_the_global_batch_mean(ddp, single):
    # DDP averages the ranks' gradients of their per-rank means over B/2 rows: that is the gradient
    # of the mean over all B rows, which one process computes here from scratch.
    network = MLP(n_features=100, d_mlp=50, seeds=SEEDS)
    task = single["task"]
    x = task.sample(BATCH, 0, Stream.TRAIN)
    per_sample_loss(network, task, x).mean(dim=1).sum().backward()
    for rank in ddp["ranks"]:
        for name, parameter in network.named_parameters():
            torch.testing.assert_close(rank["grads"][name], parameter.grad, rtol=1e-5, atol=1e-8)


def test_weights_are_identical_across_ranks_and_match_the_single_process_run(ddp, single):
    rank0, rank1 = (r["weights"] for r in ddp["ranks"])
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), name
        # Same data and gradients; only the order of float additions differs.
        torch.testing.assert_close(value, single["weights"][name], rtol=1e-4, atol=1e-6)


def test_ddp_test_writes_results_once_with_the_single_process_numbers(ddp, single):
    assert len(ddp["test_dirs"]) == 1  # one results.csv, from rank zero
    rows = results(ddp["test_dirs"][0])
    assert [int(r["instance"]) for r in rows] == list(range(len(SEEDS)))
    for got, want in zip(rows, single["results"], strict=True):
        # The ranks evaluated disjoint halves of the same evaluation batches; summed, they give the
        # single-process sums, so L/p agrees far inside its standard error.
        lpf, err = float(want["loss_per_feature"]), float(want["loss_per_feature_stderr"])
        assert abs(float(got["loss_per_feature"]) - lpf) < 0.01 * err
        assert float(got["loss_per_feature_stderr"]) == pytest.approx(err, rel=1e-3)


def test_shards_of_a_sweep_train_each_instance_exactly_as_the_whole_sweep(tmp_path):
    # A sweep too large for one device is split into independent runs ("i/N" shards), e.g. one per
    # SLURM array task; instance k trains the same in its shard as in the whole sweep.
    sweep = [*tiny_args(tmp_path, steps=4), "--data.grid", '{"seed": [0, 1, 2]}', "--data.batch_size", "64"]
    whole = run(["fit", *sweep]).model.network.state_dict()
    for shard, instances in (("0/2", [0, 2]), ("1/2", [1])):
        part = run(["fit", *sweep, "--data.shard", shard])
        assert [i.seed for i in part.datamodule.task.instances] == instances
        for name, value in part.model.network.state_dict().items():
            torch.testing.assert_close(value, whole[name][instances], rtol=1e-5, atol=1e-7)


if __name__ == "__main__":
    # The DDP driver: python tests/lightning/test_ddp.py CIS_ARGS... (each rank runs this same command).
    fit = run(["fit", *sys.argv[1:]])
    run(["test", *sys.argv[1:], "--ckpt_path", fit.trainer.checkpoint_callback.last_model_path])
