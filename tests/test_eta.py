"""The stage ETA follows the pace of recent steps: a slow start (warm-up) does not inflate it."""

from __future__ import annotations

import pytest

from services.orchestrator.eta import StageEta


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_slow_first_chunk_does_not_inflate_the_eta():
    """400 steps at 0.25 s each after a 20 s warm-up: the old estimate (elapsed / done) said 790 s at step 10."""
    clock = Clock()
    eta = StageEta(400, clock=clock)
    clock.now += 20.0 + 10 * 0.25
    eta.observe(10, step_seconds=0.25)  # one update: the replica's timing of its step stands in
    assert eta.eta_seconds() == pytest.approx(390 * 0.25)
    for step in range(20, 110, 10):
        clock.now += 10 * 0.25
        eta.observe(step, step_seconds=0.2)  # measured intervals now win over the per-step timing
    assert eta.eta_seconds() == pytest.approx(300 * 0.25)


def test_the_eta_follows_a_change_of_pace_and_ignores_one_slow_interval():
    clock = Clock()
    eta = StageEta(1000, clock=clock, window=5)
    for step in range(10, 110, 10):
        clock.now += 10.0 if step == 60 else 1.0  # one interval with a checkpoint and a preview in it
        eta.observe(step)
    assert eta.eta_seconds() == pytest.approx(900 * 0.1)
    for step in range(110, 160, 10):
        clock.now += 5.0
        eta.observe(step)
    assert eta.eta_seconds() == pytest.approx(850 * 0.5)


def test_without_timings_it_falls_back_to_the_average_and_ends_at_zero():
    clock = Clock()
    eta = StageEta(100, start_step=50, clock=clock)
    assert eta.eta_seconds() == 0.0  # nothing done yet: no estimate
    clock.now += 10.0
    eta.observe(60)
    assert eta.eta_seconds() == pytest.approx(40.0)
    eta.observe(60)  # a repeated step (a resumed stream) adds no interval
    clock.now += 4.0
    eta.observe(100)
    assert eta.eta_seconds() == 0.0
