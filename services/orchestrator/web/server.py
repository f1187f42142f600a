"""The orchestrator's web page and its JSON/server-sent-events API, over the standard library's HTTP server.

    GET  /                                   the page (static/index.html)
    GET  /static/...                         its scripts, styles and the vendored three.js
    GET  /api/presets                        preset names (the form's select)
    GET  /api/jobs                           the caller's jobs (admins: all), newest first
    POST /api/jobs                           submit (JSON, `translate.SubmitForm`) -> the job
    GET  /api/jobs/{id}                      one job
    POST /api/jobs/{id}/cancel               cancel it
    GET  /api/jobs/{id}/events               text/event-stream of WatchJob's events (a snapshot first)
    GET  /api/jobs/{id}/artifacts/{name}     an artifact (model.glb, model.obj, ...) or previews/<file>.png

A thin translator like the gRPC servicer: it calls the same `OrchestratorServicer` helpers in-process (ownership,
validation, the event stream), and maps `ServiceError`s to HTTP statuses with a JSON body naming the field.

Authentication uses the orchestrator's client tokens (the same as Generate's): `Authorization: Bearer <token>`,
or the `magic3d_token` cookie that `GET /?token=<token>` sets (HttpOnly, SameSite=Strict) so that the page's
EventSource and downloads carry it. Every POST must be `application/json` (a cross-site form cannot send that
without a CORS preflight, which this server never grants). With authentication off (no tokens, loopback) every caller is the
local admin, as over gRPC.
"""

from __future__ import annotations

import json
import mimetypes
import ssl
import threading
import urllib.parse
from dataclasses import dataclass
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc

from services.orchestrator.servicer import OrchestratorServicer
from services.orchestrator.web import translate
from shared import artifact_keys
from shared import logging as project_logging
from shared.auth import LOCAL_PRINCIPAL, Principal, TlsConfig, TokenTable, acting_as, current_principal
from shared.errors import InvalidArgument, NotFound, ServiceError

log = project_logging.get_logger(__name__)
STATIC_DIR = Path(__file__).resolve().parent / "static"
TOKEN_COOKIE = "magic3d_token"
MAX_BODY_BYTES = 48 * 1024 * 1024  # an image upload, base64: the orchestrator's own image limits apply after
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.UNAUTHENTICATED: HTTPStatus.UNAUTHORIZED,
    grpc.StatusCode.PERMISSION_DENIED: HTTPStatus.FORBIDDEN,
    grpc.StatusCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION: HTTPStatus.CONFLICT,
    grpc.StatusCode.ALREADY_EXISTS: HTTPStatus.CONFLICT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: HTTPStatus.TOO_MANY_REQUESTS,
    grpc.StatusCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: HTTPStatus.GATEWAY_TIMEOUT,
}
mimetypes.add_type("model/gltf-binary", ".glb")
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/plain", ".obj")
mimetypes.add_type("text/plain", ".mtl")


class HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


@dataclass
class WebServer:
    """A started page server; `stop()` ends it (open event streams end at their next keep-alive, which the
    servicer's `idle_check_s` paces)."""

    httpd: ThreadingHTTPServer
    thread: threading.Thread
    stopping: threading.Event
    scheme: str

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self.httpd.server_address[0]
        return f"{self.scheme}://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}/"

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def start_web(
    servicer: OrchestratorServicer, host: str, port: int, tokens: TokenTable | None, tls: TlsConfig | None = None
) -> WebServer:
    """Serves the page on host:port (0: any free port) in a background thread; TLS with the orchestrator's
    certificate when `tls` is set."""
    stopping = threading.Event()
    handler = type("PageHandler", (PageHandler,), {"servicer": servicer, "tokens": tokens, "stopping": stopping})
    httpd = ThreadingHTTPServer((host, port), handler)
    httpd.daemon_threads = True
    scheme = "http"
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls.cert_file, tls.key_file)
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="web", daemon=True)
    thread.start()
    server = WebServer(httpd, thread, stopping, scheme)
    log.info("web_serving", url=server.url, auth=tokens is not None)
    return server


class _StreamContext:
    """What `OrchestratorServicer.job_events` asks of a gRPC context: whether the client is still there. Each check
    writes an SSE comment, so a closed tab is noticed within one check."""

    def __init__(self, handler: "PageHandler") -> None:
        self.handler = handler

    def is_active(self) -> bool:
        if self.handler.stopping.is_set():
            return False
        try:
            self.handler.wfile.write(b": keepalive\n\n")
            self.handler.wfile.flush()
            return True
        except OSError:
            return False


class PageHandler(BaseHTTPRequestHandler):
    servicer: OrchestratorServicer
    tokens: TokenTable | None
    stopping: threading.Event
    server_version = "magic3d-web"

    # -- dispatch ---------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.split("/") if p]
        try:
            if method == "GET" and not parts:
                return self._page(urllib.parse.parse_qs(url.query))
            principal = self._principal()
            if principal is None:
                raise HttpError(HTTPStatus.UNAUTHORIZED, "missing or invalid token: send 'Authorization: Bearer "
                                "<token>' or open the page with ?token=<token>")
            if method == "POST" and self._content_type() != "application/json":  # no cross-site form sends JSON
                raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send application/json", "Content-Type")
            with acting_as(principal):
                self._route(method, parts, urllib.parse.parse_qs(url.query))
        except HttpError as error:
            self._error(error.status, error.message, error.field)
        except ServiceError as error:
            self._error(HTTP_STATUS.get(error.code, HTTPStatus.INTERNAL_SERVER_ERROR), error.message, error.field,
                        error.code.name)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away
        except Exception:  # noqa: BLE001 - one failed request must not take the server down; logged with its trace
            log.exception("web_request_failed", method=method, path=url.path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (see the orchestrator's log)")

    def _route(self, method: str, parts: list[str], query: dict[str, list[str]]) -> None:
        match method, parts:
            case "GET", ["static", *rest]:
                self._static(rest)
            case "GET", ["api", "presets"]:
                self._json(HTTPStatus.OK, self._presets())
            case "GET", ["api", "jobs"]:
                self._json(HTTPStatus.OK, self._list(query))
            case "POST", ["api", "jobs"]:
                self._json(HTTPStatus.CREATED, self._submit())
            case "GET", ["api", "jobs", job_id]:
                self._json(HTTPStatus.OK, translate.job_json(self._owned(job_id)))
            case "POST", ["api", "jobs", job_id, "cancel"]:
                self._json(HTTPStatus.OK, translate.job_json(self.servicer.runner.cancel(self._owned(job_id).job_id)))
            case "GET", ["api", "jobs", job_id, "events"]:
                self._events(job_id)
            case "GET", ["api", "jobs", job_id, "artifacts", *name] if name:
                self._artifact(job_id, "/".join(name))
            case _:
                raise HttpError(HTTPStatus.NOT_FOUND, f"no such resource: {method} /{'/'.join(parts)}")

    # -- authentication ---------------------------------------------------------------------------------------

    def _principal(self, token: str | None = None) -> Principal | None:
        if self.tokens is None:
            return LOCAL_PRINCIPAL
        token = token or self._presented_token()
        return self.tokens.lookup(token) if token else None

    def _presented_token(self) -> str | None:
        scheme, _, value = (self.headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        cookie = SimpleCookie()
        try:
            cookie.load(self.headers.get("Cookie") or "")
        except Exception:  # noqa: BLE001 - a malformed cookie header is no credential
            return None
        return cookie[TOKEN_COOKIE].value if TOKEN_COOKIE in cookie else None

    def _page(self, query: dict[str, list[str]]) -> None:
        """The page; `?token=` (a valid one) becomes the cookie and the address loses it (it would stay in the
        history and in screenshots)."""
        if "token" in query:
            token = query["token"][0]
            if self._principal(token) is None:
                return self._login(HTTPStatus.UNAUTHORIZED, "that token is not valid")
            self.send_response(HTTPStatus.SEE_OTHER)
            self.send_header("Location", "/")
            self.send_header("Set-Cookie", f"{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self._principal() is None:
            return self._login(HTTPStatus.UNAUTHORIZED, "")
        self._file(STATIC_DIR / "index.html")

    def _login(self, status: HTTPStatus, problem: str) -> None:
        body = (STATIC_DIR / "login.html").read_text().replace("{{problem}}", problem).encode()
        self._send(status, body, "text/html; charset=utf-8")

    # -- resources --------------------------------------------------------------------------------------------

    def _presets(self) -> dict[str, Any]:
        book = self.servicer.runner.presets
        return {
            "default": book.default,
            "default_image": book.default_image,
            "presets": [{"name": name, "image": preset.image is not None} for name, preset in book.presets.items()],
        }

    def _list(self, query: dict[str, list[str]]) -> dict[str, Any]:
        try:
            page_size = int(query.get("page_size", ["50"])[0])
        except ValueError:
            raise InvalidArgument("must be an integer", "page_size") from None
        if not 0 < page_size <= 1000:
            raise InvalidArgument(f"must be in 1..1000, got {page_size}", "page_size")
        caller = current_principal()
        try:
            records, token = self.servicer.runner.jobs.list(
                page_size, query.get("page_token", [""])[0], owner=None if caller.admin else caller.name
            )
        except ValueError as error:
            raise InvalidArgument(str(error), "page_token") from None
        return {"jobs": [translate.job_json(r) for r in records], "next_page_token": token}

    def _submit(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"over {MAX_BODY_BYTES} bytes", "body")
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InvalidArgument(f"not JSON: {error}", "body") from None
        form = translate.parse_submit(body)
        record, _ = self.servicer.submit(translate.submit_request(form))
        log.info("web_job_submitted", job_id=record.job_id, principal=current_principal().name)
        return translate.job_json(record)

    def _content_type(self) -> str:
        return (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()

    def _owned(self, job_id: str):
        return self.servicer.owned_job(f"jobs/{job_id}")

    def _events(self, job_id: str) -> None:
        record = self._owned(job_id)  # 404/403 before the stream starts
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        try:
            for event in self.servicer.job_events(record.job_id, _StreamContext(self)):
                data = translate.event_json(record.job_id, event, lambda uri: self._preview_name(record.job_id, uri))
                self.wfile.write(f"event: job\ndata: {json.dumps(data)}\n\n".encode())
                self.wfile.flush()
        except OSError:
            pass  # the browser went away
        except Exception:  # noqa: BLE001 - the headers are sent: end the stream (the page's EventSource reconnects)
            log.exception("web_event_stream_failed", job_id=record.job_id)

    def _preview_name(self, job_id: str, uri: str) -> str | None:
        """A preview's name within its job ("previews/coarse-0000002.png") from its store link."""
        prefix = artifact_keys.job_prefix(job_id) + "/"
        try:
            key = self.servicer.runner.store.key_from_uri(uri)
        except (KeyError, ValueError):
            return None
        return key[len(prefix):] if key.startswith(prefix + "previews/") else None

    def _artifact(self, job_id: str, name: str) -> None:
        record = self._owned(job_id)
        store = self.servicer.runner.store
        if name in record.artifacts:
            key = store.key_from_uri(record.artifacts[name])
        elif name.startswith("previews/"):
            key = f"{artifact_keys.job_prefix(record.job_id)}/{name}"
            try:
                store.check_key(key)
            except ValueError:
                raise NotFound(f"no artifact {name!r} in job {record.job_id}", "name") from None
        else:
            raise NotFound(f"no artifact {name!r} in job {record.job_id}; it has {sorted(record.artifacts)}", "name")
        try:
            data = store.get(key)
        except KeyError:
            raise NotFound(f"no artifact {name!r} in job {record.job_id}", "name") from None
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        filename = name.rpartition("/")[2]
        self._send(HTTPStatus.OK, data, content_type, {"Content-Disposition": f'inline; filename="{filename}"'})

    def _static(self, parts: list[str]) -> None:
        path = (STATIC_DIR / "/".join(parts)).resolve()
        if not path.is_relative_to(STATIC_DIR) or not path.is_file():
            raise HttpError(HTTPStatus.NOT_FOUND, f"no static file {'/'.join(parts)!r}")
        self._file(path)

    # -- responses --------------------------------------------------------------------------------------------

    def _file(self, path: Path) -> None:
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if content_type.startswith("text/"):
            content_type += "; charset=utf-8"
        self._send(HTTPStatus.OK, path.read_bytes(), content_type)

    def _json(self, status: HTTPStatus, data: Any) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _error(self, status: HTTPStatus, message: str, field: str | None = None, code: str | None = None) -> None:
        self._json(status, {"error": {"status": status.value, "code": code or status.phrase, "field": field,
                                      "message": message}})

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        log.debug("web_request", line=format % args)
