"""The sweep figures: pure functions of result rows, and the `Figures` callback drawing them at the end of
a real `cis test` from the run's results.csv (PNG files, and images read back with TensorBoard's reader)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cis_lightning.analysis import plots
from cis_lightning.core.mixing import Mixing, build_mixing, effective_rank
from cis_lightning.evaluation import naive_loss_per_feature
from cis_lightning.lightning.cli import run
from tests.conftest import REPO, tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")

NAIVE = naive_loss_per_feature(100, 50)
PER_INSTANCE = ["alignment", "response", "weight_bars", "interference", "entry_fit"]
SWEEPS = {"sweep_sigma", "sweep_eval_p", "sweep_rank"}


# -- the pure functions ---------------------------------------------------------------------------
def row(**settings) -> dict:
    """A results.csv row with the columns the sweep figures read."""
    defaults = {"instance": 0, "p": 0.01, "configured_sigma": 0.02, "sigma": 0.02, "mixing.kind": "gaussian"}
    defaults |= {"mixing.symmetric": True, "mixing_effective_rank": 80.0, "learn_sigma": False}
    defaults |= {"loss_per_feature": 0.08, "loss_per_feature_stderr": 1e-3}
    return defaults | settings


def test_sweep_figures_draw_what_the_grid_varies():
    sigmas = [row(instance=k, configured_sigma=s) for k, s in enumerate((0.0, 0.02))]
    ranks = [row(instance=k, mixing_effective_rank=r) for k, r in enumerate((5.0, 50.0))]
    by_p = [row(instance=k, eval_p=q) for k in (0, 1) for q in (0.01, 0.1)]
    assert set(plots.sweep_figures(sigmas, [], NAIVE)) == {"sweep_sigma"}
    assert set(plots.sweep_figures(ranks, [], NAIVE)) == {"sweep_rank"}
    assert set(plots.sweep_figures([row(), row(instance=1)], by_p, NAIVE)) == {"sweep_eval_p"}
    assert plots.sweep_figures([row(configured_sigma=0.0)], by_p[:2], NAIVE) == {}  # one instance


def test_a_seed_grid_is_no_rank_sweep():
    """Random Gaussian M of different seeds differ slightly in effective rank; that is no sweep over rank."""
    ranks = [
        float(effective_rank(build_mixing(Mixing("gaussian"), 100, torch.Generator().manual_seed(s)))) for s in range(8)
    ]
    assert len(set(ranks)) == 8
    rows = [row(instance=k, seed=k, mixing_effective_rank=r) for k, r in enumerate(ranks)]
    assert plots.sweep_figures(rows, [], NAIVE) == {}


def test_the_sigma_figure_has_one_line_per_mixing_kind_and_symmetry():
    grid = [(kind, symmetric, s) for kind in ("gaussian", "low_rank") for symmetric in (False, True) for s in (0, 0.02)]
    rows = [row(**{"mixing.kind": k, "mixing.symmetric": str(sym), "configured_sigma": s}) for k, sym, s in grid]
    ax = plots.loss_against_sigma_figure(rows, NAIVE).axes[0]
    # matplotlib lists plain lines (the naive line) before error-bar containers in the legend.
    labels = ax.get_legend_handles_labels()[1]
    assert labels == [
        "naive",
        "gaussian, symmetric",
        "gaussian, asymmetric",
        "low_rank, symmetric",
        "low_rank, asymmetric",
    ]
    assert ax.get_title() == "Loss per feature against sigma (p = 0.01)"
    one_kind = [r for r in rows if r["mixing.kind"] == "gaussian"]
    labels = plots.loss_against_sigma_figure(one_kind, NAIVE).axes[0].get_legend_handles_labels()[1]
    assert labels == ["naive", "symmetric M", "asymmetric M"]


def test_the_evaluation_p_figure_has_one_line_per_trained_instance():
    rows = [row(instance=k, p=p) for k, p in enumerate((0.01, 0.01, 0.1))]
    by_p = [r | {"eval_p": q} for r in rows for q in (0.001, 0.01, 0.1, 1.0)]
    ax = plots.loss_against_eval_p_figure(by_p, rows, NAIVE).axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["naive", "p_train 0.01, instance 0", "p_train 0.01, instance 1", "p_train 0.1"]


# -- the callback in real runs --------------------------------------------------------------------
STEPS = 20
FAST_FIGURES = [
    "--trainer.callbacks.init_args.n_nonempty", "500",
    "--trainer.callbacks.init_args.n_grid", "2",
]  # fmt: skip


def fit_and_test(save_dir: Path, *extra: str, config: str = "configs/mlp_gaussian.yaml", max_instances: int = 1):
    """A real `cis fit` with callbacks/figures.yaml, then `cis test` of its last checkpoint (reading the
    run's config.yaml, as a user would). Returns the fit's and the test's run directories."""
    args = [*tiny_args(save_dir, config, STEPS), "--config", str(REPO / "callbacks" / "figures.yaml"), *FAST_FIGURES]
    args += ["--trainer.callbacks.init_args.max_instances", str(max_instances), *extra]
    fit = Path(run(["fit", *args]).trainer.log_dir)
    test = Path(run(["test", "--ckpt_path", str(fit / "checkpoints" / "last.ckpt")]).trainer.log_dir)
    assert test != fit
    return fit, test


def image_tags(run_dir: Path) -> set[str]:
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    return set(events.Tags()["images"])


def sweep_pngs(run_dir: Path) -> set[str]:
    return {png.stem for png in (run_dir / "figures").glob("sweep_*.png")}


def assert_drawn(run_dir: Path, name: str) -> None:
    """The PNG is a real picture (many colours, not a blank canvas) and TensorBoard holds the same image."""
    pixels = imread(run_dir / "figures" / f"{name}.png")
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 20
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    (image,) = events.Images(f"figures/{name}")
    assert (image.height, image.width) == pixels.shape[:2]


@pytest.fixture(scope="module")
def sigma_sweep(tmp_path_factory) -> tuple[Path, Path]:
    """fit and test of K = 3 instances at sigma 0, 0.02 and 0.04, per-instance figures for the first 2."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        grid = ["--data.grid", json.dumps({"sigma": [0.0, 0.02, 0.04]})]
        return fit_and_test(tmp_path_factory.mktemp("runs"), *grid, max_instances=2)
    finally:
        torch.set_num_threads(threads)


def test_a_sigma_grid_draws_loss_against_sigma_at_the_end_of_test(sigma_sweep):
    _, test = sigma_sweep
    assert sweep_pngs(test) == {"sweep_sigma"}  # one p, one M: no other sweep
    assert_drawn(test, "sweep_sigma")
    assert image_tags(test) & {f"figures/{name}" for name in SWEEPS} == {"figures/sweep_sigma"}


def test_fit_draws_no_sweep_figures(sigma_sweep):
    fit, _ = sigma_sweep
    assert not (fit / "results.csv").exists()
    assert sweep_pngs(fit) == set()


def test_max_instances_caps_the_per_instance_figures(sigma_sweep):
    for run_dir in sigma_sweep:
        pngs = {png.name for png in (run_dir / "figures").glob("*_instance_*.png")}
        assert pngs == {f"{name}_instance_{k}.png" for name in PER_INSTANCE for k in (0, 1)}
        tags = image_tags(run_dir)
        assert {f"figures/{name}/instance_{k}" for name in PER_INSTANCE for k in (0, 1)} <= tags
        assert not any(tag.endswith("/instance_2") for tag in tags)
        assert (run_dir / "figures" / "loss_against_p.png").is_file()  # all three instances in one plot


def test_a_one_instance_run_draws_no_sweep_figures(tmp_path):
    _, test = fit_and_test(tmp_path, "--model.test_feature_probabilities", "[0.01, 0.1]")
    assert (test / "results_by_p.csv").is_file()
    assert sweep_pngs(test) == set()
    assert not any(tag.startswith("figures/sweep_") for tag in image_tags(test))
    assert {f"figures/{name}" for name in PER_INSTANCE} <= image_tags(test)


def test_a_p_grid_with_test_feature_probabilities_draws_loss_against_evaluation_p(tmp_path):
    grid = ["--data.grid", json.dumps({"feature_probability": [0.01, 0.1]})]
    _, test = fit_and_test(tmp_path, *grid, "--model.test_feature_probabilities", "[0.01, 0.1, 1.0]")
    assert sweep_pngs(test) == {"sweep_eval_p"}
    assert_drawn(test, "sweep_eval_p")


def test_a_rank_grid_draws_loss_and_learned_sigma_against_effective_rank(tmp_path):
    # rank_study.yaml: low-rank, tied, flat-spectrum M (effective rank = rank exactly) and a learned sigma.
    grid = ["--data.grid", json.dumps({"mixing.rank": [5, 50]})]
    _, test = fit_and_test(tmp_path, *grid, config="configs/experiments/rank_study.yaml")
    assert sweep_pngs(test) == {"sweep_rank"}
    assert_drawn(test, "sweep_rank")


def test_max_instances_must_be_positive(tmp_path, capsys):
    args = [*tiny_args(tmp_path, steps=1), "--config", str(REPO / "callbacks" / "figures.yaml")]
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", *args, "--trainer.callbacks.init_args.max_instances", "0"])
    assert exit_info.value.code == 2
    assert "Figures.max_instances: must be a positive integer, got 0" in capsys.readouterr().err
