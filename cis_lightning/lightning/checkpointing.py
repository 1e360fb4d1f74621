"""Checkpoints that survive kills and are read as data, never as code.

- `AtomicCheckpointIO` writes `<file>.partial` next to the target, fsyncs it and renames it over the
  target (os.replace is atomic on POSIX): a process killed at any moment, SIGKILL included, leaves
  either the previous checkpoint or the new one, never a torn file. Lightning's own writer stages the
  file in the system temp directory and falls back to a non-atomic copy when that is another file
  system, which is the usual case on clusters.
- Reading goes through `loading.read_checkpoint`: `torch.load(weights_only=True)`, so unpickling can
  build tensors and plain containers but can never call code; every failure is a ConfigError.
- `RunCheckpoint` is Lightning's ModelCheckpoint that also saves `last.ckpt` when the process gets
  SIGTERM (what a cluster sends before preemption), so `--ckpt_path last` resumes from that step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cis_lightning.core.errors import require
from cis_lightning.runs.loading import check_fits, read_checkpoint, save_atomically

__all__ = ["AtomicCheckpointIO", "RunCheckpoint", "check_fits", "read_checkpoint"]


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); some file systems refuse to open directories."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write-then-rename checkpoint saving and weights-only loading (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's transaction is the best available
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A fixed partial name: only global rank 0 writes, and a partial file left by a kill is overwritten next time.
        save_atomically(checkpoint, path)
        _fsync_directory(path.parent)

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        require(weights_only is not False, "weights_only", "must be true: cis reads checkpoints as data only")
        return read_checkpoint(path, map_location)


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint for exact resume: the loggers flushed before every checkpoint, last.ckpt at the
    end of training and on SIGTERM.

    Lightning saves the every-N-steps checkpoint of step s at the end of batch s - 1; the module logs
    its training metrics in the training step itself (`CCModule.training_step`), and this callback
    flushes the loggers whenever a checkpoint is written, so a kill at any moment loses no logged
    step that the resumed run would not log again. Two additions to Lightning's callback:
    - last.ckpt is also written when training ends (Lightning writes it then only if no checkpoint
      was saved before), so `cis test --ckpt_path last.ckpt` tests the final model;
    - on SIGTERM, which Lightning turns into an exception between two steps (on every rank under
      DDP), last.ckpt is written before the process exits.
    """

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        for logger in trainer.loggers:  # events first: the checkpoint never gets ahead of the curve
            logger.save()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last and trainer.state.fn == "fit":
            self.save_last_now(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        if isinstance(exception, SIGTERMException) and self.save_last:
            self.save_last_now(trainer)
            rank_zero_info(f"cis: stopped at step {trainer.global_step}: saved {self.last_model_path}")

    def save_last_now(self, trainer: pl.Trainer) -> None:
        """Write last.ckpt (in `dirpath`) with the trainer's current state, through its CheckpointIO."""
        path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        self.last_model_path = str(path)
