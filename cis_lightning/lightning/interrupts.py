"""Ctrl-C (SIGINT) stops a run the way SIGTERM does: the current step saved, a resume hint, exit 130.

Lightning turns SIGTERM into a stop between two steps (its own handler, installed while a trainer
runs), and `RunCheckpoint` saves last.ckpt there. Its handling of Ctrl-C (KeyboardInterrupt) saves
nothing and exits 1, the status `cis` uses for divergence. `CtrlC` is a plain `signal.signal` handler
that hands a Ctrl-C to the SIGTERM path while Lightning's SIGTERM handler is installed; outside it
(parsing, set-up before the trainer runs) it raises `Interrupted`, which `cis` reports as one line.
A second Ctrl-C stops at once (KeyboardInterrupt), for a save that takes too long.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

# 128 + SIGINT, the shell's convention for a process ended by Ctrl-C.
EXIT_SIGINT = 130


class Interrupted(BaseException):  # noqa: N818 (not an error: the user asked to stop)
    """Ctrl-C outside training: nothing to save. A BaseException, as KeyboardInterrupt is."""


class CtrlC:
    """A context manager that installs the handler (main thread only) and restores the previous one."""

    def __init__(self) -> None:
        self.received = False
        self._previous = None
        self._sigterm_outside = None

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            self._sigterm_outside = signal.getsignal(signal.SIGTERM)
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received:
            raise KeyboardInterrupt
        self.received = True
        if signal.getsignal(signal.SIGTERM) is not self._sigterm_outside:
            signal.raise_signal(signal.SIGTERM)  # a trainer runs: stop between two steps and save
        else:
            raise Interrupted

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
