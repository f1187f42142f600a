"""The one interface every diffusion prior implements (its request/result types are the contract, shared.guidance_api).

A prior knows three things: how to take images in [0, 1] into its working space (`encode`, differentiable),
its noise schedule (`alphas_cumprod`), and how to predict noise conditionally and unconditionally
(`predict_noise`). Everything else -- drawing t and noise, classifier-free guidance, weighting, carrying the
gradient back to the images, batching, NaN guards -- is shared code in `services.guidance.sds`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from shared.cameras import Camera
from shared.errors import NotFound
from shared.guidance_api import ImageCondition, PriorInfo, SdsRequest


@dataclass(frozen=True)
class ViewCondition:
    """The conditioning of one image: its prompt (view suffix already applied), camera, and (image-to-3D) the job's
    reference image and camera. `image.image` is always set here: the engine resolves a digest-only request
    from its cache before a prior sees it."""

    prompt: str
    negative_prompt: str
    camera: Camera | None = None
    image: ImageCondition | None = None
    learned_embeddings: tuple[str, ...] = ()
    # (delta elevation deg, delta azimuth deg, delta distance) of this view from the reference camera: the
    # request's explicit pose for this image, else derived from its camera; None without an image condition.
    relative_pose: tuple[float, float, float] | None = None


class DiffusionPrior(abc.ABC):
    """A denoiser eps(x_t; y, t) with a noise schedule, working on images encoded into its own space."""

    info: PriorInfo

    @property
    @abc.abstractmethod
    def alphas_cumprod(self) -> torch.Tensor:
        """abar_t for t = 0 .. T-1, float32 on CPU."""

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def validate_conditioning(self, request: "SdsRequest") -> None:
        """Checks what this prior in particular needs of a request (sds.validate_request calls it after the generic
        checks, before the prompt checks). Default: only learned embeddings the prior lists are accepted."""
        unknown = [name for name in request.learned_embeddings if name not in self.info.learned_embeddings]
        if unknown:
            known = ", ".join(self.info.learned_embeddings) or "none"
            raise NotFound(
                f"unknown learned embeddings {', '.join(map(repr, unknown))} of prior {self.info.name!r}; known: {known}",
                "learned_embeddings",
            )

    def validate_prompt(self, prompt: str, field: str) -> None:
        """Raises InvalidArgument naming `field` if the prompt is unusable (empty, too long, unknown)."""

    def count_tokens(self, prompt: str) -> int:
        """Length of the prompt in the units `info.max_prompt_tokens` limits. Default: whitespace-separated words."""
        return len(prompt.split())

    @abc.abstractmethod
    def encode(self, images: torch.Tensor, conditions: list[ViewCondition]) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> working-space tensor z0, differentiable w.r.t. the images."""

    def working_space(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents a caller made with `info.latent_encoder` -> z0 as `encode` would give it (dtype, device).

        Only priors that publish an encoder accept latents; sds.validate_request refuses them for the others.
        """
        raise NotImplementedError(f"prior {self.info.name!r} takes images only")

    @abc.abstractmethod
    def predict_noise(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, conditions: list[ViewCondition]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_cond, eps_uncond) for noisy z_t (B, ...) at integer timesteps (B,). Called without grad.

        The unconditional branch is conditioned on the negative prompt (empty: the null prompt).
        """


def resize_square(images: torch.Tensor, side: int) -> torch.Tensor:
    """Bilinear (differentiable) resize of (B, C, H, W) to side x side; identity at that size.

    No antialiasing, as in threestudio: renders are usually made at (or near) a prior's resolution.
    """
    if images.shape[-2:] == (side, side):
        return images
    return torch.nn.functional.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
