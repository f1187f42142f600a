"""Start-up warm-up of a guidance server's priors: one synthetic SDS request per configured batch size.

A cold prior's first call pays for what no later call does: CUDA-graph capture of the denoiser per batch shape
(priors/cuda_graphs.py), cuDNN/cuBLAS algorithm choices, lazily loaded kernels. The warm-up moves that cost before
the server reports ready, through the same path a request takes (BatchRunner: the guidance stream,
`sds.compute_sds`), so a job's first step finds the graphs captured. Measured on an H100 (BENCHMARKS.md, "Issue 17,
ninth session"): IF-I-XL and SD 2.1-base at batch 4 add 4.7 s to start-up and take 4.5 s off a cold job's first
coarse step (33.8 -> 29.3 s); most of the rest is the scene's kernel compilation, which its cache volume keeps.

Only text-conditioned priors (pixel, latent) are warmed: the analytic prior has nothing to capture, and a
view-conditioned prior needs a reference image that only a job brings. A warm-up that fails is logged and the server
starts anyway: the same error reaches the first request that needs the prior, with its status.
"""

from __future__ import annotations

import time

import structlog
import torch

from services.guidance.batching import BatchRunner
from services.guidance.config import PriorSpec
from services.guidance.priors.base import DiffusionPrior
from shared.guidance_api import PriorKind, SdsRequest

log = structlog.get_logger(__name__)

WARMED_KINDS = (PriorKind.PIXEL, PriorKind.LATENT)
WARM_UP_JOB_ID = "warm-up"
WARM_UP_PROMPT = "a warm-up prompt"


def should_warm(spec: PriorSpec, device: torch.device) -> bool:
    """The spec's warm-up mode for a prior loaded on `device` ("auto": CUDA only)."""
    if spec.kind not in WARMED_KINDS or spec.warm_up.mode == "off" or not spec.warm_up.batch_sizes:
        return False
    return spec.warm_up.mode == "on" or device.type == "cuda"


def warm_up_batch_sizes(spec: PriorSpec, prior: DiffusionPrior) -> list[int]:
    """The configured sizes within what the prior takes in one request, each once, in order."""
    limit = min(spec.max_batch_size, prior.info.max_batch_size)
    return sorted({min(size, limit) for size in spec.warm_up.batch_sizes})


def warm_up_request(spec: PriorSpec, prior: DiffusionPrior, batch_size: int, seed: int = 0) -> SdsRequest:
    """A request shaped like a job's: latents where the prior publishes an encoder (and input is auto/latents)."""
    info = prior.info
    generator = torch.Generator().manual_seed(seed)
    use_latents = spec.warm_up.input == "latents" or (spec.warm_up.input == "auto" and info.latent_encoder is not None)
    if use_latents:
        if info.latent_encoder is None:
            raise ValueError(f"prior {spec.name!r}: warm_up.input is latents, but it publishes no latent encoder")
        latents = torch.randn((batch_size, *info.latent_encoder.latent_shape), generator=generator)
        inputs = {"images": None, "latents": latents.to(prior.device),
                  "latent_encoder_digest": info.latent_encoder.digest}
    else:
        side = info.native_resolution
        inputs = {"images": torch.rand((batch_size, 3, side, side), generator=generator).to(prior.device)}
    return SdsRequest(job_id=WARM_UP_JOB_ID, prior=spec.name, prompt=WARM_UP_PROMPT, seed=seed, **inputs)


def warm_up_priors(specs: list[PriorSpec], runner: BatchRunner) -> dict[str, float]:
    """Loads each prior's default checkpoint (so no request pays for it) and runs its warm-up.

    Returns the seconds each warmed prior took; priors not warmed, or whose warm-up failed, are absent."""
    seconds: dict[str, float] = {}
    for spec in specs:
        prior = runner.pool.get(spec.name)
        if not should_warm(spec, prior.device):
            continue
        began = time.perf_counter()
        sizes = warm_up_batch_sizes(spec, prior)
        try:
            for size in sizes:
                outcome = next(iter(runner.outcomes(spec.name, "", [warm_up_request(spec, prior, size)])))
                if isinstance(outcome, Exception):
                    raise outcome
            if prior.device.type == "cuda":
                torch.cuda.synchronize(prior.device)
        except Exception as error:  # noqa: BLE001 - the server still starts; requests get the error with a status
            log.error("prior_warm_up_failed", prior=spec.name, batch_sizes=sizes, error=repr(error))
            continue
        seconds[spec.name] = time.perf_counter() - began
        log.info("prior_warmed_up", prior=spec.name, batch_sizes=sizes, seconds=round(seconds[spec.name], 3))
    return seconds
