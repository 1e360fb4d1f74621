"""The one seam between the training step and its loss backends (`model.loss_backend`).

- reference: `core.loss.mean_loss`, autograd through the network's own `forward` (the equation).
- fast: `fastpath.mean_loss`, the same loss with its backward written out, for a bias-free one-layer
  network on sparse float32 batches in one CPU process (`fast_path_problem` lists the conditions).
- auto: fast where it applies, reference everywhere else (GPU, DDP, mixed precision, compile,
  deeper networks, biases, dense batches).

This is the only module that imports `cis_lightning.fastpath`: deleting that module and the lines
here that name it leaves the reference backend in charge, with no change to the core.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from cis_lightning import fastpath
from cis_lightning.core.errors import ConfigError, require
from cis_lightning.core.loss import mean_loss
from cis_lightning.core.models import CCModel
from cis_lightning.core.task import SparseInput, Task

LOSS_BACKENDS = ("auto", "reference", "fast")

LossFunction = Callable[[CCModel, Task, "Tensor | SparseInput"], Tensor]


def check_loss_backend(value: object) -> str:
    """`value` if it names a backend, else ConfigError naming model.loss_backend and the allowed values."""
    allowed = ", ".join(LOSS_BACKENDS)
    require(
        isinstance(value, str) and value in LOSS_BACKENDS,
        "model.loss_backend",
        f"must be one of {allowed}; got {value!r}",
    )
    return value


def fast_path_problem(
    network: CCModel,
    task: Task,
    device: torch.device,
    world_size: int = 1,
    precision: str = "32-true",
    compiled: bool = False,
) -> str | None:
    """Why the fast backend does not apply to this training setting, or None where it does."""
    dtype = next(network.parameters()).dtype
    problems = [
        (torch.device(device).type != "cpu", f"it runs on a CPU, not {torch.device(device).type}"),
        (world_size != 1, f"it runs in one process, not {world_size}"),
        (precision not in ("32-true", "32"), f"it runs at 32-bit precision, not {precision}"),
        (dtype != torch.float32, f"its network is float32, not {dtype}"),
        (compiled, "it is not compiled (model.compile)"),
        (not task.draws_sparse, "its batches are sparse (feature_probability <= 0.2 or exactly_one_active)"),
        (
            fastpath.one_layer_form(network, task) is None,
            f"it takes a bias-free one-layer MLP or ResidualMLP, not this {type(network).__name__}",
        ),
    ]
    return next((problem for bad, problem in problems if bad), None)


def training_loss(backend: str, problem: str | None) -> LossFunction:
    """The training loss (network, task, x) -> (K,) for `backend`, given `fast_path_problem`'s answer."""
    check_loss_backend(backend)
    if backend == "fast" and problem is not None:
        raise ConfigError("model.loss_backend", f"fast does not apply here: {problem}; use auto or reference")
    if backend == "reference" or problem is not None:
        return mean_loss
    return fastpath.mean_loss
