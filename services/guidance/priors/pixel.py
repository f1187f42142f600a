"""The pixel prior: DeepFloyd IF stage I (64x64) through diffusers.

Working space: the image itself, resized to `resolution` and mapped to [-1, 1] (z0 = 2x - 1); no VAE.
Text: T5 token states fed exactly as diffusers' IFPipeline feeds them -- the prompt lower-cased and stripped
(IFPipeline's preprocessing without `clean_caption`, which needs bs4 and ftfy), padded to 77 tokens (IF's
training length, hard-coded in the pipeline whatever the tokenizer's own limit), the T5 encoder given the
attention mask, and the UNet given all 77 states as `encoder_hidden_states` (no encoder mask); the UNet itself
projects them (`encoder_hid_dim` -> `cross_attention_dim`) and attention-pools them into the time embedding
(`addition_embed_type="text"`). The UNet's 6 output channels are [eps, learned variance]; eps is the first 3.

z0 stays float32 (the encode is exact and cheap); only the UNet input is cast to the model dtype.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from services.guidance.priors.base import ViewCondition, resize_square
from services.guidance.priors.text_conditioned import TextConditionedPrior, as_device, as_dtype, load_component
from shared.guidance_api import PriorKind

IF_TEXT_TOKENS = 77


class PixelPrior(TextConditionedPrior):
    """DeepFloyd IF stage I as an SDS prior: T5 text encoder, 64x64 pixel UNet, DDPM schedule."""

    kind = PriorKind.PIXEL
    text_length_cap = IF_TEXT_TOKENS
    channels_last_helps = True  # its UNet has no VAE around it; see services/guidance/priors/layout.py

    def __init__(
        self,
        *,
        name: str = "if",
        resolution: int = 64,
        guidance_scale: float = 20.0,
        time_range: tuple[float, float] = (0.02, 0.98),
        **components_and_settings: Any,
    ) -> None:
        """Family defaults here; text model, UNet, scheduler and shared settings as in `TextConditionedPrior`."""
        super().__init__(
            name=name,
            resolution=resolution,
            guidance_scale=guidance_scale,
            time_range=time_range,
            **components_and_settings,
        )

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        **settings: Any,
    ) -> "PixelPrior":
        """Loads tokenizer/, text_encoder/, unet/, scheduler/ of a diffusers IF stage-I checkpoint (dir or hub id).

        `settings` are the constructor's (name, resolution, guidance_scale, ...), with its defaults.
        """
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import T5EncoderModel, T5Tokenizer

        torch_device = as_device(device)
        torch_dtype = as_dtype(dtype, torch_device)
        return cls(
            tokenizer=load_component(T5Tokenizer, source, "tokenizer"),
            # from_pretrained keeps T5's `wo` projections in fp32 under fp16 (transformers' _keep_in_fp32_modules).
            text_encoder=load_component(T5EncoderModel, source, "text_encoder", dtype=torch_dtype),
            unet=load_component(UNet2DConditionModel, source, "unet", torch_dtype=torch_dtype),
            scheduler=load_component(DDPMScheduler, source, "scheduler"),
            device=torch_device,
            dtype=torch_dtype,
            **settings,
        )

    def preprocess_text(self, text: str) -> str:
        return text.lower().strip()

    def _text_encoder_uses_attention_mask(self) -> bool:
        return True  # IFPipeline always passes T5 the attention mask

    def encode(self, images: torch.Tensor, conditions: list[ViewCondition]) -> torch.Tensor:
        return resize_square(images.to(self.device, torch.float32), self.resolution) * 2.0 - 1.0
