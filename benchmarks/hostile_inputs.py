"""A sweep of hostile inputs and faults against the real `cis` (issue 24); not part of `make test`.

Every case runs in its own process under a wall-clock timeout and an address-space limit
(`resource.setrlimit(RLIMIT_AS)`), and is judged by what a user would see:
- traceback: "Traceback" anywhere in its output;
- hang: killed by the timeout;
- silent acceptance: exit 0 where a refusal was expected;
- wrong answer: a refusal without exactly one `cis: error:` line containing the expected text, or
  another exit status than expected;
- lost: a file of a protected run directory changed, appeared or vanished, or a run directory was
  left behind by a command refused before its first step.

    .venv/bin/python benchmarks/hostile_inputs.py [--jobs 2] [--only SUBSTRING]

Prints one line per case and a summary table (Markdown); exits 1 if any case failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "mlp_gaussian.yaml")
NAME = "mlp_gaussian"
TIMEOUT = 180
MEMORY = 8 << 30  # bytes of address space per case (torch's own mappings take about 2 GB of it)


def tiny(save_dir: Path, steps: int = 2) -> list[str]:
    return [
        "--config", CONFIG, "--trainer.max_steps", str(steps), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(save_dir),
        "--data.batch_size", "64", "--data.eval_nonempty_samples", "500", "--data.eval_batch_size", "1024",
        "--model.threads", "1",
    ]  # fmt: skip


@dataclasses.dataclass
class Case:
    name: str
    category: str
    command: Callable[[Path], list[str]]  # the argv after `python`, given the case's directory
    expect: int = 2  # exit status
    text: str = ""  # the error line must contain it (refusals)
    setup: Callable[[Path], None] | None = None
    protect: Callable[[Path], list[Path]] | None = None  # directories that must be unchanged
    absent: Callable[[Path], list[Path]] | None = None  # paths that must not exist afterwards
    during: Callable[[subprocess.Popen, Path], None] | None = None  # act on the running process


def cis(*args: str | Callable[[Path], list[str]]) -> Callable[[Path], list[str]]:
    def command(d: Path) -> list[str]:
        out = ["-m", "cis_lightning"]
        for arg in args:
            out += arg(d) if callable(arg) else [arg.replace("{d}", str(d))]
        return out

    return command


def python(code: str) -> Callable[[Path], list[str]]:
    return lambda d: ["-c", code.replace("{d}", str(d))]


def fresh(d: Path) -> list[str]:
    return tiny(d / "runs")


def write(name: str, data: str | bytes) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())

    return setup


def copy_finished(d: Path) -> None:
    shutil.copytree(FINISHED, d / "runs" / NAME / "version_0")


def the_run(d: Path) -> list[Path]:
    return [d / "runs" / NAME / "version_0"]


def no_runs(d: Path) -> list[Path]:
    return [d / "runs"]


def alias_bomb(width: int, depth: int, indent: str = "") -> str:
    lines = [f"{indent}a0: &a0 [{', '.join(['x'] * width)}]"]
    lines += [f"{indent}a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


def config_case(name: str, text: str | bytes, problem: str, category: str = "config file") -> Case:
    return Case(
        name, category, cis("fit", fresh, "--config", "{d}/c.yaml"), 2, problem, write("c.yaml", text), absent=no_runs
    )


def cases() -> list[Case]:
    out: list[Case] = []
    # -- 3. config files ------------------------------------------------------------------------
    for width, depth in [(9, 9), (10, 7), (2, 40), (3, 20), (100, 4), (5, 12), (50, 5), (20, 6), (4, 15), (7, 8)]:
        out.append(config_case(f"bomb_top_{width}x{depth}", alias_bomb(width, depth), "expands to more than"))
    for width, depth in [(9, 9), (10, 7), (2, 40), (30, 5), (6, 10)]:
        text = "data:\n  grid:\n" + alias_bomb(width, depth, "    ")
        out.append(config_case(f"bomb_in_grid_{width}x{depth}", text, "expands to more than"))
    out.append(config_case("bomb_in_model", "model:\n" + alias_bomb(10, 8, "  "), "expands to more than"))
    out.append(config_case("recursive_alias", "data: &d\n  grid: *d\n", "refers to itself"))
    out.append(config_case("deep_nesting", "x: " + "[" * 200 + "]" * 200 + "\n", "nests deeper"))
    for i, (where, key) in enumerate(
        [("", "model"), ("model:\n  ", "lr"), ("data:\n  ", "sigma"), ("data:\n  ", "n_features"),
         ("trainer:\n  ", "max_steps"), ("data:\n  grid:\n    ", "sigma"), ("data:\n  mixing:\n    ", "kind"),
         ("model:\n  network:\n    init_args:\n      ", "d_mlp")]
    ):  # fmt: skip
        pad = where.rsplit("\n", 1)[-1]
        value = "[0.1]" if "grid" in where else ("gaussian" if key == "kind" else "{}" if key == "model" else "1")
        text = f"{where}{key}: {value}\n{pad}{key}: {value}\n"
        out.append(config_case(f"duplicate_key_{i}_{key}", text, f"duplicate key '{key}'"))
    rng = random.Random(24)
    for i in range(10):
        garbage = bytes(rng.randrange(128, 256) for _ in range(rng.randrange(1, 4096)))
        out.append(config_case(f"binary_garbage_{i}", garbage, "not UTF-8 text"))
    out.append(config_case("nul_bytes", "model:\n  lr: 0.1\x00\x00\n", "NUL"))
    out.append(config_case("utf16", "model:\n  lr: 0.1\n".encode("utf-16"), "not UTF-8 text"))
    out.append(config_case("too_large", "# " + "x" * (2 << 20) + "\n", "bytes; a config may have at most"))
    out.append(config_case("wide_flat_list", "data:\n  grid:\n    seed: [" + ",".join(["1"] * 200_000) + "]\n", ""))
    out.append(config_case("top_level_list", "- 1\n- 2\n", "config"))
    out.append(config_case("top_level_scalar", "hello\n", "config"))
    out.append(config_case("yaml_syntax", "model: [\n", "config"))
    out.append(config_case("python_tag", "model: !!python/object/apply:os.system ['touch {d}/pwned']\n", "config"))
    out.append(config_case("grid_not_a_mapping", "data:\n  grid: [1, 2]\n", "data.grid"))
    inline = "{" + ", ".join(alias_bomb(10, 7).splitlines()) + "}"
    for option in ("--data.grid", "--model.lr", "--data.mixing", "--trainer.logger"):
        out.append(Case(f"inline_bomb{option.replace('.', '_')}", "config value", cis("fit", fresh, option, inline),
                        2, "expands to more than", absent=no_runs))  # fmt: skip
    out.append(Case("inline_duplicate_grid", "config value",
                    cis("fit", fresh, "--data.grid", '{"sigma": [0.1], "sigma": [0.2]}'), 2, "duplicate key 'sigma'",
                    absent=no_runs))  # fmt: skip
    for option, name, data, text in [
        ("--data", "d.bin", bytes(range(128, 256)), "not UTF-8 text"),
        ("--data", "d.cfg", b"n_features: 10\nn_features: 20\n", "duplicate key 'n_features'"),
        ("--data", "d.cfg", alias_bomb(10, 6).encode(), "expands to more than"),
        ("--model.network", "n.cfg", alias_bomb(10, 6).encode(), "expands to more than"),
        ("--trainer", "t.cfg", b"\x00" * 64, "NUL"),
    ]:  # a section's config file: jsonargparse reads it as that section
        out.append(
            Case(
                f"section_file{option.replace('.', '_')}_{len(out)}",
                "config file",
                cis("fit", fresh, option, "{d}/" + name),
                2,
                text,
                write(name, data),
                absent=no_runs,
            )
        )
    out.append(Case("config_is_a_directory", "config file", cis("fit", fresh, "--config", "{d}"), 2, "not a file",
                    absent=no_runs))  # fmt: skip
    out.append(Case("config_missing", "config file", cis("fit", fresh, "--config", "{d}/nope.yaml"), 2,
                    "does not exist", absent=no_runs))  # fmt: skip
    # -- 2. sizes and 7. values -----------------------------------------------------------------------
    for option, value, field in [
        ("--data.batch_size", "10000000000", "data.batch_size"),
        ("--data.batch_size", "100000000", "data.batch_size"),
        ("--model.network.init_args.d_mlp", "1000000000", "d_mlp"),
        ("--model.network.init_args.d_mlp", "30000000", "d_mlp"),
        ("--data.n_features", "100000000", "data.n_features"),
        ("--data.n_features", "200000", "data.n_features"),
        ("--data.eval_nonempty_samples", str(10**18), "data.eval_nonempty_samples"),
        ("--data.eval_batch_size", "10000000000", "data.eval_batch_size"),
        ("--data.grid", '{"seed": ' + json.dumps(list(range(1000))) + "}", "data.grid"),
        ("--data.batch_size", "-5", "data.batch_size"),
        ("--data.n_features", "0", "data.n_features"),
        ("--data.sigma", "1e300", "data.sigma"),
        ("--data.sigma", "inf", "data.sigma"),
        ("--data.sigma", "nan", "data.sigma"),
        ("--data.feature_probability", "1e-300", "data.feature_probability"),
        ("--data.feature_probability", "2", "data.feature_probability"),
        ("--model.lr", "inf", "model.lr"),
        ("--model.lr", "-0.0", "model.lr"),
        ("--model.threads", "0", "model.threads"),
        ("--trainer.max_steps", "-1", "trainer.max_steps"),
        ("--data.seed", str(2**70), "data.seed"),
        ("--data.mixing.kind", "ＧＡＵＳＳＩＡＮ", "data.mixing.kind"),
        ("--data.batch_size", "1" * 5000, "data.batch_size"),
    ]:
        extra = ["--data.n_features", "3000"] if field == "data.grid" else []
        out.append(Case(f"value{option.replace('.', '_')}={value[:12]}", "size or value",
                        cis("fit", fresh, *extra, option, value), 2, field, absent=no_runs))  # fmt: skip
    diverge = cis("fit", lambda d: tiny(d / "runs", steps=30), "--data.sigma", "1e20")
    out.append(Case("diverging_sigma_1e20", "size or value", diverge, 1, "not finite at step 0"))
    out.append(Case("diverging_lr_1e30", "size or value", cis("fit", lambda d: tiny(d / "runs", 30), "--model.lr",
                    "1e30"), 1, "training diverged"))  # fmt: skip
    # -- 1. run directories ---------------------------------------------------------------------
    version0 = ["--trainer.logger.init_args.version", "0"]
    out.append(Case("fresh_fit_into_version_0", "run directory", cis("fit", fresh, *version0), 2,
                    "already holds a run", copy_finished, the_run))  # fmt: skip
    out.append(Case("fresh_fit_into_version_0_other_model", "run directory",
                    cis("fit", fresh, *version0, "--model.network.init_args.d_mlp", "7"), 2, "already holds a run",
                    copy_finished, the_run))  # fmt: skip
    out.append(Case("fresh_fit_into_version_string", "run directory",
                    cis("fit", fresh, "--trainer.logger.init_args.version", "version_0"), 2, "already holds a run",
                    copy_finished, the_run))  # fmt: skip
    out.append(Case("fresh_fit_into_checkpoint_dirpath", "run directory",
                    cis("fit", lambda d: tiny(d / "other"), "--checkpoint.dirpath",
                        "{d}/runs/" + NAME + "/version_0/checkpoints"), 2, "checkpoint.dirpath", copy_finished, the_run,
                    lambda d: [d / "other"]))  # fmt: skip
    out.append(Case("test_into_version_0", "run directory",
                    cis("test", fresh, *version0, "--ckpt_path", str(FINISHED / "checkpoints" / "last.ckpt")), 2,
                    "already holds a run", copy_finished, the_run))  # fmt: skip
    out.append(Case("resume_is_allowed", "run directory", cis("fit", lambda d: tiny(d / "runs", 4), "--ckpt_path",
                    "last"), 0, "", copy_finished))  # fmt: skip
    out.append(Case("second_resume_while_running", "run directory", cis("fit", lambda d: tiny(d / "runs", 4),
                    "--ckpt_path", "last"), 2, "in use by another cis process", start_holder))  # fmt: skip
    out.append(Case("resume_after_sigkill_of_a_holder", "run directory", cis("fit", lambda d: tiny(d / "runs", 4),
                    "--ckpt_path", "last"), 0, "", kill_holder))  # fmt: skip
    # -- 4. file-system faults ----------------------------------------------------------------------
    for name, setup, save_dir, text in [
        ("save_dir_is_a_file", write("f", "x"), "{d}/f", "is a file"),
        ("save_dir_under_a_file", write("f", "x"), "{d}/f/runs", "lies under"),
        ("save_dir_deep_under_a_file", write("f", "x"), "{d}/f/a/b/c", "lies under"),
        ("save_dir_read_only", read_only_dir, "{d}/ro/runs", "not writable"),
        ("save_dir_dangling_link", dangling_link, "{d}/link/runs", "broken symbolic link"),
    ]:
        args = [*tiny(Path("X")), "--trainer.logger.init_args.save_dir", save_dir]
        out.append(Case(name, "file system", cis("fit", *args), 2, text, setup))
    out.append(
        Case(
            "disk_full_during_training",
            "file system",
            cis("fit", lambda d: tiny(d / "disk" / "runs", 20), "--checkpoint.every_n_train_steps", "5"),
            74,
            "could not be written",
            small_disk,
            absent=lambda d: list((d / "disk").rglob("*.partial")),
        )
    )
    out.append(Case("checkpoint_dirpath_is_a_file", "file system",
                    cis("fit", fresh, "--checkpoint.dirpath", "{d}/f"), 2, "checkpoint.dirpath", write("f", "x"),
                    absent=no_runs))  # fmt: skip
    out.append(Case("checkpoint_dirpath_under_a_file", "file system",
                    cis("fit", fresh, "--checkpoint.dirpath", "{d}/f/ck"), 2, "lies under", write("f", "x"),
                    absent=no_runs))  # fmt: skip
    out.append(Case("resume_in_read_only_run", "file system", cis("fit", lambda d: tiny(d / "runs", 4),
                    "--ckpt_path", "last"), 2, "not writable", read_only_run, the_run))  # fmt: skip
    out.append(
        Case(
            "report_output_is_a_directory",
            "file system",
            cis("report", str(FINISHED.parent.parent), "--output", "{d}"),
            2,
            "is a directory",
        )
    )
    out.append(Case("report_output_under_a_file", "file system",
                    cis("report", str(FINISHED.parent.parent), "--output", "{d}/f/r.md"), 2, "lies under",
                    write("f", "x")))  # fmt: skip
    out.append(Case("report_empty_directory", "file system", cis("report", "{d}", "--output", "{d}/r.md"), 2,
                    "no results.csv", absent=lambda d: [d / "r.md"]))  # fmt: skip
    out.append(Case("report_missing_directory", "file system", cis("report", "{d}/nope", "--output", "{d}/r.md"), 2,
                    "no such run directory"))  # fmt: skip
    out.append(Case("report_binary_config", "file system", cis("report", "{d}", "--output", "{d}/r.md"), 2,
                    "not UTF-8", binary_config_with_results))  # fmt: skip
    for threads in ("0", "-1", "-100"):
        out.append(Case(f"reproduce_threads_{threads}", "size or value",
                        lambda d, t=threads: ["-m", "cis_lightning", "reproduce", "--threads", t, "--root",
                                              str(d / "r")], 2, "--threads", absent=lambda d: [d / "r"]))  # fmt: skip
    # -- 5. checkpoints ----------------------------------------------------------------------------
    for field, edit in [("data.sigma", {"sigma": 0.5}), ("data.mixing", {"mixing": {"kind": "none"}}),
                        ("data.seed", {"seed": 9}), ("data.feature_probability", {"feature_probability": 0.02}),
                        ("data.mixing", {"mixing": {"kind": "gaussian", "symmetric": False}})]:  # fmt: skip
        out.append(Case(f"edited_config_{field}_{len(out)}", "checkpoint",
                        cis("test", "--ckpt_path", "{d}/runs/" + NAME + "/version_0/checkpoints/last.ckpt"), 2,
                        f"another {field}", edited_config(edit), lambda d: [d / "runs"]))  # fmt: skip
    for name, setup, path, text in [
        ("ckpt_missing", None, "{d}/nothing.ckpt", "does not exist"),
        ("ckpt_directory", None, "{d}", "is a directory"),
        ("ckpt_without_config", lone_checkpoint, "{d}/lone.ckpt", "no config.yaml beside"),
        ("ckpt_garbage", checkpoint_with_config(b"\x80\x04garbage"), "", "g.ckpt"),
        ("ckpt_empty", checkpoint_with_config(b""), "", "not a readable"),
        ("ckpt_text", checkpoint_with_config(b"hello\n"), "", "not a readable"),
        ("ckpt_pickle_code", checkpoint_with_config(pickled_code()), "", "refused"),
        ("ckpt_truncated", truncated_checkpoint, "", "not a readable"),
        ("ckpt_binary_config", binary_config_checkpoint, "", "not UTF-8"),
    ]:
        target = path or "{d}/runs/r/version_0/checkpoints/g.ckpt"
        out.append(Case(name, "checkpoint", cis("test", "--ckpt_path", target), 2, text, setup))
    load = "import sys\nfrom cis_lightning import load_run\ntry:\n    load_run({p!r})\nexcept Exception as e:\n"
    load += "    print('cis: error:', type(e).__name__, e); sys.exit(2)\n"
    for name, setup, path, text in [
        ("load_run_binary_config", binary_config_run, "{d}/run", "ConfigError"),
        ("load_run_copied_outside_ckpt", copied_test_run, "{d}/run", "lies outside it"),
        ("load_run_missing", None, "{d}/nothing", "does not exist"),
        ("load_run_bomb_config", bomb_config_run, "{d}/run", "expands to more than"),
        ("load_run_list_config", list_config_run, "{d}/run", "not a cis config"),
    ]:
        out.append(Case(name, "checkpoint", python(load.format(p=path)), 2, text, setup))
    # -- 6. signals --------------------------------------------------------------------------------
    long_fit = cis("fit", lambda d: tiny(d / "runs", 100_000), "--checkpoint.every_n_train_steps", "5")
    for i in range(3):
        out.append(Case(f"sigint_during_training_{i}", "signal", long_fit, 130, "", during=signal_after_checkpoint(
            signal.SIGINT, "stopped by Ctrl-C (SIGINT)")))  # fmt: skip
    out.append(Case("sigterm_during_training", "signal", long_fit, 143, "",
                    during=signal_after_checkpoint(signal.SIGTERM, "stopped by SIGTERM")))  # fmt: skip
    return out


FINISHED = Path()  # set in main: a finished 2-step run every case may copy (never written to)


def start_holder(d: Path) -> None:
    """Copy the finished run and resume it in a long-running process that holds its lock."""
    copy_finished(d)
    args = [sys.executable, "-m", "cis_lightning", "fit", *tiny(d / "runs", 100_000), "--ckpt_path", "last"]
    log = open(d / "holder.log", "w")  # noqa: SIM115 (kept open by the child)
    holder = subprocess.Popen(args, cwd=d, stdout=log, stderr=log, preexec_fn=limit_memory)
    (d / "holder.pid").write_text(str(holder.pid))
    run_dir = the_run(d)[0]
    deadline = time.monotonic() + TIMEOUT
    while not locked(run_dir) and time.monotonic() < deadline and holder.poll() is None:
        time.sleep(0.05)
    HOLDERS.append(holder)


def kill_holder(d: Path) -> None:
    start_holder(d)
    HOLDERS[-1].send_signal(signal.SIGKILL)
    HOLDERS[-1].wait()


HOLDERS: list[subprocess.Popen] = []


def locked(directory: Path) -> bool:
    import fcntl

    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def read_only_dir(d: Path) -> None:
    (d / "ro").mkdir()
    make_read_only(d / "ro")


def read_only_run(d: Path) -> None:
    copy_finished(d)
    make_read_only(the_run(d)[0])


MOUNTS: list[Path] = []


def make_read_only(path: Path) -> None:
    if os.geteuid() != 0:
        path.chmod(0o555)
        return
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
    MOUNTS.append(path)


def small_disk(d: Path) -> None:
    """d/disk: a 48 KiB file system (root: tmpfs), which the first checkpoint overflows."""
    (d / "disk").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(d / "disk")], check=True)
    MOUNTS.append(d / "disk")


def dangling_link(d: Path) -> None:
    (d / "link").symlink_to(d / "nowhere")


def edited_config(edit: dict) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        import yaml

        copy_finished(d)
        config_file = the_run(d)[0] / "config.yaml"
        config = yaml.safe_load(config_file.read_text())
        config["data"].update(edit)
        config_file.write_text(yaml.safe_dump(config))

    return setup


def lone_checkpoint(d: Path) -> None:
    shutil.copy(FINISHED / "checkpoints" / "last.ckpt", d / "lone.ckpt")


def checkpoint_with_config(data: bytes) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        write("runs/r/version_0/checkpoints/g.ckpt", data)(d)
        shutil.copy(FINISHED / "config.yaml", d / "runs/r/version_0/config.yaml")

    return setup


class RunsCode:
    """Unpickling it would call os.system: a checkpoint that must be refused, never loaded."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def pickled_code() -> bytes:
    import pickle

    return pickle.dumps({"state_dict": RunsCode()})


def truncated_checkpoint(d: Path) -> None:
    data = (FINISHED / "checkpoints" / "last.ckpt").read_bytes()
    checkpoint_with_config(data[: len(data) // 2])(d)


def binary_config_checkpoint(d: Path) -> None:
    shutil.copytree(FINISHED, d / "runs/r/version_0")
    shutil.copy(FINISHED / "checkpoints" / "last.ckpt", d / "runs/r/version_0/checkpoints/g.ckpt")
    (d / "runs/r/version_0/config.yaml").write_bytes(bytes(range(128, 256)))


def binary_config_run(d: Path) -> None:
    shutil.copytree(FINISHED, d / "run")
    (d / "run/config.yaml").write_bytes(b"\xff\xfe\x00\x01garbage")


def bomb_config_run(d: Path) -> None:
    shutil.copytree(FINISHED, d / "run")
    (d / "run/config.yaml").write_text(alias_bomb(10, 8))


def list_config_run(d: Path) -> None:
    shutil.copytree(FINISHED, d / "run")
    (d / "run/config.yaml").write_text("- 1\n- 2\n")


def binary_config_with_results(d: Path) -> None:
    shutil.copytree(FINISHED, d / "run")
    (d / "run/results.csv").write_text("instance,model\n0,MLP\n")
    (d / "run/config.yaml").write_bytes(bytes(range(128, 256)))


def copied_test_run(d: Path) -> None:
    import yaml

    (d / "run").mkdir()
    config = yaml.safe_load((FINISHED / "config.yaml").read_text())
    config["ckpt_path"] = str(FINISHED / "checkpoints" / "last.ckpt")
    (d / "run/config.yaml").write_text(yaml.safe_dump(config))


def signal_after_checkpoint(signum: int, text: str) -> Callable[[subprocess.Popen, Path], None]:
    def during(process: subprocess.Popen, d: Path) -> None:
        checkpoint = d / "runs" / NAME / "version_0" / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + TIMEOUT
        while not checkpoint.is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(random.Random(signum).uniform(0, 0.5))
        process.send_signal(signum)

    during.text = text  # type: ignore[attr-defined]
    return during


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def snapshot(paths: list[Path]) -> dict[str, str]:
    files = {}
    for root in paths:
        for p in sorted(root.rglob("*")) if root.exists() else []:
            if p.is_file():
                files[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


def run_case(case: Case, root: Path) -> tuple[str, str, float]:
    """(verdict, detail, seconds): verdict 'ok' or one of the failure kinds of the module docstring."""
    d = root / case.name
    d.mkdir(parents=True)
    start = time.monotonic()
    if case.setup is not None:
        case.setup(d)
    protected = case.protect(d) if case.protect else []
    before = snapshot(protected)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, *case.command(d)], cwd=d, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        preexec_fn=limit_memory, env=env, text=True, errors="replace",
    )  # fmt: skip
    if case.during is not None:
        case.during(process, d)
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        return "hang", output[-300:], time.monotonic() - start
    seconds = time.monotonic() - start
    errors = [line for line in output.splitlines() if line.startswith("cis: error:")]
    if "Traceback" in output:
        return "traceback", output[-400:], seconds
    if case.expect != 0 and process.returncode == 0:
        return "silent acceptance", output[-300:], seconds
    if process.returncode != case.expect:
        return "wrong status", f"exit {process.returncode}, expected {case.expect}: {output[-300:]}", seconds
    if case.expect in (1, 2, 74) and (len(errors) != 1 or case.text not in errors[0]):
        return "wrong message", " | ".join(errors) or output[-300:], seconds
    wanted = getattr(case.during, "text", "")
    if wanted and wanted not in output:
        return "wrong message", output[-300:], seconds
    if snapshot(protected) != before:
        return "lost", "a protected file changed", seconds
    left = [str(p) for p in (case.absent(d) if case.absent else []) if p.exists()]
    if left:
        return "lost", f"left behind: {left}", seconds
    if (d / "pwned").exists() or (REPO / "pwned").exists():
        return "lost", "a config ran code", seconds
    return "ok", (errors[0] if errors else f"exit {process.returncode}")[:160], seconds


def main() -> None:
    global FINISHED
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default="")
    options = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cis-hostile-"))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    subprocess.run([sys.executable, "-m", "cis_lightning", "fit", *tiny(root / "finished")], cwd=root, check=True,
                   capture_output=True, preexec_fn=limit_memory)  # fmt: skip
    FINISHED = root / "finished" / NAME / "version_0"
    selected = [case for case in cases() if options.only in case.name]
    sequential = [c for c in selected if c.setup in (start_holder, kill_holder) or c.category == "signal"]
    parallel = [c for c in selected if c not in sequential]
    results: dict[str, tuple[str, str, float]] = {}
    try:
        with ThreadPoolExecutor(options.jobs) as pool:
            for case, result in zip(parallel, pool.map(lambda c: run_case(c, root / "cases"), parallel), strict=True):
                results[case.name] = result
                print(f"{result[0]:>17}  {result[2]:5.1f} s  {case.name}: {result[1]}", flush=True)
        for case in sequential:
            results[case.name] = run_case(case, root / "cases")
            for holder in HOLDERS:
                if holder.poll() is None:
                    holder.kill()
                    holder.wait()
            result = results[case.name]
            print(f"{result[0]:>17}  {result[2]:5.1f} s  {case.name}: {result[1]}", flush=True)
    finally:
        for path in MOUNTS:
            subprocess.run(["umount", str(path)], check=False)
        for holder in HOLDERS:
            if holder.poll() is None:
                holder.kill()
    print_summary(selected, results, started)
    shutil.rmtree(root, ignore_errors=True)
    raise SystemExit(0 if all(r[0] == "ok" for r in results.values()) else 1)


def print_summary(selected: list[Case], results: dict[str, tuple[str, str, float]], started: str) -> None:
    verdicts = Counter(r[0] for r in results.values())
    print(f"\n`.venv/bin/python benchmarks/hostile_inputs.py`, {started}, {platform.node()}: "
          f"{os.cpu_count()}-core CPU, Python {platform.python_version()}; {len(results)} cases in "
          f"{sum(r[2] for r in results.values()):.0f} s of case time\n")  # fmt: skip
    print(
        "| category | cases | as expected | tracebacks | hangs | silent acceptances | wrong status or message | lost |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for category in dict.fromkeys(c.category for c in selected):
        names = [c.name for c in selected if c.category == category]
        count = Counter(results[n][0] for n in names)
        wrong = count["wrong status"] + count["wrong message"]
        print(f"| {category} | {len(names)} | {count['ok']} | {count['traceback']} | {count['hang']} | "
              f"{count['silent acceptance']} | {wrong} | {count['lost']} |")  # fmt: skip
    wrong = verdicts["wrong status"] + verdicts["wrong message"]
    print(f"| all | {len(results)} | {verdicts['ok']} | {verdicts['traceback']} | {verdicts['hang']} | "
          f"{verdicts['silent acceptance']} | {wrong} | {verdicts['lost']} |")  # fmt: skip


if __name__ == "__main__":
    main()
