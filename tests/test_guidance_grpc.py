"""The standalone gRPC server: contract, health, reflection, every bad input, overload. Loopback only."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from magic3d.v1 import common_pb2, guidance_pb2, guidance_pb2_grpc

from conftest import CountingPrior, counting_config
from services.guidance import standalone
from services.guidance.config import DEFAULT_CONFIG
from services.guidance.pool import PRIORS, PriorPool
from shared import cameras, guidance_api, tensors
from shared.errors import InvalidArgument, NotFound, field_violations
from shared.grpcio import insecure_channel
from shared.guidance_api import PriorKind, PromptCheck, SdsRequest
from shared.guidance_client import GuidanceClient
from shared.registry import Registry
from shared.tensor_digest import tensor_sha256

GATE = threading.Event()


class GatedPrior(CountingPrior):
    """Blocks inside the denoiser while GATE is clear, to fill the queue on purpose."""

    def predict_noise(self, noisy, timesteps, conditions):
        GATE.wait(timeout=20)
        return super().predict_noise(noisy, timesteps, conditions)


@pytest.fixture(scope="module")
def server():
    GATE.set()
    config = counting_config(max_queue=2, wait_s=0.0, max_batch_images=8).model_copy(update={"port": 0})
    pool = PriorPool(config, priors=PRIORS.with_builders({PriorKind.PIXEL: lambda spec, ckpt: GatedPrior()}))
    running = standalone.start(config, pool=pool)
    yield running
    running.stop(grace=None)


@pytest.fixture(scope="module")
def stub(server):
    channel = insecure_channel(server.address)
    yield guidance_pb2_grpc.GuidanceServiceStub(channel)
    channel.close()


def good_request(**overrides) -> guidance_pb2.ComputeSdsRequest:
    request = SdsRequest(job_id="job-7", prior="counting", images=torch.rand(2, 3, 32, 32), prompt="a red torus", seed=1)
    message = guidance_api.sds_request_to_proto(request)
    for key, value in overrides.items():
        setattr(message, key, value)
    return message


def test_list_priors(stub):
    (info,) = stub.ListPriors(guidance_pb2.ListPriorsRequest(), timeout=10).priors
    assert info.name == "counting" and info.kind == guidance_pb2.PRIOR_KIND_PIXEL
    assert info.native_resolution == 32 and info.max_prompt_tokens == 8
    assert list(info.checkpoint_ids) == ["default"]


def test_compute_sds_round_trip(stub):
    response = stub.ComputeSds(good_request(), timeout=30)
    grad = tensors.from_proto(response.grad)
    assert grad.shape == (2, 3, 32, 32) and grad.dtype == torch.float32
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert len(response.t) == len(response.loss) == len(response.finite) == 2
    assert response.server_time_s > 0 and response.checkpoint_id == "default"


def test_half_precision_gradient_on_request(stub):
    response = stub.ComputeSds(good_request(grad_dtype=common_pb2.SCALAR_TYPE_FLOAT16), timeout=30)
    assert tensors.from_proto(response.grad).dtype == torch.float16


def test_large_message_is_accepted(stub):
    """A batch of 4 at 512x512 in float32 is 12 MiB, over gRPC's 4 MiB default."""
    message = good_request()
    message.images.CopyFrom(tensors.to_proto(torch.rand(4, 3, 512, 512)))
    response = stub.ComputeSds(message, timeout=60)
    assert list(response.grad.shape) == [4, 3, 512, 512]


def test_health_and_reflection(server):
    channel = insecure_channel(server.address)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", standalone.SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for reply in replies for s in reply.list_services_response.service}
        assert "magic3d.v1.GuidanceService" in names
    finally:
        channel.close()


def _tensor(dtype=common_pb2.SCALAR_TYPE_FLOAT32, shape=(1, 3, 32, 32), data=None, fill=0.5):
    if data is None:
        data = tensors.to_proto(torch.full(shape, fill)).data
    return common_pb2.Tensor(dtype=dtype, shape=list(shape), data=data)


def _mutate(name):
    """Named mutations of a good request, each breaking one field."""

    def apply(message):
        if name == "byte_length":
            message.images.CopyFrom(_tensor(data=b"\x00" * 100))
        elif name == "dtype":
            message.images.CopyFrom(_tensor(dtype=common_pb2.SCALAR_TYPE_INT32, data=b"\x00" * (3 * 32 * 32 * 4)))
        elif name == "dtype_unspecified":
            message.images.CopyFrom(_tensor(dtype=common_pb2.SCALAR_TYPE_UNSPECIFIED))
        elif name == "rank":
            message.images.CopyFrom(_tensor(shape=(3, 32, 32)))
        elif name == "channels":
            message.images.CopyFrom(_tensor(shape=(1, 4, 32, 32)))
        elif name == "small_side":
            message.images.CopyFrom(_tensor(shape=(1, 3, 8, 32)))
        elif name == "large_side":
            message.images.CopyFrom(_tensor(shape=(1, 3, 16, 1032)))
        elif name == "batch":
            message.images.CopyFrom(_tensor(shape=(9, 3, 16, 16)))
        elif name == "nan":
            message.images.CopyFrom(_tensor(fill=float("nan")))
        elif name == "t_outside":
            message.explicit_times.t[:] = [1.5, 0.5]
        elif name == "t_range_outside":
            message.time_range.CopyFrom(guidance_pb2.TimeRange(min=-0.1, max=0.5))
        elif name == "t_min_over_max":
            message.time_range.CopyFrom(guidance_pb2.TimeRange(min=0.7, max=0.3))
        elif name == "negative_scale":
            message.guidance_scale = -2.0
        elif name == "empty_prompt":
            message.prompt = "  "
        elif name == "long_prompt":
            message.prompt = "a very very very very very very long prompt"
        elif name == "unknown_prior":
            message.prior = "sd-99"
        elif name == "unknown_checkpoint":
            message.checkpoint_id = "dreambooth-1"
        elif name == "image_condition":
            message.image_condition.image.CopyFrom(_tensor(shape=(1, 4, 8, 8)))
            message.image_condition.image_sha256 = tensor_sha256(message.image_condition.image)
            message.image_condition.reference_camera.CopyFrom(cameras.to_proto(cameras.orbit_camera(0.0, 15.0, 2.0)))
        elif name == "image_condition_without_digest":
            message.image_condition.image.CopyFrom(_tensor(shape=(1, 4, 8, 8)))
        elif name == "no_input":
            message.ClearField("images")
        elif name == "latents_to_a_pixel_prior":
            message.ClearField("images")
            message.latents.CopyFrom(_tensor(shape=(1, 4, 8, 8)))
            message.latent_encoder_digest = "0" * 64
        return message

    return apply


@pytest.mark.parametrize(
    ("mutation", "code", "field"),
    [
        ("byte_length", grpc.StatusCode.INVALID_ARGUMENT, "images.data"),
        ("dtype", grpc.StatusCode.INVALID_ARGUMENT, "images.dtype"),
        ("dtype_unspecified", grpc.StatusCode.INVALID_ARGUMENT, "images.dtype"),
        ("rank", grpc.StatusCode.INVALID_ARGUMENT, "images.shape"),
        ("channels", grpc.StatusCode.INVALID_ARGUMENT, "images.shape"),
        ("small_side", grpc.StatusCode.INVALID_ARGUMENT, "images.shape"),
        ("large_side", grpc.StatusCode.INVALID_ARGUMENT, "images.shape"),
        ("batch", grpc.StatusCode.INVALID_ARGUMENT, "images.shape"),
        ("nan", grpc.StatusCode.INVALID_ARGUMENT, "images.data"),
        ("t_outside", grpc.StatusCode.INVALID_ARGUMENT, "explicit_times.t"),
        ("t_range_outside", grpc.StatusCode.INVALID_ARGUMENT, "time_range"),
        ("t_min_over_max", grpc.StatusCode.INVALID_ARGUMENT, "time_range.min"),
        ("negative_scale", grpc.StatusCode.INVALID_ARGUMENT, "guidance_scale"),
        ("empty_prompt", grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ("long_prompt", grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ("unknown_prior", grpc.StatusCode.NOT_FOUND, "prior"),
        ("unknown_checkpoint", grpc.StatusCode.NOT_FOUND, "checkpoint_id"),
        ("image_condition", grpc.StatusCode.INVALID_ARGUMENT, "image_condition"),
        ("image_condition_without_digest", grpc.StatusCode.INVALID_ARGUMENT, "image_condition.image_sha256"),
        ("no_input", grpc.StatusCode.INVALID_ARGUMENT, "images"),
        ("latents_to_a_pixel_prior", grpc.StatusCode.FAILED_PRECONDITION, "latents"),
    ],
)
def test_bad_input_gets_a_clear_status_and_the_server_keeps_serving(stub, mutation, code, field):
    with pytest.raises(grpc.RpcError) as caught:
        stub.ComputeSds(_mutate(mutation)(good_request()), timeout=30)
    assert caught.value.code() == code
    violations = field_violations(caught.value)
    assert list(violations) == [field] and violations[field]
    assert stub.ComputeSds(good_request(), timeout=30).grad.data  # the next request is served


def test_overload_answers_resource_exhausted_and_loses_nothing_accepted(server, stub):
    GATE.clear()
    accepted, refused = [], []
    try:
        for seed in range(8):
            future = stub.ComputeSds.future(good_request(seed=seed), timeout=30)
            accepted.append(future)
        GATE.wait(timeout=0.5)
        for future in accepted:
            try:
                future.result(timeout=0.3)
            except grpc.FutureTimeoutError:
                pass
            except grpc.RpcError as error:
                refused.append(error.code())
    finally:
        GATE.set()
    outcomes = []
    for future in accepted:
        try:
            outcomes.append(future.result(timeout=30).grad.data != b"")
        except grpc.RpcError as error:
            outcomes.append(error.code())
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in outcomes
    assert outcomes.count(True) >= 2  # what was queued completes once the denoiser frees up
    assert set(outcomes) <= {True, grpc.StatusCode.RESOURCE_EXHAUSTED}


# -- CheckPrompt -----------------------------------------------------------------------------------------------
# The counting prior's limit is 8 whitespace-separated words; the longest view suffix (", overhead view") adds 2.


@pytest.fixture(scope="module")
def analytic_server():
    running = standalone.start(DEFAULT_CONFIG.model_copy(update={"port": 0}))
    yield running
    running.stop(grace=None)


def _check(stub, prior="counting", prompt="a red torus", negative_prompt="", checkpoint_id=""):
    request = guidance_pb2.CheckPromptRequest(
        prior=prior, checkpoint_id=checkpoint_id, prompt=prompt, negative_prompt=negative_prompt
    )
    return stub.CheckPrompt(request, timeout=10)


def test_check_prompt_counts_with_the_longest_view_suffix(stub):
    response = _check(stub, prompt="a red torus", negative_prompt="blurry low quality")
    assert (response.prompt_tokens, response.negative_prompt_tokens, response.max_tokens) == (5, 3, 8)
    assert _check(stub, prompt="one two three four five six").prompt_tokens == 8  # exactly at the limit
    assert _check(stub, checkpoint_id="default").max_tokens == 8


@pytest.mark.parametrize(
    ("fields", "code", "field"),
    [
        ({"prompt": "a very very very very very very long prompt"}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        # Fits alone (7 words), not with ", overhead view" appended.
        ({"prompt": "one two three four five six seven"}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({"prompt": "   "}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({"negative_prompt": " "}, grpc.StatusCode.INVALID_ARGUMENT, "negative_prompt"),
        ({"negative_prompt": "one two three four five six seven eight nine"}, grpc.StatusCode.INVALID_ARGUMENT,
         "negative_prompt"),
        ({"prior": "sd-99"}, grpc.StatusCode.NOT_FOUND, "prior"),
        ({"prior": ""}, grpc.StatusCode.INVALID_ARGUMENT, "prior"),
        ({"checkpoint_id": "dreambooth-1"}, grpc.StatusCode.NOT_FOUND, "checkpoint_id"),
    ],
    ids=["long", "long-with-suffix", "blank", "empty", "blank-negative", "long-negative", "unknown-prior",
         "no-prior", "unknown-checkpoint"],
)
def test_check_prompt_rejections_name_the_field(stub, fields, code, field):
    with pytest.raises(grpc.RpcError) as caught:
        _check(stub, **fields)
    assert caught.value.code() == code
    violations = field_violations(caught.value)
    assert list(violations) == [field] and violations[field]


def test_check_prompt_on_the_analytic_prior(analytic_server):
    channel = insecure_channel(analytic_server.address)
    try:
        stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
        response = _check(stub, prior="analytic", prompt="a red torus", negative_prompt="a blue sphere")
        assert (response.prompt_tokens, response.negative_prompt_tokens, response.max_tokens) == (5, 3, 77)
        with pytest.raises(grpc.RpcError) as caught:
            _check(stub, prior="analytic", prompt="a photo of a teapot")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "names no object" in field_violations(caught.value)["prompt"]
    finally:
        channel.close()


def test_guidance_client_check_prompt_through_an_alias(server, analytic_server):
    registry = Registry.model_validate(
        {
            "client": {"timeout_s": 10, "outage_window_s": 2},
            "priors": {
                "counting": {"kind": "standalone", "address": server.address},
                "analytic-local": {"kind": "standalone", "address": analytic_server.address, "prior": "analytic"},
                "toy": {"kind": "alias", "target": "analytic-local"},
                "bad-checkpoint": {"kind": "alias", "target": "counting", "checkpoint_id": "nope"},
            },
        }
    )
    with GuidanceClient(registry) as client:
        assert client.check_prompt("toy", "a green cube", negative_prompt="torus") == PromptCheck(5, 1, 77)
        assert client.check_prompt("counting", "a red torus").max_tokens == 8
        with pytest.raises(InvalidArgument) as caught:
            client.check_prompt("toy", "a teapot")
        assert caught.value.field == "prompt"
        with pytest.raises(InvalidArgument) as caught:
            client.check_prompt("counting", "a red torus", negative_prompt="  ")
        assert caught.value.field == "negative_prompt"
        with pytest.raises(NotFound) as caught:
            client.check_prompt("bad-checkpoint", "a red torus")
        assert caught.value.field == "checkpoint_id"
        with pytest.raises(NotFound) as caught:
            client.check_prompt("not-in-the-registry", "a red torus")
        assert caught.value.field == "prior"


def test_metrics_report_batch_fill():
    import urllib.request

    GATE.set()
    config = counting_config(wait_s=0.0, max_batch_images=8).model_copy(update={"port": 0, "metrics_port": 0})
    pool = PriorPool(config, priors=PRIORS.with_builders({PriorKind.PIXEL: lambda spec, ckpt: GatedPrior()}))
    running = standalone.start(config, pool=pool)
    channel = insecure_channel(running.address)
    try:
        guidance_pb2_grpc.GuidanceServiceStub(channel).ComputeSds(good_request(), timeout=30)
        text = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10).read().decode()
    finally:
        channel.close()
        running.stop(grace=None)
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith("magic3d_")}
    assert values["magic3d_guidance_images_total"] == 2 and values["magic3d_guidance_denoiser_calls_total"] == 1
    assert values["magic3d_guidance_batch_fill"] == pytest.approx(2 / 8)
