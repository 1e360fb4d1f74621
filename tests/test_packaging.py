"""The wheel: every subpackage and every shipped config is inside it, and `cis` works from it outside a checkout.

The wheel is built once with pip (as a user's `pip install .` would) and unpacked into a folder
that goes first on PYTHONPATH; the commands run in an empty temporary directory, so nothing of
this checkout (configs/, callbacks/) is in reach.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package's wheel, built and unpacked; the folder to put on PYTHONPATH."""
    build = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(build), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = build.glob("cis_lightning-*.whl")
    site = build / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def cis(site: Path, cwd: Path, *args: str, module: str | None = "cis_lightning") -> subprocess.CompletedProcess:
    """`python -m module args` (`python args` for module None) in `cwd` with the unpacked wheel first on the path."""
    command = [sys.executable, *(["-m", module] if module else []), *args]
    env = os.environ | {"PYTHONPATH": str(site)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def shipped(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*.yaml")}


def test_the_wheel_holds_every_subpackage_and_every_config(installed):
    package = installed / "cis_lightning"
    source = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "cis_lightning").rglob("__init__.py")}
    inside = {p.parent.relative_to(installed).as_posix() for p in package.rglob("__init__.py")}
    assert source <= inside, f"subpackages missing from the wheel (pyproject's packages): {sorted(source - inside)}"
    assert shipped(package / "configs") == shipped(REPO / "configs") | {
        f"callbacks/{name}" for name in shipped(REPO / "callbacks")
    }


def test_the_package_runs_from_the_wheel_outside_a_checkout(installed, tmp_path):
    where = cis(installed, tmp_path, "-c", "import cis_lightning; print(cis_lightning.__file__)", module=None)
    assert where.returncode == 0 and where.stdout.strip().startswith(str(installed)), where.stderr


def test_cis_configs_lists_the_shipped_configs_by_name(installed, tmp_path):
    listed = cis(installed, tmp_path, "configs")
    assert listed.returncode == 0, listed.stderr
    names = set(listed.stdout.split())
    assert {"configs/mlp_gaussian.yaml", "configs/experiments/sigma_sweep.yaml", "callbacks/alignment.yaml"} <= names


def test_demo_fit_test_and_report_work_from_the_wheel_by_config_name(installed, tmp_path):
    """The demo with its shipped config, a fit of a config named without path or suffix plus a callback
    preset, and `cis report` on the results: all in a directory that holds no configs."""
    short = ["--trainer.max_steps", "20", "--data.batch_size", "128", "--data.eval_nonempty_samples", "2000"]
    demo = cis(installed, tmp_path, *short, module="cis_lightning.demo")
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert "beat" in demo.stdout and (tmp_path / "runs" / "compressed_computation").is_dir()
    fit = cis(installed, tmp_path, "fit", "--config", "mlp_gaussian", "--config", "callbacks/per_feature_loss", *short)
    assert fit.returncode == 0, fit.stderr[-2000:]
    run_dir = tmp_path / "runs" / "mlp_gaussian" / "version_0"
    test = cis(installed, tmp_path, "test", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"))
    assert test.returncode == 0, test.stderr[-2000:]
    report = cis(installed, tmp_path, "report", "runs", "--output", "report.md")
    assert report.returncode == 0, report.stderr[-2000:]
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.json").is_file()


def test_an_unknown_config_name_is_one_line_naming_the_field(installed, tmp_path):
    bad = cis(installed, tmp_path, "fit", "--config", "no_such_config")
    assert bad.returncode == 2 and bad.stderr.startswith("cis: error: config") and len(bad.stderr.splitlines()) == 1


def test_reproduce_runs_experiments_side_by_side_from_the_wheel_with_progress_lines(installed, tmp_path):
    only = ["--only", "offset_baseline", "eigen_alignment"]
    done = cis(installed, tmp_path, "reproduce", "--fast", *only, "--threads", "1", "--jobs", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    for label in ("[1/2] offset_baseline", "[2/2] eigen_alignment"):
        assert f"reproduce {label}: started" in lines
        assert any(line.startswith(f"reproduce {label}: fit 1 of 1: 2,000 steps") for line in lines)
        assert any(line.startswith(f"reproduce {label}: done in") for line in lines)
    report = (tmp_path / "runs" / "reproduce-fast" / "report.md").read_text()
    assert "1 CPU thread(s) per job, 2 job(s)): offset_baseline" in report and "eigen_alignment" in report
    assert "minutes of wall time" in report
