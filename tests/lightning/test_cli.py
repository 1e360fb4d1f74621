"""The real LightningCLI end to end: fit, test from the checkpoint alone, results and errors."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cis_lightning.cli import main
from cis_lightning.lightning.cli import run
from cis_lightning.runs.results import RESULT_COLUMNS

from ..conftest import REPO


def read_results(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_fit_writes_a_complete_run_directory(tiny):
    cli = run(["fit", *tiny("configs/compressed_computation.yaml"), "--model.network.init_args.d_embed", "64"])
    run_dir = Path(cli.trainer.log_dir)
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    weights = torch.load(run_dir / "weights.pt", weights_only=True)
    assert set(weights) == {"network", "task"}
    assert weights["network"]["w_embed"].shape == (1, 100, 64)
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/loss_per_feature"} <= set(tags)
    assert all(torch.isfinite(torch.tensor([e.value for e in events.Scalars("train/loss")])))


def test_test_from_a_checkpoint_alone_writes_results_csv(tiny, capsys):
    fit = run(["fit", *tiny()])
    checkpoint = Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"
    test = run(["test", "--ckpt_path", str(checkpoint), "--trainer.enable_progress_bar", "false"])
    results = Path(test.trainer.log_dir) / "results.csv"
    rows = read_results(results)
    assert len(rows) == 1
    assert list(rows[0])[: len(RESULT_COLUMNS)] == list(RESULT_COLUMNS)
    row = rows[0]
    assert (row["model"], row["mixing"], float(row["sigma"]), float(row["p"])) == ("MLP", "gaussian(sym)", 0.03, 0.01)
    assert float(row["naive_loss_per_feature"]) == pytest.approx(50 / 100 / 6)
    assert float(row["loss_per_feature"]) > 0 and float(row["loss_per_feature_stderr"]) > 0
    assert "L/p" in capsys.readouterr().out


@pytest.mark.parametrize("allocation", ["variance", "proportional"])
@pytest.mark.parametrize("network", ["MLP", "ResidualMLP"])
def test_cis_test_is_the_stratified_evaluate_of_the_trained_model(tiny, network, allocation):
    """`cis test` runs evaluation.evaluate's plan through Lightning's test loop: the same strata, the
    same batches (by default allocated by variance from the same pilot), so the same L / p and stderr;
    a model with biases samples the one-feature stratum too."""
    from cis_lightning.core.task import Stream
    from cis_lightning.evaluation import evaluate

    extra = ["--model.network", network, "--model.network.init_args.d_mlp", "50"]
    if network == "MLP":  # with biases: nothing but the empty sample is exact
        extra += ["--model.network.init_args.hidden_bias", "true"]
    fit = run(["fit", *tiny(steps=10), *extra])
    checkpoint = Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"
    chosen = [] if allocation == "variance" else ["--data.eval_allocation", allocation]  # variance: the default
    test = run(["test", "--ckpt_path", str(checkpoint), "--trainer.enable_progress_bar", "false", *chosen])
    row = read_results(Path(test.trainer.log_dir) / "results.csv")[0]
    module, data = test.model, test.datamodule
    assert data.exact_strata == ((0,) if network == "MLP" else (0, 1)) and data.eval_allocation == allocation
    expected = evaluate(
        module.network,
        module.task,
        data.eval_nonempty_samples,
        data.eval_batch_size,
        Stream.TEST,
        allocation=allocation,
    )
    other = evaluate(
        module.network,
        module.task,
        data.eval_nonempty_samples,
        data.eval_batch_size,
        Stream.TEST,
        allocation="proportional" if allocation == "variance" else "variance",
    )
    assert expected.n_samples != other.n_samples  # the two allocations are told apart
    assert float(row["loss_per_feature"]) == pytest.approx(float(expected.loss_per_feature[0]), rel=1e-6)
    assert float(row["loss_per_feature_stderr"]) == pytest.approx(float(expected.stderr[0]), rel=1e-6)


def test_a_bad_eval_allocation_is_one_line_naming_the_field_and_the_values(tiny, capsys):
    with pytest.raises(SystemExit) as exit_:
        run(["fit", *tiny(), "--data.eval_allocation", "neyman"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "data.eval_allocation" in err and "'proportional', 'variance'" in err and "Traceback" not in err


def test_test_refuses_a_checkpoint_whose_matrices_differ_from_its_config(tiny, capsys):
    """The checkpoint's M is what would be evaluated and the config's settings what labels results.csv:
    when they disagree (an edited config, or a code change to how M is drawn) the test is refused."""
    fit = run(["fit", *tiny()])
    run_dir = Path(fit.trainer.log_dir)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["state_dict"]["task.mixing"].zero_()
    torch.save(checkpoint, run_dir / "checkpoints" / "zeroed.ckpt")
    with pytest.raises(SystemExit) as exit_:
        run(["test", f"--ckpt_path={run_dir / 'checkpoints' / 'zeroed.ckpt'}", "--trainer.enable_progress_bar=false"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "cis: error: ckpt_path:" in err and "another data.mixing" in err and "Traceback" not in err


def test_a_second_run_of_the_same_config_is_not_blocked(tiny):
    first = run(["fit", *tiny(steps=5)])
    second = run(["fit", *tiny(steps=5)])
    assert first.trainer.log_dir != second.trainer.log_dir


@pytest.mark.parametrize("config", ["compressed_computation", "mlp_embedding", "mlp_gaussian", "mlp_clean"])
def test_every_config_parses_with_the_papers_defaults(config, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(REPO / f"configs/{config}.yaml"), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    for setting in (
        "max_steps: 10000",
        "batch_size: 2048",
        "feature_probability: 0.01",
        "lr: 0.003",
        "weight_decay: 0.01",
    ):
        assert setting in printed


@pytest.mark.parametrize(
    ("override", "field"),
    [
        (["--data.feature_probability", "0"], "data.feature_probability"),
        (["--data.sigma", "-1"], "data.sigma"),
        (["--data.batch_size", "0"], "data.batch_size"),
        (["--model.network.init_args.d_mlp", "0"], "model.d_mlp"),
        (["--data.mixing.kind", "low_rank", "--data.mixing.rank", "-3"], "data.mixing.rank"),
        (["--model.lr", "-0.1"], "model.lr"),
        (["--model.threads", "0"], "model.threads"),
    ],
)
def test_bad_values_stop_before_training_with_one_message(tiny, tmp_path, capsys, override, field):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *tiny(), *override])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"cis: error: {field}:" in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "cis_lightning", "--help"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0
    assert all(command in done.stdout for command in ("fit", "validate", "test", "predict"))


def _progress_bars(cli) -> list:
    from lightning.pytorch.callbacks import ProgressBar

    return [c for c in cli.trainer.callbacks if isinstance(c, ProgressBar)]


def test_the_default_progress_bar_redraws_every_few_steps_and_a_configured_one_keeps_its_rate(tiny):
    from cis_lightning.lightning.cli import PROGRESS_BAR_REFRESH

    args = [*tiny(steps=2), "--trainer.enable_progress_bar", "true"]
    (bar,) = _progress_bars(run(["fit", *args]))
    assert bar.refresh_rate == PROGRESS_BAR_REFRESH > 1
    own = ["--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar", "--trainer.callbacks.refresh_rate", "3"]
    (bar,) = _progress_bars(run(["fit", *args, *own]))
    assert bar.refresh_rate == 3
    assert _progress_bars(run(["fit", *tiny(steps=2)])) == []  # enable_progress_bar false: none


def test_the_config_is_saved_in_the_run_directory(tiny):
    cli = run(["fit", *tiny(steps=3)])
    assert (Path(cli.trainer.log_dir) / "config.yaml").is_file()


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_trainer_gradient_clipping_still_clips(tiny, algorithm):
    """Adam's first step moves a weight by lr |g| / (|g| + eps): lr = 3e-3 for the gradients of this
    batch (|g| >> eps = 1e-8), at most 1e-4 lr for gradients clipped to 1e-12. A clip far above the
    gradients changes nothing."""

    def weights_after_one_step(*clip: str) -> dict:
        args = [*tiny(steps=1), "--trainer.limit_val_batches", "0", "--trainer.gradient_clip_algorithm", algorithm]
        return run(["fit", *args, *clip]).trainer.lightning_module.network.state_dict()

    free = weights_after_one_step()
    loose = weights_after_one_step("--trainer.gradient_clip_val", "1e6")
    tight = weights_after_one_step("--trainer.gradient_clip_val", "1e-12")
    for name, weight in free.items():
        assert torch.equal(loose[name], weight), name
        assert torch.isclose((weight - tight[name]).abs().max(), torch.tensor(3e-3), rtol=1e-3), name
