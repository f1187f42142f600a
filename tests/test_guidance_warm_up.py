"""A guidance server's start-up warm-up (services/guidance/warm_up.py): one synthetic request per configured batch
size through the path real requests take, shaped as the scene sends them; off by default where it buys nothing
(CPU, the analytic prior); a failed warm-up leaves a working server. Tiny random-weight priors on CPU."""

from __future__ import annotations

import pytest
import torch
from magic3d.v1 import guidance_pb2, guidance_pb2_grpc
from pydantic import ValidationError

from services.guidance import sds, standalone
from services.guidance.config import GuidanceConfig, PriorSpec
from services.guidance.engine import GuidanceEngine
from services.guidance.warm_up import warm_up_batch_sizes, should_warm
from shared.grpcio import insecure_channel
from shared.guidance_api import PriorKind, SdsRequest

SIDE = 64


def spec(kind: PriorKind, name: str, **fields) -> PriorSpec:
    return PriorSpec(name=name, kind=kind, source="random:tiny", device="cpu", dtype="float32", resolution=SIDE,
                     **fields)


@pytest.fixture
def seen(monkeypatch):
    """Every request that reaches `sds.compute_sds`, in order, with what the real function returns."""
    requests: list[SdsRequest] = []
    real = sds.compute_sds

    def spy(prior, batch):
        requests.extend(batch)
        return real(prior, batch)

    monkeypatch.setattr(sds, "compute_sds", spy)
    return requests


def test_each_text_prior_is_warmed_per_batch_size_with_the_input_a_scene_sends(seen):
    on = {"mode": "on", "batch_sizes": [2, 4]}
    config = GuidanceConfig(priors=[spec(PriorKind.LATENT, "sd", warm_up=on), spec(PriorKind.PIXEL, "if", warm_up=on),
                                    PriorSpec(name="analytic", kind=PriorKind.ANALYTIC, device="cpu")],
                            batching={"wait_s": 0})
    engine = GuidanceEngine(config)
    try:
        seconds = engine.warm_up()
        assert set(seconds) == {"sd", "if"} and all(s > 0 for s in seconds.values())
        by_prior = {name: [r for r in seen if r.prior == name] for name in ("sd", "if", "analytic")}
        assert [r.batch_size for r in by_prior["sd"]] == [2, 4] and [r.batch_size for r in by_prior["if"]] == [2, 4]
        encoder = engine.prior("sd").info.latent_encoder
        assert all(r.images is None and r.latents.shape[1:] == encoder.latent_shape for r in by_prior["sd"])
        assert all(r.latent_encoder_digest == encoder.digest for r in by_prior["sd"])
        assert all(r.latents is None and r.images.shape[1:] == (3, SIDE, SIDE) for r in by_prior["if"])
        assert by_prior["analytic"] == []
        assert engine.stats.requests == 4
    finally:
        engine.close()


def test_by_default_only_cuda_priors_are_warmed_and_a_too_large_default_adapts():
    latent = spec(PriorKind.LATENT, "sd")
    assert latent.warm_up.mode == "auto" and latent.warm_up.batch_sizes == [4]
    assert not should_warm(latent, torch.device("cpu")) and should_warm(latent, torch.device("cuda"))
    assert not should_warm(PriorSpec(name="a", kind=PriorKind.ANALYTIC), torch.device("cuda"))
    assert not should_warm(spec(PriorKind.LATENT, "sd", warm_up={"mode": "off"}), torch.device("cuda"))
    engine = GuidanceEngine(GuidanceConfig(priors=[latent], batching={"wait_s": 0}))
    try:
        assert engine.warm_up() == {} and engine.stats.requests == 0
        small = spec(PriorKind.LATENT, "sd", max_batch_size=2)  # the default [4] is clamped, not refused
        assert warm_up_batch_sizes(small, engine.prior("sd")) == [2]
    finally:
        engine.close()
    with pytest.raises(ValidationError, match="warm_up.batch_sizes"):
        spec(PriorKind.LATENT, "sd", max_batch_size=2, warm_up={"batch_sizes": [4]})
    with pytest.raises(ValidationError, match="warm_up.batch_sizes"):
        spec(PriorKind.LATENT, "sd", warm_up={"batch_sizes": [0]})


def test_a_failed_warm_up_is_logged_and_the_server_still_serves(monkeypatch):
    real = sds.compute_sds
    tried: list[int] = []

    def fails_on_warm_up(prior, batch):
        if batch[0].job_id == "warm-up":
            tried.append(batch[0].batch_size)
            raise RuntimeError("CUDA error: out of memory (simulated)")
        return real(prior, batch)

    monkeypatch.setattr(sds, "compute_sds", fails_on_warm_up)
    config = GuidanceConfig(priors=[spec(PriorKind.PIXEL, "if", warm_up={"mode": "on"})], batching={"wait_s": 0},
                            port=0)
    running = standalone.start(config)  # warms up before it listens
    try:
        assert tried == [4]
        with insecure_channel(f"127.0.0.1:{running.port}") as channel:
            listed = guidance_pb2_grpc.GuidanceServiceStub(channel).ListPriors(guidance_pb2.ListPriorsRequest(),
                                                                                timeout=30)
        assert [p.name for p in listed.priors] == ["if"]
    finally:
        running.stop(grace=None)
