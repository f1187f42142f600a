"""gRPC channel and server helpers shared by every service: message limits, retries in one place."""

from __future__ import annotations

import json

import grpc

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


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
    address: str, service: str | None = None, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> grpc.Channel:
    options: list[tuple[str, object]] = list(message_size_options(max_bytes))
    if service is not None:
        options += [("grpc.enable_retries", 1), ("grpc.service_config", retry_service_config(service))]
    return grpc.insecure_channel(address, options=options)
