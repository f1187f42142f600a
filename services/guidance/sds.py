"""Score Distillation Sampling: the math, with no transport.

For images x rendered by a 3D model, a prior encodes z0 = E(x) (identity-like for pixel priors, the VAE for
latent ones), draws t and eps, forms z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps and predicts eps_hat with
classifier-free guidance. The SDS gradient w.r.t. z0 is  w(t) (eps_hat - eps)  (U-Net Jacobian omitted), and
the gradient w.r.t. the images is its vector-Jacobian product through E. A caller that runs E itself (a latent
prior's published encoder) sends z0 and gets the gradient w.r.t. z0 back.

Classifier-free guidance convention (stated once, used everywhere):
    eps_hat = eps_uncond + s * (eps_cond - eps_uncond)
so s = 1 is the purely conditional model and s = 0 the unconditional one. (threestudio's older classes use
eps_cond + s (eps_cond - eps_uncond), i.e. our s equals their s + 1.)
"""

from __future__ import annotations

import math
import time

import torch

from services.guidance.priors.base import DiffusionPrior, ViewCondition
from shared.devices import to_device
from shared.errors import FailedPrecondition, InvalidArgument, NotFound
from shared.cameras import Camera
from shared.guidance_api import Conditioning, ImageCondition, SdsRequest, SdsResult, Weighting

MIN_IMAGE_SIDE = 16
MAX_IMAGE_SIDE = 1024


VIEW_SUFFIXES = (", front view", ", side view", ", back view", ", overhead view")
# The longest suffix `conditions_for` may append (prompt checks count with it).
LONGEST_VIEW_SUFFIX = max(VIEW_SUFFIXES, key=len)


def view_suffix(azimuth_deg: float, elevation_deg: float, overhead_above_deg: float = 60.0) -> str:
    """DreamFusion's view-dependent prompt suffix for a camera direction."""
    if elevation_deg > overhead_above_deg:
        return ", overhead view"
    azimuth = (azimuth_deg + 180.0) % 360.0 - 180.0  # into [-180, 180)
    if abs(azimuth) < 45.0:
        return ", front view"
    if abs(azimuth) > 135.0:
        return ", back view"
    return ", side view"


def sds_weight(weighting: Weighting, alpha_bar: torch.Tensor) -> torch.Tensor:
    if weighting == Weighting.SDS:
        return 1.0 - alpha_bar
    if weighting == Weighting.UNIFORM:
        return torch.ones_like(alpha_bar)
    if weighting == Weighting.FANTASIA3D:
        return alpha_bar.sqrt() * (1.0 - alpha_bar)
    raise ValueError(f"unknown weighting {weighting}")


def classifier_free_guidance(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return eps_uncond + scale * (eps_cond - eps_uncond)


def timesteps_from_fractions(t: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Fractions in (0, 1) -> integer timesteps in [1, T - 1]."""
    return (t * num_train_timesteps).round().long().clamp(1, num_train_timesteps - 1)


def draw_times(request: SdsRequest, default_range: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """t per image, from explicit values or uniform in the request's (or prior's) range."""
    # The uniform draw happens even for explicit t, so a seed gives the same noise either way.
    uniform = torch.rand(request.batch_size, generator=generator)
    if request.explicit_t is not None:
        return torch.tensor(request.explicit_t, dtype=torch.float32)
    t_min, t_max = request.time_range or default_range
    return t_min + (t_max - t_min) * uniform


def conditions_for(request: SdsRequest) -> list[ViewCondition]:
    """Per-image prompts, with DreamFusion's view suffix when asked for and cameras are known."""
    batch = request.batch_size
    conditions = []
    for i in range(batch):
        camera = request.cameras[i] if request.cameras else None
        prompt = request.prompt
        if request.view_dependent_prompt and camera is not None:
            prompt += view_suffix(camera.azimuth_deg, camera.elevation_deg)
        condition = request.image_condition
        conditions.append(
            ViewCondition(
                prompt=prompt,
                negative_prompt=request.negative_prompt,
                camera=camera,
                image=condition,
                learned_embeddings=request.learned_embeddings,
                relative_pose=relative_pose(condition, camera, i) if condition is not None else None,
            )
        )
    return conditions


def relative_pose(condition: ImageCondition, camera: Camera | None, index: int) -> tuple[float, float, float] | None:
    """Image `index`'s pose from the reference view: the request's explicit one, else its camera's minus the
    reference camera's (elevation, azimuth in degrees, distance); None where neither is known."""
    if condition.relative_poses:
        return tuple(condition.relative_poses[index])
    if camera is None:
        return None
    reference = condition.reference_camera
    return (
        camera.elevation_deg - reference.elevation_deg,
        camera.azimuth_deg - reference.azimuth_deg,
        camera.distance - reference.distance,
    )


def validate_request(request: SdsRequest, prior: DiffusionPrior, max_batch_size: int) -> None:
    """Checks everything about a request that does not need the network. Errors name the proto field."""
    if request.latents is not None:
        if request.images is not None:
            raise InvalidArgument("send images or latents, not both", "latents")
        _validate_latents(request, prior)
    elif request.images is None:
        raise InvalidArgument("images (or latents) are required", "images")
    else:
        _validate_images(request.images)
    field = "latents.shape" if request.latents is not None else "images.shape"
    batch = request.batch_size
    if batch < 1:
        raise InvalidArgument("batch must hold at least one image", field)
    limit = min(max_batch_size, prior.info.max_batch_size)
    if batch > limit:
        raise InvalidArgument(f"batch {batch} is over the maximum {limit}", field)
    if request.image_condition is not None and Conditioning.IMAGE not in prior.info.accepted_conditioning:
        raise InvalidArgument(f"prior {prior.info.name!r} takes no image conditioning", "image_condition")
    if request.image_condition is not None:
        _validate_image_condition(request.image_condition, batch)
    if prior.info.requires_cameras and not request.cameras:
        raise InvalidArgument(f"prior {prior.info.name!r} needs one camera per image", "cameras")
    if request.cameras and len(request.cameras) != batch:
        raise InvalidArgument(f"{len(request.cameras)} cameras for {batch} images", "cameras")
    if request.explicit_t is not None:
        if len(request.explicit_t) != batch:
            raise InvalidArgument(f"{len(request.explicit_t)} values for {batch} images", "explicit_times.t")
        if not all(0.0 < t < 1.0 for t in request.explicit_t):
            raise InvalidArgument("every t must lie in (0, 1)", "explicit_times.t")
    if request.time_range is not None:
        t_min, t_max = request.time_range
        if not (0.0 < t_min < 1.0 and 0.0 < t_max < 1.0):
            raise InvalidArgument(f"time range ({t_min}, {t_max}) must lie in (0, 1)", "time_range")
        if t_min > t_max:
            raise InvalidArgument(f"min {t_min} > max {t_max}", "time_range.min")
    if request.guidance_scale is not None and not (
        math.isfinite(request.guidance_scale) and request.guidance_scale >= 0.0
    ):
        raise InvalidArgument(f"must be finite and >= 0, got {request.guidance_scale}", "guidance_scale")
    if request.checkpoint_id and request.checkpoint_id not in prior.info.checkpoint_ids:
        raise NotFound(
            f"unknown checkpoint {request.checkpoint_id!r} of prior {prior.info.name!r}; "
            f"known: {', '.join(prior.info.checkpoint_ids)}",
            "checkpoint_id",
        )
    prior.validate_conditioning(request)
    # With view-dependent prompting the longest suffix must fit too, or the tokenizer would silently cut it off.
    longest = LONGEST_VIEW_SUFFIX if request.view_dependent_prompt and request.cameras else ""
    if request.prompt or request.image_condition is None:  # an image-conditioned request may come without a prompt
        prior.validate_prompt(request.prompt, "prompt")
        if longest:
            prior.validate_prompt(request.prompt + longest, "prompt")
    if request.negative_prompt:
        prior.validate_prompt(request.negative_prompt, "negative_prompt")


def _validate_image_condition(condition: ImageCondition, batch: int) -> None:
    if condition.relative_poses and len(condition.relative_poses) != batch:
        raise InvalidArgument(
            f"{len(condition.relative_poses)} relative poses for {batch} images", "image_condition.relative_poses"
        )
    if not all(math.isfinite(value) for pose in condition.relative_poses for value in pose):
        raise InvalidArgument("relative poses must be finite", "image_condition.relative_poses")
    if condition.image is not None:
        for side in condition.image.shape[-2:]:
            if not MIN_IMAGE_SIDE <= side <= MAX_IMAGE_SIDE:
                raise InvalidArgument(
                    f"reference image side {side} outside [{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}]",
                    "image_condition.image",
                )
        _check_finite_float(condition.image, "image_condition.image")


def _validate_images(images: torch.Tensor) -> None:
    if images.ndim != 4:
        raise InvalidArgument(f"images must have rank 4 (B, 3, H, W), got shape {list(images.shape)}", "images.shape")
    _, channels, height, width = images.shape
    if channels != 3:
        raise InvalidArgument(f"images must have 3 channels, got {channels}", "images.shape")
    for side in (height, width):
        if not MIN_IMAGE_SIDE <= side <= MAX_IMAGE_SIDE:
            raise InvalidArgument(
                f"image side {side} outside [{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}]", "images.shape"
            )
    _check_finite_float(images, "images")


def _validate_latents(request: SdsRequest, prior: DiffusionPrior) -> None:
    """Latents are accepted only from the prior's own published encoder, identified by its weights' digest."""
    encoder = prior.info.latent_encoder
    if encoder is None:
        raise FailedPrecondition(f"prior {prior.info.name!r} publishes no latent encoder: send images", "latents")
    latents = request.latents
    expected = list(encoder.latent_shape)
    if latents.ndim != 4 or list(latents.shape[1:]) != expected:
        raise InvalidArgument(f"latents must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                              f"got {list(latents.shape)}", "latents.shape")
    if not request.latent_encoder_digest:
        raise InvalidArgument("latents need the digest of the encoder that made them", "latent_encoder_digest")
    if request.latent_encoder_digest != encoder.digest:
        raise FailedPrecondition(
            f"latents made by encoder {request.latent_encoder_digest[:12]}; prior {prior.info.name!r} "
            f"(checkpoint {request.checkpoint_id or 'default'!r}) encodes with {encoder.digest[:12]}: ask PriorInfo "
            "again, or send images",
            "latent_encoder_digest",
        )
    _check_finite_float(latents, "latents")


def _check_finite_float(tensor: torch.Tensor, field: str) -> None:
    if not tensor.is_floating_point():
        raise InvalidArgument(f"{field} must be floating point, got {tensor.dtype}", f"{field}.dtype")
    # One float64 sum carries any NaN/Inf through (and cannot overflow for images): a fraction of the cost of an
    # elementwise isfinite over a 4 x 3 x 512 x 512 batch on the host.
    if not torch.isfinite(tensor.sum(dtype=torch.float64)):
        raise InvalidArgument(f"{field} contain NaN or Inf", f"{field}.data")


def compute_sds(prior: DiffusionPrior, requests: list[SdsRequest]) -> list[SdsResult]:
    """SDS for several requests of one prior and checkpoint in a single denoiser call.

    Each request's t and noise come from its own seed, so a result does not depend on what it was batched with.
    Requests must already be validated.
    """
    start = time.perf_counter()
    schedule = prior.alphas_cumprod
    encoded, images_in, times, noises, conditions = [], [], [], [], []
    with torch.enable_grad():
        for request in requests:
            generator = torch.Generator().manual_seed(request.seed)
            request_conditions = conditions_for(request)
            if request.latents is not None:  # encoded by the caller: the gradient is w.r.t. z0 itself
                images = None
                z0 = prior.working_space(to_device(request.latents.detach(), prior.device))
            else:
                # On the prior's device before the graph starts: the gradient w.r.t. the images, its finite check
                # and its cast then run there, and the result stays there (the transport copies it to the host).
                images = to_device(request.images.detach(), prior.device).float().requires_grad_(True)
                z0 = prior.encode(images, request_conditions)
            t = draw_times(request, prior.info.default_time_range, generator)
            noise = torch.randn(z0.shape, generator=generator, dtype=torch.float32)
            images_in.append(images)
            encoded.append(z0)
            times.append(timesteps_from_fractions(t, prior.num_train_timesteps))
            noises.append(noise)
            conditions.extend(request_conditions)

    timesteps = torch.cat(times)
    alpha_bar = schedule[timesteps]
    noise = torch.cat(noises).to(prior.device)
    z0 = torch.cat([z.detach() for z in encoded])
    scale_shape = (-1,) + (1,) * (z0.ndim - 1)
    a = alpha_bar.to(prior.device, z0.dtype).reshape(scale_shape)
    noisy = a.sqrt() * z0 + (1 - a).sqrt() * noise.to(z0.dtype)
    with torch.no_grad():
        eps_cond, eps_uncond = prior.predict_noise(noisy, timesteps.to(prior.device), conditions)

    results, offset = [], 0
    for request, images, z_request, steps in zip(requests, images_in, encoded, times):
        n = z_request.shape[0]
        rows = slice(offset, offset + n)
        offset += n
        scale = prior.info.default_guidance_scale if request.guidance_scale is None else request.guidance_scale
        weighting = request.weighting or prior.info.default_weighting
        eps_hat = classifier_free_guidance(eps_cond[rows].float(), eps_uncond[rows].float(), scale)
        weight = sds_weight(weighting, alpha_bar[rows]).reshape(scale_shape).to(eps_hat.device)
        grad_z = weight * (eps_hat - noise[rows])
        results.append(_finish(request, images, z_request, grad_z, steps, prior, conditions[rows]))
    elapsed = time.perf_counter() - start
    for result in results:
        result.server_time_s = elapsed
    return results


def _finish(
    request: SdsRequest,
    images: torch.Tensor | None,
    z0: torch.Tensor,
    grad_z: torch.Tensor,
    timesteps: torch.Tensor,
    prior: DiffusionPrior,
    conditions: list[ViewCondition],
) -> SdsResult:
    """Guards NaN/Inf per image, then carries the working-space gradient back to the images (where sent)."""
    flat = grad_z.reshape(grad_z.shape[0], -1)
    finite = torch.isfinite(flat).all(dim=1)
    grad_z = torch.where(finite.reshape((-1,) + (1,) * (grad_z.ndim - 1)), grad_z, torch.zeros_like(grad_z))
    grad = grad_z
    if images is not None:
        (grad,) = torch.autograd.grad(z0, images, grad_outputs=grad_z.to(z0.dtype))
        image_finite = torch.isfinite(grad.reshape(grad.shape[0], -1)).all(dim=1)
        finite = finite & image_finite.to(finite.device)
        grad = torch.where(finite.reshape(-1, 1, 1, 1).to(grad.device), grad, 0.0)
    loss = 0.5 * flat.float().pow(2).sum(dim=1)
    loss = torch.where(finite, loss, torch.full_like(loss, float("nan")))
    return SdsResult(
        grad=grad.detach().to(request.grad_dtype),
        t=(timesteps.float() / prior.num_train_timesteps).tolist(),
        loss=loss.cpu().tolist(),
        finite=finite.cpu().tolist(),
        prompts=[c.prompt for c in conditions],
    )
