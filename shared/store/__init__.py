"""Artifact stores: one interface (`ArtifactStore`), a local-directory backend (the embedded default), and an
S3-compatible backend through the minio SDK (`S3Store`; MinIO in the cluster, see shared/store/s3.py)."""

from __future__ import annotations

from shared.store.base import ArtifactNotFound, ArtifactStore
from shared.store.local import LocalStore
from shared.store.s3 import S3Settings, S3Store, parse_s3_uri


def open_store(uri: str, *, s3: S3Settings | None = None) -> ArtifactStore:
    """`file:///abs/dir` or a plain path -> LocalStore; `s3://bucket[/prefix]` -> S3Store.

    For s3:// the endpoint and credentials come from `s3` when given, else from the MAGIC3D_S3_* environment
    variables (`S3Settings.from_env`; combine both with `S3Settings.from_env(**overrides)`). Opening makes no
    request; the bucket is checked/created on first write or by `S3Store.ensure_bucket()`.
    """
    if uri.startswith("s3://"):
        bucket, prefix = parse_s3_uri(uri)
        return S3Store(bucket, prefix, s3 if s3 is not None else S3Settings.from_env())
    if uri.startswith("file://"):
        return LocalStore(uri[len("file://") :])
    if "://" in uri:
        raise ValueError(f"unsupported artifact store {uri!r}; this build knows s3://, file:// and plain paths")
    return LocalStore(uri)


__all__ = ["ArtifactStore", "ArtifactNotFound", "LocalStore", "S3Settings", "S3Store", "open_store"]
