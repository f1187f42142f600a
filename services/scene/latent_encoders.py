"""The latent priors' published encoders as a scene runs them, to send latents instead of images.

Built once per weights digest (a stage's priors may share one), from the source the prior publishes
(PriorInfo.latent_encoder), and on CUDA compiled with torch.compile: inductor fuses the encoder's GroupNorm + SiLU
passes, forward + backward 56.5 -> 43.1 ms for 4 images at 512x512 on an H200 (bench/encoder_speed.py,
BENCHMARKS.md), for about 50 s of compilation on the first call in a process with a cold inductor cache.
"""

from __future__ import annotations

from typing import Callable

import torch

from services.guidance.priors.vae_encoder import VaeImageEncoder, build_encoder
from shared import logging as project_logging
from shared.devices import resolve_dtype
from shared.errors import FailedPrecondition
from shared.guidance_api import PriorInfo

log = project_logging.get_logger(__name__)

Encoder = Callable[[torch.Tensor], torch.Tensor]


def resolve_compile(mode: str, device: torch.device) -> bool:
    """"auto" compiles on CUDA only: on the CPU the encoder costs the same on either side of the wire."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"latent_encoder_compile must be auto, on or off, got {mode!r}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


class CompiledEncoder:
    """A compiled encoder that falls back to the eager one if its first call (the compilation) fails.

    Only the first call is guarded: later errors (out of memory, bad input) are the caller's, as in eager mode.
    """

    def __init__(
        self, eager: VaeImageEncoder, backend: str | Callable, on_fallback: Callable[[Exception], None]
    ) -> None:
        self.eager = eager
        self._compiled = torch.compile(eager, backend=backend)
        self._on_fallback = on_fallback
        self._checked = False

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self._compiled is None:
            return self.eager(images)
        if self._checked:
            return self._compiled(images)
        try:
            latents = self._compiled(images)
        except Exception as error:  # noqa: BLE001 - any compiler failure: the eager encoder gives the same latents
            self._compiled = None
            self._on_fallback(error)
            return self.eager(images)
        self._checked = True
        return latents


class LatentEncoders:
    """The encoders a scene runs, by weights digest; None where one could not be built (send images)."""

    def __init__(self, compile_backend: str | Callable = "inductor") -> None:
        self.compile_backend = compile_backend
        self._by_digest: dict[str, Encoder | None] = {}

    def get(
        self, info: PriorInfo, mode: str, compile_mode: str, device: torch.device, job_id: str = ""
    ) -> Encoder | None:
        """The encoder to run here for `info`'s prior, or None to send images (GuidedStageConfig.guidance_input).

        Raises FailedPrecondition where mode is "latents" and the prior publishes no encoder or it cannot be built.
        """
        published = info.latent_encoder
        if mode == "images" or (mode == "auto" and device.type != "cuda"):
            return None
        if published is None:
            if mode == "latents":
                raise FailedPrecondition(f"prior {info.name!r} publishes no latent encoder", "guidance_input")
            return None
        if published.digest not in self._by_digest:
            self._by_digest[published.digest] = self._build(info, mode, resolve_compile(compile_mode, device), device,
                                                            job_id)
        return self._by_digest[published.digest]

    def _build(self, info: PriorInfo, mode: str, compile_: bool, device: torch.device, job_id: str) -> Encoder | None:
        published = info.latent_encoder
        context = dict(job_id=job_id, prior=info.name, source=published.source)
        try:
            encoder = build_encoder(published, device, resolve_dtype("auto", device))
        except Exception as error:  # a missing checkpoint, other weights, no diffusers: images still work
            if mode == "latents":
                raise FailedPrecondition(
                    f"cannot build prior {info.name!r}'s encoder from {published.source!r}: {error}", "guidance_input"
                ) from error
            log.warning("sending images: the prior's encoder cannot be built here", error=str(error), **context)
            return None
        log.info("sending latents: the prior's encoder runs here", digest=published.digest[:12], compiled=compile_,
                 **context)
        if not compile_:
            return encoder

        def fallback(error: Exception) -> None:
            log.warning("the encoder runs eagerly: compiling it failed", error=str(error), **context)

        return CompiledEncoder(encoder, self.compile_backend, fallback)
