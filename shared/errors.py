"""Service errors that carry a gRPC code and field-level details (google.rpc.Status, AIP-193).

Plain Python code raises these; servicers turn them into gRPC statuses with `to_rpc_status`.
Clients turn a failed call back into one with `error_from_rpc` (the same class, field and retry delay).
The math never imports grpc types beyond this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

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


# The codes that mean the callee is down, restarting or overloaded: a later attempt may succeed, so callers retry
# them for a bounded window (shared/guidance_client.py, shared/serve_handle.py); any other code is the answer.
OUTAGE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)


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


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED


_ERRORS: dict[grpc.StatusCode, type[ServiceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def with_code_name(code: grpc.StatusCode, message: str) -> str:
    """"<CODE>: message", once: an error passed on through several services keeps a single prefix."""
    prefix = f"{code.name}: "
    return message if message.startswith(prefix) else prefix + message


def error_from_rpc(error: grpc.RpcError) -> ServiceError:
    """An RpcError as the matching shared.errors exception, with the field and retry delay the server sent.

    Codes with no class of their own (INTERNAL, UNKNOWN, ...) become a plain ServiceError (code INTERNAL) whose
    message starts with the original code's name.
    """
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    message = (error.details() if callable(getattr(error, "details", None)) else None) or str(code)
    field: str | None = None
    retry_after_s: float | None = None
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # details that do not match the call's code/message: ignore them
        status = None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                if bad.field_violations and field is None:
                    field = bad.field_violations[0].field
                    message = bad.field_violations[0].description or message
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                retry_after_s = info.retry_delay.ToNanoseconds() / 1e9
    cls = _ERRORS.get(code)
    if cls is None:
        return ServiceError(with_code_name(code, message), field, retry_after_s)
    # The server formats its message as "<field>: <description>"; keep the description only.
    if field is not None and message.startswith(f"{field}: "):
        message = message[len(field) + 2 :]
    return cls(message, field, retry_after_s)


def field_violations(rpc_error: grpc.RpcError) -> dict[str, str]:
    """Client side: the BadRequest field violations carried by an RpcError, as {field: description}."""
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
