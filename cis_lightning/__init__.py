"""cis_lightning: train and dissect the compressed-computation toy model.

The names imported here are pure torch (no Lightning), for notebooks and analysis code.
"""

from cis_lightning.core.errors import ConfigError
from cis_lightning.core.mixing import MIXING_KINDS, Mixing, build_mixing, effective_rank, embedding_mixing
from cis_lightning.core.models import MLP, CCModel, ResidualMLP
from cis_lightning.core.task import Instance, Stream, Task, expand_grid
from cis_lightning.evaluation import evaluate, evaluate_at, naive_loss_per_feature
from cis_lightning.runs import Run, load_run, read_run

__all__ = [
    "MIXING_KINDS",
    "MLP",
    "CCModel",
    "ConfigError",
    "Instance",
    "Mixing",
    "ResidualMLP",
    "Run",
    "Stream",
    "Task",
    "build_mixing",
    "effective_rank",
    "embedding_mixing",
    "evaluate",
    "evaluate_at",
    "expand_grid",
    "load_run",
    "naive_loss_per_feature",
    "read_run",
]
