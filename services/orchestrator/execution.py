"""One job's run on the scene replica the dispatcher gave it: its stages in chunks of steps, checkpoints, previews,
then the export.

* each stage runs on one replica in chunks that end at each checkpoint step (multiples of `checkpoint_every`, and
  the stage's end) and each preview step (the plan's PreviewSchedule: an early first one, then its own cadence);
  at a checkpoint step the scene saves a checkpoint, whose URI, step and SHA-256 go into the job table (the newest
  `keep_checkpoints` per stage are kept, and each stage's final one); at a preview step it renders a preview (no
  checkpoint), stored and sent as a progress link, whose failure never fails the job; a job resumes only from a
  recorded checkpoint whose digest matches, the newest readable one;
* when a stage ends, its final checkpoint becomes an artifact (`coarse.ckpt`, `fine.ckpt`), and the next stage
  starts from it (the fine stage converts the coarse one); the fine scene is then exported (GLB, OBJ, previews);
* how a run ends is told by exceptions the dispatcher handles: `Cancelled`, `Stopping` (the orchestrator stops),
  `ReplicaLost` (unreachable, full, or forgot the scene), a ServiceError (the job fails with it);
* the guidance tier being down is not the scene replica's fault: the scene retries guidance for its outage window,
  and if it stays down the job fails saying so, the replica is not set aside;
* a job's deadline is checked at every progress update of its steps, and bounds each scene call.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field

import grpc
from magic3d.v1 import orchestrator_pb2, scene_pb2

from services.orchestrator import presets as presets_module
from services.orchestrator import previews
from services.orchestrator.admission import Admission
from services.orchestrator.eta import StageEta
from services.orchestrator.events import EventHub
from services.orchestrator.jobs import CheckpointRef, JobRecord, JobState, JobStore
from services.orchestrator.presets import JobPlan, PlannedStage
from services.orchestrator.provenance import write_provenance
from services.orchestrator.scenes import SceneReplicas
from shared import artifact_keys
from shared import logging as project_logging
from shared.errors import FailedPrecondition, NotFound, ResourceExhausted, ServiceError, Unavailable
from shared.errors import DeadlineExceeded, error_from_rpc
from shared.store import ArtifactStore

log = project_logging.get_logger(__name__)
JOB_ID_METADATA = "x-magic3d-job-id"


@dataclass(frozen=True)
class RunnerSettings:
    queue_size: int = 16  # queued jobs beyond which submits are refused (RESOURCE_EXHAUSTED)
    max_attempts: int = 3  # starts of one job (first run + resumes after a lost replica)
    poll_interval_s: float = 0.2
    rpc_timeout_s: float = 600.0  # one scene call (a chunk of steps, an export)
    code_version: str = "unknown"
    instance_id: str = "orchestrator"  # owner of the scenes this orchestrator creates (stable across its restarts)
    scene_lease_s: float = 0.0  # lease asked for each scene; 0: the replica's default
    keep_checkpoints: int = 3  # newest checkpoints kept per stage, besides each stage's final one


class Cancelled(Exception):
    pass


class Stopping(Exception):
    pass


class ReplicaLost(Exception):
    pass


@dataclass
class Running:
    replica: str
    cancel: threading.Event
    call: object | None = None  # the RunSteps stream in flight, cancelled on cancel/stop
    deadline: float | None = None  # the job's deadline (time.time()), if it has one
    reached_replica: bool = False  # a scene call of this start succeeded (the start counts against max_attempts)


@dataclass
class JobServices:
    """What every job's execution shares with the runner."""

    jobs: JobStore
    store: ArtifactStore
    replicas: SceneReplicas
    events: EventHub
    settings: RunnerSettings
    admission: Admission
    stopping: threading.Event  # set when the orchestrator stops
    step_seconds: list[float] = field(default_factory=list)  # recent per-step wall times (metrics)


class JobExecution:
    """One start of one job (the dispatcher makes one per start, on the replica `entry.replica`)."""

    def __init__(self, services: JobServices, record: JobRecord, entry: Running) -> None:
        self.services = services
        self.jobs, self.store, self.replicas = services.jobs, services.store, services.replicas
        self.events, self.settings = services.events, services.settings
        self.record = record
        self.entry = entry

    def run(self) -> None:
        record, entry = self.record, self.entry
        spec = orchestrator_pb2.JobSpec.FromString(record.spec)
        if spec.HasField("deadline"):
            entry.deadline = spec.deadline.ToNanoseconds() / 1e9
        plan = self.services.admission.plan(spec)
        if not record.provenance_uri:
            record = write_provenance(self.jobs, self.store, record, spec, plan, self.settings.code_version)
        for stage in plan.stages:
            if artifact_keys.stage_checkpoint(stage.name) in record.artifacts:
                continue  # finished in an earlier attempt
            record = self._run_stage(record, spec, plan, stage)
        record = self._export(record, plan)
        artifacts = [orchestrator_pb2.Artifact(kind=k, uri=v) for k, v in sorted(record.artifacts.items())]
        self.jobs.transition(record.job_id, JobState.SUCCEEDED, error="")
        self.events.publish(record.job_id, orchestrator_pb2.JobEvent(done=orchestrator_pb2.JobDone(artifacts=artifacts)))
        log.info("job_succeeded", artifacts=sorted(record.artifacts))

    # -- stages -----------------------------------------------------------------------------------------------

    def _run_stage(self, record: JobRecord, spec: orchestrator_pb2.JobSpec, plan: JobPlan, stage: PlannedStage) -> JobRecord:
        job_id, entry = record.job_id, self.entry
        stub = self.replicas.stub(entry.replica)
        scene_id, step = self._create_stage_scene(record, spec, stage, stub)
        record = self.jobs.update(job_id, stage=stage.name, step=step, total_steps=stage.steps)
        self.events.publish(job_id, orchestrator_pb2.JobEvent(
            stage_started=orchestrator_pb2.StageStarted(stage=presets_module.STAGE_ENUM[stage.name], total_steps=stage.steps)
        ))
        log.info("stage_started", stage=stage.name, step=step, total_steps=stage.steps, replica=entry.replica)
        try:
            newest = record.stage_checkpoints(stage.name)
            checkpoint_uri = newest[0].uri if newest and newest[0].step == step else ""
            eta = StageEta(stage.steps, start_step=step)
            while step < stage.steps or not checkpoint_uri:
                self._check_interrupts(job_id)
                target = min(presets_module.next_multiple(step, plan.checkpoint_every), plan.preview.next_after(step, stage.steps))
                if target > step:
                    step = self._run_chunk(stub, scene_id, job_id, stage, plan, target - step, eta)
                    checkpoint_uri = ""
                if step % plan.checkpoint_every == 0 or step >= stage.steps:
                    checkpoint_uri, step = self._checkpoint(stub, scene_id, job_id, stage)
                if plan.preview.due(step, stage.steps):
                    self._publish_preview(stub, scene_id, job_id, stage, step)
            record = self._finish_stage_checkpoint(job_id, stage.name, checkpoint_uri)
            self.events.publish(job_id, orchestrator_pb2.JobEvent(stage_finished=orchestrator_pb2.StageFinished(
                stage=presets_module.STAGE_ENUM[stage.name], checkpoint_uri=checkpoint_uri
            )))
            log.info("stage_finished", stage=stage.name, checkpoint=checkpoint_uri)
            return record
        except Stopping:  # keep the steps done since the last checkpoint for the next orchestrator
            try:
                self._checkpoint(stub, scene_id, job_id, stage)
            except (ServiceError, ReplicaLost):
                pass
            raise
        finally:
            delete_scene(stub, scene_id, job_id)

    def _create_stage_scene(self, record: JobRecord, spec, stage: PlannedStage, stub) -> tuple[str, int]:
        """The stage's scene on the replica: resumed from the newest recorded checkpoint of the stage that the scene
        can read and whose digest matches (unusable ones are dropped from the record, oldest last), else started
        afresh (from the previous stage's final checkpoint, the edited job's, the user's mesh, or nothing)."""
        for ref in record.stage_checkpoints(stage.name):
            try:
                created = self._create_scene(stub, record.job_id, stage, ref)
            except ServiceError as error:
                if error.field not in ("init_checkpoint_uri", "init_checkpoint_sha256"):
                    raise
                log.warning("checkpoint_unusable", stage=stage.name, step=ref.step, reason=error.message)
                current = self.jobs.get(record.job_id)
                self.jobs.update(record.job_id, checkpoints=[c for c in current.checkpoints if c != ref])
                self._delete_artifact(ref.uri)
                continue
            return created.scene_id, created.step
        created = self._create_scene(stub, record.job_id, stage, self._stage_start(record, spec, stage))
        return created.scene_id, created.step

    def _stage_start(self, record: JobRecord, spec, stage: PlannedStage) -> CheckpointRef | orchestrator_pb2.MeshInput | None:
        kind = spec.WhichOneof("input")
        if stage.name == "fine" and kind == "mesh":
            return spec.mesh
        if stage.name == "fine":
            source = record.final_checkpoint("coarse")  # convert the coarse scene
        elif kind == "edit":
            source = self.services.admission.edit_source(spec.edit.source_job_id).final_checkpoint("coarse")
        else:
            return None
        if source is None:
            raise FailedPrecondition(f"the {stage.name} stage has no finished coarse checkpoint to start from", "spec")
        return source

    def _create_scene(self, stub, job_id: str, stage: PlannedStage, start) -> scene_pb2.CreateSceneResponse:
        request = scene_pb2.CreateSceneRequest(
            job_id=job_id, owner=self.settings.instance_id, lease_seconds=self.settings.scene_lease_s
        )
        request.config.CopyFrom(stage.config)
        if isinstance(start, CheckpointRef):
            request.init_checkpoint_uri, request.init_checkpoint_sha256 = start.uri, start.sha256
        elif start is not None:
            request.init_mesh, request.init_mesh_format = start.mesh, start.format or "glb"
        return self._scene_call(stub.CreateScene, request, job_id)

    # -- checkpoints ------------------------------------------------------------------------------------------

    def _finish_stage_checkpoint(self, job_id: str, stage: str, uri: str) -> JobRecord:
        """The stage's last checkpoint becomes its final one (kept, an artifact, the next stage's start)."""
        record = self.jobs.get(job_id)
        checkpoints = [dataclasses.replace(c, final=True) if c.stage == stage and c.uri == uri else c for c in record.checkpoints]
        return self.jobs.update(
            job_id, checkpoints=checkpoints, artifacts={**record.artifacts, artifact_keys.stage_checkpoint(stage): uri}
        )

    def _record_checkpoint(self, job_id: str, ref: CheckpointRef) -> None:
        """Adds `ref` to the job's checkpoints and deletes this stage's older ones beyond `keep_checkpoints`."""
        record = self.jobs.get(job_id)
        others = [c for c in record.checkpoints if c.uri != ref.uri]
        ours = sorted([c for c in others if c.stage == ref.stage and not c.final] + [ref], key=lambda c: c.step, reverse=True)
        kept, dropped = ours[: self.settings.keep_checkpoints], ours[self.settings.keep_checkpoints :]
        rest = [c for c in others if c.stage != ref.stage or c.final]
        self.jobs.update(
            job_id, checkpoints=rest + sorted(kept, key=lambda c: c.step),
            checkpoint_uri=ref.uri, checkpoint_stage=ref.stage, step=ref.step,
        )
        for old in dropped:
            self._delete_artifact(old.uri)

    def _delete_artifact(self, uri: str) -> None:
        try:
            self.store.delete(self.store.key_from_uri(uri))
        except Exception as error:  # noqa: BLE001 - a leftover file costs space, never the job
            log.info("artifact_delete_failed", reason=type(error).__name__)

    def _run_chunk(self, stub, scene_id, job_id, stage, plan, chunk, eta: StageEta) -> int:
        entry = self.entry
        request = scene_pb2.RunStepsRequest(scene_id=scene_id, num_steps=chunk, progress_every=plan.progress_every)
        call = stub.RunSteps(request, timeout=self._call_timeout(), metadata=_metadata(job_id))
        entry.call = call
        step = None
        try:
            for update in call:
                step = update.step
                if update.checkpoint_uri:  # the replica is shutting down: its last word is this checkpoint
                    self._record_checkpoint(
                        job_id, CheckpointRef(stage.name, step, update.checkpoint_uri, update.checkpoint_sha256)
                    )
                    continue
                step_seconds = sum(update.phase_seconds.values())
                self.services.step_seconds = (self.services.step_seconds + [step_seconds])[-256:]
                eta.observe(step, step_seconds)
                self.jobs.update(job_id, step=step)
                self._check_deadline()
                self.events.publish(job_id, orchestrator_pb2.JobEvent(progress=orchestrator_pb2.JobProgress(
                    stage=presets_module.STAGE_ENUM[stage.name], step=step, total_steps=stage.steps,
                    losses=dict(update.losses), eta_seconds=eta.eta_seconds(),
                )))
        except grpc.RpcError as error:
            self._check_interrupts(job_id)
            raise translate(error) from None
        finally:
            entry.call = None
        if step is None:
            raise ReplicaLost("the scene replica returned no progress")
        return step

    def _checkpoint(self, stub, scene_id: str, job_id: str, stage: PlannedStage) -> tuple[str, int]:
        saved = self._scene_call(stub.SaveCheckpoint, scene_pb2.SaveCheckpointRequest(scene_id=scene_id), job_id)
        self._record_checkpoint(job_id, CheckpointRef(stage.name, saved.step, saved.checkpoint_uri, saved.sha256))
        return saved.checkpoint_uri, saved.step

    def _publish_preview(self, stub, scene_id: str, job_id: str, stage: PlannedStage, step: int) -> None:
        preview = self._preview(stub, scene_id, job_id, stage, step)
        if preview:
            self.events.publish(job_id, orchestrator_pb2.JobEvent(progress=orchestrator_pb2.JobProgress(
                stage=presets_module.STAGE_ENUM[stage.name], step=step, total_steps=stage.steps, preview_uri=preview,
            )))

    def _preview(self, stub, scene_id: str, job_id: str, stage: PlannedStage, step: int) -> str:
        """Four views as one PNG strip in the store; a preview failing (render, pixels, store) never fails the job,
        only a lost replica ends the run."""
        request = scene_pb2.RenderPreviewRequest(scene_id=scene_id, cameras=previews.preview_cameras())
        try:
            reply = self._scene_call(stub.RenderPreview, request, job_id)
            key = artifact_keys.preview_key(job_id, stage.name, step)
            return self.store.put(key, previews.strip_png(reply.images), "image/png")
        except ReplicaLost:
            raise
        except Exception as error:  # noqa: BLE001 - a preview is a progress link, never the job's outcome
            log.warning("preview_failed", step=step, reason=getattr(error, "message", type(error).__name__))
            return ""

    # -- export -----------------------------------------------------------------------------------------------

    def _export(self, record: JobRecord, plan: JobPlan) -> JobRecord:
        if any(name in record.artifacts for name in artifact_keys.MESHES):
            return record
        last = plan.stages[-1].name
        stub = self.replicas.stub(self.entry.replica)
        final = record.final_checkpoint(last)
        if final is None:
            raise FailedPrecondition(f"the job has no final {last} checkpoint to export", "spec")
        request = scene_pb2.CreateSceneRequest(
            job_id=record.job_id, init_checkpoint_uri=final.uri, init_checkpoint_sha256=final.sha256,
            owner=self.settings.instance_id, lease_seconds=self.settings.scene_lease_s,
        )
        created = self._scene_call(stub.CreateScene, request, record.job_id)
        try:
            self.jobs.update(record.job_id, stage="export")
            exported = self._scene_call(stub.ExportMesh, scene_pb2.ExportMeshRequest(
                scene_id=created.scene_id, formats=list(plan.export.formats), texture_size=plan.export.texture_size,
            ), record.job_id)
        finally:
            delete_scene(stub, created.scene_id, record.job_id)
        artifacts = {**self.jobs.get(record.job_id).artifacts, **{f.name: f.uri for f in exported.files}}
        return self.jobs.update(record.job_id, artifacts=artifacts, stage=last)

    # -- scene calls ------------------------------------------------------------------------------------------

    def _check_interrupts(self, job_id: str) -> None:
        if self.services.stopping.is_set():
            raise Stopping()
        if self.entry.cancel.is_set() or self.jobs.get(job_id).cancel_requested:
            raise Cancelled()
        self._check_deadline()

    def _check_deadline(self) -> None:
        if self.entry.deadline is not None and self.entry.deadline <= time.time():
            raise DeadlineExceeded("the job's deadline passed before it finished", "spec.deadline")

    def _call_timeout(self) -> float:
        """A scene call ends by the job's deadline at the latest (a chunk of steps never runs past it)."""
        if self.entry.deadline is None:
            return self.settings.rpc_timeout_s
        return max(0.001, min(self.settings.rpc_timeout_s, self.entry.deadline - time.time()))

    def _scene_call(self, method, request, job_id: str):
        try:
            reply = method(request, timeout=self._call_timeout(), metadata=_metadata(job_id))
            self.entry.reached_replica = True
            return reply
        except grpc.RpcError as error:
            self._check_deadline()
            raise translate(error) from None


def translate(error: grpc.RpcError) -> Exception:
    """A failed scene call as what the dispatcher acts on: ReplicaLost (requeue elsewhere) or a ServiceError."""
    service_error = error_from_rpc(error)
    if isinstance(service_error, Unavailable) and service_error.field == "guidance":
        # The scene retried the guidance tier for its whole outage window: the replica is fine, the tier is not.
        return Unavailable(f"the guidance tier was down: {service_error.message}", "guidance")
    if isinstance(service_error, Unavailable) or (
        isinstance(service_error, NotFound) and service_error.field == "scene_id"
    ):
        return ReplicaLost(f"scene replica: {service_error.message}")
    if isinstance(service_error, ResourceExhausted):
        return ReplicaLost(f"scene replica full: {service_error.message}")
    return service_error


def delete_scene(stub, scene_id: str, job_id: str) -> None:
    try:
        stub.DeleteScene(scene_pb2.DeleteSceneRequest(scene_id=scene_id), timeout=30, metadata=_metadata(job_id))
    except grpc.RpcError as error:  # the replica may be gone; its scenes went with it
        log.info("scene_delete_failed", scene_id=scene_id, code=error.code().name)


def _metadata(job_id: str) -> tuple[tuple[str, str], ...]:
    return ((JOB_ID_METADATA, job_id),)


__all__ = [
    "JOB_ID_METADATA", "Cancelled", "JobExecution", "JobServices", "ReplicaLost", "RunnerSettings", "Running",
    "Stopping", "delete_scene", "translate",
]
