"""gRPC channel and server helpers shared by every service: message limits, retries in one place."""

from __future__ import annotations

import json
import signal
import socket
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Callable, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from shared.auth import BearerAuthInterceptor, ClientTlsConfig, TlsConfig, TokenTable, with_bearer_token
from shared.errors import ServiceError
from shared.logging import get_logger
from shared.metrics import MetricsServer

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# What a client learns of a bug: the code and this line, never the exception's text (paths, pids, tracebacks).
INTERNAL_ERROR_MESSAGE = "internal error; the service logged it"

log = get_logger(__name__)


def abort_with(context: grpc.ServicerContext, error: ServiceError) -> NoReturn:
    """Ends the RPC with the error's code, message and google.rpc.Status details (field violations, retry info).
    Never returns: grpc's `abort_with_status` raises, which is what lets handlers end on `abort_with(...)`."""
    context.abort_with_status(rpc_status.to_status(error.to_rpc_status()))
    raise RuntimeError("ServicerContext.abort_with_status returned instead of raising")


class LastResortInterceptor(grpc.ServerInterceptor):
    """Turns an exception that escaped a handler (a bug, not a ServiceError) into INTERNAL with a generic message,
    and logs its traceback here. Without it grpcio answers UNKNOWN with the exception's text. Aborts (the
    servicers' own statuses) pass through untouched."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_guard_unary(handler.unary_unary, method))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_guard_stream(handler.unary_stream, method))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=_guard_unary(handler.stream_unary, method))
        return handler._replace(stream_stream=_guard_stream(handler.stream_stream, method))


def _internal(context: grpc.ServicerContext, method: str) -> None:
    if context.code() is not None:  # the handler chose its status (abort_with) before raising: keep it
        raise
    log.exception("rpc_failed", method=method)
    context.abort(grpc.StatusCode.INTERNAL, INTERNAL_ERROR_MESSAGE)


def _guard_unary(behaviour: Callable, method: str) -> Callable:
    def guarded(request, context):
        try:
            return behaviour(request, context)
        except Exception:  # noqa: BLE001 - the last resort: every error leaves as a proper status
            _internal(context, method)

    return guarded


def _guard_stream(behaviour: Callable, method: str) -> Callable:
    def guarded(request, context):
        try:
            yield from behaviour(request, context)
        except Exception:  # noqa: BLE001 - as above, for streams
            _internal(context, method)

    return guarded


def message_size_options(max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", max_bytes)]


def retry_service_config(service: str, max_attempts: int = 4, initial_backoff_s: float = 0.2) -> str:
    """gRPC's built-in retry policy: UNAVAILABLE and RESOURCE_EXHAUSTED are retried with exponential backoff."""
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": service}],
                    "retryPolicy": {
                        "maxAttempts": max_attempts,
                        "initialBackoff": f"{initial_backoff_s}s",
                        "maxBackoff": "5s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
                    },
                }
            ]
        }
    )


def insecure_channel(
    address: str,
    service: str | None = None,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_reconnect_backoff_s: float | None = None,
    token: str | None = None,
    tls: ClientTlsConfig | None = None,
) -> grpc.Channel:
    """A channel with our limits (and retries for `service`); with `token`, every call carries it as a bearer
    token; with `tls`, the channel is TLS (verified against `tls.ca_file`) despite the historical name.
    `max_reconnect_backoff_s` caps gRPC's own reconnect backoff (default 120 s): after a long outage the channel
    would otherwise notice a restarted server only at its next, far-off reconnect attempt."""
    options: list[tuple[str, object]] = list(message_size_options(max_bytes))
    if service is not None:
        options += [("grpc.enable_retries", 1), ("grpc.service_config", retry_service_config(service))]
    if max_reconnect_backoff_s is not None:
        backoff_ms = max(1, int(max_reconnect_backoff_s * 1000))
        options += [
            ("grpc.initial_reconnect_backoff_ms", min(1000, backoff_ms)),
            ("grpc.min_reconnect_backoff_ms", min(1000, backoff_ms)),
            ("grpc.max_reconnect_backoff_ms", backoff_ms),
        ]
    if tls is not None:
        channel = grpc.secure_channel(address, tls.channel_credentials(), options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    return with_bearer_token(channel, token)


@dataclass
class RunningServer:
    """A started grpcio server with its health servicer; `servicer` is the service's own, for in-process access."""

    server: grpc.Server
    port: int
    servicer: Any
    health: health.HealthServicer
    on_stop: Callable[[], None] | None = None
    # Runs after the health turns NOT_SERVING and before the server stops taking calls: in-flight work winds down.
    before_stop: Callable[[], None] | None = None
    # The service's Prometheus /metrics endpoint, where it serves one; shut down last, after `on_stop`.
    metrics: MetricsServer | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        return self.metrics.port if self.metrics is not None else None

    def stop(self, grace: float | None = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        if self.before_stop is not None:
            self.before_stop()
        self.server.stop(grace).wait()
        if self.on_stop is not None:
            self.on_stop()
        if self.metrics is not None:
            self.metrics.shutdown()


def start_server(
    servicer: Any,
    add_to_server: Callable[[Any, grpc.Server], None],
    service_name: str,
    address: str,
    max_workers: int,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    maximum_concurrent_rpcs: int | None = None,
    enable_reflection: bool = False,
    on_stop: Callable[[], None] | None = None,
    before_stop: Callable[[], None] | None = None,
    tokens: TokenTable | None = None,
    tls: TlsConfig | None = None,
    metrics: MetricsServer | None = None,
) -> RunningServer:
    """Starts `servicer` with grpc.health.v1 (SERVING for "" and `service_name`), optional reflection, and our
    message limits; `address` may use port 0 for any free port. With `tokens` (non-empty), every call but health
    and reflection needs one of them as a bearer token; with `tls`, the port is TLS only. `metrics`, the service's
    already started /metrics server, is shut down with it."""
    interceptors = [BearerAuthInterceptor(tokens, service_name.rsplit(".", 1)[-1])] if tokens else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=service_name.rsplit(".", 1)[-1]),
        options=message_size_options(max_message_bytes),
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
        interceptors=[*interceptors, LastResortInterceptor()],
    )
    add_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if enable_reflection:
        from grpc_reflection.v1alpha import reflection

        reflection.enable_server_reflection((service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if tls is not None:
        port = server.add_secure_port(address, tls.server_credentials())
    else:
        port = server.add_insecure_port(address)
    server.start()
    for name in ("", service_name):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, port, servicer, health_servicer, on_stop, before_stop, metrics)


def config_from_command_line(description: str, load: Callable[[str], Any], default: Callable[[], Any], what: str) -> Any:
    """A service's `--config FILE [--host H] [--port P]` command line as its typed config (`default()` without a
    file; --host and --port win over the file), with JSON logging configured."""
    import argparse

    from shared import logging as project_logging

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help=f"{what} YAML (default: built-in defaults)")
    parser.add_argument("--host", default=None, help="listen address (default: the config's, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args()
    project_logging.configure()
    config = load(args.config) if args.config else default()
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    return config.model_copy(update=overrides)


def serve_until_signalled(running: RunningServer, grace: float = 5.0) -> None:
    """Blocks until SIGTERM or SIGINT, then stops gracefully (Kubernetes sends SIGTERM on scale-down)."""
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    stopped.wait()
    running.stop(grace=grace)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now (the OS's pick), for servers whose port must be known before they start."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
