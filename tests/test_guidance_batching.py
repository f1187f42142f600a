"""The batch runner both guidance servers share: a failed batch is retried request by request, so one bad request
fails only itself; bugs are logged with their traceback, refusals are not; only successful denoiser calls count."""

from __future__ import annotations

import pytest
from types import SimpleNamespace

import torch

from services.guidance import batching
from services.guidance.batching import BatchRunner
from shared.errors import InvalidArgument
from shared.guidance_api import SdsRequest, SdsResult


class FakePool:
    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []

    def get(self, name: str, checkpoint_id: str = ""):
        self.asked.append((name, checkpoint_id))
        return SimpleNamespace(device=torch.device("cpu"))  # a prior as the runner sees it: where it computes


class RecordingLog:
    def __init__(self) -> None:
        self.errors: list[tuple[str, dict]] = []

    def error(self, event: str, **fields) -> None:
        self.errors.append((event, fields))


def request(job_id: str, batch: int = 1) -> SdsRequest:
    return SdsRequest(job_id=job_id, prior="p", images=torch.zeros(batch, 3, 4, 4), prompt="x")


def fake_compute_sds(prior, requests):
    for r in requests:
        if r.job_id == "bug":
            raise ValueError("a bug")
        if r.job_id == "refused":
            raise InvalidArgument("bad images", "images")
    return [SdsResult(grad=r.images, t=[0.5], loss=[0.0], finite=[True], prompts=[r.job_id]) for r in requests]


def test_one_bad_request_fails_alone_and_batch_mates_get_results(monkeypatch):
    monkeypatch.setattr(batching.sds, "compute_sds", fake_compute_sds)
    log = RecordingLog()
    runner = BatchRunner(FakePool(), log)
    requests = [request("good0", 2), request("bug"), request("refused"), request("good1", 3)]
    outcomes = list(runner.outcomes("p", "default", requests))
    assert [o.prompts for o in (outcomes[0], outcomes[3])] == [["good0"], ["good1"]]
    assert isinstance(outcomes[1], ValueError)
    assert isinstance(outcomes[2], InvalidArgument) and outcomes[2].field == "images"
    assert [(event, fields["job_id"]) for event, fields in log.errors] == [("sds_failed", "bug")]
    assert isinstance(log.errors[0][1]["exc_info"], ValueError)
    assert runner.snapshot() == {"denoiser_calls": 2, "requests": 2, "images": 5}


def test_a_good_batch_is_one_denoiser_call(monkeypatch):
    monkeypatch.setattr(batching.sds, "compute_sds", fake_compute_sds)
    pool = FakePool()
    runner = BatchRunner(pool, RecordingLog())
    outcomes = list(runner.outcomes("p", "c1", [request("a", 2), request("b", 1)]))
    assert [o.prompts for o in outcomes] == [["a"], ["b"]]
    assert pool.asked == [("p", "c1")]
    assert runner.snapshot() == {"denoiser_calls": 1, "requests": 2, "images": 3}


def test_the_pool_keeps_the_most_recently_used_checkpoints_and_names_unknown_ones():
    from services.guidance.config import GuidanceConfig, PriorSpec
    from services.guidance.pool import PRIORS, PriorPool
    from shared.errors import NotFound
    from shared.guidance_api import PriorKind

    spec = PriorSpec(name="p", kind=PriorKind.PIXEL, source="s0", checkpoints={"a": "s1", "b": "s2"})
    config = GuidanceConfig(priors=[spec], batching={"max_loaded_checkpoints": 2})
    built: list[str] = []
    pool = PriorPool(
        config, priors=PRIORS.with_builders({PriorKind.PIXEL: lambda s, ckpt: built.append(ckpt) or object()})
    )
    default = pool.get("p")
    assert pool.get("p", "default") is default and pool.get("p", "a") is not default
    pool.get("p")  # default is now the most recently used: loading "b" evicts "a"
    pool.get("p", "b")
    pool.get("p", "a")
    assert built == ["default", "a", "b", "a"]
    assert pool.resolve("p", "") == (spec, "default")
    for name, checkpoint, field in [("nope", "", "prior"), ("p", "zzz", "checkpoint_id")]:
        with pytest.raises(NotFound) as caught:
            pool.resolve(name, checkpoint)
        assert caught.value.field == field


def test_lru_cache_evicts_the_least_recently_used_and_counts():
    from services.guidance.cache import LruCache

    cache: LruCache[str, int] = LruCache(2)
    computed = []
    assert cache.get_or_compute("a", lambda: computed.append("a") or 1) == 1
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent: "b" goes first
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3 and len(cache) == 2
    assert cache.get_or_compute("a", lambda: computed.append("again") or 9) == 1 and computed == ["a"]
    assert (cache.hits, cache.misses) == (4, 2)
    cache.put("none", None)  # a stored None is a value: get_or_compute does not recompute it
    assert cache.get_or_compute("none", lambda: computed.append("none") or 0) is None and "none" not in computed
