"""The artifact-store interface: keys are '/'-separated and scoped by job ('jobs/<job_id>/...'); objects appear
whole or not at all."""

from __future__ import annotations

import abc


class ArtifactNotFound(KeyError):
    pass


class ArtifactStore(abc.ABC):
    @abc.abstractmethod
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        """Stores `data` atomically under `key`; returns the artifact URI."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """Raises ArtifactNotFound."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def list(self, prefix: str) -> list[str]: ...

    @abc.abstractmethod
    def delete(self, key: str) -> None: ...

    @abc.abstractmethod
    def uri(self, key: str) -> str:
        """A link a client can open without store credentials."""

    @abc.abstractmethod
    def key_from_uri(self, uri: str) -> str: ...

    def size(self, key: str) -> int:
        """The stored object's length in bytes; raises ArtifactNotFound. Backends override it with a metadata call."""
        return len(self.get(key))

    def canonical_uri(self, key: str) -> str:
        """A stable, credential-free name of the artifact for provenance records (never expires; `key_from_uri`
        accepts it). Where `uri` is already stable (file://) it is the same."""
        return self.uri(key)

    @staticmethod
    def check_key(key: str) -> str:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"invalid artifact key {key!r}")
        return key
