"""The guidance engine: validates SDS requests and runs them in dynamic batches, one worker per prior.

Concurrent requests for the same prior and checkpoint are gathered (up to `max_batch_images` images, waiting at
most `wait_s` for company) and answered by one denoiser call; different priors or checkpoints never share a call.
A full queue is refused at once with RESOURCE_EXHAUSTED, never left to hang. Used in-process, by the standalone
gRPC server, and (with Ray Serve's own batching instead of this one) by the Serve deployment.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from services.guidance import sds
from services.guidance.batching import BatchRunner
from services.guidance.config import GuidanceConfig
from services.guidance.image_cache import ReferenceImageCache
from services.guidance.pool import PriorPool
from services.guidance.priors.base import DiffusionPrior
from services.guidance.warm_up import warm_up_priors
from shared.errors import InvalidArgument, ResourceExhausted, Unavailable
from shared.guidance_api import PriorInfo, PromptCheck, SdsRequest, SdsResult
from shared.logging import get_logger

log = get_logger(__name__)


def check_prompt(prior: DiffusionPrior, prompt: str, negative_prompt: str = "") -> PromptCheck:
    """CheckPrompt on a loaded prior: the prompt checks ComputeSds makes, with view-dependent prompting assumed.

    The prompt must pass the prior's own `validate_prompt` as is and with the longest view suffix appended (as
    `sds.validate_request` checks it when cameras and view-dependent prompting are on); a non-empty negative
    prompt must pass it too. Errors are InvalidArgument naming `prompt` / `negative_prompt`.
    """
    prior.validate_prompt(prompt, "prompt")
    try:
        prior.validate_prompt(prompt + sds.LONGEST_VIEW_SUFFIX, "prompt")
    except InvalidArgument as error:
        raise InvalidArgument(
            f"{error.message} (with the longest view suffix {sds.LONGEST_VIEW_SUFFIX!r} appended, as ComputeSds may)",
            error.field,
        ) from None
    if negative_prompt:
        prior.validate_prompt(negative_prompt, "negative_prompt")
    return PromptCheck(
        token_count=prior.count_tokens(prompt + sds.LONGEST_VIEW_SUFFIX),
        negative_token_count=prior.count_tokens(negative_prompt) if negative_prompt else 0,
        max_tokens=prior.info.max_prompt_tokens,
    )


@dataclass
class _Pending:
    request: SdsRequest
    future: Future
    enqueued: float = field(default_factory=time.perf_counter)


class GuidanceEngine:
    def __init__(self, config: GuidanceConfig, pool: PriorPool | None = None) -> None:
        self.config = config
        self.pool = pool or PriorPool(config)
        self._runner = BatchRunner(self.pool, log)
        self.stats = self._runner.stats
        self._batching = config.batching
        self.reference_images = ReferenceImageCache(config.reference_image_cache_size, config.reference_image_cache_bytes)
        self._queues: dict[str, queue.Queue[_Pending | None]] = {}
        self._workers: dict[str, threading.Thread] = {}
        self._closed = threading.Event()
        for spec in config.priors:
            self._queues[spec.name] = queue.Queue(maxsize=self._batching.max_queue)
            worker = threading.Thread(target=self._run_worker, args=(spec.name,), name=f"sds-{spec.name}", daemon=True)
            self._workers[spec.name] = worker
            worker.start()

    # -- public API -------------------------------------------------------------------------------------------

    def warm_up(self) -> dict[str, float]:
        """Loads every prior's default checkpoint and runs the configured warm-up requests (warm_up.py)."""
        return warm_up_priors(self.config.priors, self._runner)

    def list_priors(self) -> list[PriorInfo]:
        return [self.pool.get(spec.name).info for spec in self.config.priors]

    def prior(self, name: str, checkpoint_id: str = "") -> DiffusionPrior:
        return self.pool.get(name, checkpoint_id)

    def check_prompt(self, prior: str, prompt: str, negative_prompt: str = "", checkpoint_id: str = "") -> PromptCheck:
        """NotFound naming `prior` / `checkpoint_id`, else `check_prompt` on that (possibly newly loaded) prior."""
        return check_prompt(self.pool.get(prior, checkpoint_id), prompt, negative_prompt)

    def submit(self, request: SdsRequest) -> Future:
        """Validates now (errors raise here), then queues; the future resolves to an SdsResult."""
        if self._closed.is_set():
            raise Unavailable("guidance engine is shutting down", retry_after_s=1.0)
        prior = self.pool.get(request.prior, request.checkpoint_id)
        sds.validate_request(request, prior, self._batching.max_batch_images)
        request = self.reference_images.resolve(request)
        pending = _Pending(request, Future())
        try:
            self._queues[request.prior].put_nowait(pending)
        except queue.Full:
            raise ResourceExhausted(
                f"prior {request.prior!r} has {self._batching.max_queue} requests queued; retry later",
                retry_after_s=0.5,
            ) from None
        return pending.future

    def compute(self, request: SdsRequest, timeout: float | None = None) -> SdsResult:
        return self.submit(request).result(timeout=timeout)

    def close(self) -> None:
        self._closed.set()
        for q in self._queues.values():
            q.put(None)
        for worker in self._workers.values():
            worker.join(timeout=5)

    # -- batching ---------------------------------------------------------------------------------------------

    def _run_worker(self, prior_name: str) -> None:
        inbox = self._queues[prior_name]
        held: list[_Pending] = []  # requests for another checkpoint than the batch being formed
        while not self._closed.is_set():
            first = held.pop(0) if held else inbox.get()
            if first is None:
                return
            batch = [first]
            images = first.request.batch_size
            deadline = time.perf_counter() + self._batching.wait_s
            while images < self._batching.max_batch_images:
                remaining = deadline - time.perf_counter()
                try:
                    item = inbox.get(timeout=max(remaining, 0)) if remaining > 0 else inbox.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    inbox.put(None)  # keep the stop signal for the outer loop
                    break
                same = item.request.checkpoint_id == first.request.checkpoint_id
                fits = images + item.request.batch_size <= self._batching.max_batch_images
                if same and fits:
                    batch.append(item)
                    images += item.request.batch_size
                else:
                    held.append(item)
                    break
            self._run_batch(batch)

    def _run_batch(self, batch: list[_Pending]) -> None:
        first = batch[0].request
        outcomes = self._runner.outcomes(first.prior, first.checkpoint_id, [p.request for p in batch])
        for pending, outcome in zip(batch, outcomes):
            if isinstance(outcome, Exception):
                pending.future.set_exception(outcome)
            else:
                outcome.server_time_s = time.perf_counter() - pending.enqueued
                pending.future.set_result(outcome)
