"""gRPC channel and server helpers shared by every service: message limits, retries in one place."""

from __future__ import annotations

import json
import signal
import socket
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from shared.auth import BearerAuthInterceptor, ClientTlsConfig, TlsConfig, TokenTable, with_bearer_token
from shared.errors import ServiceError

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def abort_with(context: grpc.ServicerContext, error: ServiceError) -> None:
    """Ends the RPC with the error's code, message and google.rpc.Status details (field violations, retry info)."""
    context.abort_with_status(rpc_status.to_status(error.to_rpc_status()))


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
    token: str | None = None,
    tls: ClientTlsConfig | None = None,
) -> grpc.Channel:
    """A channel with our limits (and retries for `service`); with `token`, every call carries it as a bearer
    token; with `tls`, the channel is TLS (verified against `tls.ca_file`) despite the historical name."""
    options: list[tuple[str, object]] = list(message_size_options(max_bytes))
    if service is not None:
        options += [("grpc.enable_retries", 1), ("grpc.service_config", retry_service_config(service))]
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

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float | None = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.on_stop is not None:
            self.on_stop()


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
    tokens: TokenTable | None = None,
    tls: TlsConfig | None = None,
) -> RunningServer:
    """Starts `servicer` with grpc.health.v1 (SERVING for "" and `service_name`), optional reflection, and our
    message limits; `address` may use port 0 for any free port. With `tokens` (non-empty), every call but health
    and reflection needs one of them as a bearer token; with `tls`, the port is TLS only."""
    interceptors = [BearerAuthInterceptor(tokens, service_name.rsplit(".", 1)[-1])] if tokens else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=service_name.rsplit(".", 1)[-1]),
        options=message_size_options(max_message_bytes),
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
        interceptors=interceptors,
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
    return RunningServer(server, port, servicer, health_servicer, on_stop)


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
