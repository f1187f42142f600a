"""The guidance tier on Ray Serve, through Serve's gRPC proxy on 127.0.0.1: contract, batching, errors, overload,
the service token, loopback-only sockets, and the GuidanceClient against both Serve and a standalone server.
Ray + Serve start once for the module."""

from __future__ import annotations

import dataclasses
import threading
import time

import grpc
import pytest
import torch
from magic3d.v1 import guidance_pb2, guidance_pb2_grpc

from services.guidance import standalone
from services.guidance.config import DEFAULT_CONFIG, GuidanceConfig, PriorSpec
from services.guidance.priors.base import DiffusionPrior
from services.guidance.serve_app import ServeAppSettings, start_local
from shared import guidance_api, tensors
from shared.auth import AuthConfig
from shared.cameras import Shading, orbit_camera
from shared.errors import InvalidArgument, NotFound, Unauthenticated, field_violations
from shared.grpcio import insecure_channel
from shared.guidance_api import Conditioning, PriorInfo, PriorKind, SdsRequest
from shared.guidance_client import GuidanceClient
from shared.registry import Registry

pytestmark = [pytest.mark.serve, pytest.mark.timeout(240)]

HERE = "tests.test_serve_app"  # replicas import the helpers below by this path (repository root on PYTHONPATH)


class SlowPrior(DiffusionPrior):
    """Closed-form denoiser (eps_c = 0.5 z_t, eps_u = 0.25 z_t) that takes `delay_s` per call: fills Serve's queue."""

    def __init__(self, name: str = "analytic", delay_s: float = 0.0) -> None:
        self.info = PriorInfo(
            name=name,
            kind=PriorKind.ANALYTIC,
            native_resolution=64,
            max_prompt_tokens=16,
            accepted_conditioning=(Conditioning.TEXT, Conditioning.CAMERA),
            default_guidance_scale=7.5,
            default_time_range=(0.02, 0.98),
            requires_cameras=True,
        )
        self.delay_s = delay_s
        self._abar = torch.linspace(0.999, 0.01, 1000)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._abar

    def encode(self, images, conditions):
        return images * 2 - 1

    def predict_noise(self, noisy, timesteps, conditions):
        time.sleep(self.delay_s)
        return 0.5 * noisy, 0.25 * noisy


def build_slow(spec, checkpoint_id):
    return SlowPrior(spec.name, delay_s=0.5)


APP = "analytic"
SLOW_APP = "slow"
SECURED_APP = "secured"
SERVICE_TOKEN = "serve-service-token-0123456789"


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    analytic = ServeAppSettings(
        name=APP, route_prefix="/analytic", max_batch_size=16, batch_wait_timeout_s=0.1
    )
    # One request at a time, one waiting: the third concurrent caller must be refused, not queued.
    slow = ServeAppSettings(
        name=SLOW_APP,
        route_prefix="/slow",
        max_batch_size=1,
        batch_wait_timeout_s=0.0,
        max_ongoing_requests=1,
        max_queued_requests=1,
        prior_builders={PriorKind.ANALYTIC: f"{HERE}:build_slow"},
    )
    slow_config = GuidanceConfig(priors=[PriorSpec(name="slow", kind=PriorKind.ANALYTIC)])
    token_file = tmp_path_factory.mktemp("serve-auth") / "service-token"
    token_file.write_text(SERVICE_TOKEN)
    secured_config = DEFAULT_CONFIG.model_copy(update={"auth": AuthConfig(service_token_file=token_file)})
    secured = ServeAppSettings(name=SECURED_APP, route_prefix="/secured")
    running = start_local([(DEFAULT_CONFIG, analytic), (slow_config, slow), (secured_config, secured)])
    yield running
    running.shutdown()


@pytest.fixture(scope="module")
def stub(local):
    channel = insecure_channel(local.grpc_address)
    yield guidance_pb2_grpc.GuidanceServiceStub(channel)
    channel.close()


def metadata(app: str = APP, model: str | None = "analytic:default") -> list[tuple[str, str]]:
    return [("application", app)] + ([("multiplexed_model_id", model)] if model is not None else [])


def sds_request(batch: int = 2, prior: str = "analytic", seed: int = 1, **fields) -> SdsRequest:
    cameras = [
        orbit_camera(90.0 * i, 30.0, 2.0, size=64, shading=Shading.LAMBERTIAN) for i in range(batch)
    ]
    return SdsRequest(
        job_id=f"job-{seed}",
        prior=prior,
        images=torch.rand(batch, 3, 64, 64),
        cameras=cameras,
        prompt="a red torus",
        seed=seed,
        **fields,
    )


def proto(batch: int = 2, **kwargs) -> guidance_pb2.ComputeSdsRequest:
    return guidance_api.sds_request_to_proto(sds_request(batch, **kwargs))


def test_list_priors_and_compute_sds_through_the_proxy(stub):
    (info,) = stub.ListPriors(guidance_pb2.ListPriorsRequest(), metadata=metadata(), timeout=30).priors
    assert info.name == "analytic" and info.kind == guidance_pb2.PRIOR_KIND_ANALYTIC
    assert "default" in info.checkpoint_ids

    response = stub.ComputeSds(proto(2), metadata=metadata(), timeout=30)
    grad = guidance_api.sds_result_from_proto(response).grad
    assert grad.shape == (2, 3, 64, 64) and grad.dtype == torch.float32
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert len(response.t) == len(response.loss) == len(response.finite) == 2 and all(response.finite)
    assert response.prior == "analytic" and response.checkpoint_id == "default" and response.server_time_s > 0


def test_multiplexed_id_may_be_a_bare_checkpoint_or_absent(stub):
    for model in ("default", None):
        response = stub.ComputeSds(proto(1), metadata=metadata(model=model), timeout=30)
        assert list(response.grad.shape) == [1, 3, 64, 64]


def test_concurrent_clients_share_denoiser_calls(local, stub):
    clients = 6
    before = local.stats(APP)
    barrier = threading.Barrier(clients)
    shapes, errors = [], []

    def call(seed: int) -> None:
        try:
            barrier.wait(timeout=10)
            response = stub.ComputeSds(proto(2, seed=seed), metadata=metadata(), timeout=30)
            shapes.append(list(response.grad.shape))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=call, args=(seed,)) for seed in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and shapes == [[2, 3, 64, 64]] * clients
    after = local.stats(APP)
    requests = after["requests"] - before["requests"]
    calls = after["denoiser_calls"] - before["denoiser_calls"]
    assert requests == clients and after["images"] - before["images"] == 2 * clients
    assert calls < requests, f"{requests} requests took {calls} denoiser calls"


def test_batched_result_does_not_depend_on_batch_mates(stub):
    alone = stub.ComputeSds(proto(1, seed=42), metadata=metadata(), timeout=30)
    results = {}

    def call(seed: int) -> None:
        results[seed] = stub.ComputeSds(proto(1, seed=seed), metadata=metadata(), timeout=30)

    threads = [threading.Thread(target=call, args=(seed,)) for seed in (40, 41, 42)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert list(results[42].t) == list(alone.t)


@pytest.mark.parametrize(
    ("change", "code", "field"),
    [
        (lambda m: m.images.CopyFrom(tensors.to_proto(torch.full((2, 3, 64, 64), float("nan")))),
         grpc.StatusCode.INVALID_ARGUMENT, "images.data"),
        (lambda m: setattr(m, "prior", "no-such-prior"), grpc.StatusCode.NOT_FOUND, "prior"),
        (lambda m: setattr(m, "checkpoint_id", "no-such-checkpoint"), grpc.StatusCode.NOT_FOUND, "checkpoint_id"),
        (lambda m: m.explicit_times.t.extend([0.5]), grpc.StatusCode.INVALID_ARGUMENT, "explicit_times.t"),
    ],
    ids=["nan-images", "unknown-prior", "unknown-checkpoint", "wrong-t-count"],
)
def test_bad_input_names_the_field_and_the_next_request_succeeds(stub, change, code, field):
    message = proto(2)
    change(message)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ComputeSds(message, metadata=metadata(model=None), timeout=30)
    assert caught.value.code() == code
    assert field in field_violations(caught.value), caught.value.details()
    response = stub.ComputeSds(proto(2), metadata=metadata(), timeout=30)
    assert list(response.grad.shape) == [2, 3, 64, 64]


def test_multiplexed_id_that_contradicts_the_body_is_refused(stub):
    with pytest.raises(grpc.RpcError) as caught:
        stub.ComputeSds(proto(1), metadata=metadata(model="other-prior:default"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prior" in field_violations(caught.value)


def test_bad_request_among_good_ones_fails_alone(stub):
    outcomes: dict[str, object] = {}
    bad = proto(2)
    bad.images.CopyFrom(tensors.to_proto(torch.full((2, 3, 64, 64), float("inf"))))

    def call(key: str, message) -> None:
        try:
            outcomes[key] = stub.ComputeSds(message, metadata=metadata(), timeout=30)
        except grpc.RpcError as error:
            outcomes[key] = error.code()

    jobs = [("good0", proto(2, seed=0)), ("bad", bad), ("good1", proto(2, seed=1)), ("good2", proto(2, seed=2))]
    threads = [threading.Thread(target=call, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert outcomes["bad"] == grpc.StatusCode.INVALID_ARGUMENT
    for key in ("good0", "good1", "good2"):
        assert isinstance(outcomes[key], guidance_pb2.ComputeSdsResponse), outcomes[key]


def test_overload_is_refused_with_resource_exhausted_not_queued(stub):
    codes: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def call(seed: int) -> None:
        try:
            stub.ComputeSds(proto(1, prior="slow", seed=seed), metadata=metadata(SLOW_APP, "slow:default"), timeout=20)
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
        with lock:
            codes.append(code)

    start = time.monotonic()
    threads = [threading.Thread(target=call, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    elapsed = time.monotonic() - start
    assert len(codes) == 6 and set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1 and codes.count(grpc.StatusCode.OK) >= 1, codes
    assert elapsed < 15, f"overload took {elapsed:.1f}s"


def test_twelve_mib_each_way_through_the_proxy(stub):
    """One 1024x1024 float32 image is 12 MiB, over gRPC's 4 MiB default, in and out (the 64 MiB limits hold)."""
    request = SdsRequest(
        job_id="big", prior="slow", images=torch.rand(1, 3, 1024, 1024), prompt="a red torus", seed=5,
        cameras=[orbit_camera(0.0, 30.0, 2.0, size=1024)],
    )
    message = guidance_api.sds_request_to_proto(request)
    assert message.ByteSize() > 12 * 2**20
    response = stub.ComputeSds(message, metadata=metadata(SLOW_APP, "slow:default"), timeout=60)
    assert list(response.grad.shape) == [1, 3, 1024, 1024] and response.ByteSize() > 12 * 2**20


@pytest.fixture(scope="module")
def standalone_server():
    config = DEFAULT_CONFIG.model_copy(update={"port": 0})
    running = standalone.start(config)
    yield running
    running.stop(grace=None)


@pytest.fixture(scope="module")
def client(local, standalone_server):
    registry = Registry.model_validate(
        {
            "client": {"timeout_s": 30, "outage_window_s": 30, "initial_backoff_s": 0.2, "max_backoff_s": 1.0},
            "priors": {
                "via-serve": {"kind": "serve", "address": local.grpc_address, "application": APP, "prior": "analytic"},
                "via-standalone": {"kind": "standalone", "address": standalone_server.address, "prior": "analytic"},
                "swappable": {"kind": "alias", "target": "via-serve"},
                "bad-checkpoint": {"kind": "alias", "target": "via-standalone", "checkpoint_id": "nope"},
                "slow": {"kind": "serve", "address": local.grpc_address, "application": SLOW_APP},
                # The same applications through their DeploymentHandles (this process is in the local Ray cluster).
                "via-handle": {"kind": "serve-handle", "application": APP, "prior": "analytic"},
                "handle-bad-checkpoint": {"kind": "alias", "target": "via-handle", "checkpoint_id": "nope"},
                "slow-handle": {"kind": "serve-handle", "application": SLOW_APP, "prior": "slow"},
            },
        }
    )
    guidance = GuidanceClient(registry)
    yield guidance
    guidance.close()


@pytest.mark.parametrize("name", ["via-serve", "via-standalone", "swappable", "via-handle"])
def test_guidance_client_on_serve_and_standalone(client, name):
    (info,) = client.list_priors(name)
    assert info.name == "analytic" and info.kind == PriorKind.ANALYTIC
    request = sds_request(2, prior=name, seed=3)
    result = client.compute_sds(request, timeout_s=30)
    assert result.grad.shape == request.images.shape and torch.isfinite(result.grad).all()
    assert len(result.t) == 2 and all(result.finite)

    bad = sds_request(2, prior=name)
    bad.images[0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidArgument) as caught:
        client.compute_sds(bad, timeout_s=30)
    assert caught.value.field == "images.data"


@pytest.mark.parametrize("bad_checkpoint", ["bad-checkpoint", "handle-bad-checkpoint"])
def test_guidance_client_maps_not_found_with_its_field(client, bad_checkpoint):
    with pytest.raises(NotFound) as caught:
        client.compute_sds(sds_request(1, prior=bad_checkpoint), timeout_s=30)
    assert caught.value.field == "checkpoint_id"
    with pytest.raises(NotFound) as caught:
        client.compute_sds(sds_request(1, prior="not-in-the-registry"), timeout_s=30)
    assert caught.value.field == "prior"


def test_serve_handle_and_standalone_agree_on_the_same_request(client):
    request = sds_request(2, seed=9)
    a = client.compute_sds(SdsRequest(**{**request.__dict__, "prior": "via-serve"}), timeout_s=30)
    b = client.compute_sds(SdsRequest(**{**request.__dict__, "prior": "via-standalone"}), timeout_s=30)
    c = client.compute_sds(SdsRequest(**{**request.__dict__, "prior": "via-handle"}), timeout_s=30)
    assert a.t == b.t == c.t
    torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(c.grad, b.grad)


@pytest.mark.parametrize("slow", ["slow", "slow-handle"])
def test_guidance_client_retries_overload_until_served(client, slow):
    """Six callers on a one-at-a-time app: refused (RESOURCE_EXHAUSTED; through the handle Serve's back-pressure
    error), retried with backoff, all served."""
    results, errors = [], []

    def call(seed: int) -> None:
        try:
            results.append(client.compute_sds(sds_request(1, prior=slow, seed=seed), timeout_s=30))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=call, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=40)
    assert not errors and len(results) == 6


def test_a_reference_image_is_held_by_digest_and_the_client_sends_it_once(stub, client):
    """Image conditioning through the proxy: a digest the replica does not hold is FAILED_PRECONDITION naming
    `image_condition.image`; once sent, the digest alone gives the same result (the analytic prior takes images)."""
    from shared.guidance_api import ImageCondition
    from shared.tensor_digest import tensor_sha256

    image = torch.rand(1, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    reference = ImageCondition(reference_camera=orbit_camera(0.0, 15.0, 2.0, size=32),
                               image_sha256=tensor_sha256(tensors.to_proto(image)), image=image)
    request = sds_request(1, seed=41, image_condition=reference)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ComputeSds(guidance_api.sds_request_to_proto(request, with_image=False), metadata=metadata(), timeout=30)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "image_condition.image" in field_violations(caught.value)
    sent = client.compute_sds(dataclasses.replace(request, prior="via-serve"))
    response = stub.ComputeSds(guidance_api.sds_request_to_proto(request, with_image=False), metadata=metadata(),
                               timeout=30)
    torch.testing.assert_close(guidance_api.sds_result_from_proto(response).grad, sent.grad)


def test_check_prompt_through_the_proxy_and_the_client(stub, client):
    request = guidance_pb2.CheckPromptRequest(prior="analytic", prompt="a red torus", negative_prompt="a blue sphere")
    response = stub.CheckPrompt(request, metadata=metadata(), timeout=30)
    assert (response.prompt_tokens, response.negative_prompt_tokens, response.max_tokens) == (5, 3, 77)
    with pytest.raises(grpc.RpcError) as caught:
        stub.CheckPrompt(guidance_pb2.CheckPromptRequest(prior="analytic", prompt="a teapot"), metadata=metadata(),
                         timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in field_violations(caught.value)
    with pytest.raises(NotFound) as not_found:
        client.check_prompt("swappable", "a red torus", checkpoint_id="no-such-checkpoint", timeout_s=30)
    assert not_found.value.field == "checkpoint_id"
    assert client.check_prompt("swappable", "a red torus", timeout_s=30).token_count == 5


def _replica_actors(app: str) -> list[tuple[str, str]]:
    """(name, namespace) of the live replica actors of `app`'s deployment (Serve names them SERVE_REPLICA::<app>#...)."""
    import ray

    return [
        (actor["name"], actor["namespace"])
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::{app}#")
    ]


def test_a_replica_killed_mid_call_is_retried_until_serve_replaces_it(local):
    """Last in the module: it kills the slow app's only replica while it computes (its denoiser takes 0.5 s). Serve's
    proxy answers that call INTERNAL "actor died"; the client retries it within its outage window until Serve has
    started a new replica."""
    import ray

    registry = Registry.model_validate(
        {
            "client": {"timeout_s": 30, "outage_window_s": 90, "initial_backoff_s": 0.2, "max_backoff_s": 2.0},
            "priors": {"slow": {"kind": "serve", "address": local.grpc_address, "application": SLOW_APP}},
        }
    )
    with GuidanceClient(registry) as client:
        client.compute_sds(sds_request(1, prior="slow", seed=11), timeout_s=30)  # routed and warm
        (victim,) = _replica_actors(SLOW_APP)
        outcome: dict[str, object] = {}

        def call() -> None:
            start = time.monotonic()
            try:
                outcome["result"] = client.compute_sds(sds_request(1, prior="slow", seed=12), timeout_s=30)
            except Exception as error:  # noqa: BLE001 - asserted below
                outcome["error"] = error
            outcome["elapsed"] = time.monotonic() - start

        thread = threading.Thread(target=call)
        thread.start()
        time.sleep(0.3)  # inside the replica's 0.5 s denoiser call
        ray.kill(ray.get_actor(victim[0], namespace=victim[1]), no_restart=True)
        thread.join(timeout=120)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.grad.shape == (1, 3, 64, 64) and torch.isfinite(result.grad).all()
    assert outcome["elapsed"] < 90
    assert victim not in _replica_actors(SLOW_APP)  # served by a new replica


def test_the_service_token_guards_the_serve_ingress(local, stub):
    request = guidance_pb2.CheckPromptRequest(prior="analytic", prompt="a red torus")
    for extra in ([], [("authorization", "Bearer wrong-token-0123456789")], [("authorization", "Basic x")]):
        for call in (
            lambda: stub.CheckPrompt(request, metadata=metadata(SECURED_APP) + extra, timeout=30),
            lambda: stub.ListPriors(guidance_pb2.ListPriorsRequest(), metadata=metadata(SECURED_APP) + extra, timeout=30),
            lambda: stub.ComputeSds(proto(1), metadata=metadata(SECURED_APP) + extra, timeout=30),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "wrong-token" not in (caught.value.details() or "")
    good = metadata(SECURED_APP) + [("authorization", f"Bearer {SERVICE_TOKEN}")]
    assert stub.CheckPrompt(request, metadata=good, timeout=30).prompt_tokens == 5
    route = {"kind": "serve", "address": local.grpc_address, "application": SECURED_APP}
    registry = Registry.model_validate({"priors": {"analytic": route}, "client": {"outage_window_s": 0}})
    with GuidanceClient(registry, token=SERVICE_TOKEN) as client:
        assert client.check_prompt("analytic", "a red torus", timeout_s=30).token_count == 5
    with GuidanceClient(registry, token="") as anonymous, pytest.raises(Unauthenticated):
        anonymous.check_prompt("analytic", "a red torus", timeout_s=30)


def test_every_ray_and_serve_process_listens_on_loopback_only(local, stub):
    from sockets import non_loopback  # here: replicas import this module by path, without the tests folder

    stub.ListPriors(guidance_pb2.ListPriorsRequest(), metadata=metadata(), timeout=30)  # every server up
    assert non_loopback() == {}
