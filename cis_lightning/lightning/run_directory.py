"""The run directory that one `cis` command writes into, claimed before anything is written.

Rank zero claims it at the start of the subcommand (`RunDirectory.claim`):
- every directory on the way must be a directory that this process may write (one line naming the
  field: `trainer.logger.init_args.save_dir` or `checkpoint.dirpath`);
- it takes an exclusive `fcntl.flock` on the directory for as long as the command runs, so a second
  command on the same directory (two resumes of one run, two fresh runs that picked the same
  version_N) is refused. The operating system drops the lock when the process ends, however it
  ends (SIGKILL included): no marker file survives a crash;
- a directory that already holds a run's outputs is refused unless the command resumes that very
  run from one of its own checkpoints: no run ever replaces another's config.yaml, checkpoints,
  weights.pt or results.

A command that fails before its first training step removes the directories it created (and only
those, and only if it wrote no results there): a failed start leaves no empty version_N behind.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from cis_lightning.core.errors import ConfigError, require

if TYPE_CHECKING:  # the module itself needs no Lightning (`cis report` uses check_writable_directory)
    from lightning.pytorch import Trainer

# What a run writes into its directory (LightningCLI's config, the module's results and weights).
RUN_OUTPUTS = ("config.yaml", "weights.pt", "results.csv", "results_by_p.csv")
LOG_DIR_FIELD = "trainer.logger.init_args.save_dir"
CHECKPOINT_DIR_FIELD = "checkpoint.dirpath"


def check_writable_directory(path: Path, field: str) -> None:
    """ConfigError(field) unless `path` is, or can be created as, a directory that this process may write."""
    existing = path
    while not existing.exists():
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            raise ConfigError(field, f"{existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise ConfigError(field, f"{path} {where}: give a directory")
    require(
        os.access(existing, os.W_OK | os.X_OK),
        field,
        f"{existing} is not writable (read-only file system or permissions): give a directory you can write",
    )


def existing_outputs(log_dir: Path, checkpoint_dir: Path | None) -> list[Path]:
    """The files of an earlier run that a new run in `log_dir` (checkpoints in `checkpoint_dir`) would replace."""
    found = [log_dir / name for name in RUN_OUTPUTS if (log_dir / name).exists()]
    if checkpoint_dir is not None and checkpoint_dir.is_dir():
        found += sorted(checkpoint_dir.glob("*.ckpt"))
    return found


class RunDirectory:
    """Claims (checks, creates, locks) the run directory of one command; a context manager that releases it."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self._lock: int | None = None
        self._created: Path | None = None  # the outermost directory this command created, once claimed
        self._trainer: Trainer | None = None

    def claim(self, trainer: Trainer, resume_from: str | None, fit: bool) -> None:
        """Claim `trainer`'s log directory (rank zero only); `resume_from`: the checkpoint a fit resumes."""
        log_dir = trainer.log_dir  # on every rank: a collective once DDP's process group exists
        if not trainer.is_global_zero:
            return
        log_dir = Path(log_dir or trainer.default_root_dir).absolute()
        callback = trainer.checkpoint_callback
        configured = getattr(callback, "dirpath", None) if callback is not None else None
        checkpoint_dir = Path(configured).absolute() if configured else log_dir / "checkpoints"
        check_writable_directory(log_dir, LOG_DIR_FIELD)
        if fit and callback is not None:
            check_writable_directory(checkpoint_dir, CHECKPOINT_DIR_FIELD if configured else LOG_DIR_FIELD)
        outermost = next((p for p in (log_dir, *log_dir.parents) if p.parent.exists()), log_dir)
        would_create = None if log_dir.exists() else outermost
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(LOG_DIR_FIELD, f"cannot create {log_dir} ({error.strerror})") from None
        self._lock_directory(log_dir)
        self.path, self._trainer = log_dir, trainer
        # "last" stays literal where a configured checkpoint.dirpath is searched by Lightning itself.
        resuming = resume_from in ("last", "hpc") or (
            resume_from is not None and Path(resume_from).absolute().parent in (checkpoint_dir, log_dir)
        )
        found = [] if resuming else existing_outputs(log_dir, checkpoint_dir if fit else None)
        if found and would_create is not None and not any(p.is_relative_to(would_create) for p in found):
            shutil.rmtree(would_create, ignore_errors=True)  # made just now, for a run that is refused
        if found and not any(p.is_relative_to(log_dir) for p in found):  # only in a configured checkpoint.dirpath
            raise ConfigError(
                CHECKPOINT_DIR_FIELD,
                f"{checkpoint_dir} already holds another run's checkpoints ({found[0].name}); nothing was changed. "
                "Resume that run with --ckpt_path last, or give a new checkpoint.dirpath",
            )
        names = ", ".join(str(p.relative_to(log_dir)) if p.is_relative_to(log_dir) else str(p) for p in found[:3])
        require(
            not found,
            "trainer.logger.init_args.version" if log_dir.name.startswith("version_") else LOG_DIR_FIELD,
            f"{log_dir} already holds a run ({names}); nothing was changed. Resume it with --ckpt_path last, "
            "or start a new run in a new directory (leave the version unset, or give another save_dir or name)",
        )
        self._created = would_create

    def _lock_directory(self, directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(
                LOG_DIR_FIELD,
                f"{directory} is in use by another cis process (a run, or a resume of it, is going on); "
                "wait for it to end, or start a new run in another directory",
            ) from None
        self._lock = fd

    def release(self, failed: bool) -> None:
        """Drop the lock; after a failure before the first training step, remove what this command created."""
        trainer, created = self._trainer, self._created
        unstarted = trainer is not None and trainer.global_step == 0
        if failed and created is not None and unstarted and not _holds_results(created):
            shutil.rmtree(created, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor drops the flock
        self._lock, self._created, self._trainer = None, None, None

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        self.release(failed=kind is not None)


def _holds_results(directory: Path) -> bool:
    """True if a command left results under `directory` (a failed test may have written its results.csv)."""
    return any(directory.rglob("results*.csv")) or any(directory.rglob("weights.pt"))
