"""`make demo`: train Braun et al.'s model with the paper's defaults, test it, say where it all is."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from cis_lightning.lightning.cli import run as cis
from cis_lightning.runs.results import RESULTS, read_results

CONFIG = "configs/compressed_computation.yaml"  # a shipped config: found outside a checkout too


def run(config: str = CONFIG, extra: list[str] | None = None) -> Path:
    """Fit `config`, test its last checkpoint, print L/p next to the naive loss; return the test's results.csv."""
    extra = extra or []
    start = time.perf_counter()
    fit = cis(["fit", "--config", config, *extra])
    fit_seconds = time.perf_counter() - start
    run_dir = Path(fit.trainer.log_dir)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    test = cis(["test", "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(checkpoint)])
    results = Path(test.trainer.log_dir) / RESULTS
    rows = read_results(results)
    print(f"\ntrained {config} in {fit_seconds:.0f} s; run directory {run_dir}")
    for row in rows:
        lpf, err, naive = (row[k] for k in ("loss_per_feature", "loss_per_feature_stderr", "naive_loss_per_feature"))
        verdict = "beats" if lpf + 3 * err < naive else "does not beat"
        print(f"instance {row['instance']}: L/p = {lpf:.5f} +- {err:.5f}, naive {naive:.5f}: {verdict} the naive model")
    print(f"results: {results}")
    tensorboard = Path(sys.executable).parent / "tensorboard"
    print(f"TensorBoard: {tensorboard} --logdir {run_dir.parent}  (then open http://localhost:6006)")
    return results


if __name__ == "__main__":
    # python -m cis_lightning.demo [CONFIG] [extra cis arguments...]
    arguments = sys.argv[1:]
    config = arguments.pop(0) if arguments and arguments[0].endswith(".yaml") else CONFIG
    run(config, arguments)
