"""Every RPC of the three services against bad input, over real gRPC on 127.0.0.1: each case gets its status code
and names the field at fault (google.rpc.BadRequest), no reply carries a traceback, a path or a pid, messages are
bounded, and afterwards every server still serves. One stack per module: a standalone analytic guidance server, a
scene service with small published limits, and an orchestrator that checks jobs against them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
import pytest
import torch
import trimesh
import yaml
from google.protobuf import timestamp_pb2
from magic3d.v1 import (
    guidance_pb2,
    guidance_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    scene_pb2,
    scene_pb2_grpc,
)

from services.guidance import standalone
from services.guidance.config import GuidanceConfig, PriorSpec
from services.orchestrator import server as orchestrator_server
from services.scene import server as scene_server
from shared import guidance_api, cameras, tensors
from shared.errors import MAX_MESSAGE_CHARS, field_violations
from shared.grpcio import insecure_channel
from shared.guidance_api import PriorKind, SdsRequest
from shared.guidance_client import GuidanceClient
from shared.meshes import torus
from shared.registry import Registry

pytestmark = pytest.mark.timeout(120)

REPO = str(Path(__file__).resolve().parents[1])
NAN, INF = float("nan"), float("inf")
COARSE, FINE = scene_pb2.STAGE_COARSE, scene_pb2.STAGE_FINE
LONG = "x" * 10_000  # a 10 KB id echoed into a message must not overflow the trailer

PRESETS = {
    "default": "tiny",
    "presets": {
        "tiny": {
            "checkpoint_every": 2,
            "progress_every": 1,
            "stages": [
                {"stage": "coarse", "steps": 2, "config": {"resolution": 16, "batchSize": 2, "samplesPerRay": 16,
                                                            "priors": [{"prior": "analytic"}]}},
                {"stage": "fine", "steps": 2, "config": {"resolution": 32, "batchSize": 2, "priors": [{"prior": "analytic"}],
                                                          "dmtet": {"gridCells": 16}}},
            ],
            "export": {"texture_size": 64},
        },
        "image-tiny": {
            "checkpoint_every": 2,
            "progress_every": 1,
            "image": {"elevation_deg": 20.0, "distance": 1.8, "fovy_deg": 40.0},
            "stages": [
                {"stage": "coarse", "steps": 2, "reference": {"resolution": 16},
                 "config": {"resolution": 16, "batchSize": 2, "samplesPerRay": 16,
                            "priors": [{"prior": "analytic", "input": "PRIOR_INPUT_IMAGE"},
                                       {"prior": "analytic", "input": "PRIOR_INPUT_TEXT"}]}},
            ],
        },
    },
}
COARSE_DEFAULTS = {
    "prompt": "unset", "resolution": 16, "batch_size": 2,
    "field": {"encoding": {"n_levels": 4, "log2_hashmap_size": 12, "base_resolution": 8, "per_level_scale": 1.5},
              "backend": "torch", "hidden_width": 16},
    "renderer": {"num_samples_per_ray": 16},
    "occupancy": {"resolution": 8, "step_size": 0.125, "update_every": 2, "warmup_steps": 2},
}
FINE_DEFAULTS = {"prompt": "unset", "priors": [{"prior": "analytic"}], "resolution": 32, "batch_size": 2,
                 "dmtet": {"grid_cells": 16, "level_candidates": 6, "level_views": 2, "level_view_resolution": 32}}
# Published by the scene service (GetLimits) and applied by the orchestrator at submit.
SCENE_LIMITS = dict(max_resolution=128, max_batch_size=8, max_samples_per_ray=64, max_grid_cells=32,
                    scene_memory_budget_bytes=8 * 2**20, max_mesh_faces=1000)
ORCHESTRATOR_MESH_FACES = 500


@dataclass
class Stubs:
    guidance: guidance_pb2_grpc.GuidanceServiceStub
    scene: scene_pb2_grpc.SceneServiceStub
    orchestrator: orchestrator_pb2_grpc.OrchestratorServiceStub
    scene_id: str


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "presets.yaml").write_text(yaml.safe_dump(PRESETS))
    guidance = standalone.start(GuidanceConfig(
        priors=[PriorSpec(name="analytic", kind=PriorKind.ANALYTIC, resolution=16)], port=0, batching={"wait_s": 0}
    ))
    registry = Registry.model_validate({"priors": {"analytic": {"kind": "standalone", "address": guidance.address}}})
    clients = [GuidanceClient(registry), GuidanceClient(registry)]
    scene = scene_server.start(scene_server.SceneServiceConfig(
        port=0, capacity=3, device="cpu", store_uri=str(root / "store"), coarse_defaults=COARSE_DEFAULTS,
        fine_defaults=FINE_DEFAULTS, checkpoint_on_shutdown=False, **SCENE_LIMITS,
    ), guidance=clients[0])
    orchestrator = orchestrator_server.start(orchestrator_server.OrchestratorConfig(
        port=0, database_path=root / "jobs.db", store_uri=str(root / "store"), scene_replicas=[scene.address],
        presets_path=root / "presets.yaml", max_mesh_faces=ORCHESTRATOR_MESH_FACES,
    ), priors=clients[1])
    channels = [insecure_channel(s.address) for s in (guidance, scene, orchestrator)]
    scene_stub = scene_pb2_grpc.SceneServiceStub(channels[1])
    created = scene_stub.CreateScene(scene_pb2.CreateSceneRequest(
        job_id="bad-inputs", config=scene_pb2.StageConfig(prompt="a red torus")), timeout=30)
    yield Stubs(
        guidance_pb2_grpc.GuidanceServiceStub(channels[0]), scene_stub,
        orchestrator_pb2_grpc.OrchestratorServiceStub(channels[2]), created.scene_id,
    )
    for channel in channels:
        channel.close()
    orchestrator.stop(grace=None)
    scene.stop(grace=None)
    guidance.stop(grace=None)
    for client in clients:
        client.close()


# -- request builders ----------------------------------------------------------------------------------------------


def sds(**fields) -> guidance_pb2.ComputeSdsRequest:
    views = [cameras.to_proto(cameras.orbit_camera(az, 20.0, 2.0, size=16)) for az in (0.0, 90.0)]
    request = SdsRequest(job_id="bad", prior="analytic", images=torch.rand(2, 3, 16, 16), prompt="a red torus", seed=1)
    message = guidance_api.sds_request_to_proto(request)
    message.cameras.extend(views)
    for key, value in fields.items():
        if value is None:
            message.ClearField(key)
        elif isinstance(value, guidance_pb2.TimeRange | guidance_pb2.ExplicitTimes):
            getattr(message, key).CopyFrom(value)
        else:
            setattr(message, key, value)
    return message


def check(**fields) -> guidance_pb2.CheckPromptRequest:
    return guidance_pb2.CheckPromptRequest(**{"prior": "analytic", "prompt": "a red torus", **fields})


def schedule(*values: float, steps: tuple[int, ...] | None = None) -> scene_pb2.Schedule:
    return scene_pb2.Schedule(steps=list(steps or range(0, 100 * len(values), 100)), values=list(values))


def stage(**fields) -> scene_pb2.StageConfig:
    loss = fields.pop("loss", None)
    config = scene_pb2.StageConfig(**{"prompt": "a red torus", **fields})
    if loss is not None:
        config.loss_weights[loss[0]].CopyFrom(loss[1])
    return config


def create(**fields) -> scene_pb2.CreateSceneRequest:
    config = fields.pop("config", stage())
    return scene_pb2.CreateSceneRequest(**{"job_id": "bad", "config": config, **fields})


def mesh_bytes(vertices, faces, file_type: str = "glb") -> bytes:
    data = trimesh.Trimesh(vertices, faces, process=False).export(file_type=file_type)
    return data.encode() if isinstance(data, str) else data


def torus_glb(segments: int, minor: int) -> bytes:
    mesh = torus(0.32, 0.12, segments=segments, minor_segments=minor)
    return mesh_bytes(mesh.vertices.numpy(), mesh.faces.numpy())


PLANE = mesh_bytes([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], [[0, 1, 2], [0, 2, 3]])
TRIANGLE = mesh_bytes([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]])
NAN_OBJ = b"v nan 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nf 1 2 3\nf 1 3 4\nf 1 2 4\nf 2 3 4\n"
SMALL_TORUS = torus_glb(16, 8)  # 256 faces: within every limit
MID_TORUS = torus_glb(24, 12)  # 576 faces: over the orchestrator's 500, within the scene's 1000
BIG_TORUS = torus_glb(48, 24)  # 2304 faces: over the scene's 1000


def job(**fields) -> orchestrator_pb2.SubmitJobRequest:
    """A text job of the tiny preset; `overrides` are (stage, StageConfig fields) pairs."""
    spec = orchestrator_pb2.JobSpec(preset=fields.pop("preset", "tiny"), seed=1)
    kind = fields.pop("kind", "text")
    getattr(spec, kind).prompt = fields.pop("prompt", "a red torus")
    for name, config in fields.pop("overrides", []):
        spec.overrides.add(config=scene_pb2.StageConfig(stage={"coarse": COARSE, "fine": FINE}[name], **config))
    if "mesh" in fields:
        spec.mesh.mesh, spec.mesh.format = fields.pop("mesh"), fields.pop("format", "glb")
    if "deadline" in fields:
        spec.deadline.CopyFrom(fields.pop("deadline"))
    if "source" in fields:
        spec.edit.source_job_id = fields.pop("source")
    for key, value in fields.items():
        setattr(spec, key, value)
    return orchestrator_pb2.SubmitJobRequest(spec=spec)


def image_job(prompt: str = "", **fields) -> orchestrator_pb2.SubmitJobRequest:
    """An image job of the image-tiny preset: a red square on white, unless `fields` change it."""
    import numpy as np

    from shared.image_input import array_to_proto, encode_png

    pixels = np.full((40, 40, 3), 255, np.uint8)
    pixels[10:30, 12:28] = (200, 30, 30)
    spec = orchestrator_pb2.JobSpec(preset=fields.pop("preset", "image-tiny"), seed=1)
    spec.image.prompt = prompt
    pixels = fields.pop("pixels", pixels)
    if fields.pop("png", False):
        spec.image.encoded = encode_png(pixels)
    elif pixels is not None:
        spec.image.image.CopyFrom(array_to_proto(pixels))
    if "depth" in fields:
        spec.image.depth.CopyFrom(array_to_proto(fields.pop("depth")))
    for name, config in fields.pop("overrides", []):
        spec.overrides.add(config=scene_pb2.StageConfig(stage={"coarse": COARSE, "fine": FINE}[name], **config))
    for key, value in fields.items():
        setattr(spec.image, key, value)
    return orchestrator_pb2.SubmitJobRequest(spec=spec)


def _image(shape, value=255):
    import numpy as np

    return np.full(shape, value, np.uint8)


def override_loss(name: str, loss: str, values) -> tuple[str, dict]:
    return name, {"loss_weights": {loss: scene_pb2.Schedule(steps=list(range(len(values))), values=list(values))}}


def prior(**fields) -> list[scene_pb2.PriorTerm]:
    return [scene_pb2.PriorTerm(**{"prior": "analytic", **fields})]


# -- the table -----------------------------------------------------------------------------------------------------

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
G = lambda method, request: lambda s: getattr(s.guidance, method)(request, timeout=30)  # noqa: E731
S = lambda method, request: lambda s: _drain(getattr(s.scene, method)(request(s) if callable(request) else request, timeout=30))  # noqa: E731
O = lambda method, request: lambda s: _drain(getattr(s.orchestrator, method)(request, timeout=30))  # noqa: E731


def _drain(reply):
    return list(reply) if hasattr(reply, "__iter__") and not hasattr(reply, "ListFields") else reply


def on_scene(make):
    """A request about the module's scene (its id is known only once the stack runs)."""
    return lambda s: make(s.scene_id)


CASES: list[tuple[str, Callable, grpc.StatusCode, str]] = [
    # GuidanceService.ComputeSds
    ("sds: unknown prior", G("ComputeSds", sds(prior="sd-99")), NOT_FOUND, "prior"),
    ("sds: unknown checkpoint", G("ComputeSds", sds(checkpoint_id="nope")), NOT_FOUND, "checkpoint_id"),
    ("sds: no images", G("ComputeSds", sds(images=None)), INVALID, "images"),
    ("sds: t range outside (0, 1)", G("ComputeSds", sds(time_range=guidance_pb2.TimeRange(min=0.1, max=1.5))), INVALID, "time_range"),
    ("sds: t min > max", G("ComputeSds", sds(time_range=guidance_pb2.TimeRange(min=0.8, max=0.2))), INVALID, "time_range.min"),
    ("sds: t range NaN", G("ComputeSds", sds(time_range=guidance_pb2.TimeRange(min=NAN, max=0.5))), INVALID, "time_range"),
    ("sds: explicit t count", G("ComputeSds", sds(explicit_times=guidance_pb2.ExplicitTimes(t=[0.5]))), INVALID, "explicit_times.t"),
    ("sds: explicit t NaN", G("ComputeSds", sds(explicit_times=guidance_pb2.ExplicitTimes(t=[0.5, NAN]))), INVALID, "explicit_times.t"),
    ("sds: guidance scale NaN", G("ComputeSds", sds(guidance_scale=NAN)), INVALID, "guidance_scale"),
    ("sds: guidance scale Inf", G("ComputeSds", sds(guidance_scale=INF)), INVALID, "guidance_scale"),
    ("sds: guidance scale < 0", G("ComputeSds", sds(guidance_scale=-1.0)), INVALID, "guidance_scale"),
    ("sds: blank prompt", G("ComputeSds", sds(prompt=" ")), INVALID, "prompt"),
    ("sds: long prompt", G("ComputeSds", sds(prompt="word " * 500)), INVALID, "prompt"),
    # GuidanceService.CheckPrompt
    ("check: unknown prior", G("CheckPrompt", check(prior="sd-99")), NOT_FOUND, "prior"),
    ("check: long prior name", G("CheckPrompt", check(prior=LONG)), NOT_FOUND, "prior"),
    ("check: unknown checkpoint", G("CheckPrompt", check(checkpoint_id="nope")), NOT_FOUND, "checkpoint_id"),
    ("check: blank prompt", G("CheckPrompt", check(prompt="  ")), INVALID, "prompt"),
    ("check: long prompt", G("CheckPrompt", check(prompt="word " * 500)), INVALID, "prompt"),
    ("check: long negative prompt", G("CheckPrompt", check(negative_prompt="word " * 500)), INVALID, "negative_prompt"),
    # SceneService.CreateScene
    ("create: no job id", S("CreateScene", create(job_id="")), INVALID, "job_id"),
    ("create: no prompt", S("CreateScene", create(config=stage(prompt=""))), INVALID, "config.prompt"),
    ("create: resolution over limit", S("CreateScene", create(config=stage(resolution=4096))), INVALID, "config.resolution"),
    ("create: negative resolution", S("CreateScene", create(config=stage(resolution=-64))), INVALID, "config.resolution"),
    ("create: batch over limit", S("CreateScene", create(config=stage(batch_size=64))), INVALID, "config.batch_size"),
    ("create: samples over limit", S("CreateScene", create(config=stage(samples_per_ray=4096))), INVALID, "config.samples_per_ray"),
    ("create: hash table over limit", S("CreateScene", create(config=stage(hash_grid=scene_pb2.HashGridSettings(
        n_levels=16, log2_hashmap_size=22)))), INVALID, "config.hash_grid"),
    ("create: t_min NaN", S("CreateScene", create(config=stage(t_min=schedule(NAN)))), INVALID, "config.t_min.values[0]"),
    ("create: t_max >= 1", S("CreateScene", create(config=stage(t_max=schedule(1.2)))), INVALID, "config.t_max.values"),
    ("create: t_min > t_max", S("CreateScene", create(config=stage(t_min=schedule(0.6), t_max=schedule(0.4)))), INVALID, "config.t_min"),
    ("create: t_min > t_max later", S("CreateScene", create(config=stage(t_min=schedule(0.2), t_max=schedule(0.9, 0.1)))),
     INVALID, "config.t_min"),
    ("create: t_max under default t_min", S("CreateScene", create(config=stage(t_max=schedule(0.01)))), INVALID, "config.t_max"),
    ("create: steps not increasing", S("CreateScene", create(config=stage(t_max=schedule(0.5, 0.4, steps=(5, 5))))), INVALID, "config.t_max"),
    ("create: loss weight Inf", S("CreateScene", create(config=stage(loss=("sparsity", schedule(INF))))), INVALID,
     "config.loss_weights[sparsity].values[0]"),
    ("create: unknown loss", S("CreateScene", create(config=stage(loss=("nope", schedule(1.0))))), INVALID, "config.loss_weights"),
    ("create: prior weight NaN", S("CreateScene", create(config=stage(priors=prior(weight=NAN)))), INVALID, "config.priors[0].weight"),
    ("create: guidance scale Inf", S("CreateScene", create(config=stage(priors=prior(guidance_scale=INF)))), INVALID,
     "config.priors[0].guidance_scale"),
    ("create: guidance scale < 0", S("CreateScene", create(config=stage(priors=prior(guidance_scale=-1)))), INVALID,
     "config.priors[0].guidance_scale"),
    ("create: empty prior name", S("CreateScene", create(config=stage(priors=prior(prior="")))), INVALID, "config.priors[0].prior"),
    ("create: learning rate NaN", S("CreateScene", create(config=stage(learning_rate=NAN))), INVALID, "config.learning_rate"),
    ("create: learning rate < 0", S("CreateScene", create(config=stage(learning_rate=-0.1))), INVALID, "config.learning_rate"),
    ("create: camera range NaN", S("CreateScene", create(config=stage(cameras=scene_pb2.CameraSampling(
        distance=guidance_pb2.TimeRange(min=NAN, max=2.0))))), INVALID, "config.cameras.distance.min"),
    ("create: fine without a start", S("CreateScene", create(config=stage(stage=FINE))), INVALID, "init_checkpoint_uri"),
    ("create: fine grid over limit", S("CreateScene", create(config=stage(stage=FINE, dmtet=scene_pb2.DMTetSettings(grid_cells=512)),
                                                            init_mesh=SMALL_TORUS)), INVALID, "config.dmtet.grid_cells"),
    ("create: unknown checkpoint", S("CreateScene", create(init_checkpoint_uri="file:///nowhere/x.ckpt",
                                                           init_checkpoint_sha256="0" * 64)), NOT_FOUND, "init_checkpoint_uri"),
    ("create: checkpoint without digest", S("CreateScene", create(init_checkpoint_uri="file:///nowhere/x.ckpt")),
     INVALID, "init_checkpoint_sha256"),
    ("create: lease NaN", S("CreateScene", create(lease_seconds=NAN)), INVALID, "lease_seconds"),
    ("create: lease too long", S("CreateScene", create(lease_seconds=1e9)), INVALID, "lease_seconds"),
    ("create: flat mesh", S("CreateScene", create(config=stage(stage=FINE), init_mesh=PLANE)), INVALID, "init_mesh"),
    ("create: one triangle", S("CreateScene", create(config=stage(stage=FINE), init_mesh=TRIANGLE)), INVALID, "init_mesh"),
    ("create: NaN vertices", S("CreateScene", create(config=stage(stage=FINE), init_mesh=NAN_OBJ, init_mesh_format="obj")), INVALID, "init_mesh"),
    ("create: unreadable mesh", S("CreateScene", create(config=stage(stage=FINE), init_mesh=b"not a mesh")), INVALID, "init_mesh"),
    ("create: mesh over face limit", S("CreateScene", create(config=stage(stage=FINE), init_mesh=BIG_TORUS)), INVALID, "init_mesh"),
    ("create: mesh format", S("CreateScene", create(config=stage(stage=FINE), init_mesh=SMALL_TORUS, init_mesh_format="stl")),
     INVALID, "init_mesh_format"),
    # SceneService: the other RPCs
    ("run: unknown scene", S("RunSteps", scene_pb2.RunStepsRequest(scene_id="scene-nope", num_steps=1)), NOT_FOUND, "scene_id"),
    ("run: 10 KB scene id", S("RunSteps", scene_pb2.RunStepsRequest(scene_id=LONG, num_steps=1)), NOT_FOUND, "scene_id"),
    ("run: no steps", S("RunSteps", on_scene(lambda i: scene_pb2.RunStepsRequest(scene_id=i, num_steps=0))), INVALID, "num_steps"),
    ("run: negative steps", S("RunSteps", on_scene(lambda i: scene_pb2.RunStepsRequest(scene_id=i, num_steps=-3))), INVALID, "num_steps"),
    ("preview: unknown scene", S("RenderPreview", scene_pb2.RenderPreviewRequest(scene_id="scene-nope")), NOT_FOUND, "scene_id"),
    ("preview: no cameras", S("RenderPreview", on_scene(lambda i: scene_pb2.RenderPreviewRequest(scene_id=i))), INVALID, "cameras"),
    ("preview: camera too large", S("RenderPreview", on_scene(lambda i: scene_pb2.RenderPreviewRequest(
        scene_id=i, cameras=[cameras.to_proto(cameras.orbit_camera(0.0, 20.0, 2.0, size=4096))]))), INVALID, "cameras"),
    ("checkpoint: unknown scene", S("SaveCheckpoint", scene_pb2.SaveCheckpointRequest(scene_id="scene-nope")), NOT_FOUND, "scene_id"),
    ("export: unknown scene", S("ExportMesh", scene_pb2.ExportMeshRequest(scene_id="scene-nope")), NOT_FOUND, "scene_id"),
    ("export: unknown format", S("ExportMesh", on_scene(lambda i: scene_pb2.ExportMeshRequest(scene_id=i, formats=["stl"]))),
     INVALID, "formats"),
    ("export: texture size", S("ExportMesh", on_scene(lambda i: scene_pb2.ExportMeshRequest(scene_id=i, texture_size=-5))),
     INVALID, "texture_size"),
    ("delete: unknown scene", S("DeleteScene", scene_pb2.DeleteSceneRequest(scene_id="scene-nope")), NOT_FOUND, "scene_id"),
    # OrchestratorService.SubmitJob / Generate
    ("submit: no input", O("SubmitJob", orchestrator_pb2.SubmitJobRequest(spec=orchestrator_pb2.JobSpec())), INVALID, "spec.input"),
    ("submit: blank prompt", O("SubmitJob", job(prompt="  ")), INVALID, "spec.text.prompt"),
    ("submit: unknown preset", O("SubmitJob", job(preset="nope")), INVALID, "spec.preset"),
    ("submit: 10 KB preset", O("SubmitJob", job(preset=LONG)), INVALID, "spec.preset"),
    ("submit: deadline out of range", O("SubmitJob", job(deadline=timestamp_pb2.Timestamp(seconds=10**15))), INVALID, "spec.deadline"),
    ("submit: deadline nanos", O("SubmitJob", job(deadline=timestamp_pb2.Timestamp(seconds=4_000_000_000, nanos=-1))),
     INVALID, "spec.deadline"),
    ("submit: deadline passed", O("SubmitJob", job(deadline=timestamp_pb2.Timestamp(seconds=1000))), INVALID, "spec.deadline"),
    ("submit: override stage", O("SubmitJob", orchestrator_pb2.SubmitJobRequest(spec=orchestrator_pb2.JobSpec(
        preset="tiny", text=orchestrator_pb2.TextInput(prompt="a red torus"), overrides=[orchestrator_pb2.StageOverride()]))),
     INVALID, "spec.overrides[0].config.stage"),
    ("submit: negative steps", O("SubmitJob", orchestrator_pb2.SubmitJobRequest(spec=orchestrator_pb2.JobSpec(
        preset="tiny", text=orchestrator_pb2.TextInput(prompt="a red torus"),
        overrides=[orchestrator_pb2.StageOverride(config=scene_pb2.StageConfig(stage=COARSE), steps=-1)]))),
     INVALID, "spec.overrides[0].steps"),
    ("submit: t_min outside (0, 1)", O("SubmitJob", job(overrides=[("coarse", {"t_min": schedule(0.0)})])), INVALID,
     "spec.overrides[0].config.t_min.values"),
    ("submit: t_min > t_max", O("SubmitJob", job(overrides=[("coarse", {"t_min": schedule(0.7), "t_max": schedule(0.3)})])),
     INVALID, "spec.overrides[0].config.t_min"),
    ("submit: t_max under the preset's t_min", O("SubmitJob", job(overrides=[("fine", {"t_max": schedule(0.5, 0.01)})])),
     INVALID, "spec.overrides[0].config.t_max"),
    ("submit: t NaN", O("SubmitJob", job(overrides=[("coarse", {"t_max": schedule(NAN)})])), INVALID,
     "spec.overrides[0].config.t_max.values[0]"),
    ("submit: guidance scale NaN", O("SubmitJob", job(overrides=[("coarse", {"priors": prior(guidance_scale=NAN)})])), INVALID,
     "spec.overrides[0].config.priors[0].guidance_scale"),
    ("submit: prior weight Inf", O("SubmitJob", job(overrides=[("fine", {"priors": prior(weight=-INF)})])), INVALID,
     "spec.overrides[0].config.priors[0].weight"),
    ("submit: empty prior name", O("SubmitJob", job(overrides=[("coarse", {"priors": prior(prior=" ")})])), INVALID,
     "spec.overrides[0].config.priors[0].prior"),
    ("submit: loss weight NaN", O("SubmitJob", job(overrides=[override_loss("coarse", "sparsity", [1.0, NAN])])), INVALID,
     "spec.overrides[0].config.loss_weights[sparsity].values[1]"),
    ("submit: learning rate Inf", O("SubmitJob", job(overrides=[("coarse", {"learning_rate": INF})])), INVALID,
     "spec.overrides[0].config.learning_rate"),
    ("submit: camera range Inf", O("SubmitJob", job(overrides=[("coarse", {"cameras": scene_pb2.CameraSampling(
        fovy_deg=guidance_pb2.TimeRange(min=30, max=INF))})])), INVALID, "spec.overrides[0].config.cameras.fovy_deg.max"),
    ("submit: resolution over limit", O("SubmitJob", job(overrides=[("fine", {"resolution": 512})])), INVALID,
     "spec.overrides[0].config.resolution"),
    ("submit: batch over limit", O("SubmitJob", job(overrides=[("coarse", {"batch_size": 32})])), INVALID,
     "spec.overrides[0].config.batch_size"),
    ("submit: samples over limit", O("SubmitJob", job(overrides=[("coarse", {"samples_per_ray": 128})])), INVALID,
     "spec.overrides[0].config.samples_per_ray"),
    ("submit: fine grid over limit", O("SubmitJob", job(overrides=[("fine", {"dmtet": scene_pb2.DMTetSettings(grid_cells=64)})])),
     INVALID, "spec.overrides[0].config.dmtet.grid_cells"),
    ("submit: hash table over limit", O("SubmitJob", job(overrides=[("coarse", {"hash_grid": scene_pb2.HashGridSettings(
        n_levels=16, log2_hashmap_size=22)})])), INVALID, "spec.overrides[0].config.hash_grid"),
    ("submit: unknown prior", O("SubmitJob", job(overrides=[("coarse", {"priors": prior(prior="sd-99")})])), INVALID,
     "coarse.priors[0].prior"),
    ("submit: mesh flat", O("SubmitJob", job(kind="mesh", mesh=PLANE)), INVALID, "spec.mesh.mesh"),
    ("submit: mesh one triangle", O("SubmitJob", job(kind="mesh", mesh=TRIANGLE)), INVALID, "spec.mesh.mesh"),
    ("submit: mesh NaN", O("SubmitJob", job(kind="mesh", mesh=NAN_OBJ, format="obj")), INVALID, "spec.mesh.mesh"),
    ("submit: mesh over the orchestrator's faces", O("SubmitJob", job(kind="mesh", mesh=MID_TORUS)), INVALID, "spec.mesh.mesh"),
    ("submit: mesh empty", O("SubmitJob", job(kind="mesh", mesh=b"")), INVALID, "spec.mesh.mesh"),
    ("submit: mesh format", O("SubmitJob", job(kind="mesh", mesh=SMALL_TORUS, format="stl")), INVALID, "spec.mesh.format"),
    ("submit: image job, text preset", O("SubmitJob", image_job(preset="tiny")), INVALID, "spec.preset"),
    ("submit: text job, image preset", O("SubmitJob", job(preset="image-tiny")), INVALID, "spec.preset"),
    ("submit: image missing", O("SubmitJob", image_job(pixels=None)), INVALID, "spec.image.image"),
    ("submit: image and encoded", O("SubmitJob", image_job(encoded=b"\x89PNG")), INVALID, "spec.image.encoded"),
    ("submit: image not PNG/JPEG", O("SubmitJob", image_job(pixels=None, encoded=b"GIF89a not really")), INVALID,
     "spec.image.encoded"),
    ("submit: image blank", O("SubmitJob", image_job(pixels=_image((40, 40, 3)))), INVALID, "spec.image.image"),
    ("submit: image blank PNG", O("SubmitJob", image_job(pixels=_image((40, 40, 4), 0), png=True)), INVALID,
     "spec.image.encoded"),
    ("submit: image over the side limit", O("SubmitJob", image_job(pixels=_image((5000, 16, 3)))), INVALID,
     "spec.image.image.shape"),
    ("submit: image 2 channels", O("SubmitJob", image_job(pixels=_image((40, 40, 2)))), INVALID, "spec.image.image.shape"),
    ("submit: image elevation", O("SubmitJob", image_job(elevation_deg=120.0)), INVALID, "spec.image.elevation_deg"),
    ("submit: image elevation NaN", O("SubmitJob", image_job(elevation_deg=NAN)), INVALID, "spec.image.elevation_deg"),
    ("submit: image distance 0", O("SubmitJob", image_job(distance=0.0)), INVALID, "spec.image.distance"),
    ("submit: image fovy 180", O("SubmitJob", image_job(fovy_deg=180.0)), INVALID, "spec.image.fovy_deg"),
    ("submit: image segmenter", O("SubmitJob", image_job(segmenter="rembg")), INVALID, "spec.image.segmenter"),
    ("submit: image depth shape", O("SubmitJob", image_job(depth=__import__("numpy").zeros((8, 8), "float32"))), INVALID,
     "spec.image.depth.shape"),
    ("submit: image prompt names nothing", O("SubmitJob", image_job(prompt="a purple teapot")), INVALID,
     "spec.image.prompt"),
    ("submit: image override sets the reference", O("SubmitJob", image_job(overrides=[("coarse", {
        "reference": scene_pb2.ReferenceView(image=tensors.to_proto(torch.zeros(4, 4, 4, dtype=torch.uint8)))})])),
     INVALID, "spec.overrides[0].config.reference.image"),
    ("submit: text job with a reference", O("SubmitJob", job(overrides=[("coarse", {
        "reference": scene_pb2.ReferenceView(every_steps=2)})])), INVALID, "spec.overrides[0].config.reference"),
    ("submit: unknown edit source", O("SubmitJob", job(kind="edit", source="jobs/nope")), NOT_FOUND, "spec.edit.source_job_id"),
    ("generate: t NaN", O("Generate", orchestrator_pb2.GenerateRequest(spec=job(overrides=[("coarse", {"t_min": schedule(NAN)})]).spec)),
     INVALID, "spec.overrides[0].config.t_min.values[0]"),
    ("generate: bad deadline", O("Generate", orchestrator_pb2.GenerateRequest(
        spec=job(deadline=timestamp_pb2.Timestamp(seconds=-10**13)).spec)), INVALID, "spec.deadline"),
    # OrchestratorService: job operations
    ("get: bad name", O("GetJob", orchestrator_pb2.GetJobRequest(name="job-1")), INVALID, "name"),
    ("get: unknown job", O("GetJob", orchestrator_pb2.GetJobRequest(name="jobs/nope")), NOT_FOUND, "name"),
    ("get: 10 KB name", O("GetJob", orchestrator_pb2.GetJobRequest(name=f"jobs/{LONG}")), NOT_FOUND, "name"),
    ("watch: bad name", O("WatchJob", orchestrator_pb2.WatchJobRequest(name="jobs/a/b")), INVALID, "name"),
    ("watch: unknown job", O("WatchJob", orchestrator_pb2.WatchJobRequest(name="jobs/nope")), NOT_FOUND, "name"),
    ("cancel: bad name", O("CancelJob", orchestrator_pb2.CancelJobRequest(name=LONG)), INVALID, "name"),
    ("cancel: unknown job", O("CancelJob", orchestrator_pb2.CancelJobRequest(name="jobs/nope")), NOT_FOUND, "name"),
    ("delete: bad name", O("DeleteJob", orchestrator_pb2.DeleteJobRequest(name="")), INVALID, "name"),
    ("delete: unknown job", O("DeleteJob", orchestrator_pb2.DeleteJobRequest(name="jobs/nope")), NOT_FOUND, "name"),
    ("list: negative page size", O("ListJobs", orchestrator_pb2.ListJobsRequest(page_size=-1)), INVALID, "page_size"),
    ("list: bad page token", O("ListJobs", orchestrator_pb2.ListJobsRequest(page_token="not-a-token")), INVALID, "page_token"),
]


def test_the_table_covers_every_rpc():
    names = {case[0].split(":")[0] for case in CASES}
    assert {"sds", "check", "create", "run", "preview", "checkpoint", "export", "delete", "submit", "generate", "get",
            "watch", "cancel", "list"} <= names
    assert len(CASES) >= 60


@pytest.mark.parametrize(("call", "code", "field"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_refused_with_its_field(stubs, call, code, field):
    with pytest.raises(grpc.RpcError) as caught:
        call(stubs)
    error = caught.value
    violations = field_violations(error)
    assert error.code() == code, (error.code(), error.details(), violations)
    assert field in violations, (violations, error.details())
    text = error.details() + " ".join(violations.values())
    assert "Traceback" not in text and REPO not in text and "pid" not in text.lower().split(), text
    assert len(error.details()) <= MAX_MESSAGE_CHARS and all(len(v) <= MAX_MESSAGE_CHARS for v in violations.values())


def test_limit_messages_say_the_scene_service_limit(stubs):
    with pytest.raises(grpc.RpcError) as caught:
        O("SubmitJob", job(overrides=[("coarse", {"batch_size": 32})]))(stubs)
    assert "scene service's limit of 8" in caught.value.details() and "max_batch_size" in caught.value.details()


def test_get_limits_publishes_the_configured_limits(stubs):
    limits = stubs.scene.GetLimits(scene_pb2.GetLimitsRequest(), timeout=10).limits
    assert (limits.max_resolution, limits.max_batch_size, limits.max_samples_per_ray, limits.max_grid_cells) == (128, 8, 64, 32)
    assert limits.max_hash_table_bytes == 8 * 2**20 and limits.max_mesh_faces == 1000


def test_every_server_still_serves_after_the_table(stubs):
    assert [p.name for p in stubs.guidance.ListPriors(guidance_pb2.ListPriorsRequest(), timeout=10).priors] == ["analytic"]
    assert stubs.guidance.CheckPrompt(check(), timeout=10).prompt_tokens > 0
    assert list(stubs.guidance.ComputeSds(sds(), timeout=30).grad.shape) == [2, 3, 16, 16]
    view = cameras.to_proto(cameras.orbit_camera(0.0, 20.0, 2.0, size=16))
    images = stubs.scene.RenderPreview(scene_pb2.RenderPreviewRequest(scene_id=stubs.scene_id, cameras=[view]), timeout=30).images
    assert list(images.shape) == [1, 16, 16, 3] and math.prod(images.shape) == len(tensors.from_proto(images).flatten())
    mesh_job = job(kind="mesh", mesh=SMALL_TORUS)  # within every face limit, closed: accepted
    submitted = stubs.orchestrator.SubmitJob(mesh_job, timeout=30).job
    stubs.orchestrator.CancelJob(orchestrator_pb2.CancelJobRequest(name=submitted.name), timeout=10)
    listed = stubs.orchestrator.ListJobs(orchestrator_pb2.ListJobsRequest(page_size=5000), timeout=10).jobs
    assert [j.name for j in listed] == [submitted.name]  # only the good job was ever stored


class _BrokenEngine:
    """Raises what a bug raises: text with a path and a pid, which must stay in the server's log."""

    def list_priors(self):
        raise RuntimeError(f"boom in {REPO}/services/x.py (pid 4242)")

    def check_prompt(self, *args):
        raise KeyError(f"{REPO}/secret")


def test_a_bug_is_internal_with_a_generic_message_and_the_server_keeps_serving():
    from services.guidance.servicer import GuidanceServicer
    from shared.grpcio import INTERNAL_ERROR_MESSAGE, start_server

    running = start_server(GuidanceServicer(_BrokenEngine()), guidance_pb2_grpc.add_GuidanceServiceServicer_to_server,
                           "magic3d.v1.GuidanceService", "127.0.0.1:0", max_workers=2)
    channel = insecure_channel(running.address)
    try:
        stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
        for call in (lambda: stub.ListPriors(guidance_pb2.ListPriorsRequest(), timeout=10),
                     lambda: stub.CheckPrompt(check(), timeout=10)):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.INTERNAL
            assert caught.value.details() == INTERNAL_ERROR_MESSAGE
        with pytest.raises(grpc.RpcError) as caught:  # a servicer's own status still passes through
            stub.ComputeSds(guidance_pb2.ComputeSdsRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prior" in field_violations(caught.value)
    finally:
        channel.close()
        running.stop(grace=None)


def test_service_errors_are_bounded_in_size():
    from shared.errors import NotFound

    status = NotFound(f"no job {'x' * 10_000!r} (and {'y' * 10_000})", "name").to_rpc_status()
    assert len(status.message) <= MAX_MESSAGE_CHARS and status.message.endswith("\u2026")
    assert len(status.SerializeToString()) < 3 * MAX_MESSAGE_CHARS


def test_limits_fall_back_to_the_declared_defaults_when_no_replica_answers():
    import time

    from services.orchestrator.scenes import SceneReplicas
    from shared.grpcio import free_port
    from shared.stage_limits import SceneLimits

    replicas = SceneReplicas([f"127.0.0.1:{free_port()}"], limits_timeout_s=0.5, max_mesh_faces=123)
    started = time.monotonic()
    assert replicas.limits() == SceneLimits(max_mesh_faces=123)
    assert replicas.limits() == SceneLimits(max_mesh_faces=123)  # cooling down: not asked again
    assert time.monotonic() - started < 2.0
    replicas.close()


class _RelayedError(grpc.RpcError):
    """What a client sees of a failed call: a code, details and no status details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return ()


def test_an_internal_error_relayed_through_the_services_names_its_code_once():
    # The guidance tier's INTERNAL reached a job's failure reason as "INTERNAL: INTERNAL: INTERNAL: ..." (GPU run of
    # 2026-12-07): the scene and the orchestrator each added the code's name again.
    from shared.errors import error_from_rpc, with_code_name
    from shared.grpcio import INTERNAL_ERROR_MESSAGE

    heard_by_scene = error_from_rpc(_RelayedError(grpc.StatusCode.INTERNAL, INTERNAL_ERROR_MESSAGE))
    heard_by_orchestrator = error_from_rpc(_RelayedError(heard_by_scene.code, heard_by_scene.message))
    reason = with_code_name(heard_by_orchestrator.code, heard_by_orchestrator.message)
    assert reason == f"INTERNAL: {INTERNAL_ERROR_MESSAGE}"
    assert with_code_name(grpc.StatusCode.UNKNOWN, "boom") == "UNKNOWN: boom"
