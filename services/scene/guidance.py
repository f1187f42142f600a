"""How a scene reaches the guidance tier: one small protocol, two implementations.

`GuidanceClient` (shared/guidance_client.py) already satisfies it over gRPC; `InProcessGuidance` runs a
GuidanceEngine in the same process (tests, single-process development, benchmarks of the pure step).
"""

from __future__ import annotations

from typing import Protocol

import torch

from services.guidance.engine import GuidanceEngine
from services.scene.latent_encoders import Encoder, LatentEncoders
from shared.guidance_api import PriorInfo, SdsRequest, SdsResult


class Guidance(Protocol):
    def compute_sds(self, request: SdsRequest, timeout_s: float | None = None) -> SdsResult: ...

    def prior_info(self, name: str, timeout_s: float | None = None) -> PriorInfo: ...


class PriorInfoCache:
    """Each prior's description, asked once per stage: a step must not pay an extra round trip for it. Also the
    scene's copies of the latent priors' published encoders, built once per stage (`latent_encoder`)."""

    def __init__(self, guidance: Guidance, encoders: LatentEncoders | None = None) -> None:
        self.guidance = guidance
        self._infos: dict[str, PriorInfo] = {}
        self.encoders = encoders or LatentEncoders()

    def __call__(self, name: str, timeout_s: float | None = None) -> PriorInfo:
        if name not in self._infos:
            self._infos[name] = self.guidance.prior_info(name, timeout_s)
        return self._infos[name]

    def latent_encoder(
        self, info: PriorInfo, mode: str, device: torch.device, job_id: str = "", compile_mode: str = "off"
    ) -> Encoder | None:
        """See LatentEncoders.get: the encoder to run for `info`'s prior, or None to send images."""
        return self.encoders.get(info, mode, compile_mode, device, job_id)


class InProcessGuidance:
    def __init__(self, engine: GuidanceEngine) -> None:
        self.engine = engine

    def compute_sds(self, request: SdsRequest, timeout_s: float | None = None) -> SdsResult:
        return self.engine.compute(request, timeout=timeout_s)

    def prior_info(self, name: str, timeout_s: float | None = None) -> PriorInfo:
        return self.engine.prior(name).info

    def close(self) -> None:
        self.engine.close()
