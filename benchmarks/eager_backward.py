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
import sys
import tempfile
import warnings
from pathlib import Path

from alternation import Alternation

from cis_lightning.main import run

REPO = Path(__file__).resolve().parents[1]


class Alternate(Alternation):
    """The gradients through autograd (setting 0) and without it (setting 1), alternately."""

    def switch(self, trainer, pl_module, which: int) -> None:
        pl_module._eager_backward = which == 1


def compare(config: str, steps: int, segment: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        args = ["fit", "--config", str(REPO / config), "--trainer.max_steps", str(steps)]
        args += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
        args += ["--trainer.logger.init_args.save_dir", tmp, "--trainer.val_check_interval", str(10 * steps)]
        args += ["--trainer.callbacks+=__main__.Alternate", "--trainer.callbacks.segment", str(segment)]
        cli = run(args)
    timer = next(c for c in cli.trainer.callbacks if isinstance(c, Alternate))
    median, of_sums = timer.ratios()
    return (
        f"{config}: eager {timer.per_step_ms(1):.3f} ms/step, autograd {timer.per_step_ms(0):.3f}; "
        f"autograd / eager: median of {timer.pairs()} pairs {median:.3f}x, of the sums {of_sums:.3f}x"
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
