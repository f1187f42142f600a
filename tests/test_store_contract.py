"""The ArtifactStore contract, checked identically on LocalStore (a temporary directory) and S3Store (moto's S3
server on 127.0.0.1): round trips, overwrite, size, folder-style listing, idempotent delete, ArtifactNotFound,
key checking, links that open without credentials, and uri/canonical_uri <-> key_from_uri."""

from __future__ import annotations

import os
import urllib.request
import uuid

import pytest

from shared.store import ArtifactNotFound, ArtifactStore, LocalStore, S3Settings, S3Store

BAD_KEYS = ["", "/jobs/a", "jobs//a", "jobs/../x", "./x", "jobs/a/.."]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    settings = S3Settings(
        endpoint=request.getfixturevalue("s3_endpoint"),
        access_key="contract",
        secret_key="contract-secret",
        part_size=5 * 1024 * 1024,
        connect_timeout_s=2.0,
        retries=1,
    )
    return S3Store(f"contract-{uuid.uuid4().hex[:12]}", "artifacts", settings)


def fetch(link: str) -> bytes:
    """Opens a store link with plain urllib: no credentials, no proxies (file:// and http:// alike)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(link, timeout=10) as response:
        return response.read()


def test_round_trip_overwrite_and_size(store):
    key = "jobs/j1/coarse/step-0000001.ckpt"
    assert not store.exists(key)
    first = os.urandom(4096)
    store.put(key, first)
    assert store.exists(key) and store.get(key) == first and store.size(key) == len(first)
    second = b"second version"
    store.put(key, second, content_type="text/plain")
    assert store.get(key) == second and store.size(key) == len(second)
    store.put("jobs/j1/empty", b"")
    assert store.get("jobs/j1/empty") == b"" and store.size("jobs/j1/empty") == 0
    store.put("jobs/j1/view", memoryview(b"bytes-like"))
    assert store.get("jobs/j1/view") == b"bytes-like"


def test_listing_is_by_folder_and_sorted(store):
    assert store.list("jobs") == [] and store.list("") == []
    for key in ["jobs/b/2", "jobs/a/x/1", "jobs/a/0", "jobs/ab/3"]:
        store.put(key, key.encode())
    assert store.list("jobs/a") == ["jobs/a/0", "jobs/a/x/1"]
    assert store.list("jobs/a/") == ["jobs/a/0", "jobs/a/x/1"]
    assert store.list("jobs") == ["jobs/a/0", "jobs/a/x/1", "jobs/ab/3", "jobs/b/2"]
    assert store.list("") == ["jobs/a/0", "jobs/a/x/1", "jobs/ab/3", "jobs/b/2"]
    assert store.list("jobs/c") == []
    assert store.list("jobs/a/0") == []  # an object is not a folder
    assert not store.exists("jobs/a")  # nor is a folder an object


def test_delete_is_idempotent_and_missing_is_artifact_not_found(store):
    store.put("jobs/d/x", b"x")
    store.delete("jobs/d/x")
    store.delete("jobs/d/x")
    store.delete("jobs/d/never")
    assert not store.exists("jobs/d/x") and store.list("jobs/d") == []
    for call in (store.get, store.size):
        with pytest.raises(ArtifactNotFound) as info:
            call("jobs/d/x")
        assert isinstance(info.value, KeyError)


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_invalid_keys_are_rejected(store, bad):
    for call in (lambda k: store.put(k, b"x"), store.get, store.exists, store.delete, store.uri, store.canonical_uri):
        with pytest.raises(ValueError):
            call(bad)


def test_links_open_without_credentials_and_map_back_to_keys(store):
    key = "jobs/l/mesh.glb"
    data = os.urandom(1000)
    link = store.put(key, data, content_type="model/gltf-binary")
    assert fetch(link) == data
    assert fetch(store.uri(key)) == data
    assert store.key_from_uri(link) == key
    assert store.key_from_uri(store.uri(key)) == key
    canonical = store.canonical_uri(key)
    assert store.key_from_uri(canonical) == key
    assert canonical == store.canonical_uri(key)  # stable: no signature, no timestamp
    for foreign in ("s3://elsewhere/jobs/l/mesh.glb", "file:///elsewhere/jobs/l/mesh.glb", "https://x.test/a"):
        with pytest.raises(ArtifactNotFound):
            store.key_from_uri(foreign)
