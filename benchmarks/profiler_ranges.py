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
import tempfile
from pathlib import Path

from alternation import Alternation
from lightning.pytorch.profilers import PassThroughProfiler

from cis_lightning.main import NoProfiler, run

REPO = Path(__file__).resolve().parents[1]


class SwapProfiler(Alternation):
    """Lightning's default profiler (setting 0) and cis's NoProfiler (setting 1), alternately."""

    def __init__(self, segment: int = 100):
        super().__init__(segment)
        self.profilers = (PassThroughProfiler(), NoProfiler())

    def switch(self, trainer, pl_module, which: int) -> None:
        trainer.profiler = self.profilers[which]


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
    print(f"{swap.pairs()} pairs of {options.segment}-step segments ({cli.trainer.global_step} steps)")
    print(f"PassThroughProfiler (Lightning's default): {1e3 * swap.per_step_ms(0):.0f} us per step")
    print(f"NoProfiler (cis's default):                {1e3 * swap.per_step_ms(1):.0f} us per step")
    print(f"median of the pairs' step-time ratios, PassThroughProfiler / NoProfiler: {swap.ratios()[0]:.3f}")


if __name__ == "__main__":
    main()
