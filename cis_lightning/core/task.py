"""The data of the CC toy model: sparse inputs x and labels y = ReLU(x) + sigma M x, for K instances.

Every instance k has its own feature probability p_k, mixing matrix M_k, sigma_k and seed. A batch
is a pure function of (seed_k, stream, step, rank, world_size): the same global batch however many
ranks share it, the same stream after a resume, and instance k draws exactly what a one-instance run
with its seed draws, while all K instances are drawn in one batched kernel (see `rng`).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cis_lightning.core import rng
from cis_lightning.core.errors import require
from cis_lightning.core.mixing import Mixing, build_mixing

# Inputs with p above this are drawn densely; below it, only the active entries are drawn.
_DENSE_ABOVE = 0.2


def _sparse_at(ps: Sequence[float]) -> bool:
    """Whether a batch of instances at these p is drawn as its active entries (all p <= _DENSE_ABOVE)."""
    return max(ps) <= _DENSE_ABOVE


class Stream(enum.IntEnum):
    """Independent random streams, so that no evaluation ever sees a training batch."""

    TRAIN = 0
    VALIDATE = 1
    TEST = 2
    ANALYSIS = 3


_FLOAT32 = torch.finfo(torch.float32)


@dataclasses.dataclass(frozen=True)
class Instance:
    """The data settings of one model instance: one row of a sweep."""

    feature_probability: float = 0.01
    sigma: float = 0.0
    learn_sigma: bool = False
    mixing: Mixing = Mixing()
    seed: int = 0

    def check(self, n_features: int, field: str = "data") -> None:
        """Raise ConfigError naming the first bad field."""
        p = self.feature_probability
        require(
            isinstance(p, (int, float)) and 0 < p <= 1,
            f"{field}.feature_probability",
            f"must be in (0, 1], got {p}",
        )
        # Both are float32 in the task: a value that rounds to 0 or infinity there is not the one configured.
        require(p >= _FLOAT32.smallest_normal, f"{field}.feature_probability", f"must be >= 1.2e-38 (float32), got {p}")
        require(
            isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma >= 0,
            f"{field}.sigma",
            f"must be a finite number >= 0, got {self.sigma}",
        )
        require(self.sigma <= _FLOAT32.max, f"{field}.sigma", f"must be <= 3.4e+38 (float32), got {self.sigma}")
        require(
            isinstance(self.seed, int) and 0 <= self.seed < 2**62,
            f"{field}.seed",
            f"must be an integer in [0, 2^62), got {self.seed}",
        )
        self.mixing.check(n_features, f"{field}.mixing")

    def flat(self) -> dict[str, Any]:
        """The settings as one flat row: mixing options under 'mixing.<option>'."""
        row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "mixing"}
        row["mixing"] = self.mixing.describe()
        row.update({f"mixing.{k}": v for k, v in dataclasses.asdict(self.mixing).items()})
        return row


GRID_KEYS: tuple[str, ...] = tuple(
    [f.name for f in dataclasses.fields(Instance) if f.name != "mixing"]
    + [f"mixing.{f.name}" for f in dataclasses.fields(Mixing)]
)


def expand_grid(base: Instance, grid: Mapping[str, Sequence[Any]] | None) -> list[Instance]:
    """The cartesian product of `grid`'s values applied to `base`, last key varying fastest.

    Keys are Instance fields or 'mixing.<option>', e.g. {"sigma": [0, 0.01], "mixing.symmetric": [True, False]}.
    The key 'cases' takes a list of such settings that go together, one grid value each, for sets that are
    no product: {"cases": [{"mixing.kind": "none"}, {"mixing.kind": "gaussian", "sigma": 0.03}]}.
    """
    if not grid:
        return [base]
    for key, values in grid.items():
        allowed = ", ".join(GRID_KEYS + ("cases",))
        require(key in GRID_KEYS + ("cases",), f"data.grid.{key}", f"unknown grid key; allowed: {allowed}")
        require(
            isinstance(values, Sequence) and not isinstance(values, str) and len(values) > 0,
            f"data.grid.{key}",
            f"must be a non-empty list of values, got {values!r}",
        )
    for i, case in enumerate(grid.get("cases", [])):
        field = f"data.grid.cases[{i}]"
        require(isinstance(case, Mapping), field, f"must be a mapping of grid keys to values, got {case!r}")
        for key in case:
            require(key in GRID_KEYS, f"{field}.{key}", f"unknown key; allowed: {', '.join(GRID_KEYS)}")
    instances = []
    for combination in itertools.product(*grid.values()):
        changes: dict[str, Any] = {}
        for key, value in zip(grid, combination, strict=True):
            changes.update(value if key == "cases" else {key: value})
        mixing_changes = {k.removeprefix("mixing."): v for k, v in changes.items() if k.startswith("mixing.")}
        top_changes = {k: v for k, v in changes.items() if not k.startswith("mixing.")}
        mixing = dataclasses.replace(base.mixing, **mixing_changes)
        instances.append(dataclasses.replace(base, mixing=mixing, **top_changes))
    return instances


def mixing_seed(instance: Instance) -> int:
    """The seed instance's M is drawn from: its mixing's own seed, else its data seed."""
    return instance.seed if instance.mixing.seed is None else instance.mixing.seed


def with_distinct_mixing(instances: Sequence[Instance]) -> list[Instance]:
    """Give instance k (its position in the whole grid) an M seed of its own, derived from (data seed, k).

    For sweeps whose instances must not share one M (the authors' sigma sweep draws a fresh M for every
    sigma) while keeping the data and initialisation streams. A mixing with an explicit seed keeps it.
    The same grid and seed give the same matrices in every run and shard.
    """
    distinct = []
    for k, instance in enumerate(instances):
        if instance.mixing.seed is None:
            state = np.random.SeedSequence([instance.seed, k]).generate_state(1, np.uint64)[0]
            mixing = dataclasses.replace(instance.mixing, seed=int(state >> np.uint64(2)))  # < 2^62
            instance = dataclasses.replace(instance, mixing=mixing)
        distinct.append(instance)
    return distinct


def nonempty_probability(feature_probability: Tensor | float, n_features: int) -> Tensor:
    """P(at least one of n features is active) = 1 - (1 - p)^n."""
    p = torch.as_tensor(feature_probability, dtype=torch.float64)
    return -torch.expm1(n_features * torch.log1p(-p))


def samples_for(n_nonempty: int, task: Task, feature_probability: list[float]) -> int:
    """Samples to draw so that every instance sees at least `n_nonempty` non-empty ones on average."""
    if task.exactly_one_active:
        return n_nonempty
    worst = nonempty_probability(min(feature_probability), task.n_features).item()
    return math.ceil(n_nonempty / worst)


def grid_size(grid: Mapping[str, Sequence[Any]] | None) -> int:
    """How many instances `expand_grid` makes of `grid`: the product of its list lengths."""
    return math.prod(len(values) for values in grid.values()) if grid else 1


def nonempty_steps(max_steps: int, feature_probability: Sequence[float], n_features: int) -> list[int]:
    """Steps T_k per instance so that all see as many non-empty samples as the sparsest in max_steps.

    T_k = round(max_steps * q_min / q_k), q = 1 - (1 - p)^n: the paper trains each p for
    base / q steps, so T_k / T_j = q_j / q_k, and the sparsest instance runs the whole run.
    """
    q = nonempty_probability(torch.tensor(list(feature_probability), dtype=torch.float64), n_features)
    return [max(1, min(max_steps, round(max_steps * float(q.min() / q_k)))) for q_k in q]


def training_instances(steps: Sequence[int], step: int) -> list[int]:
    """The instances still training at `step`: instance k trains steps 0 .. T_k - 1 (`nonempty_steps`),
    then is frozen (learning rate 0, and empty training batches)."""
    return [k for k, t in enumerate(steps) if step < t]


class Task(nn.Module):
    """Input distribution and labels of K instances.

    Buffers: feature_probability (K,), mixing (K, n, n), seeds (K,); sigma (K,) is a parameter,
    trained for the instances with learn_sigma (their |sigma| is used, as in the paper's code).
    All of it is in the state dict, so a checkpoint carries the exact matrices it was trained on.
    """

    def __init__(self, instances: Sequence[Instance], n_features: int, exactly_one_active: bool = False):
        super().__init__()
        require(len(instances) > 0, "data.grid", "expands to no instance")
        for k, instance in enumerate(instances):
            instance.check(n_features, "data" if len(instances) == 1 else f"data (instance {k})")
        self.instances = list(instances)
        self.n_features = n_features
        self.exactly_one_active = exactly_one_active
        self.has_mixing = any(i.mixing.kind != "none" for i in instances)
        mixings = [build_mixing(i.mixing, n_features, torch.Generator().manual_seed(mixing_seed(i))) for i in instances]
        self.register_buffer("mixing", torch.stack(mixings))
        self.register_buffer("feature_probability", torch.tensor([i.feature_probability for i in instances]))
        self.register_buffer("seeds", torch.tensor([i.seed for i in instances], dtype=torch.int64))
        self.register_buffer("learn_sigma", torch.tensor([i.learn_sigma for i in instances]))
        self.forget_kept()
        learned = any(i.learn_sigma for i in instances)
        self.sigma = nn.Parameter(torch.tensor([float(i.sigma) for i in instances]), requires_grad=learned)
        # Loading copies into the buffers in place: what was kept from them is made again.
        self.register_load_state_dict_post_hook(Task._after_load)

    @staticmethod
    def _after_load(module: Task, incompatible_keys=None) -> None:
        module.forget_kept()

    def forget_kept(self) -> None:
        """Drop the values kept from the buffers (`_stream_base`, `_log1m`, `_probability`): each is
        kept for the tensor it was made from, so a cast or a move (new tensors) makes them again."""
        self._stream_bases: dict[int, tuple] = {}  # stream -> (the seeds tensor it was made from, base)
        self._probabilities: dict[tuple, Tensor] = {}  # (override p values, device) -> p (K,)
        self._log1m_p: dict[int, tuple] = {}  # id(p) -> (p, log(1 - p))

    @property
    def n_instances(self) -> int:
        return len(self.instances)

    def sigma_value(self) -> Tensor:
        """sigma_k (K,): |sigma| where learned (gradient flows), the fixed value elsewhere."""
        return torch.where(self.learn_sigma, self.sigma.abs(), self.sigma.detach())

    def scaled_mixing(self) -> Tensor:
        """sigma_k M_k (K, n, n)."""
        return self.sigma_value()[:, None, None] * self.mixing

    def labels(self, x: Tensor | SparseInput, residual: bool = False) -> Tensor:
        """y = ReLU(x) + sigma M x (+ x for a residual network: Braun et al.'s x + ReLU(x)).

        x (dense or sparse), y: (K, B, n) in row form, so M x is x @ M^T.
        """
        dense = to_dense(x)
        y = torch.relu(dense)
        if residual:
            y = y + dense
        if self.has_mixing:
            y = y + times(x, self.scaled_mixing())
        return y

    def sample(
        self,
        batch_size: int,
        step: int,
        stream: Stream = Stream.TRAIN,
        rank: int = 0,
        world_size: int = 1,
        feature_probability: Sequence[float] | None = None,
    ) -> Tensor:
        """This rank's share (K, batch_size // world_size, n) of the global batch `step` of `stream`.

        Each feature is active independently with probability p_k (or exactly one is active), with
        value uniform on [-1, 1]. `feature_probability` (K floats) overrides p_k, e.g. to evaluate
        at another p. The sparse path is exact except with probability < 1e-20 per batch (`_sparse`).
        """
        return to_dense(self.draw(batch_size, step, stream, rank, world_size, feature_probability))

    def draw(
        self,
        batch_size: int,
        step: int,
        stream: Stream = Stream.TRAIN,
        rank: int = 0,
        world_size: int = 1,
        feature_probability: Sequence[float] | None = None,
        compiled: bool = False,
    ) -> Tensor | SparseInput:
        """The batch of `sample` as drawn: a SparseInput at sparse p and for exactly-one-active data
        (only the active entries exist), else the dense (K, B, n) tensor. `to_dense` gives `sample`'s.

        `compiled`: the draw, sparse or dense, runs as a torch.compile graph (`data.compile`): the same bits.
        """
        require(
            batch_size % world_size == 0, "data.batch_size", f"{batch_size} is not divisible by the {world_size} ranks"
        )
        local, stream = batch_size // world_size, int(stream)
        device = self.mixing.device
        if self.exactly_one_active:
            return self._one_active(self._key(stream, step)[:, None], rank * local, local)
        # The path is chosen from host-side floats, never from device values (no sync).
        ps = (
            [i.feature_probability for i in self.instances]
            if feature_probability is None
            else list(feature_probability)
        )
        p = self.feature_probability if feature_probability is None else self._probability(tuple(ps), device)
        if _sparse_at(ps):
            return self._sparse(stream, step, p, batch_size, local, rank, max(ps), compiled)
        return self._dense(self._key(stream, step)[:, None], p, local, rank, compiled)

    @property
    def draws_sparse(self) -> bool:
        """Whether `draw` (at the instances' own p) returns a SparseInput."""
        return self.exactly_one_active or _sparse_at([i.feature_probability for i in self.instances])

    def _probability(self, ps: tuple[float, ...], device: torch.device) -> Tensor:
        """p (K,) on the device for override values; kept, so that a run's few overrides copy once."""
        if (ps, device) not in self._probabilities:
            self._probabilities[ps, device] = torch.tensor(ps, device=device)
        return self._probabilities[ps, device]

    def _key(self, stream: int, step: int) -> Tensor:
        """rng.stream_key(seeds, stream, step) (K,)."""
        return rng.step_key(self._stream_base(stream), step)

    def _stream_base(self, stream: int) -> Tensor:
        """rng.stream_base(seeds, stream) (K,), kept for the seeds tensor."""
        seeds = self.seeds
        cached = self._stream_bases.get(stream)
        if cached is None or cached[0] is not seeds:
            cached = (seeds, rng.stream_base(seeds, stream))
            self._stream_bases[stream] = cached
        return cached[1]

    def _log1m(self, p: Tensor) -> Tensor:
        """log(1 - p) in float64 (K,), kept per p tensor (the buffer, or a kept override)."""
        cached = self._log1m_p.get(id(p))
        if cached is None or cached[0] is not p:
            cached = (p, torch.log1p(-p.double()))
            self._log1m_p[id(p)] = cached
        return cached[1]

    def sample_active(
        self,
        n_active: int,
        batch_size: int,
        step: int,
        stream: Stream = Stream.TEST,
        instances: Sequence[int] | None = None,
    ) -> Tensor:
        """x (K, batch_size, n) with exactly `n_active` active features per sample: the input distribution
        conditional on the number of active features (a uniform subset, values uniform on [-1, 1]).

        For the stratified evaluation (`evaluation.evaluate`). Steps are keyed by (n_active, step).
        Every instance gets the same samples (common random numbers: one draw, broadcast as a view
        to the K instances, or to the K' of `instances`): the conditional distribution does not depend
        on an instance's p, M or seed, so sharing keeps each instance's estimate unbiased, draws once
        instead of K times, and makes differences between instances less noisy. The draw depends on
        (stream, n_active, step) alone, so instance k evaluates exactly as a one-instance run does.
        A sparse stratum (`sparse_stratum`) is `active_entries` scattered into zeros.
        """
        n, k, device = self.n_features, n_active, self.mixing.device
        if self.sparse_stratum(k):
            feature, value = self.active_entries(k, batch_size, step, stream)
            x = torch.zeros(batch_size, n, device=device).scatter_(1, feature, value)
        else:
            generator = _stratum_generator(k, step, stream, device)
            inactive = k > n // 2  # draw the smaller of the subset and its complement
            chosen = _uniform_subset(n, n - k if inactive else k, batch_size, generator)
            values = 2 * torch.rand(batch_size, n, generator=generator, device=device) - 1  # (B, n)
            x = values.masked_fill_(chosen, 0.0) if inactive else values.masked_fill_(~chosen, 0.0)
        return x[None].expand(self.n_instances if instances is None else len(instances), batch_size, n)

    def sample_bernoulli(
        self, feature_probability: float, batch_size: int, step: int, stream: Stream = Stream.TEST
    ) -> tuple[Tensor, Tensor]:
        """x (batch_size, n) of the input distribution at p = `feature_probability` (every feature
        active with probability p, values uniform on [-1, 1]), and each sample's number of active
        features (batch_size,), for a post-stratified evaluation (`evaluation.BernoulliDraw`).

        One uniform u per number: a feature is active where u < p, with value 2 u / p - 1 (given
        u < p, u / p is uniform on [0, 1)). Shared by all instances like `sample_active`'s draws;
        keyed by (stream, p, step), apart from every stratum's keys."""
        n, device = self.n_features, self.mixing.device
        # A key per p (its float32 bits, below 2^30) above every stratum's (n_active <= n < 2^30).
        code = 2**30 + int(torch.tensor(feature_probability, dtype=torch.float32).view(torch.int32))
        generator = _stratum_generator(code, step, stream, device)
        u = torch.rand(batch_size, n, generator=generator, device=device)
        active = u < feature_probability
        x = torch.where(active, (u / feature_probability) * 2 - 1, 0.0)
        return x, active.sum(dim=1)

    def sparse_stratum(self, n_active: int) -> bool:
        """Whether samples with `n_active` active features are handled as their active entries: at most
        the fraction of features above which `draw` draws densely."""
        return 0 < n_active <= _DENSE_ABOVE * self.n_features

    def active_entries(
        self, n_active: int, batch_size: int, step: int, stream: Stream = Stream.TEST
    ) -> tuple[Tensor, Tensor]:
        """The active entries of `sample_active`'s shared draw for a sparse stratum (`sparse_stratum`):
        feature (B, k) in increasing order along each row, value (B, k) uniform on [-1, 1]."""
        n, k, device = self.n_features, n_active, self.mixing.device
        generator = _stratum_generator(k, step, stream, device)
        chosen = _uniform_subset(n, k, batch_size, generator, as_indices=True)
        feature = chosen.sort(dim=1).values
        value = 2 * torch.rand(batch_size, k, generator=generator, device=device) - 1
        return feature, value

    def _dense(self, key: Tensor, p: Tensor, local: int, rank: int, compiled: bool = False) -> Tensor:
        """This rank's rows (`_dense_input`); `compiled`: the same bits from one fused pass instead of
        some 20 passes over K B n numbers."""
        n = self.n_features
        # Row r's entries are global entries r n .. r n + n - 1: this rank's are one range.
        entries = rng.range_counters(local * n, key.device, start=rank * local * n).view(local, n)
        return (_compiled_dense_input if compiled else _dense_input)(key[:, :, None], p, entries)

    def _sparse(
        self,
        stream: int,
        step: int,
        p: Tensor,
        batch_size: int,
        local: int,
        rank: int,
        p_max: float,
        compiled: bool = False,
    ) -> SparseInput:
        """Draw only the active entries (`_active_entries`), compiled or not: the same bits either way."""
        n = self.n_features
        mean = batch_size * n * p_max
        # Enough gaps to cover the batch except with probability < 1e-20 (10 standard deviations).
        count = math.ceil(mean + 10 * math.sqrt(mean) + 10)
        key = self._key(stream, step)[:, None]
        draw = _compiled_active_entries if compiled else _active_entries
        row, feature, value = draw(
            key, self._log1m(p), rng.range_counters(2 * count, key.device), batch_size * n, count, n, local, rank
        )
        return SparseInput(row=row, feature=feature, value=value, batch_size=local, n_features=n)

    def _one_active(self, key: Tensor, first_row: int, local: int) -> SparseInput:
        n = self.n_features
        rows = torch.arange(first_row, first_row + local, device=key.device)
        feature = torch.clamp((rng.uniform(key, 2 * rows) * n).long(), max=n - 1)  # (K, B)
        value = (2 * rng.uniform(key, 2 * rows + 1) - 1).float()
        row = torch.arange(local, device=key.device).expand_as(feature)
        return SparseInput(row=row, feature=feature, value=value, batch_size=local, n_features=n)


def _dense_input(key: Tensor, p: Tensor, entries: Tensor) -> Tensor:
    """x (K, B, n) from key (K, 1, 1), p (K,) and the entries' `rng.counters` (B, n): one uniform u
    per entry, active iff u < p, and then u / p is uniform on (0, 1)."""
    u = rng.uniform_at(key, entries).float()  # (K, B, n)
    p = p.float()[:, None, None]
    return torch.where(u < p, 2 * u / p - 1, torch.zeros((), device=u.device))


def _stratum_generator(n_active: int, step: int, stream: Stream, device: torch.device) -> torch.Generator:
    """torch's own generator, seeded from the counter-based key of (stream, n_active, step): the same
    stratum batch on every rank and after a restart, drawn by torch's fast kernels."""
    key = rng.stream_key(torch.zeros(1, dtype=torch.int64), int(stream), n_active * 2**32 + step)
    return torch.Generator(device=device).manual_seed(int(key.item()) & (2**63 - 1))


def _uniform_subset(n: int, k: int, batch_size: int, generator: torch.Generator, as_indices: bool = False) -> Tensor:
    """A uniform k-subset of n features per row, by Floyd's algorithm (Bentley and Floyd 1987): for
    j = n - k, ..., n - 1 pick t uniform in {0, ..., j}, and j itself if t is taken already. Every
    subset has probability 1 / C(n, k); k passes over B numbers, no sort of the n features.

    Returns the mask (B, n) of chosen features, or with `as_indices` their indices (B, k), unordered.
    """
    device = generator.device
    # float64 uniforms: floor(u (j + 1)) is uniform on {0, .., j} to within 2^-53 relative
    u = torch.rand(batch_size, k, generator=generator, device=device, dtype=torch.float64)
    taken = torch.zeros(batch_size, n, dtype=torch.bool, device=device)
    picks = torch.empty(batch_size, k, dtype=torch.int64, device=device)
    for i, j in enumerate(range(n - k, n)):
        t = (u[:, i : i + 1] * (j + 1)).long().clamp_(max=j)  # (B, 1)
        pick = torch.where(taken.gather(1, t), j, t)
        taken.scatter_(1, pick, True)
        picks[:, i : i + 1] = pick
    return picks if as_indices else taken


class _Compiled:
    """`function` through torch.compile (one graph per shape), built on the first call (a few
    seconds); where compiling fails (inductor finds no C++ compiler, say), `function` itself, after
    one warning: the same numbers either way."""

    def __init__(self, function):
        self.function, self.run = function, None

    def __call__(self, *args):
        if self.run is not None:
            return self.run(*args)
        compiled = torch.compile(self.function, dynamic=False)
        try:
            result = compiled(*args)  # compiles
        except Exception as error:
            first_line = (str(error).strip().splitlines() or [""])[0][:200]
            message = (
                f"cis: data.compile: torch.compile failed ({type(error).__name__}: {first_line}); drawing uncompiled"
            )
            warnings.warn(message, stacklevel=2)
            self.run = self.function
            return self.function(*args)
        self.run = compiled
        return result


def _active_entries(key, log1m_p, uniforms, total: int, count: int, n: int, local: int, rank: int) -> tuple:
    """(row, feature, value), each (K, count), of this rank's active entries of a global batch of
    `total` = B n entries: the gaps between active entries in the flattened batch are geometric.

    key (K, 1) int64 and log1m_p = log(1 - p) (K,) float64. Entries of other ranks, or past the
    batch, go to a spare row `local` with value 0. p = 0 (a frozen instance,
    `CCDataModule.on_after_batch_transfer`): infinite gaps, no entries. uniforms:
    `rng.range_counters(2 count)`, the counters of the gaps' and values' uniforms.
    """
    u = rng.uniform_at(key, uniforms)  # (K, 2 count): the gaps, then the values
    gaps = torch.clamp(torch.floor(torch.log(u[:, :count]) / log1m_p[:, None]), max=total).long()
    position = torch.cumsum(gaps + 1, 1) - 1  # global entry ids of the active entries
    values = (2 * u[:, count:] - 1).float()
    row = position // n - rank * local
    inside = (row >= 0) & (row < local)
    row, feature = torch.where(inside, row, local), torch.where(inside, position % n, 0)
    values = torch.where(inside, values, 0.0)
    if rank > 0:  # the entries of lower ranks come first: move them to the end (rows stay sorted)
        order = torch.argsort(row, dim=1, stable=True)
        row, feature, values = row.gather(1, order), feature.gather(1, order), values.gather(1, order)
    return row, feature, values


_compiled_active_entries = _Compiled(_active_entries)
_compiled_dense_input = _Compiled(_dense_input)


@dataclasses.dataclass
class SparseInput:
    """A batch x (K, B, n) stored as its active entries: x[k, row[k, c], feature[k, c]] = value[k, c].

    row, feature, value: (K, C); an entry with row == B is padding (value 0) and is dropped. Entries
    are distinct positions, sorted by row. Products with x cost O(C) instead of O(B n): at p = 0.01
    a batch of 2048 x 100 has about 2048 active entries.
    """

    row: Tensor
    feature: Tensor
    value: Tensor
    batch_size: int
    n_features: int

    def dense(self) -> Tensor:
        """x (K, B, n)."""
        k, b, n = self.row.shape[0], self.batch_size, self.n_features
        x = torch.zeros(k, (b + 1) * n, device=self.value.device, dtype=self.value.dtype)
        x.scatter_(1, self.row * n + self.feature, self.value)
        return x[:, : b * n].view(k, b, n)

    def to(self, dtype: torch.dtype) -> SparseInput:
        """The same entries with values in `dtype`."""
        return self if self.value.dtype == dtype else dataclasses.replace(self, value=self.value.to(dtype))

    def without_empty_rows(self) -> SparseInput:
        """The non-empty samples only, (K, R, n) with R the most non-empty samples of any instance
        (an instance with fewer gets empty rows at the end), in their order. Reads R on the host."""
        b = self.batch_size
        real = self.row < b
        first = real.clone()  # the first entry of every non-empty sample (rows are sorted)
        first[:, 1:] &= self.row[:, 1:] != self.row[:, :-1]
        compact = torch.cumsum(first, dim=1) - 1  # each entry's row among the non-empty samples
        n_rows = int(first.sum(dim=1).max()) if first.numel() else 0
        row = torch.where(real, compact, n_rows)  # padding stays padding: row R
        return dataclasses.replace(self, row=row, batch_size=n_rows)

    def times(self, weight: Tensor) -> Tensor:
        """x @ weight^T (K, B, m) for weight (K, m, n): sum over entries of value * weight[:, :, feature]."""
        k, b, n, m = self.row.shape[0], self.batch_size, self.n_features, weight.shape[1]
        # One embedding bag per sample (rows are sorted): a fused gather, scale and sum, forward and backward.
        instance = torch.arange(k, device=self.row.device)[:, None]
        out = torch.nn.functional.embedding_bag(
            (instance * n + self.feature).view(-1),
            weight.transpose(1, 2).reshape(k * n, m),
            self.starts,
            mode="sum",
            per_sample_weights=self.value.reshape(-1).to(weight.dtype),
        )
        return out.view(k, b + 1, m)[:, :b]

    @functools.cached_property
    def starts(self) -> Tensor:
        """(K (B + 1),): the first entry of each row in a stack of the K instances' rows (B + 1 each,
        the last for padding), as `times`'s embedding bags take them; kept, as the rows never change."""
        k, b = self.row.shape[0], self.batch_size
        instance = torch.arange(k, device=self.row.device)[:, None]
        flat_rows = (instance * (b + 1) + self.row).view(-1)
        return torch.searchsorted(flat_rows, torch.arange(k * (b + 1), device=self.row.device))


def to_dense(x: Tensor | SparseInput) -> Tensor:
    """x as a dense (K, B, n) tensor."""
    return x.dense() if isinstance(x, SparseInput) else x


def times(x: Tensor | SparseInput, weight: Tensor) -> Tensor:
    """x @ weight^T (K, B, m) for x (K, B, n), dense or sparse, and weight (K, m, n)."""
    return x.times(weight) if isinstance(x, SparseInput) else torch.bmm(x, weight.transpose(1, 2))


def select_instances(module: nn.Module, instances: Sequence[int]) -> nn.Module:
    """A copy of a K-instance module (a model or the Task) that holds only `instances`, for evaluation.

    Every parameter and buffer of the package's modules has the instance axis first; the copy holds
    their rows `instances` (new tensors: changing them leaves the module alone) and shares the rest.
    """
    return _select(module, list(instances), module.n_instances)


def _select(module: nn.Module, index: list[int], n_instances: int) -> nn.Module:
    # A deep copy in which every parameter and buffer (of the module and its submodules) is replaced
    # by its rows `index` (a memo entry makes deepcopy use the given object for the original).
    memo: dict[int, Any] = {}
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        require(
            tensor.dim() > 0 and tensor.shape[0] == n_instances,
            "instances",
            f"{type(module).__name__}.{name} has no instance axis first (shape {tuple(tensor.shape)})",
        )
        rows = tensor.detach()[index]
        memo[id(tensor)] = nn.Parameter(rows, requires_grad=False) if isinstance(tensor, nn.Parameter) else rows
    view = copy.deepcopy(module, memo)
    for part in view.modules():
        if isinstance(part, Task):
            part.instances = [part.instances[k] for k in index]
            part.forget_kept()
        elif "n_instances" in vars(part):
            part.n_instances = len(index)
    return view
