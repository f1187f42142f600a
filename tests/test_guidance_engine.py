"""Dynamic batching and overload in the engine (no transport)."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import CountingPrior, counting_config
from services.guidance.engine import GuidanceEngine
from services.guidance.pool import PRIORS, PriorPool
from shared.errors import InvalidArgument, NotFound, ResourceExhausted
from shared.guidance_api import PriorKind, SdsRequest


def engine_with(prior: CountingPrior, **batching) -> GuidanceEngine:
    config = counting_config(**batching)
    priors = PRIORS.with_builders({PriorKind.PIXEL: lambda spec, ckpt: prior})
    return GuidanceEngine(config, PriorPool(config, priors=priors))


def request(seed: int, batch: int = 1, **overrides) -> SdsRequest:
    fields = dict(job_id=f"job-{seed}", prior="counting", images=torch.rand(batch, 3, 32, 32), prompt="a torus", seed=seed)
    fields.update(overrides)
    return SdsRequest(**fields)


def test_concurrent_requests_share_denoiser_calls():
    prior = CountingPrior()
    engine = engine_with(prior, wait_s=0.2, max_batch_images=16)
    try:
        futures = [engine.submit(request(seed, batch=2)) for seed in range(6)]
        results = [f.result(timeout=30) for f in futures]
    finally:
        engine.close()
    assert all(r.grad.shape == (2, 3, 32, 32) and torch.isfinite(r.grad).all() for r in results)
    assert len(prior.calls) < 6
    assert sum(prior.calls) == 12  # every image went through the denoiser exactly once
    assert engine.stats.requests == 6 and engine.stats.denoiser_calls == len(prior.calls)


def test_batched_result_equals_unbatched_result():
    prior = CountingPrior()
    engine = engine_with(prior, wait_s=0.0)
    try:
        images = torch.rand(1, 3, 32, 32)
        alone = engine.compute(request(5, images=images), timeout=30)
    finally:
        engine.close()
    batching = engine_with(CountingPrior(), wait_s=0.2)
    try:
        futures = [batching.submit(request(s)) for s in (1, 2)] + [batching.submit(request(5, images=images))]
        together = futures[-1].result(timeout=30)
    finally:
        batching.close()
    assert torch.equal(alone.grad, together.grad)


def test_batch_never_exceeds_image_budget():
    prior = CountingPrior()
    engine = engine_with(prior, wait_s=0.2, max_batch_images=4)
    try:
        for f in [engine.submit(request(s, batch=3)) for s in range(4)]:
            f.result(timeout=30)
    finally:
        engine.close()
    assert max(prior.calls) <= 4


def test_full_queue_is_refused_not_hung():
    gate = threading.Event()

    class Slow(CountingPrior):
        def predict_noise(self, noisy, timesteps, conditions):
            gate.wait(timeout=10)
            return super().predict_noise(noisy, timesteps, conditions)

    engine = engine_with(Slow(), max_queue=2, wait_s=0.0, max_batch_images=1)
    try:
        accepted = [engine.submit(request(0))]  # taken by the worker, blocked in the denoiser
        for attempt in range(10):  # the worker may take a moment to pick up the first
            try:
                accepted.append(engine.submit(request(attempt + 1)))
            except ResourceExhausted as error:
                assert error.retry_after_s is not None
                break
        else:
            pytest.fail("queue never filled")
        gate.set()
        assert all(f.result(timeout=30).grad is not None for f in accepted)  # nothing accepted is lost
    finally:
        gate.set()
        engine.close()


def test_bad_requests_raise_before_queueing():
    engine = engine_with(CountingPrior())
    try:
        with pytest.raises(InvalidArgument):
            engine.submit(request(0, prompt=""))
        with pytest.raises(NotFound) as caught:
            engine.submit(request(0, prior="nope"))
        assert caught.value.field == "prior"
        assert engine.compute(request(1), timeout=30).grad.shape == (1, 3, 32, 32)
    finally:
        engine.close()
