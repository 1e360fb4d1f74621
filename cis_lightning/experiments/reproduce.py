"""`cis reproduce`: every experiment of the paper (configs/experiments/*.yaml) fitted and tested, then the report.

    cis reproduce [--fast] [--only NAME...] [--jobs N] [--root runs/reproduce] [--output runs/reproduce/report.md]

Each experiment runs as `cis fit` and `cis test` would (the same CLI, in this process), with a
progress line every PROGRESS_EVERY seconds: which experiment, which fit of how many, the step, and
an estimate of the time that fit has left. The wall time of each experiment goes to
ROOT/reproduce.json, which the report quotes. Works from an installed wheel: the configs are the
shipped ones (`cis configs`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml

from cis_lightning.core.errors import ConfigError
from cis_lightning.core.task import grid_size
from cis_lightning.experiments.report import EXPERIMENTS, check_output, fail, timing_records, write_report
from cis_lightning.lightning.cli import run
from cis_lightning.lightning.run_directory import check_writable_directory
from cis_lightning.runs.config_files import find_config

PROGRESS_EVERY = 30.0  # seconds between two progress lines of a fit
# How many fits each experiment makes (the others make one), for "fit i of n" in the progress line.
FITS = {"semi_nmf": 1, "transplant": 2}


class Progress(pl.Callback):
    """Prints `reproduce [i/n] NAME, fit j of m: step s/S (x%), t min so far, about r min left` every
    `every` seconds of a fit (and a line when a test starts). The estimate is the time per step since
    the previous line times the steps left: a run whose steps get cheaper (the dense instances of a
    mixed-p run stop early) is not judged by its slow start."""

    def __init__(self, label: str, fits: int, every: float = PROGRESS_EVERY):
        self.label, self.fits, self.every = label, fits, every
        self.fit = 0
        self.start = self.last = 0.0
        self.last_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit += 1
        self.start = self.last = time.perf_counter()
        self.last_step = trainer.global_step
        self._print(f"fit {self.fit} of {self.fits}: {trainer.max_steps:,} steps")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        step, total = trainer.global_step, trainer.max_steps
        elapsed = now - self.start
        left = (now - self.last) / max(step - self.last_step, 1) * (total - step)
        self.last, self.last_step = now, step
        self._print(
            f"fit {self.fit} of {self.fits}: step {step:,}/{total:,} ({step / total:.0%}), "
            f"{elapsed / 60:.1f} min so far, about {left / 60:.1f} min left"
        )

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print(f"testing {type(pl_module.network).__name__}")

    def _print(self, message: str) -> None:
        print(f"reproduce {self.label}: {message}", flush=True)


def _cis(progress: Progress, args: list[str]) -> Path:
    return Path(run(args, callbacks=[progress]).trainer.log_dir)


FAST_COMMON = [
    "--data.batch_size", "512",
    "--data.eval_nonempty_samples", "20000",
    "--trainer.limit_val_batches", "0",
]  # fmt: skip
FAST_SIGMAS = [round(0.004 * i, 3) for i in range(21)]
FAST = {  # shorter schedules, smaller batches and a coarser sigma grid: minutes instead of hours
    "sigma_sweep": [
        "--trainer.max_steps", "1000",
        "--data.batch_size", "1024",
        "--data.grid", f'{{"mixing.symmetric": [true, false], "sigma": {FAST_SIGMAS}}}',
    ],
    # Every p for the same 10,000 steps (not equal non-empty samples: the dense models would get 950 steps,
    # too few to reach one feature per neuron; the full run gives them 10,000).
    "sparsity_regimes": ["--trainer.max_steps", "10000", "--model.equal_nonempty_samples", "false"],
    # 6,000 steps: a learned sigma first collapses, then recovers once the network uses M (docs/derivation.md).
    "mixing_comparison": ["--trainer.max_steps", "6000"],
    "eigen_alignment": ["--trainer.max_steps", "2000", "--data.batch_size", "1024"],
    "offset_baseline": ["--trainer.max_steps", "2000"],
    "semi_nmf": ["--trainer.max_steps", "2000"],  # the trained comparison; the baselines need no training
    "rank_study": ["--trainer.max_steps", "1000"],
    "transplant": ["--trainer.max_steps", "1000"],
}  # fmt: skip
# Stage 2 of the transplant: both embedding-trained models on clean labels, the clean one on I - W_E W_E^T.
SWAPPED = json.dumps(
    {
        "cases": [
            {"mixing.kind": "none", "sigma": 0.0},
            {"mixing.kind": "none", "sigma": 0.0},
            {"mixing.kind": "embedding", "mixing.embedding_sign": "I-WWt", "sigma": 1.0},
        ]
    }
)
FACTOR_BASELINES = [
    ["--model.network", name, "--model.network.init_args.orientation", orientation]
    for name in ("SemiNMF", "SVD")
    for orientation in ("direct", "authors")
]


def reproduce(root: Path, fast: bool, experiments: tuple[str, ...] = EXPERIMENTS, jobs: int = 1) -> dict[str, float]:
    """Fit and test every experiment (trained models and baselines) under root; seconds per experiment.

    With `jobs` > 1 the experiments run in that many worker processes (each with this process's
    torch threads), the costliest first (`cost`), so that the longest one does not start last."""
    labels = {name: f"[{i}/{len(experiments)}] {name}" for i, name in enumerate(experiments, 1)}
    if jobs == 1:
        return {name: run_experiment(name, root, fast, labels[name]) for name in experiments}
    order = sorted(experiments, key=lambda name: cost(name, fast), reverse=True)
    tasks = [(name, root, fast, labels[name], torch.get_num_threads()) for name in order]
    with multiprocessing.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
        seconds = dict(pool.imap_unordered(_worker, tasks))
    return {name: seconds[name] for name in experiments}


def cost(name: str, fast: bool) -> int:
    """Instance-steps of an experiment's training (K times max_steps): the order of `reproduce --jobs`."""
    config = yaml.safe_load(Path(find_config(f"configs/experiments/{name}.yaml")).read_text())
    steps = config["trainer"]["max_steps"]
    if fast and "--trainer.max_steps" in FAST[name]:
        steps = int(FAST[name][FAST[name].index("--trainer.max_steps") + 1])
    return grid_size((config.get("data") or {}).get("grid")) * steps


def _worker(task: tuple[str, Path, bool, str, int]) -> tuple[str, float]:
    name, root, fast, label, threads = task
    torch.set_num_threads(threads)
    return name, run_experiment(name, root, fast, label)


def run_experiment(name: str, root: Path, fast: bool, label: str) -> float:
    """Fit and test one experiment (its trained models and baselines) under root; its seconds."""
    progress = Progress(label, FITS.get(name, 1))
    print(f"reproduce {label}: started", flush=True)
    config = find_config(f"configs/experiments/{name}.yaml")
    common = [
        "--config",
        config,
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(root),
    ]
    common += FAST_COMMON + FAST[name] if fast else []
    start = time.perf_counter()

    def fit_and_test(extra: list[str], logger_name: str = name, common: list[str] = common) -> Path:
        args = [*common, *extra, "--trainer.logger.init_args.name", logger_name]
        fit = _cis(progress, ["fit", *args])
        _cis(progress, ["test", *args, "--ckpt_path", str(fit / "checkpoints" / "last.ckpt")])
        return fit

    if name == "offset_baseline":
        _cis(progress, ["test", *common])
        fit_and_test(["--model.network", "MLP"])
    elif name == "semi_nmf":
        for baseline in [*FACTOR_BASELINES, ["--model.network", "Naive"]]:
            _cis(progress, ["test", *common, *baseline])
        trained = [a if a != config else find_config("configs/experiments/semi_nmf_trained.yaml") for a in common]
        fit_and_test([], "semi_nmf_trained", trained)
        for baseline in [*FACTOR_BASELINES[:2], ["--model.network", "Naive"]]:
            _cis(progress, ["test", *trained, *baseline, "--trainer.logger.init_args.name", "semi_nmf_trained"])
    elif name == "transplant":
        first = fit_and_test([])
        init = ["--model.init_from", str(first / "checkpoints" / "last.ckpt"), "--data.grid", SWAPPED]
        _cis(progress, ["test", *common, *init, "--trainer.logger.init_args.name", "transplant_swapped"])
        fit_and_test(init, "transplant_finetune")
    else:
        fit_and_test([])
    seconds = time.perf_counter() - start
    print(f"reproduce {label}: done in {seconds / 60:.1f} min", flush=True)
    return seconds


def record_timing(root: Path, record: dict) -> Path:
    """Add one `reproduce` invocation to ROOT/reproduce.json; it replaces earlier times of its experiments.

    Experiments of one root may come from several invocations (`--only`, possibly run side by side).
    """
    path = root / "reproduce.json"
    records = timing_records(path) if path.is_file() else []
    for earlier in records:
        earlier["seconds"] = {k: v for k, v in earlier["seconds"].items() if k not in record["seconds"]}
    records = [r for r in records if r["seconds"]] + [record]
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps({"runs": records}, indent=1))
    partial.replace(path)  # never a half-written file
    return path


def main(args: list[str] | None = None) -> None:
    """`cis reproduce [--fast] [--only NAME...] [--jobs N] [--root DIR] [--output FILE] [--threads T]`."""
    args = list(sys.argv[1:] if args is None else args)
    parser = argparse.ArgumentParser(prog="cis reproduce", description="fit and test every experiment, then report")
    parser.add_argument("--fast", action="store_true", help="short schedules (minutes instead of hours)")
    parser.add_argument("--root", type=Path, default=None, help="run directory root (default runs/reproduce[-fast])")
    parser.add_argument("--output", type=Path, default=None, help="report file (default ROOT/report.md)")
    parser.add_argument("--only", nargs="*", default=list(EXPERIMENTS), choices=EXPERIMENTS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy machine)")
    parser.add_argument("--jobs", type=int, default=1, help="experiments run side by side (e.g. one per CPU core)")
    options = parser.parse_args(args)
    if options.threads is not None and options.threads < 1:
        fail(f"--threads: must be an integer >= 1 (torch threads), got {options.threads}")
    if options.jobs < 1:
        fail(f"--jobs: must be an integer >= 1 (worker processes), got {options.jobs}")
    if options.threads:
        torch.set_num_threads(options.threads)
    root = options.root or Path("runs/reproduce-fast" if options.fast else "runs/reproduce")
    output = options.output or root / "report.md"
    check_output(output)
    try:
        check_writable_directory(root, "--root")
    except ConfigError as error:
        fail(str(error))
    start = time.perf_counter()
    seconds = reproduce(root, options.fast, tuple(options.only), options.jobs)
    info = {
        "command": "cis reproduce " + " ".join(args),
        "fast": options.fast,
        "threads": torch.get_num_threads(),
        "jobs": options.jobs,
        "seconds": seconds,
        "total_seconds": time.perf_counter() - start,
    }
    record_timing(root, info)
    print(f"report: {write_report([root], output)}")


if __name__ == "__main__":
    main()
