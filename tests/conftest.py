"""Shared helpers: tiny but real command lines for the `cis` CLI, a hand-made sparse batch, the naive model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cis_lightning.core.models import MLP
from cis_lightning.core.task import SparseInput

REPO = Path(__file__).resolve().parents[1]


def tiny_args(
    save_dir: Path, config: str = "configs/mlp_gaussian.yaml", steps: int = 20, log_every_n_steps: int | None = 5
) -> list[str]:
    """Arguments that make any config train and evaluate in about a second (None: the default logging interval)."""
    logging = [] if log_every_n_steps is None else ["--trainer.log_every_n_steps", str(log_every_n_steps)]
    return [
        "--config",
        str(REPO / config),
        "--trainer.max_steps",
        str(steps),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        *logging,
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
        "--data.batch_size",
        "256",
        "--data.eval_nonempty_samples",
        "2000",
        "--data.eval_batch_size",
        "4096",
    ]


@pytest.fixture
def tiny(tmp_path: Path):
    """tiny(config, steps) -> argument list writing under this test's tmp_path."""
    return lambda config="configs/mlp_gaussian.yaml", steps=20: tiny_args(tmp_path / "runs", config, steps)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: on a shared 2-core machine torch's thread pool spins against other
    processes, and these tiny matmuls gain nothing from threads (measured 8x slower with 2 threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hand_made_batch():
    """B = 3, n = 3: sample 0 has features 0 (0.5) and 2 (-1.0), sample 1 none, sample 2 feature 2
    (0.25); one padding entry (row B = 3)."""
    return SparseInput(
        row=torch.tensor([[0, 0, 2, 3]]),
        feature=torch.tensor([[0, 2, 2, 0]]),
        value=torch.tensor([[0.5, -1.0, 0.25, 0.0]]),
        batch_size=3,
        n_features=3,
    )


def naive_mlp(n: int, d: int):
    """The naive model as an MLP: feature i < d gets neuron i (W_in = W_out^T = [I_d | 0]), the rest output 0."""
    model = MLP(n_features=n, d_mlp=d)
    with torch.no_grad():
        model.w_in.zero_()
        model.w_out.zero_()
        model.w_in[0, :, :d] = torch.eye(d)
        model.w_out[0, :d, :] = torch.eye(d)
    return model
