"""Loaded priors by logical name and checkpoint id, built from configuration, least recently used evicted."""

from __future__ import annotations

import threading
from typing import Callable

from services.guidance.cache import LruCache
from services.guidance.config import GuidanceConfig, PriorSpec
from services.guidance.priors.base import DiffusionPrior
from services.guidance.priors.vae_encoder import RANDOM_SOURCE_PREFIX
from shared.components import Registry, UnknownKind
from shared.errors import NotFound
from shared.guidance_api import PriorKind

PriorBuilder = Callable[[PriorSpec, str], DiffusionPrior]

# Prior builders by `PriorSpec.kind`: each is `build(spec, checkpoint_id) -> DiffusionPrior`, imports its model code
# lazily (the analytic prior needs no diffusers), and is registered here with `@PRIORS.register(kind)`.
PRIORS: Registry[DiffusionPrior] = Registry("prior kind")


def _tuning(spec: PriorSpec) -> dict:
    """Per-spec overrides shared by every kind; unset values keep each prior's own defaults."""
    kwargs = {"max_batch_size": spec.max_batch_size}
    for key in ("resolution", "guidance_scale", "time_range", "weighting"):
        value = getattr(spec, key)
        if value is not None:
            kwargs[key] = value
    return kwargs


@PRIORS.register(PriorKind.ANALYTIC)
def build_analytic(spec: PriorSpec, checkpoint_id: str) -> DiffusionPrior:
    from services.guidance.priors.analytic import AnalyticPrior, load_mesh_object

    prior = AnalyticPrior(name=spec.name, device=spec.device, **_tuning(spec))
    for mesh in spec.analytic.meshes:
        prior.add_object(load_mesh_object(mesh.name, mesh.path, mesh.color, aliases=mesh.aliases, up=mesh.up))
    return prior


def _text_prior_settings(spec: PriorSpec) -> dict:
    """What every text-conditioned prior is built with, whether its weights are loaded or random."""
    return {
        "name": spec.name,
        "device": spec.device,
        "dtype": spec.dtype,
        "embedding_cache_size": spec.embedding_cache_size,
        "checkpoint_ids": spec.checkpoint_ids,
        "memory_format": spec.memory_format,
        "cuda_graphs": spec.cuda_graphs,
        "learned_embeddings": spec.learned_embeddings,
        **_tuning(spec),
    }


def _build_random_prior(spec: PriorSpec, source: str) -> DiffusionPrior:
    """`random:<size>` (e.g. `random:sd21-base`, `random:if-i-xl`, `random:tiny`): the published architecture on
    random weights, built on the device. For benchmarks and GPU smoke tests of a deployment, never for results."""
    from services.guidance.priors import random_init

    size = source[len(RANDOM_SOURCE_PREFIX) :]
    sizes = random_init.PIXEL_SIZES if spec.kind == PriorKind.PIXEL else random_init.LATENT_SIZES
    if size not in sizes:
        raise NotFound(f"prior {spec.name!r}: no random architecture {size!r}; known: {', '.join(sizes)}", "source")
    if spec.kind == PriorKind.PIXEL:
        return random_init.build_random_pixel_prior(size, **_text_prior_settings(spec))
    # The source is published with the encoder: a scene rebuilds the same seeded VAE from it to send latents.
    return random_init.build_random_latent_prior(size, source=source, **_text_prior_settings(spec))


def _build_text_prior(prior_class, spec: PriorSpec, checkpoint_id: str) -> DiffusionPrior:
    source = spec.checkpoint_source(checkpoint_id)
    if source and source.startswith(RANDOM_SOURCE_PREFIX):
        return _build_random_prior(spec, source)
    return prior_class.from_pretrained(source, **_text_prior_settings(spec))


@PRIORS.register(PriorKind.LATENT)
def build_latent(spec: PriorSpec, checkpoint_id: str) -> DiffusionPrior:
    from services.guidance.priors.latent import LatentPrior

    return _build_text_prior(LatentPrior, spec, checkpoint_id)


@PRIORS.register(PriorKind.PIXEL)
def build_pixel(spec: PriorSpec, checkpoint_id: str) -> DiffusionPrior:
    from services.guidance.priors.pixel import PixelPrior

    return _build_text_prior(PixelPrior, spec, checkpoint_id)


@PRIORS.register(PriorKind.VIEW_CONDITIONED)
def build_zero123(spec: PriorSpec, checkpoint_id: str) -> DiffusionPrior:
    """Zero-1-to-3 from a local diffusers directory, or `random:tiny` / `random:zero123` (random weights)."""
    from services.guidance.priors import random_init
    from services.guidance.priors.zero123 import Zero123Prior

    source = spec.checkpoint_source(checkpoint_id)
    settings = {
        "name": spec.name,
        "device": spec.device,
        "dtype": spec.dtype,
        "embedding_cache_size": spec.embedding_cache_size,
        "checkpoint_ids": spec.checkpoint_ids,
        **_tuning(spec),
    }
    if source.startswith(RANDOM_SOURCE_PREFIX):
        size = source[len(RANDOM_SOURCE_PREFIX) :]
        if size not in random_init.ZERO123_SIZES:
            known = ", ".join(random_init.ZERO123_SIZES)
            raise NotFound(f"prior {spec.name!r}: no random architecture {size!r}; known: {known}", "source")
        return random_init.build_random_zero123_prior(size, **settings)
    return Zero123Prior.from_pretrained(source, **settings)


class PriorPool:
    """Thread-safe: loads on first use, keeps at most `max_loaded` checkpoints per prior."""

    def __init__(self, config: GuidanceConfig, priors: Registry[DiffusionPrior] = PRIORS) -> None:
        """`priors`: the builders by kind (PRIORS, or a copy with overrides: `PRIORS.with_builders({...})`); every
        configured prior's kind must have one (InvalidArgument naming `priors[i].kind` otherwise)."""
        self.config = config
        self._priors = priors
        for index, spec in enumerate(config.priors):
            try:
                priors.find(spec.kind)
            except UnknownKind as error:
                raise error.invalid_argument(f"priors[{index}].kind") from None
        size = config.batching.max_loaded_checkpoints
        self._loaded: dict[str, LruCache[str, DiffusionPrior]] = {p.name: LruCache(size) for p in config.priors}
        self._lock = threading.Lock()

    def spec(self, name: str) -> PriorSpec:
        spec = self.config.prior(name)
        if spec is None:
            known = ", ".join(p.name for p in self.config.priors)
            raise NotFound(f"unknown prior {name!r}; served here: {known}", "prior")
        return spec

    def resolve(self, name: str, checkpoint_id: str = "") -> tuple[PriorSpec, str]:
        """(spec, checkpoint id; "" is "default"); NotFound naming `prior` / `checkpoint_id` if either is unknown."""
        spec = self.spec(name)
        checkpoint_id = checkpoint_id or "default"
        if checkpoint_id not in spec.checkpoint_ids:
            raise NotFound(
                f"unknown checkpoint {checkpoint_id!r} of prior {name!r}; known: {', '.join(spec.checkpoint_ids)}",
                "checkpoint_id",
            )
        return spec, checkpoint_id

    def get(self, name: str, checkpoint_id: str = "") -> DiffusionPrior:
        spec, checkpoint_id = self.resolve(name, checkpoint_id)
        build = self._priors.find(spec.kind)
        with self._lock:
            return self._loaded[name].get_or_compute(checkpoint_id, lambda: build(spec, checkpoint_id))

