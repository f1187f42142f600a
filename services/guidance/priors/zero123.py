"""The view-conditioned prior of Magic123: Zero-1-to-3 (Liu et al. 2023) through diffusers components.

A latent diffusion model whose UNet (8 input channels) sees the noisy latent of the target view concatenated with
the reference image's VAE latent, and cross-attends to one token: the reference image's CLIP embedding
concatenated with the relative pose of the target view and projected back to the embedding width by a linear
layer (`cc_projection`, 772 -> 768 for the released checkpoints). As in Zero123 and its ports (the diffusers
community pipeline `pipeline_zero1to3`, threestudio's `zero123-guidance`):

- the reference image (RGBA) is resized to the working resolution (256) and composited on white;
- its VAE latent is the latent distribution's mode at 256x256, NOT multiplied by the scaling factor (Zero123's
  `encode_first_stage(...).mode()`); the rendered views are encoded as any latent prior's, scaled;
- its CLIP embedding is CLIPVisionModelWithProjection's `image_embeds` of that image at 224x224 (bicubic, CLIP
  normalisation), as Zero123's FrozenCLIPImageEmbedder computes it;
- the pose vector is [radians(delta polar), sin(delta azimuth), cos(delta azimuth), delta distance] where
  Zero123's polar angle is 90 deg - elevation, so delta polar = -(delta elevation) (threestudio's `get_cond`);
  azimuth is measured as this project's cameras measure it (shared.cameras.orbit_camera, threestudio's sense);
- classifier-free guidance's unconditional branch is the zero cross-attention token (after the projection) and
  the zero image latent, as Zero123's sampler and both ports make it.

The reference image's embedding and latent are computed once per image digest and kept in an LRU cache; every
SDS call after the first reuses them.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from services.guidance.cache import LruCache
from services.guidance.priors.base import DiffusionPrior, ViewCondition
from services.guidance.priors.text_conditioned import as_device, as_dtype, freeze, load_component
from services.guidance.priors.vae_encoder import VaeImageEncoder, vae_attention_backends
from shared.errors import InvalidArgument
from shared.guidance_api import Conditioning, PriorInfo, PriorKind, SdsRequest, Weighting

#: CLIP's image normalisation (OpenAI CLIP, as CLIPImageProcessor's defaults).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: Width of the pose vector appended to the CLIP embedding.
POSE_WIDTH = 4
CC_PROJECTION_WEIGHTS = "diffusion_pytorch_model.safetensors"


def pose_vector(delta_elevation_deg: float, delta_azimuth_deg: float, delta_distance: float) -> list[float]:
    """Zero123's relative-pose vector of one view: [radians(delta polar), sin, cos of delta azimuth, delta radius].

    Zero123's polar angle is measured from the up axis (90 deg - elevation), so a view above the reference
    (positive delta elevation) has a negative delta polar."""
    azimuth = math.radians(delta_azimuth_deg)
    return [math.radians(-delta_elevation_deg), math.sin(azimuth), math.cos(azimuth), float(delta_distance)]


def composite_on_white(rgba: torch.Tensor) -> torch.Tensor:
    """(B, 4, H, W) RGBA in [0, 1] -> (B, 3, H, W) RGB over a white background."""
    alpha = rgba[:, 3:4]
    return rgba[:, :3] * alpha + (1.0 - alpha)


class CCProjection(torch.nn.Module):
    """Zero123's `cc_projection`: the CLIP embedding plus the pose, projected back to the cross-attention width.

    The parameter names (`projection.weight`, `projection.bias`) are those of the diffusers community pipeline's
    CCProjection, so its saved `cc_projection/` folder loads here."""

    def __init__(self, in_channel: int = 772, out_channel: int = 768) -> None:
        super().__init__()
        self.in_channel, self.out_channel = int(in_channel), int(out_channel)
        self.projection = torch.nn.Linear(self.in_channel, self.out_channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)

    def save(self, directory: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": "CCProjection", "in_channel": self.in_channel, "out_channel": self.out_channel}
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / CC_PROJECTION_WEIGHTS))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "CCProjection":
        """From `cc_projection/` (config.json + safetensors). Pickled weights are not read."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        module = cls(config["in_channel"], config["out_channel"])
        module.load_state_dict(load_file(str(directory / CC_PROJECTION_WEIGHTS)))
        return module


class Zero123Prior(DiffusionPrior):
    """Zero-1-to-3 as an SDS prior: image-conditioned latent UNet, KL VAE, CLIP image encoder, DDPM schedule."""

    def __init__(
        self,
        *,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        image_encoder: torch.nn.Module,
        cc_projection: torch.nn.Module,
        scheduler: Any,
        name: str = "zero123",
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        resolution: int = 256,
        guidance_scale: float = 5.0,
        time_range: tuple[float, float] = (0.2, 0.6),
        weighting: Weighting = Weighting.SDS,
        max_batch_size: int = 8,
        embedding_cache_size: int = 64,
        checkpoint_ids: Sequence[str] = ("default",),
        clip_mean: Sequence[float] = CLIP_MEAN,
        clip_std: Sequence[float] = CLIP_STD,
    ) -> None:
        self._device = as_device(device)
        self.dtype = as_dtype(dtype, self._device)
        self.unet = freeze(unet, self._device, self.dtype)
        self.vae = freeze(vae, self._device, self.dtype)
        self.image_encoder = freeze(image_encoder, self._device, self.dtype)
        self.cc_projection = freeze(cc_projection, self._device, self.dtype)
        self.scheduler = scheduler
        prediction_type = str(scheduler.config.get("prediction_type", "epsilon"))
        if prediction_type != "epsilon":
            raise ValueError(f"zero123 predicts epsilon; the scheduler says {prediction_type!r}")
        self._alphas_cumprod = scheduler.alphas_cumprod.detach().to("cpu", torch.float32).clone()
        self.resolution = int(resolution)
        self.latent_encoder = VaeImageEncoder(self.vae, self.resolution, vae_attention_backends(self._device))
        self.clip_resolution = int(image_encoder.config.image_size)
        self.clip_mean = torch.tensor(clip_mean, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.clip_std = torch.tensor(clip_std, dtype=torch.float32).reshape(1, 3, 1, 1)
        # Reference image digest -> (CLIP embedding (D,), VAE latent (C, h, w)), in the UNet's dtype and device.
        self.reference_cache: LruCache[str, tuple[torch.Tensor, torch.Tensor]] = LruCache(embedding_cache_size)
        self._cache_lock = threading.Lock()
        self.info = PriorInfo(
            name=name,
            kind=PriorKind.VIEW_CONDITIONED,
            native_resolution=self.resolution,
            # Prompts are not used; a prompt sent along is checked as words only (one limit for every prior).
            max_prompt_tokens=77,
            accepted_conditioning=(Conditioning.IMAGE, Conditioning.RELATIVE_POSE),
            default_guidance_scale=float(guidance_scale),
            default_time_range=(float(time_range[0]), float(time_range[1])),
            default_weighting=Weighting(weighting),
            checkpoint_ids=tuple(checkpoint_ids),
            max_batch_size=int(max_batch_size),
        )

    # ------------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_components(cls, **kwargs: Any) -> "Zero123Prior":
        return cls(**kwargs)

    @classmethod
    def from_pretrained(
        cls, source: str | os.PathLike, *, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
        **settings: Any,
    ) -> "Zero123Prior":
        """Loads unet/, vae/, image_encoder/, scheduler/ and cc_projection/ of a diffusers-format Zero123 directory
        (the layout of the community `pipeline_zero1to3` checkpoints); feature_extractor/, where present, gives
        CLIP's normalisation. `settings` are the constructor's."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPVisionModelWithProjection

        torch_device = as_device(device)
        torch_dtype = as_dtype(dtype, torch_device)
        root = Path(os.fspath(source))
        if not root.is_dir():
            raise FileNotFoundError(f"zero123 weights must be a local diffusers directory; {root} is none")
        processor = root / "feature_extractor" / "preprocessor_config.json"
        if processor.is_file():
            config = json.loads(processor.read_text())
            settings.setdefault("clip_mean", config.get("image_mean", CLIP_MEAN))
            settings.setdefault("clip_std", config.get("image_std", CLIP_STD))
        return cls(
            unet=load_component(UNet2DConditionModel, root, "unet", torch_dtype=torch_dtype),
            vae=load_component(AutoencoderKL, root, "vae", torch_dtype=torch_dtype),
            image_encoder=load_component(CLIPVisionModelWithProjection, root, "image_encoder", dtype=torch_dtype),
            cc_projection=CCProjection.load(root / "cc_projection"),
            scheduler=load_component(DDPMScheduler, root, "scheduler"),
            device=torch_device,
            dtype=torch_dtype,
            **settings,
        )

    # ------------------------------------------------------------------------------------------------ schedule
    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    @property
    def device(self) -> torch.device:
        return self._device

    # -------------------------------------------------------------------------------------------- conditioning
    def validate_prompt(self, prompt: str, field: str) -> None:
        """Zero123 ignores prompts; one sent along must still be a real one, within the common word limit."""
        if not prompt or not prompt.strip():
            raise InvalidArgument("prompt must not be empty or blank (or leave it out with an image)", field)
        if self.count_tokens(prompt) > self.info.max_prompt_tokens:
            raise InvalidArgument(f"prompt is over {self.info.max_prompt_tokens} words", field)

    def validate_conditioning(self, request: SdsRequest) -> None:
        super().validate_conditioning(request)
        if request.image_condition is None:
            raise InvalidArgument(f"prior {self.info.name!r} needs the reference image", "image_condition")
        if not request.image_condition.relative_poses and not request.cameras:
            raise InvalidArgument(
                f"prior {self.info.name!r} needs each image's pose: one camera per image or relative poses", "cameras"
            )

    @torch.no_grad()
    def reference_embedding(self, rgba: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLIP image embedding (D,), VAE latent mode (C, h, w), unscaled) of one (1, 4, H, W) reference image."""
        # As threestudio prepares it: the RGBA resized (area-like) to the working resolution, then composited; CLIP
        # sees that image resized again to its own resolution.
        rgba = F.interpolate(rgba.to(self._device, torch.float32), size=(self.resolution,) * 2, mode="bilinear",
                             align_corners=False, antialias=True)
        rgb = composite_on_white(rgba)
        clip_in = F.interpolate(rgb, size=(self.clip_resolution,) * 2, mode="bicubic", align_corners=False,
                                antialias=True)
        clip_in = (clip_in - self.clip_mean.to(self._device)) / self.clip_std.to(self._device)
        embedding = self.image_encoder(pixel_values=clip_in.to(self.dtype)).image_embeds[0]
        moments = self.vae.encode(rgb.mul(2.0).sub(1.0).to(self.dtype)).latent_dist
        return embedding.to(self.dtype), moments.mode()[0].to(self.dtype)

    def _reference(self, condition: ViewCondition) -> tuple[torch.Tensor, torch.Tensor]:
        image = condition.image
        if image is None or image.image is None:
            raise ValueError("zero123 needs the reference image itself (the server resolves digests before this)")
        with self._cache_lock:
            return self.reference_cache.get_or_compute(image.image_sha256, lambda: self.reference_embedding(image.image))

    def conditioning(self, conditions: list[ViewCondition]) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-attention tokens (B, 1, D), image latents (B, C, h, w)) of the conditional branch."""
        references = [self._reference(c) for c in conditions]
        for c in conditions:
            if c.relative_pose is None:
                raise ValueError("zero123 needs every image's relative pose")
        poses = torch.tensor([pose_vector(*c.relative_pose) for c in conditions], dtype=self.dtype, device=self._device)
        embeddings = torch.stack([embedding for embedding, _ in references])
        tokens = self.cc_projection(torch.cat([embeddings, poses], dim=-1))[:, None, :]
        latents = torch.stack([latent for _, latent in references])
        return tokens, latents

    # --------------------------------------------------------------------------------------------------- SDS
    def encode(self, images: torch.Tensor, conditions: list[ViewCondition]) -> torch.Tensor:
        return self.latent_encoder(images)

    def predict_noise(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, conditions: list[ViewCondition]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = noisy.shape[0]
        if len(conditions) != batch:
            raise ValueError(f"{len(conditions)} conditions for {batch} noisy inputs")
        with torch.no_grad():
            tokens, image_latents = self.conditioning(conditions)
            hidden = torch.cat([tokens, torch.zeros_like(tokens)])
            concat = torch.cat([image_latents, torch.zeros_like(image_latents)])
            noisy = noisy.to(self._device, self.dtype)
            x = torch.cat([torch.cat([noisy, noisy]), concat], dim=1)
            steps = timesteps.to(self._device).long()
            eps = self.unet(x, torch.cat([steps, steps]), encoder_hidden_states=hidden, return_dict=False)[0]
        eps = eps.float()
        return eps[:batch], eps[batch:]
