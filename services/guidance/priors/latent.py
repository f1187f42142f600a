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

import os
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from services.guidance.priors.base import PriorKind, ViewCondition
from services.guidance.priors.layout import apply_layout
from services.guidance.priors.text_conditioned import (
    _as_device,
    _as_dtype,
    _freeze,
    _TextConditionedPrior,
    load_component,
)


def vae_attention_backends(device: torch.device) -> list[SDPBackend]:
    """Attention kernels for the VAE encoder's one self-attention (one head of width 512 over 64x64 tokens).

    Flash and cuDNN attention stop at head width 256, so on CUDA PyTorch would pick the memory-efficient kernel,
    whose backward at width 512 took 15 ms of a 122 ms fine-stage SDS call on the H200 (bench/prior_speed.py
    --profile latent). The plain matmul-softmax-matmul form needs 4 x 4096 x 4096 scores (128 MiB in fp16) and
    runs on tensor cores: VAE forward + backward 62.8 -> 55.8 ms, the whole call 90.0 -> 83.0 ms (BENCHMARKS.md).
    """
    return [SDPBackend.MATH] if device.type == "cuda" else list(ANY_ATTENTION_KERNEL)


#: No restriction: PyTorch picks among all its kernels (the memory-efficient one for the VAE on CUDA).
ANY_ATTENTION_KERNEL = (SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION,
                        SDPBackend.CUDNN_ATTENTION)


class LatentPrior(_TextConditionedPrior):
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
        **components_and_settings: Any,
    ) -> None:
        """Family defaults here; text model, UNet, scheduler and shared settings as in `_TextConditionedPrior`."""
        super().__init__(
            name=name,
            resolution=resolution,
            guidance_scale=guidance_scale,
            time_range=time_range,
            **components_and_settings,
        )
        self.vae_dtype = self.dtype if vae_dtype == "auto" else _as_dtype(vae_dtype, self.device)
        self.vae = _freeze(vae, self.device, self.vae_dtype)
        apply_layout(self, channels_last=self.channels_last)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if self.resolution % factor:
            raise ValueError(f"resolution {self.resolution} is not a multiple of the VAE's factor {factor}")
        self.latent_resolution = self.resolution // factor
        self.vae_attention_backends = vae_attention_backends(self.device)

    @classmethod
    def from_components(cls, **kwargs: Any) -> "LatentPrior":
        """Built from modules already in memory (benchmarks, random weights): the constructor, by name."""
        return cls(**kwargs)

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

        torch_device = _as_device(device)
        torch_dtype = _as_dtype(dtype, torch_device)
        vae_torch_dtype = torch_dtype if vae_dtype == "auto" else _as_dtype(vae_dtype, torch_device)
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
            **settings,
        )

    def encode(self, images: torch.Tensor, conditions: list[ViewCondition]) -> torch.Tensor:
        x = self.resize(images.to(self.device, torch.float32)) * 2.0 - 1.0
        with sdpa_kernel(self.vae_attention_backends):
            latents = self.vae.encode(x.to(self.vae_dtype)).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
        return latents * self.vae.config.scaling_factor
