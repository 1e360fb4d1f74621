"""Sweeps on the instance dimension: grid expansion, per-instance independence, step scaling, the sigma sweep."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml

from cis_lightning import Instance, Mixing, expand_grid
from cis_lightning.cli import main
from cis_lightning.core.task import SparseInput, Stream, grid_size, nonempty_steps, training_instances
from cis_lightning.lightning.cli import run

from ..conftest import REPO, tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def weights(cli) -> dict:
    return torch.load(Path(cli.trainer.log_dir) / "weights.pt", weights_only=True)["network"]


def test_grid_is_the_cartesian_product_with_the_last_key_fastest():
    grid = {"sigma": [0.0, 0.01], "mixing.symmetric": [True, False], "seed": [3]}
    instances = expand_grid(Instance(mixing=Mixing(kind="gaussian")), grid)
    assert [(i.sigma, i.mixing.symmetric, i.seed) for i in instances] == [
        (0.0, True, 3),
        (0.0, False, 3),
        (0.01, True, 3),
        (0.01, False, 3),
    ]
    assert grid_size(grid) == len(instances) == 4


def test_grid_cases_set_several_fields_together():
    grid = {"cases": [{"mixing.kind": "none"}, {"mixing.kind": "gaussian", "sigma": 0.03}], "seed": [0, 1]}
    instances = expand_grid(Instance(), grid)
    assert [(i.mixing.kind, i.sigma, i.seed) for i in instances] == [
        ("none", 0.0, 0),
        ("none", 0.0, 1),
        ("gaussian", 0.03, 0),
        ("gaussian", 0.03, 1),
    ]
    assert grid_size(grid) == 4


def test_print_config_states_the_expanded_grid_size_and_stays_yaml(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(REPO / "configs/experiments/sigma_sweep.yaml"), "--print_config"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "# data.grid expands to K = 82 instances" in out  # 41 sigmas x 2 kinds
    assert len(yaml.safe_load(out)["data"]["grid"]["sigma"]) == 41


def test_an_unknown_grid_key_is_one_line_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", *tiny_args(tmp_path), "--data.grid", '{"sigmaa": [0.0]}'])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cis: error: data.grid.sigmaa: unknown grid key; allowed: feature_probability")
    assert "\n" not in err


def test_results_have_one_row_per_instance_with_the_grid_values(tiny):
    grid = '{"sigma": [0.0, 0.05], "mixing.symmetric": [true, false]}'
    fit = run(["fit", *tiny(steps=5), "--data.grid", grid])
    test = run(
        [
            "test",
            *tiny(),
            "--data.grid",
            grid,
            "--ckpt_path",
            str(Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"),
        ]
    )
    rows = read_csv(Path(test.trainer.log_dir) / "results.csv")
    assert [(float(r["configured_sigma"]), r["mixing.symmetric"]) for r in rows] == [
        (0.0, "True"),
        (0.0, "False"),
        (0.05, "True"),
        (0.05, "False"),
    ]
    assert [r["mixing"] for r in rows] == ["gaussian(sym)", "gaussian", "gaussian(sym)", "gaussian"]


def test_instance_k_of_a_k_run_equals_a_one_instance_run(tiny):
    """Same seed, same settings: the same initial weights, the same batches, the same updates."""
    grid = '{"sigma": [0.0, 0.02, 0.04], "seed": [5]}'
    many = weights(run(["fit", *tiny(steps=10), "--data.grid", grid]))
    one = weights(run(["fit", *tiny(steps=10), "--data.sigma", "0.02", "--data.seed", "5"]))
    for name in ("w_in", "w_out"):
        assert many[name].shape[0] == 3
        torch.testing.assert_close(many[name][1:2], one[name], rtol=1e-5, atol=1e-6)


def test_nonempty_steps_keep_the_non_empty_samples_equal():
    n = 10
    q = [1 - (1 - p) ** n for p in (0.05, 0.2, 1.0)]
    assert nonempty_steps(1000, [0.05, 0.2, 1.0], n) == [1000, round(1000 * q[0] / q[1]), round(1000 * q[0])]


def test_an_instance_trains_steps_zero_to_its_own_count_minus_one():
    assert training_instances([30, 10, 20], 9) == [0, 1, 2]
    assert training_instances([30, 10, 20], 10) == [0, 2]
    assert training_instances([30, 10, 20], 29) == [0]


def test_an_instance_with_its_own_shorter_schedule_equals_a_run_of_that_length(tmp_path):
    """equal_nonempty_samples: the dense instance trains T_1 = round(T q(0.25) / q(1)) steps, then stays frozen."""
    n, steps = 5, 20
    t_dense = round(steps * (1 - 0.75**n))  # q(1) = 1
    common = [
        *tiny_args(tmp_path / "runs", "configs/mlp_clean.yaml"),
        "--data.n_features", str(n),
        "--model.network.init_args.d_mlp", "3",
    ]  # fmt: skip
    pair = run(["fit", *common, "--trainer.max_steps", str(steps), "--model.equal_nonempty_samples", "true",
                "--data.grid", '{"feature_probability": [0.25, 1.0]}'])  # fmt: skip
    assert pair.model.instance_steps() == [steps, t_dense]
    sparse = run(["fit", *common, "--trainer.max_steps", str(steps), "--data.feature_probability", "0.25"])
    dense = run(["fit", *common, "--trainer.max_steps", str(t_dense), "--data.feature_probability", "1.0"])
    both = weights(pair)
    for name in ("w_in", "w_out"):
        torch.testing.assert_close(both[name][0:1], weights(sparse)[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(both[name][1:2], weights(dense)[name], rtol=1e-5, atol=1e-6)


def test_a_frozen_instance_draws_empty_training_batches(tmp_path):
    """From T_k on, instance k's batch is empty and the others' is drawn at their own p (sparse again)."""
    n, steps = 20, 30
    pair = run([
        "fit", *tiny_args(tmp_path / "runs", "configs/mlp_clean.yaml"),
        "--data.n_features", str(n),
        "--model.network.init_args.d_mlp", "5",
        "--trainer.max_steps", str(steps),
        "--model.equal_nonempty_samples", "true",
        "--data.grid", '{"feature_probability": [0.05, 1.0]}',
    ])  # fmt: skip
    t_sparse, t_dense = pair.model.instance_steps()
    assert t_sparse == steps > t_dense == round(steps * (1 - 0.95**n))
    datamodule, task = pair.datamodule, pair.datamodule.task
    before = datamodule.on_after_batch_transfer((int(Stream.TRAIN), t_dense - 1), 0)
    assert isinstance(before, torch.Tensor) and torch.count_nonzero(before[1]) > 0  # dense while p = 1 trains
    after = datamodule.on_after_batch_transfer((int(Stream.TRAIN), t_dense), 0)
    assert isinstance(after, SparseInput)
    dense = after.dense()
    assert torch.count_nonzero(dense[1]) == 0
    assert torch.equal(dense[0], task.sample(datamodule.batch_size, t_dense, feature_probability=[0.05, 0.0])[0])
    assert torch.count_nonzero(dense[0]) > 0


def test_a_fast_sigma_sweep_falls_with_sigma_before_rising(tmp_path):
    """The paper's shape at p = 0.01, symmetric M: L/p(0) > L/p(0.03) < L/p(0.08), beyond 3 standard errors."""
    args = [
        "--config", str(REPO / "configs/experiments/sigma_sweep.yaml"),
        "--data.grid", '{"mixing.symmetric": [true], "sigma": [0.0, 0.03, 0.08]}',
        "--trainer.max_steps", "800",
        "--data.batch_size", "512",
        "--data.eval_nonempty_samples", "20000",
        "--data.eval_batch_size", "16384",
        "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
    ]  # fmt: skip
    fit = run(["fit", *args])
    test = run(["test", *args, "--ckpt_path", str(Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt")])
    rows = read_csv(Path(test.trainer.log_dir) / "results.csv")
    (clean, middle, strong) = ((float(r["loss_per_feature"]), float(r["loss_per_feature_stderr"])) for r in rows)

    def below(a, b):
        return a[0] + 3 * math.hypot(a[1], b[1]) < b[0]

    assert below(middle, clean) and below(middle, strong), rows


def test_init_from_starts_from_the_network_weights_of_a_checkpoint(tiny):
    """The transplant experiment's mechanism: testing init_from weights equals testing that checkpoint."""
    fit = run(["fit", *tiny(steps=5)])
    checkpoint = str(Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt")
    restored = run(["test", *tiny(), "--ckpt_path", checkpoint])
    transplanted = run(["test", *tiny(), "--model.init_from", checkpoint])
    (a,) = read_csv(Path(restored.trainer.log_dir) / "results.csv")
    (b,) = read_csv(Path(transplanted.trainer.log_dir) / "results.csv")
    assert a["loss_per_feature"] == b["loss_per_feature"]


def test_init_from_a_missing_file_is_one_line_naming_the_field(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["test", *tiny(), "--model.init_from", str(tmp_path / "none.ckpt")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith("cis: error: model.init_from: no checkpoint file at")


def sweep_task(distinct: bool, shard: str | None = None):
    from cis_lightning.lightning.datamodule import CCDataModule

    grid = {"mixing.symmetric": [True, False], "sigma": [0.0, 0.02, 0.04]}
    module = CCDataModule(
        n_features=12, mixing=Mixing(kind="gaussian"), grid=grid, distinct_mixing=distinct, shard=shard
    )
    return module.task


def test_distinct_mixing_gives_every_instance_of_the_grid_its_own_m():
    """The authors' sigma sweep draws a fresh M for every (symmetric, sigma)."""
    task = sweep_task(distinct=True)
    m = task.mixing
    for a in range(len(m)):
        for b in range(a + 1, len(m)):
            assert not torch.equal(m[a], m[b])
    assert all(torch.equal(m[k], m[k].T) for k in range(3))  # the symmetric half stays symmetric
    assert not any(torch.equal(m[k], m[k].T) for k in range(3, 6))


def test_without_distinct_mixing_instances_of_one_seed_share_m():
    m = sweep_task(distinct=False).mixing
    assert all(torch.equal(m[k], m[0]) for k in range(3))  # the symmetric instances: one M
    assert all(torch.equal(m[k], m[3]) for k in range(3, 6))


def test_distinct_mixing_is_reproducible_and_keeps_the_data_and_shards():
    """Same seed, same matrices; a shard holds exactly its instances' matrices; the inputs do not change."""
    first, again, shared = sweep_task(True), sweep_task(True), sweep_task(False)
    assert torch.equal(first.mixing, again.mixing)
    assert torch.equal(sweep_task(True, shard="1/2").mixing, first.mixing[1::2])
    x, y = first.sample(64, step=5), shared.sample(64, step=5)
    assert torch.equal(x.dense() if hasattr(x, "dense") else x, y.dense() if hasattr(y, "dense") else y)


def test_an_explicit_mixing_seed_draws_m_from_it_and_is_kept_by_distinct_mixing():
    base = Instance(mixing=Mixing(kind="gaussian", seed=7), seed=0)
    from cis_lightning.core.task import Task, with_distinct_mixing

    (kept,) = with_distinct_mixing([base])
    assert kept.mixing.seed == 7
    other_data_seed = Task([Instance(mixing=Mixing(kind="gaussian", seed=7), seed=5)], 12).mixing
    assert torch.equal(Task([base], 12).mixing, other_data_seed)
