"""Reading checkpoints as data, never as code (pure torch: no Lightning import).

`read_checkpoint` is the one place that reads a checkpoint or a weights.pt: `torch.load(weights_only=True)`,
so unpickling can build tensors and plain containers but can never call code. Every failure,
including a refused file, becomes one ConfigError naming the field the path came from.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from cis_lightning.core.errors import ConfigError, require

CHECKPOINT_FIELD = "ckpt_path"


def read_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", field: str = CHECKPOINT_FIELD, lightning: bool = True
) -> dict[str, Any]:
    """The checkpoint at `path` loaded as data (weights_only=True); ConfigError naming `field` if it cannot be.

    A file whose unpickling would construct arbitrary objects (and so could run code) is refused.
    `lightning`: require a Lightning checkpoint (a dict with a state_dict); else any dict (weights.pt).
    """
    path = Path(path)
    require(path.is_file(), field, f"no checkpoint file at {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's weights-only unpickler names the global it refused to import, e.g. posix.system.
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f"would call {refused.group(1)} when loaded" if refused else "cannot be unpickled as plain data"
        raise ConfigError(field, f"{path} {what}; refused (cis reads checkpoints as data only)") from None
    except Exception as error:  # a hostile or damaged file can make the unpickler fail in any way
        raise ConfigError(field, f"{path} is not a readable checkpoint ({_first_line(error)})") from None
    require(isinstance(checkpoint, dict), field, f"{path} is not a checkpoint (it holds a {type(checkpoint).__name__})")
    if lightning:
        state = checkpoint.get("state_dict")
        require(isinstance(state, dict), field, f"{path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def save_atomically(state: dict[str, Any], path: str | os.PathLike) -> None:
    """torch.save to `<path>.partial`, fsync, then rename over `path`: a kill leaves the old file or the new one.

    A failed write (a full disk: torch reports it as a RuntimeError of its zip writer) removes the
    partial file and raises OSError naming `path` and the free space there.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except (OSError, RuntimeError) as error:
        partial.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
        problem = f"could not be written ({_first_line(error)}; {free} bytes free there)"
        raise OSError(getattr(error, "errno", None) or errno.EIO, problem, str(path)) from None


def check_fits(checkpoint: dict[str, Any], expected: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """ConfigError unless the network.* and task.* entries of the checkpoint have the names and shapes of `expected`."""
    saved = {k: v for k, v in checkpoint["state_dict"].items() if k.split(".", 1)[0] in ("network", "task")}
    hint = "(check model.network and the data settings against the run's config.yaml)"
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    require(not missing, CHECKPOINT_FIELD, f"{path} does not fit this config: no {', '.join(missing[:3])} {hint}")
    require(
        not unexpected,
        CHECKPOINT_FIELD,
        f"{path} does not fit this config: it has {', '.join(unexpected[:3])}, which this model has not {hint}",
    )
    for name, value in expected.items():
        got = tuple(saved[name].shape)
        require(
            got == tuple(value.shape),
            CHECKPOINT_FIELD,
            f"{path} does not fit this config: {name} has shape {got} in the checkpoint and "
            f"{tuple(value.shape)} here {hint}",
        )


# The task's state and the config field each entry comes from; M last, as the seed draws it.
TASK_FIELDS = {
    "seeds": "data.seed",
    "feature_probability": "data.feature_probability",
    "learn_sigma": "data.learn_sigma",
    "sigma": "data.sigma",
    "mixing": "data.mixing",
}


def check_same_task(checkpoint: dict[str, Any], task: torch.nn.Module, path: str | os.PathLike) -> None:
    """ConfigError unless the checkpoint's task (M, p, seeds, sigma) is the one this config builds.

    The checkpoint's task is what gets evaluated (it is loaded with the weights), while results.csv is
    labelled from the config: a config edited to another mixing or sigma of the same shapes would
    label one task's numbers with another's settings. A learned sigma is compared only by its flag.
    """
    saved = checkpoint["state_dict"]
    learned = saved.get("task.learn_sigma", torch.zeros(0, dtype=torch.bool)).to(torch.bool)
    for name, field in TASK_FIELDS.items():
        here, stored = task.state_dict().get(name), saved.get(f"task.{name}")
        if here is None or stored is None or stored.shape != here.shape:
            continue  # names and shapes are check_fits's
        here, stored = here.detach().cpu().double(), stored.detach().cpu().double()
        if name == "sigma" and learned.shape == here.shape:
            here = torch.where(learned, stored, here)  # trained: any value is its own
        differs = ~torch.isclose(stored, here, rtol=1e-6, atol=1e-9).reshape(len(here), -1).all(dim=1)
        if differs.any():
            k = int(differs.nonzero()[0, 0])
            values = "" if name == "mixing" else f" ({stored[k].item():g} there, {here[k].item():g} here)"
            raise ConfigError(
                CHECKPOINT_FIELD,
                f"{path} was trained with another {field} than this config gives (instance {k}{values}): test it "
                "with the config it was trained with (its run's config.yaml), or train a new run",
            )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
