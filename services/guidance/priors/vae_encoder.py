"""A latent prior's image encoder, the same code on both sides of the wire.

The latent prior (guidance service) encodes images with it; a scene that sends latents instead of images
(`PriorInfo.latent_encoder`, `SdsRequest.latents`) builds the same encoder from the published source and carries
the returned latent gradient back through it. Only the VAE's encoder half is kept: its decoder is not needed for
SDS, and the scene need not hold it.

    z = scaling_factor * (mean(E(2 x - 1)) - shift_factor),  x resized (bilinear) to `resolution` first

The latent distribution's mean, not a sample (see latent.py): an SDS result depends only on the request's seed.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from services.guidance.priors.base import resize_square
from shared.guidance_api import LatentEncoderInfo

#: No restriction: PyTorch picks among all its kernels (the memory-efficient one for the VAE on CUDA).
ANY_ATTENTION_KERNEL = (SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION,
                        SDPBackend.CUDNN_ATTENTION)
RANDOM_SOURCE_PREFIX = "random:"


def vae_attention_backends(device: torch.device) -> list[SDPBackend]:
    """Attention kernels for the VAE encoder's one self-attention (one head of width 512 over 64x64 tokens).

    Flash and cuDNN attention stop at head width 256, so on CUDA PyTorch would pick the memory-efficient kernel,
    whose backward at width 512 is slow. The plain matmul-softmax-matmul form needs 4 x 4096 x 4096 scores (128 MiB
    in fp16) and runs on tensor cores; it measured faster on an H200 (figures in BENCHMARKS.md, "Where the guidance
    time went"; `bench/prior_speed.py --profile latent` re-measures it).
    """
    return [SDPBackend.MATH] if device.type == "cuda" else list(ANY_ATTENTION_KERNEL)


class VaeImageEncoder(torch.nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> latents (B, C, r/f, r/f), differentiable w.r.t. the images; frozen weights."""

    def __init__(self, vae: torch.nn.Module, resolution: int, attention_backends: Sequence[SDPBackend] | None = None):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = getattr(vae, "quant_conv", None)  # absent where the config disables it
        self.scaling_factor = float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None)
        self.shift_factor = None if shift is None else float(shift)
        self.latent_channels = int(vae.config.latent_channels)
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if resolution % self.factor:
            raise ValueError(f"resolution {resolution} is not a multiple of the VAE's factor {self.factor}")
        self.resolution = int(resolution)
        self.latent_resolution = self.resolution // self.factor
        first = next(self.encoder.parameters())
        self.attention_backends = list(attention_backends or vae_attention_backends(first.device))
        self.requires_grad_(False)
        self.eval()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_square(images.to(self.device, torch.float32), self.resolution)
        x = (x * 2.0 - 1.0).to(self.dtype)
        with sdpa_kernel(self.attention_backends):
            moments = self.encoder(x)
            if self.quant_conv is not None:
                moments = self.quant_conv(moments)
        mean = moments[:, : self.latent_channels]  # (mean, logvar) of the diagonal Gaussian, along channels
        if self.shift_factor is not None:
            mean = mean - self.shift_factor
        return mean * self.scaling_factor

    def digest(self) -> str:
        """SHA-256 over names, shapes and float16 values of the weights, in name order: the same weights give the
        same digest whatever dtype or device they are held in (float32 -> float16 rounding is deterministic)."""
        sha = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            sha.update(f"{name}:{list(tensor.shape)};".encode())
            sha.update(tensor.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
        return sha.hexdigest()

    def describe(self, source: str, subfolder: str = "vae") -> LatentEncoderInfo:
        return LatentEncoderInfo(
            source=source,
            subfolder=subfolder,
            image_resolution=self.resolution,
            latent_channels=self.latent_channels,
            latent_resolution=self.latent_resolution,
            digest=self.digest(),
        )


def load_vae(source: str | os.PathLike, subfolder: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The AutoencoderKL a latent prior was built from: a diffusers checkpoint's `subfolder`, or `random:<size>`
    (the same seeded random weights the guidance service builds for that source)."""
    source = os.fspath(source)
    if source.startswith(RANDOM_SOURCE_PREFIX):
        from services.guidance.priors import random_init

        return random_init.build_random_vae(source[len(RANDOM_SOURCE_PREFIX) :], device=device, dtype=dtype)
    from diffusers import AutoencoderKL

    from services.guidance.priors.text_conditioned import load_component

    return load_component(AutoencoderKL, source, subfolder, torch_dtype=dtype).to(device)


def build_encoder(info: LatentEncoderInfo, device: torch.device, dtype: torch.dtype) -> VaeImageEncoder:
    """A caller's copy of a prior's published encoder. Raises ValueError if its weights are not the prior's."""
    encoder = VaeImageEncoder(load_vae(info.source, info.subfolder, device, dtype), info.image_resolution)
    digest = encoder.digest()
    if digest != info.digest:
        raise ValueError(
            f"the encoder loaded from {info.source!r} ({info.subfolder}) has weights {digest[:12]}, the prior's have "
            f"{info.digest[:12]}: not the prior's encoder"
        )
    return encoder
