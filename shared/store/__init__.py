"""Artifact stores: one interface (`ArtifactStore`), a local-directory backend (the embedded default), and an
S3-compatible backend through the minio SDK (`S3Store`; MinIO in the cluster, see shared/store/s3.py).

A store is described by a typed config (`StoreConfig`: `LocalStoreConfig` | `S3StoreConfig`, told apart by `kind`)
and built by the `STORES` registry; `open_store(uri)` is the same from a URI, the form service configs use. A new
backend is a config class with its own `kind` literal, added to `StoreConfig`, and one `@STORES.register(kind)`
builder.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from shared.components import Registry
from shared.store.base import ArtifactNotFound, ArtifactStore
from shared.store.local import LocalStore
from shared.store.s3 import S3Settings, S3Store, parse_s3_uri


class LocalStoreConfig(BaseModel):
    """A directory on this machine (created if missing)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["local"] = "local"
    root: str = Field(min_length=1)


class S3StoreConfig(BaseModel):
    """A bucket (and key prefix) of an S3-compatible endpoint; `settings` None: from the MAGIC3D_S3_* environment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["s3"] = "s3"
    bucket: str = Field(min_length=1)
    prefix: str = ""
    settings: S3Settings | None = None


StoreConfig = Annotated[Union[LocalStoreConfig, S3StoreConfig], Field(discriminator="kind")]

STORES: Registry[ArtifactStore] = Registry("artifact store")


@STORES.register("local")
def build_local_store(config: LocalStoreConfig) -> ArtifactStore:
    return LocalStore(config.root)


@STORES.register("s3")
def build_s3_store(config: S3StoreConfig) -> ArtifactStore:
    settings = config.settings if config.settings is not None else S3Settings.from_env()
    return S3Store(config.bucket, config.prefix, settings)


def store_config(uri: str, *, s3: S3Settings | None = None) -> LocalStoreConfig | S3StoreConfig:
    """`file:///abs/dir` or a plain path -> LocalStoreConfig; `s3://bucket[/prefix]` -> S3StoreConfig (`s3` as its
    settings). Any other scheme: ValueError."""
    if uri.startswith("s3://"):
        bucket, prefix = parse_s3_uri(uri)
        return S3StoreConfig(bucket=bucket, prefix=prefix, settings=s3)
    if uri.startswith("file://"):
        return LocalStoreConfig(root=uri[len("file://") :])
    if "://" in uri:
        raise ValueError(f"unsupported artifact store {uri!r}; this build knows s3://, file:// and plain paths")
    return LocalStoreConfig(root=uri)


def open_store(uri: str, *, s3: S3Settings | None = None) -> ArtifactStore:
    """`file:///abs/dir` or a plain path -> LocalStore; `s3://bucket[/prefix]` -> S3Store.

    For s3:// the endpoint and credentials come from `s3` when given, else from the MAGIC3D_S3_* environment
    variables (`S3Settings.from_env`; combine both with `S3Settings.from_env(**overrides)`). Opening makes no
    request; the bucket is checked/created on first write or by `S3Store.ensure_bucket()`.
    """
    return STORES.build(store_config(uri, s3=s3))


__all__ = [
    "ArtifactStore",
    "ArtifactNotFound",
    "LocalStore",
    "LocalStoreConfig",
    "S3Settings",
    "S3Store",
    "S3StoreConfig",
    "STORES",
    "StoreConfig",
    "open_store",
    "store_config",
]
