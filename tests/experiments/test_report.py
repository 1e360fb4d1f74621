"""`cis report`: results.csv files of real and hand-made runs into one Markdown page with figures and verdicts."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from cis_lightning.cli import main
from cis_lightning.evaluation import naive_loss_per_feature
from cis_lightning.experiments.report import (
    _lpf,
    _timing,
    rank_by_inner_dimension,
    running_average,
    training_curves,
)
from cis_lightning.experiments.reproduce import record_timing
from cis_lightning.lightning.cli import run
from cis_lightning.runs.results import write_results

from ..conftest import REPO, tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")

NAIVE = naive_loss_per_feature(100, 50)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(directory: Path, experiment: str, rows: list[dict]) -> None:
    """A test directory as `cis test` leaves it: results.csv (with the naive L/p of 100 features and 50
    neurons) and the config naming the experiment."""
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(yaml.safe_dump({"trainer": {"logger": {"init_args": {"name": experiment}}}}))
    write_results(directory / "results.csv", [{"naive_loss_per_feature": NAIVE} | row for row in rows])


def sweep_rows(losses: dict[tuple[bool, float], float], stderr: float = 1e-4) -> list[dict]:
    return [
        {"model": "MLP", "sigma": s, "configured_sigma": s, "mixing.symmetric": sym, "loss_per_feature": lpf,
         "loss_per_feature_stderr": stderr}
        for (sym, s), lpf in losses.items()
    ]  # fmt: skip


def claim_line(report: str, claim: str) -> str:
    return next(line for line in report.splitlines() if line.startswith(f"| {claim} |"))


DIP = "The advantage grows with sigma up to an optimum and then shrinks"
SYMMETRIC = "Asymmetric noise helps less than symmetric"


def test_report_supports_a_claim_whose_numbers_show_it(tmp_path):
    losses = {(True, 0.0): 0.085, (True, 0.03): 0.070, (True, 0.08): 0.110}
    losses |= {(False, 0.0): 0.085, (False, 0.03): 0.080, (False, 0.08): 0.120}
    write_run(tmp_path / "runs" / "sigma_sweep" / "version_1", "sigma_sweep", sweep_rows(losses))
    output = main(["report", str(tmp_path / "runs"), "--output", str(tmp_path / "out" / "report.md")])
    assert output is None
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| yes |" in claim_line(report, DIP)
    assert "0.0700 ± 0.0001" in claim_line(report, DIP)
    assert "| yes |" in claim_line(report, SYMMETRIC)
    figure = tmp_path / "out" / "report_sigma_sweep.png"
    assert figure.read_bytes()[:8] == PNG_MAGIC
    assert "(report_sigma_sweep.png)" in report


def test_a_rerun_replaces_the_versions_it_repeats_and_other_directories_stay(tmp_path):
    """Of one run directory's versions (a rerun adds version_N + 1) the report uses the newest of
    each model; the same experiment under another save_dir is another run and stays."""
    old = {(True, 0.0): 0.085, (True, 0.03): 0.060, (True, 0.08): 0.110}
    new = {(True, 0.0): 0.085, (True, 0.03): 0.070, (True, 0.08): 0.110}
    write_run(tmp_path / "runs" / "sigma_sweep" / "version_2", "sigma_sweep", sweep_rows(old))
    write_run(tmp_path / "runs" / "sigma_sweep" / "version_10", "sigma_sweep", sweep_rows(new))  # newer than 2
    main(["report", str(tmp_path / "runs"), "--output", str(tmp_path / "report.md")])
    line = claim_line((tmp_path / "report.md").read_text(), DIP)
    assert "0.0700 ± 0.0001" in line and "0.0600" not in line
    write_run(tmp_path / "other" / "sigma_sweep" / "version_0", "sigma_sweep", sweep_rows(old))
    main(["report", str(tmp_path / "runs"), str(tmp_path / "other"), "--output", str(tmp_path / "both.md")])
    assert "0.0600 ± 0.0001" in claim_line((tmp_path / "both.md").read_text(), DIP)  # the best of both runs


def test_report_rejects_a_claim_within_the_standard_error(tmp_path):
    """A dip smaller than two standard errors is no optimum."""
    losses = {(True, 0.0): 0.085, (True, 0.03): 0.0849, (True, 0.08): 0.110}
    write_run(tmp_path / "sigma_sweep" / "version_0", "sigma_sweep", sweep_rows(losses, stderr=1e-3))
    main(["report", str(tmp_path), "--output", str(tmp_path / "report.md")])
    assert "| **no** |" in claim_line((tmp_path / "report.md").read_text(), DIP)


def test_report_judges_the_sparse_dense_crossover_from_results_by_p(tmp_path):
    """A model trained at small p that beats naive at small evaluation p and loses at p = 1 supports the claim."""
    directory = tmp_path / "sparsity_regimes" / "version_1"
    rows = [
        {"model": "MLP", "instance": 0, "p": 0.001, "mixing": "gaussian", "sigma": 0.02, "loss_per_feature": 0.07,
         "loss_per_feature_stderr": 1e-4}
    ]  # fmt: skip
    write_run(directory, "sparsity_regimes", rows)
    by_p = [
        {"model": "MLP", "p": 0.001, "eval_p": q, "loss_per_feature": lpf, "loss_per_feature_stderr": 1e-4}
        for q, lpf in ((0.001, 0.07), (0.1, 0.09), (1.0, 0.12))
    ]
    with (directory / "results_by_p.csv").open("w") as f:
        writer = csv.DictWriter(f, fieldnames=list(by_p[0]))
        writer.writeheader()
        writer.writerows(by_p)
    main(["report", str(tmp_path), "--output", str(tmp_path / "report.md")])
    report = (tmp_path / "report.md").read_text()
    line = claim_line(
        report,
        "Trained at p = 0.001 with the gaussian M (sigma 0.02), the trained model beats the naive loss at small p "
        "and loses to it at large p",
    )
    assert "| yes |" in line and "at p = 1: 0.1200 ± 0.0001" in line


def test_report_collects_real_fit_test_and_baseline_runs(tmp_path):
    """A trained run (fit, then test from its checkpoint) and a baseline (test only) of one experiment."""
    save = tmp_path / "runs"
    common = [
        *tiny_args(save, "configs/experiments/semi_nmf.yaml"),
        "--data.grid", '{"sigma": [0.0, 0.02]}',
        "--trainer.logger.init_args.name", "semi_nmf",
    ]  # fmt: skip
    fit = run(["fit", *common, "--model.network", "MLP"])
    run(
        [
            "test",
            *common,
            "--model.network",
            "MLP",
            "--ckpt_path",
            str(Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"),
        ]
    )
    run(["test", *common, "--model.network", "Naive"])
    main(["report", str(save), "--output", str(tmp_path / "docs" / "report.md")])
    report = (tmp_path / "docs" / "report.md").read_text()
    assert "## Semi-NMF baseline (`semi_nmf.yaml`, `semi_nmf_trained.yaml`)" in report
    assert "Follows the authors' `paper_code/nb3_svd_nmf.py, nb8_test_baselines.py`" in report
    table = [line for line in report.splitlines() if line.startswith("| MLP |") or line.startswith("| Naive |")]
    assert len(table) == 4  # two models x two sigmas
    naive_clean = next(line for line in table if line.startswith("| Naive | 0 |"))
    assert naive_clean.split("|")[3].strip().startswith(f"{NAIVE:.3f}"[:4])  # (n - h) / n / 6 = 0.0833
    assert (tmp_path / "docs" / "report_semi_nmf.png").read_bytes()[:8] == PNG_MAGIC


def test_report_of_a_missing_directory_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["report", str(tmp_path / "nowhere")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == f"cis: error: report: no such run directory: {tmp_path / 'nowhere'}"


def test_experiment_configs_all_parse(capsys):
    """Every configs/experiments file is a valid `cis` config with the grid the paper asks for."""
    sizes = {}
    for config in sorted((REPO / "configs" / "experiments").glob("*.yaml")):
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(config), "--print_config"])
        out = capsys.readouterr().out
        sizes[config.stem] = int(out.rsplit("K = ", 1)[1].split()[0])
    assert sizes == {
        "eigen_alignment": 1,
        "mixing_comparison": 5,
        "offset_baseline": 4,
        "rank_study": 25,
        "semi_nmf": 8,
        "semi_nmf_trained": 1,
        "sigma_sweep": 82,
        "sparsity_regimes": 10,
        "transplant": 3,
    }


def test_reproduce_timings_of_several_invocations_are_kept_and_a_rerun_replaces_its_experiments(tmp_path):
    """`reproduce --only` run in parts (or side by side) records every part; the report lists them all."""

    def record(command: str, seconds: dict[str, float]) -> dict:
        return {"command": command, "fast": False, "threads": 1, "seconds": seconds, "total_seconds": 0.0}

    record_timing(tmp_path, record("first", {"semi_nmf": 120.0, "transplant": 60.0}))
    record_timing(tmp_path, record("second", {"sigma_sweep": 600.0}))
    record_timing(tmp_path, record("third", {"transplant": 90.0}))
    assert _timing([tmp_path]).splitlines() == [
        "Produced by:",
        "",
        "- `first` (full paper settings, 1 CPU thread(s) per job, 1 job(s)): semi_nmf 120 s; 2.0 minutes.",
        "- `second` (full paper settings, 1 CPU thread(s) per job, 1 job(s)): sigma_sweep 600 s; 10.0 minutes.",
        "- `third` (full paper settings, 1 CPU thread(s) per job, 1 job(s)): transplant 90 s; 1.5 minutes.",
    ]
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize(("clean", "verdict"), [(0.0830, "yes"), (0.0800, "**no**")])
def test_no_better_than_naive_means_within_one_percent_of_it(tmp_path, clean, verdict):
    """A clean model 0.4% below naive (far beyond its standard error) is no better; 4% below is better."""
    rows = [
        {"model": "MLP", "mixing": mixing, "sigma": 0.0, "configured_sigma": 0.0, "p": 0.01,
         "loss_per_feature": lpf, "loss_per_feature_stderr": 1e-5}
        for mixing, lpf in (("none", clean), ("embedding(WWt-I)", 0.0666))
    ]  # fmt: skip
    write_run(tmp_path / "mixing_comparison" / "version_0", "mixing_comparison", rows)
    main(["report", str(tmp_path), "--output", str(tmp_path / "report.md")])
    claim = (
        "With M = 0 the trained model is no better than naive (within 1%) at small p; "
        "with the embedding(WWt-I) M it beats naive"
    )
    assert f"| {verdict} |" in claim_line((tmp_path / "report.md").read_text(), claim)


@pytest.mark.parametrize(
    ("stderr", "shown"),
    [(1e-4, "0.0770 ± 0.0001"), (3.6e-5, "0.07696 ± 0.00004"), (0.0, "0.07696 (exact)")],
)
def test_loss_is_shown_to_the_first_digit_of_its_standard_error(stderr, shown):
    assert _lpf({"loss_per_feature": 0.0769587, "loss_per_feature_stderr": stderr}) == shown


def test_a_run_of_several_instances_logs_each_instances_training_curve(tmp_path):
    """The transplant figure splices per-instance curves read back from real TensorBoard event files."""
    args = [
        *tiny_args(tmp_path / "runs", "configs/experiments/transplant.yaml", steps=20),
        "--trainer.limit_val_batches",
        "0",
    ]
    fit = run(["fit", *args])
    curves = training_curves(Path(fit.trainer.log_dir))
    assert sorted(curves) == [0, 1, 2]
    steps, values = curves[0]
    assert steps == [4, 9, 14, 19]  # every 5 steps (tiny_args)
    assert all(v > 0 for k in curves for v in curves[k][1])
    assert curves[0][1] != curves[2][1]  # the embedding-trained and the clean model differ


def test_running_average_is_the_mean_of_the_last_window_values():
    assert running_average([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]


def test_rank_rows_are_summarised_by_inner_dimension_over_seeds():
    rows = [
        {"mixing.rank": 9.0, "mixing_effective_rank": e, "loss_per_feature": lpf, "sigma": s}
        for e, lpf, s in ((8.0, 0.08, 0.01), (10.0, 0.09, 0.03))
    ] + [{"mixing.rank": 1000.0, "mixing_effective_rank": 79.0, "loss_per_feature": 0.06, "sigma": 0.02}]
    full, low = rank_by_inner_dimension(rows)
    assert (full["rank"], full["seeds"], low["rank"], low["seeds"]) == (1000.0, 1, 9.0, 2)
    assert low["loss_per_feature"] == pytest.approx(0.085)
    assert low["loss_per_feature_sem"] == pytest.approx(0.005 / 2**0.5)  # population std 0.005 over sqrt(2)


def test_the_report_writes_its_numbers_as_json_beside_it(tmp_path):
    import json

    rows = [
        {"model": "SVD", "mixing": "gaussian", "configured_sigma": 0.01, "sigma": 0.01, "orientation": o,
         "loss_per_feature": lpf, "loss_per_feature_stderr": 0.0}
        for o, lpf in (("authors", 0.09), ("direct", 0.07))
    ]  # fmt: skip
    for row in rows:
        write_run(tmp_path / "runs" / "semi_nmf" / f"version_{row['orientation']}", "semi_nmf", [row])
    main(["report", str(tmp_path / "runs"), "--output", str(tmp_path / "report.md")])
    data = json.loads((tmp_path / "report.json").read_text())
    experiment = data["experiments"]["semi_nmf"]
    assert experiment["config"] == "configs/experiments/semi_nmf.yaml"
    assert sorted((r["orientation"], r["loss_per_feature"]) for r in experiment["rows"]) == [
        ("authors", 0.09),
        ("direct", 0.07),
    ]
    assert all(set(c) >= {"claim", "reproduced", "numbers"} for c in data["claims"])
