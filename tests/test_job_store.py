"""The orchestrator's job table: idempotent submits, lifecycle rules, pagination, and surviving a restart."""

from __future__ import annotations

import base64
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.orchestrator import jobs as jobs_module
from services.orchestrator.jobs import (
    MAX_PAGE_SIZE,
    TERMINAL,
    InvalidTransition,
    JobNotFound,
    JobRecord,
    JobState,
    JobStore,
    RequestIdConflict,
    SchemaVersionError,
    spec_digest,
)

SPEC = b"\x0a\x0c\x0a\x0aa red torus"


@pytest.fixture
def store() -> Iterator[JobStore]:
    with JobStore(":memory:") as s:
        yield s


def _make(store: JobStore, n: int) -> list[JobRecord]:
    return [store.create(f"spec {i}".encode())[0] for i in range(n)]


def test_create_get_round_trip_with_all_fields(store: JobStore) -> None:
    job, created = store.create(SPEC, request_id="req-1")
    assert created
    assert job.job_id.startswith("job-") and len(job.job_id) == 20
    int(job.job_id[4:], 16)
    assert job.state is JobState.QUEUED and job.spec == SPEC and job.spec_digest == spec_digest(SPEC)
    assert (job.stage, job.step, job.total_steps, job.attempts, job.artifacts) == ("", 0, 0, 0, {})
    assert job.create_time == job.update_time > 0

    updated = store.update(
        job.job_id,
        state=JobState.RUNNING,
        stage="fine",
        step=7,
        total_steps=3000,
        checkpoint_uri="s3://ckpt/coarse.safetensors",
        checkpoint_stage="coarse",
        scene_replica="10.0.0.7:50052",
        artifacts={"model.glb": "https://x/model.glb", "preview.png": "https://x/p.png"},
        provenance_uri="s3://prov/job.json",
        error="",
        cancel_requested=True,
        attempts=2,
    )
    got = store.get(job.job_id)
    assert got == updated
    assert got.request_id == "req-1" and got.spec == SPEC and got.create_time == job.create_time
    assert got.update_time >= job.update_time
    assert got.state is JobState.RUNNING and got.stage == "fine" and got.step == 7 and got.total_steps == 3000
    assert got.checkpoint_uri == "s3://ckpt/coarse.safetensors" and got.checkpoint_stage == "coarse"
    assert got.scene_replica == "10.0.0.7:50052" and got.provenance_uri == "s3://prov/job.json"
    assert got.artifacts == {"model.glb": "https://x/model.glb", "preview.png": "https://x/p.png"}
    assert got.cancel_requested is True and got.attempts == 2


def test_missing_job_raises_job_not_found(store: JobStore) -> None:
    for call in (store.get, store.delete, store.queue_position, lambda j: store.update(j, step=1)):
        with pytest.raises(JobNotFound, match="job-0000000000000000"):
            call("job-0000000000000000")
    with pytest.raises(KeyError):
        store.transition("job-0000000000000000", JobState.RUNNING)


def test_idempotent_create(store: JobStore) -> None:
    first, created = store.create(SPEC, request_id="retry-me")
    again, created_again = store.create(SPEC, request_id="retry-me")
    assert created and not created_again and again == first

    with pytest.raises(RequestIdConflict, match="retry-me") as info:
        store.create(b"another spec", request_id="retry-me")
    assert isinstance(info.value, ValueError) and info.value.job_id == first.job_id

    anonymous = {store.create(SPEC)[0].job_id for _ in range(3)}
    assert len(anonymous) == 3 and first.job_id not in anonymous
    assert store.counts()[JobState.QUEUED] == 4


def _race(create: list[JobStore], request_id: str) -> list[tuple[JobRecord, bool]]:
    barrier = threading.Barrier(len(create))
    results: list[tuple[JobRecord, bool]] = []
    errors: list[BaseException] = []

    def worker(s: JobStore) -> None:
        barrier.wait()
        try:
            results.append(s.create(SPEC, request_id=request_id))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in create]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    return results


def test_concurrent_creates_with_one_request_id_make_one_job(store: JobStore) -> None:
    results = _race([store] * 8, "same")
    assert len({r.job_id for r, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert len(store.list()[0]) == 1


def test_concurrent_creates_from_separate_connections_make_one_job(tmp_path: Path) -> None:
    """The unique index and IMMEDIATE transactions hold across connections (e.g. two orchestrator processes)."""
    stores = [JobStore(tmp_path / "jobs.db") for _ in range(8)]
    try:
        results = _race(stores, "same")
        assert len({r.job_id for r, _ in results}) == 1
        assert sum(created for _, created in results) == 1
        assert len(stores[0].list()[0]) == 1
    finally:
        for s in stores:
            s.close()


def test_restart_keeps_records_artifacts_and_unfinished(tmp_path: Path) -> None:
    path = tmp_path / "state" / "nested" / "jobs.db"  # parent dirs are created
    with JobStore(path) as before:
        done, running, queued = _make(before, 3)
        keyed = before.create(SPEC, request_id="client-retry")[0]
        before.transition(keyed.job_id, JobState.CANCELLED)
        before.transition(done.job_id, JobState.RUNNING)
        before.transition(done.job_id, JobState.SUCCEEDED, artifacts={"model.glb": "s3://a/model.glb"})
        before.transition(
            running.job_id,
            JobState.RUNNING,
            stage="coarse",
            step=400,
            checkpoint_uri="s3://c/400",
            checkpoint_stage="coarse",
            scene_replica="scene-1:50052",
            attempts=1,
        )
        saved = {j.job_id: before.get(j.job_id) for j in (done, running, queued, keyed)}
        mode = before._conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"

    with JobStore(path) as after:
        assert {j: after.get(j) for j in saved} == saved
        assert after.get(done.job_id).artifacts == {"model.glb": "s3://a/model.glb"}
        assert [j.job_id for j in after.unfinished()] == [running.job_id, queued.job_id]
        resumed = after.unfinished()[0]
        assert (resumed.checkpoint_uri, resumed.checkpoint_stage, resumed.attempts) == ("s3://c/400", "coarse", 1)
        # Idempotency survives the restart too, and new jobs still sort after the old ones.
        assert after.create(SPEC, request_id="client-retry") == (saved[keyed.job_id], False)
        with pytest.raises(RequestIdConflict):
            after.create(b"changed", request_id="client-retry")
        assert after.create(b"spec 0")[1] is True
        newest = after.list(page_size=1)[0][0]
        assert newest.create_time > max(r.create_time for r in saved.values())


def test_pagination_newest_first_each_job_once(store: JobStore) -> None:
    jobs = _make(store, 23)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page, token = store.list(page_size=5, page_token=token)
        pages += 1
        assert len(page) <= 5
        seen.extend(j.job_id for j in page)
        if not token:
            break
    assert pages == 5
    assert seen == [j.job_id for j in reversed(jobs)]

    all_jobs, end = store.list(page_size=23)
    assert len(all_jobs) == 23 and end == ""
    assert [j.create_time for j in all_jobs] == sorted((j.create_time for j in all_jobs), reverse=True)


def test_pagination_is_stable_while_jobs_arrive_and_leave(store: JobStore) -> None:
    jobs = _make(store, 10)
    page1, token = store.list(page_size=4)
    store.create(b"late arrival")
    store.delete(jobs[0].job_id)
    page2, token = store.list(page_size=4, page_token=token)
    page3, token = store.list(page_size=4, page_token=token)
    assert token == ""
    listed = [j.job_id for j in page1 + page2 + page3]
    assert listed == [j.job_id for j in reversed(jobs[1:])]


def test_page_size_is_clamped(store: JobStore) -> None:
    _make(store, 3)
    page, token = store.list(page_size=0)
    assert len(page) == 1 and token
    page, token = store.list(page_size=-5)
    assert len(page) == 1
    page, token = store.list(page_size=MAX_PAGE_SIZE * 10)
    assert len(page) == 3 and token == ""


@pytest.mark.parametrize(
    "token",
    [
        "not base64 !!",
        base64.urlsafe_b64encode(b"not json").decode(),
        base64.urlsafe_b64encode(b"[1, 2]").decode(),
        base64.urlsafe_b64encode(b'{"t": "x", "id": "job-1", "s": []}').decode(),
        base64.urlsafe_b64encode(b'{"t": 1.0, "id": 5, "s": []}').decode(),
        "\u00e9t\u00e9",
    ],
)
def test_malformed_page_token_is_rejected(store: JobStore, token: str) -> None:
    _make(store, 2)
    with pytest.raises(ValueError, match="invalid page_token"):
        store.list(page_token=token)


def test_page_token_is_bound_to_its_state_filter(store: JobStore) -> None:
    _make(store, 4)
    _, token = store.list(page_size=1, states={JobState.QUEUED})
    with pytest.raises(ValueError, match="invalid page_token"):
        store.list(page_size=1, page_token=token)


def test_state_filter(store: JobStore) -> None:
    jobs = _make(store, 6)
    store.transition(jobs[1].job_id, JobState.RUNNING)
    store.transition(jobs[2].job_id, JobState.FAILED, error="scene replica lost")
    store.transition(jobs[3].job_id, JobState.CANCELLED)
    store.transition(jobs[4].job_id, JobState.RUNNING)

    running, _ = store.list(states={JobState.RUNNING})
    assert [j.job_id for j in running] == [jobs[4].job_id, jobs[1].job_id]
    ended, _ = store.list(states=set(TERMINAL))
    assert [j.job_id for j in ended] == [jobs[3].job_id, jobs[2].job_id]
    assert len(store.list(states=set())[0]) == 6  # an empty filter means every state

    paged: list[str] = []
    token = ""
    while True:
        page, token = store.list(page_size=1, page_token=token, states={JobState.QUEUED, JobState.RUNNING})
        paged.extend(j.job_id for j in page)
        if not token:
            break
    assert paged == [jobs[i].job_id for i in (5, 4, 1, 0)]


def test_terminal_states_are_final(store: JobStore) -> None:
    job = store.create(SPEC)[0]
    assert store.transition(job.job_id, JobState.RUNNING, stage="coarse").state is JobState.RUNNING
    assert store.transition(job.job_id, JobState.QUEUED, scene_replica="").state is JobState.QUEUED  # requeue
    store.transition(job.job_id, JobState.RUNNING)
    done = store.transition(job.job_id, JobState.SUCCEEDED, artifacts={"model.glb": "u"})
    assert done.state is JobState.SUCCEEDED and done.artifacts == {"model.glb": "u"}

    for target in JobState:
        with pytest.raises(InvalidTransition, match="succeeded"):
            store.transition(job.job_id, target)
    with pytest.raises(InvalidTransition):
        store.update(job.job_id, state=JobState.RUNNING)
    assert store.get(job.job_id).state is JobState.SUCCEEDED

    # Bookkeeping on an ended job is still allowed; restating its own state is a no-op.
    assert store.update(job.job_id, provenance_uri="s3://p", state=JobState.SUCCEEDED).provenance_uri == "s3://p"

    for final in (JobState.FAILED, JobState.CANCELLED):
        other = store.create(SPEC)[0]
        store.transition(other.job_id, final)
        with pytest.raises(InvalidTransition):
            store.transition(other.job_id, JobState.QUEUED)


def test_update_rejects_unknown_and_ill_typed_fields(store: JobStore) -> None:
    job = store.create(SPEC)[0]
    with pytest.raises(TypeError, match="bogus"):
        store.update(job.job_id, bogus=1)
    with pytest.raises(TypeError, match="job_id"):
        store.update(job.job_id, job_id="job-ffffffffffffffff")
    with pytest.raises(TypeError, match="create_time"):
        store.update(job.job_id, create_time=0.0)
    with pytest.raises(TypeError, match="step"):
        store.update(job.job_id, step="7")
    with pytest.raises(TypeError, match="artifacts"):
        store.update(job.job_id, artifacts={"model.glb": 3})
    with pytest.raises(TypeError, match="cancel_requested"):
        store.update(job.job_id, cancel_requested=1)
    with pytest.raises(ValueError):
        store.update(job.job_id, state="paused")
    with pytest.raises(TypeError):
        store.transition(job.job_id, JobState.RUNNING, state=JobState.RUNNING)
    assert store.get(job.job_id) == job


def test_counts_and_queue_position(store: JobStore) -> None:
    assert store.counts() == {s: 0 for s in JobState}
    jobs = _make(store, 5)
    assert [store.queue_position(j.job_id) for j in jobs] == [0, 1, 2, 3, 4]

    store.transition(jobs[0].job_id, JobState.RUNNING)
    store.transition(jobs[2].job_id, JobState.CANCELLED)
    assert [store.queue_position(jobs[i].job_id) for i in (1, 3, 4)] == [0, 1, 2]
    with pytest.raises(ValueError, match="running"):
        store.queue_position(jobs[0].job_id)

    counts = store.counts()
    assert counts[JobState.QUEUED] == 3 and counts[JobState.RUNNING] == 1 and counts[JobState.CANCELLED] == 1
    assert counts[JobState.SUCCEEDED] == counts[JobState.FAILED] == 0

    store.delete(jobs[1].job_id)
    assert store.queue_position(jobs[3].job_id) == 0
    assert [j.job_id for j in store.unfinished()] == [jobs[0].job_id, jobs[3].job_id, jobs[4].job_id]


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    JobStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    conn.close()
    with pytest.raises(SchemaVersionError, match=rf"schema version 99, newer than the {jobs_module.SCHEMA_VERSION}"):
        JobStore(path)
    JobStore(path.with_name("fresh.db")).close()  # a fresh file still opens
