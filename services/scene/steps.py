"""What the coarse and fine stages share about one optimisation step: the report, counters, per-step seeds, the
phase timer, and the summed SDS gradient of a stage's priors for a batch of rendered images."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from services.scene.config import GuidedStageConfig, PriorTerm
from services.scene.guidance import Guidance, PriorInfoCache
from services.scene.latent_encoders import Encoder
from shared.cameras import Camera
from shared.devices import resolve_dtype, to_device
from shared.errors import FailedPrecondition
from shared.guidance_api import Conditioning, ImageCondition, PriorInfo, SdsRequest


class NonFiniteStepsExceeded(FailedPrecondition):
    """Too many steps in a row produced NaN/Inf; the scene stops and keeps its last checkpoint."""


@dataclass
class StepReport:
    step: int  # steps completed after this one
    losses: dict[str, float]
    phase_seconds: dict[str, float]
    skipped: bool = False
    skipped_total: int = 0


@dataclass
class Counters:
    step: int = 0
    skipped_total: int = 0
    nonfinite_in_a_row: int = 0


def step_seed(seed: int, step: int, term: int) -> int:
    """A distinct, reproducible guidance seed per (stage seed, step, prior term), within uint64."""
    return (seed * 1_000_003 + step * 7919 + term) % (2**63)


class PhaseTimer:
    """Accumulates wall time per named phase: `lap(name)` charges the time since the previous lap to `name`.

    On a CUDA device each lap first waits for the kernels this thread queued on its stream, so that a phase is
    charged for its own GPU work rather than for whatever the next phase happens to wait on; a few microseconds per
    phase. The stream's, not the device's: a device-wide wait would also wait for an in-process guidance's work, and
    fails outright while another thread captures a CUDA graph (shared/cuda_capture.py).
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self._sync = None
        if device is not None and device.type == "cuda":
            self._sync = lambda: torch.cuda.current_stream(device).synchronize()
        self._clock = time.perf_counter()

    def lap(self, name: str) -> None:
        if self._sync is not None:
            self._sync()
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._clock
        self._clock = now


def transfer_dtype_for(config: GuidedStageConfig, device: torch.device) -> torch.dtype:
    """The dtype of guidance traffic: the project's device rule for "auto" (float16 on CUDA, float32 elsewhere)."""
    return resolve_dtype(config.guidance_transfer_dtype, device)


def guidance_gradient(
    guidance: Guidance,
    prior_infos: PriorInfoCache,
    config: GuidedStageConfig,
    job_id: str,
    images: torch.Tensor,
    cameras: list[Camera],
    backgrounds: torch.Tensor,
    step: int,
    reference: ImageCondition | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Weighted sum of every prior's SDS gradient for `images` (B, 3, H, W) (a plain tensor, no autograd), and
    each prior's mean loss (NaN where the prior reported non-finite values).

    Images travel in `config.guidance_transfer_dtype`. A latent prior that publishes its encoder is sent latents
    instead where `config.guidance_input` says so: the encoder runs here (compiled per `latent_encoder_compile`),
    and its backward carries the returned latent gradient to the images (what the prior would do with images).
    Only the priors that re-render views (the analytic prior, `requires_cameras`) get each camera's background, at
    the prior's own resolution (it renders at that size and would resize a larger one to it): for a learned prior
    at 512x512 the backgrounds would double the bytes sent.

    Each term diffuses within its own t range where it sets one (else the stage's), and is conditioned on what its
    `input` says (`prior_input`): the stage's prompt (with the term's learned embeddings), or the stage's
    reference image (`reference`, with no prompt).
    """
    transfer_dtype = transfer_dtype_for(config, images.device)
    # On the scene's device: an in-process prior on the same GPU takes it without a host round trip; a gRPC client
    # copies it to the host through pinned memory when it serialises it (shared.tensors.to_proto).
    detached = images.detach().to(transfer_dtype)
    total = torch.zeros(images.shape, dtype=torch.float32, device=images.device)
    losses: list[float] = []
    for index, term in enumerate(config.priors):
        info = prior_infos(term.prior, config.guidance_timeout_s)
        encoder = prior_infos.latent_encoder(info, config.guidance_input, images.device, job_id,
                                             config.latent_encoder_compile)
        if encoder is not None:
            leaf, latents = encode_images(encoder, images)
            inputs = {"images": None, "latents": latents.detach().to(transfer_dtype),
                      "latent_encoder_digest": info.latent_encoder.digest}
        else:
            inputs = {"images": detached}
        takes_image = prior_input(term, info) == "image"
        if takes_image and reference is None:
            raise FailedPrecondition("this prior takes the reference image, and the stage has none",
                                     f"config.priors[{index}].input")
        t_low, t_high = term.t_min or config.t_min, term.t_max or config.t_max
        request = SdsRequest(
            job_id=job_id,
            prior=term.prior,
            checkpoint_id=term.checkpoint_id,
            **inputs,
            cameras=_cameras_for(info, cameras, backgrounds, transfer_dtype),
            prompt="" if takes_image else config.prompt,
            negative_prompt="" if takes_image else config.negative_prompt,
            view_dependent_prompt=config.view_dependent_prompt and not takes_image,
            image_condition=reference if takes_image else None,
            learned_embeddings=() if takes_image else term.learned_embeddings,
            time_range=(t_low(step), t_high(step)),
            guidance_scale=term.guidance_scale,
            weighting=term.weighting,
            seed=step_seed(config.seed, step, index),
            grad_dtype=transfer_dtype,
        )
        result = guidance.compute_sds(request, timeout_s=config.guidance_timeout_s)
        losses.append(float(np.mean(result.loss)) if all(result.finite) else float("nan"))
        grad = to_device(result.grad, images.device)
        if encoder is not None:
            (grad,) = torch.autograd.grad(latents, leaf, grad.to(latents.dtype))
        total += term.weight * grad.float()
    return total, losses


def encode_images(encoder: Encoder, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A latent prior's encoder on a step's `images` (B, 3, H, W): (the float32 leaf it ran on, its latents, with
    autograd on so that the returned latent gradient can be carried back to the leaf).

    The leaf's shape, dtype, device and grad mode are the compiled encoder's guard key (CompiledEncoder): the
    scene service's start-up warm-up (services/scene/encoder_warm_up.py) calls this too, so that it compiles for
    exactly the key the fine stage's steps will use."""
    leaf = images.detach().float().requires_grad_(True)
    with torch.enable_grad():
        latents = encoder(leaf)
    return leaf, latents


def prior_input(term: PriorTerm, info: PriorInfo) -> str:
    """"text" or "image": the term's stated input, or for "unspecified" the prior's kind (image for a prior that
    accepts an image but no text)."""
    if term.input != "unspecified":
        return term.input
    accepted = set(info.accepted_conditioning)
    return "image" if Conditioning.IMAGE in accepted and Conditioning.TEXT not in accepted else "text"


def _cameras_for(info: PriorInfo, cameras: list[Camera], backgrounds: torch.Tensor,
                 transfer_dtype: torch.dtype) -> list[Camera]:
    """`cameras` with each one's background at the prior's resolution, in the guidance traffic's dtype (at 512
    pixels four float32 backgrounds are 12 of a fine request's 18 MiB), for priors that re-render views."""
    if not info.requires_cameras:
        return cameras
    side = info.native_resolution
    images = backgrounds.detach().float()
    if images.shape[-2:] != (side, side):  # the same resize the prior's Camera.background would do
        images = torch.nn.functional.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
    images = images.permute(0, 2, 3, 1).to(transfer_dtype).cpu()
    return [dataclasses.replace(camera, background_image=images[i]) for i, camera in enumerate(cameras)]


def gradients_finite(optimizer: torch.optim.Optimizer) -> bool:
    return all(
        torch.isfinite(p.grad).all() for group in optimizer.param_groups for p in group["params"] if p.grad is not None
    )


def apply_losses(
    optimizer: torch.optim.Optimizer,
    counters: Counters,
    max_nonfinite_steps: int,
    step: int,
    terms: dict[str, torch.Tensor],
    weight: Callable[[str, int], float],
    sds_losses: list[float],
    timer: PhaseTimer,
    after_update: Callable[[int], None] = lambda completed: None,
    after_backward: Callable[[], None] = lambda: None,
) -> StepReport:
    """The tail every stage's step shares: the weighted sum of its loss `terms` ("sds" is the surrogate whose
    gradient is the prior's) -> backward -> optimiser step -> `after_update(steps completed)`.

    All or nothing: a step whose losses or gradients are not finite changes no parameter; it is skipped and
    counted, and `max_nonfinite_steps` of them in a row raise NonFiniteStepsExceeded. `after_backward` runs between
    the backward and the finiteness check (a pipelined step hands its shadow parameters' gradients to the optimiser's).
    """
    total = sum(weight(name, step) * value for name, value in terms.items())
    losses = {"sds": float(np.mean(sds_losses))} | {k: float(v.detach()) for k, v in terms.items() if k != "sds"}
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(total) or not all(math.isfinite(v) for v in losses.values()):
        return _skipped(counters, max_nonfinite_steps, step, losses, timer.seconds)
    total.backward()
    after_backward()
    timer.lap("backward")
    if not gradients_finite(optimizer):
        optimizer.zero_grad(set_to_none=True)
        return _skipped(counters, max_nonfinite_steps, step, losses, timer.seconds)
    optimizer.step()
    counters.step += 1
    counters.nonfinite_in_a_row = 0
    after_update(counters.step)
    timer.lap("optimizer")
    losses["total"] = float(total.detach())
    return StepReport(counters.step, losses, timer.seconds, skipped_total=counters.skipped_total)


def _skipped(
    counters: Counters, max_nonfinite_steps: int, step: int, losses: dict[str, float], phases: dict[str, float]
) -> StepReport:
    counters.skipped_total += 1
    counters.nonfinite_in_a_row += 1
    if counters.nonfinite_in_a_row >= max_nonfinite_steps:
        raise NonFiniteStepsExceeded(
            f"{counters.nonfinite_in_a_row} steps in a row had NaN/Inf losses or gradients (at step {step})"
        )
    return StepReport(step, losses, phases, skipped=True, skipped_total=counters.skipped_total)
