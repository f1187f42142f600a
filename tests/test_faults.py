"""Faults, with the services as real processes on 127.0.0.1 (bench/soak.py's stack): kill -9 of each service in
the middle of a job, and a seeded soak of tiny jobs under random kills. Nothing accepted is lost or duplicated, and
no scene is left behind (the scene replica's own count)."""

from __future__ import annotations

import time

import pytest
from magic3d.v1 import orchestrator_pb2

from bench.soak import SoakSettings, SoakStack, run_soak, soak_spec

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = SoakStack(tmp_path_factory.mktemp("faults"), outage_window_s=60)
    stack.start()
    yield stack
    stack.stop()


def wait_for_scenes(stack: SoakStack, count: int, timeout_s: float = 15.0) -> int:
    deadline = time.monotonic() + timeout_s
    held = stack.scenes_held()
    while held != count and time.monotonic() < deadline:
        time.sleep(0.2)
        held = stack.scenes_held()
    return held


@pytest.mark.parametrize(("victim", "starts"), [("scene", 2), ("guidance", 1), ("orchestrator", 2)])
def test_a_job_survives_kill_9_of_each_service_mid_job(stack, victim, starts):
    name = stack.submit(soak_spec(100 + starts), f"fault-{victim}")
    deadline = time.monotonic() + 120
    job = stack.get(name)
    while job.step < 4 or job.state != orchestrator_pb2.JOB_STATE_RUNNING:  # past its first checkpoint (step 3)
        assert time.monotonic() < deadline and job.state != orchestrator_pb2.JOB_STATE_SUCCEEDED, job
        time.sleep(0.05)
        job = stack.get(name)
    # Down for longer than a call's own retries: only the guidance outage window (or a resume) can bridge it.
    stack.kill_and_restart(victim, down_s=4.0)
    job = stack.wait(name, timeout_s=180)
    assert job.state == orchestrator_pb2.JOB_STATE_SUCCEEDED, job.error
    assert "model.glb" in {a.kind for a in job.artifacts}
    # A scene or orchestrator death resumes the job once from its checkpoint; a guidance outage is waited out by the
    # scene, whose replica is not blamed (no second start).
    from bench.soak import attempts_per_job

    assert attempts_per_job(stack.root / "jobs.db")[name.removeprefix("jobs/")] == starts
    assert wait_for_scenes(stack, 0) == 0


def test_soak_20_jobs_under_random_kills_loses_nothing(tmp_path):
    report = run_soak(SoakSettings(root=tmp_path, jobs=20, seed=7, kill_every_s=(5.0, 10.0), time_limit_s=270))
    assert report.lost == [] and report.succeeded == 20
    assert report.duplicated == 0 and report.orphans == 0
    assert sum(report.kills.values()) >= 3, report.kills
