"""How a scene reaches the guidance tier: one small protocol, two implementations.

`GuidanceClient` (shared/guidance_client.py) already satisfies it over gRPC; `InProcessGuidance` runs a
GuidanceEngine in the same process (tests, single-process development, benchmarks of the pure step).
"""

from __future__ import annotations

from typing import Protocol

from services.guidance.engine import GuidanceEngine
from services.guidance.priors.base import SdsRequest, SdsResult


class Guidance(Protocol):
    def compute_sds(self, request: SdsRequest, timeout_s: float | None = None) -> SdsResult: ...


class InProcessGuidance:
    def __init__(self, engine: GuidanceEngine) -> None:
        self.engine = engine

    def compute_sds(self, request: SdsRequest, timeout_s: float | None = None) -> SdsResult:
        return self.engine.compute(request, timeout=timeout_s)

    def close(self) -> None:
        self.engine.close()
