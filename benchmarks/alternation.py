"""A callback that times one `cis fit` in segments, switching a setting between two values.

On the 2-core test machine only comparisons inside one process are trustworthy (its speed drifts by
tens of percent within minutes, across runs and repeats), so the benchmarks that compare two ways of
running the same step swap them inside one fit: each segment is timed next to one of the other
kind, and the median of the adjacent pairs' ratios is what a drift cannot fake.
"""

from __future__ import annotations

import statistics
import time

import lightning.pytorch as pl


class Alternation(pl.Callback):
    """From step `start` on, every `segment` steps: the wall time of the segment just ended, then
    `switch(trainer, pl_module, which)` to the other setting (which: 0 or 1, alternately)."""

    def __init__(self, segment: int = 100, start: int = 200):
        self.segment, self.start = segment, start
        self.seconds: tuple[list[float], list[float]] = ([], [])
        self.current: int | None = None
        self.started = 0.0

    def switch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, which: int) -> None:
        raise NotImplementedError

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step < self.start or step % self.segment:
            return
        now = time.perf_counter()
        if self.current is not None:
            self.seconds[self.current].append(now - self.started)
        self.current = (step // self.segment) % 2
        self.switch(trainer, pl_module, self.current)
        self.started = now

    def pairs(self) -> int:
        return min(map(len, self.seconds))

    def per_step_ms(self, which: int) -> float:
        """The median segment's time per step of setting `which`."""
        return 1e3 * statistics.median(self.seconds[which]) / self.segment

    def ratios(self) -> tuple[float, float]:
        """Setting 0's time over setting 1's: the median of the adjacent pairs' ratios, and of the sums."""
        first, second = (s[: self.pairs()] for s in self.seconds)
        return statistics.median(a / b for a, b in zip(first, second, strict=True)), sum(first) / sum(second)
