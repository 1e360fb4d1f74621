"""A run and its files: `read_run(directory)` -> its config and results; `load_run(path)` -> also the
trained network and its task, for a notebook.

Pure torch (no Lightning import): the network and the task are rebuilt from the run's saved
config.yaml with the same classes and seeds, and their state is loaded with
`loading.read_checkpoint` (weights only), so the task carries the exact M and sigma of the run.

    run = load_run("runs/mlp_gaussian/version_0")
    w_in, w_out = run.network.effective_weights()
    cos = eigen_alignment(w_in, w_out, total_mixing(run.network, run.task))
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any

import torch

from cis_lightning.core import models
from cis_lightning.core.errors import ConfigError, require
from cis_lightning.core.mixing import Mixing
from cis_lightning.core.models import CCModel
from cis_lightning.core.task import Instance, Task, expand_grid
from cis_lightning.runs.config_files import load_config_file
from cis_lightning.runs.loading import read_checkpoint
from cis_lightning.runs.results import RESULTS, RESULTS_BY_P, read_results

__all__ = ["Run", "load_run", "read_run"]


@dataclasses.dataclass
class Run:
    """One run directory (a `cis fit` or `cis test` version directory) and what it wrote.

    `config`: its config.yaml as a dict; `results` / `results_by_p`: the rows of results.csv and
    results_by_p.csv (`runs.results.read_results`; empty where the run wrote none); `weights`: the
    weights file of the run (for `load_run`, the file the state came from); `network` (a CCModel in
    eval mode) and `task` (the Task with the run's M and sigma): loaded by `load_run`, None from
    `read_run`, which reads only the files.
    """

    directory: Path
    config: dict[str, Any]
    results: list[dict[str, Any]]
    results_by_p: list[dict[str, Any]]
    weights: Path | None
    network: CCModel | None = None
    task: Task | None = None

    @property
    def experiment(self) -> str:
        """The logger's name for the run (its directory's parent's name if the config gives none)."""
        logger = (self.config.get("trainer") or {}).get("logger") or {}
        return (logger.get("init_args") or {}).get("name") or self.directory.parent.name

    @property
    def model(self) -> str:
        """The network's class name as results.csv gives it ("?" before results are written)."""
        return str(self.results[0]["model"]) if self.results else "?"

    @property
    def naive_loss_per_feature(self) -> float | None:
        """The naive model's L / p for this run's sizes, as results.csv gives it (None without results)."""
        return self.results[0]["naive_loss_per_feature"] if self.results else None


def read_run(directory: str | Path) -> Run:
    """The files of the run in `directory` (config, results), without loading its weights.

    `weights`: for a `cis test` run, the weights.pt of the fit whose checkpoint it tested (its
    config's ckpt_path); otherwise the run's own weights.pt, or None."""
    directory = Path(directory)
    config_file = directory / "config.yaml"
    config = load_config_file(config_file, field="path") if config_file.is_file() else {}
    config = config if isinstance(config, dict) else {}
    ckpt = config.get("ckpt_path")
    if isinstance(ckpt, str) and ckpt:
        weights: Path | None = Path(ckpt).parent.parent / "weights.pt"
    else:
        weights = directory / "weights.pt" if (directory / "weights.pt").is_file() else None
    return Run(
        directory,
        config,
        read_results(directory / RESULTS),
        read_results(directory / RESULTS_BY_P),
        weights,
    )


def load_run(path: str | Path, map_location: str | torch.device = "cpu", weights: str | Path | None = None) -> Run:
    """The run at `path`: a run directory (runs/<name>/version_<n>) or a checkpoint file inside one.

    Weights come from the checkpoint if one is given; for a directory from weights.pt (the final
    state), else checkpoints/last.ckpt, else the `ckpt_path` a `cis test` run's config names if it
    lies inside the directory. Weights are never taken from outside the run without asking: a
    copied run's config can name another run's file. `weights`: the file to load instead (for a
    `cis test` run, the checkpoint it tested, which lies in the fit's directory).
    """
    path = Path(path)
    require(path.exists(), "path", f"{path} does not exist")
    directory = path.parent.parent if path.is_file() else path
    config_file = directory / "config.yaml"
    require(config_file.is_file(), "path", f"no config.yaml in {directory}: give a run directory or its checkpoint")
    config = load_config_file(config_file, field="path")
    require(isinstance(config, dict), "path", f"{config_file} is not a cis config (a YAML mapping)")
    if weights is None:
        weights = path if path.is_file() else _weights_file(directory, config)
    weights = Path(weights)
    task = _task(config.get("data") or {})
    network = _network(config, task)
    state = read_checkpoint(weights, map_location, field="path", lightning=False)
    if "state_dict" in state:  # a Lightning checkpoint: the module's keys are network.* and task.*
        state = {
            part: {k.removeprefix(f"{part}."): v for k, v in state["state_dict"].items() if k.startswith(f"{part}.")}
            for part in ("network", "task")
        }
    network.load_state_dict(state["network"])
    task.load_state_dict(state["task"])
    network.to(map_location).eval()
    task.to(map_location)
    return dataclasses.replace(read_run(directory), weights=weights, network=network, task=task)


def _weights_file(directory: Path, config: dict) -> Path:
    for candidate in (directory / "weights.pt", directory / "checkpoints" / "last.ckpt"):
        if candidate.is_file():
            return candidate
    ckpt_path = config.get("ckpt_path")
    if isinstance(ckpt_path, str) and ckpt_path:  # a `cis test` run: its weights are the checkpoint it tested
        inside = directory.resolve()
        for candidate in (Path(ckpt_path), directory / ckpt_path):
            if candidate.is_file() and candidate.resolve().is_relative_to(inside):
                return candidate
        raise ConfigError(
            "path",
            f"{directory} has no weights of its own and its config's ckpt_path {ckpt_path} lies outside it; "
            f"if that is the checkpoint this run used, pass it: load_run({str(directory)!r}, weights={ckpt_path!r})",
        )
    raise ConfigError("path", f"no weights.pt, checkpoints/last.ckpt or ckpt_path in {directory}")


def _task(data: dict) -> Task:
    """The data module's task from its config (same construction as CCDataModule)."""
    mixing = Mixing(**(data.get("mixing") or {}))
    keys = ("feature_probability", "sigma", "learn_sigma", "seed")
    base = Instance(mixing=mixing, **{k: data[k] for k in keys if k in data})
    return Task(expand_grid(base, data.get("grid")), data.get("n_features", 100), data.get("exactly_one_active", False))


def _network(config: dict, task: Task) -> CCModel:
    spec = (config.get("model") or {}).get("network") or {}
    class_path = spec.get("class_path", "")
    module_name, _, name = class_path.rpartition(".")
    module = importlib.import_module(module_name) if module_name else models
    cls = getattr(module, name, None)
    require(
        isinstance(cls, type) and issubclass(cls, CCModel),
        "model.network.class_path",
        f"{class_path!r} is not a CCModel class",
    )
    # n_features and seeds are linked from the data config by the CLI, so config.yaml leaves them out.
    seeds = [instance.seed for instance in task.instances]
    return cls(**{**(spec.get("init_args") or {}), "n_features": task.n_features, "seeds": seeds})
