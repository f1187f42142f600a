"""Service errors that carry a gRPC code and field-level details (google.rpc.Status, AIP-193).

Plain Python code raises these; servicers turn them into gRPC statuses with `to_rpc_status`.
The math never imports grpc types beyond this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

# Bounds on what one error carries to a client: gRPC trailers are small (8 KiB by default in most stacks), and an
# echoed request value (a 10 KB job id) must not overflow them.
MAX_MESSAGE_CHARS = 1024
MAX_ECHO_CHARS = 80


def shorten(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`text` cut to `limit` characters with an ellipsis (for values echoed into messages: ids, names, prompts)."""
    text = str(text)
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "\u2026"


def echo(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """repr() of a client-given value, shortened: `no job 'abc...'`."""
    return repr(value) if len(str(value)) <= limit else repr(shorten(str(value), limit))


@dataclass
class ServiceError(Exception):
    """An error meant for the caller. `field` names the request field at fault, dotted (`images.shape`)."""

    message: str
    field: str | None = None
    retry_after_s: float | None = None
    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    def to_rpc_status(self) -> status_pb2.Status:
        details: list[any_pb2.Any] = []
        if self.field is not None:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=shorten(self.field, 256), description=shorten(self.message, MAX_MESSAGE_CHARS)
                    )
                ]
            )
            details.append(_pack(bad))
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        return status_pb2.Status(
            code=getattr(code_pb2, self.code.name), message=shorten(str(self), MAX_MESSAGE_CHARS), details=details
        )


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


def field_violations(rpc_error: grpc.RpcError) -> dict[str, str]:
    """Client side: the BadRequest field violations carried by an RpcError, as {field: description}."""
    from grpc_status import rpc_status

    status = rpc_status.from_call(rpc_error)
    found: dict[str, str] = {}
    if status is None:
        return found
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.update({v.field: v.description for v in bad.field_violations})
    return found
