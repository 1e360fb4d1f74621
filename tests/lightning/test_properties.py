"""Property: every valid small configuration trains a few steps and tests, with finite losses.

Hypothesis draws from the whole valid space (both models and their options, every mixing kind and
its options, p, exactly-one-active data, fixed or learned sigma, one or two instances, any batch
size) and runs the real CLI in-process.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cis_lightning.core.mixing import MIXING_KINDS
from cis_lightning.lightning.cli import run
from tests.conftest import tiny_args

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def flag(name: str, value) -> list[str]:
    return [f"--{name}", json.dumps(value) if not isinstance(value, str) else value]


@st.composite
def valid_configs(draw) -> list[str]:
    """Command-line overrides of configs/mlp_gaussian.yaml that describe a valid small run."""
    n = draw(st.integers(2, 12))
    model = draw(st.sampled_from(["MLP", "ResidualMLP"]))
    args = flag("model.network.class_path", model) + flag("data.n_features", n)
    args += flag("model.network.init_args.d_mlp", draw(st.integers(1, n + 2)))
    if model == "MLP":
        for option in ("hidden_bias", "output_bias", "tied"):
            args += flag(f"model.network.init_args.{option}", draw(st.booleans()))
    else:
        args += flag("model.network.init_args.d_embed", draw(st.integers(1, 3 * n)))
        args += flag("model.network.init_args.n_layers", draw(st.integers(1, 2)))
    kind = draw(st.sampled_from(MIXING_KINDS))
    args += flag("data.mixing.kind", kind)
    if kind in ("gaussian", "low_rank"):
        args += flag("data.mixing.symmetric", draw(st.booleans()))
        args += flag("data.mixing.zero_diagonal", draw(st.booleans()))
        args += flag("data.mixing.support", draw(st.none() | st.integers(1, n)))
    if kind == "low_rank":
        args += flag("data.mixing.rank", draw(st.integers(1, 3 * n)))
        for option in ("tied", "normalize_rows"):
            args += flag(f"data.mixing.{option}", draw(st.booleans()))
    if kind == "embedding":
        args += flag("data.mixing.d_embed", draw(st.integers(1, 3 * n)))
    args += flag("data.feature_probability", draw(st.floats(0.01, 1.0)))
    args += flag("data.exactly_one_active", draw(st.booleans()))
    args += flag("data.sigma", draw(st.floats(0.0, 0.2)))
    args += flag("data.learn_sigma", draw(st.booleans()))
    seeds = draw(st.lists(st.integers(0, 1000), min_size=1, max_size=2, unique=True))
    args += flag("data.grid", {"seed": seeds})
    args += flag("data.batch_size", draw(st.integers(1, 64)))
    args += flag("model.lr", draw(st.floats(1e-4, 1e-2)))
    return args


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_configs())
def test_every_valid_small_config_trains_and_tests_with_finite_loss(overrides):
    with tempfile.TemporaryDirectory() as tmp:
        args = [*tiny_args(Path(tmp), steps=3), "--data.eval_nonempty_samples", "300", "--data.eval_batch_size", "1024"]
        fit = run(["fit", *args, *overrides])  # a non-finite loss would stop it with TrainingDiverged
        assert fit.trainer.global_step == 3
        assert all(torch.isfinite(p).all() for p in fit.model.parameters())
        last = fit.trainer.checkpoint_callback.last_model_path
        test = run(["test", *args, *overrides, "--ckpt_path", last])
        with open(Path(test.trainer.log_dir) / "results.csv") as file:
            rows = list(csv.DictReader(file))
        assert len(rows) == fit.datamodule.task.n_instances
        assert all(math.isfinite(float(row["loss_per_feature"])) for row in rows)
