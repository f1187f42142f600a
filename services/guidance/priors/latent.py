"""The latent prior: Stable Diffusion (1.x / 2.x family) through diffusers.

Working space: the VAE latent  z0 = scaling_factor * (mean of E(2x - 1) - shift_factor),  x resized to
`resolution` first. The latent distribution's *mean* is used, not a sample: it is deterministic, so an SDS
result depends only on the request's seed (threestudio samples; the difference is the VAE's small posterior
noise, std about 1e-2 of the latent scale for SD).

Precision: the UNet and text encoder run in the resolved dtype (fp16 on CUDA by default). The VAE encoder runs
in `vae_dtype`, by default the same dtype: the SD 1.x/2.x encoder is stable in fp16 (threestudio runs it so,
forward and backward) and fp32 roughly doubles the fine stage's VAE cost. VAEs known to overflow in fp16 (SDXL's)
should be loaded with vae_dtype="float32" -- the NaN/Inf guard in the SDS engine zeroes any non-finite image
gradient meanwhile rather than letting it reach the optimiser.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch.nn.attention import SDPBackend

from services.guidance.priors.base import ViewCondition
from services.guidance.priors.layout import apply_layout
from services.guidance.priors.text_conditioned import TextConditionedPrior, as_device, as_dtype, freeze, load_component
from services.guidance.priors.vae_encoder import VaeImageEncoder, vae_attention_backends
from shared.guidance_api import PriorKind


class LatentPrior(TextConditionedPrior):
    """Stable Diffusion as an SDS prior: CLIP text encoder, latent UNet, KL VAE, DDPM schedule."""

    kind = PriorKind.LATENT

    def __init__(
        self,
        *,
        vae: torch.nn.Module,
        vae_dtype: str | torch.dtype = "auto",
        name: str = "sd",
        resolution: int = 512,
        guidance_scale: float = 100.0,
        time_range: tuple[float, float] = (0.02, 0.98),
        source: str = "",
        **components_and_settings: Any,
    ) -> None:
        """Family defaults here; text model, UNet, scheduler and shared settings as in `TextConditionedPrior`.

        `source`: where the weights came from (a diffusers checkpoint or "random:<size>"). Where given, the prior
        publishes its encoder (`info.latent_encoder`) so that callers may send latents instead of images.
        """
        super().__init__(
            name=name,
            resolution=resolution,
            guidance_scale=guidance_scale,
            time_range=time_range,
            **components_and_settings,
        )
        self.vae_dtype = self.dtype if vae_dtype == "auto" else as_dtype(vae_dtype, self.device)
        self.vae = freeze(vae, self.device, self.vae_dtype)
        apply_layout(self, channels_last=self.channels_last)
        self.image_encoder = VaeImageEncoder(self.vae, self.resolution, vae_attention_backends(self.device))
        self.latent_resolution = self.image_encoder.latent_resolution
        if source:
            self.info = dataclasses.replace(self.info, latent_encoder=self.image_encoder.describe(str(source), "vae"))

    @property
    def vae_attention_backends(self) -> list[SDPBackend]:
        return self.image_encoder.attention_backends

    @vae_attention_backends.setter
    def vae_attention_backends(self, backends: list[SDPBackend]) -> None:
        self.image_encoder.attention_backends = list(backends)

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        vae_dtype: str | torch.dtype = "auto",
        **settings: Any,
    ) -> "LatentPrior":
        """Loads tokenizer/, text_encoder/, unet/, vae/, scheduler/ of a diffusers SD checkpoint (dir or hub id).

        `settings` are the constructor's (name, resolution, guidance_scale, ...), with its defaults.
        """
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        torch_device = as_device(device)
        torch_dtype = as_dtype(dtype, torch_device)
        vae_torch_dtype = torch_dtype if vae_dtype == "auto" else as_dtype(vae_dtype, torch_device)
        return cls(
            tokenizer=load_component(CLIPTokenizer, source, "tokenizer"),
            text_encoder=load_component(CLIPTextModel, source, "text_encoder", dtype=torch_dtype),
            unet=load_component(UNet2DConditionModel, source, "unet", torch_dtype=torch_dtype),
            vae=load_component(AutoencoderKL, source, "vae", torch_dtype=vae_torch_dtype),
            # Any diffusers scheduler config (PNDM, DDIM, Euler...) carries the same beta schedule; DDPM reads it.
            scheduler=load_component(DDPMScheduler, source, "scheduler"),
            device=torch_device,
            dtype=torch_dtype,
            vae_dtype=vae_torch_dtype,
            source=os.fspath(source),
            **settings,
        )

    def encode(self, images: torch.Tensor, conditions: list[ViewCondition]) -> torch.Tensor:
        return self.image_encoder(images)

    def working_space(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents from the published encoder (checked by sds.validate_request), as `encode` gives them."""
        return latents.to(self.device, self.vae_dtype)
