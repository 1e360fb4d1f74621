"""Whole experiments: `cis fit` + `cis test` as `cis reproduce` runs them, against the authors' scripts.

For each multi-model experiment of configs/experiments/ at a shortened schedule (max_steps divided
by --scale), side by side in one invocation:

- ours: `cis fit --config configs/experiments/NAME.yaml --trainer.max_steps S` and `cis test` of
  its last checkpoint, each a fresh process (what a user waits for, start-up included), validation
  off as in the shortened runs of `cis reproduce --fast`;
- the authors': what their paper_code scripts do for the same models, one model at a time in
  plain PyTorch: per step a dense `rand < p` batch (one random feature per sample for exactly-one-
  active data) with uniform values, labels ReLU(x) + sigma M x (sigma a parameter where it is
  learned), AdamW with a cosine schedule, `loss.item()` every step; then the dense evaluation of
  benchmarks/evaluation.py at every evaluation p (the config's test_feature_probabilities and
  the trained p) at the config's eval_nonempty_samples. Every model gets the steps ours gives it
  (`equal_nonempty_samples`: T_k = S q_min / q_k) and the same M and sigma (read from our run
  with `load_run`).

The authors' per-step and per-evaluation costs depend only on a model's p, batch and size, so with
--authors-steps N each model's training is timed over at most N steps and scaled to its steps, and
with --authors-models M only M models of each distinct (p, learned sigma) setting are timed and
scaled to all; the output says what was scaled. Torch threads: --threads for both sides.

    python benchmarks/experiments.py [--scale 20] [--threads 1] [--only NAME ...]
                                     [--authors-steps N] [--authors-models M]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml

# benchmarks/authors.py and evaluation.py (this script's folder is on the path): the authors' loop and dense evaluation
from authors import training_seconds
from evaluation import dense_evaluation

from cis_lightning import load_run
from cis_lightning.core.task import nonempty_steps

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("sigma_sweep", "sparsity_regimes", "mixing_comparison", "offset_baseline", "rank_study")


def ours(name: str, steps: int, root: Path, threads: int) -> tuple[float, Path]:
    """Wall seconds of `cis fit` + `cis test` of experiment `name` at `steps`, and the fit's directory."""
    config = REPO / "configs" / "experiments" / f"{name}.yaml"
    common = [
        "--config", str(config),
        "--trainer.max_steps", str(steps),
        "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(root),
        "--trainer.logger.init_args.name", name,
    ]  # fmt: skip
    if name == "offset_baseline":
        common += ["--model.network", "MLP"]  # the trained half; the NaiveOffset half needs no training
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cis_lightning", "fit", *common], check=True, env=env, capture_output=True)
    fit = max((root / name).glob("version_*"), key=lambda d: int(d.name.split("_")[1]))
    test = ["test", *common, "--ckpt_path", str(fit / "checkpoints" / "last.ckpt")]
    subprocess.run([sys.executable, "-m", "cis_lightning", *test], check=True, env=env, capture_output=True)
    return time.perf_counter() - start, fit


def authors(fit: Path, steps: int, max_timed_steps: int, max_models: int) -> tuple[float, str]:
    """Seconds the authors' scripts take for the models of our run `fit` (timed in part and scaled: the note)."""
    run = load_run(fit)
    config = run.config
    data, model = config["data"], config["model"]
    network = (model.get("network") or {}).get("init_args") or {}
    task, batch, d_mlp = run.task, data.get("batch_size", 2048), network.get("d_mlp", 50)
    ps = [instance.feature_probability for instance in task.instances]
    own_steps = nonempty_steps(steps, ps, task.n_features) if model.get("equal_nonempty_samples") else [steps] * len(ps)
    eval_ps = model.get("test_feature_probabilities") or []
    nonempty = data.get("eval_nonempty_samples", 1_000_000)
    m = task.mixing.detach()  # M itself; sigma scales it in the loop
    w_in, w_out = (w.detach() for w in run.network.effective_weights())
    sigma = task.sigma_value().detach()
    groups: dict[tuple, list[int]] = defaultdict(list)
    for k, instance in enumerate(task.instances):
        groups[instance.feature_probability, instance.learn_sigma].append(k)
    total, timed_models, scaled_steps = 0.0, 0, False
    for members in groups.values():
        chosen = members[:: max(1, math.ceil(len(members) / max_models))][:max_models]
        seconds = 0.0
        for k in chosen:
            instance = task.instances[k]
            timed = min(own_steps[k], max_timed_steps)
            scaled_steps |= timed < own_steps[k]
            train = training_seconds(
                instance.feature_probability, batch, d_mlp, m[k], timed, sigma=float(instance.sigma),
                learn_sigma=instance.learn_sigma, one_active=task.exactly_one_active,
            ) * own_steps[k] / timed  # fmt: skip
            evaluation = 0.0
            for p in dict.fromkeys([*eval_ps, instance.feature_probability]):
                start = time.perf_counter()
                dense_evaluation(w_in[k], w_out[k], sigma[k] * m[k], p, nonempty)
                evaluation += time.perf_counter() - start
            seconds += train + evaluation
        total += seconds * len(members) / len(chosen)
        timed_models += len(chosen)
    note = f"{timed_models} of {len(ps)} models timed" + (
        f", training over <= {max_timed_steps} steps" if scaled_steps else ""
    )
    return total, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=20, help="max_steps / scale steps (default 20)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=list(EXPERIMENTS), choices=EXPERIMENTS)
    parser.add_argument("--authors-steps", type=int, default=300, help="authors' steps timed per model, then scaled")
    parser.add_argument("--authors-models", type=int, default=2, help="authors' models timed per setting, then scaled")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{options.threads} thread(s), load {os.getloadavg()[0]:.1f}, max_steps / {options.scale}")  # fmt: skip
    print(
        "| experiment | K | steps | ours: cis fit + cis test (s) | authors' scripts (s) | ours faster | authors' side |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in options.only:
            config = yaml.safe_load((REPO / "configs" / "experiments" / f"{name}.yaml").read_text())
            steps = max(1, config["trainer"]["max_steps"] // options.scale)
            mine, fit = ours(name, steps, Path(tmp), options.threads)
            theirs, note = authors(fit, steps, options.authors_steps, options.authors_models)
            k = len(load_run(fit).task.instances)
            print(
                f"| {name} | {k} | {steps:,} | {mine:.0f} | {theirs:.0f} | {theirs / mine:.1f}x | {note} |", flush=True
            )


if __name__ == "__main__":
    main()
