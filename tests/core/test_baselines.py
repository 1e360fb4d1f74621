"""Hand-made baselines: closed forms, the offset scan, the semi-NMF constraint, and `cis test` without training."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from cis_lightning import ConfigError, Instance, Mixing, Task, evaluate, expand_grid
from cis_lightning.cli import main
from cis_lightning.core.baselines import (
    SVD,
    Naive,
    NaiveOffset,
    SemiNMF,
    Zero,
    offset_grid,
    offset_scan,
    semi_nmf,
    svd_factors,
    target_matrix,
)
from cis_lightning.evaluation import loss_per_feature_limit
from cis_lightning.lightning.cli import run

from ..conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

N, H = 100, 50


def fitted(model_class, task: Task, **kwargs):
    model = model_class(n_features=task.n_features, d_mlp=H, seeds=[0] * task.n_instances, **kwargs)
    model.fit_to(task)
    return model


def clean_task(*ps: float) -> Task:
    return Task(expand_grid(Instance(), {"feature_probability": list(ps)}), N)


def gaussian_task(sigmas: list[float], exactly_one_active: bool = False) -> Task:
    base = Instance(mixing=Mixing(kind="gaussian", symmetric=True))
    return Task(expand_grid(base, {"sigma": sigmas}), N, exactly_one_active)


def test_zero_model_at_m_zero_is_exactly_one_sixth():
    task = clean_task(0.01)
    assert loss_per_feature_limit(fitted(Zero, task), task).item() == pytest.approx(
        1 / 6, rel=1e-6
    )  # float32 forward passes


def test_naive_model_is_exactly_n_minus_d_mlp_over_n_over_six():
    task = clean_task(0.01)
    expected = (N - H) / N / 6
    assert loss_per_feature_limit(fitted(Naive, task), task).item() == pytest.approx(
        expected, rel=1e-6
    )  # float32 forward passes


def test_naive_model_matches_the_closed_form_at_any_p_within_the_standard_error():
    """Features are independent, so the naive L / p is (n - h) / n / 6 at every p, not only p -> 0."""
    task = clean_task(0.05)
    result = evaluate(fitted(Naive, task), task, n_nonempty=5000, batch_size=8192)
    error = (result.loss_per_feature - (N - H) / N / 6).abs()
    assert torch.all(error <= 4 * result.stderr + 1e-12), (result.loss_per_feature, result.stderr)


def test_offset_scan_finds_the_closed_form_optimum_at_p_1():
    """On clean labels L(b) is quadratic with minimum b* = p / (8/3 + (h - 1) p) (see offset_scan)."""
    best, _ = offset_scan(clean_task(1.0), H)
    closed_form = 1 / (8 / 3 + (H - 1))
    step = float(offset_grid()[2] / offset_grid()[1])  # ratio of neighbouring log-spaced grid points
    assert best.item() > 0
    assert closed_form / step**1.5 < best.item() < closed_form * step**1.5


@pytest.mark.parametrize("p", [0.001, 0.005])
def test_offset_scan_finds_no_offset_below_p_0_01(p):
    best, lpf = offset_scan(clean_task(p), H)
    assert best.item() == 0.0
    assert lpf.shape == (1, len(offset_grid()))


def test_naive_offset_model_reports_its_fitted_offset():
    task = clean_task(1.0)
    model = fitted(NaiveOffset, task)
    offset = model.describe_instance(0)["offset"]
    assert offset > 0
    assert torch.all(model.w_out[0, H:, :] == offset) and torch.all(model.w_out[0, :H, :] == torch.eye(H))


def test_svd_model_is_the_rank_d_mlp_truncation_with_positive_largest_input_weights():
    task = gaussian_task([0.03, 0.06])
    target = target_matrix(task)
    w_in, w_out = svd_factors(target, H)
    singular = torch.linalg.svdvals(target)
    # Eckart-Young: the squared error of the best rank-h approximation is the sum of the dropped s_i^2.
    error = torch.linalg.matrix_norm(target - w_out @ w_in).pow(2)
    torch.testing.assert_close(error, singular[:, H:].pow(2).sum(-1))
    largest = w_in.gather(2, w_in.abs().argmax(dim=2, keepdim=True))
    assert torch.all(largest > 0)
    model = fitted(SVD, task)
    assert torch.allclose(model.w_in.double(), w_in, atol=1e-6)


def test_semi_nmf_factors_are_non_negative_and_beat_the_constrained_svd():
    task = gaussian_task([0.005, 0.02, 0.04])
    target = target_matrix(task)
    w_in, w_out = semi_nmf(target, H, iterations=200)
    assert w_in.shape == (3, H, N) and w_out.shape == (3, N, H)
    assert torch.all(w_in >= 0)
    svd_in, svd_out = svd_factors(target, H)
    constrained_svd = torch.linalg.matrix_norm(target - svd_out @ svd_in.clamp_min(0))
    nmf = torch.linalg.matrix_norm(target - w_out @ w_in)
    assert torch.all(nmf < constrained_svd), (nmf, constrained_svd)


def test_semi_nmf_model_beats_naive_for_small_sigma():
    """The paper's claim for exactly-one-active data, measured exactly."""
    task = gaussian_task([0.01, 0.02], exactly_one_active=True)
    model = fitted(SemiNMF, task, iterations=200)
    assert torch.all(model.reconstruction_error > 0)
    naive = loss_per_feature_limit(fitted(Naive, task), task)
    assert torch.all(loss_per_feature_limit(model, task) < naive)


def test_baselines_have_no_trainable_parameters():
    for model_class in (Zero, Naive, NaiveOffset, SVD, SemiNMF):
        assert sum(p.numel() for p in model_class(n_features=N, d_mlp=H, seeds=[0, 1]).parameters()) == 0


def test_fitting_a_baseline_is_refused_with_one_clear_line(tmp_path, capsys):
    config = str(REPO / "configs/experiments/semi_nmf.yaml")
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "fit",
                "--config",
                config,
                "--trainer.logger.init_args.save_dir",
                str(tmp_path),
                "--trainer.max_steps",
                "1",
            ]
        )
    assert stop.value.code == 2
    assert "cis: error: model.network: SemiNMF has no trainable parameters" in capsys.readouterr().err


def test_cis_test_evaluates_a_baseline_from_its_config_alone(tmp_path):
    """No checkpoint, no training: the naive baseline on exactly-one-active data scores (n - h) / n / 6."""
    cli = run(
        [
            "test",
            "--config", str(REPO / "configs/experiments/semi_nmf.yaml"),
            "--model.network", "Naive",
            "--data.grid", '{"sigma": [0.0]}',
            "--data.eval_nonempty_samples", "20000",
            "--data.eval_batch_size", "8192",
            "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path),
        ]
    )  # fmt: skip
    with (Path(cli.trainer.log_dir) / "results.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["model"] == "Naive"
    lpf, stderr = float(row["loss_per_feature"]), float(row["loss_per_feature_stderr"])
    assert abs(lpf - (N - H) / N / 6) <= 4 * stderr + 1e-7  # exact strata: float32 rounding only


@pytest.mark.parametrize("baseline", [SVD, SemiNMF])
@pytest.mark.parametrize(("orientation", "transposed"), [("direct", False), ("authors", True)])
def test_each_orientation_implements_the_matrix_it_claims(baseline, orientation, transposed):
    """With as many neurons as features both factorisations are exact: W_out W_in = I + sigma M ("direct")
    or its transpose I + sigma M^T (the authors' assignment), which differ for an asymmetric M."""
    n, sigma = 10, 0.2
    task = Task([Instance(sigma=sigma, mixing=Mixing(kind="gaussian"))], n, exactly_one_active=True)
    model = baseline(n_features=n, d_mlp=n, orientation=orientation)
    model.fit_to(task)
    a = torch.eye(n) + sigma * task.mixing[0]
    claimed, other = (a.T, a) if transposed else (a, a.T)
    product = model.w_out[0] @ model.w_in[0]
    assert torch.allclose(product, claimed, atol=1e-4)
    assert (product - other).abs().max() > 0.05
    assert model.describe_instance(0)["orientation"] == orientation


def test_an_unknown_orientation_is_refused_naming_the_field():
    with pytest.raises(ConfigError) as error:
        SVD(n_features=4, d_mlp=2, orientation="sideways")
    assert error.value.field == "model.network.init_args.orientation"
