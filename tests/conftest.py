"""Shared test fixtures: a cheap counting prior for engine/transport tests, and a local guidance config."""

from __future__ import annotations

import os
import threading

import pytest
import torch

# Triton kernels run through Triton's interpreter where there is no CUDA device (set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from services.guidance.config import GuidanceConfig, PriorSpec
from services.guidance.priors.base import DiffusionPrior, ViewCondition
from shared.errors import InvalidArgument
from shared.guidance_api import Conditioning, PriorInfo, PriorKind

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class CountingPrior(DiffusionPrior):
    """A pixel-space prior with a closed-form denoiser (eps_c = 0.5 z_t, eps_u = 0.25 z_t) that counts its calls."""

    def __init__(self, name: str = "counting", max_batch_size: int = 8) -> None:
        self.info = PriorInfo(
            name=name,
            kind=PriorKind.PIXEL,
            native_resolution=32,
            max_prompt_tokens=8,
            accepted_conditioning=(Conditioning.TEXT, Conditioning.NEGATIVE_TEXT),
            default_guidance_scale=2.0,
            default_time_range=(0.02, 0.98),
            max_batch_size=max_batch_size,
        )
        self.calls: list[int] = []
        self._lock = threading.Lock()
        self._abar = torch.linspace(0.999, 0.01, 1000)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._abar

    def validate_prompt(self, prompt: str, field: str) -> None:
        if not prompt.strip():
            raise InvalidArgument("prompt is empty", field)
        if len(prompt.split()) > self.info.max_prompt_tokens:
            raise InvalidArgument("prompt is over the token limit", field)

    def encode(self, images: torch.Tensor, conditions: list[ViewCondition]) -> torch.Tensor:
        size = self.info.native_resolution
        resized = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return resized * 2 - 1

    def predict_noise(self, noisy, timesteps, conditions):
        with self._lock:
            self.calls.append(noisy.shape[0])
        return 0.5 * noisy, 0.25 * noisy


def counting_config(**batching) -> GuidanceConfig:
    return GuidanceConfig(
        priors=[PriorSpec(name="counting", kind=PriorKind.PIXEL, source="unused")],
        batching=batching or {},
    )


@pytest.fixture
def counting_prior() -> CountingPrior:
    return CountingPrior()


@pytest.fixture(scope="session")
def coarse_torus():
    """One coarse run of the analytic prior's red torus, shared by the coarse and fine quality tests."""
    from scenes import fit_coarse_torus

    guidance, stage, initial = fit_coarse_torus()
    yield stage, initial
    guidance.close()


@pytest.fixture(scope="session")
def s3_endpoint():
    """http://127.0.0.1:<port> of a real S3 endpoint (moto's server) on loopback, stopped after the session."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
