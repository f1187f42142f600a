"""OrchestratorService over grpcio: translates messages and errors; the work is `runner.JobRunner`'s.

Jobs are resources named "jobs/<id>" (AIP-151 long-running operations): SubmitJob returns the job at once;
Generate submits and streams its events until it ends; WatchJob streams an existing job's events, starting with a
snapshot of its current state (events are not persisted, so a watcher after a restart still learns where the job
is); the stream ends with the job.

Ownership: a job belongs to the principal that submitted it (`shared.auth.current_principal()`, set by the bearer
token interceptor; with authentication off every caller is the local admin). List shows only the caller's jobs and
Get/Watch/Cancel/Delete (and editing) of another principal's job is PERMISSION_DENIED, unless the caller is an admin.

Links: the job table keeps stable artifact names (s3://bucket/key, file://...); each answer that carries artifacts
(a Job, a `done` event) gets links minted for it by the store (short-lived presigned URLs for S3), never stored.
"""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf import timestamp_pb2
from magic3d.v1 import orchestrator_pb2, orchestrator_pb2_grpc, scene_pb2

from services.orchestrator import presets as presets_module
from services.orchestrator.jobs import JobRecord, JobState
from services.orchestrator.runner import JobRunner
from shared import logging as project_logging
from shared.auth import Principal, current_principal
from shared.errors import InvalidArgument, NotFound, PermissionDenied, ServiceError, echo
from shared.grpcio import abort_with

log = project_logging.get_logger(__name__)

_STATE_TO_PROTO = {
    JobState.QUEUED: orchestrator_pb2.JOB_STATE_QUEUED,
    JobState.RUNNING: orchestrator_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: orchestrator_pb2.JOB_STATE_SUCCEEDED,
    JobState.FAILED: orchestrator_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: orchestrator_pb2.JOB_STATE_CANCELLED,
}


def _same(uri: str) -> str:
    return uri


def job_to_proto(record: JobRecord, link: Callable[[str], str] = _same, brief: bool = False) -> orchestrator_pb2.Job:
    """`brief` (listings): an image job's pixels are left out (its spec keeps the image's fields and shapes, so it
    still reads as an image job; the pixels are its `input.png` artifact and GetJob's spec)."""
    spec = orchestrator_pb2.JobSpec.FromString(record.spec)
    if brief and spec.HasField("image"):
        spec.image.ClearField("encoded")
        for name in ("image", "depth"):
            if spec.image.HasField(name):
                getattr(spec.image, name).ClearField("data")
    return orchestrator_pb2.Job(
        name=f"jobs/{record.job_id}",
        spec=spec,
        state=_STATE_TO_PROTO[record.state],
        stage=presets_module.STAGE_ENUM.get(record.stage, scene_pb2.STAGE_UNSPECIFIED),
        step=record.step,
        total_steps=record.total_steps,
        artifacts=[orchestrator_pb2.Artifact(kind=k, uri=link(v)) for k, v in sorted(record.artifacts.items())],
        error=record.error,
        create_time=_timestamp(record.create_time),
        update_time=_timestamp(record.update_time),
    )


def snapshot_event(
    record: JobRecord, queue_position: int = 0, link: Callable[[str], str] = _same
) -> orchestrator_pb2.JobEvent:
    """The job's current state as one event (what a watcher gets first)."""
    event = orchestrator_pb2.JobEvent(job_name=f"jobs/{record.job_id}")
    if record.state == JobState.SUCCEEDED:
        event.done.artifacts.extend(job_to_proto(record, link).artifacts)
    elif record.state in (JobState.FAILED, JobState.CANCELLED):
        event.failed.reason = record.error or record.state.value
    elif record.state == JobState.QUEUED:
        event.queued.position = queue_position
    else:
        event.progress.stage = presets_module.STAGE_ENUM.get(record.stage, scene_pb2.STAGE_UNSPECIFIED)
        event.progress.step = record.step
        event.progress.total_steps = record.total_steps
    return event


def job_id_from_name(name: str, field: str = "name") -> str:
    prefix, _, job_id = name.partition("/")
    if prefix != "jobs" or not job_id or "/" in job_id:
        raise InvalidArgument(f"job names look like 'jobs/<id>', got {echo(name)}", field)
    return job_id


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    def __init__(self, runner: JobRunner, idle_check_s: float = 1.0) -> None:
        self.runner = runner
        self.idle_check_s = idle_check_s

    def Generate(self, request, context):
        try:
            record, _ = self.submit(request)
        except ServiceError as error:
            log.info("submit_rejected", code=error.code.name, field=error.field, reason=error.message)
            abort_with(context, error)
        yield from (orchestrator_pb2.GenerateResponse(event=e) for e in self.job_events(record.job_id, context))

    def SubmitJob(self, request, context):
        try:
            record, _ = self.submit(request)
        except ServiceError as error:
            log.info("submit_rejected", code=error.code.name, field=error.field, reason=error.message)
            abort_with(context, error)
        return orchestrator_pb2.SubmitJobResponse(job=job_to_proto(record, self.link))

    def GetJob(self, request, context):
        return orchestrator_pb2.GetJobResponse(job=job_to_proto(self._record(request.name, context), self.link))

    def WatchJob(self, request, context):
        record = self._record(request.name, context)
        yield from (orchestrator_pb2.WatchJobResponse(event=e) for e in self.job_events(record.job_id, context))

    def CancelJob(self, request, context):
        try:
            record = self.runner.cancel(self.owned_job(request.name).job_id)
        except ServiceError as error:
            abort_with(context, error)
        log.info("cancel_requested", job_id=record.job_id, state=record.state.value)
        return orchestrator_pb2.CancelJobResponse(job=job_to_proto(record, self.link))

    def ListJobs(self, request, context):
        if request.page_size < 0:
            abort_with(context, InvalidArgument(f"must be >= 0 (0: 50 jobs), got {request.page_size}", "page_size"))
        try:  # sizes over the store's maximum (1000) are clamped to it
            caller = current_principal()
            records, token = self.runner.jobs.list(
                request.page_size or 50, request.page_token, owner=None if caller.admin else caller.name
            )
        except ValueError as error:
            abort_with(context, InvalidArgument(str(error), "page_token"))
        return orchestrator_pb2.ListJobsResponse(
            jobs=[job_to_proto(r, self.link, brief=True) for r in records], next_page_token=token
        )

    def DeleteJob(self, request, context):
        try:
            self.runner.delete(self.owned_job(request.name).job_id)
        except ServiceError as error:
            abort_with(context, error)
        return orchestrator_pb2.DeleteJobResponse()

    # -- helpers (the web page's server calls submit, owned_job and job_events too) -----------------------------

    def _record(self, name: str, context) -> JobRecord:
        try:
            return self.owned_job(name)
        except ServiceError as error:
            abort_with(context, error)

    def owned_job(self, name: str, field: str = "name") -> JobRecord:
        """The named job if the caller may see and manage it; PermissionDenied for another principal's job."""
        record = self.runner.get(job_id_from_name(name, field))
        authorize(current_principal(), record, field)
        return record

    def submit(self, request) -> tuple[JobRecord, bool]:
        source = request.spec.edit.source_job_id.removeprefix("jobs/") if request.spec.HasField("edit") else ""
        if source and "/" not in source:  # editing reads the source job's scene: the caller must own it too
            try:
                authorize(current_principal(), self.runner.get(source), "spec.edit.source_job_id")
            except NotFound:
                pass  # validation reports it, naming the field
        return self.runner.submit(request.spec, request.request_id, owner=current_principal().name)

    def job_events(self, job_id: str, context):
        """A snapshot, then live events until the job ends or the client goes away."""
        with self.runner.events.subscribe(job_id) as subscription:
            record = self.runner.get(job_id)
            yield snapshot_event(record, self._position(record), self.link)
            if record.terminal:
                return
            while context.is_active():
                event = subscription.get(timeout_s=self.idle_check_s)
                if event is None:
                    try:
                        record = self.runner.get(job_id)
                    except NotFound:
                        return
                    if record.terminal:  # ended without us seeing the event (e.g. cancelled while queued)
                        yield snapshot_event(record, link=self.link)
                        return
                    continue
                yield self._linked(event)
                if event.WhichOneof("event") in ("done", "failed"):
                    return

    def link(self, uri: str) -> str:
        """A link the client can open for a stored artifact name; names the store does not own pass unchanged."""
        store = self.runner.store
        try:
            return store.uri(store.key_from_uri(uri))
        except (KeyError, ValueError):  # ArtifactNotFound is a KeyError: not this store's
            return uri

    def _linked(self, event: orchestrator_pb2.JobEvent) -> orchestrator_pb2.JobEvent:
        if event.WhichOneof("event") != "done":
            return event
        linked = orchestrator_pb2.JobEvent()
        linked.CopyFrom(event)
        for artifact in linked.done.artifacts:
            artifact.uri = self.link(artifact.uri)
        return linked

    def _position(self, record: JobRecord) -> int:
        if record.state != JobState.QUEUED:
            return 0
        try:
            return self.runner.jobs.queue_position(record.job_id)
        except ValueError:  # started meanwhile
            return 0


def authorize(caller: Principal, record: JobRecord, field: str = "name") -> None:
    if not caller.admin and record.owner != caller.name:
        raise PermissionDenied(f"job {record.job_id!r} belongs to another principal", field)


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp
