"""GPU-only checks of the guidance priors (run with `make test-gpu` on a CUDA machine; deselected in CI)."""

from __future__ import annotations

import pytest
import torch

from services.guidance import sds
from services.guidance.priors import random_init
from services.guidance.priors.base import SdsRequest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _request(prior, batch=2, seed=3):
    side = prior.info.native_resolution
    return SdsRequest(
        job_id="gpu",
        prior=prior.info.name,
        images=torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(0)),
        prompt="a red torus",
        guidance_scale=7.5,
        seed=seed,
    )


@pytest.mark.parametrize("builder", [random_init.build_random_pixel_prior, random_init.build_random_latent_prior])
def test_half_precision_matches_float32(builder):
    """The auto dtype on CUDA is fp16; its SDS gradient agrees with the fp32 one of the same weights."""
    half = builder("tiny", device="cuda", dtype="auto", seed=0, resolution=64)
    full = builder("tiny", device="cuda", dtype="float32", seed=0, resolution=64)
    assert next(half.unet.parameters()).dtype == torch.float16
    (g16,) = sds.compute_sds(half, [_request(half)])
    (g32,) = sds.compute_sds(full, [_request(full)])
    assert all(g16.finite) and torch.isfinite(g16.grad).all()
    cosine = torch.nn.functional.cosine_similarity(g16.grad.flatten(), g32.grad.flatten(), dim=0)
    assert cosine > 0.99, f"fp16 vs fp32 SDS gradient cosine {cosine:.4f}"


def test_bfloat16_runs():
    prior = random_init.build_random_pixel_prior("tiny", device="cuda", dtype="bfloat16", seed=0)
    (result,) = sds.compute_sds(prior, [_request(prior)])
    assert all(result.finite) and result.grad.abs().sum() > 0
