"""Typed configuration of a guidance server: which priors it hosts and how it serves them.

Validated once at start-up (pydantic); the same file feeds the standalone server and the Ray Serve app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.auth import AuthConfig, TlsConfig
from shared.guidance_api import PriorKind, Weighting


class AnalyticOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    class MeshObject(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str = Field(min_length=1)
        path: Path
        # One albedo for the whole object; null uses the file's own colours (vertex colours, glTF COLOR_0, or a
        # texture sampled at the vertices), light grey when it has none.
        color: tuple[float, float, float] | None = (0.8, 0.8, 0.8)
        aliases: tuple[str, ...] = ()
        # The file's up axis: "auto" is +y for glTF/GLB (the glTF rule) and +z for other formats; "+z" for files
        # from Z-up tools (Blender's native axes, CAD), "+y" for Y-up OBJ/PLY.
        up: Literal["auto", "+y", "+z"] = "auto"

        @model_validator(mode="after")
        def _check_color(self) -> "AnalyticOptions.MeshObject":
            if self.color is not None and not all(0.0 <= c <= 1.0 for c in self.color):
                raise ValueError(f"mesh {self.name!r}: color components must be in [0, 1], got {self.color}")
            return self

    # Built-in procedural objects are always present; these user meshes are added to the set.
    meshes: list[MeshObject] = []

    @model_validator(mode="after")
    def _unique_meshes(self) -> "AnalyticOptions":
        names = [m.name.lower() for m in self.meshes]
        if len(set(names)) != len(names):
            raise ValueError(f"analytic mesh names must be unique, got {names}")
        return self


#: Names of families accepted as `kind` in YAML besides the PriorKind values.
KIND_ALIASES = {"zero123": PriorKind.VIEW_CONDITIONED}


class WarmUpSpec(BaseModel):
    """The shapes a prior's start-up warm-up runs: each batch size once (each is a CUDA graph of its own)."""

    model_config = ConfigDict(extra="forbid")

    # "auto": on CUDA only, where the first call's costs are (graph capture, kernel choices); "on" anywhere.
    mode: Literal["auto", "on", "off"] = "auto"
    # A job's step sends batch 4 (the presets' batch_size); two jobs' requests batched together make 8.
    batch_sizes: list[int] = Field(default_factory=lambda: [4])
    # What callers send: "auto" is latents where the prior publishes a latent encoder (the scene encodes them,
    # services/scene/latent_encoders.py), images otherwise.
    input: Literal["auto", "images", "latents"] = "auto"

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, sizes: list[int]) -> list[int]:
        if any(size < 1 for size in sizes):
            raise ValueError(f"warm_up.batch_sizes must be >= 1, got {sizes}")
        return sizes


class PriorSpec(BaseModel):
    """One logical prior. `source` is a local diffusers directory or a hub id (ignored by the analytic prior);
    `random:<size>` builds the published architecture on random weights (benchmarks)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    # analytic | pixel | latent | zero123 (= view_conditioned: Zero-1-to-3, a local diffusers directory)
    kind: PriorKind
    source: str | None = None
    # Extra checkpoints of the same family (e.g. DreamBooth-tuned), multiplexed by id; "default" is `source`.
    checkpoints: dict[str, str] = {}
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    resolution: int | None = Field(default=None, ge=16, le=1024)
    guidance_scale: float | None = Field(default=None, ge=0)
    time_range: tuple[float, float] | None = None
    weighting: Weighting | None = None
    max_batch_size: int = Field(default=8, ge=1, le=64)
    embedding_cache_size: int = Field(default=256, ge=1)
    # Layout of the UNet (and VAE) weights: "auto" is channels-last on CUDA for pixel priors only, where it was
    # measured faster (services/guidance/priors/layout.py).
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    # The UNet's forward replayed as a CUDA graph per batch shape ("auto": on CUDA; services/guidance/priors/cuda_graphs.py).
    cuda_graphs: Literal["auto", "on", "off"] = "auto"
    analytic: AnalyticOptions = AnalyticOptions()
    # Textual-inversion embeddings a request may name (ComputeSdsRequest.learned_embeddings), name -> diffusers
    # learned-embeddings file ({token: tensor}, safetensors only); text-conditioned priors (latent, pixel) only.
    learned_embeddings: dict[str, Path] = {}
    # Start-up warm-up (services/guidance/warm_up.py): one synthetic SDS request per batch size before the server
    # answers, so that the first job does not pay for CUDA-graph capture, cuDNN/cuBLAS choices and lazy kernel loads.
    # Text-conditioned priors (pixel, latent) only; batch_sizes [] = off.
    warm_up: WarmUpSpec = WarmUpSpec()

    @field_validator("kind", mode="before")
    @classmethod
    def _kind_alias(cls, value):
        return KIND_ALIASES.get(value, value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> "PriorSpec":
        if self.kind in (PriorKind.LATENT, PriorKind.PIXEL, PriorKind.VIEW_CONDITIONED) and not self.source:
            raise ValueError(f"prior {self.name!r}: kind {self.kind.value} needs a source")
        if self.learned_embeddings and self.kind not in (PriorKind.LATENT, PriorKind.PIXEL):
            raise ValueError(f"prior {self.name!r}: learned embeddings need a text-conditioned prior (latent, pixel)")
        for name, path in self.learned_embeddings.items():
            if path.suffix != ".safetensors":
                raise ValueError(f"prior {self.name!r}: learned embeddings {name!r} must be a .safetensors file")
        if self.time_range is not None and not 0 < self.time_range[0] <= self.time_range[1] < 1:
            raise ValueError(f"prior {self.name!r}: time_range must satisfy 0 < min <= max < 1")
        too_large = [size for size in self.warm_up.batch_sizes if size > self.max_batch_size]
        if too_large and "warm_up" in self.model_fields_set:  # the default adapts (warm_up.py clamps it)
            raise ValueError(f"prior {self.name!r}: warm_up.batch_sizes {self.warm_up.batch_sizes} exceed "
                             f"max_batch_size {self.max_batch_size}")
        if "default" in self.checkpoints:
            raise ValueError(f"prior {self.name!r}: checkpoint id 'default' is reserved for `source`")
        return self

    @property
    def checkpoint_ids(self) -> tuple[str, ...]:
        return ("default", *self.checkpoints)

    def checkpoint_source(self, checkpoint_id: str) -> str | None:
        return self.source if checkpoint_id in ("", "default") else self.checkpoints[checkpoint_id]


class BatchingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Most images in one denoiser call, summed over the requests batched together.
    max_batch_images: int = Field(default=16, ge=1)
    # How long the first request of a batch waits for company.
    wait_s: float = Field(default=0.005, ge=0, le=1)
    # Requests queued per prior beyond which new ones are refused with RESOURCE_EXHAUSTED.
    max_queue: int = Field(default=64, ge=1)
    # Checkpoints of one prior kept loaded at once (least recently used evicted).
    max_loaded_checkpoints: int = Field(default=2, ge=1)


class GuidanceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    priors: list[PriorSpec] = Field(min_length=1)
    batching: BatchingConfig = BatchingConfig()
    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    # Prometheus /metrics (standalone server) on this port of `host`; None: off.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    max_message_bytes: int = 64 * 1024 * 1024
    max_concurrent_rpcs: int = Field(default=64, ge=1)
    # Callers must send the service token (auth.service_token_file / $MAGIC3D_SERVICE_TOKEN); none on loopback:
    # auth off (warned). The standalone server checks it here; the Ray Serve ingress checks it too.
    auth: AuthConfig = AuthConfig()
    tls: TlsConfig | None = None  # standalone server only (Serve's gRPC proxy has no TLS of its own)
    # Reference images (image-conditioned priors) kept per server (per Serve replica) by digest, so that a job
    # sends its image once: at most this many, and at most this many bytes (least recently used evicted).
    reference_image_cache_size: int = Field(default=64, ge=1)
    reference_image_cache_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    # User meshes listed once for every analytic prior of this file (each prior's own `analytic.meshes` follow).
    analytic: AnalyticOptions = AnalyticOptions()

    @model_validator(mode="after")
    def _unique_names(self) -> "GuidanceConfig":
        names = [p.name for p in self.priors]
        if len(set(names)) != len(names):
            raise ValueError(f"prior names must be unique, got {names}")
        return self

    @model_validator(mode="after")
    def _share_meshes(self) -> "GuidanceConfig":
        """Prepends the top-level meshes to every analytic prior's own list, so that each prior builds from its
        spec alone. A name listed in both places is an error, not an override."""
        if not self.analytic.meshes:
            return self
        shared = {m.name.lower() for m in self.analytic.meshes}
        for spec in self.priors:
            if spec.kind != PriorKind.ANALYTIC:
                continue
            own = [m for m in spec.analytic.meshes if m not in self.analytic.meshes]
            clash = sorted(m.name for m in own if m.name.lower() in shared)
            if clash:
                raise ValueError(f"prior {spec.name!r}: meshes {clash} are also listed under the top-level analytic")
            spec.analytic = AnalyticOptions(meshes=[*self.analytic.meshes, *own])
        return self

    def prior(self, name: str) -> PriorSpec | None:
        return next((p for p in self.priors if p.name == name), None)

    @classmethod
    def load(cls, path: str | Path) -> "GuidanceConfig":
        return cls.model_validate(yaml.safe_load(Path(path).read_text()))


DEFAULT_CONFIG = GuidanceConfig(priors=[PriorSpec(name="analytic", kind=PriorKind.ANALYTIC)])
