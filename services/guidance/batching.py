"""What both guidance servers do with a batch once it is formed (the standalone engine's batcher, Serve's
`@serve.batch`): one `sds.compute_sds` call for requests of one prior and checkpoint, on the device's guidance stream
(streams.py), counted, and a batch that fails retried one request at a time so that one bad request fails only
itself."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Iterator

from services.guidance import sds
from services.guidance.pool import PriorPool
from services.guidance.streams import GuidanceStreams
from shared.errors import ServiceError
from shared.guidance_api import SdsRequest, SdsResult


@dataclass
class EngineStats:
    denoiser_calls: int = 0
    requests: int = 0
    images: int = 0


class BatchRunner:
    """Thread-safe. `log`: the calling server's logger (bugs are logged there with their traceback)."""

    def __init__(self, pool: PriorPool, log) -> None:
        self.pool = pool
        self.streams = GuidanceStreams()  # the denoisers' CUDA streams, beside their callers' (streams.py)
        self.stats = EngineStats()
        self._log = log
        self._lock = threading.Lock()

    def outcomes(self, prior: str, checkpoint_id: str, requests: list[SdsRequest]) -> Iterator[SdsResult | Exception]:
        """Each request's result, or the exception that failed it alone, in request order and as soon as known."""
        try:
            loaded = self.pool.get(prior, checkpoint_id)
            with self.streams.running(loaded.device, requests) as computed:
                computed.extend(sds.compute_sds(loaded, requests))
            results = iter(computed)
        except Exception as error:  # noqa: BLE001 - one bad request must not fail its batch-mates
            results = self._isolate(prior, checkpoint_id, requests, error)
        else:
            self._count(requests)
        yield from results

    def _isolate(
        self, prior: str, checkpoint_id: str, requests: list[SdsRequest], error: Exception
    ) -> Iterator[SdsResult | Exception]:
        """A failed batch is retried request by request; a lone request's error is its outcome (bugs logged)."""
        if len(requests) > 1:
            for request in requests:
                yield from self.outcomes(prior, checkpoint_id, [request])
            return
        if not isinstance(error, ServiceError):
            self._log.error("sds_failed", exc_info=error, job_id=requests[0].job_id, prior=prior)
        yield error

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return asdict(self.stats)

    def _count(self, requests: list[SdsRequest]) -> None:
        with self._lock:
            self.stats.denoiser_calls += 1
            self.stats.requests += len(requests)
            self.stats.images += sum(r.batch_size for r in requests)
