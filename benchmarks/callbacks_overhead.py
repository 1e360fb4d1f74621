"""Training throughput with and without the analysis callbacks (callbacks/analysis.yaml) at their defaults.

    .venv/bin/python benchmarks/callbacks_overhead.py [--steps 2000] [--repeats 2] [--config configs/mlp_gaussian.yaml]

Runs alternate (without, with, without, with, ...) so that a change in machine load hits both alike.
Steps/s is read from the wall times of the first and last `train/loss` events, i.e. the training
loop with the callbacks' periodic work, without start-up; the whole fit's wall time (which adds
the end-of-fit figures) is printed beside it. On a shared machine that difference drowns in noise,
so a last run with Lightning's SimpleProfiler measures the time spent inside the callbacks' per-step
hooks as a share of the training loop, which load changes hit alike. Set OMP_NUM_THREADS=1 on a
machine shared with other jobs (OpenMP threads spinning against each other cost far more).
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cis_lightning.lightning.cli import run

REPO = Path(__file__).resolve().parents[1]


def fit(config: str, steps: int, with_callbacks: bool, save_dir: Path, extra: list[str] | None = None):
    """(training steps per second, whole fit seconds, the CLI)."""
    args = ["fit", "--config", str(REPO / config), *(extra or [])]
    if with_callbacks:
        args += ["--config", str(REPO / "callbacks" / "analysis.yaml")]
    args += [
        "--trainer.max_steps",
        str(steps),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
    ]
    start = time.perf_counter()
    cli = run(args)
    seconds = time.perf_counter() - start
    events = EventAccumulator(cli.trainer.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    losses = events.Scalars("train/loss")
    first, last = losses[0], losses[-1]
    return (last.step - first.step) / (last.wall_time - first.wall_time), seconds, cli


def hook_share(config: str, steps: int, save_dir: Path) -> None:
    """Print the time inside the analysis callbacks' per-step hooks as a share of the training loop."""
    *_, cli = fit(config, steps, True, save_dir, ["--trainer.profiler", "simple"])
    durations = cli.trainer.profiler.recorded_durations
    loop = sum(durations["run_training_epoch"])
    per_step = re.compile(r"\[Callback\](EigenAlignment|PerFeatureLoss|Figures)\.on_(train_batch|before|after)")
    hooks = sum(sum(v) for k, v in durations.items() if per_step.match(k))
    once = re.compile(r"\[Callback\](EigenAlignment|PerFeatureLoss|Figures)\.on_(train_end|fit_end)")
    end = sum(sum(v) for k, v in durations.items() if once.match(k))
    share = 100 * hooks / loop
    print(f"profiled: training loop {loop:.2f} s, analysis callbacks' per-step hooks {hooks:.2f} s ({share:.1f}%)")
    print(f"profiled: the callbacks' end-of-training and end-of-fit work (final figures) {end:.2f} s, once")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mlp_gaussian.yaml")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    options = parser.parse_args()
    rates: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(options.repeats):
            for with_callbacks in (False, True):
                rate, seconds, _ = fit(options.config, options.steps, with_callbacks, Path(tmp) / f"{repeat}")
                rates[with_callbacks].append(rate)
                label = "with callbacks/analysis.yaml" if with_callbacks else "without callbacks  "
                print(f"run {repeat}: {label}: {rate:7.1f} steps/s, whole fit {seconds:6.1f} s", flush=True)
        without, with_ = (sum(rates[k]) / len(rates[k]) for k in (False, True))
        change = 100 * (with_ / without - 1)
        print(f"mean: without {without:.1f} steps/s, with {with_:.1f} steps/s: throughput {change:+.1f}%", flush=True)
        hook_share(options.config, options.steps, Path(tmp) / "profiled")


if __name__ == "__main__":
    main()
