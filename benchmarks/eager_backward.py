"""`cis fit` with its gradients computed without autograd (`CCModule.backward`) against through autograd.

    .venv/bin/python benchmarks/eager_backward.py [--steps 6200] [--segment 100] [CONFIG ...]

On this machine only comparisons inside one process are trustworthy (its speed drifts by tens of
percent within minutes), so each config is one fit whose training steps switch between the two
every `--segment` steps (from step 200 on; validation off). Prints the median segment's time per
step either way, the median of the adjacent segments' ratios and the ratio of the summed times.
The two ways give the same weights bit for bit (tests/test_performance.py).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl

from cis_lightning.main import run

REPO = Path(__file__).resolve().parents[1]
START = 200


class Alternate(pl.Callback):
    """Switches the module's eager backward on and off every `segment` steps and times each segment."""

    def __init__(self, segment: int = 100):
        self.segment = segment
        self.times: dict[bool, list[float]] = {True: [], False: []}
        self.eager: bool | None = None
        self.started = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step < START or step % self.segment:
            return
        now = time.perf_counter()
        if self.eager is not None:
            self.times[self.eager].append(now - self.started)
        self.eager = (step // self.segment) % 2 == 0
        pl_module._eager_backward = self.eager
        self.started = now


def compare(config: str, steps: int, segment: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        args = ["fit", "--config", str(REPO / config), "--trainer.max_steps", str(steps)]
        args += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
        args += ["--trainer.logger.init_args.save_dir", tmp, "--trainer.val_check_interval", str(10 * steps)]
        args += ["--trainer.callbacks+=__main__.Alternate", "--trainer.callbacks.segment", str(segment)]
        cli = run(args)
    timer = next(c for c in cli.trainer.callbacks if isinstance(c, Alternate))
    eager, autograd = timer.times[True], timer.times[False]
    pairs = min(len(eager), len(autograd))
    ratios = [autograd[i] / eager[i] for i in range(pairs)]
    return (
        f"{config}: eager {1e3 * statistics.median(eager) / segment:.3f} ms/step, autograd "
        f"{1e3 * statistics.median(autograd) / segment:.3f}; autograd / eager: median of {pairs} pairs "
        f"{statistics.median(ratios):.3f}x, of the sums {sum(autograd[:pairs]) / sum(eager[:pairs]):.3f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", default=["configs/mlp_clean.yaml", "configs/compressed_computation.yaml"])
    parser.add_argument("--steps", type=int, default=6200)
    parser.add_argument("--segment", type=int, default=100)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    sys.argv[1:] = []  # LightningCLI warns when it is given args and sys.argv has some too
    for config in args.configs:
        print(compare(config, args.steps, args.segment), flush=True)


if __name__ == "__main__":
    main()
