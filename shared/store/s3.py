"""Artifacts as objects in an S3-compatible bucket (MinIO, AWS S3, Ceph RGW, ...) through the minio SDK.

Layout. One store is a bucket plus an optional key prefix: `s3://artifacts/magic3d` keeps the artifact key
`jobs/<job_id>/coarse/step-0000100.ckpt` as the object `magic3d/jobs/<job_id>/coarse/step-0000100.ckpt` in the
bucket `artifacts`. Keys are checked with `ArtifactStore.check_key` (no empty, `.` or `..` segments, no leading
`/`) before any request, so a key can never escape the prefix. `list(prefix)` treats the prefix as a folder
(`jobs/ab` lists `jobs/ab/...`, never `jobs/abc/...`), as `LocalStore` does, and returns sorted store keys.

Atomicity: objects appear whole or not at all. `put` sends the payload with its length known up front:
  * up to `part_size` bytes it is one PUT, and S3 PUT is atomic per object: readers see the previous version (or
    nothing) until the upload completes, then the whole new object; a PUT cut short stores nothing, and the
    server checks the Content-Length (and the payload signature) so a truncated body is rejected;
  * above `part_size` (5 MiB at least, as S3 requires of every part but the last) it is a multipart upload:
    the parts are invisible to GET/HEAD/LIST until CompleteMultipartUpload, which publishes the object in one
    step. When a part fails the SDK aborts the upload; an upload orphaned by a killed process stays invisible
    and only costs space until it is cleaned up (MinIO drops stale uploads by itself, `api stale_uploads_expiry`,
    24 h by default; on AWS give the bucket a lifecycle rule with `AbortIncompleteMultipartUpload`).
Two writers of one key: the last completed upload wins; there is never a mix of the two.

Links. `uri(key)` (and `put`'s return value) is a presigned GET URL (AWS Signature V4, query-string auth): anyone
holding it can download that one object, without store credentials, until it expires (`link_expiry_s`, 1 hour by
default, 7 days at most, the S3 limit for SigV4; links are bearer secrets, so they are short-lived, minted when a
client asks for its job, and never logged). Signing is local (no request is made): the region is configured, never looked
up. The signature covers the Host, so the link must name the host the client will reach: inside a cluster the
store's endpoint (`minio.magic3d.svc:9000`) is not reachable by outside clients, so set `public_endpoint` (e.g.
`https://artifacts.example.com`) and links are signed for that host with a second, offline client; the proxy in
front of MinIO must forward the Host header unchanged and not rewrite the path. Links expire and embed a
credential id, so do not keep them in provenance records: `canonical_uri(key)` gives the stable
`s3://bucket/prefix/key` form. `key_from_uri` accepts both that form and presigned links made by this store (for
either endpoint, expired or not: it only parses them), and raises ArtifactNotFound for anything else.

Errors. A missing object is `ArtifactNotFound` (a KeyError, as in `LocalStore`). An endpoint that cannot be
reached (refused, DNS, timeout, TLS, 5xx after the retries, SlowDown) is `shared.errors.Unavailable` (gRPC
UNAVAILABLE), raised after at most `retries` retries with `connect_timeout_s` per attempt; any other S3 error
(AccessDenied, a missing bucket on write, ...) is a `ServiceError` (gRPC INTERNAL) naming the S3 error code.
The bucket is created on first write when missing (`create_bucket`, default on); call `ensure_bucket()` at start-up
to fail fast instead. Constructing a store makes no request.

Configuration (`S3Settings`, or environment variables read by `S3Settings.from_env`, used by
`shared.store.open_store("s3://bucket/prefix")`):
    MAGIC3D_S3_ENDPOINT         host:port, or http(s)://host:port (the scheme then sets `secure`)   (required)
    MAGIC3D_S3_ACCESS_KEY       access key id (unset: anonymous requests, and links are unsigned)
    MAGIC3D_S3_SECRET_KEY       secret key (required with an access key)
    MAGIC3D_S3_SESSION_TOKEN    optional STS session token
    MAGIC3D_S3_SECURE           true/false: HTTPS to the endpoint (default true)
    MAGIC3D_S3_REGION           region used to sign (default us-east-1, MinIO's default; set it for AWS buckets)
    MAGIC3D_S3_PUBLIC_ENDPOINT  optional host:port or http(s)://host:port that presigned links are signed for
    MAGIC3D_S3_PUBLIC_SECURE    https for the public endpoint when it has no scheme (default: same as SECURE)
    MAGIC3D_S3_CREATE_BUCKET    create the bucket when missing (default true)
    MAGIC3D_S3_LINK_EXPIRY_S    presigned link lifetime in seconds, 1..604800 (default 3600, 1 hour)
    MAGIC3D_S3_PART_SIZE        multipart part size in bytes, 5 MiB..5 GiB (default 16 MiB)
    MAGIC3D_S3_CONNECT_TIMEOUT_S / MAGIC3D_S3_READ_TIMEOUT_S / MAGIC3D_S3_RETRIES   (defaults 5, 60, 3)
    MAGIC3D_S3_CERT_CHECK       verify the server's TLS certificate (default true; CA bundle from SSL_CERT_FILE)

MinIO in Kubernetes. Run MinIO as a StatefulSet (or the MinIO operator's Tenant) in the `magic3d` namespace behind
a ClusterIP Service; point the services at it with `store_uri: s3://artifacts/magic3d` and
`MAGIC3D_S3_ENDPOINT=http://minio.magic3d.svc.cluster.local:9000`, the keys coming from a Secret
(`env: valueFrom: secretKeyRef`), never from a ConfigMap. Use a dedicated MinIO user whose policy allows
s3:GetObject/PutObject/DeleteObject/ListBucket (and CreateBucket, or set MAGIC3D_S3_CREATE_BUCKET=false and
create the bucket with `mc mb` in a Job). For links that leave the cluster expose MinIO's S3 port through an
Ingress/Gateway with TLS and set MAGIC3D_S3_PUBLIC_ENDPOINT=https://<that host>; keep MAGIC3D_S3_REGION equal to
MinIO's region (MINIO_SITE_REGION, default us-east-1).
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import Any
from urllib.parse import unquote, urlsplit

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.helpers import MAX_PART_SIZE, MIN_PART_SIZE, check_bucket_name
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from shared.errors import ServiceError, Unavailable
from shared.store.base import ArtifactNotFound, ArtifactStore

ENV_PREFIX = "MAGIC3D_S3_"
MAX_LINK_EXPIRY_S = 7 * 24 * 3600  # SigV4 presigned URLs live at most 7 days
DEFAULT_LINK_EXPIRY_S = 3600  # a leaked link is a download credential: keep its life short
_RETRYABLE_S3_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"})


def _split_endpoint(value: str, what: str) -> tuple[str, bool | None]:
    """'host[:port]' or 'http(s)://host[:port]' -> ('host[:port]', secure-or-None)."""
    value = value.strip()
    secure: bool | None = None
    if "://" in value:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"{what} {value!r}: the scheme must be http or https")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"{what} {value!r}: give only scheme, host and port (S3 endpoints take no path)")
        secure = parts.scheme == "https"
        value = parts.netloc
    if not value or "/" in value:
        raise ValueError(f"{what} {value!r}: expected host:port or http(s)://host:port")
    return value, secure


class S3Settings(BaseModel):
    """How to reach the S3-compatible endpoint; see the module docstring for the environment variables."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: str = Field(min_length=1)
    access_key: str | None = None
    secret_key: SecretStr | None = None
    session_token: SecretStr | None = None
    secure: bool = True
    region: str = Field(default="us-east-1", min_length=1)
    public_endpoint: str | None = None
    public_secure: bool | None = None
    create_bucket: bool = True
    link_expiry_s: int = Field(default=DEFAULT_LINK_EXPIRY_S, ge=1, le=MAX_LINK_EXPIRY_S)
    part_size: int = Field(default=16 * 1024 * 1024, ge=MIN_PART_SIZE, le=MAX_PART_SIZE)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0)
    retries: int = Field(default=3, ge=0, le=20)
    cert_check: bool = True

    @model_validator(mode="before")
    @classmethod
    def _endpoints(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        if isinstance(data.get("endpoint"), str) and data["endpoint"].strip():
            host, secure = _split_endpoint(data["endpoint"], "endpoint")
            data["endpoint"] = host
            if secure is not None:
                if "secure" in data and data["secure"] is not None and _as_bool(data["secure"]) != secure:
                    raise ValueError(f"endpoint scheme says secure={secure} but secure={data['secure']!r} was given")
                data["secure"] = secure
        if isinstance(data.get("public_endpoint"), str):
            if not data["public_endpoint"].strip():
                data["public_endpoint"] = None
            else:
                host, secure = _split_endpoint(data["public_endpoint"], "public_endpoint")
                data["public_endpoint"] = host
                if secure is not None:
                    given = data.get("public_secure")
                    if given is not None and _as_bool(given) != secure:
                        raise ValueError(f"public_endpoint scheme says secure={secure} but public_secure={given!r}")
                    data["public_secure"] = secure
        return data

    @model_validator(mode="after")
    def _keys_in_pairs(self) -> S3Settings:
        if self.access_key and self.secret_key is None:
            raise ValueError("an access key needs a secret key (MAGIC3D_S3_SECRET_KEY)")
        return self

    @property
    def link_secure(self) -> bool:
        """Whether presigned links use https."""
        if self.public_endpoint is None:
            return self.secure
        return self.secure if self.public_secure is None else self.public_secure

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> S3Settings:
        """Settings from MAGIC3D_S3_<FIELD> variables (empty ones count as unset); keyword overrides win."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is not None and raw.strip():
                values[name] = raw.strip()
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "endpoint" not in values:
            raise ValueError(f"the S3 artifact store needs an endpoint: set {ENV_PREFIX}ENDPOINT (host:port or URL)")
        return cls.model_validate(values)


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on", "t", "y"):
        return True
    if text in ("0", "false", "no", "off", "f", "n"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _http_client(settings: S3Settings) -> urllib3.PoolManager:
    """Bounded timeouts and retries (minio's own default waits 5 minutes per attempt)."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=settings.connect_timeout_s, read=settings.read_timeout_s),
        maxsize=10,
        cert_reqs="CERT_REQUIRED" if settings.cert_check else "CERT_NONE",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(
            total=settings.retries,
            connect=settings.retries,
            read=settings.retries,
            backoff_factor=0.2,
            backoff_max=5.0,
            status_forcelist=[500, 502, 503, 504],
        ),
    )


def _client(settings: S3Settings, endpoint: str, secure: bool, http_client: urllib3.PoolManager | None) -> Minio:
    return Minio(
        endpoint,
        access_key=settings.access_key or None,
        secret_key=settings.secret_key.get_secret_value() if settings.secret_key is not None else None,
        session_token=settings.session_token.get_secret_value() if settings.session_token is not None else None,
        secure=secure,
        region=settings.region,  # set, so minio never asks the server (GetBucketLocation) before signing
        http_client=http_client,
        cert_check=settings.cert_check,
    )


class S3Store(ArtifactStore):
    """An ArtifactStore over one bucket and key prefix of an S3-compatible endpoint."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        settings: S3Settings | None = None,
        *,
        http_client: urllib3.PoolManager | None = None,
    ) -> None:
        self.settings = settings if settings is not None else S3Settings.from_env()
        check_bucket_name(bucket)  # ValueError before anything is sent
        self.bucket = bucket
        prefix = prefix.strip("/")
        self.prefix = self.check_key(prefix) if prefix else ""
        self._object_prefix = f"{self.prefix}/" if self.prefix else ""
        pool = http_client or _http_client(self.settings)
        self._client = _client(self.settings, self.settings.endpoint, self.settings.secure, pool)
        if self.settings.public_endpoint is None:
            self._signer = self._client
        else:
            # Never sends a request: the region is set and presigning is local.
            self._signer = _client(self.settings, self.settings.public_endpoint, self.settings.link_secure, None)
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()
        self._link_bases = self._compute_link_bases()

    def __repr__(self) -> str:
        scheme = "https" if self.settings.secure else "http"
        return f"S3Store({self.canonical_root!r} at {scheme}://{self.settings.endpoint})"

    # -- naming --------------------------------------------------------------------------------------------

    @property
    def canonical_root(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def _object(self, key: str) -> str:
        return self._object_prefix + self.check_key(key)

    def canonical_uri(self, key: str) -> str:
        """`s3://bucket/prefix/key`: stable and credential-free, for provenance records."""
        return f"s3://{self.bucket}/{self._object(key)}"

    def uri(self, key: str) -> str:
        """A presigned GET link (no store credentials needed) valid for `settings.link_expiry_s` seconds."""
        name = self._object(key)
        with self._translate(key):
            return self._signer.presigned_get_object(
                self.bucket, name, expires=timedelta(seconds=self.settings.link_expiry_s)
            )

    def _compute_link_bases(self) -> list[tuple[str, str, str]]:
        """(scheme, netloc, quoted path up to the key) of links signed by either client; offline."""
        bases = []
        probe = "k"
        for client in {id(c): c for c in (self._client, self._signer)}.values():
            url = client.presigned_get_object(self.bucket, self._object_prefix + probe, expires=timedelta(seconds=1))
            parts = urlsplit(url)
            assert parts.path.endswith(probe)
            bases.append((parts.scheme, parts.netloc.lower(), parts.path[: -len(probe)]))
        return bases

    def key_from_uri(self, uri: str) -> str:
        """The key of `s3://bucket/prefix/key` or of a link from `uri()`; ArtifactNotFound for foreign URIs."""
        if uri.startswith("s3://"):
            root = f"s3://{self.bucket}/{self._object_prefix}"
            if not uri.startswith(root):
                raise ArtifactNotFound(uri)
            rest = uri[len(root) :]
        else:
            parts = urlsplit(uri)
            for scheme, netloc, path in self._link_bases:
                if parts.scheme == scheme and parts.netloc.lower() == netloc and parts.path.startswith(path):
                    rest = unquote(parts.path[len(path) :])
                    break
            else:
                raise ArtifactNotFound(uri)
        try:
            return self.check_key(rest)
        except ValueError:
            raise ArtifactNotFound(uri) from None

    # -- errors --------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _translate(self, key: str | None = None, *, missing_bucket_is_absent: bool = True) -> Iterator[None]:
        where = f"{'https' if self.settings.secure else 'http'}://{self.settings.endpoint}"
        try:
            yield
        except S3Error as exc:
            if exc.code == "NoSuchKey" and key is not None:
                raise ArtifactNotFound(key) from exc
            if exc.code == "NoSuchBucket" and key is not None and missing_bucket_is_absent:
                raise ArtifactNotFound(key) from exc
            if exc.code in _RETRYABLE_S3_CODES:
                raise Unavailable(f"artifact store at {where} is unavailable: {exc.code}", retry_after_s=1.0) from exc
            raise ServiceError(f"artifact store {self.canonical_root} at {where}: {exc.code}: {exc.message}") from exc
        except ServerError as exc:
            raise Unavailable(f"artifact store at {where} failed: HTTP {exc.status_code}", retry_after_s=1.0) from exc
        except InvalidResponseError as exc:
            # Not S3 speaking (a proxy's HTML error page, a wrong port): unavailable when it is a 5xx.
            status = getattr(exc, "_code", None)
            if isinstance(status, int) and status >= 500:
                raise Unavailable(f"artifact store at {where} failed: HTTP {status}", retry_after_s=1.0) from exc
            raise ServiceError(f"artifact store at {where} gave a non-S3 answer: {exc}") from exc
        except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise Unavailable(f"artifact store at {where} is unreachable: {reason}", retry_after_s=1.0) from exc

    # -- bucket --------------------------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Checks that the bucket exists, creating it when `create_bucket` is set; raises Unavailable/ServiceError."""
        if self._bucket_ready:
            return
        with self._bucket_lock, self._translate():
            if self._bucket_ready:
                return
            if not self._client.bucket_exists(self.bucket):
                if not self.settings.create_bucket:
                    raise ServiceError(
                        f"bucket {self.bucket!r} does not exist at {self.settings.endpoint} and "
                        f"{ENV_PREFIX}CREATE_BUCKET is off"
                    )
                try:
                    self._client.make_bucket(self.bucket)
                except S3Error as exc:
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
            self._bucket_ready = True

    # -- the interface -------------------------------------------------------------------------------------

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        name = self._object(key)
        length = memoryview(data).nbytes
        for attempt in range(2):
            self.ensure_bucket()
            try:
                with self._translate(key, missing_bucket_is_absent=False):
                    self._client.put_object(
                        self.bucket,
                        name,
                        io.BytesIO(data),
                        length=length,
                        content_type=content_type or "application/octet-stream",
                        part_size=self.settings.part_size,
                    )
                break
            except ServiceError as exc:
                missing = isinstance(exc.__cause__, S3Error) and exc.__cause__.code == "NoSuchBucket"
                if not (missing and attempt == 0 and self.settings.create_bucket):
                    raise
                self._bucket_ready = False  # removed behind our back: create it again, once
        return self.uri(key)

    def get(self, key: str) -> bytes:
        name = self._object(key)
        response = None
        with self._translate(key):
            try:
                response = self._client.get_object(self.bucket, name)
                return response.read()
            finally:
                if response is not None:
                    response.close()
                    response.release_conn()

    def size(self, key: str) -> int:
        name = self._object(key)
        with self._translate(key):
            stat = self._client.stat_object(self.bucket, name)
        return int(stat.size or 0)

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ArtifactNotFound:
            return False
        return True

    def list(self, prefix: str) -> list[str]:
        prefix = prefix.strip("/")
        if prefix:
            self.check_key(prefix)
        listing = self._object_prefix + (prefix + "/" if prefix else "")
        keys = []
        with self._translate():
            try:
                for obj in self._client.list_objects(self.bucket, prefix=listing, recursive=True):
                    name = obj.object_name or ""
                    if obj.is_dir or name.endswith("/") or not name.startswith(self._object_prefix):
                        continue
                    keys.append(name[len(self._object_prefix) :])
            except S3Error as exc:
                if exc.code == "NoSuchBucket":  # nothing was ever stored
                    return []
                raise
        return sorted(keys)

    def delete(self, key: str) -> None:
        name = self._object(key)
        try:
            with self._translate(key):
                self._client.remove_object(self.bucket, name)
        except ArtifactNotFound:
            pass


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket[/prefix]` -> (bucket, prefix)."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3:// store URI: {uri!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"s3 store URI {uri!r}: configure the endpoint with S3Settings / {ENV_PREFIX}* instead")
    return parts.netloc, parts.path.strip("/")


__all__ = ["ENV_PREFIX", "MAX_LINK_EXPIRY_S", "S3Settings", "S3Store", "parse_s3_uri"]
