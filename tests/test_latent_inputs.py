"""Latents over the wire: a latent prior publishes its encoder, a scene runs it and sends latents instead of images.

The contract (protos/magic3d/v1/guidance.proto: PriorInfo.latent_encoder, ComputeSdsRequest.latents) is exercised
through a standalone gRPC server on loopback with a tiny random-weight SD-like prior on CPU.
"""

from __future__ import annotations

import dataclasses

import grpc
import pytest
import torch
from magic3d.v1 import guidance_pb2_grpc

from services.guidance import standalone
from services.guidance.config import GuidanceConfig, PriorSpec
from services.guidance.engine import GuidanceEngine
from services.guidance.priors.random_init import save_random_latent_prior
from services.guidance.priors.vae_encoder import build_encoder
from services.scene.config import FineConfig, PriorTerm
from services.scene.guidance import InProcessGuidance, PriorInfoCache
from services.scene.steps import guidance_gradient
from shared import guidance_api
from shared.cameras import orbit_camera
from shared.errors import FailedPrecondition, field_violations
from shared.grpcio import insecure_channel
from shared.guidance_api import LatentEncoderInfo, PriorKind, SdsRequest

SIDE = 64


def latent_spec(source: str) -> PriorSpec:
    return PriorSpec(name="sd", kind=PriorKind.LATENT, source=source, device="cpu", dtype="float32", resolution=SIDE)


@pytest.fixture(scope="module")
def server():
    config = GuidanceConfig(priors=[latent_spec("random:tiny")], batching={"wait_s": 0}, port=0)
    running = standalone.start(config)
    yield running
    running.stop(grace=None)


@pytest.fixture(scope="module")
def stub(server):
    channel = insecure_channel(server.address)
    yield guidance_pb2_grpc.GuidanceServiceStub(channel)
    channel.close()


def published(stub) -> LatentEncoderInfo:
    (info,) = stub.ListPriors(guidance_api.guidance_pb2.ListPriorsRequest(), timeout=30).priors
    return guidance_api.prior_info_from_proto(info).latent_encoder


def test_the_prior_publishes_its_encoder_and_a_caller_rebuilds_it_exactly(stub):
    encoder_info = published(stub)
    assert encoder_info.source == "random:tiny" and encoder_info.subfolder == "vae"
    assert encoder_info.image_resolution == SIDE and len(encoder_info.digest) == 64
    encoder = build_encoder(encoder_info, torch.device("cpu"), torch.float32)  # raises if the weights differ
    images = torch.rand(2, 3, SIDE, SIDE)
    assert encoder(images).shape == (2, *encoder_info.latent_shape)
    # Other weights are refused by digest, before any request is sent.
    with pytest.raises(ValueError, match="not the prior's encoder"):
        build_encoder(dataclasses.replace(encoder_info, digest="0" * 64), torch.device("cpu"), torch.float32)


def test_a_latents_request_gets_the_gradient_of_the_images_request_through_the_encoder(stub):
    encoder_info = published(stub)
    encoder = build_encoder(encoder_info, torch.device("cpu"), torch.float32)
    images = torch.rand(2, 3, SIDE, SIDE)
    common = dict(job_id="j", prior="sd", prompt="a red torus", seed=3, explicit_t=[0.3, 0.6])
    by_images = stub.ComputeSds(guidance_api.sds_request_to_proto(SdsRequest(images=images, **common)), timeout=60)
    leaf = images.clone().requires_grad_(True)
    latents = encoder(leaf)
    request = SdsRequest(images=None, latents=latents.detach(), latent_encoder_digest=encoder_info.digest, **common)
    by_latents = stub.ComputeSds(guidance_api.sds_request_to_proto(request), timeout=60)

    latent_grad = guidance_api.sds_result_from_proto(by_latents).grad
    assert latent_grad.shape == latents.shape
    (image_grad,) = torch.autograd.grad(latents, leaf, latent_grad)
    expected = guidance_api.sds_result_from_proto(by_images).grad
    torch.testing.assert_close(image_grad, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert list(by_latents.loss) == pytest.approx(list(by_images.loss), rel=1e-4)
    assert list(by_latents.t) == list(by_images.t)


def _latents_request(encoder_info: LatentEncoderInfo, **overrides) -> SdsRequest:
    fields = dict(job_id="j", prior="sd", images=None, prompt="a red torus", seed=1,
                  latents=torch.zeros(1, *encoder_info.latent_shape), latent_encoder_digest=encoder_info.digest)
    return SdsRequest(**(fields | overrides))


@pytest.mark.parametrize(
    ("overrides", "code", "field"),
    [
        (lambda info: {"images": torch.rand(1, 3, SIDE, SIDE)}, grpc.StatusCode.INVALID_ARGUMENT, "images"),
        (lambda info: {"latents": torch.zeros(1, 3, 8, 8)}, grpc.StatusCode.INVALID_ARGUMENT, "latents.shape"),
        (lambda info: {"latents": torch.full((1, *info.latent_shape), float("nan"))},
         grpc.StatusCode.INVALID_ARGUMENT, "latents.data"),
        (lambda info: {"latent_encoder_digest": ""}, grpc.StatusCode.INVALID_ARGUMENT, "latent_encoder_digest"),
        (lambda info: {"latent_encoder_digest": "f" * 64}, grpc.StatusCode.FAILED_PRECONDITION,
         "latent_encoder_digest"),
    ],
    ids=["images-and-latents", "shape", "nan", "no-digest", "other-encoder"],
)
def test_bad_latents_get_a_clear_status_naming_the_field(stub, overrides, code, field):
    encoder_info = published(stub)
    message = guidance_api.sds_request_to_proto(_latents_request(encoder_info, **overrides(encoder_info)))
    with pytest.raises(grpc.RpcError) as caught:
        stub.ComputeSds(message, timeout=30)
    assert caught.value.code() == code
    assert list(field_violations(caught.value)) == [field]
    assert stub.ComputeSds(guidance_api.sds_request_to_proto(_latents_request(encoder_info)), timeout=60).grad.data


class RecordingGuidance(InProcessGuidance):
    def __init__(self, engine: GuidanceEngine):
        super().__init__(engine)
        self.requests: list[SdsRequest] = []

    def compute_sds(self, request, timeout_s=None):
        self.requests.append(request)
        return super().compute_sds(request, timeout_s)


def test_a_scene_sending_latents_steps_as_one_sending_images(tmp_path):
    """guidance_gradient with guidance_input="latents" (the scene runs the encoder loaded from the published
    checkpoint directory) gives the image gradient of guidance_input="images"; "auto" sends images on CPU."""
    source = save_random_latent_prior(tmp_path / "sd", "tiny", seed=0)
    guidance = RecordingGuidance(GuidanceEngine(GuidanceConfig(priors=[latent_spec(str(source))],
                                                               batching={"wait_s": 0})))
    images = torch.rand(2, 3, SIDE, SIDE)
    cameras = [orbit_camera(a, 15.0, 2.0, size=SIDE) for a in (0.0, 90.0)]
    grads = {}
    try:
        for mode in ("images", "latents", "auto"):
            config = FineConfig(prompt="a red torus", priors=(PriorTerm(prior="sd"),), guidance_input=mode)
            infos = PriorInfoCache(guidance)
            grads[mode], _ = guidance_gradient(guidance, infos, config, "job", images, cameras, images, step=0)
    finally:
        guidance.close()
    by_images, by_latents, by_auto = guidance.requests
    assert by_images.latents is None and by_auto.latents is None  # auto: images on a CPU scene
    assert by_latents.images is None and by_latents.latents.shape[1:] == (4, SIDE // 8, SIDE // 8)
    scale = float(grads["images"].abs().max())
    assert scale > 0
    torch.testing.assert_close(grads["latents"], grads["images"], rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(grads["auto"], grads["images"])


def test_the_scene_falls_back_to_images_in_auto_and_fails_clearly_when_latents_are_required():
    class Infos:
        def prior_info(self, name, timeout_s=None):
            raise AssertionError("not asked")

    cache = PriorInfoCache(Infos())
    from shared.guidance_api import PriorInfo

    unloadable = LatentEncoderInfo("random:no-such-size", "vae", SIDE, 4, SIDE // 8, "0" * 64)
    info = PriorInfo("sd", PriorKind.LATENT, SIDE, 77, (), 100.0, (0.02, 0.98), latent_encoder=unloadable)
    gpu = torch.device("cuda")  # "auto" wants latents on a GPU scene; building fails here before touching it
    assert cache.latent_encoder(info, "auto", gpu) is None
    assert cache.latent_encoder(info, "images", gpu) is None
    with pytest.raises(FailedPrecondition) as caught:
        PriorInfoCache(Infos()).latent_encoder(info, "latents", torch.device("cpu"))
    assert caught.value.field == "guidance_input" and "no-such-size" in str(caught.value)
    no_encoder = dataclasses.replace(info, latent_encoder=None)
    assert cache.latent_encoder(no_encoder, "auto", gpu) is None
    with pytest.raises(FailedPrecondition, match="publishes no latent encoder"):
        cache.latent_encoder(no_encoder, "latents", torch.device("cpu"))


def test_a_compiled_encoder_gives_the_eager_gradient_and_falls_back_when_compiling_fails(tmp_path):
    """latent_encoder_compile: the encoder under torch.compile (here the aot_eager backend: CPU-cheap, the same
    tracing and autograd split as inductor) gives the eager path's image gradient; a compiler that fails on the first
    call leaves the eager encoder in its place, with the same latents."""
    from services.scene.latent_encoders import CompiledEncoder, LatentEncoders, resolve_compile

    assert resolve_compile("auto", torch.device("cuda")) and not resolve_compile("auto", torch.device("cpu"))
    assert resolve_compile("on", torch.device("cpu")) and not resolve_compile("off", torch.device("cuda"))
    with pytest.raises(ValueError, match="latent_encoder_compile"):
        resolve_compile("yes", torch.device("cpu"))

    guidance = InProcessGuidance(GuidanceEngine(GuidanceConfig(priors=[latent_spec("random:tiny")],
                                                               batching={"wait_s": 0})))
    images = torch.rand(2, 3, SIDE, SIDE)
    cameras = [orbit_camera(a, 15.0, 2.0, size=SIDE) for a in (0.0, 90.0)]
    grads = {}
    try:
        for compile_mode in ("off", "on"):
            config = FineConfig(prompt="a red torus", priors=(PriorTerm(prior="sd"),), guidance_input="latents",
                                latent_encoder_compile=compile_mode)
            infos = PriorInfoCache(guidance, LatentEncoders(compile_backend="aot_eager"))
            grads[compile_mode], _ = guidance_gradient(guidance, infos, config, "job", images, cameras, images, step=0)
            encoder = infos.latent_encoder(guidance.prior_info("sd"), "latents", torch.device("cpu"), "job",
                                           compile_mode)
            assert isinstance(encoder, CompiledEncoder) == (compile_mode == "on")
        assert encoder.compiled
        torch.testing.assert_close(grads["on"], grads["off"], rtol=1e-4, atol=1e-4 * float(grads["off"].abs().max()))

        def broken_compiler(graph, example_inputs):
            raise RuntimeError("no compiler here")

        failures = []
        eager = encoder.eager
        fallback = CompiledEncoder(eager, broken_compiler, failures.append)
        torch.testing.assert_close(fallback(images), eager(images))
        assert not fallback.compiled and len(failures) == 1 and "no compiler here" in str(failures[0])
        torch.testing.assert_close(fallback(images), eager(images))  # stays eager, no second attempt
        assert len(failures) == 1
    finally:
        guidance.close()


def test_a_service_builds_and_compiles_an_encoder_once_for_all_its_scenes_and_threads(tmp_path):
    """Every scene of a service runs the service's LatentEncoders (a job after the first pays no encoder build or
    compile). Four threads asking for and calling one encoder at once get one build and one compile per input shape:
    the compile (forward and a warm-up backward) runs under a lock, and the results match the eager encoder's."""
    import threading

    from magic3d.v1 import scene_pb2

    from services.scene.latent_encoders import CompiledEncoder, LatentEncoders
    from services.scene.server import SceneServiceConfig, SceneServicer
    from shared.store import LocalStore

    guidance = InProcessGuidance(GuidanceEngine(GuidanceConfig(priors=[latent_spec("random:tiny")],
                                                               batching={"wait_s": 0})))
    try:
        servicer = SceneServicer(SceneServiceConfig(port=0, device="cpu", store_uri=str(tmp_path)), guidance,
                                 LocalStore(tmp_path))
        request = scene_pb2.CreateSceneRequest(job_id="job", config=scene_pb2.StageConfig(prompt="a red torus"))
        stages = [servicer._new_stage(request) for _ in range(2)]
        for stage in stages:
            stage.use_latent_encoders(servicer.latent_encoders)
        assert all(stage.prior_infos.encoders is servicer.latent_encoders for stage in stages)

        compiles = []

        def counting_backend(graph, example_inputs):
            compiles.append(tuple(example_inputs[0].shape) if example_inputs else ())
            return graph.forward

        encoders = LatentEncoders(compile_backend=counting_backend)
        info = guidance.prior_info("sd")
        images = torch.rand(2, 3, SIDE, SIDE, requires_grad=True)  # as rendered: the step's backward runs through
        got, barrier = [None] * 4, threading.Barrier(4)

        def ask_and_encode(index):
            barrier.wait()
            encoder = encoders.get(info, "latents", "on", torch.device("cpu"), "job")
            got[index] = (encoder, encoder(images))

        threads = [threading.Thread(target=ask_and_encode, args=(index,)) for index in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert all(result is not None for result in got), "a thread did not finish"
        encoder = got[0][0]
        assert isinstance(encoder, CompiledEncoder) and encoder.compiled
        assert all(result[0] is encoder for result in got)  # one build for the four
        assert len(compiles) == 1  # one compile for the four callers of one shape
        for _, latents in got:
            torch.testing.assert_close(latents.detach(), encoder.eager(images).detach())
        encoder(torch.rand(1, 3, SIDE, SIDE, requires_grad=True))  # a new batch shape compiles once more, then never
        compiled_once_more = len(compiles)
        encoder(torch.rand(1, 3, SIDE, SIDE, requires_grad=True))
        assert compiled_once_more >= 2 and len(compiles) == compiled_once_more
    finally:
        guidance.close()
