"""Running jobs: the facade the servicer, the server and the metrics use over the parts that do the work.

* admission (`admission.Admission`): a job is accepted only after its whole plan validates (preset + overrides,
  scene limits, priors known to the guidance tier, prompt within every prior's token limit) and while the queue has
  room; from then on it is in the job table and is not lost;
* dispatch (`dispatcher.Dispatcher`): queued jobs start, oldest first, while a scene replica has a free slot;
  lost replicas requeue their jobs, a restarted orchestrator resumes its jobs and deletes the scenes it left;
* one job's run (`execution.JobExecution`): stages in chunks with checkpoints (digests, retention), previews,
  resume, the export, deadlines;
* the provenance record (`provenance`), previews without torch (`previews`), and every artifact key
  (`shared.artifact_keys`).
"""

from __future__ import annotations

import threading

from magic3d.v1 import common_pb2, orchestrator_pb2

from services.orchestrator.admission import Admission, PriorChecker
from services.orchestrator.dispatcher import Dispatcher
from services.orchestrator.events import EventHub
from services.orchestrator.execution import JOB_ID_METADATA, JobServices, Running, RunnerSettings
from services.orchestrator.jobs import TERMINAL, JobNotFound, JobRecord, JobStore
from services.orchestrator.presets import JobPlan, PresetBook
from services.orchestrator.provenance import job_prompt
from services.orchestrator.scenes import SceneReplicas
from shared import artifact_keys
from shared.errors import FailedPrecondition, NotFound
from shared.store import ArtifactStore


class JobRunner:
    def __init__(
        self,
        jobs: JobStore,
        store: ArtifactStore,
        replicas: SceneReplicas,
        presets: PresetBook,
        priors: PriorChecker | None,
        settings: RunnerSettings = RunnerSettings(),
        events: EventHub | None = None,
    ) -> None:
        self.jobs = jobs
        self.store = store
        self.replicas = replicas
        self.presets = presets
        self.priors = priors
        self.settings = settings
        self.events = events or EventHub()
        self.admission = Admission(
            jobs, replicas, presets, priors, self.events, settings.queue_size, on_queued=lambda: self.dispatcher.wake()
        )
        self._services = JobServices(jobs, store, replicas, self.events, settings, self.admission, threading.Event())
        self.dispatcher = Dispatcher(self._services)

    @property
    def step_seconds(self) -> list[float]:
        """Recent per-step wall times reported by the scenes (metrics)."""
        return self._services.step_seconds

    @property
    def _running(self) -> dict[str, Running]:
        return self.dispatcher.running

    # -- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.dispatcher.start()

    def recover(self) -> list[str]:
        return self.dispatcher.recover()

    def reconcile(self, timeout_s: float = 5.0) -> list[str]:
        return self.dispatcher.reconcile(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        self.dispatcher.stop(timeout_s)

    def _dispatch_once(self) -> None:
        self.dispatcher.dispatch_once()

    # -- client operations ------------------------------------------------------------------------------------

    def submit(self, spec: orchestrator_pb2.JobSpec, request_id: str = "", owner: str = "") -> tuple[JobRecord, bool]:
        return self.admission.submit(spec, request_id, owner)

    def validate(self, spec: orchestrator_pb2.JobSpec) -> JobPlan:
        return self.admission.validate(spec)

    def plan(self, spec: orchestrator_pb2.JobSpec) -> JobPlan:
        return self.admission.plan(spec)

    def get(self, job_id: str) -> JobRecord:
        try:
            return self.jobs.get(job_id)
        except JobNotFound:
            raise NotFound(f"no job {job_id!r}", "name") from None

    def cancel(self, job_id: str) -> JobRecord:
        """Idempotent: a finished job is returned as it is; a queued one ends at once; a running one stops at its
        next step and frees its scene."""
        return self.dispatcher.cancel(self.get(job_id))

    def delete(self, job_id: str) -> None:
        record = self.get(job_id)
        if not record.terminal:
            raise FailedPrecondition(f"job {job_id} is {record.state.value}: cancel it first", "name")
        for key in self.store.list(artifact_keys.job_prefix(job_id)):
            self.store.delete(key)
        self.jobs.delete(job_id)
        self.events.forget(job_id)


__all__ = ["JobRunner", "RunnerSettings", "PriorChecker", "JOB_ID_METADATA", "job_prompt", "common_pb2", "TERMINAL"]
