"""Bearer-token authentication for every gRPC server and client, and the TLS settings that go with it.

Two kinds of token:

* client tokens (the orchestrator's edge): a YAML file mapping each token to a principal,
  ``{"<token>": {"principal": "alice", "admin": false}}``; jobs belong to the principal that submitted them;
* the service token (scene and guidance tiers): one shared secret that the orchestrator and the scene services
  send, read from an environment variable (a Kubernetes Secret) or a file.

Servers check ``authorization: Bearer <token>`` with `BearerAuthInterceptor`; grpc.health.v1 and server reflection
stay open so that probes need no secret. Tokens are compared in constant time and never logged or echoed back.
Nothing here imports torch or a service.
"""

from __future__ import annotations

import contextlib
import contextvars
import hmac
import ipaddress
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from pydantic import BaseModel, ConfigDict, Field

AUTHORIZATION = "authorization"
SERVICE_TOKEN_ENV = "MAGIC3D_SERVICE_TOKEN"
CLIENT_TOKEN_ENV = "MAGIC3D_TOKEN"
TOKENS_FILE_ENV = "MAGIC3D_TOKENS_FILE"  # the client tokens file's path, when the config names none (Kubernetes)
LOCAL_CLIENT_TOKEN_FILE = "client-token"  # under the local stack's state dir (services/local_stack.py)
# Methods any caller may reach: liveness/readiness probes and tooling discovery carry no secrets.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class Principal:
    name: str
    admin: bool = False


# What a server without authentication treats every caller as (loopback-only set-ups, see README "Authentication").
LOCAL_PRINCIPAL = Principal("local", admin=True)
_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("magic3d_principal", default=LOCAL_PRINCIPAL)


def current_principal() -> Principal:
    """The caller of the RPC being handled (set by BearerAuthInterceptor; LOCAL_PRINCIPAL when auth is off)."""
    return _current.get()


@contextlib.contextmanager
def acting_as(principal: Principal) -> Iterator[None]:
    """`current_principal()` is `principal` inside the block: for front ends that authenticate a caller themselves
    (the orchestrator's web page) and then call the same handlers as the gRPC interceptor does."""
    token = _current.set(principal)
    try:
        yield
    finally:
        _current.reset(token)


class TlsConfig(BaseModel):
    """Server TLS: a certificate and key (PEM); with `client_ca_file`, clients must present a certificate it
    signed (mTLS)."""

    model_config = ConfigDict(extra="forbid")

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        ca = self.client_ca_file.read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(self.key_file.read_bytes(), self.cert_file.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


class ClientTlsConfig(BaseModel):
    """Client TLS: the CA that signed the server's certificate, and for mTLS this client's certificate and key."""

    model_config = ConfigDict(extra="forbid")

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )


class AuthConfig(BaseModel):
    """Who may call a server. `tokens_file` (else the file named by `tokens_file_env`): client tokens
    (orchestrator). The service token comes from `service_token_file`, else the `service_token_env` environment
    variable; unset means none."""

    model_config = ConfigDict(extra="forbid")

    tokens_file: Path | None = None
    tokens_file_env: str = TOKENS_FILE_ENV
    service_token_env: str = SERVICE_TOKEN_ENV
    service_token_file: Path | None = None
    # Serve without any token on a non-loopback address; must be set explicitly (never the default).
    allow_unauthenticated: bool = False

    def service_token(self) -> str | None:
        if self.service_token_file is not None:
            return _read_secret(self.service_token_file)
        value = os.environ.get(self.service_token_env, "").strip()
        return value or None

    def client_tokens(self) -> TokenTable:
        path = self.tokens_file or os.environ.get(self.tokens_file_env, "").strip() or None
        return TokenTable.load(path) if path is not None else TokenTable({})

    def service_tokens(self) -> TokenTable:
        token = self.service_token()
        return TokenTable({token: Principal("service", admin=True)} if token else {})


class TokenEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    principal: str = Field(min_length=1)
    admin: bool = False


class TokenTable:
    """Tokens -> principals. Lookup compares against every token in constant time per token, so the time taken
    says nothing about how much of a guess was right."""

    def __init__(self, tokens: Mapping[str, Principal]) -> None:
        self._entries = [(token.encode(), principal) for token, principal in tokens.items()]

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:  # never the tokens themselves
        return f"TokenTable({len(self._entries)} tokens)"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TokenTable:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of token -> {{principal, admin}}")
        table: dict[str, Principal] = {}
        for token, entry in data.items():
            if not isinstance(token, str) or len(token) < 16:
                raise ValueError(f"{path}: every token must be a string of at least 16 characters")
            parsed = TokenEntry.model_validate(entry)
            table[token] = Principal(parsed.principal, parsed.admin)
        return cls(table)

    def merged(self, other: TokenTable) -> TokenTable:
        merged = TokenTable({})
        merged._entries = [*self._entries, *other._entries]
        return merged

    def lookup(self, token: str) -> Principal | None:
        presented = token.encode()
        found = None
        for known, principal in self._entries:
            if hmac.compare_digest(known, presented) and found is None:
                found = principal
        return found


def _read_secret(path: Path) -> str | None:
    value = Path(path).read_text().strip()
    return value or None


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` entry in gRPC metadata, or None."""
    for key, value in metadata or ():
        if key.lower() == AUTHORIZATION and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname or 0.0.0.0 / :: (every interface)


class AuthNotConfigured(RuntimeError):
    """A server asked to listen beyond loopback with no tokens and without `allow_unauthenticated: true`."""


def server_tokens(tokens: TokenTable, host: str, allow_unauthenticated: bool, server: str) -> TokenTable | None:
    """The tokens a server checks, or None for no authentication. No authentication is chosen only with no tokens
    configured and either a loopback host (the local stack, `make run`) or an explicit `allow_unauthenticated`;
    each logs a warning. Any other host without tokens refuses to start."""
    from shared import logging as project_logging

    if len(tokens):
        return tokens
    log = project_logging.get_logger(__name__)
    if is_loopback(host):
        log.warning("authentication_off", server=server, host=host, reason="no tokens configured; loopback only")
        return None
    if allow_unauthenticated:
        log.warning("authentication_off", server=server, host=host, reason="allow_unauthenticated is set")
        return None
    raise AuthNotConfigured(
        f"{server}: listening on {host!r} (not loopback) without tokens; configure auth tokens "
        "(auth.tokens_file / the service token) or set auth.allow_unauthenticated: true explicitly"
    )


# -- server side ------------------------------------------------------------------------------------------------

class BearerAuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without a known bearer token with UNAUTHENTICATED; the caller's Principal is available to the
    handler through `current_principal()`."""

    def __init__(self, tokens: TokenTable, realm: str = "magic3d") -> None:
        if not len(tokens):
            raise ValueError("BearerAuthInterceptor needs at least one token")
        self.tokens = tokens
        self.realm = realm

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        principal = self.tokens.lookup(token) if token else None
        if principal is None:
            message = (
                f"{self.realm}: missing credentials: send 'authorization: Bearer <token>' metadata"
                if token is None else f"{self.realm}: the bearer token is not valid"
            )
            return _rewrap(handler, lambda behavior, streaming: _reject(message, streaming))
        return _rewrap(handler, lambda behavior, streaming: _as_principal(behavior, principal, streaming))


def _reject(message: str, streaming: bool) -> Callable:
    def unary(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    def stream(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raises

    return stream if streaming else unary


def _as_principal(behavior: Callable, principal: Principal, streaming: bool) -> Callable:
    def unary(request, context):
        token = _current.set(principal)
        try:
            return behavior(request, context)
        finally:
            _current.reset(token)

    def stream(request, context):
        token = _current.set(principal)
        try:
            yield from behavior(request, context)
        finally:
            _current.reset(token)

    return stream if streaming else unary


def _rewrap(handler: grpc.RpcMethodHandler, wrap: Callable[[Callable, bool], Callable]) -> grpc.RpcMethodHandler:
    """The same handler kind, with its behaviour replaced by `wrap(behaviour, response_streaming)`."""
    kinds = (
        (False, False, "unary_unary", grpc.unary_unary_rpc_method_handler),
        (False, True, "unary_stream", grpc.unary_stream_rpc_method_handler),
        (True, False, "stream_unary", grpc.stream_unary_rpc_method_handler),
        (True, True, "stream_stream", grpc.stream_stream_rpc_method_handler),
    )
    for request_streaming, response_streaming, attribute, factory in kinds:
        if handler.request_streaming == request_streaming and handler.response_streaming == response_streaming:
            return factory(
                wrap(getattr(handler, attribute), response_streaming),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    raise AssertionError("unreachable")


# -- client side ------------------------------------------------------------------------------------------------

class _BearerClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call's metadata (works on plaintext loopback channels too,
    where gRPC refuses call credentials)."""

    def __init__(self, token: str) -> None:
        self._entry = (AUTHORIZATION, f"Bearer {token}")

    def _with_token(self, details):
        metadata = [m for m in (details.metadata or ()) if m[0].lower() != AUTHORIZATION] + [self._entry]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


def with_bearer_token(channel: grpc.Channel, token: str | None) -> grpc.Channel:
    """`channel` sending `token` on every call (unchanged when token is None)."""
    return grpc.intercept_channel(channel, _BearerClientInterceptor(token)) if token else channel
