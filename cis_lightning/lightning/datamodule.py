"""LightningDataModule: sparse-feature batches, drawn on the training device from (seed, step).

The dataloaders carry only (stream, step) pairs; `on_after_batch_transfer` turns each into the
batch on the device, so nothing is drawn on the host and nothing is copied to the device.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import lightning.pytorch as pl
from torch import Tensor
from torch.utils.data import IterableDataset

from cis_lightning.core.errors import check_sizes, require
from cis_lightning.core.mixing import Mixing
from cis_lightning.core.task import (
    Instance,
    Stream,
    Task,
    expand_grid,
    samples_for,
    training_instances,
    with_distinct_mixing,
)
from cis_lightning.evaluation import (
    ALLOCATIONS,
    BernoulliDraw,
    StrataPlan,
    StratumDraw,
    allocate,
    evaluation_probability,
)


class _Steps(IterableDataset):
    """(stream, step) for step = start(), start() + 1, ... (< stop), this rank's share only when `split`."""

    def __init__(
        self, stream: Stream, start: Callable[[], int], stop: int | None = None, split: Callable | None = None
    ):
        self.stream, self.start, self.stop, self.split = stream, start, stop, split

    def __iter__(self) -> Iterator[tuple[int, int]]:
        steps = itertools.count(self.start()) if self.stop is None else range(self.start(), self.stop)
        if self.split is not None:
            rank, world = self.split()
            steps = itertools.islice(steps, rank, None, world)
        return ((int(self.stream), step) for step in steps)


class EvalBatch(NamedTuple):
    """A validation or test batch: one draw of the evaluation plan (`evaluation.StratumDraw` or
    `evaluation.BernoulliDraw`) of `stream`. The module draws and evaluates it (`evaluation.draw_losses`),
    as `evaluation.evaluate` does: a sparse stratum never becomes a dense batch."""

    stream: int
    draw: StratumDraw | BernoulliDraw


class _Strata(IterableDataset):
    """This rank's share of the batches of a stratified evaluation plan (made when iterated)."""

    def __init__(self, stream: Stream, plan: Callable[[Stream], StrataPlan], split: Callable):
        self.stream, self.plan, self.split = stream, plan, split

    def __iter__(self) -> Iterator[EvalBatch]:
        rank, world = self.split()
        plan = self.plan(self.stream)
        for draw in plan.draws[rank::world]:
            yield EvalBatch(int(self.stream), draw)


def select_shard(instances: list[Instance], shard: str | None) -> list[Instance]:
    """Instances i, i + N, i + 2N, ... for shard "i/N" (all for None)."""
    if shard is None:
        return instances
    index, _, count = str(shard).partition("/")
    valid = index.isdigit() and count.isdigit() and 0 <= int(index) < int(count) <= len(instances)
    allowed = f"'i/N' with 0 <= i < N <= {len(instances)} (the grid's instances)"
    require(valid, "data.shard", f"must be {allowed}, got {shard!r}")
    return instances[int(index) :: int(count)]


class CCDataModule(pl.LightningDataModule):
    """Inputs x and labels ReLU(x) + sigma M x (+ x for the residual model) for K instances.

    One instance by default; `grid` maps instance fields (sigma, feature_probability, seed,
    learn_sigma, mixing.<option>) to lists of values, and their cartesian product gives the
    instances. Every instance draws M from its data seed, so instances that share a seed share M;
    `distinct_mixing` gives each instance of the grid an M of its own (`task.with_distinct_mixing`),
    keeping the data and initialisation streams. `batch_size` is the global batch, shared by all
    ranks. Evaluation uses about `eval_nonempty_samples` non-empty samples per instance.

    Validation and test are stratified by the number of active features (`evaluation.plan_strata`):
    the strata in `exact_strata` (the empty sample, and the single-feature one for a bias-free model;
    the module sets it) are computed, the others sampled in batches of at most `eval_batch_size`, at
    the precision of `eval_nonempty_samples` non-empty samples of the dense protocol.
    `eval_allocation` "variance" (default) spends the samples by each stratum's spread, from a pilot
    of the model being evaluated (`stratum_moments`, which the module sets), and so draws fewer;
    "proportional" gives every stratum `eval_nonempty_samples` times its share of the non-empty samples.

    `shard` "i/N" keeps instances i, i + N, i + 2N, ... of the grid: N runs with shards 0/N .. N-1/N
    (one per process, node or SLURM array task) train the whole sweep with no communication, and
    each instance exactly as in the unsharded run (instances never interact: the loss is a sum of
    per-instance losses, and an instance's data and initialisation depend only on its seed). Instance
    numbers restart at 0 in each shard; the setting columns of results.csv identify the instances.

    `compile`: draw the training batches through torch.compile: the same bits from a few fused
    passes instead of 20 to 35 operations over every number drawn, after a few seconds of compiling
    (where compiling fails, one warning, and the draw runs uncompiled). For sweeps on a CPU, dense
    batches (p > 0.2) and GPUs (fewer kernel launches). The experiments that gain set it.
    """

    def __init__(
        self,
        n_features: int = 100,
        feature_probability: float = 0.01,
        exactly_one_active: bool = False,
        mixing: Mixing = Mixing(),
        sigma: float = 0.0,
        learn_sigma: bool = False,
        seed: int = 0,
        batch_size: int = 2048,
        eval_nonempty_samples: int = 1_000_000,
        eval_batch_size: int = 65536,
        eval_allocation: str = "variance",
        grid: dict[str, list[Any]] | None = None,
        distinct_mixing: bool = False,
        shard: str | None = None,
        compile: bool = False,
    ):
        super().__init__()
        require(isinstance(compile, bool), "data.compile", f"must be true or false, got {compile!r}")
        self.compile = compile
        check_sizes(
            **{
                "data.n_features": n_features,
                "data.batch_size": batch_size,
                "data.eval_nonempty_samples": eval_nonempty_samples,
                "data.eval_batch_size": eval_batch_size,
            }
        )
        base = Instance(feature_probability, sigma, learn_sigma, mixing, seed)
        self.n_features = n_features
        self.batch_size = batch_size
        self.eval_nonempty_samples = eval_nonempty_samples
        self.eval_batch_size = eval_batch_size
        require(
            eval_allocation in ALLOCATIONS,
            "data.eval_allocation",
            f"must be one of {', '.join(map(repr, ALLOCATIONS))}, got {eval_allocation!r}",
        )
        self.eval_allocation = eval_allocation
        # (plan, stream) -> the (mean, variance) of the loss per instance and stratum of the model being
        # evaluated (`evaluation.plan_pilot`); the module sets it, and a variance allocation needs it.
        self.stratum_moments: Callable[[StrataPlan, Stream], tuple[Tensor, Tensor]] | None = None
        self._plan: tuple[tuple[Stream, int], StrataPlan] | None = None  # the last plan and its (stream, step)
        self.shard = shard
        self.exact_strata: tuple[int, ...] = (0,)  # every model's empty-sample loss is one forward pass
        # T_k: instance k's training batches are empty from step T_k on, where its learning rate is 0
        # (the module sets it for equal_nonempty_samples), so that frozen instances cost no draws.
        self.train_steps: list[int] | None = None
        require(
            isinstance(distinct_mixing, bool), "data.distinct_mixing", f"must be true or false, got {distinct_mixing!r}"
        )
        instances = expand_grid(base, grid)
        if distinct_mixing:
            instances = with_distinct_mixing(instances)
        self.task = Task(select_shard(instances, shard), n_features, exactly_one_active)

    @property
    def seeds(self) -> list[int]:
        """One seed per instance: the model initialises instance k from seeds[k]."""
        return [instance.seed for instance in self.task.instances]

    @property
    def n_instances(self) -> int:
        return self.task.n_instances

    def _rank_and_world(self) -> tuple[int, int]:
        return self.trainer.global_rank, self.trainer.world_size

    def eval_plan(self, stream: Stream = Stream.TEST) -> StrataPlan:
        """The stratified evaluation of validate (stream VALIDATE) or test at the trainer's step: the
        same plan for the loader and the module, and on every rank (rank 0's, broadcast)."""
        trainer = self.trainer
        key = (stream, trainer.global_step if trainer is not None else 0)
        if self._plan is not None and self._plan[0] == key:
            return self._plan[1]
        plan = None
        if trainer is None or trainer.global_rank == 0:
            pilot = None
            if self.eval_allocation == "variance" and self.stratum_moments is not None:
                pilot = functools.partial(self.stratum_moments, stream=stream)
            ps = evaluation_probability(self.task)
            plan = allocate(self.task, ps, self.eval_nonempty_samples, self.eval_batch_size, self.exact_strata, pilot)
        if trainer is not None and trainer.world_size > 1:
            plan = trainer.strategy.broadcast(plan, src=0)
        self._plan = (key, plan)
        return plan

    # The loaders are the iterables themselves, not DataLoaders: Lightning takes any iterable, and a
    # DataLoader (a profiler range, a fetcher and a collate per item) would do a lot of work per
    # training step to hand on a pair of ints.
    def train_dataloader(self) -> _Steps:
        # Starts at the trainer's step, so a resumed run continues the same stream.
        return _Steps(Stream.TRAIN, lambda: self.trainer.global_step)

    def _eval_dataloader(self, stream: Stream) -> _Strata:
        return _Strata(stream, self.eval_plan, self._rank_and_world)

    def val_dataloader(self) -> _Strata:
        return self._eval_dataloader(Stream.VALIDATE)

    def test_dataloader(self) -> _Strata:
        return self._eval_dataloader(Stream.TEST)

    def predict_dataloader(self) -> _Steps:
        # Predictions are of the input distribution itself: dense batches, empty samples included.
        n_samples = samples_for(self.eval_nonempty_samples, self.task, evaluation_probability(self.task))
        n_batches = -(-n_samples // self.eval_batch_size)
        return _Steps(Stream.TEST, lambda: 0, n_batches, split=self._rank_and_world)

    def on_exception(self, exception: BaseException) -> None:
        # Lightning calls this hook of the data module, not the module's teardown, when a fit fails:
        # the module gives torch back the threads it had before training (`CCModule.threads`) and
        # its training steps their autograd graph (`CCModule.backward`).
        leave = getattr(self.trainer.lightning_module, "leave_training", None)
        if leave is not None:
            leave()

    def transfer_batch_to_device(self, batch: tuple, device: Any, dataloader_idx: int) -> tuple:
        # A batch is a few ints until on_after_batch_transfer draws it on the device: nothing to move
        # (Lightning's default walks it for tensors).
        return batch

    def on_after_batch_transfer(self, batch: tuple, dataloader_idx: int) -> Any:
        if isinstance(batch, EvalBatch):  # validate, test: the module draws it (`CCModule._eval_step`)
            return batch
        stream, step = batch
        if stream == Stream.TRAIN:
            rank, world = self._rank_and_world()
            # Sparse batches stay sparse: the loss never needs the dense (B, n) input (`per_sample_loss`).
            ps = None
            if self.train_steps is not None and step >= min(self.train_steps):
                training = training_instances(self.train_steps, step)
                ps = [i.feature_probability if k in training else 0.0 for k, i in enumerate(self.task.instances)]
            return self.task.draw(self.batch_size, step, Stream.TRAIN, rank, world, ps, compiled=self.compile)
        return self.task.sample(self.eval_batch_size, step, Stream(stream))
