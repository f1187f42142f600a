"""Running jobs: admission, the coarse-to-fine schedule across scene replicas, checkpoints, resume, cancel.

A job is accepted only after its whole plan validates (preset + overrides, priors known to the guidance tier,
prompt within every prior's token limit); from then on it is in the job table and is not lost:

* a dispatcher thread starts queued jobs, oldest first, while a scene replica has a free slot;
* each stage runs on one replica in chunks of `checkpoint_every` steps; after each chunk the scene saves a
  checkpoint, whose URI, step and SHA-256 go into the job table (the newest `keep_checkpoints` per stage are kept,
  and each stage's final one), with a preview render as a progress link; a job resumes only from a recorded
  checkpoint whose digest matches, the newest readable one;
* when a stage ends, its final checkpoint becomes an artifact (`coarse.ckpt`, `fine.ckpt`), and the next stage
  starts from it (the fine stage converts the coarse one); the fine scene is then exported (GLB, OBJ, previews);
* if the replica becomes unreachable (or forgot the scene: restarted), the job goes back to the queue and resumes on
  a replica from its last checkpoint, up to `max_attempts` starts; other errors fail the job with the reason;
* an orchestrator that stops leaves its running jobs RUNNING with their last checkpoint; a restarted one requeues
  them (`recover()`), so they resume, and deletes the scenes it owned on every replica (`reconcile()`): scenes carry
  this orchestrator's instance id as their owner and a lease, so those of an orchestrator that never comes back
  expire by themselves;
* the guidance tier being down is not the scene replica's fault: the scene retries guidance for its outage window,
  and if it stays down the job fails saying so, the replica is not set aside;
* a job's deadline is checked at every progress update of its steps, and bounds each scene call.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import grpc
from google.protobuf import json_format
from magic3d.v1 import common_pb2, orchestrator_pb2, scene_pb2

from services.orchestrator import presets as presets_module
from services.orchestrator import validation
from services.orchestrator.events import EventHub
from services.orchestrator.jobs import (
    TERMINAL,
    CheckpointRef,
    JobNotFound,
    JobRecord,
    JobState,
    JobStore,
    RequestIdConflict,
)
from services.orchestrator.presets import JobPlan, PlannedStage, PresetBook, plan_job
from services.orchestrator.scenes import SceneReplicas
from shared import cameras as camera_messages
from shared import logging as project_logging
from shared import tensors
from shared.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    Unimplemented,
)
from shared.errors import DeadlineExceeded, error_from_rpc
from shared.store import ArtifactStore

log = project_logging.get_logger(__name__)
JOB_ID_METADATA = "x-magic3d-job-id"


class PriorChecker(Protocol):
    def check_prompt(self, prior: str, prompt: str, negative_prompt: str = "", checkpoint_id: str = "",
                     timeout_s: float | None = None): ...


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


class _Cancelled(Exception):
    pass


class _Stopping(Exception):
    pass


class _ReplicaLost(Exception):
    pass


@dataclass
class _Running:
    replica: str
    cancel: threading.Event
    call: object | None = None  # the RunSteps stream in flight, cancelled on cancel/stop
    deadline: float | None = None  # the job's deadline (time.time()), if it has one
    reached_replica: bool = False  # a scene call of this start succeeded (the start counts against max_attempts)


def job_prompt(spec: orchestrator_pb2.JobSpec) -> tuple[str, str]:
    kind = spec.WhichOneof("input")
    if kind == "text":
        return spec.text.prompt, spec.text.negative_prompt
    if kind in ("edit", "mesh", "image"):
        return getattr(spec, kind).prompt, ""
    return "", ""


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
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._dispatcher: threading.Thread | None = None
        self.step_seconds: list[float] = []  # recent per-step wall times (metrics)

    # -- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.recover()
        self.reconcile()
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="job-dispatcher", daemon=True)
        self._dispatcher.start()

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
                running = set(self._running)
            for scene in listed.scenes:
                if scene.job_id not in running:
                    self._delete_scene(stub, scene.scene_id, scene.job_id)
                    deleted.append(scene.scene_id)
        if deleted:
            log.info("orphaned_scenes_deleted", scenes=deleted)
        return deleted

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops dispatching; running jobs checkpoint, free their scene and stay RUNNING for the next start."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            running = list(self._running.values())
        for entry in running:
            entry.cancel.set()
            if entry.call is not None:
                entry.call.cancel()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._running:
                    break
            time.sleep(0.05)
        if self._dispatcher is not None:
            self._dispatcher.join(timeout=5)

    # -- client operations ------------------------------------------------------------------------------------

    def submit(self, spec: orchestrator_pb2.JobSpec, request_id: str = "", owner: str = "") -> tuple[JobRecord, bool]:
        """Validates the whole request, then stores the job for `owner` (idempotent on the owner's request_id).
        Raises ServiceError."""
        data = spec.SerializeToString(deterministic=True)
        try:
            existing = self.jobs.find_by_request_id(request_id, data, owner=owner)
        except RequestIdConflict as error:
            raise InvalidArgument(str(error), "request_id") from None
        if existing is not None:  # a retried submit: the job it made, whatever the queue looks like now
            return existing, False
        self.validate(spec)
        queued = self.jobs.counts()[JobState.QUEUED]
        if queued >= self.settings.queue_size:
            raise ResourceExhausted(
                f"{queued} jobs are queued, the most this orchestrator accepts; retry later", retry_after_s=60.0
            )
        try:
            record, created = self.jobs.create(data, request_id, owner=owner)
        except RequestIdConflict as error:  # raced with another submit of the same request_id
            raise InvalidArgument(str(error), "request_id") from None
        if created:
            position = self.jobs.queue_position(record.job_id)
            self.events.publish(record.job_id, orchestrator_pb2.JobEvent(queued=orchestrator_pb2.JobQueued(position=position)))
            log.info("job_submitted", job_id=record.job_id, queue_position=position)
            self._wake.set()
        return record, created

    def get(self, job_id: str) -> JobRecord:
        try:
            return self.jobs.get(job_id)
        except JobNotFound:
            raise NotFound(f"no job {job_id!r}", "name") from None

    def cancel(self, job_id: str) -> JobRecord:
        """Idempotent: a finished job is returned as it is; a queued one ends at once; a running one stops at its
        next step and frees its scene."""
        record = self.get(job_id)
        if record.terminal:
            return record
        if record.state == JobState.QUEUED:
            with self._lock:
                current = self.jobs.get(job_id)
                if job_id not in self._running and current.state == JobState.QUEUED:
                    record = self.jobs.transition(job_id, JobState.CANCELLED, error="cancelled by the client")
                    self._publish_failed(job_id, "cancelled by the client")
                    return record
        self.jobs.update(job_id, cancel_requested=True)
        with self._lock:
            entry = self._running.get(job_id)
        if entry is not None:
            entry.cancel.set()
            if entry.call is not None:
                entry.call.cancel()
        return self.jobs.get(job_id)

    def delete(self, job_id: str) -> None:
        record = self.get(job_id)
        if not record.terminal:
            raise FailedPrecondition(f"job {job_id} is {record.state.value}: cancel it first", "name")
        for key in self.store.list(f"jobs/{job_id}"):
            self.store.delete(key)
        self.jobs.delete(job_id)
        self.events.forget(job_id)

    # -- validation -------------------------------------------------------------------------------------------

    def validate(self, spec: orchestrator_pb2.JobSpec) -> JobPlan:
        """Everything checkable before work starts; raises InvalidArgument / NotFound / Unimplemented / ..."""
        kind = spec.WhichOneof("input")
        if kind is None:
            raise InvalidArgument("give one input: text, image, edit or mesh", "spec.input")
        if kind == "image":
            raise Unimplemented("image-to-3D (Magic123) is not served yet", "spec.image")
        prompt, negative = job_prompt(spec)
        if not prompt.strip():
            raise InvalidArgument("the prompt must not be empty or blank", f"spec.{kind}.prompt")
        validation.validate_spec(self, spec)  # deadline well-formed, stage numbers, scene limits, mesh
        if spec.HasField("deadline") and spec.deadline.ToDatetime().timestamp() <= time.time():
            raise InvalidArgument("the deadline has already passed", "spec.deadline")
        if kind == "edit":
            self._edit_source(spec.edit.source_job_id)
        if kind == "mesh":
            _read_mesh(spec.mesh)
        plan = self.plan(spec)
        self._check_priors(plan, prompt, negative, kind)
        return plan

    def plan(self, spec: orchestrator_pb2.JobSpec) -> JobPlan:
        prompt, negative = job_prompt(spec)
        plan = plan_job(self.presets, spec.preset, spec.overrides, prompt.strip(), negative, spec.seed)
        if spec.WhichOneof("input") == "mesh":  # the user's mesh is the fine stage's start: no coarse stage
            fine = plan.stage("fine")
            if fine is None:
                raise InvalidArgument(f"preset {plan.preset!r} has no fine stage to refine a mesh", "spec.preset")
            plan = dataclasses.replace(plan, stages=(fine,))
        return plan

    def _edit_source(self, source_job_id: str) -> JobRecord:
        try:
            source = self.jobs.get(source_job_id.removeprefix("jobs/"))
        except JobNotFound:
            raise NotFound(f"no job {source_job_id!r} to edit", "spec.edit.source_job_id") from None
        if "coarse.ckpt" not in source.artifacts:
            raise FailedPrecondition(
                f"job {source.job_id} has no finished coarse stage to edit", "spec.edit.source_job_id"
            )
        return source

    def _check_priors(self, plan: JobPlan, prompt: str, negative: str, kind: str) -> None:
        if self.priors is None:
            return
        for stage in plan.stages:
            for index, term in enumerate(stage.config.priors):
                try:
                    self.priors.check_prompt(term.prior, stage.config.prompt or prompt, negative, term.checkpoint_id)
                except ServiceError as error:
                    if error.field in ("prior", "checkpoint_id"):
                        raise InvalidArgument(
                            f"{error.message} (stage {stage.name})", f"{stage.name}.priors[{index}].{error.field}"
                        ) from None
                    if error.field in ("prompt", "negative_prompt"):
                        field = f"spec.{kind}.prompt" if error.field == "prompt" else "spec.text.negative_prompt"
                        raise InvalidArgument(f"{error.message} (prior {term.prior!r})", field) from None
                    raise

    # -- dispatch ---------------------------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.poll_interval_s)
            self._wake.clear()
            try:
                self._dispatch_once()
            except Exception:  # noqa: BLE001 - the dispatcher must outlive any one job's surprise
                log.exception("dispatch_failed")

    def _dispatch_once(self) -> None:
        for record in self.jobs.unfinished():
            if self._stop.is_set() or record.state != JobState.QUEUED:
                continue
            with self._lock:
                if record.job_id in self._running:
                    continue
            replica = self.replicas.acquire(avoid=record.scene_replica)
            if replica is None:
                return
            entry = _Running(replica, threading.Event())
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
                self._running[record.job_id] = entry
            threading.Thread(target=self._run, args=(record, entry), name=f"job-{record.job_id}", daemon=True).start()

    def _run(self, record: JobRecord, entry: _Running) -> None:
        job_id = record.job_id
        with project_logging_context(job_id):
            try:
                self._execute(record, entry)
            except _Cancelled:
                self.jobs.transition(job_id, JobState.CANCELLED, error="cancelled by the client")
                self._publish_failed(job_id, "cancelled by the client")
                log.info("job_cancelled")
            except _Stopping:
                log.info("job_paused_for_shutdown")  # stays RUNNING; recover() requeues it on the next start
            except _ReplicaLost as lost:
                self.replicas.mark_down(entry.replica)
                self._requeue_or_fail(job_id, str(lost), counted=entry.reached_replica)
            except ServiceError as error:
                self._fail(job_id, f"{error.code.name}: {error.message}")
            except Exception as error:  # noqa: BLE001 - a job never takes the orchestrator down
                log.exception("job_crashed")
                self._fail(job_id, f"internal error: {type(error).__name__}: {error}")
            finally:
                self._never_stranded(job_id)
                self.replicas.release(entry.replica)
                with self._lock:
                    self._running.pop(job_id, None)
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

    # -- one job ----------------------------------------------------------------------------------------------

    def _execute(self, record: JobRecord, entry: _Running) -> None:
        spec = orchestrator_pb2.JobSpec.FromString(record.spec)
        if spec.HasField("deadline"):
            entry.deadline = spec.deadline.ToNanoseconds() / 1e9
        plan = self.plan(spec)
        if not record.provenance_uri:
            record = self._write_provenance(record, spec, plan)
        for stage in plan.stages:
            if f"{stage.name}.ckpt" in record.artifacts:
                continue  # finished in an earlier attempt
            record = self._run_stage(record, spec, plan, stage, entry)
        record = self._export(record, plan, entry)
        artifacts = [orchestrator_pb2.Artifact(kind=k, uri=v) for k, v in sorted(record.artifacts.items())]
        self.jobs.transition(record.job_id, JobState.SUCCEEDED, error="")
        self.events.publish(record.job_id, orchestrator_pb2.JobEvent(done=orchestrator_pb2.JobDone(artifacts=artifacts)))
        log.info("job_succeeded", artifacts=sorted(record.artifacts))

    def _run_stage(
        self, record: JobRecord, spec: orchestrator_pb2.JobSpec, plan: JobPlan, stage: PlannedStage, entry: _Running
    ) -> JobRecord:
        job_id = record.job_id
        stub = self.replicas.stub(entry.replica)
        scene_id, step = self._create_stage_scene(record, spec, stage, entry, stub)
        record = self.jobs.update(job_id, stage=stage.name, step=step, total_steps=stage.steps)
        self.events.publish(job_id, orchestrator_pb2.JobEvent(
            stage_started=orchestrator_pb2.StageStarted(stage=presets_module.STAGE_ENUM[stage.name], total_steps=stage.steps)
        ))
        log.info("stage_started", stage=stage.name, step=step, total_steps=stage.steps, replica=entry.replica)
        try:
            newest = record.stage_checkpoints(stage.name)
            checkpoint_uri = newest[0].uri if newest and newest[0].step == step else ""
            started = time.monotonic()
            start_step = step
            while step < stage.steps or not checkpoint_uri:
                self._check_interrupts(job_id, entry)
                chunk = min(plan.checkpoint_every - step % plan.checkpoint_every, stage.steps - step)
                if chunk > 0:
                    step = self._run_chunk(entry, stub, scene_id, job_id, stage, plan, chunk, started, start_step)
                checkpoint_uri, step = self._checkpoint(entry, stub, scene_id, job_id, stage)
            record = self._finish_stage_checkpoint(job_id, stage.name, checkpoint_uri)
            self.events.publish(job_id, orchestrator_pb2.JobEvent(stage_finished=orchestrator_pb2.StageFinished(
                stage=presets_module.STAGE_ENUM[stage.name], checkpoint_uri=checkpoint_uri
            )))
            log.info("stage_finished", stage=stage.name, checkpoint=checkpoint_uri)
            return record
        except _Stopping:  # keep the steps done since the last checkpoint for the next orchestrator
            try:
                self._checkpoint(entry, stub, scene_id, job_id, stage)
            except (ServiceError, _ReplicaLost):
                pass
            raise
        finally:
            self._delete_scene(stub, scene_id, job_id)

    def _create_stage_scene(self, record: JobRecord, spec, stage: PlannedStage, entry: _Running, stub) -> tuple[str, int]:
        """The stage's scene on the replica: resumed from the newest recorded checkpoint of the stage that the scene
        can read and whose digest matches (unusable ones are dropped from the record, oldest last), else started
        afresh (from the previous stage's final checkpoint, the edited job's, the user's mesh, or nothing)."""
        for ref in record.stage_checkpoints(stage.name):
            try:
                created = self._create_scene(entry, stub, record.job_id, stage, ref)
            except ServiceError as error:
                if error.field not in ("init_checkpoint_uri", "init_checkpoint_sha256"):
                    raise
                log.warning("checkpoint_unusable", stage=stage.name, step=ref.step, reason=error.message)
                current = self.jobs.get(record.job_id)
                self.jobs.update(record.job_id, checkpoints=[c for c in current.checkpoints if c != ref])
                self._delete_artifact(ref.uri)
                continue
            return created.scene_id, created.step
        created = self._create_scene(entry, stub, record.job_id, stage, self._stage_start(record, spec, stage))
        return created.scene_id, created.step

    def _stage_start(self, record: JobRecord, spec, stage: PlannedStage) -> CheckpointRef | orchestrator_pb2.MeshInput | None:
        kind = spec.WhichOneof("input")
        if stage.name == "fine" and kind == "mesh":
            return spec.mesh
        if stage.name == "fine":
            source = record.final_checkpoint("coarse")  # convert the coarse scene
        elif kind == "edit":
            source = self._edit_source(spec.edit.source_job_id).final_checkpoint("coarse")
        else:
            return None
        if source is None:
            raise FailedPrecondition(f"the {stage.name} stage has no finished coarse checkpoint to start from", "spec")
        return source

    def _create_scene(self, entry: _Running, stub, job_id: str, stage: PlannedStage, start) -> scene_pb2.CreateSceneResponse:
        request = scene_pb2.CreateSceneRequest(
            job_id=job_id, owner=self.settings.instance_id, lease_seconds=self.settings.scene_lease_s
        )
        request.config.CopyFrom(stage.config)
        if isinstance(start, CheckpointRef):
            request.init_checkpoint_uri, request.init_checkpoint_sha256 = start.uri, start.sha256
        elif start is not None:
            request.init_mesh, request.init_mesh_format = start.mesh, start.format or "glb"
        return self._scene_call(entry, stub.CreateScene, request, job_id)

    def _finish_stage_checkpoint(self, job_id: str, stage: str, uri: str) -> JobRecord:
        """The stage's last checkpoint becomes its final one (kept, an artifact, the next stage's start)."""
        record = self.jobs.get(job_id)
        checkpoints = [dataclasses.replace(c, final=True) if c.stage == stage and c.uri == uri else c for c in record.checkpoints]
        return self.jobs.update(
            job_id, checkpoints=checkpoints, artifacts={**record.artifacts, f"{stage}.ckpt": uri}
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

    def _run_chunk(self, entry, stub, scene_id, job_id, stage, plan, chunk, started, start_step) -> int:
        request = scene_pb2.RunStepsRequest(scene_id=scene_id, num_steps=chunk, progress_every=plan.progress_every)
        call = stub.RunSteps(request, timeout=self._call_timeout(entry), metadata=_metadata(job_id))
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
                self.step_seconds = (self.step_seconds + [sum(update.phase_seconds.values())])[-256:]
                done = max(1, step - start_step)
                eta = (time.monotonic() - started) / done * (stage.steps - step)
                self.jobs.update(job_id, step=step)
                self._check_deadline(entry)
                self.events.publish(job_id, orchestrator_pb2.JobEvent(progress=orchestrator_pb2.JobProgress(
                    stage=presets_module.STAGE_ENUM[stage.name], step=step, total_steps=stage.steps,
                    losses=dict(update.losses), eta_seconds=eta,
                )))
        except grpc.RpcError as error:
            self._check_interrupts(job_id, entry)
            raise self._translate(error) from None
        finally:
            entry.call = None
        if step is None:
            raise _ReplicaLost("the scene replica returned no progress")
        return step

    def _checkpoint(self, entry, stub, scene_id: str, job_id: str, stage: PlannedStage) -> tuple[str, int]:
        saved = self._scene_call(entry, stub.SaveCheckpoint, scene_pb2.SaveCheckpointRequest(scene_id=scene_id), job_id)
        self._record_checkpoint(job_id, CheckpointRef(stage.name, saved.step, saved.checkpoint_uri, saved.sha256))
        preview = self._preview(entry, stub, scene_id, job_id, stage, saved.step)
        self.events.publish(job_id, orchestrator_pb2.JobEvent(progress=orchestrator_pb2.JobProgress(
            stage=presets_module.STAGE_ENUM[stage.name], step=saved.step, total_steps=stage.steps, preview_uri=preview,
        )))
        return saved.checkpoint_uri, saved.step

    def _preview(self, entry, stub, scene_id: str, job_id: str, stage: PlannedStage, step: int) -> str:
        """Four views as one PNG strip in the store; a preview failing never fails the job."""
        views = [
            camera_messages.to_proto(camera_messages.orbit_camera(az, 20.0, 2.2, fovy_deg=45.0, size=128))
            for az in (0.0, 90.0, 180.0, 270.0)
        ]
        try:
            reply = self._scene_call(entry, stub.RenderPreview, scene_pb2.RenderPreviewRequest(scene_id=scene_id, cameras=views), job_id)
        except ServiceError as error:
            log.warning("preview_failed", reason=error.message)
            return ""
        images = tensors.from_proto(reply.images)  # (N, H, W, 3) uint8
        strip = images.permute(1, 0, 2, 3).reshape(images.shape[1], -1, 3).numpy()
        return self.store.put(f"jobs/{job_id}/previews/{stage.name}-{step:07d}.png", _png(strip), "image/png")

    def _export(self, record: JobRecord, plan: JobPlan, entry: _Running) -> JobRecord:
        if "model.glb" in record.artifacts or "model.obj" in record.artifacts:
            return record
        last = plan.stages[-1].name
        stub = self.replicas.stub(entry.replica)
        final = record.final_checkpoint(last)
        if final is None:
            raise FailedPrecondition(f"the job has no final {last} checkpoint to export", "spec")
        request = scene_pb2.CreateSceneRequest(
            job_id=record.job_id, init_checkpoint_uri=final.uri, init_checkpoint_sha256=final.sha256,
            owner=self.settings.instance_id, lease_seconds=self.settings.scene_lease_s,
        )
        created = self._scene_call(entry, stub.CreateScene, request, record.job_id)
        try:
            self.jobs.update(record.job_id, stage="export")
            exported = self._scene_call(entry, stub.ExportMesh, scene_pb2.ExportMeshRequest(
                scene_id=created.scene_id, formats=list(plan.export.formats), texture_size=plan.export.texture_size,
            ), record.job_id)
        finally:
            self._delete_scene(stub, created.scene_id, record.job_id)
        artifacts = {**self.jobs.get(record.job_id).artifacts, **{f.name: f.uri for f in exported.files}}
        return self.jobs.update(record.job_id, artifacts=artifacts, stage=last)

    def _write_provenance(self, record: JobRecord, spec: orchestrator_pb2.JobSpec, plan: JobPlan) -> JobRecord:
        prompt, negative = job_prompt(spec)
        provenance = {
            "job_id": record.job_id,
            "input": spec.WhichOneof("input"),
            "prompt": prompt,
            "negative_prompt": negative,
            "edit_of": spec.edit.source_job_id if spec.HasField("edit") else None,
            "preset": plan.preset,
            "overrides": [json_format.MessageToDict(o) for o in spec.overrides],
            "seed": spec.seed,
            "priors": [
                {"stage": s, "prior": p, "checkpoint_id": c or "default"} for s, p, c in presets_module.prior_names(plan)
            ],
            "plan": presets_module.plan_to_json(plan),
            "code_version": self.settings.code_version,
            "created": record.create_time,
        }
        key = f"jobs/{record.job_id}/provenance.json"
        self.store.put(key, json.dumps(provenance, indent=2).encode(), "application/json")
        uri = self.store.canonical_uri(key)  # the job table keeps stable names; links are minted per request
        return self.jobs.update(
            record.job_id, provenance_uri=uri, artifacts={**record.artifacts, "provenance.json": uri}
        )

    # -- scene calls ------------------------------------------------------------------------------------------

    def _check_interrupts(self, job_id: str, entry: _Running) -> None:
        if self._stop.is_set():
            raise _Stopping()
        if entry.cancel.is_set() or self.jobs.get(job_id).cancel_requested:
            raise _Cancelled()
        self._check_deadline(entry)

    @staticmethod
    def _check_deadline(entry: _Running) -> None:
        if entry.deadline is not None and entry.deadline <= time.time():
            raise DeadlineExceeded("the job's deadline passed before it finished", "spec.deadline")

    def _call_timeout(self, entry: _Running) -> float:
        """A scene call ends by the job's deadline at the latest (a chunk of steps never runs past it)."""
        if entry.deadline is None:
            return self.settings.rpc_timeout_s
        return max(0.001, min(self.settings.rpc_timeout_s, entry.deadline - time.time()))

    def _scene_call(self, entry: _Running, method, request, job_id: str):
        try:
            reply = method(request, timeout=self._call_timeout(entry), metadata=_metadata(job_id))
            entry.reached_replica = True
            return reply
        except grpc.RpcError as error:
            self._check_deadline(entry)
            raise self._translate(error) from None

    @staticmethod
    def _translate(error: grpc.RpcError) -> Exception:
        service_error = error_from_rpc(error)
        if isinstance(service_error, Unavailable) and service_error.field == "guidance":
            # The scene retried the guidance tier for its whole outage window: the replica is fine, the tier is not.
            return Unavailable(f"the guidance tier was down: {service_error.message}", "guidance")
        if isinstance(service_error, Unavailable) or (
            isinstance(service_error, NotFound) and service_error.field == "scene_id"
        ):
            return _ReplicaLost(f"scene replica: {service_error.message}")
        if isinstance(service_error, ResourceExhausted):
            return _ReplicaLost(f"scene replica full: {service_error.message}")
        return service_error

    def _delete_scene(self, stub, scene_id: str, job_id: str) -> None:
        try:
            stub.DeleteScene(scene_pb2.DeleteSceneRequest(scene_id=scene_id), timeout=30, metadata=_metadata(job_id))
        except grpc.RpcError as error:  # the replica may be gone; its scenes went with it
            log.info("scene_delete_failed", scene_id=scene_id, code=error.code().name)


def _metadata(job_id: str) -> tuple[tuple[str, str], ...]:
    return ((JOB_ID_METADATA, job_id),)


def _png(pixels) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _read_mesh(mesh: orchestrator_pb2.MeshInput):
    return validation.read_mesh(mesh)


def project_logging_context(job_id: str):
    import structlog

    return structlog.contextvars.bound_contextvars(job_id=job_id)


__all__ = ["JobRunner", "RunnerSettings", "PriorChecker", "JOB_ID_METADATA", "job_prompt", "common_pb2", "TERMINAL"]
