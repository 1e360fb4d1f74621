"""Loss per feature, L / p, with its standard error, and the naive reference.

L is the mean squared error over features and samples. Dividing by p compares sparsities: the
naive model (d_mlp features get a neuron each, the rest output 0) has L / p = (n - d_mlp) / n / 6 at
every p, because an unrepresented active feature costs E[ReLU(x)^2] = 1/6 for x ~ U[-1, 1].
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor
from torchmetrics import Metric

from cis_lightning.models import CCModel
from cis_lightning.task import Stream, Task, nonempty_probability


def naive_loss_per_feature(n_features: int, n_neurons: int) -> float:
    """(n - d_mlp) / n / 6: L / p of the naive model (0 once every feature has a neuron)."""
    return max(n_features - n_neurons, 0) / n_features / 6


def evaluation_probability(task: Task) -> list[float]:
    """The p that L is divided by: p_k, or 1/n for exactly-one-active data (one active feature per sample)."""
    if task.exactly_one_active:
        return [1 / task.n_features] * task.n_instances
    return [i.feature_probability for i in task.instances]


def samples_for(n_nonempty: int, task: Task, feature_probability: list[float]) -> int:
    """Samples to draw so that every instance sees at least `n_nonempty` non-empty ones on average."""
    if task.exactly_one_active:
        return n_nonempty
    worst = nonempty_probability(min(feature_probability), task.n_features).item()
    return math.ceil(n_nonempty / worst)


def per_sample_loss(model: CCModel, task: Task, x: Tensor) -> Tensor:
    """Mean squared error over features for every sample: (K, B)."""
    y = task.labels(x, residual=model.residual)
    return (model(x) - y).pow(2).mean(dim=-1)


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


@torch.no_grad()
def evaluate(
    model: CCModel,
    task: Task,
    n_nonempty: int = 1_000_000,
    batch_size: int = 65536,
    stream: Stream = Stream.TEST,
    feature_probability: list[float] | None = None,
) -> Evaluation:
    """L / p of every instance from about `n_nonempty` non-empty samples (the paper's protocol).

    `feature_probability` (K floats) evaluates at other p than the trained ones.
    """
    ps = evaluation_probability(task) if feature_probability is None else list(feature_probability)
    n_batches = math.ceil(samples_for(n_nonempty, task, ps) / batch_size)
    metric = LossPerFeature(ps).to(task.mixing.device)
    for step in range(n_batches):
        x = task.sample(batch_size, step, stream, feature_probability=feature_probability)
        metric.update(per_sample_loss(model, task, x))
    lpf, err = metric.compute()
    return Evaluation(lpf.cpu(), err.cpu(), n_batches * batch_size)
