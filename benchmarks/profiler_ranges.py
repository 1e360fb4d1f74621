"""What Lightning's default profiler ranges cost a `cis fit` step, measured inside one run.

    .venv/bin/python benchmarks/profiler_ranges.py [--steps 6200] [--segment 100]

Lightning opens a profiler range around each of the ~60 hooks it calls per training step. `cis`
passes `NoProfiler` (one shared no-op context) where Lightning would use PassThroughProfiler (a
generator-based context manager per range). One fit of configs/mlp_clean.yaml at the bench's
settings (batch 2048, p = 0.01) swaps the trainer's profiler every `segment` steps, so that each
segment is timed next to one of the other kind: the median of the adjacent pairs' ratios is what a
shared machine's drift, which moves whole runs by tens of percent, cannot fake.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.profilers import PassThroughProfiler

from cis_lightning.main import NoProfiler, run

REPO = Path(__file__).resolve().parents[1]
WARMUP = 200


class SwapProfiler(pl.Callback):
    """Every `segment` steps from WARMUP on: the wall time of the segment just ended, then the other profiler."""

    def __init__(self, segment: int = 100):
        self.segment = segment
        self.profilers = (PassThroughProfiler(), NoProfiler())
        self.seconds: tuple[list[float], list[float]] = ([], [])
        self.current: int | None = None
        self.started = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step < WARMUP or step % self.segment:
            return
        now = time.perf_counter()
        if self.current is not None:
            self.seconds[self.current].append(now - self.started)
        self.current = (step // self.segment) % 2
        trainer.profiler = self.profilers[self.current]
        self.started = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6200)
    parser.add_argument("--segment", type=int, default=100)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cli = run(
            [
                "fit",
                "--config",
                str(REPO / "configs/mlp_clean.yaml"),
                "--trainer.max_steps",
                str(options.steps),
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.enable_model_summary",
                "false",
                "--trainer.limit_val_batches",
                "0",
                "--trainer.logger.init_args.save_dir",
                tmp,
                "--data.batch_size",
                "2048",
                "--data.feature_probability",
                "0.01",
                "--trainer.callbacks+=__main__.SwapProfiler",
                "--trainer.callbacks.segment",
                str(options.segment),
            ]
        )
    swap = next(c for c in cli.trainer.callbacks if isinstance(c, SwapProfiler))
    passthrough, none = swap.seconds
    pairs = min(len(passthrough), len(none))
    ratio = statistics.median(passthrough[i] / none[i] for i in range(pairs))
    per_step = [1e6 * statistics.median(s) / options.segment for s in swap.seconds]
    print(f"{pairs} pairs of {options.segment}-step segments ({cli.trainer.global_step} steps)")
    print(f"PassThroughProfiler (Lightning's default): {per_step[0]:.0f} us per step")
    print(f"NoProfiler (cis's default):                {per_step[1]:.0f} us per step")
    print(f"median of the pairs' step-time ratios, PassThroughProfiler / NoProfiler: {ratio:.3f}")


if __name__ == "__main__":
    main()
