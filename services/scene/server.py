"""SceneService over grpcio: holds many jobs' scenes up to a capacity, runs their steps, checkpoints them.

    python -m services.scene.server --config deploy/config/scene.yaml [--host H] [--port P]

The servicer only translates messages and errors; the optimisation is `services.scene.coarse.CoarseStage`.
It calls the guidance tier itself (logical prior names resolved by the registry), so rendered images never pass
through its caller. Answers grpc.health.v1; JSON logs carry the job id.
"""

from __future__ import annotations

import argparse
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog
import torch
import yaml
from magic3d.v1 import scene_pb2, scene_pb2_grpc
from pydantic import BaseModel, ConfigDict, Field

from services.scene import checkpoint as checkpoints
from services.scene.coarse import CoarseStage, NonFiniteStepsExceeded
from services.scene.config import CoarseConfig
from services.scene.guidance import Guidance
from services.scene.messages import coarse_config_from_proto
from shared import cameras as camera_messages
from shared import logging as project_logging
from shared import tensors
from shared.devices import resolve_device
from shared.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, ServiceError
from shared.grpcio import RunningServer, abort_with, serve_until_signalled, start_server
from shared.guidance_client import GuidanceClient
from shared.registry import Registry
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
    max_message_bytes: int = 64 * 2**20
    max_workers: int = Field(default=16, ge=2)

    @classmethod
    def load(cls, path: str | Path) -> "SceneServiceConfig":
        return cls.model_validate(yaml.safe_load(Path(path).read_text()))


@dataclass
class SceneEntry:
    scene_id: str
    job_id: str
    stage: CoarseStage
    memory_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    failure: str | None = None


def training_state_bytes(stage: CoarseStage) -> int:
    """Parameters plus Adam's two moments: the part of a scene's memory that grows with its configuration."""
    return 3 * sum(p.numel() * p.element_size() for p in stage.field.parameters())


class SceneTable:
    """The scenes this replica holds, within a count and a memory budget; thread-safe."""

    def __init__(self, capacity: int, memory_budget_bytes: int) -> None:
        self.capacity = capacity
        self.memory_budget_bytes = memory_budget_bytes
        self._entries: dict[str, SceneEntry] = {}
        self._lock = threading.Lock()

    def add(self, job_id: str, stage: CoarseStage) -> SceneEntry:
        needed = training_state_bytes(stage)
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
            entry = SceneEntry(f"scene-{uuid.uuid4().hex[:12]}", job_id, stage, needed)
            self._entries[entry.scene_id] = entry
            return entry

    def get(self, scene_id: str) -> SceneEntry:
        with self._lock:
            if scene_id not in self._entries:
                raise NotFound(f"no scene {scene_id!r} on this replica", "scene_id")
            return self._entries[scene_id]

    def remove(self, scene_id: str) -> None:
        with self._lock:
            if self._entries.pop(scene_id, None) is None:
                raise NotFound(f"no scene {scene_id!r} on this replica", "scene_id")

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

    # -- RPCs -------------------------------------------------------------------------------------------------

    def CreateScene(self, request, context):
        with structlog.contextvars.bound_contextvars(job_id=request.job_id):
            try:
                if not request.job_id:
                    raise InvalidArgument("a job id is required", "job_id")
                if request.init_checkpoint_uri:
                    stage = self._stage_from_checkpoint(request.init_checkpoint_uri, request.job_id)
                else:
                    stage = CoarseStage(self._coarse_config(request.config), self.guidance, request.job_id, self.device)
                entry = self.scenes.add(request.job_id, stage)
            except ServiceError as error:
                log.info("create_rejected", code=error.code.name, field=error.field, reason=error.message)
                abort_with(context, error)
            log.info("scene_created", scene_id=entry.scene_id, step=stage.step_count)
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
                    report = entry.stage.step()
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
            except ServiceError as error:  # guidance unreachable after its retries, bad prior, ...: steps done stay
                log.warning("run_interrupted", code=error.code.name, reason=error.message, step=entry.stage.step_count)
                abort_with(context, error)
            finally:
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
            step = entry.stage.step_count
            data = checkpoints.dumps(entry.stage.to_checkpoint())
        uri = self.store.put(f"jobs/{entry.job_id}/coarse/step-{step:07d}.ckpt", data)
        log.info("checkpoint_saved", job_id=entry.job_id, step=step, uri=uri, bytes=len(data))
        return scene_pb2.SaveCheckpointResponse(checkpoint_uri=uri, step=step)

    def ExportMesh(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "mesh export comes with the fine stage")

    def DeleteScene(self, request, context):
        try:
            self.scenes.remove(request.scene_id)
        except ServiceError as error:
            abort_with(context, error)
        log.info("scene_deleted", scene_id=request.scene_id)
        return scene_pb2.DeleteSceneResponse()

    # -- helpers ----------------------------------------------------------------------------------------------

    def _entry(self, scene_id: str, context) -> SceneEntry:
        try:
            return self.scenes.get(scene_id)
        except ServiceError as error:
            abort_with(context, error)

    def _coarse_config(self, message: scene_pb2.StageConfig) -> CoarseConfig:
        config = coarse_config_from_proto(message, self.defaults)
        if not message.prompt:
            raise InvalidArgument("a prompt is required", "config.prompt")
        table = config.hash_table_bytes()
        if table > self.config.scene_memory_budget_bytes:
            raise InvalidArgument(
                f"hash table needs {table / 2**20:.1f} MiB, over this service's budget of "
                f"{self.config.scene_memory_budget_bytes / 2**20:.1f} MiB per scene",
                "config.hash_grid",
            )
        return config

    def _stage_from_checkpoint(self, uri: str, job_id: str) -> CoarseStage:
        try:
            data = self.store.get(self.store.key_from_uri(uri))
        except (ArtifactNotFound, ValueError):
            raise NotFound(f"no checkpoint at {uri}", "init_checkpoint_uri") from None
        return CoarseStage.from_checkpoint(checkpoints.loads(data, source=uri), self.guidance, job_id, self.device)


def start(
    config: SceneServiceConfig, guidance: Guidance | None = None, store: ArtifactStore | None = None
) -> RunningServer:
    guidance = guidance or GuidanceClient(Registry.load(config.registry_path))
    servicer = SceneServicer(config, guidance, store or open_store(config.store_uri))
    return start_server(
        servicer,
        scene_pb2_grpc.add_SceneServiceServicer_to_server,
        SERVICE_NAME,
        f"{config.host}:{config.port}",
        max_workers=config.max_workers,
        max_message_bytes=config.max_message_bytes,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="scene service YAML (default: built-in defaults)")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args()
    project_logging.configure()
    config = SceneServiceConfig.load(args.config) if args.config else SceneServiceConfig()
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    config = config.model_copy(update=overrides)
    running = start(config)
    log.info("scene_serving", address=f"{config.host}:{running.port}", capacity=config.capacity)
    serve_until_signalled(running)


if __name__ == "__main__":
    main()
