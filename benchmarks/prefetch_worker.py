"""The training batch made ahead in a DataLoader worker process, against making it in the training process.

The draw and the fused loss's host-side bookkeeping (`fused.drop_empty_rows`, `fused._Entries.on_host`)
of the next steps are made in a worker and passed as one pickled blob each (numpy arrays: no
shared-memory tensors, whose passing costs more per tensor), and the training process runs the
pure-torch core step (no Lightning) of mlp_clean at batch 2048 on them; against the same step
drawing in the training process, as `cis fit` does. The training process runs at torch's default
threads, and at one thread, which leaves the second core to the worker.

    .venv/bin/python benchmarks/prefetch_worker.py [--repeats 5] [--steps 800]

Medians over alternating repeats, milliseconds per step (README, Performance).
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import time

import numpy as np
import torch
from bench import BATCH, D_MLP, N_FEATURES, P

from cis_lightning import fused
from cis_lightning.allocator import keep_freed_memory
from cis_lightning.evaluation import mean_loss
from cis_lightning.mixing import Mixing
from cis_lightning.models import MLP
from cis_lightning.optim import AdamW
from cis_lightning.task import Instance, Task


def _task() -> Task:
    return Task([Instance(feature_probability=P, mixing=Mixing("none"))], N_FEATURES)


def _prepared(task: Task, step: int) -> fused._Entries:
    """What `fused.one_layer_loss` makes on the host for the training loss of batch `step`."""
    compact, _ = fused.drop_empty_rows(task.draw(BATCH, step), sources=False)
    return fused._Entries.on_host(compact, task.n_instances, torch.float32)


class _PreparedBatches(torch.utils.data.IterableDataset):
    """The prepared entries of steps 0, 1, ..., each as one pickled blob of numpy arrays."""

    def __iter__(self):
        task = _task()
        for step in range(10**9):
            fields = vars(_prepared(task, step))
            yield pickle.dumps({k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in fields.items()})


def _unpickle(blob: bytes) -> fused._Entries:
    entries = object.__new__(fused._Entries)
    entries.__dict__.update(
        {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in pickle.loads(blob).items()}
    )
    return entries


def core_ms(warmup: int, steps: int, worker: bool, threads: int) -> float:
    """ms per core step: draw and bookkeeping in this process, or taken from a worker's blobs."""
    torch.set_num_threads(threads)
    task, model = _task(), MLP(N_FEATURES, D_MLP)
    optimizer = AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=warmup + steps)
    if worker:
        loader = torch.utils.data.DataLoader(_PreparedBatches(), batch_size=None, num_workers=1, prefetch_factor=4)
        blobs = iter(loader)

    def loss(step: int) -> torch.Tensor:
        if not worker:
            return mean_loss(model, task, task.draw(BATCH, step))
        (w, _), a = model.readout(), model.hidden_weight()  # as mean_loss takes them, every step
        return fused._OneLayerLoss.apply(a, w, None, _unpickle(next(blobs)), None, BATCH, True)

    # The worker's blob of step 0 gives the loss that this process computes for step 0.
    if worker and not torch.equal(loss(0), mean_loss(model, task, task.draw(BATCH, 0))):
        raise RuntimeError("the worker's prepared batch gives another loss than the training process's")

    def step(t: int) -> None:
        optimizer.zero_grad()
        loss(t).sum().backward()
        optimizer.step()
        schedule.step()

    for t in range(1, warmup):
        step(t)
    start = time.perf_counter()
    for t in range(warmup, warmup + steps):
        step(t)
    return 1e3 * (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--steps", type=int, default=800)
    args = parser.parse_args()
    keep_freed_memory()
    default_threads = torch.get_num_threads()
    w, s = args.warmup, args.steps
    rows: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for threads in (default_threads, 1):
            for worker in (False, True):
                where = "in a DataLoader worker" if worker else "in the training process"
                name = f"core step, {threads} thread{'s' * (threads > 1)}, draw and bookkeeping {where}"
                rows.setdefault(name, []).append(core_ms(w, s, worker, threads))
    width = max(map(len, rows))
    print(f"median of {args.repeats}; ms per step")
    for name, values in rows.items():
        runs = ", ".join(f"{v:.3f}" for v in values)
        print(f"{name:<{width}}  {statistics.median(values):.3f}  ({runs})")


if __name__ == "__main__":
    main()
