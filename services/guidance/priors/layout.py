"""Memory layout of a prior's convolutional networks.

cuDNN's fp16 convolutions on tensor cores work in NHWC; with NCHW weights each convolution pays a layout
transpose on the way in and out. `channels_last` stores the UNet's (and the VAE's) weights in NHWC, and PyTorch
then runs the convolutions in NHWC whatever the input's layout. It changes no value beyond floating-point
summation order. Measured per prior in `bench/prior_speed.py`; off by default where it was not measured to help.
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
