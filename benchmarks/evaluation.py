"""Evaluation speed: the stratified evaluator against the authors' dense evaluation of the same work.

The dense reference does what `paper_code/mlpinsoup.py`'s `evaluate` does for one model at one p:
batches of 100,000 dense samples (`rand < p` mask times uniform values on [-1, 1], drawn with
torch's own generator), labels ReLU(x) + sigma M x, the MSE of each batch, until 1e6 / (1 - (1 - p)^n)
samples, i.e. about 1e6 non-empty ones; one model at a time. Ours is `cis test`'s evaluator at the
same precision setting (`eval_nonempty_samples` = 1e6): `evaluate` at the trained p, `evaluate_at`
for the evaluation p of results_by_p.csv.

Rows (all measured in this one invocation, on one machine, one after the other):
- sparsity regimes: K = 10 instances (trained p 0.001 .. 1) at the 10 evaluation p of
  sparsity_regimes.yaml, plus each at its trained p: ours (`evaluate_at` + `evaluate`) against dense;
- the sigma sweep's test: K = 82 instances at p = 0.01 (`evaluate`) against dense;
- every single p: one model at one p, ours against dense.
"ours" is what `cis test` runs: `evaluate` at the trained p (its loop's plan, allocated by variance
from a pilot, dense strata at a high p filled by Bernoulli draws) and `evaluate_at` for
results_by_p.csv, both at the dense protocol's precision.
The dense reference costs the same for every model of a row, so with --dense-models M it is timed
on M of the row's models and scaled to all of them (the output says so).

    python benchmarks/evaluation.py [--nonempty N] [--dense-models M] [--threads T] [--quick]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch

from cis_lightning.core.mixing import Mixing
from cis_lightning.core.models import MLP
from cis_lightning.core.task import Instance, Task
from cis_lightning.evaluation import evaluate, evaluate_at

TRAINED_P = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
EVAL_P = [0.001, 0.00215, 0.00464, 0.01, 0.0215, 0.0464, 0.1, 0.215, 0.464, 1.0]
N, D_MLP = 100, 50


@torch.no_grad()
def dense_evaluation(w_in: torch.Tensor, w_out: torch.Tensor, m: torch.Tensor, p: float, nonempty: int) -> float:
    """The authors' protocol for one model (w_in (h, n), w_out (n, h), sigma M (n, n)) at one p: L / p."""
    n_samples = int(nonempty / (1 - (1 - p) ** N))
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(math.ceil(n_samples / 100_000)):
        mask = torch.rand(100_000, N, generator=generator) < p
        x = (torch.rand(100_000, N, generator=generator) * 2 - 1) * mask
        y = torch.relu(x) + x @ m.T
        out = torch.relu(x @ w_in.T) @ w_out.T
        losses.append((out - y).pow(2).mean().item())
    return sum(losses) / len(losses) / p


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def dense_seconds(model: MLP, task: Task, ps_per_model: list[list[float]], nonempty: int, dense_models: int) -> float:
    """Seconds of the dense reference for every (model, p) pair, timing `dense_models` models and scaling."""
    k_all = len(ps_per_model)
    chosen = list(range(0, k_all, max(1, k_all // dense_models)))[:dense_models]
    m = task.scaled_mixing().detach()
    seconds = 0.0
    for k in chosen:
        for p in ps_per_model[k]:
            seconds += timed(lambda k=k, p=p: dense_evaluation(model.w_in[k], model.w_out[k], m[k], p, nonempty))[0]
    return seconds * k_all / len(chosen)


def row(name: str, ours: float, dense: float, note: str = "") -> None:
    print(f"| {name} | {ours:.1f} | {dense:.1f} | {dense / ours:.1f}x | {note} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nonempty", type=int, default=1_000_000, help="non-empty samples per model and p")
    parser.add_argument("--dense-models", type=int, default=2, help="models the dense reference is timed on")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20,000 non-empty samples")
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    nonempty = 20_000 if options.quick else options.nonempty
    print(
        f"evaluation benchmark: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}, {nonempty:,} non-empty samples per model and p"
    )
    print("| work | ours, s | dense, s | dense / ours | note |")
    print("|---|---|---|---|---|")
    mixing = Mixing(kind="gaussian")
    task = Task([Instance(p, sigma=0.02, mixing=mixing) for p in TRAINED_P], N)
    model = MLP(n_features=N, d_mlp=D_MLP, seeds=list(range(len(TRAINED_P))))
    ours = timed(lambda: evaluate_at(model, task, EVAL_P, nonempty) and evaluate(model, task, nonempty))[0]
    pairs = [[*EVAL_P, p] for p in TRAINED_P]
    dense = dense_seconds(model, task, pairs, nonempty, options.dense_models)
    scaled = f"dense on {options.dense_models} models, scaled"
    row("sparsity regimes: 10 models x (10 evaluation p + trained p)", ours, dense, scaled)

    sweep = Task([Instance(0.01, sigma=0.001 * i, mixing=mixing) for i in range(82)], N)
    sweep_model = MLP(n_features=N, d_mlp=D_MLP, seeds=list(range(82)))
    ours = timed(lambda: evaluate(sweep_model, sweep, nonempty))[0]
    dense = dense_seconds(sweep_model, sweep, [[0.01]] * 82, nonempty, options.dense_models)
    row("sigma sweep test: 82 models at p = 0.01", ours, dense, scaled)

    single = MLP(n_features=N, d_mlp=D_MLP)
    for p in EVAL_P:
        one = Task([Instance(p, sigma=0.02, mixing=mixing)], N)
        ours = timed(lambda one=one: evaluate(single, one, nonempty))[0]
        dense = dense_seconds(single, one, [[p]], nonempty, 1)
        row(f"one model at p = {p:g}", ours, dense)


if __name__ == "__main__":
    main()
