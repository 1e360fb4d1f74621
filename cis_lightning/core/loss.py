"""The loss: the mean squared error of a network's own forward against the task's labels.

This is the equation that trains (the reference backend differentiates it with autograd) and that
evaluation estimates; `cis_lightning.backends` may pick a faster form of the same loss for training,
tested equal to this one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cis_lightning.core.models import CCModel
from cis_lightning.core.task import SparseInput, Task


def per_sample_loss(model: CCModel, task: Task, x: Tensor | SparseInput) -> Tensor:
    """Mean squared error over features for every sample, (K, B): ||model(x) - labels(x)||^2 / n.

    x (K, B, n), dense or sparse (the network's forward takes either). This is the reference loss:
    training differentiates it with autograd unless the seam picks another backend
    (`cis_lightning.backends`)."""
    device = x.value.device.type if isinstance(x, SparseInput) else x.device.type
    if isinstance(x, SparseInput) and torch.is_autocast_enabled(device):
        # Mixed precision (Lightning's autocast around a step): a sparse batch runs in the model's
        # dtype, since autocast would cast some of its products and not the embedding bags.
        with torch.autocast(device, enabled=False):
            return per_sample_loss(model, task, x)
    x = x.to(task.mixing.dtype)  # the draws are float32; a float64 run's task is not
    return (model(x) - task.labels(x, residual=model.residual)).pow(2).mean(dim=-1)


def mean_loss(model: CCModel, task: Task, x: Tensor | SparseInput) -> Tensor:
    """The training loss: the mean of `per_sample_loss` over the batch, (K,).

    An empty sample of a homogeneous model (no biases) has output 0, label 0, loss 0 and no
    gradient, so a sparse batch on a CPU runs on its non-empty samples only (37% of a batch is empty
    at p = 0.01, n = 100); elsewhere counting them would wait for the device, so all rows run."""
    if isinstance(x, SparseInput) and model.homogeneous and x.value.device.type == "cpu":
        return per_sample_loss(model, task, x.without_empty_rows()).sum(dim=1) / x.batch_size
    return per_sample_loss(model, task, x).mean(dim=1)
