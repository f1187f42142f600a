"""The guidance tier's client, used by scene services: logical prior name in, SDS gradients out.

    client = GuidanceClient(Registry.load("deploy/config/registry.yaml"))
    result = client.compute_sds(SdsRequest(job_id="j1", prior="analytic", images=..., prompt="a red torus", ...))
    client.close()

The same calls work against a standalone grpcio server and a Ray Serve application (the registry says which),
either through Serve's gRPC proxy or, from inside the Ray cluster, through its DeploymentHandle (`serve-handle`):
one channel per address, a deadline per attempt, and failures raised as `shared.errors` exceptions carrying the
field the server named. Failures that mean the tier is down or restarting (`is_outage`) are retried with jittered
exponential backoff (honouring the server's google.rpc.RetryInfo) for the registry's `client.outage_window_s`;
then the call raises Unavailable with field "guidance". A caller that may go away meanwhile (a scene's RunSteps)
wraps the call in `stop_retrying_when(check)` and gets Cancelled instead of waiting out the window.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import OrderedDict
import dataclasses
import itertools
import random
import re
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator

import grpc
from magic3d.v1 import guidance_pb2, guidance_pb2_grpc

from shared.errors import (
    OUTAGE_CODES,
    Cancelled,
    FailedPrecondition,
    NotFound,
    Unavailable,
    error_from_rpc,
    with_code_name,
)
from shared.grpcio import insecure_channel
from shared.guidance_types import PromptCheck, prompt_check_from_proto
from shared.logging import get_logger
from shared.registry import Endpoint, Registry
from shared.serve_handle import Outage

if TYPE_CHECKING:  # the guidance contract imports torch; the orchestrator uses this client without it
    from shared.guidance_api import PriorInfo, SdsRequest, SdsResult
    from shared.serve_handle import HandleInvoker


def _api():
    """The proto <-> contract translation, imported on first use: it imports torch (tensors), which a caller that
    only checks prompts (the orchestrator) never needs."""
    from shared import guidance_api

    return guidance_api

log = get_logger(__name__)

# Down, restarting or overloaded: the same call may well succeed a little later. A single attempt past its deadline
# counts too: a replica that hangs (a wedged GPU, a dead node not yet noticed) looks like this, and Serve routes the
# next attempt to another replica.
# How Ray reports a replica that died (or cannot be reached) mid-call. Serve's gRPC proxy answers those with
# INTERNAL and str() of the exception (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError),
# never UNAVAILABLE; any other INTERNAL/UNKNOWN is a bug on the server and is not retried.
_REPLICA_GONE = re.compile(
    r"actor died|ActorDiedError|RayActorError|ActorUnavailableError|actor \S* ?is unavailable"
    r"|actor experienced an error|worker died unexpectedly|WorkerCrashedError",
    re.IGNORECASE,
)
# The field a server names when it does not hold a reference image sent earlier (the caller resends it).
REFERENCE_IMAGE_FIELD = "image_condition.image"
# Reference images remembered as sent, per (address, application): enough for every job a scene runs at once.
_SENT_IMAGES_KEPT = 4096
# Polling period of the caller's cancellation check while waiting between attempts.
_CANCEL_POLL_S = 0.1
_stop_check: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("guidance_stop", default=None)


def is_outage(code: grpc.StatusCode, message: str) -> bool:
    """Whether a failed attempt means the tier is down or restarting (retry later), not that the call is wrong."""
    if code in OUTAGE_CODES:
        return True
    return code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and bool(_REPLICA_GONE.search(message))


@contextlib.contextmanager
def stop_retrying_when(check: Callable[[], bool]) -> Iterator[None]:
    """Within the block, guidance calls of this thread stop retrying an outage (raising Cancelled) once `check()`."""
    token = _stop_check.set(check)
    try:
        yield
    finally:
        _stop_check.reset(token)


def shorten(text: str, limit: int = 200) -> str:
    """One line of at most `limit` characters (Serve's messages carry whole tracebacks)."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class GuidanceClient:
    """Thread-safe; one channel per server address, shared by every logical prior routed to it."""

    def __init__(self, registry: Registry, token: str | None = None) -> None:
        """`token`: the service token to send; default: the registry client settings' (file or env var)."""
        self.registry = registry
        self.settings = registry.client
        self._token = token if token is not None else self.settings.service_token()
        self._stubs: dict[str, tuple[grpc.Channel, guidance_pb2_grpc.GuidanceServiceStub]] = {}
        self._handles: dict[tuple, HandleInvoker] = {}
        self._lock = threading.Lock()
        self._closed = False
        # (address, application, image digest) of reference images a server has already received.
        self._sent_images: OrderedDict[tuple[str, str, str], None] = OrderedDict()

    # -- public API -------------------------------------------------------------------------------------------

    def endpoint(self, name: str) -> Endpoint:
        return self.registry.resolve(name)

    def list_priors(
        self, name: str, timeout_s: float | None = None, outage_window_s: float | None = None
    ) -> list[PriorInfo]:
        """Every prior served where the logical prior `name` is served."""
        endpoint = self.endpoint(name)
        response = self._call(endpoint, "ListPriors", guidance_pb2.ListPriorsRequest(), timeout_s, outage_window_s)
        return [_api().prior_info_from_proto(p) for p in response.priors]

    def prior_info(self, name: str, timeout_s: float | None = None, outage_window_s: float | None = None) -> PriorInfo:
        """The description of the prior behind logical name `name`."""
        endpoint = self.endpoint(name)
        for info in self.list_priors(name, timeout_s, outage_window_s):
            if info.name == endpoint.prior:
                return info
        raise NotFound(f"{endpoint.address} does not serve prior {endpoint.prior!r}", "prior")

    def check_prompt(
        self,
        prior: str,
        prompt: str,
        negative_prompt: str = "",
        checkpoint_id: str = "",
        timeout_s: float | None = None,
        outage_window_s: float | None = None,
    ) -> PromptCheck:
        """Checks a prompt against the prior behind logical name `prior` before any work starts.

        Raises NotFound (field `prior` / `checkpoint_id`) for an unknown prior or checkpoint and InvalidArgument
        (field `prompt` / `negative_prompt`) for a blank prompt, one over the token limit (the longest view suffix
        included) or, for the analytic prior, one naming no known object. A checkpoint id given here wins over
        the registry's, as in `compute_sds`.
        """
        endpoint = self.endpoint(prior)
        checkpoint = checkpoint_id or endpoint.checkpoint_id
        if checkpoint != endpoint.checkpoint_id:
            endpoint = dataclasses.replace(endpoint, checkpoint_id=checkpoint)
        message = guidance_pb2.CheckPromptRequest(
            prior=endpoint.prior, checkpoint_id=checkpoint, prompt=prompt, negative_prompt=negative_prompt
        )
        response = self._call(endpoint, "CheckPrompt", message, timeout_s, outage_window_s)
        return prompt_check_from_proto(response)

    def compute_sds(
        self, request: SdsRequest, timeout_s: float | None = None, outage_window_s: float | None = None
    ) -> SdsResult:
        """SDS gradients for `request`, whose `prior` is a logical name (resolved through the registry).

        A checkpoint id in the request wins over the registry's; the result's gradient has the images' shape.
        `timeout_s` bounds each attempt, `outage_window_s` how long an outage is retried (None: the registry's).
        Learned embeddings the registry names for `prior` are added to the request's. A reference image
        (request.image_condition) goes to each (address, application) once, then its digest
        alone; a server that answers that it does not hold it (FAILED_PRECONDITION on `image_condition.image`: a
        new replica, or the image evicted) gets it once more.
        """
        endpoint = self.endpoint(request.prior)
        checkpoint = request.checkpoint_id or endpoint.checkpoint_id
        if checkpoint != endpoint.checkpoint_id:
            endpoint = dataclasses.replace(endpoint, checkpoint_id=checkpoint)
        if endpoint.learned_embeddings:  # the registry's, after the request's own
            names = tuple(dict.fromkeys((*request.learned_embeddings, *endpoint.learned_embeddings)))
            request = dataclasses.replace(request, learned_embeddings=names)
        image_key = self._image_key(endpoint, request)
        with_image = image_key is None or not self._image_sent(image_key)
        try:
            response = self._call(endpoint, "ComputeSds", self._sds_message(request, endpoint, with_image),
                                  timeout_s, outage_window_s)
        except FailedPrecondition as error:
            if with_image or error.field != REFERENCE_IMAGE_FIELD:
                raise
            log.info("guidance_image_resent", address=endpoint.address, job_id=request.job_id)
            response = self._call(endpoint, "ComputeSds", self._sds_message(request, endpoint, True),
                                  timeout_s, outage_window_s)
        if image_key is not None:
            self._remember_image(image_key)
        return _api().sds_result_from_proto(response)

    @staticmethod
    def _sds_message(request: SdsRequest, endpoint: Endpoint, with_image: bool):
        message = _api().sds_request_to_proto(request, with_image=with_image)
        message.prior = endpoint.prior
        message.checkpoint_id = endpoint.checkpoint_id
        return message

    @staticmethod
    def _image_key(endpoint: Endpoint, request: SdsRequest) -> tuple[str, str, str] | None:
        condition = request.image_condition
        if condition is None or condition.image is None:
            return None
        return (endpoint.address, endpoint.application or "", condition.image_sha256)

    def _image_sent(self, key: tuple[str, str, str]) -> bool:
        with self._lock:
            return key in self._sent_images

    def _remember_image(self, key: tuple[str, str, str]) -> None:
        with self._lock:
            self._sent_images[key] = None
            self._sent_images.move_to_end(key)
            while len(self._sent_images) > _SENT_IMAGES_KEPT:
                self._sent_images.popitem(last=False)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            stubs, self._stubs = self._stubs, {}
            self._handles.clear()
        for channel, _ in stubs.values():
            channel.close()

    def __enter__(self) -> "GuidanceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport --------------------------------------------------------------------------------------------

    def _stub(self, address: str) -> guidance_pb2_grpc.GuidanceServiceStub:
        with self._lock:
            if self._closed:
                raise Unavailable("guidance client is closed")
            if address not in self._stubs:
                # No channel-level retry policy: the attempts are ours (`_call`), and gRPC's own
                # backed-off retries inside an attempt would only stretch it past the outage window.
                channel = insecure_channel(
                    address, max_bytes=self.settings.max_message_bytes,
                    max_reconnect_backoff_s=self.settings.max_backoff_s, token=self._token, tls=self.settings.tls,
                )
                self._stubs[address] = (channel, guidance_pb2_grpc.GuidanceServiceStub(channel))
            return self._stubs[address][1]

    def _call(
        self, endpoint: Endpoint, method: str, message, timeout_s: float | None, outage_window_s: float | None
    ):
        """One RPC, each attempt under its own deadline; outages retried with jittered backoff for the window."""
        attempt_timeout = timeout_s if timeout_s is not None else self.settings.timeout_s
        window = outage_window_s if outage_window_s is not None else self.settings.outage_window_s
        backoff = self.settings.initial_backoff_s
        down_since: float | None = None
        for attempt in itertools.count(1):
            try:
                return self._attempt(endpoint, method, message, attempt_timeout)
            except Outage as outage:
                error, last = outage.error, shorten(outage.text)
            now = time.monotonic()
            down_since = now if down_since is None else down_since
            down_for = now - down_since
            if down_for >= window:
                raise Unavailable(f"guidance tier unreachable for {down_for:.0f} s: {last}", "guidance")
            delay = min(max(backoff, error.retry_after_s or 0.0), self.settings.max_backoff_s)
            delay = min(delay * (0.5 + random.random() / 2), window - down_for)
            log.warning("guidance_retry", method=method, address=endpoint.address, attempt=attempt,
                        elapsed_s=round(down_for, 2), delay_s=round(delay, 2), error=last)
            self._wait(delay, method)
            backoff = min(backoff * 2, self.settings.max_backoff_s)
        raise AssertionError("unreachable")

    def _attempt(self, endpoint: Endpoint, method: str, message, timeout_s: float):
        """One attempt: the response, the caller's error (ServiceError), or Outage when a retry may succeed."""
        if endpoint.kind == "serve-handle":
            return self._handle(endpoint).invoke(method, message, timeout_s)
        rpc = getattr(self._stub(endpoint.address), method)
        try:
            # Fail fast when the server is down (no wait_for_ready): our own backed-off attempts decide how long
            # to keep trying, so an unreachable tier surfaces as UNAVAILABLE, not as a spent deadline.
            return rpc(message, timeout=timeout_s, metadata=endpoint.metadata or None)
        except grpc.RpcError as rpc_error:
            error = error_from_rpc(rpc_error)
            code = rpc_error.code() if callable(getattr(rpc_error, "code", None)) else grpc.StatusCode.UNKNOWN
            details = (rpc_error.details() if callable(getattr(rpc_error, "details", None)) else None) or ""
            if not is_outage(code, details):
                raise error from None
            raise Outage(error, with_code_name(code, details)) from None

    def _handle(self, endpoint: Endpoint) -> "HandleInvoker":
        """The DeploymentHandle of a serve-handle route (Ray joined on first use), one per endpoint."""
        from shared.serve_handle import HandleInvoker

        key = (endpoint.address, endpoint.application, endpoint.prior, endpoint.checkpoint_id)
        with self._lock:
            if self._closed:
                raise Unavailable("guidance client is closed")
            if key not in self._handles:
                self._handles[key] = HandleInvoker(endpoint)
            return self._handles[key]

    @staticmethod
    def _wait(delay: float, method: str) -> None:
        """Sleeps `delay` seconds between attempts; raises Cancelled as soon as the caller's stop check says so."""
        check = _stop_check.get()
        end = time.monotonic() + delay
        while True:
            if check is not None and check():
                raise Cancelled(f"{method} stopped retrying the guidance tier: the caller went away", "guidance")
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, _CANCEL_POLL_S) if check is not None else left)
