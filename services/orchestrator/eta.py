"""A stage's ETA from the pace of its recent steps, not from the average since it started.

The first steps of a stage carry one-off costs (the guidance tier's first batches, caches filling, kernels
compiling), so elapsed / done at step 10 overstates the rest of the stage several times over. The estimate is
remaining steps x the median seconds-per-step of the last `window` intervals between progress updates (a median,
so that the interval that also saved a checkpoint and rendered a preview does not swing it). Until two updates
have arrived there is no such interval: the replica's own timing of its latest step (`phase_seconds`, summed)
stands in, and only without that the average since the stage started.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Callable


class StageEta:
    """Feed it every progress update of one stage (`observe`); `eta_seconds` says how long the rest will take."""

    def __init__(
        self, total_steps: int, start_step: int = 0, window: int = 8, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.total_steps = int(total_steps)
        self.clock = clock
        self.started = clock()
        self.start_step = int(start_step)
        self.step = int(start_step)
        self._last: tuple[int, float] | None = None  # (step, time) of the latest update
        self._per_step: deque[float] = deque(maxlen=window)  # seconds per step between consecutive updates
        self._step_seconds = 0.0

    def observe(self, step: int, step_seconds: float = 0.0) -> None:
        """A progress update at `step`; `step_seconds`: the replica's timing of that one step (0: unknown)."""
        now = self.clock()
        if self._last is not None and step > self._last[0]:
            self._per_step.append((now - self._last[1]) / (step - self._last[0]))
        if self._last is None or step > self._last[0]:
            self._last = (step, now)
        self.step = max(self.step, int(step))
        self._step_seconds = max(0.0, float(step_seconds))

    def seconds_per_step(self) -> float:
        if self._per_step:
            return statistics.median(self._per_step)
        if self._step_seconds > 0:
            return self._step_seconds
        done = self.step - self.start_step
        return (self.clock() - self.started) / done if done > 0 else 0.0

    def eta_seconds(self) -> float:
        return max(0, self.total_steps - self.step) * self.seconds_per_step()


__all__ = ["StageEta"]
