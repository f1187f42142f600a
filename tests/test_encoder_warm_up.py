"""The scene service's start-up warm-up of its latent encoder (services/scene/encoder_warm_up.py), on CPU: mode "on"
stands in for "auto" on a CUDA service, a counting torch.compile backend for inductor, and a tiny random-weight latent
prior in process for the guidance tier."""

from __future__ import annotations

import threading
import time

import pytest
import trimesh
from magic3d.v1 import scene_pb2

from services.guidance.config import GuidanceConfig, PriorSpec
from services.guidance.engine import GuidanceEngine
from services.scene import encoder_warm_up, latent_encoders
from services.scene.config import FineConfig
from services.scene.encoder_warm_up import EncoderWarmUpConfig, warm_up_latent_encoder, warm_up_shapes
from services.scene.guidance import InProcessGuidance
from services.scene.latent_encoders import CompiledEncoder, LatentEncoders
from services.scene.server import SceneServiceConfig, SceneServicer
from shared.errors import NotFound, Unavailable
from shared.grpcio import free_port
from shared.guidance_api import PriorKind
from shared.guidance_client import GuidanceClient
from shared.meshes import torus
from shared.registry import Registry
from shared.schedules import Schedule
from shared.store import LocalStore

SIDE = 64
FINE_DEFAULTS = {
    "prompt": "unset", "priors": [{"prior": "sd"}], "resolution": SIDE, "batch_size": 2,
    "guidance_input": "latents", "latent_encoder_compile": "on",
    "dmtet": {"grid_cells": 16, "level_candidates": 8, "level_views": 2, "level_view_resolution": 32},
}


@pytest.fixture(scope="module")
def guidance():
    spec = PriorSpec(name="sd", kind=PriorKind.LATENT, source="random:tiny", device="cpu", dtype="float32",
                     resolution=SIDE)
    guidance = InProcessGuidance(GuidanceEngine(GuidanceConfig(priors=[spec], batching={"wait_s": 0})))
    yield guidance
    guidance.close()


@pytest.fixture
def counted(monkeypatch):
    """LatentEncoders compiling with a counting backend; the encoder builds and compiles it does, counted."""
    counts = {"builds": 0, "compiles": 0}
    build = latent_encoders.build_encoder

    def counting_build(*args, **kwargs):
        counts["builds"] += 1
        return build(*args, **kwargs)

    def counting_backend(graph, example_inputs):
        counts["compiles"] += 1
        return graph.forward

    monkeypatch.setattr(latent_encoders, "build_encoder", counting_build)
    return LatentEncoders(compile_backend=counting_backend), counts


class Context:
    def abort_with_status(self, status):
        raise AssertionError(f"aborted: {status}")


class Recorder:
    """Stands in for the module's structlog logger."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []

    def __getattr__(self, level):
        return lambda event, **fields: self.events.append((level, event, fields))


@pytest.mark.parametrize("pipelined", [False, True])
def test_after_the_warm_up_the_first_fine_step_builds_and_compiles_nothing(tmp_path, guidance, counted, pipelined):
    """The service warms its encoder in a background thread; a fine scene created afterwards through CreateScene
    steps with the encoder built and compiled for its exact input (shape, dtype, device, grad mode): one build and
    one compile in all. Pipelined steps (guidance on a worker thread) use the same key."""
    encoders, counts = counted
    config = SceneServiceConfig(port=0, device="cpu", store_uri=str(tmp_path), warm_latent_encoder={"mode": "on"},
                                fine_defaults=FINE_DEFAULTS | {"pipelined_guidance": pipelined})
    servicer = SceneServicer(config, guidance, LocalStore(tmp_path))
    servicer.latent_encoders = encoders
    thread = servicer.start_encoder_warm_up()
    assert thread is not None and thread.daemon
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert counts == {"builds": 1, "compiles": 1}

    mesh = torus(0.32, 0.12, segments=16, minor_segments=8)
    glb = trimesh.Trimesh(mesh.vertices.numpy(), mesh.faces.numpy(), process=False).export(file_type="glb")
    request = scene_pb2.CreateSceneRequest(
        job_id="first-job", init_mesh=glb,
        config=scene_pb2.StageConfig(stage=scene_pb2.STAGE_FINE, prompt="a red torus"),
    )
    created = servicer.CreateScene(request, Context())
    stage = servicer.scenes.get(created.scene_id).stage
    assert stage.prior_infos.encoders is encoders
    for _ in range(2):
        assert not stage.step(prefetch=True).skipped
    stage.discard_pending()
    assert counts == {"builds": 1, "compiles": 1}  # the job paid neither
    (encoder,) = [e for e in encoders._built.values() if e is not None]
    assert isinstance(encoder, CompiledEncoder) and encoder.compiled


def test_the_warm_up_gives_up_after_its_bound_while_the_guidance_tier_is_down(counted, monkeypatch):
    """Unavailable is retried with backoff until wait_for_guidance_s, then the warm-up logs a warning and returns;
    a tier that comes up within the bound is waited for; an unknown prior or a bug ends it at once; none raises."""
    encoders, counts = counted
    recorder = Recorder()
    monkeypatch.setattr(encoder_warm_up, "log", recorder)
    config = FineConfig.model_validate(FINE_DEFAULTS)

    class Down:
        def __init__(self, failures: int, error: Exception) -> None:
            self.failures, self.error, self.calls = failures, error, 0

        def prior_info(self, name, timeout_s=None):
            self.calls += 1
            if self.calls <= self.failures:
                raise self.error
            raise NotFound("came up, but serves no such prior", "prior")

    down = Down(10**6, Unavailable("guidance tier unreachable", "guidance"))
    began = time.monotonic()
    result = warm_up_latent_encoder(encoders, down, config, "cpu", mode="on", wait_for_guidance_s=0.3,
                                    initial_backoff_s=0.02, max_backoff_s=0.05)
    assert time.monotonic() - began < 2.0
    assert result.status == "skipped" and "still unavailable" in result.reason and down.calls >= 3
    assert ("warning", "encoder_warm_up_skipped") in [(level, event) for level, event, _ in recorder.events]
    assert counts == {"builds": 0, "compiles": 0}

    later = Down(2, Unavailable("starting", "guidance"))  # up after two failures (then: no such prior)
    result = warm_up_latent_encoder(encoders, later, config, "cpu", mode="on", wait_for_guidance_s=5,
                                    initial_backoff_s=0.01)
    assert later.calls == 3 and result.status == "skipped" and "NotFound" in result.reason

    stopping = threading.Event()
    stopping.set()
    result = warm_up_latent_encoder(encoders, Down(10**6, Unavailable("down")), config, "cpu", mode="on",
                                    wait_for_guidance_s=60, stop=stopping)
    assert result.status == "skipped" and "stopping" in result.reason

    result = warm_up_latent_encoder(encoders, Down(10**6, RuntimeError("a bug")), config, "cpu", mode="on")
    assert result.status == "skipped" and "a bug" in result.reason

    # The real client retries an outage for its own window (here 60 s); the warm-up's bound cuts that short.
    registry = Registry.model_validate({
        "client": {"timeout_s": 5, "outage_window_s": 60, "initial_backoff_s": 0.05, "max_backoff_s": 0.2},
        "priors": {"sd": {"kind": "standalone", "address": f"127.0.0.1:{free_port()}"}},  # nothing listens there
    })
    client = GuidanceClient(registry)
    try:
        began = time.monotonic()
        result = warm_up_latent_encoder(encoders, client, config, "cpu", mode="on", wait_for_guidance_s=0.5)
        assert time.monotonic() - began < 3.0
        assert result.status == "skipped" and "still unavailable" in result.reason
    finally:
        client.close()
    assert counts == {"builds": 0, "compiles": 0}


def test_off_does_nothing_and_auto_waits_for_a_cuda_service(tmp_path, counted):
    encoders, counts = counted

    class Untouchable:
        def prior_info(self, name, timeout_s=None):
            raise AssertionError("the guidance tier was asked")

    config = FineConfig.model_validate(FINE_DEFAULTS)
    for mode in ("off", "auto"):  # auto: CUDA only
        result = warm_up_latent_encoder(encoders, Untouchable(), config, "cpu", mode=mode)
        assert result.status == "skipped" and result.reason.startswith(mode)
        service = SceneServiceConfig(port=0, device="cpu", store_uri=str(tmp_path), fine_defaults=FINE_DEFAULTS,
                                     warm_latent_encoder=mode)
        servicer = SceneServicer(service, Untouchable(), LocalStore(tmp_path))
        assert servicer.start_encoder_warm_up() is None and servicer.warm_up is None
    assert counts == {"builds": 0, "compiles": 0}


def test_the_warm_up_config_names_the_shapes_a_fine_stage_renders():
    defaults = FineConfig.model_validate(FINE_DEFAULTS)
    assert warm_up_shapes(EncoderWarmUpConfig().fine_config(defaults)) == [(2, 3, SIDE, SIDE)]
    production = EncoderWarmUpConfig(batch_size=4, resolution=512).fine_config(defaults)
    assert warm_up_shapes(production) == [(4, 3, 512, 512)] and production.priors == defaults.priors
    scheduled = defaults.model_copy(update={"resolution_schedule": Schedule((0, 100, 200), (256, 512, 256))})
    assert warm_up_shapes(scheduled) == [(2, 3, 256, 256), (2, 3, 512, 512)]  # first-rendered order, once each
    assert warm_up_shapes(EncoderWarmUpConfig(resolution=128).fine_config(scheduled)) == [(2, 3, 128, 128)]
    # A bare mode, and YAML's bare off / on (booleans to PyYAML).
    assert SceneServiceConfig.model_validate({"warm_latent_encoder": False}).warm_latent_encoder.mode == "off"
    assert SceneServiceConfig.model_validate({"warm_latent_encoder": "on"}).warm_latent_encoder.mode == "on"
    assert SceneServiceConfig().warm_latent_encoder == EncoderWarmUpConfig(mode="auto")
    with pytest.raises(ValueError):
        EncoderWarmUpConfig(mode="always")
