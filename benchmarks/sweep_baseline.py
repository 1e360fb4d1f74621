"""Training speed and memory now against an earlier commit, side by side: the K = 82 sigma sweep and
the single model of configs/mlp_gaussian.yaml.

For each config, each side runs `cis fit --config <config>` (its own tree's copy) in a fresh process
whose PYTHONPATH puts that tree's `cis_lightning` first: this checkout, and a `git worktree` of BASE
made for the run (and removed after it). A step timer (a Lightning callback written
to a temporary module) measures the steps after a warm-up, so start-up, the CLI and the draw's
compilation are excluded. The two sides alternate for `--repeats` rounds; the ratio is the median of
the rounds' ratios, which a drift of the machine's speed between rounds moves less. Each side's peak
resident memory (its process's ru_maxrss at the end of training, Linux) is printed beside it.

    python benchmarks/sweep_baseline.py [--base 8f82718] [--config C ...] [--steps N] [--warmup W]
                                        [--repeats R] [--threads T]

8f82718 is the last commit before the redesign (the fast path's C kernels through ctypes, glibc's
allocator tuned with mallopt) and before the evaluation and experiment speed work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# config -> (its label, the steps timed after the warm-up: a few seconds of training each)
CONFIGS = {
    "configs/experiments/sigma_sweep.yaml": ("K = 82 sigma sweep", 300),
    "configs/mlp_gaussian.yaml": ("mlp_gaussian (K = 1)", 3000),
}
TIMER = """
import json, resource, time
import lightning.pytorch as pl


class StepTimer(pl.Callback):
    def __init__(self, first: int = 50, output: str = "timing.json"):
        self.first, self.output, self.start, self.stop, self.steps = first, output, None, None, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.first:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.stop, self.steps = time.perf_counter(), trainer.global_step - self.first
        self.instances = module.task.n_instances

    def on_train_end(self, trainer, module):
        with open(self.output, "w") as f:
            peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
            record = {"steps": self.steps, "instances": self.instances, "seconds": self.stop - self.start}
            json.dump(dict(record, peak_rss_mb=peak_rss_mb), f)
"""


def instance_steps_per_second(
    tree: Path, config: str, tmp: Path, warmup: int, steps: int, threads: int | None
) -> tuple[float, float]:
    """Instance-steps/s of `cis fit --config config` with `tree`'s package, run in `tmp` (which holds
    the timer), and the process's peak resident memory in MiB."""
    (tmp / "cis_bench_timer.py").write_text(TIMER)
    output = tmp / "timing.json"
    args = [
        "fit",
        "--config", str(tree / config),
        "--trainer.max_steps", str(warmup + steps),
        "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(tmp / "runs"),
        "--trainer.callbacks+=cis_bench_timer.StepTimer",
        "--trainer.callbacks.first", str(warmup),
        "--trainer.callbacks.output", str(output),
    ]  # fmt: skip
    code = "import sys, torch\n"
    if threads:
        code += f"torch.set_num_threads({threads})\n"
    # `python -m cis_lightning` is the command in every tree (its modules moved between commits).
    code += "import runpy\nsys.argv[0] = 'cis'\nrunpy.run_module('cis_lightning', run_name='__main__')\n"
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{tmp}")
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"sweep_baseline: the run in {tree} failed:\n{done.stderr[-3000:]}")
    timing = json.loads(output.read_text())
    return timing["instances"] * timing["steps"] / timing["seconds"], timing["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="8f82718", help="the commit to compare with")
    parser.add_argument("--config", nargs="+", default=list(CONFIGS), help="configs to time (paths in the repo)")
    parser.add_argument("--steps", type=int, default=None, help="steps to time (default: per config, CONFIGS)")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        base = scratch / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), options.base], check=True)
        try:
            rows = [compare(config, base, scratch, options) for config in options.config]
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False)
    print(f"| measure | now | {options.base} | now / {options.base} |")
    print("|---|---|---|---|")
    for row in rows:
        print(row)


def compare(config: str, base: Path, scratch: Path, options: argparse.Namespace) -> str:
    """The table rows (speed, memory) of one config, the two sides alternating for the repeats."""
    rates: dict[str, list[float]] = {"now": [], "base": []}
    memory: dict[str, list[float]] = {"now": [], "base": []}
    for _ in range(options.repeats):
        for name, tree in (("now", REPO), ("base", base)):
            with tempfile.TemporaryDirectory(dir=scratch) as tmp:
                steps = options.steps or CONFIGS.get(config, (config, 300))[1]
                rate, rss = instance_steps_per_second(tree, config, Path(tmp), options.warmup, steps, options.threads)
            rates[name].append(rate)
            memory[name].append(rss)
            print(f"{config}, {name}: {rate:.0f} instance-steps/s, peak RSS {rss:.0f} MiB", flush=True)
    ratios = [now / base for now, base in zip(rates["now"], rates["base"], strict=True)]
    label = CONFIGS.get(config, (config, 0))[0]
    now_rate, base_rate = statistics.median(rates["now"]), statistics.median(rates["base"])
    now_rss, base_rss = statistics.median(memory["now"]), statistics.median(memory["base"])
    return (
        f"| {label}, instance-steps/s | {now_rate:.0f} | {base_rate:.0f} | {statistics.median(ratios):.2f}x |\n"
        f"| {label}, peak RSS (MiB) | {now_rss:.0f} | {base_rss:.0f} | {now_rss / base_rss:.2f}x |"
    )


if __name__ == "__main__":
    main()
