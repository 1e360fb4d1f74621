"""`make bench`: steps per second of `cis fit` with each loss backend against a plain PyTorch loop.

The same training, side by side in one process and on the same torch threads:

- plain: the loop the paper's code runs (dense `rand < p` mask and uniform values, dense matmuls,
  torch.optim.AdamW, cosine schedule, `loss.item()` every step), on the labels of the config
  (ReLU(x) + sigma M x with the config's M);
- auto: `cis fit --config CONFIG --model.loss_backend auto` (the fast backend where it applies);
- reference: the same with `--model.loss_backend reference` (autograd through the network's forward).

`cis fit` is timed by a callback from step `--warmup` to the last step, so process start-up, the CLI
and the final evaluation are excluded; validation is off. Each repeat runs the three in turn; the
ratios are medians of the repeats' ratios (a drift of the machine's speed between repeats moves them
less than it moves the medians of the rates). Timings are printed, never stored in the code.

    python benchmarks/bench.py [--config configs/mlp_gaussian.yaml] [--steps N] [--repeats R] [--threads T] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml
from authors import training_seconds  # benchmarks/authors.py (this script's folder is on the path)

from cis_lightning.lightning.cli import run

REPO = Path(__file__).resolve().parents[1]


class StepTimer(pl.Callback):
    """Wall time from the start of step `first` to the end of the last step."""

    def __init__(self, first: int = 50):
        self.first = first
        self.start: float | None = None
        self.stop: float | None = None
        self.steps = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.first:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.stop = time.perf_counter()
        self.steps = trainer.global_step - self.first

    def steps_per_second(self) -> float:
        return self.steps / (self.stop - self.start)


def cis_steps_per_second(config: str, backend: str, warmup: int, steps: int) -> tuple[float, str]:
    """Steps/s of `cis fit` and the backend its training steps ran."""
    with tempfile.TemporaryDirectory() as tmp:
        cli = run(
            [
                "fit",
                "--config",
                str(REPO / config),
                "--trainer.max_steps",
                str(warmup + steps),
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.enable_model_summary",
                "false",
                "--trainer.limit_val_batches",
                "0",
                "--trainer.logger.init_args.save_dir",
                tmp,
                "--model.loss_backend",
                backend,
                "--trainer.callbacks+=__main__.StepTimer",
                "--trainer.callbacks.first",
                str(warmup),
            ]
        )
        timer = next(c for c in cli.trainer.callbacks if isinstance(c, StepTimer))
        return timer.steps_per_second(), cli.model.training_backend


def plain_steps_per_second(config: str, warmup: int, steps: int) -> float:
    """The paper's training loop in plain PyTorch on the config's model size, batch, p and labels."""
    settings = yaml.safe_load((REPO / config).read_text())
    data, network = settings["data"], settings["model"]["network"].get("init_args", {})
    n, d_mlp = data.get("n_features", 100), network.get("d_mlp", 50)
    batch, p = data.get("batch_size", 2048), data.get("feature_probability", 0.01)
    generator = torch.Generator().manual_seed(0)
    mixing = torch.zeros(n, n)
    if data.get("mixing", {}).get("kind", "none") != "none":  # a Gaussian M stands for any: the cost is the same
        mixing = data.get("sigma", 0.0) * torch.randn(n, n, generator=generator)
    return steps / training_seconds(p, batch, d_mlp, mixing, steps, warmup)


@contextlib.contextmanager
def torch_threads(threads: int | None):
    outside = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(outside)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/mlp_gaussian.yaml", help="the config `cis fit` trains")
    parser.add_argument("--steps", type=int, default=1000, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=100, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (plain, auto, reference)")
    parser.add_argument("--threads", type=int, default=None, help="torch's threads for all runs (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 200 steps, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats = 200, 30, 1
    rates: dict[str, list[float]] = {"plain": [], "auto": [], "reference": []}
    backends = {}
    with torch_threads(args.threads):
        machine = platform.processor() or platform.machine()
        print(f"{machine}, torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(f"{args.config}: {args.repeats} x {args.steps} steps after {args.warmup}")
        for repeat in range(args.repeats):
            rates["plain"].append(plain_steps_per_second(args.config, args.warmup, args.steps))
            for backend in ("auto", "reference"):
                rate, backends[backend] = cis_steps_per_second(args.config, backend, args.warmup, args.steps)
                rates[backend].append(rate)
            print(f"repeat {repeat}: " + ", ".join(f"{name} {values[-1]:.0f}" for name, values in rates.items()))
    print(f"\n{'':<28}{'steps/s (median)':>18}{'x plain (median of ratios)':>30}")
    for name, values in rates.items():
        ratio = statistics.median(v / plain for v, plain in zip(values, rates["plain"], strict=True))
        label = name if name == "plain" else f"cis fit, {name} ({backends[name]})"
        print(f"{label:<28}{statistics.median(values):>18.0f}{ratio:>30.2f}")


if __name__ == "__main__":
    main()
