"""load_run rebuilds a finished run from its directory or checkpoint: the same network, the same task
(M and a learned sigma), the config and the test results; without importing Lightning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cis_lightning import load_run
from cis_lightning.analysis import total_mixing
from cis_lightning.core.errors import ConfigError
from cis_lightning.core.mixing import embedding_mixing
from cis_lightning.core.task import Stream
from cis_lightning.lightning.cli import run
from tests.conftest import tiny_args


def tiny(save_dir: Path, config: str, steps: int) -> list[str]:
    return tiny_args(save_dir, f"configs/{config}", steps, log_every_n_steps=None)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two instances (seeds 0 and 1) with a learned sigma, fitted 20 steps, then tested from last.ckpt."""
    save_dir = tmp_path_factory.mktemp("runs")
    args = tiny(save_dir, "mlp_gaussian.yaml", 20) + ["--data.grid", "{seed: [0, 1]}", "--data.learn_sigma", "true"]
    fit = run(["fit", *args])
    fit_dir = Path(fit.trainer.log_dir)
    test = run(["test", *args, "--ckpt_path", str(fit_dir / "checkpoints" / "last.ckpt")])
    return fit, fit_dir, Path(test.trainer.log_dir)


def test_a_run_directory_gives_back_the_trained_network_and_task(sweep):
    fit, fit_dir, _ = sweep
    loaded = load_run(fit_dir)
    trained = fit.model
    assert type(loaded.network) is type(trained.network) and loaded.network.n_instances == 2
    for mine, theirs in ((loaded.network, trained.network), (loaded.task, trained.task)):
        reference = theirs.state_dict()
        assert all(torch.equal(value, reference[key]) for key, value in mine.state_dict().items())
    assert loaded.task.seeds.tolist() == [0, 1]
    assert not torch.equal(loaded.task.sigma.detach(), torch.full((2,), 0.03))  # the learned sigma, not the config's
    x = loaded.task.sample(512, 0, Stream.ANALYSIS)
    with torch.no_grad():
        assert torch.equal(loaded.network(x), trained.network(x))
    assert loaded.weights == fit_dir / "weights.pt" and loaded.results == []
    assert loaded.config["data"]["grid"] == {"seed": [0, 1]}


def test_a_checkpoint_loads_the_module_state_dict_under_network_and_task(sweep):
    _, fit_dir, _ = sweep
    checkpoint = fit_dir / "checkpoints" / "last.ckpt"
    from_checkpoint, from_directory = load_run(checkpoint), load_run(fit_dir)
    assert from_checkpoint.weights == checkpoint and from_checkpoint.directory == fit_dir
    # last.ckpt is written at the last step, so it holds the same state as the final weights.pt.
    for a, b in ((from_checkpoint.network, from_directory.network), (from_checkpoint.task, from_directory.task)):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_a_test_run_directory_gives_its_results_and_the_tested_checkpoint(sweep):
    _, fit_dir, test_dir = sweep
    tested = fit_dir / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="lies outside it"):  # never silently from outside the directory
        load_run(test_dir)
    loaded = load_run(test_dir, weights=tested)
    assert loaded.weights.resolve() == tested.resolve()
    assert [row["instance"] for row in loaded.results] == [0, 1]
    assert [row["seed"] for row in loaded.results] == [0, 1]
    assert all(isinstance(row["loss_per_feature"], float) and row["loss_per_feature"] > 0 for row in loaded.results)
    sigma = loaded.task.sigma_value().tolist()
    assert [row["sigma"] for row in loaded.results] == pytest.approx(sigma)


def test_the_residual_model_comes_back_with_its_embedding_and_mixing(tmp_path):
    fit = run(["fit", *tiny(tmp_path, "compressed_computation.yaml", 5), "--model.network.init_args.d_embed", "32"])
    loaded = load_run(fit.trainer.log_dir)
    assert torch.equal(loaded.network.w_embed, fit.model.network.w_embed)
    expected = embedding_mixing(fit.model.network.w_embed)  # M = I - W_E W_E^T; the task adds none
    assert torch.equal(total_mixing(loaded.network, loaded.task), expected)


def test_loading_needs_no_lightning(sweep):
    _, fit_dir, _ = sweep
    code = (
        "import sys, cis_lightning; run = cis_lightning.load_run(sys.argv[1]); "
        "assert not any(m == 'lightning' or m.startswith(('lightning.', 'pytorch_lightning')) for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code, str(fit_dir)], check=True, timeout=120)


def test_a_path_without_a_run_is_a_config_error_naming_the_path(tmp_path):
    with pytest.raises(ConfigError, match=r"^path: .*does not exist"):
        load_run(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"^path: no config.yaml"):
        load_run(tmp_path)
