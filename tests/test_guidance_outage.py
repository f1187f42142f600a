"""Guidance outages seen by the GuidanceClient: which failures mean "the tier is down", retries for the outage window,
a server restarted on the same port during a call, Serve's "actor died" INTERNAL, cancellation. Loopback only."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch
from magic3d.v1 import guidance_pb2, guidance_pb2_grpc

from services.guidance import standalone
from services.guidance.config import GuidanceConfig, PriorSpec
from shared.cameras import orbit_camera
from shared.errors import Cancelled, InvalidArgument, Unavailable
from shared.grpcio import free_port, start_server
from shared.guidance_api import PriorKind, SdsRequest
from shared.guidance_client import GuidanceClient, is_outage, stop_retrying_when
from shared.registry import Registry

pytestmark = pytest.mark.timeout(60)

ACTOR_DIED = (
    "The actor died unexpectedly before finishing this task.\n\tclass_name: ServeReplica:analytic:GuidanceDeployment"
)


@pytest.mark.parametrize(
    "code, message, outage",
    [
        (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", True),
        (grpc.StatusCode.INTERNAL, ACTOR_DIED, True),
        (grpc.StatusCode.UNKNOWN, "ray.exceptions.ActorDiedError: ...", True),
        (grpc.StatusCode.INTERNAL, "The actor 3f2a is unavailable: connection reset. The task may or may not...", True),
        (grpc.StatusCode.INTERNAL, "The worker died unexpectedly while executing this task.", True),
        (grpc.StatusCode.INTERNAL, "SDS failed: RuntimeError: shapes do not match", False),
        (grpc.StatusCode.INVALID_ARGUMENT, "images.data: NaN", False),
        (grpc.StatusCode.INVALID_ARGUMENT, ACTOR_DIED, False),
        (grpc.StatusCode.NOT_FOUND, "unknown checkpoint", False),
        (grpc.StatusCode.FAILED_PRECONDITION, "stale encoder", False),
    ],
)
def test_is_outage_retries_the_tier_being_down_never_the_callers_fault(code, message, outage):
    assert is_outage(code, message) is outage


def analytic_config(port: int) -> GuidanceConfig:
    return GuidanceConfig(
        priors=[PriorSpec(name="analytic", kind=PriorKind.ANALYTIC, resolution=16)], port=port, batching={"wait_s": 0}
    )


def client_for(address: str, outage_window_s: float) -> GuidanceClient:
    settings = {"timeout_s": 10, "outage_window_s": outage_window_s, "initial_backoff_s": 0.05, "max_backoff_s": 0.3}
    return GuidanceClient(
        Registry.model_validate({"client": settings, "priors": {"analytic": {"kind": "standalone", "address": address}}})
    )


def request(seed: int = 1) -> SdsRequest:
    return SdsRequest(
        job_id="job-outage", prior="analytic", images=torch.rand(1, 3, 16, 16), prompt="a red torus", seed=seed,
        cameras=[orbit_camera(0.0, 30.0, 2.0, size=16)],
    )


def test_a_call_rides_out_a_server_restarted_on_the_same_port():
    port = free_port()
    server = standalone.start(analytic_config(port))
    client = client_for(f"127.0.0.1:{port}", outage_window_s=20)
    restarted: list = []
    try:
        assert client.compute_sds(request()).grad.shape == (1, 3, 16, 16)  # the channel is connected
        server.stop(grace=None)
        restart = threading.Timer(1.5, lambda: restarted.append(standalone.start(analytic_config(port))))
        restart.start()
        start = time.monotonic()
        result = client.compute_sds(request(seed=2))
        elapsed = time.monotonic() - start
        restart.join()
        assert result.grad.shape == (1, 3, 16, 16) and torch.isfinite(result.grad).all()
        assert restarted and 1.4 < elapsed < 10, elapsed  # it waited for the restart, and not much longer
    finally:
        client.close()
        for running in restarted:
            running.stop(grace=None)


def test_an_outage_longer_than_the_window_is_unavailable_naming_guidance():
    client = client_for(f"127.0.0.1:{free_port()}", outage_window_s=1)  # nothing listens there
    try:
        start = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            client.compute_sds(request())
        elapsed = time.monotonic() - start
    finally:
        client.close()
    assert caught.value.field == "guidance"
    assert "guidance tier unreachable for 1 s" in caught.value.message and "UNAVAILABLE" in caught.value.message
    assert 0.9 < elapsed < 3, elapsed


def test_a_caller_that_goes_away_stops_the_retries():
    client = client_for(f"127.0.0.1:{free_port()}", outage_window_s=30)
    gone = threading.Event()
    threading.Timer(0.5, gone.set).start()
    try:
        start = time.monotonic()
        with stop_retrying_when(gone.is_set), pytest.raises(Cancelled) as caught:
            client.compute_sds(request())
        elapsed = time.monotonic() - start
    finally:
        client.close()
    assert caught.value.field == "guidance" and elapsed < 2, elapsed


class FlakyServicer(guidance_pb2_grpc.GuidanceServiceServicer):
    """ListPriors fails with `code` / `message` the first `failures` times (what Serve's proxy sends when the
    replica serving a call dies: INTERNAL with Ray's message), then answers."""

    def __init__(self, code: grpc.StatusCode, message: str, failures: int) -> None:
        self.code, self.message, self.failures, self.calls = code, message, failures, 0

    def ListPriors(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(self.code, self.message)
        return guidance_pb2.ListPriorsResponse()


@pytest.mark.parametrize(
    "code, message, retried",
    [
        (grpc.StatusCode.INTERNAL, ACTOR_DIED, True),
        (grpc.StatusCode.INTERNAL, "SDS failed: RuntimeError: boom", False),
        (grpc.StatusCode.INVALID_ARGUMENT, "prompt: empty", False),
    ],
)
def test_a_replica_death_is_retried_a_server_bug_or_a_bad_call_is_not(code, message, retried):
    servicer = FlakyServicer(code, message, failures=2)
    running = start_server(
        servicer, guidance_pb2_grpc.add_GuidanceServiceServicer_to_server, "magic3d.v1.GuidanceService",
        "127.0.0.1:0", max_workers=2,
    )
    client = client_for(running.address, outage_window_s=10)
    try:
        if retried:
            assert client.list_priors("analytic") == [] and servicer.calls == 3
        else:
            with pytest.raises(Exception) as caught:
                client.list_priors("analytic")
            assert servicer.calls == 1 and not isinstance(caught.value, Unavailable)
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                assert isinstance(caught.value, InvalidArgument)
    finally:
        client.close()
        running.stop(grace=None)
