"""S3Store against a real S3 endpoint on loopback (moto's threaded server on 127.0.0.1, an ephemeral port).

Covers multipart round trips and their atomicity, listing/exists/delete, NoSuchKey -> ArtifactNotFound, key
checking before any request, presigned links opened without credentials, key_from_uri for both URI forms,
open_store("s3://...") configured from the environment, and an unreachable endpoint -> Unavailable, quickly.
"""

from __future__ import annotations

import io
import os
import socket
import time
import urllib.request
import uuid
from urllib.parse import parse_qs, urlsplit

import pydantic
import pytest
import urllib3

from shared.errors import ServiceError, Unavailable
from shared.store import ArtifactNotFound, LocalStore, S3Settings, S3Store, open_store
from shared.store.s3 import MAX_LINK_EXPIRY_S, parse_s3_uri

MiB = 1024 * 1024
ENV_NAMES = ["MAGIC3D_S3_" + name.upper() for name in S3Settings.model_fields]


@pytest.fixture(scope="module")
def endpoint(s3_endpoint):
    """The session's moto S3 server on 127.0.0.1 (conftest.py)."""
    return s3_endpoint


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def settings_for(endpoint: str, **overrides) -> S3Settings:
    values = dict(endpoint=endpoint, access_key="test-access", secret_key="test-secret", part_size=5 * MiB,
                  connect_timeout_s=2.0, read_timeout_s=10.0, retries=1)
    values.update(overrides)
    return S3Settings(**values)


@pytest.fixture
def store(endpoint) -> S3Store:
    return S3Store(f"b-{uuid.uuid4().hex[:12]}", "magic3d/test", settings_for(endpoint))


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def open_without_credentials(url: str) -> bytes:
    """A plain urllib GET, no proxies, no auth headers."""
    assert urlsplit(url).hostname == "127.0.0.1"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        assert response.status == 200
        return response.read()


def test_multipart_round_trip_and_presigned_link(store):
    data = os.urandom(6 * MiB + 12345)  # over one 5 MiB part: a two-part upload
    key = "jobs/j-1/coarse/step-0000100.ckpt"
    link = store.put(key, data)
    assert store.get(key) == data
    assert store.size(key) == len(data)
    etag = store._client.stat_object(store.bucket, f"magic3d/test/{key}").etag
    assert etag.endswith("-2"), etag  # a multipart ETag names its part count

    query = parse_qs(urlsplit(link).query)
    assert {"X-Amz-Signature", "X-Amz-Credential", "X-Amz-Expires"} <= set(query)
    assert query["X-Amz-Expires"] == [str(store.settings.link_expiry_s)]
    assert "test-secret" not in link
    assert open_without_credentials(link) == data
    assert store.key_from_uri(link) == key
    assert store.uri(key).split("?")[0] == link.split("?")[0]


def test_multipart_object_invisible_until_complete_and_failed_upload_leaves_nothing(store, monkeypatch):
    key = "jobs/j-2/big.bin"
    data = os.urandom(5 * MiB + 1)
    real_complete = store._client._complete_multipart_upload
    seen = {}

    def complete(*args, **kwargs):
        seen["exists"] = store.exists(key)
        seen["listed"] = store.list("jobs/j-2")
        return real_complete(*args, **kwargs)

    monkeypatch.setattr(store._client, "_complete_multipart_upload", complete)
    store.put(key, data)
    assert seen == {"exists": False, "listed": []}  # every part uploaded, still invisible
    assert store.get(key) == data

    # A connection lost at the last step: the upload is aborted, the earlier object is left whole.
    def broken(*args, **kwargs):
        raise urllib3.exceptions.ProtocolError("connection reset at CompleteMultipartUpload")

    monkeypatch.setattr(store._client, "_complete_multipart_upload", broken)
    with pytest.raises(Unavailable):
        store.put(key, os.urandom(5 * MiB + 2))
    assert store.get(key) == data
    with pytest.raises(Unavailable):
        store.put("jobs/j-2/never.bin", os.urandom(5 * MiB + 3))
    assert not store.exists("jobs/j-2/never.bin")
    uploads = list(store._client._list_multipart_uploads(store.bucket).uploads)
    assert uploads == []


def test_list_exists_delete_and_not_found(store):
    assert store.list("jobs") == []  # bucket not created yet
    assert not store.exists("jobs/a/x")
    with pytest.raises(ArtifactNotFound):
        store.get("jobs/a/x")
    store.delete("jobs/a/x")  # idempotent, even with no bucket

    for key in ["jobs/a/x", "jobs/a/sub/y", "jobs/ab/z"]:
        store.put(key, key.encode(), content_type="text/plain")
    # An object outside the store's prefix is not the store's.
    store._client.put_object(store.bucket, "elsewhere/jobs/a/w", io.BytesIO(b"w"), 1)
    store._client.put_object(store.bucket, "magic3d/test/jobs/a/folder/", io.BytesIO(b""), 0)

    assert store.list("jobs/a") == ["jobs/a/sub/y", "jobs/a/x"]
    assert store.list("jobs/a/") == ["jobs/a/sub/y", "jobs/a/x"]
    assert store.list("jobs") == ["jobs/a/sub/y", "jobs/a/x", "jobs/ab/z"]
    assert store.list("") == ["jobs/a/sub/y", "jobs/a/x", "jobs/ab/z"]
    assert store.list("jobs/nothing") == []
    assert store.exists("jobs/a/x") and not store.exists("jobs/a")
    assert store.get("jobs/a/sub/y") == b"jobs/a/sub/y"

    store.delete("jobs/a/x")
    store.delete("jobs/a/x")
    assert not store.exists("jobs/a/x")
    with pytest.raises(ArtifactNotFound) as info:
        store.get("jobs/a/x")
    assert isinstance(info.value, KeyError)
    with pytest.raises(ArtifactNotFound):
        store.size("jobs/a/x")
    assert store.list("jobs") == ["jobs/a/sub/y", "jobs/ab/z"]


def test_keys_are_checked_before_any_request():
    # The endpoint is a closed port: a request would raise Unavailable, a bad key must raise ValueError first.
    offline = S3Store("bucket", "", settings_for(f"http://127.0.0.1:{closed_port()}", retries=0))
    for bad in ["", "/jobs/a", "jobs//a", "jobs/../x", "./x", "jobs/a/.."]:
        for call in (
            lambda k: offline.put(k, b"x"),
            offline.get,
            offline.exists,
            offline.delete,
            offline.uri,
            offline.canonical_uri,
            offline.size,
        ):
            with pytest.raises(ValueError):
                call(bad)
    with pytest.raises(ValueError):
        offline.list("jobs/../..")
    with pytest.raises(ValueError):
        S3Store("Not_A_Bucket!", "", settings_for("127.0.0.1:9"))
    with pytest.raises(ValueError):
        S3Store("bucket", "a/../b", settings_for("127.0.0.1:9"))


def test_key_from_uri_forms(store, endpoint):
    key = "jobs/j-3/a b+c%.bin"  # characters that presigned URLs percent-encode
    link = store.put(key, b"payload")
    canonical = store.canonical_uri(key)
    assert canonical == f"s3://{store.bucket}/magic3d/test/{key}"
    assert store.key_from_uri(canonical) == key
    assert store.key_from_uri(link) == key
    assert open_without_credentials(link) == b"payload"

    other_prefix = S3Store(store.bucket, "magic3d/other", store.settings)
    other_bucket = S3Store(store.bucket + "x", "magic3d/test", store.settings)
    foreign = [
        other_prefix.canonical_uri(key),
        other_prefix.uri(key),
        other_bucket.canonical_uri(key),
        other_bucket.uri(key),
        link.replace("http://", "https://"),
        link.replace("127.0.0.1", "127.0.0.2"),
        f"s3://{store.bucket}/magic3d/test/jobs/../../secret",
        f"s3://{store.bucket}/magic3d/test/",
        link.replace("/jobs/j-3/", "/jobs/%2E%2E/"),
        "file:///tmp/jobs/j-3/x",
    ]
    for uri in foreign:
        with pytest.raises(ArtifactNotFound):
            store.key_from_uri(uri)


def test_public_endpoint_links_are_signed_offline_for_that_host(store):
    public_port = closed_port()  # never contacted: signing is local
    public = S3Store(
        store.bucket,
        store.prefix,
        store.settings.model_copy(update={"public_endpoint": f"127.0.0.1:{public_port}", "link_expiry_s": 600}),
    )
    public.put("jobs/p/x", b"x")
    link = public.uri("jobs/p/x")
    parts = urlsplit(link)
    assert (parts.scheme, parts.netloc) == ("http", f"127.0.0.1:{public_port}")
    assert parse_qs(parts.query)["X-Amz-Expires"] == ["600"]
    assert public.key_from_uri(link) == "jobs/p/x"
    assert public.key_from_uri(store.uri("jobs/p/x")) == "jobs/p/x"  # internal-endpoint links still parse
    https_public = settings_for("127.0.0.1:9", secure=False, public_endpoint="https://files.example.test")
    assert S3Store("bkt", "", https_public).uri("jobs/q").startswith("https://files.example.test/bkt/jobs/q?")


def test_settings_from_env_and_validation(monkeypatch):
    monkeypatch.setenv("MAGIC3D_S3_ENDPOINT", "http://127.0.0.1:9000")
    monkeypatch.setenv("MAGIC3D_S3_ACCESS_KEY", "ak")
    monkeypatch.setenv("MAGIC3D_S3_SECRET_KEY", "sk-very-secret")
    monkeypatch.setenv("MAGIC3D_S3_REGION", "eu-central-1")
    monkeypatch.setenv("MAGIC3D_S3_PUBLIC_ENDPOINT", "https://artifacts.example.test")
    monkeypatch.setenv("MAGIC3D_S3_LINK_EXPIRY_S", "3600")
    monkeypatch.setenv("MAGIC3D_S3_CREATE_BUCKET", "false")
    settings = S3Settings.from_env()
    assert settings.endpoint == "127.0.0.1:9000" and settings.secure is False
    assert settings.public_endpoint == "artifacts.example.test" and settings.link_secure is True
    assert settings.region == "eu-central-1" and settings.link_expiry_s == 3600 and settings.create_bucket is False
    assert "sk-very-secret" not in repr(settings)
    assert S3Settings.from_env(region="us-west-2").region == "us-west-2"  # keyword overrides win

    monkeypatch.setenv("MAGIC3D_S3_SECURE", "true")  # contradicts the http:// scheme
    with pytest.raises(pydantic.ValidationError):
        S3Settings.from_env()
    monkeypatch.setenv("MAGIC3D_S3_SECURE", "")  # empty counts as unset
    assert S3Settings.from_env().secure is False
    monkeypatch.setenv("MAGIC3D_S3_ENDPOINT", "minio.magic3d.svc:9000")
    assert S3Settings.from_env().secure is True  # no scheme: https unless MAGIC3D_S3_SECURE=false

    with pytest.raises(pydantic.ValidationError):
        S3Settings(endpoint="h:1", link_expiry_s=MAX_LINK_EXPIRY_S + 1)
    with pytest.raises(pydantic.ValidationError):
        S3Settings(endpoint="h:1", part_size=5 * MiB - 1)
    with pytest.raises(pydantic.ValidationError):
        S3Settings(endpoint="h:1", access_key="ak")  # no secret
    with pytest.raises(pydantic.ValidationError):
        S3Settings(endpoint="http://h:1/path")
    monkeypatch.delenv("MAGIC3D_S3_ENDPOINT")
    with pytest.raises(ValueError, match="MAGIC3D_S3_ENDPOINT"):
        S3Settings.from_env()
    with pytest.raises(ValueError, match="MAGIC3D_S3_ENDPOINT"):
        open_store("s3://bucket/prefix")


def test_open_store_s3_from_env(endpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("MAGIC3D_S3_ENDPOINT", endpoint)
    monkeypatch.setenv("MAGIC3D_S3_ACCESS_KEY", "env-access")
    monkeypatch.setenv("MAGIC3D_S3_SECRET_KEY", "env-secret")
    monkeypatch.setenv("MAGIC3D_S3_REGION", "us-east-1")
    bucket = f"env-{uuid.uuid4().hex[:12]}"
    opened = open_store(f"s3://{bucket}/deploy/artifacts/")
    assert isinstance(opened, S3Store)
    assert (opened.bucket, opened.prefix, opened.settings.secure) == (bucket, "deploy/artifacts", False)
    link = opened.put("jobs/e/x.txt", b"from env", content_type="text/plain")
    assert open_without_credentials(link) == b"from env"
    assert opened.key_from_uri(link) == "jobs/e/x.txt"
    assert opened.canonical_uri("jobs/e/x.txt") == f"s3://{bucket}/deploy/artifacts/jobs/e/x.txt"

    # An explicit settings object wins over the environment; the same objects are seen.
    explicit = open_store(f"s3://{bucket}/deploy/artifacts", s3=settings_for(endpoint))
    assert explicit.get("jobs/e/x.txt") == b"from env"
    assert open_store(f"s3://{bucket}").list("deploy") == ["deploy/artifacts/jobs/e/x.txt"]

    assert parse_s3_uri("s3://b") == ("b", "")
    with pytest.raises(ValueError):
        open_store("s3://bucket/p?endpoint=x")
    with pytest.raises(ValueError):
        open_store("gs://bucket/p")
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    assert isinstance(open_store(str(tmp_path / "plain")), LocalStore)


def test_missing_bucket_without_create_is_a_clear_error(endpoint):
    bucket = f"absent-{uuid.uuid4().hex[:12]}"
    store = S3Store(bucket, "", settings_for(endpoint, create_bucket=False))
    with pytest.raises(ServiceError, match="does not exist") as info:
        store.put("jobs/x", b"x")
    assert not isinstance(info.value, Unavailable)
    assert store.list("jobs") == [] and not store.exists("jobs/x")
    with pytest.raises(ArtifactNotFound):
        store.get("jobs/x")


def test_unreachable_endpoint_is_unavailable_quickly():
    port = closed_port()
    settings = settings_for(f"http://127.0.0.1:{port}", connect_timeout_s=0.5, read_timeout_s=0.5, retries=1)
    calls = [
        lambda s: s.put("jobs/u/x", b"x"),
        lambda s: s.get("jobs/u/x"),
        lambda s: s.exists("jobs/u/x"),
        lambda s: s.list("jobs"),
        lambda s: s.delete("jobs/u/x"),
        lambda s: s.ensure_bucket(),
    ]
    store = S3Store("bucket", "p", settings)  # constructing makes no request
    assert store.uri("jobs/u/x").startswith(f"http://127.0.0.1:{port}/bucket/p/jobs/u/x?")  # nor does signing
    custom = S3Store(
        "bucket", "p", settings,
        http_client=urllib3.PoolManager(timeout=urllib3.Timeout(connect=0.2, read=0.2), retries=urllib3.Retry(0)),
    )
    for target in (store, custom):
        for call in calls:
            started = time.monotonic()
            with pytest.raises(Unavailable, match=f"127.0.0.1:{port}") as info:
                call(target)
            assert time.monotonic() - started < 3.0
            assert info.value.code.name == "UNAVAILABLE"
