"""A learned sigma (data.learn_sigma) trains in its own AdamW param group at model.sigma_lr, with the weights' decay."""

from __future__ import annotations

import math

import pytest
import torch

from cis_lightning.lightning.cli import run

from ..conftest import tiny_args
from .test_bad_input import assert_fails_cleanly

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")]


def fit(tmp_path, steps: int, *extra: str):
    return run(["fit", *tiny_args(tmp_path / "runs", steps=steps), "--data.learn_sigma", "true", *extra])


def sigma_group(cli) -> dict:
    (optimizer,) = cli.trainer.optimizers
    (group,) = [g for g in optimizer.param_groups if any(p is cli.model.task.sigma for p in g["params"])]
    assert group["params"] == [cli.model.task.sigma]  # nothing else trains at sigma's rate
    return group


def test_the_sigma_group_gets_sigma_lr_and_the_weights_decay_like_the_authors(tmp_path):
    """The authors train sigma in the weights' AdamW, weight decay included (paper_code/mlpinsoup.py)."""
    cli = fit(tmp_path, 2, "--model.sigma_lr", "0.0002", "--model.weight_decay", "0.03")
    network, sigma = cli.trainer.optimizers[0].param_groups
    assert sigma is sigma_group(cli)
    assert (sigma["initial_lr"], sigma["weight_decay"]) == (0.0002, 0.03)
    assert (network["initial_lr"], network["weight_decay"]) == (cli.model.lr, 0.03)


def test_sigma_weight_decay_sets_the_sigma_group_alone(tmp_path):
    cli = fit(tmp_path, 2, "--model.sigma_weight_decay", "0")
    network, sigma = cli.trainer.optimizers[0].param_groups
    assert (sigma["weight_decay"], network["weight_decay"]) == (0.0, cli.model.weight_decay)


def test_weight_decay_shrinks_a_learned_sigma(tmp_path):
    """Decoupled decay multiplies sigma by (1 - lr_t wd) each step; Adam's own step moves it by at most
    lr_t * adam_step_bound(t), which a tiny sigma_lr with a huge decay makes small beside the decay."""
    steps, lr, wd, start = 5, 1e-6, 1000.0, 0.04
    cli = fit(
        tmp_path, steps, "--data.mixing.kind", "gaussian", "--data.sigma", str(start),
        "--model.sigma_lr", str(lr), "--model.sigma_weight_decay", str(wd),
    )  # fmt: skip
    beta1, beta2 = sigma_group(cli)["betas"]
    expected, slack = start, 0.0
    for t in range(steps):
        lr_t = lr * (1 + math.cos(math.pi * t / steps)) / 2
        expected, slack = (
            expected * (1 - lr_t * wd),
            slack * (1 - lr_t * wd) + lr_t * adam_step_bound(t + 1, beta1, beta2),
        )
    assert start - expected > 10 * slack  # the decay dominates
    assert abs(float(cli.datamodule.task.sigma.detach()[0]) - expected) <= slack + 1e-9


def adam_step_bound(t: int, beta1: float, beta2: float) -> float:
    """max |m_hat_t| / sqrt(v_hat_t) over all gradient sequences g_1 .. g_t (eps only makes it smaller).

    m_t = (1 - b1) sum_i b1^(t-i) g_i and v_t = (1 - b2) sum_i b2^(t-i) g_i^2; Cauchy-Schwarz with
    weights b2^(t-i) gives |m_t| / sqrt(v_t) <= (1 - b1) / sqrt(1 - b2) * sqrt(sum_{j<t} (b1^2 / b2)^j),
    and the bias corrections multiply it by sqrt(1 - b2^t) / (1 - b1^t). It is 1 at t = 1 and tends to
    7.3 for the default betas: the "step of about lr" is the typical case, not the worst.
    """
    gamma = beta1**2 / beta2
    moments = (1 - beta1) / math.sqrt(1 - beta2) * math.sqrt((1 - gamma**t) / (1 - gamma))
    return moments * math.sqrt(1 - beta2**t) / (1 - beta1**t)


def test_a_tiny_sigma_lr_bounds_how_far_sigma_moves(tmp_path):
    """No weight decay, so |sigma_T - sigma_0| <= sum_t lr_t * bound_t with the cosine lr_t over the T steps."""
    steps, sigma_lr, start = 30, 1e-6, 0.03
    cli = fit(
        tmp_path,
        steps,
        "--model.sigma_lr",
        str(sigma_lr),
        "--data.sigma",
        str(start),
        "--model.sigma_weight_decay",
        "0",
    )
    beta1, beta2 = sigma_group(cli)["betas"]
    lr = [sigma_lr * (1 + math.cos(math.pi * t / steps)) / 2 for t in range(steps)]  # step t + 1 uses lr[t]
    bound = sum(lr_t * adam_step_bound(t + 1, beta1, beta2) for t, lr_t in enumerate(lr))
    # About max_steps * sigma_lr: sum(lr) = sigma_lr (T + 1) / 2, and in the first 30 steps the bias
    # correction sqrt(1 - b2^t) keeps bound_t <= 1.3 (it grows to 2.2 at t = 100, 7.3 in the limit).
    assert bound <= steps * sigma_lr
    moved = abs(float(cli.model.task.sigma.detach()[0]) - start)
    assert 0 < moved <= bound, (moved, bound)


def test_an_instance_with_a_shorter_schedule_trains_sigma_like_a_run_of_that_length(tmp_path):
    """equal_nonempty_samples scales every group's update by lr_k(t) / lr(t): the sigma group's too."""
    n, steps = 5, 20
    t_dense = round(steps * (1 - 0.75**n))  # q(0.25) / q(1), q(1) = 1
    common = [
        *tiny_args(tmp_path / "runs", "configs/mlp_gaussian.yaml"),
        "--data.n_features", str(n),
        "--model.network.init_args.d_mlp", "3",
        "--data.learn_sigma", "true",
        "--model.sigma_lr", "0.001",
    ]  # fmt: skip
    pair = run(["fit", *common, "--trainer.max_steps", str(steps), "--model.equal_nonempty_samples", "true",
                "--data.grid", '{"feature_probability": [0.25, 1.0]}'])  # fmt: skip
    sparse = run(["fit", *common, "--trainer.max_steps", str(steps), "--data.feature_probability", "0.25"])
    dense = run(["fit", *common, "--trainer.max_steps", str(t_dense), "--data.feature_probability", "1.0"])
    both = pair.model.task.sigma.detach()
    assert both[0] != both[1]
    torch.testing.assert_close(both[0:1], sparse.model.task.sigma.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(both[1:2], dense.model.task.sigma.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("value", ["0", "-0.001", "abc"])
def test_a_bad_sigma_lr_is_one_line_naming_the_field(value, tmp_path, capsys):
    args = ["fit", *tiny_args(tmp_path / "runs"), "--data.learn_sigma", "true", "--model.sigma_lr", value]
    assert_fails_cleanly(args, tmp_path / "runs", capsys, "model.sigma_lr", "")


def test_a_fixed_sigma_stays_as_configured_beside_a_learned_one(tmp_path):
    """One (K,) sigma parameter: the learning instance's entry trains and decays, the fixed one never moves."""
    grid = '{"cases": [{"learn_sigma": false, "sigma": 0.5}, {"learn_sigma": true, "sigma": 0.05}]}'
    cli = fit(tmp_path, 30, "--data.mixing.kind", "gaussian", "--data.grid", grid, "--model.weight_decay", "0.5")
    sigma = cli.datamodule.task.sigma.detach()
    assert sigma[0].item() == 0.5  # float32 0.5 exactly: decay would have moved it
    assert sigma[1].item() != pytest.approx(0.05, abs=1e-6)
