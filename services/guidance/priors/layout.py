"""Memory layout of a prior's convolutional networks.

cuDNN's fp16 convolutions on tensor cores work in NHWC; with NCHW weights each convolution pays a layout
transpose on the way in and out. `channels_last` stores the UNet's (and the VAE's) weights in NHWC, and PyTorch
then runs the convolutions in NHWC whatever the input's layout. It changes no value beyond floating-point
summation order. Measured per family in `bench/prior_speed.py` (nvidia-h200, batch 4, fp16; BENCHMARKS.md):
IF-I-XL's UNet with CFG 88 -> 81 and 89 -> 80 ms in two runs, 75 -> 75 in a third; SD 2.1's VAE encoder forward +
backward 56 -> 85 ms, because PyTorch's GroupNorm has no channels-last kernel and converts back and forth around
every norm. So "auto" turns it on for pixel priors only.
"""

from __future__ import annotations

import torch


def convolutional_modules(prior: object) -> list[torch.nn.Module]:
    """The prior's networks whose cost is convolutions: the UNet, and the VAE for latent priors."""
    return [module for module in (getattr(prior, "unet", None), getattr(prior, "vae", None)) if module is not None]


def apply_layout(prior: object, *, channels_last: bool) -> None:
    """Stores the prior's convolutional networks in channels-last (NHWC) or contiguous (NCHW) layout, in place."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for module in convolutional_modules(prior):
        module.to(memory_format=memory_format)


MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def resolve_channels_last(memory_format: str, device: torch.device, helps: bool) -> bool:
    """"auto" is channels-last on CUDA where the family measured faster with it (`helps`), contiguous elsewhere."""
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
    if memory_format == "auto":
        return helps and device.type == "cuda"
    return memory_format == "channels_last"
