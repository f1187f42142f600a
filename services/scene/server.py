"""SceneService over grpcio: holds many jobs' scenes up to a capacity, runs their steps, checkpoints them.

    python -m services.scene.server --config deploy/config/scene.yaml [--host H] [--port P]

The servicer only translates messages and errors; the optimisation is `services.scene.coarse.CoarseStage` and
`services.scene.fine.FineStage` (created from a coarse checkpoint), the export `services.scene.export`.
It calls the guidance tier itself (logical prior names resolved by the registry), so rendered images never pass
through its caller. Answers grpc.health.v1; JSON logs carry the job id.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import torch
import yaml
from magic3d.v1 import scene_pb2, scene_pb2_grpc
from pydantic import BaseModel, ConfigDict, Field

from services.scene import checkpoint as checkpoints
from services.scene.checkpoint import Checkpoint
from services.scene.coarse import CoarseStage, NonFiniteStepsExceeded
from services.scene.config import CoarseConfig, FineConfig
from services.scene.encoder_warm_up import EncoderWarmUpConfig, resolve_warm_up, warm_up_latent_encoder
from services.scene.export import ExportSettings, export_textured_mesh
from services.scene.field.encoding import ENCODINGS
from services.scene.fine import FineStage
from services.scene.guidance import Guidance
from services.scene.latent_encoders import LatentEncoders
from services.scene.stage import Stage
from services.scene.messages import coarse_config_from_proto, fine_config_from_proto
from services.scene.metrics import start_metrics
from shared import artifact_keys
from shared import cameras as camera_messages
from shared import logging as project_logging
from shared import tensors
from shared.components import UnknownKind
from shared.devices import resolve_device
from shared.auth import AuthConfig, TlsConfig, server_tokens
from shared.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    echo,
)
from shared.grpcio import RunningServer, abort_with, config_from_command_line, serve_until_signalled, start_server
from shared.guidance_client import GuidanceClient, stop_retrying_when
from shared.meshes import load_mesh_bytes
from shared.registry import Registry
from shared.stage_limits import SceneLimits, check_hash_table, check_mesh_bytes, check_reference, check_stage_config
from shared.store import ArtifactNotFound, ArtifactStore, open_store

log = project_logging.get_logger(__name__)
SERVICE_NAME = scene_pb2.DESCRIPTOR.services_by_name["SceneService"].full_name


class SceneServiceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=50061, ge=0, le=65535)
    # Scenes held at once; a further CreateScene is refused with RESOURCE_EXHAUSTED.
    capacity: int = Field(default=4, ge=1)
    # Largest hash table (parameters, float32) one scene may ask for: larger asks are INVALID_ARGUMENT.
    scene_memory_budget_bytes: int = Field(default=256 * 2**20, ge=1)
    # All scenes' training state together (hash tables with Adam's two moments, i.e. 3x the table): a scene that
    # would not fit is refused with RESOURCE_EXHAUSTED until others are deleted.
    memory_budget_bytes: int = Field(default=2 * 2**30, ge=1)
    device: str = "auto"
    store_uri: str = "out/store"
    registry_path: Path = Path("deploy/config/registry.yaml")
    # Partial CoarseConfig (YAML) under every request; the request's set fields win.
    coarse_defaults: dict = {"prompt": "unset"}
    # Partial FineConfig under every fine-stage CreateScene (the same rule).
    fine_defaults: dict = {"prompt": "unset"}
    # Build and compile the fine stage's latent encoder at start-up, in a background thread, instead of inside the
    # service's first fine-stage job (about 70 s on an H200 with a cold inductor cache). "auto": on CUDA only;
    # "off": the first fine stage does it. Its batch_size / resolution (default: fine_defaults') must be what the
    # jobs' presets send (`magic3d`: 4 x 512x512): another shape compiles again. services/scene/encoder_warm_up.py.
    warm_latent_encoder: EncoderWarmUpConfig = EncoderWarmUpConfig()
    # Largest tetrahedral grid a fine scene may ask for (cells per side).
    max_grid_cells: int = Field(default=256, ge=4)
    # Largest sizes a scene may ask for (published by GetLimits with the two above; larger asks: INVALID_ARGUMENT).
    max_resolution: int = Field(default=1024, ge=16)
    max_batch_size: int = Field(default=16, ge=1)
    max_samples_per_ray: int = Field(default=512, ge=1)
    # Faces of an uploaded mesh (CreateSceneRequest.init_mesh); larger ones are refused, not decimated.
    max_mesh_faces: int = Field(default=200_000, ge=4)
    max_message_bytes: int = 64 * 2**20
    max_workers: int = Field(default=16, ge=2)
    # On shutdown (SIGTERM), a scene running steps stops after its current step, is checkpointed, and its stream ends
    # with that checkpoint (URI and digest) for the orchestrator to record and resume from; at most this long.
    checkpoint_on_shutdown: bool = True
    drain_timeout_s: float = Field(default=60.0, ge=0)
    # Prometheus /metrics (scenes held, their budget, this process's GPU memory); None: not served, 0: any free port.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    # A scene not used for this long is deleted (its owner, an orchestrator, crashed or lost it); a CreateScene may
    # ask for another lease within (0, max_lease_s].
    default_lease_s: float = Field(default=600.0, gt=0)
    max_lease_s: float = Field(default=3600.0, gt=0)
    # How often expired leases are looked for (they are also reaped whenever a scene is created).
    lease_sweep_s: float = Field(default=10.0, gt=0)
    # Callers (the orchestrator) must send the service token (auth.service_token_file / $MAGIC3D_SERVICE_TOKEN);
    # it is also sent to the guidance tier. None on loopback: auth off (warned).
    auth: AuthConfig = AuthConfig()
    tls: TlsConfig | None = None

    @classmethod
    def load(cls, path: str | Path) -> "SceneServiceConfig":
        return cls.model_validate(yaml.safe_load(Path(path).read_text()))

    def limits(self) -> SceneLimits:
        return SceneLimits(
            max_resolution=self.max_resolution,
            max_batch_size=self.max_batch_size,
            max_samples_per_ray=self.max_samples_per_ray,
            max_grid_cells=self.max_grid_cells,
            max_hash_table_bytes=self.scene_memory_budget_bytes,
            max_mesh_faces=self.max_mesh_faces,
            max_message_bytes=self.max_message_bytes,
        )


@dataclass
class SceneEntry:
    scene_id: str
    job_id: str
    stage: Stage
    memory_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    failure: str | None = None
    owner: str = ""
    lease_s: float = 600.0
    expires_at: float = 0.0  # time.monotonic() after which an idle scene is deleted

    def renew(self) -> None:
        self.expires_at = time.monotonic() + self.lease_s

    @property
    def busy(self) -> bool:
        return self.lock.locked()


def training_state_bytes(stage: Stage) -> int:
    """Parameters plus Adam's two moments: the part of a scene's memory that grows with its configuration."""
    return 3 * sum(p.numel() * p.element_size() for module in stage.trainable_modules for p in module.parameters())


class SceneTable:
    """The scenes this replica holds, within a count and a memory budget; thread-safe."""

    def __init__(self, capacity: int, memory_budget_bytes: int) -> None:
        self.capacity = capacity
        self.memory_budget_bytes = memory_budget_bytes
        self._entries: dict[str, SceneEntry] = {}
        self._lock = threading.Lock()

    def add(self, job_id: str, stage: Stage, owner: str = "", lease_s: float = 600.0) -> SceneEntry:
        needed = training_state_bytes(stage)
        self.reap_expired()
        with self._lock:
            if len(self._entries) >= self.capacity:
                raise ResourceExhausted(
                    f"this scene replica holds its capacity of {self.capacity} scenes", retry_after_s=30.0
                )
            used = sum(e.memory_bytes for e in self._entries.values())
            if used + needed > self.memory_budget_bytes:
                raise ResourceExhausted(
                    f"scene needs {needed / 2**20:.1f} MiB; {used / 2**20:.1f} of this replica's "
                    f"{self.memory_budget_bytes / 2**20:.1f} MiB are in use",
                    retry_after_s=30.0,
                )
            entry = SceneEntry(f"scene-{uuid.uuid4().hex[:12]}", job_id, stage, needed, owner=owner, lease_s=lease_s)
            entry.renew()
            self._entries[entry.scene_id] = entry
            return entry

    def get(self, scene_id: str) -> SceneEntry:
        """The scene, its lease renewed: any call on a scene shows that its owner is still there."""
        with self._lock:
            if scene_id not in self._entries:
                raise NotFound(f"no scene {echo(scene_id)} on this replica", "scene_id")
            entry = self._entries[scene_id]
            entry.renew()
            return entry

    def reap_expired(self) -> list[SceneEntry]:
        """Deletes the idle scenes whose lease ran out (their owner crashed or forgot them); returns them."""
        now = time.monotonic()
        with self._lock:
            expired = [e for e in self._entries.values() if e.expires_at <= now and not e.busy]
            for entry in expired:
                del self._entries[entry.scene_id]
        for entry in expired:
            log.warning("scene_lease_expired", scene_id=entry.scene_id, job_id=entry.job_id, owner=entry.owner)
        return expired

    def remove(self, scene_id: str) -> None:
        with self._lock:
            if self._entries.pop(scene_id, None) is None:
                raise NotFound(f"no scene {echo(scene_id)} on this replica", "scene_id")

    def entries(self) -> list[SceneEntry]:
        with self._lock:
            return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


class SceneServicer(scene_pb2_grpc.SceneServiceServicer):
    def __init__(self, config: SceneServiceConfig, guidance: Guidance, store: ArtifactStore) -> None:
        self.config = config
        self.guidance = guidance
        self.store = store
        self.scenes = SceneTable(config.capacity, config.memory_budget_bytes)
        self.device = resolve_device(config.device)
        self.defaults = CoarseConfig.model_validate(config.coarse_defaults)
        self.fine_defaults = FineConfig.model_validate(config.fine_defaults)
        self.draining = threading.Event()  # shutting down: running steps end with a checkpoint
        self.limits = config.limits()
        # The latent priors' encoders, shared by every scene here: built and compiled once per service, not per job.
        self.latent_encoders = LatentEncoders()
        self.warm_up: threading.Thread | None = None  # start_encoder_warm_up's thread

    def start_encoder_warm_up(self, stop: threading.Event | None = None) -> threading.Thread | None:
        """Warms the fine defaults' latent encoder in `latent_encoders` on a daemon thread, where
        `warm_latent_encoder.mode` resolves on here (services/scene/encoder_warm_up.py); `stop` ends its wait for the
        guidance tier. A stage stepping meanwhile waits on the encoders' locks; nothing else waits for it."""
        settings = self.config.warm_latent_encoder
        warm_up = functools.partial(
            warm_up_latent_encoder, self.latent_encoders, self.guidance, settings.fine_config(self.fine_defaults),
            self.device, mode=settings.mode, wait_for_guidance_s=settings.wait_for_guidance_s, stop=stop,
        )
        if not resolve_warm_up(settings.mode, self.device):
            warm_up()  # logs why it is skipped, at once
            return None
        self.warm_up = threading.Thread(target=warm_up, name="encoder-warm-up", daemon=True)
        self.warm_up.start()
        return self.warm_up

    # -- RPCs -------------------------------------------------------------------------------------------------

    def CreateScene(self, request, context):
        with structlog.contextvars.bound_contextvars(job_id=request.job_id):
            try:
                if not request.job_id:
                    raise InvalidArgument("a job id is required", "job_id")
                lease_s = self._lease(request.lease_seconds)
                stage = self._new_stage(request)
                stage.use_latent_encoders(self.latent_encoders)
                entry = self.scenes.add(request.job_id, stage, owner=request.owner, lease_s=lease_s)
            except ServiceError as error:
                log.info("create_rejected", code=error.code.name, field=error.field, reason=error.message)
                abort_with(context, error)
            log.info("scene_created", scene_id=entry.scene_id, stage=stage.name, step=stage.step_count)
            return scene_pb2.CreateSceneResponse(scene_id=entry.scene_id, step=stage.step_count)

    def RunSteps(self, request, context):
        entry = self._entry(request.scene_id, context)
        with structlog.contextvars.bound_contextvars(job_id=entry.job_id, scene_id=entry.scene_id):
            try:
                if request.num_steps <= 0:
                    raise InvalidArgument(f"must be > 0, got {request.num_steps}", "num_steps")
                if entry.failure:
                    raise FailedPrecondition(f"scene failed earlier: {entry.failure}", "scene_id")
                if not entry.lock.acquire(blocking=False):
                    raise FailedPrecondition("the scene is already running steps", "scene_id")
            except ServiceError as error:
                abort_with(context, error)
            every = max(1, request.progress_every or 1)
            try:
                for index in range(request.num_steps):
                    if not context.is_active():
                        log.info("run_cancelled", step=entry.stage.step_count)
                        return
                    if self.draining.is_set():
                        entry.stage.discard_pending()  # a checkpoint holds whole steps only
                        yield self._drained(entry)
                        raise Unavailable("this scene replica is shutting down; resume from the checkpoint sent")
                    # A guidance outage is retried for the client's outage window; a caller that goes away meanwhile
                    # must not keep the scene busy that long.
                    # Pipelined stages render the next step during this one's guidance, unless it is the run's last.
                    prefetch = index + 1 < request.num_steps and not self.draining.is_set() and context.is_active()
                    with stop_retrying_when(lambda: not context.is_active()):
                        report = entry.stage.step(prefetch=prefetch)
                    entry.renew()
                    if (index + 1) % every == 0 or index + 1 == request.num_steps:
                        log.info("progress", step=report.step, **{f"loss_{k}": round(v, 5) for k, v in report.losses.items()})
                        yield scene_pb2.RunStepsResponse(
                            step=report.step,
                            losses=report.losses,
                            phase_seconds=report.phase_seconds,
                            skipped_steps=report.skipped_total,
                        )
            except NonFiniteStepsExceeded as error:
                entry.failure = error.message
                log.warning("scene_failed", reason=error.message)
                abort_with(context, error)
            except ServiceError as error:  # guidance down for its outage window, bad prior, ...: steps done stay
                if not context.is_active():
                    log.info("run_cancelled", step=entry.stage.step_count, reason=error.message)
                    return
                log.warning("run_interrupted", code=error.code.name, reason=error.message, step=entry.stage.step_count)
                abort_with(context, error)
            finally:
                entry.stage.discard_pending()  # a run ended early (cancelled, drained, failed) leaves nothing in flight
                entry.renew()  # a step that waited out a guidance outage may have outlasted the lease
                entry.lock.release()

    def RenderPreview(self, request, context):
        entry = self._entry(request.scene_id, context)
        try:
            if not request.cameras:
                raise InvalidArgument("give at least one camera", "cameras")
            views = [camera_messages.from_proto(c, f"cameras[{i}]") for i, c in enumerate(request.cameras)]
            side = views[0].height
            if any(v.height != side or v.width != side for v in views) or not 16 <= side <= 1024:
                raise InvalidArgument("cameras must share one square size in [16, 1024]", "cameras")
        except ServiceError as error:
            abort_with(context, error)
        with entry.lock:
            images = entry.stage.render_views(views, side)
        pixels = (images.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8)
        return scene_pb2.RenderPreviewResponse(images=tensors.to_proto(pixels))

    def SaveCheckpoint(self, request, context):
        entry = self._entry(request.scene_id, context)
        with entry.lock:
            uri, step, digest = self._save(entry)
        return scene_pb2.SaveCheckpointResponse(checkpoint_uri=uri, step=step, sha256=digest)

    def _save(self, entry: SceneEntry) -> tuple[str, int, str]:
        """The scene's checkpoint in the store (the caller holds the scene's lock): URI, step, SHA-256."""
        step = entry.stage.step_count
        data = checkpoints.dumps(entry.stage.to_checkpoint())
        key = artifact_keys.checkpoint_key(entry.job_id, entry.stage.name, step)
        self.store.put(key, data)
        uri = self.store.canonical_uri(key)  # stored by the orchestrator: a stable name, never a presigned link
        digest = hashlib.sha256(data).hexdigest()
        log.info("checkpoint_saved", job_id=entry.job_id, step=step, key=key, bytes=len(data), sha256=digest)
        return uri, step, digest

    def _drained(self, entry: SceneEntry) -> scene_pb2.RunStepsResponse:
        uri, step, digest = self._save(entry)
        log.info("scene_drained", job_id=entry.job_id, scene_id=entry.scene_id, step=step)
        return scene_pb2.RunStepsResponse(step=step, checkpoint_uri=uri, checkpoint_sha256=digest)

    def drain(self, timeout_s: float) -> int:
        """Shutdown: scenes running steps stop after their current step and send their checkpoint (see RunSteps);
        waits until none runs, at most `timeout_s`. Returns how many were still busy then."""
        self.draining.set()
        deadline = time.monotonic() + timeout_s
        while (busy := sum(e.busy for e in self.scenes.entries())) and time.monotonic() < deadline:
            time.sleep(0.05)
        log.info("scenes_drained", still_busy=busy)
        return busy

    def ListScenes(self, request, context):
        now = time.monotonic()
        summaries = [
            scene_pb2.SceneSummary(
                scene_id=e.scene_id, job_id=e.job_id, owner=e.owner, stage=_STAGE_FROM_NAME[e.stage.name],
                step=e.stage.step_count, lease_remaining_seconds=max(0.0, e.expires_at - now), busy=e.busy,
            )
            for e in self.scenes.entries()
            if not request.owner or e.owner == request.owner
        ]
        return scene_pb2.ListScenesResponse(scenes=summaries)

    def ExportMesh(self, request, context):
        entry = self._entry(request.scene_id, context)
        with structlog.contextvars.bound_contextvars(job_id=entry.job_id, scene_id=entry.scene_id):
            try:
                formats = _export_formats(request.formats)
                size = request.texture_size or 1024
                if not 16 <= size <= 8192:
                    raise InvalidArgument(f"must be within [16, 8192], got {size}", "texture_size")
                with entry.lock:
                    step = entry.stage.step_count
                    vertices, faces = entry.stage.extract_mesh()
                    exported = export_textured_mesh(vertices, faces, entry.stage.albedo_fn, ExportSettings(texture_size=size))
            except ServiceError as error:
                abort_with(context, error)
            except ValueError as error:  # an empty mesh, a degenerate surface
                abort_with(context, FailedPrecondition(f"cannot export this scene's mesh: {error}", "scene_id"))
            prefix = artifact_keys.export_prefix(entry.job_id, entry.stage.name, step)
            files = []
            for name, data in exported.files.items():
                if _EXPORT_FORMAT_OF.get(name, "any") not in formats | {"any"}:
                    continue
                extension = name.rsplit(".", 1)[-1]
                self.store.put(f"{prefix}/{name}", data, _CONTENT_TYPES.get(extension, "application/octet-stream"))
                files.append(scene_pb2.ExportedFile(name=name, uri=self.store.canonical_uri(f"{prefix}/{name}")))
            log.info("mesh_exported", step=step, faces=exported.faces, watertight=exported.report.watertight)
            return scene_pb2.ExportMeshResponse(
                artifact_uris=[f.uri for f in files], files=files,
                face_count=exported.faces, watertight=exported.report.watertight,
            )

    def GetLimits(self, request, context):
        return scene_pb2.GetLimitsResponse(limits=self.limits.to_proto())

    def DeleteScene(self, request, context):
        try:
            self.scenes.remove(request.scene_id)
        except ServiceError as error:
            abort_with(context, error)
        log.info("scene_deleted", scene_id=request.scene_id)
        return scene_pb2.DeleteSceneResponse()

    # -- helpers ----------------------------------------------------------------------------------------------

    def _lease(self, requested: float) -> float:
        if requested == 0:
            return self.config.default_lease_s
        if not 0 < requested <= self.config.max_lease_s:  # also refuses NaN
            raise InvalidArgument(
                f"must be within (0, {self.config.max_lease_s:g}] seconds (this replica's max_lease_s), got {requested}",
                "lease_seconds",
            )
        return requested

    def _entry(self, scene_id: str, context) -> SceneEntry:
        try:
            return self.scenes.get(scene_id)
        except ServiceError as error:
            abort_with(context, error)

    def _coarse_config(self, message: scene_pb2.StageConfig) -> CoarseConfig:
        config = own_prompt(coarse_config_from_proto(message, self.defaults), message)
        check_hash_table(config.hash_table_bytes(), self.limits, "config.hash_grid")
        if config.field.backend != "auto":
            try:
                ENCODINGS.find(config.field.backend)
            except UnknownKind as error:
                raise error.invalid_argument("config.encoding_backend") from None
        return config

    def _fine_config(self, message: scene_pb2.StageConfig) -> FineConfig:
        config = own_prompt(fine_config_from_proto(message, self.fine_defaults), message)
        if config.dmtet.grid_cells > self.limits.max_grid_cells:  # the default's, when the request sets none
            raise InvalidArgument(
                f"{config.dmtet.grid_cells} cells per side is over this service's limit of {self.limits.max_grid_cells}",
                "config.dmtet.grid_cells",
            )
        return config

    def _new_stage(self, request: scene_pb2.CreateSceneRequest) -> Stage:
        """A new coarse scene, a resumed one (coarse or fine), or a fine scene converted from a coarse checkpoint."""
        wanted = request.config.stage
        defaults = self.fine_defaults if wanted == scene_pb2.STAGE_FINE else self.defaults
        check_stage_config(request.config, self.limits, "config", (defaults.t_min, defaults.t_max))
        if request.config.HasField("reference"):
            check_reference(request.config.reference, self.limits, "config.reference")
        if request.init_mesh:
            return self._fine_from_mesh(request)
        if not request.init_checkpoint_uri:
            if wanted == scene_pb2.STAGE_FINE:
                raise InvalidArgument("the fine stage starts from a coarse checkpoint: give its URI", "init_checkpoint_uri")
            return CoarseStage(self._coarse_config(request.config), self.guidance, request.job_id, self.device)
        checkpoint = self._load_checkpoint(request.init_checkpoint_uri, request.init_checkpoint_sha256)
        if wanted == scene_pb2.STAGE_FINE and checkpoint.stage == "coarse":
            config = self._fine_config(request.config)  # validated before the coarse field is even built
            coarse = CoarseStage.from_checkpoint(checkpoint, self.guidance, request.job_id, self.device)
            try:
                fine, report = FineStage.from_coarse(coarse, config, self.guidance, request.job_id, self.device)
            except ServiceError as error:  # e.g. no surface at the level tried: name the request's field
                raise type(error)(error.message, f"config.{error.field}" if error.field else None) from None
            log.info(
                "fine_stage_converted", level=round(report.level, 4), level_chosen=report.level_chosen,
                silhouette_iou=round(report.silhouette_iou, 4), removed_vertices=report.removed_vertices,
                faces=report.faces,
            )
            return fine
        if wanted not in (scene_pb2.STAGE_UNSPECIFIED, _STAGE_FROM_NAME.get(checkpoint.stage)):
            raise FailedPrecondition(
                f"{request.init_checkpoint_uri} holds a {checkpoint.stage} scene; it cannot start a "
                f"{scene_pb2.Stage.Name(wanted)} scene",
                "init_checkpoint_uri",
            )
        if checkpoint.stage == "fine":
            return FineStage.from_checkpoint(checkpoint, self.guidance, request.job_id, self.device)
        resumed = CoarseStage.from_checkpoint(checkpoint, self.guidance, request.job_id, self.device)
        if request.config.prompt and request.config.prompt != resumed.config.prompt:
            # Another prompt on a coarse checkpoint: prompt-based editing, the fitted scene fine-tuned from step 0.
            resumed.retarget(request.config.prompt, request.config.negative_prompt)
            log.info("coarse_stage_retargeted", prompt=request.config.prompt)
        return resumed

    def _fine_from_mesh(self, request: scene_pb2.CreateSceneRequest) -> FineStage:
        if request.config.stage != scene_pb2.STAGE_FINE or request.init_checkpoint_uri:
            raise InvalidArgument("a mesh starts a fine-stage scene (config.stage = STAGE_FINE), alone", "init_mesh")
        config = self._fine_config(request.config)
        check_mesh_bytes(request.init_mesh, request.init_mesh_format, self.limits.max_mesh_faces, "init_mesh", "init_mesh_format")
        try:
            mesh = load_mesh_bytes(request.init_mesh, request.init_mesh_format or "glb")
        except Exception:  # noqa: BLE001 - any parse failure means an unreadable upload (its text names temp paths)
            raise InvalidArgument("unreadable mesh", "init_mesh") from None
        stage, report = FineStage.from_mesh(mesh.vertices, mesh.faces, config, self.guidance, request.job_id, self.device)
        log.info("fine_stage_from_mesh", faces=report.faces, uploaded_faces=int(mesh.faces.shape[0]))
        return stage

    def _load_checkpoint(self, uri: str, sha256: str) -> Checkpoint:
        """Only a checkpoint whose digest the caller recorded when it was saved: a file written into the store by
        anyone else, or damaged since, is refused."""
        if not sha256:
            raise InvalidArgument("give the SHA-256 recorded when the checkpoint was saved", "init_checkpoint_sha256")
        try:
            data = self.store.get(self.store.key_from_uri(uri))
        except (ArtifactNotFound, ValueError):
            raise NotFound(f"no checkpoint at {uri}", "init_checkpoint_uri") from None
        if hashlib.sha256(data).hexdigest() != sha256.lower():
            raise FailedPrecondition(
                f"the checkpoint at {uri} does not match its recorded SHA-256 (damaged or replaced)",
                "init_checkpoint_sha256",
            )
        try:
            return checkpoints.loads(data, source=uri)
        except ServiceError as error:  # corrupt, foreign or of another format version: name the request field
            raise type(error)(error.message, "init_checkpoint_uri") from None


_STAGE_FROM_NAME = {"coarse": scene_pb2.STAGE_COARSE, "fine": scene_pb2.STAGE_FINE}
# Which requested format needs each exported file (the texture and previews always come).
_EXPORT_FORMAT_OF = {"model.glb": "glb", "model.obj": "obj", "model.mtl": "obj"}
_CONTENT_TYPES = {"glb": "model/gltf-binary", "obj": "text/plain", "mtl": "text/plain", "png": "image/png", "gif": "image/gif"}


def own_prompt(config, message: scene_pb2.StageConfig):
    """The request's own prompt, never the service's placeholder default: an image-only stage (every prior
    image-conditioned, or a reference view) may have none; any other is refused. An image-input prior needs the
    stage's reference view."""
    for index, term in enumerate(config.priors):
        if term.input == "image" and config.reference is None:
            raise InvalidArgument("an image-input prior needs the stage's reference view (config.reference)",
                                  f"config.priors[{index}].input")
    if message.prompt:
        return config
    if config.needs_prompt():
        raise InvalidArgument("a prompt is required unless every prior takes the image (input PRIOR_INPUT_IMAGE) "
                              "or the stage has a reference view", "config.prompt")
    return config.model_copy(update={"prompt": ""})


def _export_formats(requested) -> set[str]:
    formats = {f.strip().lower() for f in requested} or {"glb", "obj"}
    unknown = sorted(formats - {"glb", "obj"})
    if unknown:
        raise InvalidArgument(f"unknown formats {unknown}; known: glb, obj", "formats")
    return formats


def _sweep_leases(scenes: SceneTable, every_s: float, stop: threading.Event) -> None:
    while not stop.wait(every_s):
        try:
            scenes.reap_expired()
        except Exception:  # noqa: BLE001 - the sweeper must outlive any one surprise
            log.exception("lease_sweep_failed")


def start(
    config: SceneServiceConfig, guidance: Guidance | None = None, store: ArtifactStore | None = None
) -> RunningServer:
    tokens = server_tokens(config.auth.service_tokens(), config.host, config.auth.allow_unauthenticated, "scene")
    guidance = guidance or GuidanceClient(Registry.load(config.registry_path), token=config.auth.service_token())
    servicer = SceneServicer(config, guidance, store or open_store(config.store_uri))
    metrics = start_metrics(servicer.scenes, config.host, config.metrics_port) if config.metrics_port is not None else None
    stopping = threading.Event()
    sweeper = threading.Thread(
        target=_sweep_leases, args=(servicer.scenes, config.lease_sweep_s, stopping), name="lease-sweeper", daemon=True
    )
    sweeper.start()

    def before_stop() -> None:
        if config.checkpoint_on_shutdown:
            servicer.drain(config.drain_timeout_s)

    running = start_server(
        servicer,
        scene_pb2_grpc.add_SceneServiceServicer_to_server,
        SERVICE_NAME,
        f"{config.host}:{config.port}",
        max_workers=config.max_workers,
        max_message_bytes=config.max_message_bytes,
        on_stop=stopping.set,
        before_stop=before_stop,
        tokens=tokens,
        tls=config.tls,
        metrics=metrics,
    )
    servicer.start_encoder_warm_up(stopping)  # after the server started: it never delays serving
    return running


def main() -> None:
    config = config_from_command_line(__doc__.splitlines()[0], SceneServiceConfig.load, SceneServiceConfig, "scene service")
    running = start(config)
    log.info(
        "scene_serving", address=f"{config.host}:{running.port}", capacity=config.capacity, metrics_port=running.metrics_port
    )
    serve_until_signalled(running)


if __name__ == "__main__":
    main()
