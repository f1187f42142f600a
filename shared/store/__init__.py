"""Artifact stores: one interface (`ArtifactStore`), a local-directory backend (the embedded default), and an
S3-compatible backend through the minio SDK (added with the orchestrator)."""

from shared.store.base import ArtifactStore, ArtifactNotFound
from shared.store.local import LocalStore


def open_store(uri: str) -> ArtifactStore:
    """`file:///abs/dir` or a plain path -> LocalStore."""
    if uri.startswith("file://"):
        return LocalStore(uri[len("file://") :])
    if "://" in uri:
        raise ValueError(f"unsupported artifact store {uri!r}; this build knows file:// and plain paths")
    return LocalStore(uri)


__all__ = ["ArtifactStore", "ArtifactNotFound", "LocalStore", "open_store"]
