"""Loss per feature, L / p, with its standard error, and the naive reference.

L is the mean squared error over features and samples. Dividing by p compares sparsities: the
naive model (d_mlp features get a neuron each, the rest output 0) has L / p = (n - d_mlp) / n / 6 at
every p, because an unrepresented active feature costs E[ReLU(x)^2] = 1/6 for x ~ U[-1, 1].
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torchmetrics import Metric

from cis_lightning.core.errors import require
from cis_lightning.core.loss import per_sample_loss
from cis_lightning.core.models import CCModel
from cis_lightning.core.task import Stream, Task, samples_for, select_instances
from cis_lightning.evaluation.readout import ReadoutForm, active_entries_of, readout_form


def naive_loss_per_feature(n_features: int, n_neurons: int) -> float:
    """(n - d_mlp) / n / 6: L / p of the naive model (0 once every feature has a neuron)."""
    return max(n_features - n_neurons, 0) / n_features / 6


def evaluation_probability(task: Task) -> list[float]:
    """The p that L is divided by: p_k, or 1/n for exactly-one-active data (one active feature per sample)."""
    if task.exactly_one_active:
        return [1 / task.n_features] * task.n_instances
    return [i.feature_probability for i in task.instances]


class LossPerFeature(Metric):
    """L / p per instance with its standard error, from running sums of per-sample losses.

    A torchmetrics Metric, so that ranks that evaluated different samples sum their states.
    update((K, B) per-sample losses) never syncs with the host; compute() returns a (2, K) tensor,
    L/p and its standard error (stacked, so torchmetrics does not squeeze K = 1 to a scalar).
    """

    full_state_update = False

    def __init__(self, feature_probability: list[float]):
        super().__init__()
        k = len(feature_probability)
        self.register_buffer("p", torch.tensor(feature_probability, dtype=torch.float64), persistent=False)
        for name in ("total", "total_sq"):
            self.add_state(name, default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, losses: Tensor) -> None:
        losses = losses.double()
        self.total += losses.sum(dim=1)
        self.total_sq += losses.pow(2).sum(dim=1)
        self.count += losses.shape[1]

    def compute(self) -> Tensor:
        return torch.stack(loss_per_feature(self.total, self.total_sq, self.count, self.p))


def loss_per_feature(total: Tensor, total_sq: Tensor, count: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
    """(L / p, its standard error) from sums of per-sample losses; all (K,), count a scalar."""
    mean = total / count
    variance = (total_sq / count - mean.pow(2)).clamp_min(0) * count / (count - 1).clamp_min(1)
    stderr = (variance / count).sqrt()
    p = p.to(total)
    return mean / p, stderr / p


@dataclasses.dataclass
class Evaluation:
    loss_per_feature: Tensor  # (K,)
    stderr: Tensor  # (K,)
    n_samples: int


# How a stratified evaluation spends its samples (`plan_strata`): in proportion to each stratum's
# probability, or to its probability times its spread (from a pilot).
ALLOCATIONS = ("proportional", "variance")
# A variance allocation's pilot draws at most this many samples of each stratum (`plan_pilot`).
PILOT_SAMPLES = 2048

# Strata (numbers of active features) whose probability, given a non-empty sample, is below this
# are left out of the stratified estimate: their share of L is below 1e-12 times their mean loss.
_NEGLIGIBLE_STRATUM = 1e-12


@torch.no_grad()
def single_feature_loss(model: CCModel, task: Task) -> Tensor:
    """E[loss | exactly one active feature] (K,), exact for a positively homogeneous model.

    A bias-free ReLU network and the labels ReLU(x) + M x (+ x) satisfy f(a x) = a f(x) for a >= 0,
    so loss(u e_i) = u^2 loss(sign(u) e_i); with u uniform on [-1, 1], E[u^2 | u > 0] = 1/3 and
    each sign has probability 1/2:  E = sum_i (loss(e_i) + loss(-e_i)) / (6 n), from 2n forward passes.
    """
    name = type(model).__name__
    require(model.homogeneous, "model", f"{name} has biases: its single-feature loss has no closed form")
    n = task.n_features
    eye = torch.eye(n, device=task.mixing.device, dtype=task.mixing.dtype)
    x = torch.cat([eye, -eye]).expand(task.n_instances, 2 * n, n)
    return per_sample_loss(model, task, x).double().sum(dim=1) / (6 * n)


def loss_per_feature_limit(model: CCModel, task: Task) -> Tensor:
    """lim_{p -> 0} L / p (K,) = n E[loss | one active], exact for a homogeneous model.

    Also L / p of exactly-one-active data (p = 1/n there).
    """
    return task.n_features * single_feature_loss(model, task)


def active_count_probability(task: Task, feature_probability: list[float]) -> Tensor:
    """P(k features active) (K, n + 1): Binomial(n, p_k), or all mass on k = 1 for exactly-one-active data."""
    n = task.n_features
    if task.exactly_one_active:
        return torch.zeros(task.n_instances, n + 1, dtype=torch.float64).index_fill_(1, torch.tensor([1]), 1.0)
    p = torch.tensor(feature_probability, dtype=torch.float64)[:, None]
    k = torch.arange(n + 1, dtype=torch.float64)
    log_choose = torch.lgamma(torch.tensor(n + 1.0)) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
    # xlogy / xlog1py give 0 log 0 = 0, so p = 1 puts all mass on k = n (0 * log(0) would be NaN).
    return torch.exp(log_choose + torch.xlogy(k, p) + torch.special.xlog1py(n - k, -p))


@torch.no_grad()
def evaluate(
    model: CCModel,
    task: Task,
    n_nonempty: int = 1_000_000,
    batch_size: int = 65536,
    stream: Stream = Stream.TEST,
    feature_probability: list[float] | None = None,
    method: str = "stratified",
    allocation: str = "variance",
    pilot_samples: int = PILOT_SAMPLES,
) -> Evaluation:
    """L / p of every instance, with its standard error, from about `n_nonempty` non-empty samples.

    method "dense" is the paper's protocol: dense batches of the input distribution, empty samples
    included. "stratified" (default) estimates the same L as sum_k P(k active) E[loss | k active]:
    the empty sample's loss is one forward pass, a homogeneous model's one-active term is exact
    (`single_feature_loss`), and every other stratum is sampled (at least 2 samples each). allocation
    "variance" (default, as `cis test`) spends the samples by each stratum's spread (`neyman_counts`,
    from a discarded pilot of at most `pilot_samples` per stratum): the dense protocol's precision at
    `n_nonempty` non-empty samples from the fewest samples. "proportional" gives every stratum the
    samples that `n_nonempty` non-empty samples would hold on average: at least as precise as the
    dense estimate (stratifying removes the between-strata variance, and exact strata have none).
    Either way only the non-exact part is drawn: at p = 0.001, n = 100, 95% of non-empty samples have
    one active feature; exactly-one-active data draw nothing and give stderr 0. A model with biases
    has only the empty sample exact and samples every other stratum.
    `feature_probability` (K floats) evaluates at other p than the trained ones.
    """
    require(method in ("stratified", "dense"), "method", f"must be 'stratified' or 'dense', got {method!r}")
    ps = evaluation_probability(task) if feature_probability is None else list(feature_probability)
    require(allocation in ALLOCATIONS, "allocation", f"must be one of {ALLOCATIONS}, got {allocation!r}")
    if method == "stratified":
        exact = exact_strata(model)
        pilot = None
        if allocation == "variance":
            pilot = functools.partial(stratum_moments, model, task, stream=stream, pilot_samples=pilot_samples)
        return evaluate_plan(model, task, allocate(task, ps, n_nonempty, batch_size, exact, pilot), stream)
    n_batches = math.ceil(samples_for(n_nonempty, task, ps) / batch_size)
    metric = LossPerFeature(ps).to(task.mixing.device)
    for step in range(n_batches):
        x = task.sample(batch_size, step, stream, feature_probability=feature_probability)
        metric.update(per_sample_loss(model, task, x))
    lpf, err = metric.compute()
    return Evaluation(lpf.cpu(), err.cpu(), n_batches * batch_size)


@torch.no_grad()
def evaluate_plan(model: CCModel, task: Task, plan: StrataPlan, stream: Stream = Stream.TEST) -> Evaluation:
    """L / p and its standard error from the draws of `plan` (`plan_strata`)."""
    metric = StratifiedLossPerFeature(plan, exact_losses(model, task, plan.exact)).to(task.mixing.device)
    form = readout_form(model, task)
    for draw in plan.draws:
        metric.add(draw, draw_losses(model, task, form, draw, stream))
    lpf, err = metric.compute()
    return Evaluation(lpf.cpu(), err.cpu(), plan.n_samples)


def allocate(
    task: Task,
    feature_probability: list[float],
    n_nonempty: int,
    batch_size: int,
    exact: Sequence[int],
    pilot: Callable[[StrataPlan], tuple[Tensor, Tensor]] | None = None,
) -> StrataPlan:
    """The plan of a stratified evaluation: proportional (`plan_strata`), or with `pilot` (the
    moments of the model's loss per stratum for the proportional plan, `plan_pilot`) by variance."""
    plan = plan_strata(task, feature_probability, n_nonempty, batch_size, exact)
    if pilot is None:
        return plan
    return plan_strata(task, feature_probability, n_nonempty, batch_size, exact, pilot(plan))


def stratum_moments(
    model: CCModel, task: Task, plan: StrataPlan, stream: Stream = Stream.TEST, pilot_samples: int = PILOT_SAMPLES
) -> tuple[Tensor, Tensor]:
    """The pilot moments (`plan_pilot`) of `model` for the proportional `plan`: what `allocate` needs
    for a variance allocation."""
    return plan_pilot(model, task, [plan], pilot_samples, exact_losses(model, task, plan.exact), stream)


def plan_pilot(
    model: CCModel, task: Task, plans: Sequence[StrataPlan], pilot_samples: int, exact_values: Tensor, stream: Stream
) -> tuple[Tensor, Tensor]:
    """`pilot_moments` of every stratum that some proportional plan of `plans` samples, from at most
    `pilot_samples` samples each (fewer where the proportional plan plans fewer: then the pilot costs
    no more than the stratum would)."""
    wanted: dict[int, int] = {}
    for plan in plans:
        for k, count in plan.targets.items():
            wanted[k] = max(wanted.get(k, 0), count)
    strata = sorted(wanted)
    sizes = [min(pilot_samples, wanted[k]) for k in strata]
    return pilot_moments(model, task, strata, sizes, plans[0].exact, exact_values, stream)


@torch.no_grad()
def evaluate_at(
    model: CCModel,
    task: Task,
    feature_probabilities: Sequence[float],
    n_nonempty: int = 1_000_000,
    batch_size: int = 65536,
    stream: Stream = Stream.TEST,
    allocation: str = "variance",
    pilot_samples: int = PILOT_SAMPLES,
) -> list[Evaluation]:
    """L / p of every instance at each p of `feature_probabilities` (one p for all K instances at a
    time): `evaluate(..., feature_probability=[q] * K)` for every q, from one set of stratum draws.

    A stratum (k active features) has the same conditional distribution at every p; only its weight
    P(k | p) changes. So the p share their samples: stratum k gets the most samples any p's own plan
    (`plan_strata`) draws of it, drawn once for all instances (`Task.sample_active`), every p's
    Bernoulli draws (`BernoulliDraw`) count for every p whose plan samples their strata, and each p
    weighs the stratum means with its own probabilities. Every p's estimate is at least as precise as
    its own `evaluate`, and the samples are drawn and pushed through the model once instead of once per p.
    """
    require(allocation in ALLOCATIONS, "allocation", f"must be one of {ALLOCATIONS}, got {allocation!r}")
    k_instances, exact = task.n_instances, exact_strata(model)
    ps = [[q] * k_instances for q in feature_probabilities]
    plans = [plan_strata(task, p, n_nonempty, batch_size, exact) for p in ps]
    exact_values = exact_losses(model, task, exact)
    if allocation == "variance":
        moments = plan_pilot(model, task, plans, pilot_samples, exact_values, stream)
        plans = [plan_strata(task, p, n_nonempty, batch_size, exact, moments) for p in ps]
    counts: dict[int, int] = {}  # the exact-k samples of stratum k: the most any p's plan draws
    bernoulli: list[BernoulliDraw] = []
    for plan in plans:
        per_stratum: dict[int, int] = {}
        for draw in plan.draws:
            if isinstance(draw, StratumDraw):
                per_stratum[draw.k] = per_stratum.get(draw.k, 0) + draw.size
            else:
                bernoulli.append(draw)
        for k, count in per_stratum.items():
            counts[k] = max(counts.get(k, 0), count)
    draws = [
        StratumDraw(k, step, min(batch_size, count - start), None)
        for k, count in sorted(counts.items())
        for step, start in enumerate(range(0, count, batch_size))
    ]
    metrics = [StratifiedLossPerFeature(plan, exact_values).to(task.mixing.device) for plan in plans]
    form = readout_form(model, task)
    for draw in draws + bernoulli:
        losses = draw_losses(model, task, form, draw, stream)
        for plan, metric in zip(plans, metrics, strict=True):
            if isinstance(draw, BernoulliDraw) or draw.k in plan.sampled:  # a shared batch: every p takes it
                metric.add(draw, losses)
    drawn = sum(draw.size for draw in draws + bernoulli)
    results = []
    for metric in metrics:
        lpf, err = metric.compute()
        results.append(Evaluation(lpf.cpu(), err.cpu(), drawn))
    return results


def stratum_losses(model: CCModel, task: Task, x: Tensor, instances: tuple[int, ...] | None) -> Tensor:
    """per_sample_loss (K', B) of the instances a stratum batch holds (all K when `instances` is None).

    x (K', B, n) is `Task.sample_active`'s draw, one (B, n) batch shared by the instances: it goes
    through the network's `ReadoutForm` (`shared_batch_losses`), as `evaluate` does."""
    if (x.shape[0] == 1 or x.stride(0) == 0) and x.shape[1] > 0:
        most_active = int((x[0] != 0).sum(dim=1).max())
        return shared_batch_losses(model, task, readout_form(model, task), x[0], most_active, instances)
    if instances is not None:
        model, task = select_instances(model, instances), select_instances(task, instances)
    return per_sample_loss(model, task, x)


def shared_batch_losses(
    model: CCModel,
    task: Task,
    form: ReadoutForm | None,
    x: Tensor,
    most_active: int,
    instances: tuple[int, ...] | None,
) -> Tensor:
    """per_sample_loss (K', B) of one batch x (B, n) shared by `instances` (None: all), whose samples
    have at most `most_active` active features: through the network's `ReadoutForm` (`form`, made
    once per evaluation) on the active entries when that is sparse, its fused dense form otherwise,
    and through the network's own forward where there is no form."""
    if form is None:
        if instances is not None:
            model, task = select_instances(model, instances), select_instances(task, instances)
        return per_sample_loss(model, task, x[None].expand(task.n_instances, *x.shape))
    if task.sparse_stratum(most_active):
        return form.select(instances).losses(*active_entries_of(x))
    return form.select(instances).dense_losses(x)


def draw_stratum_losses(
    model: CCModel,
    task: Task,
    form: ReadoutForm | None,
    k: int,
    size: int,
    step: int,
    stream: Stream,
    instances: tuple[int, ...] | None = None,
) -> Tensor:
    """stratum_losses of the stratum batch (k, step, size): the same numbers, but a sparse stratum
    of a network with a `ReadoutForm` is drawn as its active entries only (`Task.active_entries`),
    never as a dense batch."""
    if form is not None and task.sparse_stratum(k):
        return form.select(instances).losses(*task.active_entries(k, size, step, stream))
    return shared_batch_losses(model, task, form, task.sample_active(k, size, step, stream)[0], k, instances)


def draw_losses(
    model: CCModel, task: Task, form: ReadoutForm | None, draw: StratumDraw | BernoulliDraw, stream: Stream
) -> Tensor | tuple[Tensor, Tensor]:
    """The per-sample losses of a plan's draw: (K', B) for a `StratumDraw` (`draw_stratum_losses`),
    and for a `BernoulliDraw` the losses and each sample's number of active features (B,)."""
    if isinstance(draw, StratumDraw):
        return draw_stratum_losses(model, task, form, draw.k, draw.size, draw.step, stream, draw.instances)
    x, n_active = task.sample_bernoulli(draw.q, draw.size, draw.step, stream)
    return shared_batch_losses(model, task, form, x, int(n_active.max()), draw.instances), n_active


def exact_strata(model: CCModel) -> tuple[int, ...]:
    """Numbers of active features whose conditional loss is computed, not sampled: the empty sample,
    and the single-feature one for a homogeneous model (`single_feature_loss`)."""
    return (0, 1) if model.homogeneous else (0,)


@torch.no_grad()
def exact_losses(model: CCModel, task: Task, strata: Sequence[int]) -> Tensor:
    """E[loss | k active] (len(strata), K) for the exact strata k, in float64."""
    zero = torch.zeros(task.n_instances, 1, task.n_features, device=task.mixing.device, dtype=task.mixing.dtype)
    rows = {0: lambda: per_sample_loss(model, task, zero).double()[:, 0], 1: lambda: single_feature_loss(model, task)}
    return torch.stack([rows[k]() for k in strata])


class StratumDraw(NamedTuple):
    """`size` samples with exactly `k` active features (`Task.sample_active`), batch `step` of the
    stratum, for `instances` (None: all)."""

    k: int
    step: int
    size: int
    instances: tuple[int, ...] | None


class BernoulliDraw(NamedTuple):
    """`size` samples of the input distribution at p = `q` (`Task.sample_bernoulli`), batch `step`,
    for `instances` (None: all), post-stratified: each sample counts for the stratum of its number of
    active features. A dense stratum is cheaper to fill this way than one subset at a time."""

    q: float
    step: int
    size: int
    instances: tuple[int, ...] | None


# A dense stratum is filled by Bernoulli draws at an instance's p where these draws are expected to
# give it at least this many samples (so that it gets fewer than 2 with probability below 1e-20), and
# only for a p whose draws land in dense strata at least 80% of the time (below, the draws spent on
# sparse strata, which have cheaper draws of their own, cost more than the subsets they spare).
_BERNOULLI_MIN_EXPECTED = 64
_BERNOULLI_MIN_DENSE_SHARE = 0.8


@dataclasses.dataclass
class StrataPlan:
    """How a stratified evaluation spends its samples.

    probability (K, n + 1): P(k active | p) per instance; `exact`: strata computed, not sampled;
    `sampled`: strata sampled, those with a share of at least 1e-12 of the non-empty samples of some
    instance; `targets[k]`: the samples planned for stratum k (the most of any instance, at least
    2); `instances[k]`: the instances that sample stratum k (those for which it is not negligible),
    None for all: a run of p from 0.001 to 1 draws each stratum for the few instances it matters to.
    `draws`: what to draw. A sparse stratum, and the tail of a dense one, get `StratumDraw`s of their
    target; the bulk of the dense strata (k > n / 5) of instances at a high p comes from
    `BernoulliDraw`s at that p, as many as give each of them its target in expectation.
    """

    probability: Tensor
    feature_probability: list[float]
    exact: tuple[int, ...]
    sampled: list[int]
    targets: dict[int, int]
    instances: dict[int, tuple[int, ...] | None]
    draws: list[StratumDraw | BernoulliDraw]

    @property
    def n_samples(self) -> int:
        return sum(draw.size for draw in self.draws)


def plan_strata(
    task: Task,
    feature_probability: list[float],
    n_nonempty: int,
    batch_size: int,
    exact: Sequence[int],
    moments: tuple[Tensor, Tensor] | None = None,
) -> StrataPlan:
    """The strata and draws of a stratified evaluation at the precision of `n_nonempty` non-empty samples.

    Without `moments`: proportional allocation, N_k = n_nonempty P(k) / P(non-empty). With `moments`
    (mean, variance), each (K, n + 1), the loss's mean and variance per instance and stratum (exact
    strata: their exact mean and variance 0; `pilot_moments`): variance (Neyman) allocation at the
    precision the dense protocol has with `n_nonempty` non-empty samples (`neyman_counts`).
    """
    probability = active_count_probability(task, feature_probability)  # (K, n + 1)
    nonempty = probability[:, 1:].sum(dim=1, keepdim=True)
    needs = probability / nonempty >= _NEGLIGIBLE_STRATUM  # (K, n + 1): instance k samples stratum s
    sampled = [k for k in range(1, task.n_features + 1) if k not in exact and needs[:, k].any()]
    instances = {k: None if needs[:, k].all() else tuple(needs[:, k].nonzero().flatten().tolist()) for k in sampled}
    if not sampled:
        return StrataPlan(probability, list(feature_probability), tuple(exact), sampled, {}, instances, [])
    if moments is None:
        target = n_nonempty * probability[:, sampled] / nonempty  # (K, S), of the non-empty samples
    else:
        target = neyman_counts(probability, nonempty[:, 0], n_nonempty, *moments, sampled)
    target = torch.where(needs[:, sampled], target, 0)
    targets = {k: max(2, math.ceil(t)) for k, t in zip(sampled, target.amax(dim=0).tolist(), strict=True)}
    draws: list[StratumDraw | BernoulliDraw] = []
    covered = torch.zeros_like(target, dtype=torch.bool)  # (K, S): filled by Bernoulli draws
    dense = [j for j, k in enumerate(sampled) if not task.sparse_stratum(k)]
    for q in sorted(set(feature_probability)) if dense else []:
        members = [i for i, p in enumerate(feature_probability) if p == q]
        variance = None if moments is None else moments[1][members][:, [sampled[j] for j in dense]]
        size, bulk = _bernoulli_draws(probability[members[0], sampled][dense], target[members][:, dense], variance)
        group = None if len(members) == task.n_instances else tuple(members)
        draws += [
            BernoulliDraw(q, step, min(batch_size, size - start), group)
            for step, start in enumerate(range(0, size, batch_size))
        ]
        for j, fills in zip(dense, bulk.tolist(), strict=True):
            covered[members, j] = fills
    for j, k in enumerate(sampled):
        uncovered = needs[:, k] & ~covered[:, j]
        if uncovered.any():
            count = max(2, math.ceil(target[uncovered, j].max()))
            who = None if uncovered.all() else tuple(uncovered.nonzero().flatten().tolist())
            draws += [
                StratumDraw(k, step, min(batch_size, count - start), who)
                for step, start in enumerate(range(0, count, batch_size))
            ]
    return StrataPlan(probability, list(feature_probability), tuple(exact), sampled, targets, instances, draws)


def _bernoulli_draws(probability: Tensor, target: Tensor, variance: Tensor | None) -> tuple[int, Tensor]:
    """How many Bernoulli samples at one p fill the dense strata of the instances at that p, and
    which strata they fill (D,); (0, none) where they would not pay.

    probability (D,): P(k) of each dense stratum at p; target (G, D): the planned samples of each
    instance at p; variance (G, D): the loss's variance per stratum, or None (proportional targets).
    M samples give stratum k about M P(k). Post-stratified, the dense strata's variance is then
    sum_k P(k) s_k^2 / M, which equals the planned sum_k P(k)^2 s_k^2 / N_k at
    M = sum_k P(k) s_k^2 / sum_k P(k)^2 s_k^2 / N_k; for proportional targets (N_k / P(k) the same
    for all k) M = sum_k N_k / sum_k P(k). A stratum that M samples would hit fewer than
    `_BERNOULLI_MIN_EXPECTED` times keeps its own draws.
    """
    none = torch.zeros_like(probability, dtype=torch.bool)
    if float(probability.sum()) < _BERNOULLI_MIN_DENSE_SHARE:
        return 0, none
    wanted = target.amax(dim=0)
    total = float(wanted.sum()) / float(probability.sum())
    if variance is not None:
        spread = variance.double().clamp_min(0).amax(dim=0)
        planned = (probability.pow(2) * spread / wanted.clamp_min(1)).sum()
        if planned > 0:
            total = float((probability * spread).sum() / planned)
    size = math.ceil(total)
    bulk = probability * size >= _BERNOULLI_MIN_EXPECTED
    return (size, bulk) if bool(bulk.any()) else (0, none)


def neyman_counts(
    probability: Tensor, nonempty: Tensor, n_nonempty: int, mean: Tensor, variance: Tensor, sampled: list[int]
) -> Tensor:
    """Samples per instance and sampled stratum (K, S) for a standard error no larger than the dense
    protocol's with `n_nonempty` non-empty samples, allocated by variance (Neyman 1934).

    The dense estimate from N_d = n_nonempty / P(non-empty) samples has variance V / N_d, with
    V = sum_k P_k (s_k^2 + (m_k - L)^2) the loss's variance (within and between strata; exact strata
    included). Stratified, sum_k P_k^2 s_k^2 / N_k is smallest for a given total when N_k is
    proportional to P_k s_k; the total that meets V / N_d is (sum_k P_k s_k)^2 N_d / V, so
    N_k = P_k s_k (sum_j P_j s_j) N_d / V. A stratum with a small share P_k s_k of the spread gets
    few samples (at least 2, `plan_strata`), however likely it is.
    probability (K, n + 1), nonempty (K,), mean and variance (K, n + 1).
    """
    mean, deviation = mean.double(), variance.double().clamp_min(0).sqrt()
    total = (probability * mean).sum(dim=1, keepdim=True)
    spread = (probability * (deviation.pow(2) + (mean - total).pow(2))).sum(dim=1)  # V (K,)
    dense_samples = n_nonempty / nonempty
    weight = probability[:, sampled] * deviation[:, sampled]  # P_k s_k (K, S)
    scale = weight.sum(dim=1) * dense_samples / spread.clamp_min(torch.finfo(torch.float64).tiny)
    return weight * scale[:, None]


# Pilot draws use steps from here on, which a plan never reaches: the pilot's samples only set the
# allocation, and the estimate is made from other samples (so the allocation cannot bias it).
_PILOT_STEP = 2**31


@torch.no_grad()
def pilot_moments(
    model: CCModel,
    task: Task,
    strata: Sequence[int],
    sizes: Sequence[int],
    exact: Sequence[int],
    exact_values: Tensor,
    stream: Stream = Stream.TEST,
) -> tuple[Tensor, Tensor]:
    """(mean, variance) (K, n + 1) of every instance's loss per stratum, for `neyman_counts`: the
    sampled `strata` from one pilot batch each of `sizes` samples (drawn for all instances at once),
    the `exact` ones from their exact values (variance 0); strata in neither are 0."""
    k_instances, n = task.n_instances, task.n_features
    mean = torch.zeros(k_instances, n + 1, dtype=torch.float64)
    variance = torch.zeros(k_instances, n + 1, dtype=torch.float64)
    mean[:, list(exact)] = exact_values.T.double().cpu()
    form = readout_form(model, task)
    for k, size in zip(strata, sizes, strict=True):
        losses = draw_stratum_losses(model, task, form, k, max(2, size), _PILOT_STEP, stream).double().cpu()
        mean[:, k], variance[:, k] = losses.mean(dim=1), losses.var(dim=1)
    return mean, variance


class StratifiedLossPerFeature(Metric):
    """L / p per instance with its standard error from a stratified evaluation (`plan_strata`).

    L = sum_k P(k) m_k over the exact strata (their m_k given) and the sampled ones (m_k the mean of
    the stratum's samples); variance sum_k P(k)^2 s_k^2 / N_k over the sampled strata. The running
    sums are torchmetrics states, so ranks that drew different batches of the plan add them up.
    update(k, (K', B) losses, instances) never syncs with the host (instances: the plan's for k, None
    for all K); compute() returns (2, K): L / p and stderr.
    """

    full_state_update = False

    def __init__(self, plan: StrataPlan, exact: Tensor):
        super().__init__()
        k, s = plan.probability.shape[0], len(plan.sampled)
        self._row = {stratum: i for i, stratum in enumerate(plan.sampled)}
        row_of = torch.full((plan.probability.shape[1],), s, dtype=torch.int64)  # s: a stratum not sampled
        row_of[plan.sampled] = torch.arange(s)
        self.register_buffer("row_of", row_of, persistent=False)
        probability = plan.probability.to(torch.float64)
        exact_part = (probability[:, list(plan.exact)].T * exact.to(probability)).sum(dim=0)  # (K,)
        self.register_buffer("exact_part", exact_part, persistent=False)
        self.register_buffer("weight", probability[:, plan.sampled].T.contiguous(), persistent=False)  # (S, K)
        self.register_buffer("p", torch.tensor(plan.feature_probability, dtype=torch.float64), persistent=False)
        for name in ("total", "total_sq"):
            self.add_state(name, default=torch.zeros(s, k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(s, k, dtype=torch.float64), dist_reduce_fx="sum")
        if not plan.sampled:  # every stratum exact: an empty update, so that compute() does not warn
            self.update(None)

    def update(
        self,
        stratum: int | None,
        losses: Tensor | None = None,
        instances: Sequence[int] | None = None,
        n_active: Tensor | None = None,
    ) -> None:
        """Add a batch of `stratum`'s (K', B) losses; stratum None adds nothing. With `n_active` (B,),
        each sample's number of active features, a batch of any strata (`stratum` is not read):
        each sample counts for its own stratum, and samples of strata this plan does not sample
        (exact, negligible) are left out."""
        if n_active is not None:
            self._update_mixed(n_active, losses, instances)
            return
        if stratum is None:
            return
        i, losses = self._row[stratum], losses.double()
        columns = slice(None) if instances is None else list(instances)
        self.total[i, columns] += losses.sum(dim=1)
        self.total_sq[i, columns] += losses.pow(2).sum(dim=1)
        self.count[i, columns] += losses.shape[1]

    def _update_mixed(self, n_active: Tensor, losses: Tensor, instances: Sequence[int] | None) -> None:
        s = self.total.shape[0]
        row = self.row_of[n_active]
        keep = row < s
        row, losses = row[keep], losses[:, keep].double()
        columns = slice(None) if instances is None else list(instances)
        for state, values in (
            (self.total, losses),
            (self.total_sq, losses.pow(2)),
            (self.count, torch.ones_like(losses)),
        ):
            sums = torch.zeros(s, values.shape[0], dtype=torch.float64, device=values.device)
            state[:, columns] += sums.index_add_(0, row, values.T)

    def add(self, draw: StratumDraw | BernoulliDraw, losses: Tensor | tuple[Tensor, Tensor]) -> None:
        """Add the losses of a plan's draw (`draw_losses`)."""
        if isinstance(draw, StratumDraw):
            self.update(draw.k, losses, draw.instances)
        else:
            self.update(None, losses[0], draw.instances, n_active=losses[1])

    def compute(self) -> Tensor:
        count = self.count.clamp_min(1)
        mean = self.total / count
        variance = (self.total_sq / count - mean.pow(2)).clamp_min(0) * count / (count - 1).clamp_min(1)
        total = self.exact_part + (self.weight * mean).sum(dim=0)
        stderr = (self.weight.pow(2) * variance / count).sum(dim=0).sqrt()
        return torch.stack([total / self.p, stderr / self.p])
