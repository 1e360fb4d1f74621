"""Issue 24: hostile inputs and faults get one line naming the field, and nothing is lost or overwritten.

One class per class of the issue. Every `cis` here is the real CLI, in-process (`run`) or as a real
process where a signal or a second process is the point; files are real files.
"""

from __future__ import annotations

import fcntl
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cis_lightning import load_run
from cis_lightning.cli import main
from cis_lightning.core.errors import ConfigError
from cis_lightning.core.sizes import FIELDS, check_memory, device_memory, memory_needed
from cis_lightning.experiments.reproduce import main as reproduce
from cis_lightning.lightning.checkpointing import read_checkpoint
from cis_lightning.lightning.cli import EXIT_FILE_SYSTEM, run
from cis_lightning.lightning.interrupts import EXIT_SIGINT
from cis_lightning.runs.config_files import MAX_EXPANDED_NODES, check_yaml, decode
from tests.conftest import REPO, tiny_args

pytestmark = pytest.mark.filterwarnings(
    "ignore:LightningCLI's args parameter", "ignore:Checkpoint directory", "ignore:The dirpath has changed"
)
NAME = "mlp_gaussian"  # the logger name of configs/mlp_gaussian.yaml, which tiny_args uses


def fails(args: list[str], capsys, status: int = 2) -> str:
    """The one `cis: error:` line of `cis ARGS`, which must exit `status` without a traceback."""
    with pytest.raises(SystemExit) as stopped:
        main(args)
    out, err = capsys.readouterr()
    assert stopped.value.code == status, err
    assert "Traceback" not in out + err
    messages = [line for line in err.splitlines() if line.startswith("cis: error:")]
    assert len(messages) == 1, err
    return messages[0]


def contents(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes: what must be unchanged after a refused command."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-step run: save_dir/mlp_gaussian/version_0 with config.yaml, last.ckpt and weights.pt."""
    save_dir = tmp_path_factory.mktemp("finished") / "runs"
    run(["fit", *tiny_args(save_dir, steps=2)])
    return save_dir / NAME / "version_0"


def copy_run(run_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the finished run: (its save_dir, its version_0)."""
    save_dir = tmp_path / "runs"
    shutil.copytree(run_dir, save_dir / NAME / "version_0")
    return save_dir, save_dir / NAME / "version_0"


def start_cis(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "cis_lightning", *args], cwd=REPO, stdout=out, stderr=out)


def wait_until(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the process ended before the condition held"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def locked(directory: Path) -> bool:
    """True while another process holds the run directory's flock."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


class TestAFitNeverOverwritesARun:
    def test_a_fresh_fit_into_a_finished_runs_version_is_refused_and_changes_nothing(self, finished, tmp_path, capsys):
        save_dir, run_dir = copy_run(finished, tmp_path)
        before = contents(run_dir)
        args = ["fit", *tiny_args(save_dir, steps=2), "--trainer.logger.init_args.version", "0"]
        message = fails(args, capsys)
        assert str(run_dir) in message and "--ckpt_path last" in message and "already holds a run" in message
        assert contents(run_dir) == before

    def test_a_fresh_fit_into_a_directory_with_checkpoints_is_refused(self, finished, tmp_path, capsys):
        save_dir, run_dir = copy_run(finished, tmp_path)
        before = contents(run_dir)
        args = ["fit", *tiny_args(tmp_path / "other", steps=2), "--checkpoint.dirpath", str(run_dir / "checkpoints")]
        message = fails(args, capsys)
        assert message.startswith("cis: error: checkpoint.dirpath:") and "last.ckpt" in message
        assert contents(run_dir) == before
        assert not (tmp_path / "other").exists()  # the refused run left no directory of its own

    def test_a_test_into_a_finished_runs_version_is_refused(self, finished, tmp_path, capsys):
        save_dir, run_dir = copy_run(finished, tmp_path)
        before = contents(run_dir)
        checkpoint = finished / "checkpoints" / "last.ckpt"  # another run's: its own is never a test's directory
        args = ["test", *tiny_args(save_dir), "--ckpt_path", str(checkpoint), "--trainer.logger.init_args.version=0"]
        assert "already holds a run" in fails(args, capsys)
        assert contents(run_dir) == before

    def test_a_failure_in_set_up_after_the_claim_leaves_no_run_directory(self, tmp_path, capsys):
        save_dir = tmp_path / "runs"
        message = fails(["fit", *tiny_args(save_dir), "--model.init_from", str(tmp_path / "missing.ckpt")], capsys)
        assert message.startswith("cis: error: model.init_from:")
        assert not save_dir.exists()

    def test_the_run_itself_resumes_with_ckpt_path_last(self, finished, tmp_path):
        save_dir, run_dir = copy_run(finished, tmp_path)
        resumed = run(["fit", *tiny_args(save_dir, steps=4), "--ckpt_path", "last"])
        assert Path(resumed.trainer.log_dir) == run_dir and resumed.trainer.global_step == 4

    def test_a_run_with_its_own_checkpoint_dirpath_resumes_with_ckpt_path_last(self, tmp_path):
        args = ["fit", *tiny_args(tmp_path / "runs", steps=2), "--checkpoint.dirpath", str(tmp_path / "ckpts")]
        run(args)
        resumed = run([*args, "--trainer.max_steps", "4", "--ckpt_path", "last"])
        assert resumed.trainer.global_step == 4

    def test_a_second_resume_of_a_running_run_is_refused_and_a_killed_run_leaves_no_lock(
        self, finished, tmp_path, capsys
    ):
        save_dir, run_dir = copy_run(finished, tmp_path)
        resume = ["fit", *tiny_args(save_dir, steps=100_000), "--ckpt_path", "last"]
        first = start_cis(resume, tmp_path / "first.log")
        try:
            wait_until(lambda: locked(run_dir), first)
            assert "in use by another cis process" in fails(resume, capsys)
        finally:
            first.send_signal(signal.SIGKILL)  # no chance to clean up: the OS must drop the lock
            first.wait()
        assert not locked(run_dir)
        saved = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]  # the killed run may have saved
        again = run(["fit", *tiny_args(save_dir, steps=saved + 2), "--ckpt_path", "last"])
        assert again.trainer.global_step == saved + 2


def alias_bomb(width: int, depth: int, key: str = "a") -> str:
    """`depth` levels of anchors, each a list of `width` aliases of the one before: width ** depth leaves."""
    lines = [f"{key}0: &{key}0 [{', '.join(['x'] * width)}]"]
    for level in range(1, depth):
        lines.append(f"{key}{level}: &{key}{level} [{', '.join([f'*{key}{level - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


class TestConfigFiles:
    @settings(max_examples=40, deadline=2000)
    @given(width=st.integers(2, 12), depth=st.integers(2, 30))
    def test_alias_expansion_beyond_the_cap_is_refused_at_once(self, width, depth):
        text = alias_bomb(width, depth)
        expanded = sum(width**level for level in range(1, depth + 1))  # every list's items, at least
        start = time.perf_counter()
        if expanded > MAX_EXPANDED_NODES * 2:
            with pytest.raises(ConfigError, match="expands to more than"):
                check_yaml(text)
        else:
            try:
                check_yaml(text)
            except ConfigError as error:  # near the cap, lists and mapping nodes count too
                assert "expands to more than" in str(error)
        assert time.perf_counter() - start < 1.0

    @settings(max_examples=40, deadline=2000)
    @given(
        path=st.lists(st.sampled_from(["data", "model", "grid", "x"]), min_size=0, max_size=3),
        key=st.sampled_from(["lr", "sigma", "seed", "n_features"]),
        flow=st.booleans(),
    )
    def test_a_repeated_key_at_any_depth_is_refused_naming_it(self, path, key, flow):
        if flow:  # all on one line: {data: {grid: {sigma: 1, other: 2, sigma: 3}}}
            text = "".join(f"{{{name}: " for name in path) + f"{{{key}: 1, other: 2, {key}: 3}}" + "}" * len(path)
        else:
            indent = "".join(f"{'  ' * i}{name}:\n" for i, name in enumerate(path))
            pad = "  " * len(path)
            text = f"{indent}{pad}{key}: 1\n{pad}other: 2\n{pad}{key}: 3\n"
        with pytest.raises(ConfigError, match=f"duplicate key '{key}'"):
            check_yaml(text)

    @settings(max_examples=60, deadline=1000)
    @given(data=st.binary(min_size=1, max_size=300))
    def test_bytes_are_text_or_one_config_error(self, data):
        try:
            text = decode(data, "config", "f.yaml")
        except ConfigError as error:
            assert str(error).startswith("config: f.yaml")
        else:
            assert text.encode() == data

    @pytest.mark.parametrize(
        ("name", "text", "problem"),
        [
            ("top_level_bomb", alias_bomb(9, 9), "expands to more than"),
            ("grid_bomb", "data:\n  grid:\n" + "".join(f"    {line}\n" for line in alias_bomb(9, 9).splitlines()), ""),
            ("duplicate_key", "model:\n  lr: 0.1\n  lr: 0.2\n", "duplicate key 'lr'"),
            ("recursive_alias", "data: &d\n  grid: *d\n", "refers to itself"),
        ],
    )
    def test_a_hostile_config_file_is_one_line_and_no_run(self, name, text, problem, tmp_path, capsys):
        config = tmp_path / f"{name}.yaml"
        config.write_text(text)
        save_dir = tmp_path / "runs"
        message = fails(["fit", *tiny_args(save_dir), "--config", str(config)], capsys)
        assert message.startswith(f"cis: error: config: {config}") and problem in message
        assert not save_dir.exists()

    def test_an_inline_grid_bomb_names_the_option(self, tmp_path, capsys):
        bomb = "{" + ", ".join(alias_bomb(10, 7).splitlines()) + "}"  # the same bomb as one flow mapping
        message = fails(["fit", *tiny_args(tmp_path / "runs"), "--data.grid", bomb], capsys)
        assert message.startswith("cis: error: data.grid:") and "expands to more than" in message

    def test_a_repeated_key_on_one_line_is_refused(self, tmp_path, capsys):
        args = ["fit", *tiny_args(tmp_path / "runs"), "--data.grid", '{"sigma": [0.1], "sigma": [0.2]}']
        assert fails(args, capsys).startswith("cis: error: data.grid: duplicate key 'sigma'")

    def test_binary_garbage_as_a_config_file(self, tmp_path, capsys):
        config = tmp_path / "garbage.yaml"
        config.write_bytes(bytes(range(128, 256)) * 4)
        message = fails(["fit", *tiny_args(tmp_path / "runs"), "--config", str(config)], capsys)
        assert "is not UTF-8 text" in message and str(config) in message

    def test_load_run_on_a_binary_config_raises_the_packages_error(self, finished, tmp_path):
        _, run_dir = copy_run(finished, tmp_path)
        (run_dir / "config.yaml").write_bytes(b"\xff\xfe\x00garbage")
        with pytest.raises(ConfigError, match="not UTF-8 text"):
            load_run(run_dir)


class TestCtrlC:
    def test_ctrl_c_saves_the_current_step_prints_the_hint_and_exits_130(self, tmp_path):
        save_dir = tmp_path / "runs"
        args = ["fit", *tiny_args(save_dir, steps=100_000), "--checkpoint.every_n_train_steps", "5"]
        log = tmp_path / "cis.log"
        process = start_cis(args, log)
        checkpoint = save_dir / NAME / "version_0" / "checkpoints" / "last.ckpt"
        try:
            wait_until(checkpoint.is_file, process)
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=120) == EXIT_SIGINT
        finally:
            if process.poll() is None:
                process.kill()
        output = log.read_text()
        assert "Traceback" not in output
        assert "stopped by Ctrl-C (SIGINT)" in output and "--ckpt_path last" in output
        saved = read_checkpoint(checkpoint)["global_step"]
        assert f"stopped at step {saved}" in output  # the step it stopped at, not the last periodic one
        resumed = run(["fit", *tiny_args(save_dir, steps=saved + 2), "--ckpt_path", "last"])
        assert resumed.trainer.global_step == saved + 2


class TestCheckpointLabels:
    @pytest.mark.parametrize(
        ("edit", "field"),
        [({"sigma": 0.5}, "data.sigma"), ({"mixing": {"kind": "none"}}, "data.mixing"), ({"seed": 3}, "data.seed")],
    )
    def test_a_checkpoint_tested_under_an_edited_config_is_refused(self, edit, field, finished, tmp_path, capsys):
        save_dir, run_dir = copy_run(finished, tmp_path)
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        config["data"].update(edit)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
        message = fails(["test", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")], capsys)
        assert f"another {field}" in message
        assert not list(save_dir.rglob("results.csv"))  # nothing labelled wrongly was written

    def test_an_unedited_config_tests_and_labels_with_the_checkpoints_settings(self, finished, tmp_path):
        save_dir, run_dir = copy_run(finished, tmp_path)
        test = run(["test", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")])
        rows = load_run(test.trainer.log_dir, weights=run_dir / "checkpoints" / "last.ckpt").results
        stored = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
        assert rows[0]["sigma"] == pytest.approx(float(stored["task.sigma"][0]))
        assert rows[0]["p"] == pytest.approx(float(stored["task.feature_probability"][0]))

    @pytest.mark.parametrize("kind", ["missing", "directory", "no_config"])
    def test_cis_test_names_a_checkpoint_that_is_not_usable(self, kind, finished, tmp_path, capsys):
        if kind == "missing":
            path, problem = tmp_path / "nothing.ckpt", "does not exist"
        elif kind == "directory":
            path, problem = tmp_path, "is a directory"
        else:
            path, problem = tmp_path / "lone.ckpt", "no config.yaml beside"
            shutil.copy(finished / "checkpoints" / "last.ckpt", path)
        message = fails(["test", "--ckpt_path", str(path)], capsys)
        assert message.startswith("cis: error: ckpt_path:") and str(path) in message and problem in message

    def test_load_run_never_takes_weights_from_outside_the_directory(self, finished, tmp_path):
        copy = tmp_path / "copied"
        copy.mkdir()
        config = yaml.safe_load((finished / "config.yaml").read_text())
        config["ckpt_path"] = str((finished / "checkpoints" / "last.ckpt").resolve())  # another run's file
        (copy / "config.yaml").write_text(yaml.safe_dump(config))
        with pytest.raises(ConfigError, match="lies outside it"):
            load_run(copy)


class TestMessagesPointAtTheCause:
    def test_a_sigma_beyond_float32_is_refused_by_name(self, tmp_path, capsys):
        message = fails(["fit", *tiny_args(tmp_path / "runs"), "--data.sigma", "1e300"], capsys)
        assert message.startswith("cis: error: data.sigma:") and "float32" in message
        assert not (tmp_path / "runs").exists()

    def test_a_diverging_run_names_the_first_non_finite_step_and_its_settings(self, tmp_path, capsys):
        # sigma 1e20: finite in float32, but (sigma M x)^2 overflows at the first step that has a feature.
        message = fails(["fit", *tiny_args(tmp_path / "runs", steps=50), "--data.sigma", "1e20"], capsys, status=1)
        assert "the loss is not finite at step 0" in message
        assert "sigma=1e+20" in message and "model.lr=" in message and "mixing=gaussian(sym)" in message

    def test_report_on_a_directory_without_results_is_an_error(self, tmp_path, capsys):
        (tmp_path / "empty").mkdir()
        message = fails(["report", str(tmp_path / "empty"), "--output", str(tmp_path / "r.md")], capsys)
        assert "no results.csv" in message and not (tmp_path / "r.md").exists()

    @pytest.mark.parametrize(("option", "value"), [("--threads", "0"), ("--threads", "-3"), ("--jobs", "0")])
    def test_threads_or_jobs_below_one_is_an_error(self, option, value, tmp_path, capsys):
        with pytest.raises(SystemExit) as stopped:
            reproduce([option, value, "--root", str(tmp_path / "r")])
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and err.startswith(f"cis: error: {option}:") and len(err.splitlines()) == 1
        assert not (tmp_path / "r").exists()


class TestFileSystemFaults:
    def test_a_save_dir_that_is_a_file(self, tmp_path, capsys):
        (tmp_path / "file").write_text("not a directory\n")
        message = fails(["fit", *tiny_args(tmp_path / "file")], capsys)
        assert message.startswith("cis: error: trainer.logger.init_args.save_dir:") and "is a file" in message

    def test_a_save_dir_under_a_file(self, tmp_path, capsys):
        (tmp_path / "file").write_text("not a directory\n")
        message = fails(["fit", *tiny_args(tmp_path / "file" / "runs")], capsys)
        assert "lies under" in message and str(tmp_path / "file") in message

    def test_a_checkpoint_dirpath_that_is_a_file(self, tmp_path, capsys):
        (tmp_path / "ckpts").write_text("not a directory\n")
        args = ["fit", *tiny_args(tmp_path / "runs"), "--checkpoint.dirpath", str(tmp_path / "ckpts")]
        assert fails(args, capsys).startswith("cis: error: checkpoint.dirpath:")
        assert not (tmp_path / "runs").exists()

    def test_report_output_that_is_a_directory(self, finished, tmp_path, capsys):
        message = fails(["report", str(finished.parent), "--output", str(tmp_path)], capsys)
        assert message.startswith("cis: error: --output:") and "is a directory" in message

    def test_a_read_only_run_directory_is_refused_and_unchanged(self, finished, tmp_path, capsys):
        save_dir, run_dir = copy_run(finished, tmp_path)
        before = contents(run_dir)
        with read_only(run_dir):
            message = fails(["fit", *tiny_args(save_dir, steps=4), "--ckpt_path", "last"], capsys)
        assert "not writable" in message and str(run_dir) in message
        assert contents(run_dir) == before

    def test_a_full_disk_during_a_run_is_one_line_and_leaves_no_partial_checkpoint(self, tmp_path, capsys):
        disk = tmp_path / "disk"
        disk.mkdir()
        mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(disk)])
        if not mounted or mounted.returncode != 0:
            pytest.skip("a small file system needs root and mount")
        try:
            args = ["fit", *tiny_args(disk / "runs", steps=20), "--checkpoint.every_n_train_steps", "5"]
            message = fails(args, capsys, status=EXIT_FILE_SYSTEM)
            assert message.startswith("cis: error: file system:") and "could not be written" in message
            assert not list(disk.rglob("*.partial"))
        finally:
            subprocess.run(["umount", str(disk)], check=True)


class read_only:  # noqa: N801 (a context manager used like a function)
    """`directory` read-only: a read-only bind mount as root (root ignores permissions), else mode 0555."""

    def __init__(self, directory: Path):
        self.directory = directory

    def __enter__(self) -> None:
        if os.geteuid() != 0:
            self.directory.chmod(0o555)
            return
        mounts = [["mount", "--bind", str(self.directory), str(self.directory)]]
        mounts.append(["mount", "-o", "remount,bind,ro", str(self.directory)])
        for command in mounts:
            if subprocess.run(command, capture_output=True).returncode != 0:
                subprocess.run(["umount", str(self.directory)], capture_output=True)
                pytest.skip("cannot make a read-only directory here (root without mount)")

    def __exit__(self, *exc) -> None:
        if os.geteuid() != 0:
            self.directory.chmod(0o755)
        else:
            subprocess.run(["umount", str(self.directory)], check=True)


class TestSizesThatCannotFit:
    @pytest.mark.parametrize(
        ("option", "value", "field"),
        [
            ("--data.batch_size", str(10**12), "data.batch_size"),
            ("--model.network.init_args.d_mlp", str(10**10), "model.network.init_args.d_mlp"),
            ("--data.n_features", "10000000", "data.n_features"),
            ("--data.eval_nonempty_samples", str(10**18), "data.eval_nonempty_samples"),
            ("--data.grid", '{"seed": ' + str(list(range(1000))) + "}", "data.grid"),
        ],
        ids=["batch", "d_mlp", "n_features", "eval_samples", "grid"],
    )
    def test_a_size_that_cannot_fit_is_refused_before_allocating(self, option, value, field, tmp_path, capsys):
        # 1000 instances of a size that one instance fits (whatever this machine's memory): the grid is to blame.
        n_features = math.isqrt(2 * device_memory("cpu")[0] // (1000 * 4)) + 1
        extra = ["--data.n_features", str(n_features)] if field == "data.grid" else []
        message = fails(["fit", *tiny_args(tmp_path / "runs"), *extra, option, value], capsys)
        assert message.startswith(f"cis: error: {field}:") and "needs about" in message and "memory" in message
        assert not (tmp_path / "runs").exists()

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        sizes=st.fixed_dictionaries(
            {
                "instances": st.integers(1, 10**6),
                "n_features": st.integers(1, 10**7),
                "d_mlp": st.integers(1, 10**8),
                "d_embed": st.integers(0, 10**6),
                "n_layers": st.integers(1, 8),
                "batch_size": st.integers(1, 10**10),
                "eval_batch_size": st.integers(1, 10**9),
                "eval_nonempty_samples": st.integers(1, 10**18),
            }
        ),
        training=st.booleans(),
    )
    def test_any_sizes_fit_or_get_one_message_naming_a_field(self, sizes, training):
        try:
            check_memory(sizes, training)
        except ConfigError as error:
            assert error.field in {field for field, _ in FIELDS.values()}
            assert "needs about" in str(error)

    @pytest.mark.parametrize(("instances", "d_embed"), [(42, 0), (1, 1000)], ids=["mlp_sweep", "residual"])
    def test_the_papers_sizes_fit_in_4_gb(self, instances, d_embed):
        paper = {"instances": instances, "n_features": 100, "d_mlp": 50, "d_embed": d_embed, "n_layers": 1}
        evaluation = {"batch_size": 2048, "eval_batch_size": 65536, "eval_nonempty_samples": 10**6}
        assert sum(memory_needed({**paper, **evaluation}, training=True).values()) < 4e9
