"""How a scene reaches the guidance tier: one small protocol, two implementations.

`GuidanceClient` (shared/guidance_client.py) already satisfies it over gRPC; `InProcessGuidance` runs a
GuidanceEngine in the same process (tests, single-process development, benchmarks of the pure step).
"""

from __future__ import annotations

from typing import Protocol

import torch

from services.guidance.engine import GuidanceEngine
from services.guidance.priors.base import PriorInfo, SdsRequest, SdsResult
from services.guidance.priors.vae_encoder import VaeImageEncoder, build_encoder
from shared import logging as project_logging
from shared.devices import resolve_dtype
from shared.errors import FailedPrecondition

log = project_logging.get_logger(__name__)


class Guidance(Protocol):
    def compute_sds(self, request: SdsRequest, timeout_s: float | None = None) -> SdsResult: ...

    def prior_info(self, name: str, timeout_s: float | None = None) -> PriorInfo: ...


class PriorInfoCache:
    """Each prior's description, asked once per stage: a step must not pay an extra round trip for it. Also the
    scene's copies of the latent priors' published encoders, built once per stage (`latent_encoder`)."""

    def __init__(self, guidance: Guidance) -> None:
        self.guidance = guidance
        self._infos: dict[str, PriorInfo] = {}
        self._encoders: dict[str, VaeImageEncoder | None] = {}  # by weights digest; None: could not be built

    def __call__(self, name: str, timeout_s: float | None = None) -> PriorInfo:
        if name not in self._infos:
            self._infos[name] = self.guidance.prior_info(name, timeout_s)
        return self._infos[name]

    def latent_encoder(
        self, info: PriorInfo, mode: str, device: torch.device, job_id: str = ""
    ) -> VaeImageEncoder | None:
        """The encoder to run here for `info`'s prior, or None to send images (see GuidedStageConfig.guidance_input).

        Raises FailedPrecondition where mode is "latents" and the prior publishes no encoder or it cannot be built.
        """
        published = info.latent_encoder
        if mode == "images" or (mode == "auto" and device.type != "cuda"):
            return None
        if published is None:
            if mode == "latents":
                raise FailedPrecondition(f"prior {info.name!r} publishes no latent encoder", "guidance_input")
            return None
        if published.digest not in self._encoders:
            self._encoders[published.digest] = self._build(info, mode, device, job_id)
        return self._encoders[published.digest]

    def _build(self, info: PriorInfo, mode: str, device: torch.device, job_id: str) -> VaeImageEncoder | None:
        published = info.latent_encoder
        try:
            encoder = build_encoder(published, device, resolve_dtype("auto", device))
        except Exception as error:  # a missing checkpoint, other weights, no diffusers: images still work
            if mode == "latents":
                raise FailedPrecondition(
                    f"cannot build prior {info.name!r}'s encoder from {published.source!r}: {error}", "guidance_input"
                ) from error
            log.warning("sending images: the prior's encoder cannot be built here", job_id=job_id, prior=info.name,
                        source=published.source, error=str(error))
            return None
        log.info("sending latents: the prior's encoder runs here", job_id=job_id, prior=info.name, source=published.source,
                 digest=published.digest[:12])
        return encoder


class InProcessGuidance:
    def __init__(self, engine: GuidanceEngine) -> None:
        self.engine = engine

    def compute_sds(self, request: SdsRequest, timeout_s: float | None = None) -> SdsResult:
        return self.engine.compute(request, timeout=timeout_s)

    def prior_info(self, name: str, timeout_s: float | None = None) -> PriorInfo:
        return self.engine.prior(name).info

    def close(self) -> None:
        self.engine.close()
