"""Values that change over optimisation steps, declared as data: piecewise-linear through (step, value) knots,
held flat before the first knot and after the last. Presets and stage configs hold these, never `if step > N`."""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    steps: tuple[int, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.steps or len(self.steps) != len(self.values):
            raise ValueError("a schedule needs as many values as steps, and at least one")
        if any(b <= a for a, b in zip(self.steps, self.steps[1:])):
            raise ValueError(f"schedule steps must increase strictly, got {list(self.steps)}")

    @classmethod
    def constant(cls, value: float) -> "Schedule":
        return cls((0,), (float(value),))

    @classmethod
    def linear(cls, start_step: int, start: float, end_step: int, end: float) -> "Schedule":
        return cls((start_step, end_step), (float(start), float(end)))

    def __call__(self, step: int) -> float:
        if step <= self.steps[0]:
            return self.values[0]
        if step >= self.steps[-1]:
            return self.values[-1]
        i = bisect.bisect_right(self.steps, step)
        s0, s1, v0, v1 = self.steps[i - 1], self.steps[i], self.values[i - 1], self.values[i]
        return v0 + (v1 - v0) * (step - s0) / (s1 - s0)

    def held(self, step: int) -> float:
        """Piecewise-constant reading: the value of the last knot at or before `step` (the first knot's before it).
        For quantities that must jump between allowed values, such as a render resolution, never interpolate."""
        return self.values[max(bisect.bisect_right(self.steps, step) - 1, 0)]
