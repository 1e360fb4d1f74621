"""The training batch made ahead in a DataLoader worker process, against making it in the training process.

The draw and the fused loss's host-side bookkeeping (`fused.drop_empty_rows`, `fused._Entries.on_host`)
of the next steps are made in a worker and passed as one pickled blob each (numpy arrays: no
shared-memory tensors, whose passing costs more per tensor), and the training process runs
bench.py's pure-torch core step (no Lightning) of mlp_clean at batch 2048 on them; against the same
step drawing in the training process, as `cis fit` does. The training process runs at torch's
default threads, and at one thread, which leaves the second core to the worker.

    .venv/bin/python benchmarks/prefetch_worker.py [--repeats 5] [--steps 800]

Medians over alternating repeats, milliseconds per step (README, Performance).
"""

from __future__ import annotations

import argparse
import pickle
import statistics
from collections.abc import Callable

import numpy as np
import torch
from bench import BATCH, clean_task, core_steps_per_second

from cis_lightning import fused
from cis_lightning.allocator import keep_freed_memory
from cis_lightning.evaluation import mean_loss
from cis_lightning.models import MLP
from cis_lightning.task import Task


class _PreparedBatches(torch.utils.data.IterableDataset):
    """What `fused.one_layer_loss` makes on the host for the training loss of steps 0, 1, ..., each
    as one pickled blob of numpy arrays."""

    def __iter__(self):
        task = clean_task()
        for step in range(10**9):
            compact, _ = fused.drop_empty_rows(task.draw(BATCH, step), sources=False)
            fields = vars(fused._Entries.on_host(compact, task.n_instances, torch.float32))
            yield pickle.dumps({k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in fields.items()})


def _unpickle(blob: bytes) -> fused._Entries:
    entries = object.__new__(fused._Entries)
    entries.__dict__.update(
        {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in pickle.loads(blob).items()}
    )
    return entries


def worker_loss() -> Callable:
    """A `core_steps_per_second` loss that takes step t's entries from a worker's blobs."""
    blobs = iter(torch.utils.data.DataLoader(_PreparedBatches(), batch_size=None, num_workers=1, prefetch_factor=4))

    def loss(model: MLP, task: Task, t: int) -> torch.Tensor:
        (w, _), a = model.readout(), model.hidden_weight()  # as mean_loss takes them, every step
        value = fused._OneLayerLoss.apply(a, w, None, _unpickle(next(blobs)), None, BATCH, True)
        if t == 0 and not torch.equal(value, mean_loss(model, task, task.draw(BATCH, 0))):
            raise RuntimeError("the worker's prepared batch gives another loss than the training process's")
        return value

    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--steps", type=int, default=800)
    args = parser.parse_args()
    keep_freed_memory()
    default_threads = torch.get_num_threads()
    rows: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for threads in (default_threads, 1):
            torch.set_num_threads(threads)
            for worker in (False, True):
                where = "in a DataLoader worker" if worker else "in the training process"
                name = f"core step, {threads} thread{'s' * (threads > 1)}, draw and bookkeeping {where}"
                # Both through autograd (the worker's loss has no eager backward), so that only where
                # the batch is made differs.
                in_process = lambda model, task, t: mean_loss(model, task, task.draw(BATCH, t))  # noqa: E731
                rate = core_steps_per_second(args.warmup, args.steps, loss=worker_loss() if worker else in_process)
                rows.setdefault(name, []).append(1e3 / rate)
    width = max(map(len, rows))
    print(f"median of {args.repeats}; ms per step")
    for name, values in rows.items():
        runs = ", ".join(f"{v:.3f}" for v in values)
        print(f"{name:<{width}}  {statistics.median(values):.3f}  ({runs})")


if __name__ == "__main__":
    main()
