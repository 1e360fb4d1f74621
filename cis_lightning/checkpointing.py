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

from cis_lightning.errors import require
from cis_lightning.loading import check_fits, read_checkpoint, save_atomically

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
    """ModelCheckpoint for exact resume: last.ckpt every N steps, at the end, and on SIGTERM.

    Three changes to Lightning's callback, each needed for a resumed run to log the same curve and
    end with the same weights as an uninterrupted one:
    - The every-N-steps checkpoint of step s is written at the start of batch s instead of the end
      of batch s - 1, after batch s - 1's metrics went to the logger, and the loggers are flushed
      first: a kill at any moment then loses no logged step that the resumed run would not log again.
    - last.ckpt is also written when training ends (Lightning writes it then only if no checkpoint
      was saved before), so `cis test --ckpt_path last.ckpt` tests the final model.
    - On SIGTERM, which Lightning turns into an exception between two steps (on every rank under
      DDP), last.ckpt is written before the process exits.
    """

    @property
    def state_key(self) -> str:
        # Lightning names the profiler range of every callback hook call by it, about 6 times a training
        # step, and ModelCheckpoint formats the repr of a dict of its settings each time: kept per settings.
        settings = (self.monitor, self.mode, self._every_n_train_steps, self._every_n_epochs, self._train_time_interval)
        kept = self.__dict__.get("_kept_state_key")
        if kept is None or kept[0] != settings:
            kept = (settings, super().state_key)
            self.__dict__["_kept_state_key"] = kept
        return kept[1]

    def _every_n_steps_due(self, trainer: pl.Trainer) -> bool:
        n = self._every_n_train_steps
        return n >= 1 and trainer.global_step > 0 and trainer.global_step % n == 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.global_step > 0:  # resumed from this very step's checkpoint: no need to write it again
            self._last_global_step_saved = trainer.global_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if self._every_n_steps_due(trainer) and not self._should_skip_saving_checkpoint(trainer):
            self._at_batch_start = True
            try:
                self._save_now(trainer, topk=True)
            finally:
                self._at_batch_start = False

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if getattr(self, "_at_batch_start", False):
            # Lightning restores its loop counters assuming the save happened at the end of a batch
            # (ModelCheckpoint's own place); saved as they are at the start of batch s, a restart
            # would count one step too many and shift every logged step. So record the counters as
            # they were at the end of batch s - 1, before its validation (which the restart skips).
            fit_loop = checkpoint["loops"]["fit_loop"]
            for counts in (
                fit_loop["epoch_loop.batch_progress"]["total"],
                fit_loop["epoch_loop.batch_progress"]["current"],
            ):
                counts["ready"] = counts["started"] = counts["processed"] = counts["completed"]
                counts["completed"] -= 1
            fit_loop["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any):
        if self._every_n_train_steps < 1:  # time-based saving stays Lightning's
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_now(trainer, topk=False)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if (
            isinstance(exception, SIGTERMException)
            and self.save_last
            and not self._should_skip_saving_checkpoint(trainer)
        ):
            self._save_now(trainer, topk=False)
            rank_zero_info(f"cis: stopped at step {trainer.global_step}: saved {self.last_model_path}")

    def _save_now(self, trainer: pl.Trainer, topk: bool) -> None:
        for logger in trainer.loggers:  # events first: the checkpoint never gets ahead of the curve
            logger.save()
        candidates = self._monitor_candidates(trainer)
        if topk:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        self._last_global_step_saved = trainer.global_step
