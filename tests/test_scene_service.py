"""SceneService over real gRPC on 127.0.0.1, against a standalone analytic guidance server."""

from __future__ import annotations

import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from magic3d.v1 import scene_pb2, scene_pb2_grpc

from services.guidance import standalone
from services.guidance.config import GuidanceConfig, PriorSpec
from services.scene import server as scene_server
from services.scene.server import SceneServiceConfig
from shared import cameras, tensors
from shared.errors import field_violations
from shared.grpcio import free_port, insecure_channel
from shared.guidance_api import PriorKind
from shared.guidance_client import GuidanceClient
from shared.registry import Registry

TINY_DEFAULTS = {
    "prompt": "unset",
    "resolution": 16,
    "batch_size": 2,
    "field": {"encoding": {"n_levels": 4, "log2_hashmap_size": 12, "base_resolution": 8, "per_level_scale": 1.5},
              "backend": "torch", "hidden_width": 16},
    "renderer": {"num_samples_per_ray": 16},
    "occupancy": {"resolution": 8, "step_size": 0.125, "update_every": 2, "warmup_steps": 2},
}

TINY_FINE_DEFAULTS = {
    "prompt": "unset",
    "priors": [{"prior": "analytic"}],
    "resolution": 32,
    "batch_size": 2,
    "dmtet": {"grid_cells": 16, "level_candidates": 6, "level_views": 2, "level_view_resolution": 32},
}


def registry_for(address: str, outage_window_s: float = 10.0) -> Registry:
    return Registry.model_validate(
        {
            "client": {"timeout_s": 10, "outage_window_s": outage_window_s, "initial_backoff_s": 0.05,
                       "max_backoff_s": 0.2},
            "priors": {"analytic": {"kind": "standalone", "address": address}},
        }
    )


@pytest.fixture(scope="module")
def guidance_server():
    config = GuidanceConfig(
        priors=[PriorSpec(name="analytic", kind=PriorKind.ANALYTIC, resolution=16)], port=0, batching={"wait_s": 0}
    )
    running = standalone.start(config)
    yield running
    running.stop(grace=None)


@pytest.fixture(scope="module")
def scene(guidance_server, tmp_path_factory):
    config = SceneServiceConfig(
        port=0, capacity=2, device="cpu", store_uri=str(tmp_path_factory.mktemp("store")),
        coarse_defaults=TINY_DEFAULTS, fine_defaults=TINY_FINE_DEFAULTS, scene_memory_budget_bytes=8 * 2**20,
    )
    client = GuidanceClient(registry_for(guidance_server.address))
    running = scene_server.start(config, guidance=client)
    channel = insecure_channel(running.address)
    yield running, scene_pb2_grpc.SceneServiceStub(channel), channel
    channel.close()
    running.stop(grace=None)
    client.close()


def create(stub, **config) -> scene_pb2.CreateSceneResponse:
    stage = scene_pb2.StageConfig(prompt="a red torus", **config)
    return stub.CreateScene(scene_pb2.CreateSceneRequest(job_id="job-1", config=stage), timeout=30)


def test_create_run_preview_checkpoint_resume_delete(scene):
    running, stub, _ = scene
    created = create(stub, seed=4)
    assert created.step == 0
    updates = list(stub.RunSteps(scene_pb2.RunStepsRequest(scene_id=created.scene_id, num_steps=3, progress_every=1), timeout=60))
    assert [u.step for u in updates] == [1, 2, 3]
    assert {"sds", "orientation", "sparsity", "total"} <= set(updates[-1].losses)
    assert {"render", "guidance", "backward", "optimizer"} <= set(updates[-1].phase_seconds)

    view = cameras.to_proto(cameras.orbit_camera(30.0, 20.0, 2.0, size=24))
    preview = stub.RenderPreview(scene_pb2.RenderPreviewRequest(scene_id=created.scene_id, cameras=[view, view]), timeout=30)
    images = tensors.from_proto(preview.images)
    assert images.shape == (2, 24, 24, 3) and images.dtype == torch.uint8

    saved = stub.SaveCheckpoint(scene_pb2.SaveCheckpointRequest(scene_id=created.scene_id), timeout=30)
    assert saved.step == 3 and saved.checkpoint_uri.startswith("file://")
    assert len(saved.sha256) == 64
    resumed = stub.CreateScene(scene_pb2.CreateSceneRequest(
        job_id="job-1", init_checkpoint_uri=saved.checkpoint_uri, init_checkpoint_sha256=saved.sha256), timeout=30)
    assert resumed.step == 3 and resumed.scene_id != created.scene_id
    for scene_id in (created.scene_id, resumed.scene_id):
        stub.DeleteScene(scene_pb2.DeleteSceneRequest(scene_id=scene_id), timeout=10)
    assert len(running.servicer.scenes) == 0


def test_health(scene):
    running, _, channel = scene
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=scene_server.SERVICE_NAME), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def expect_error(call, code, field):
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    assert field in field_violations(caught.value), field_violations(caught.value)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (dict(resolution=8), "config.resolution"),
        (dict(resolution=2048), "config.resolution"),
        (dict(batch_size=-1), "config.batch_size"),
        (dict(hash_grid=scene_pb2.HashGridSettings(log2_hashmap_size=24, n_levels=16)), "config.hash_grid"),
        (dict(t_min=scene_pb2.Schedule(steps=[5, 1], values=[0.1, 0.2])), "config.t_min"),
        (dict(loss_weights={"smoothness": scene_pb2.Schedule(steps=[0], values=[1.0])}), "config.loss_weights"),
    ],
)
def test_bad_configs_are_invalid_argument_naming_the_field(scene, config, field):
    _, stub, _ = scene
    expect_error(lambda: create(stub, **config), grpc.StatusCode.INVALID_ARGUMENT, field)


def test_bad_requests_and_unknown_scenes(scene):
    _, stub, _ = scene
    expect_error(
        lambda: list(stub.RunSteps(scene_pb2.RunStepsRequest(scene_id="scene-nope", num_steps=1), timeout=10)),
        grpc.StatusCode.NOT_FOUND, "scene_id",
    )
    created = create(stub)
    try:
        expect_error(
            lambda: list(stub.RunSteps(scene_pb2.RunStepsRequest(scene_id=created.scene_id, num_steps=0), timeout=10)),
            grpc.StatusCode.INVALID_ARGUMENT, "num_steps",
        )
        expect_error(
            lambda: stub.CreateScene(scene_pb2.CreateSceneRequest(job_id="j", init_checkpoint_uri="file:///nowhere.ckpt", init_checkpoint_sha256="0" * 64), timeout=10),
            grpc.StatusCode.NOT_FOUND, "init_checkpoint_uri",
        )
        expect_error(
            lambda: stub.CreateScene(scene_pb2.CreateSceneRequest(job_id="j", config=scene_pb2.StageConfig(stage=scene_pb2.STAGE_FINE, prompt="x")), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT, "init_checkpoint_uri",
        )
        expect_error(lambda: stub.DeleteScene(scene_pb2.DeleteSceneRequest(scene_id="scene-nope"), timeout=10), grpc.StatusCode.NOT_FOUND, "scene_id")
        # Capacity 2: one more fits, the next is refused.
        second = create(stub)
        with pytest.raises(grpc.RpcError) as caught:
            create(stub)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        stub.DeleteScene(scene_pb2.DeleteSceneRequest(scene_id=second.scene_id), timeout=10)
        # The service keeps serving after all that.
        assert list(stub.RunSteps(scene_pb2.RunStepsRequest(scene_id=created.scene_id, num_steps=1), timeout=30))[-1].step == 1
    finally:
        stub.DeleteScene(scene_pb2.DeleteSceneRequest(scene_id=created.scene_id), timeout=10)


def test_unreachable_guidance_is_unavailable_and_completed_steps_stay(tmp_path):
    # A port nothing listens on: the client retries with backoff for its outage window, then gives up.
    client = GuidanceClient(registry_for("127.0.0.1:9", outage_window_s=1))
    config = SceneServiceConfig(port=0, device="cpu", store_uri=str(tmp_path), coarse_defaults=TINY_DEFAULTS)
    running = scene_server.start(config, guidance=client)
    channel = insecure_channel(running.address)
    try:
        stub = scene_pb2_grpc.SceneServiceStub(channel)
        created = create(stub)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.RunSteps(scene_pb2.RunStepsRequest(scene_id=created.scene_id, num_steps=2), timeout=60))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "guidance tier unreachable" in field_violations(caught.value)["guidance"]
        saved = stub.SaveCheckpoint(scene_pb2.SaveCheckpointRequest(scene_id=created.scene_id), timeout=10)
        assert saved.step == 0  # no partial step was applied
    finally:
        channel.close()
        running.stop(grace=None)
        client.close()


def test_scenes_are_listed_by_owner_and_idle_ones_expire_with_their_lease(guidance_server, tmp_path):
    config = SceneServiceConfig(port=0, capacity=2, device="cpu", store_uri=str(tmp_path), coarse_defaults=TINY_DEFAULTS,
                                lease_sweep_s=0.2, max_lease_s=60)
    client = GuidanceClient(registry_for(guidance_server.address))
    running = scene_server.start(config, guidance=client)
    channel = insecure_channel(running.address)
    try:
        stub = scene_pb2_grpc.SceneServiceStub(channel)
        stage = scene_pb2.StageConfig(prompt="a red torus")
        short = stub.CreateScene(scene_pb2.CreateSceneRequest(job_id="j-a", config=stage, owner="orch-a", lease_seconds=1.0), timeout=30)
        kept = stub.CreateScene(scene_pb2.CreateSceneRequest(job_id="j-b", config=stage, owner="orch-b", lease_seconds=60), timeout=30)
        mine = stub.ListScenes(scene_pb2.ListScenesRequest(owner="orch-a"), timeout=10).scenes
        assert [(s.scene_id, s.job_id, s.owner) for s in mine] == [(short.scene_id, "j-a", "orch-a")]
        assert 0 < mine[0].lease_remaining_seconds <= 1.0 and not mine[0].busy
        assert len(stub.ListScenes(scene_pb2.ListScenesRequest(), timeout=10).scenes) == 2
        # Using a scene renews its lease: steps for longer than the lease keep it alive.
        for _ in range(3):
            list(stub.RunSteps(scene_pb2.RunStepsRequest(scene_id=short.scene_id, num_steps=1), timeout=30))
            time.sleep(0.5)
        assert short.scene_id in {s.scene_id for s in stub.ListScenes(scene_pb2.ListScenesRequest(), timeout=10).scenes}
        deadline = time.monotonic() + 10  # then left alone: the sweeper deletes it, and only it
        while time.monotonic() < deadline and len(running.servicer.scenes) > 1:
            time.sleep(0.1)
        assert [s.scene_id for s in stub.ListScenes(scene_pb2.ListScenesRequest(), timeout=10).scenes] == [kept.scene_id]
        expect_error(lambda: list(stub.RunSteps(scene_pb2.RunStepsRequest(scene_id=short.scene_id, num_steps=1), timeout=10)),
                     grpc.StatusCode.NOT_FOUND, "scene_id")
        expect_error(lambda: stub.CreateScene(scene_pb2.CreateSceneRequest(job_id="j", config=stage, lease_seconds=61), timeout=10),
                     grpc.StatusCode.INVALID_ARGUMENT, "lease_seconds")
        expect_error(lambda: stub.CreateScene(scene_pb2.CreateSceneRequest(job_id="j", config=stage, lease_seconds=-1), timeout=10),
                     grpc.StatusCode.INVALID_ARGUMENT, "lease_seconds")
    finally:
        channel.close()
        running.stop(grace=None)
        client.close()


def _guidance_on(port: int):
    config = GuidanceConfig(
        priors=[PriorSpec(name="analytic", kind=PriorKind.ANALYTIC, resolution=16)], port=port, batching={"wait_s": 0}
    )
    return standalone.start(config)


def test_guidance_down_past_the_window_keeps_the_steps_done_and_names_guidance(tmp_path):
    port = free_port()
    guidance = _guidance_on(port)
    client = GuidanceClient(registry_for(f"127.0.0.1:{port}", outage_window_s=1))
    running = scene_server.start(
        SceneServiceConfig(port=0, device="cpu", store_uri=str(tmp_path), coarse_defaults=TINY_DEFAULTS), guidance=client
    )
    channel = insecure_channel(running.address)
    try:
        stub = scene_pb2_grpc.SceneServiceStub(channel)
        created = create(stub)
        run = scene_pb2.RunStepsRequest(scene_id=created.scene_id, num_steps=2)
        assert list(stub.RunSteps(run, timeout=60))[-1].step == 2
        guidance.stop(grace=None)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.RunSteps(run, timeout=60))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - start < 10
        assert "guidance tier unreachable for 1 s" in field_violations(caught.value)["guidance"]
        saved = stub.SaveCheckpoint(scene_pb2.SaveCheckpointRequest(scene_id=created.scene_id), timeout=10)
        assert saved.step == 2  # the two steps stay, the failed one left nothing behind
        guidance = _guidance_on(port)  # back: the same scene carries on
        assert list(stub.RunSteps(run, timeout=60))[-1].step == 4
    finally:
        channel.close()
        running.stop(grace=None)
        guidance.stop(grace=None)
        client.close()


def test_a_cancelled_run_does_not_wait_out_the_guidance_outage(tmp_path):
    client = GuidanceClient(registry_for(f"127.0.0.1:{free_port()}", outage_window_s=60))  # nothing listens there
    running = scene_server.start(
        SceneServiceConfig(port=0, device="cpu", store_uri=str(tmp_path), coarse_defaults=TINY_DEFAULTS), guidance=client
    )
    channel = insecure_channel(running.address)
    try:
        stub = scene_pb2_grpc.SceneServiceStub(channel)
        created = create(stub)
        call = stub.RunSteps(scene_pb2.RunStepsRequest(scene_id=created.scene_id, num_steps=1), timeout=60)
        entry = running.servicer.scenes.get(created.scene_id)
        deadline = time.monotonic() + 10
        while not entry.lock.locked() and time.monotonic() < deadline:  # the step is retrying guidance
            time.sleep(0.05)
        assert entry.lock.locked()
        call.cancel()
        cancelled_at = time.monotonic()
        while entry.lock.locked() and time.monotonic() < cancelled_at + 10:
            time.sleep(0.05)
        assert not entry.lock.locked() and time.monotonic() - cancelled_at < 3  # the scene is free again
    finally:
        channel.close()
        running.stop(grace=None)
        client.close()


def test_replica_memory_budget_refuses_what_does_not_fit(guidance_server, tmp_path):
    """Two tiny scenes fit a budget sized for one and a half: the second is RESOURCE_EXHAUSTED, then fits after a delete."""
    client = GuidanceClient(registry_for(guidance_server.address))
    probe = scene_server.start(
        SceneServiceConfig(port=0, device="cpu", store_uri=str(tmp_path), coarse_defaults=TINY_DEFAULTS), guidance=client
    )
    channel = insecure_channel(probe.address)
    stub = scene_pb2_grpc.SceneServiceStub(channel)
    one = probe.servicer.scenes.get(create(stub).scene_id).memory_bytes
    channel.close()
    probe.stop(grace=None)
    config = SceneServiceConfig(
        port=0, device="cpu", store_uri=str(tmp_path), coarse_defaults=TINY_DEFAULTS, memory_budget_bytes=int(1.5 * one)
    )
    running = scene_server.start(config, guidance=client)
    channel = insecure_channel(running.address)
    try:
        stub = scene_pb2_grpc.SceneServiceStub(channel)
        first = create(stub)
        with pytest.raises(grpc.RpcError) as caught:
            create(stub)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "MiB" in caught.value.details()
        stub.DeleteScene(scene_pb2.DeleteSceneRequest(scene_id=first.scene_id), timeout=10)
        create(stub)
    finally:
        channel.close()
        running.stop(grace=None)
        client.close()


def fine_request(checkpoint_uri: str, sha256: str, **config) -> scene_pb2.CreateSceneRequest:
    stage = scene_pb2.StageConfig(stage=scene_pb2.STAGE_FINE, prompt="a red torus", **config)
    return scene_pb2.CreateSceneRequest(
        job_id="job-2", config=stage, init_checkpoint_uri=checkpoint_uri, init_checkpoint_sha256=sha256
    )


def sha256_of(store, uri: str) -> str:
    import hashlib

    return hashlib.sha256(store.get(store.key_from_uri(uri))).hexdigest()


def test_coarse_to_fine_to_textured_glb_and_obj(scene):
    import io

    import trimesh

    running, stub, _ = scene
    coarse = create(stub, seed=5)
    list(stub.RunSteps(scene_pb2.RunStepsRequest(scene_id=coarse.scene_id, num_steps=2), timeout=60))
    coarse_saved = stub.SaveCheckpoint(scene_pb2.SaveCheckpointRequest(scene_id=coarse.scene_id), timeout=30)
    stub.DeleteScene(scene_pb2.DeleteSceneRequest(scene_id=coarse.scene_id), timeout=10)

    fine = stub.CreateScene(fine_request(coarse_saved.checkpoint_uri, coarse_saved.sha256), timeout=60)
    updates = list(stub.RunSteps(scene_pb2.RunStepsRequest(scene_id=fine.scene_id, num_steps=2), timeout=60))
    assert updates[-1].step == 2 and {"sds", "normal_consistency", "laplacian"} <= set(updates[-1].losses)
    assert {"marching_tets", "rasterize", "texture", "guidance", "backward"} <= set(updates[-1].phase_seconds)
    view = cameras.to_proto(cameras.orbit_camera(30.0, 20.0, 2.0, size=24))
    preview = stub.RenderPreview(scene_pb2.RenderPreviewRequest(scene_id=fine.scene_id, cameras=[view]), timeout=30)
    assert tensors.from_proto(preview.images).shape == (1, 24, 24, 3)

    saved = stub.SaveCheckpoint(scene_pb2.SaveCheckpointRequest(scene_id=fine.scene_id), timeout=30)
    assert "/fine/" in saved.checkpoint_uri
    resumed = stub.CreateScene(scene_pb2.CreateSceneRequest(
        job_id="job-2", init_checkpoint_uri=saved.checkpoint_uri, init_checkpoint_sha256=saved.sha256), timeout=30)
    assert resumed.step == 2

    exported = stub.ExportMesh(scene_pb2.ExportMeshRequest(scene_id=resumed.scene_id, texture_size=128), timeout=120)
    names = {f.name for f in exported.files}
    assert names == {"model.glb", "model.obj", "model.mtl", "texture.png", "preview.png", "turntable.gif"}
    assert exported.watertight and exported.face_count > 0
    store = running.servicer.store
    glb = store.get(store.key_from_uri(next(f.uri for f in exported.files if f.name == "model.glb")))
    mesh = trimesh.load(io.BytesIO(glb), file_type="glb", force="mesh")
    assert len(mesh.faces) == exported.face_count and mesh.visual.material.baseColorTexture is not None
    only_glb = stub.ExportMesh(scene_pb2.ExportMeshRequest(scene_id=resumed.scene_id, formats=["glb"], texture_size=64), timeout=120)
    assert {f.name for f in only_glb.files} == {"model.glb", "texture.png", "preview.png", "turntable.gif"}
    expect_error(
        lambda: stub.ExportMesh(scene_pb2.ExportMeshRequest(scene_id=resumed.scene_id, formats=["fbx"]), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT, "formats",
    )
    for scene_id in (fine.scene_id, resumed.scene_id):
        stub.DeleteScene(scene_pb2.DeleteSceneRequest(scene_id=scene_id), timeout=10)


def test_bad_coarse_checkpoints_and_empty_surfaces_are_named(scene):
    from services.scene import checkpoint as checkpoints

    running, stub, _ = scene
    store = running.servicer.store
    coarse = create(stub, seed=6)
    good_uri = stub.SaveCheckpoint(scene_pb2.SaveCheckpointRequest(scene_id=coarse.scene_id), timeout=30).checkpoint_uri
    stub.DeleteScene(scene_pb2.DeleteSceneRequest(scene_id=coarse.scene_id), timeout=10)
    corrupt = store.put("jobs/bad/corrupt.ckpt", b"definitely not a checkpoint")
    good = store.get(store.key_from_uri(good_uri))
    future = checkpoints.loads(good)
    original_version = checkpoints.VERSION
    checkpoints.VERSION = original_version + 1
    try:
        newer = store.put("jobs/bad/newer.ckpt", checkpoints.dumps(future))
    finally:
        checkpoints.VERSION = original_version

    good_sha = sha256_of(store, good_uri)
    expect_error(lambda: stub.CreateScene(fine_request("file:///nowhere/coarse.ckpt", good_sha), timeout=10), grpc.StatusCode.NOT_FOUND, "init_checkpoint_uri")
    expect_error(lambda: stub.CreateScene(fine_request(corrupt, sha256_of(store, corrupt)), timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "init_checkpoint_uri")
    expect_error(lambda: stub.CreateScene(fine_request(newer, sha256_of(store, newer)), timeout=10), grpc.StatusCode.FAILED_PRECONDITION, "init_checkpoint_uri")
    # Only what the caller recorded: no digest, or bytes that differ from it (a flipped bit, a truncated file).
    expect_error(lambda: stub.CreateScene(fine_request(good_uri, ""), timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "init_checkpoint_sha256")
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x01
    tampered = store.put("jobs/bad/flipped.ckpt", bytes(flipped))
    expect_error(lambda: stub.CreateScene(fine_request(tampered, good_sha), timeout=10), grpc.StatusCode.FAILED_PRECONDITION, "init_checkpoint_sha256")
    truncated = store.put("jobs/bad/truncated.ckpt", good[: len(good) // 2])
    expect_error(lambda: stub.CreateScene(fine_request(truncated, good_sha), timeout=10), grpc.StatusCode.FAILED_PRECONDITION, "init_checkpoint_sha256")
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateScene(fine_request(good_uri, good_sha, dmtet=scene_pb2.DMTetSettings(level=1e6)), timeout=30)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "config.dmtet.level" in field_violations(caught.value) and "1e+06" in caught.value.details()
    expect_error(
        lambda: stub.CreateScene(fine_request(good_uri, good_sha, dmtet=scene_pb2.DMTetSettings(grid_cells=100000)), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT, "config.dmtet.grid_cells",
    )
    assert len(running.servicer.scenes) == 0  # nothing half-created
    created = create(stub)  # and the service keeps serving
    stub.DeleteScene(scene_pb2.DeleteSceneRequest(scene_id=created.scene_id), timeout=10)


def test_shutdown_ends_running_steps_with_a_checkpoint_to_resume_from(guidance_server, tmp_path):
    import hashlib
    import threading

    config = SceneServiceConfig(port=0, device="cpu", store_uri=str(tmp_path), coarse_defaults=TINY_DEFAULTS)
    client = GuidanceClient(registry_for(guidance_server.address))
    running = scene_server.start(config, guidance=client)
    channel = insecure_channel(running.address)
    updates, errors = [], []
    try:
        stub = scene_pb2_grpc.SceneServiceStub(channel)
        created = stub.CreateScene(scene_pb2.CreateSceneRequest(job_id="job-drain", config=scene_pb2.StageConfig(prompt="a red torus")), timeout=30)
        call = stub.RunSteps(scene_pb2.RunStepsRequest(scene_id=created.scene_id, num_steps=10_000), timeout=120)

        def consume():
            try:
                updates.extend(call)
            except grpc.RpcError as error:
                errors.append(error)

        reader = threading.Thread(target=consume)
        reader.start()
        while not updates:
            time.sleep(0.01)
        running.stop(grace=None)  # what SIGTERM does
        reader.join(timeout=60)
    finally:
        channel.close()
        running.stop(grace=None)
        client.close()
    assert errors and errors[0].code() == grpc.StatusCode.UNAVAILABLE, errors
    last = updates[-1]
    assert last.checkpoint_uri and 0 < last.step < 10_000 and last.step == updates[-2].step
    data = (tmp_path / f"jobs/job-drain/coarse/step-{last.step:07d}.ckpt").read_bytes()
    assert hashlib.sha256(data).hexdigest() == last.checkpoint_sha256


def test_metrics_report_scenes_and_budget(guidance_server, tmp_path):
    """A replica's /metrics: scenes held against its capacity and memory budget (and, on GPUs, its CUDA memory)."""
    import urllib.request

    config = SceneServiceConfig(
        port=0, metrics_port=0, capacity=3, device="cpu", store_uri=str(tmp_path / "store"),
        coarse_defaults=TINY_DEFAULTS, fine_defaults=TINY_FINE_DEFAULTS, memory_budget_bytes=2**30,
    )
    client = GuidanceClient(registry_for(guidance_server.address))
    running = scene_server.start(config, guidance=client)
    channel = insecure_channel(running.address)
    try:
        stub = scene_pb2_grpc.SceneServiceStub(channel)
        stub.CreateScene(scene_pb2.CreateSceneRequest(job_id="metrics", config=scene_pb2.StageConfig(prompt="a red torus")))
        with urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10) as response:
            samples = dict(
                line.rsplit(" ", 1) for line in response.read().decode().splitlines() if line and not line.startswith("#")
            )
        assert float(samples["magic3d_scene_scenes"]) == 1 and float(samples["magic3d_scene_capacity"]) == 3
        assert 0 < float(samples["magic3d_scene_training_state_bytes"]) <= float(samples["magic3d_scene_memory_budget_bytes"])
    finally:
        channel.close()
        running.stop(grace=None)
        client.close()
