"""Dispatch: a thread starts queued jobs, oldest first, while a scene replica has a free slot, each in a worker
thread running one `JobExecution`; how the execution ends decides the job's state:

* if the replica becomes unreachable (or forgot the scene: restarted), the job goes back to the queue and resumes on
  a replica from its last checkpoint, up to `max_attempts` starts; other errors fail the job with the reason;
* an orchestrator that stops leaves its running jobs RUNNING with their last checkpoint; a restarted one requeues
  them (`recover()`), so they resume, and deletes the scenes it owned on every replica (`reconcile()`): scenes carry
  this orchestrator's instance id as their owner and a lease, so those of an orchestrator that never comes back
  expire by themselves.
"""

from __future__ import annotations

import threading
import time

import grpc
from magic3d.v1 import orchestrator_pb2, scene_pb2

from services.orchestrator.execution import (
    Cancelled,
    JobExecution,
    JobServices,
    ReplicaLost,
    Running,
    Stopping,
    delete_scene,
)
from services.orchestrator.jobs import JobNotFound, JobRecord, JobState
from shared import logging as project_logging
from shared.errors import ServiceError, with_code_name

log = project_logging.get_logger(__name__)


class Dispatcher:
    def __init__(self, services: JobServices) -> None:
        self.services = services
        self.jobs, self.replicas, self.events, self.settings = services.jobs, services.replicas, services.events, services.settings
        self.running: dict[str, Running] = {}
        self._lock = threading.Lock()
        self._stop = services.stopping
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.recover()
        self.reconcile()
        self._thread = threading.Thread(target=self._dispatch_loop, name="job-dispatcher", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def recover(self) -> list[str]:
        """Jobs left RUNNING by an earlier process go back to the queue; they resume from their last checkpoint."""
        resumed = []
        for record in self.jobs.unfinished():
            if record.state == JobState.RUNNING:
                self.jobs.transition(record.job_id, JobState.QUEUED, scene_replica="")
                resumed.append(record.job_id)
        if resumed:
            log.info("jobs_recovered", jobs=resumed)
        return resumed

    def reconcile(self, timeout_s: float = 5.0) -> list[str]:
        """Deletes the scenes this orchestrator owns on each replica that belong to no job it is running now (left by
        an earlier process of it that crashed). Replicas that do not answer are skipped: their scenes' leases run out.
        Returns the scene ids deleted."""
        deleted = []
        for address in self.replicas.addresses:
            stub = self.replicas.stub(address)
            try:
                listed = stub.ListScenes(scene_pb2.ListScenesRequest(owner=self.settings.instance_id), timeout=timeout_s)
            except grpc.RpcError as error:
                log.info("reconcile_skipped", replica=address, code=error.code().name)
                continue
            with self._lock:
                running = set(self.running)
            for scene in listed.scenes:
                if scene.job_id not in running:
                    delete_scene(stub, scene.scene_id, scene.job_id)
                    deleted.append(scene.scene_id)
        if deleted:
            log.info("orphaned_scenes_deleted", scenes=deleted)
        return deleted

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops dispatching; running jobs checkpoint, free their scene and stay RUNNING for the next start."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            running = list(self.running.values())
        for entry in running:
            entry.cancel.set()
            if entry.call is not None:
                entry.call.cancel()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self.running:
                    break
            time.sleep(0.05)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def cancel(self, record: JobRecord) -> JobRecord:
        """Idempotent: a finished job is returned as it is; a queued one ends at once; a running one stops at its
        next step and frees its scene."""
        job_id = record.job_id
        if record.terminal:
            return record
        if record.state == JobState.QUEUED:
            with self._lock:
                current = self.jobs.get(job_id)
                if job_id not in self.running and current.state == JobState.QUEUED:
                    record = self.jobs.transition(job_id, JobState.CANCELLED, error="cancelled by the client")
                    self._publish_failed(job_id, "cancelled by the client")
                    return record
        self.jobs.update(job_id, cancel_requested=True)
        with self._lock:
            entry = self.running.get(job_id)
        if entry is not None:
            entry.cancel.set()
            if entry.call is not None:
                entry.call.cancel()
        return self.jobs.get(job_id)

    # -- dispatch ---------------------------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.poll_interval_s)
            self._wake.clear()
            try:
                self.dispatch_once()
            except Exception:  # noqa: BLE001 - the dispatcher must outlive any one job's surprise
                log.exception("dispatch_failed")

    def dispatch_once(self) -> None:
        for record in self.jobs.unfinished():
            if self._stop.is_set() or record.state != JobState.QUEUED:
                continue
            with self._lock:
                if record.job_id in self.running:
                    continue
            replica = self.replicas.acquire(avoid=record.scene_replica)
            if replica is None:
                return
            entry = Running(replica, threading.Event())
            # Under the lock that cancel() takes for queued jobs: a job is either cancelled while queued or started
            # (and then cancelled through its worker), never both; a job that ended meanwhile gives its slot back.
            with self._lock:
                try:
                    record = self.jobs.transition(
                        record.job_id, JobState.RUNNING, scene_replica=replica, attempts=record.attempts + 1
                    )
                except (ValueError, JobNotFound):  # cancelled or deleted since the listing
                    self.replicas.release(replica)
                    continue
                self.running[record.job_id] = entry
            threading.Thread(target=self._run, args=(record, entry), name=f"job-{record.job_id}", daemon=True).start()

    def _run(self, record: JobRecord, entry: Running) -> None:
        job_id = record.job_id
        with project_logging_context(job_id):
            try:
                JobExecution(self.services, record, entry).run()
            except Cancelled:
                self.jobs.transition(job_id, JobState.CANCELLED, error="cancelled by the client")
                self._publish_failed(job_id, "cancelled by the client")
                log.info("job_cancelled")
            except Stopping:
                log.info("job_paused_for_shutdown")  # stays RUNNING; recover() requeues it on the next start
            except ReplicaLost as lost:
                self.replicas.mark_down(entry.replica)
                self._requeue_or_fail(job_id, str(lost), counted=entry.reached_replica)
            except ServiceError as error:
                self._fail(job_id, with_code_name(error.code, error.message))
            except Exception as error:  # noqa: BLE001 - a job never takes the orchestrator down
                log.exception("job_crashed")
                self._fail(job_id, f"internal error: {type(error).__name__}: {error}")
            finally:
                self._never_stranded(job_id)
                self.replicas.release(entry.replica)
                with self._lock:
                    self.running.pop(job_id, None)
                self._wake.set()

    def _never_stranded(self, job_id: str) -> None:
        """A worker that ends (whatever went wrong, even in its error handling) leaves its job finished, queued, or
        RUNNING only when the orchestrator is stopping (to be resumed by the next one)."""
        if self._stop.is_set():
            return
        try:
            if self.jobs.get(job_id).state == JobState.RUNNING:
                self._fail(job_id, "internal error: the job's worker ended without a result")
        except Exception:  # noqa: BLE001 - last resort; recover() still requeues it on the next start
            pass

    def _requeue_or_fail(self, job_id: str, reason: str, counted: bool = True) -> None:
        """Back to the queue, unless the job has used up its starts. A start that never reached its replica (down
        or restarting) does not count: waiting for a replica costs a job nothing but time."""
        record = self.jobs.get(job_id)
        if counted and record.attempts >= self.settings.max_attempts:
            self._fail(job_id, f"gave up after {record.attempts} attempts: {reason}")
            return
        attempts = record.attempts if counted else max(0, record.attempts - 1)
        self.jobs.transition(job_id, JobState.QUEUED, error=f"resuming after: {reason}", attempts=attempts)
        log.warning("job_requeued", reason=reason, attempts=record.attempts)

    def _fail(self, job_id: str, reason: str) -> None:
        try:
            self.jobs.transition(job_id, JobState.FAILED, error=reason)
        except ValueError:  # already terminal (e.g. cancelled meanwhile)
            return
        self._publish_failed(job_id, reason)
        log.warning("job_failed", job_id=job_id, reason=reason)

    def _publish_failed(self, job_id: str, reason: str) -> None:
        self.events.publish(job_id, orchestrator_pb2.JobEvent(failed=orchestrator_pb2.JobFailed(reason=reason)))


def project_logging_context(job_id: str):
    import structlog

    return structlog.contextvars.bound_contextvars(job_id=job_id)


__all__ = ["Dispatcher"]
