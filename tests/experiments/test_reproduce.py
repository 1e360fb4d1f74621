"""`cis reproduce`'s progress lines, from a real fit and test with the callback it adds."""

from __future__ import annotations

import re

import pytest

from cis_lightning.experiments.reproduce import Progress, cost
from cis_lightning.lightning.cli import run

from ..conftest import tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")

LINE = re.compile(
    r"reproduce \[1/1\] demo: fit 1 of 1: step (\d+)/30 \((\d+)%\), [\d.]+ min so far, about ([\d.]+) min left"
)


def test_progress_lines_name_the_step_and_the_time_left_then_the_test(tmp_path, capsys):
    args = tiny_args(tmp_path / "runs", steps=30)
    progress = Progress("[1/1] demo", fits=1, every=0.0)  # a line after every step
    fit = run(["fit", *args], callbacks=[progress])
    run(["test", *args, "--ckpt_path", str(fit.trainer.checkpoint_callback.last_model_path)], callbacks=[progress])
    out = capsys.readouterr().out
    assert "reproduce [1/1] demo: fit 1 of 1: 30 steps" in out
    steps = [(int(s), int(pct), float(left)) for s, pct, left in LINE.findall(out)]
    assert [s for s, _, _ in steps] == list(range(1, 31))  # every step, in order
    assert all(pct == round(100 * s / 30) for s, pct, _ in steps)
    assert steps[-1][2] == 0.0  # nothing left at the last step
    assert out.index("reproduce [1/1] demo: testing MLP") > out.index("step 30/30")


def test_the_costliest_experiments_start_first():
    """`--jobs` orders by instance-steps of training: the K = 82 sweep before the one-model eigen run."""
    assert cost("sigma_sweep", fast=False) == 82 * 10_000
    assert cost("eigen_alignment", fast=False) == 20_000
    assert cost("sigma_sweep", fast=True) == 82 * 1_000  # the fast schedule's steps (its coarser grid is not counted)
