"""Calls to a Ray Serve guidance application through its DeploymentHandle: no gRPC proxy on the way.

Serve's gRPC ingress costs two hops per call (client -> proxy over gRPC, proxy -> replica over Ray) and the proxy's
own work; on an H100 that was 11 ms of a 148 ms coarse step (BENCHMARKS.md, "Ray Serve on the GPU"). A caller that
runs inside the Ray cluster (a scene optimizer on a Ray node, or any process with a raylet beside it) can call the
replica's methods directly: one hop, the same batching, multiplexing and autoscaling. The registry names such a
route `kind: serve-handle` (shared/registry.py); `GuidanceClient` uses `HandleInvoker` for it.

Trust: the handle path does not carry the bearer token (a replica checks tokens on its gRPC ingress only): the
caller is already inside the Ray cluster, whose own token authentication guards it.
"""

from __future__ import annotations

import threading
from typing import Any

from shared.errors import OUTAGE_CODES, ServiceError, Unavailable, with_code_name
from shared.registry import Endpoint

# Ray's names for a replica that died or cannot be reached mid-call, and for Serve refusing work it cannot queue.
_OUTAGE_ERRORS = (
    "RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "BackPressureError",
    "DeploymentUnavailableError", "ObjectLostError", "OwnerDiedError",
)
_connect_lock = threading.Lock()


class Outage(Exception):
    """One attempt failed in a way that a later attempt may not: `error` to raise when retrying stops."""

    def __init__(self, error: ServiceError, text: str) -> None:
        super().__init__(text)
        self.error = error
        self.text = text


def connect(ray_address: str) -> None:
    """Joins the Ray cluster once per process (a process that started Ray itself, e.g. a test, is already in)."""
    import ray

    with _connect_lock:
        if not ray.is_initialized():
            ray.init(address=ray_address, log_to_driver=False)


class HandleInvoker:
    """`invoke(method, message, timeout_s)` on one Serve application; the RPC's request and response protobufs."""

    def __init__(self, endpoint: Endpoint) -> None:
        from ray import serve

        connect(endpoint.address)
        self.endpoint = endpoint
        self._handle = serve.get_app_handle(endpoint.application or "").options(
            multiplexed_model_id=f"{endpoint.prior}:{endpoint.checkpoint_id or 'default'}"
        )

    def invoke(self, method: str, message: Any, timeout_s: float) -> Any:
        response = getattr(self._handle, method).remote(message)
        try:
            return response.result(timeout_s=timeout_s)
        except BaseException as raised:  # noqa: BLE001 - sorted into the caller's error, an outage, or a bug below
            if isinstance(raised, TimeoutError):
                response.cancel()
            raise _translate(raised) from None


def _translate(raised: BaseException) -> BaseException:
    """The replica's ServiceError as itself (or as an Outage when its code says retry); Ray's outages as Outage."""
    cause = getattr(raised, "cause", raised)  # RayTaskError carries the replica's exception as `cause`
    if isinstance(cause, ServiceError):
        clean = type(cause)(cause.message, cause.field, cause.retry_after_s)
        return Outage(clean, with_code_name(clean.code, str(clean))) if clean.code in OUTAGE_CODES else clean
    names = {kind.__name__ for kind in type(raised).__mro__} | {kind.__name__ for kind in type(cause).__mro__}
    if isinstance(raised, TimeoutError) or names & set(_OUTAGE_ERRORS):
        text = f"{type(cause).__name__}: {str(cause)[:200]}"
        return Outage(Unavailable(text, "guidance"), text)
    return raised
