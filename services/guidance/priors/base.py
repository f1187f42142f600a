"""The one interface every diffusion prior implements, and the request/result types of the SDS engine.

A prior knows three things: how to take images in [0, 1] into its working space (`encode`, differentiable),
its noise schedule (`alphas_cumprod`), and how to predict noise conditionally and unconditionally
(`predict_noise`). Everything else -- drawing t and noise, classifier-free guidance, weighting, carrying the
gradient back to the images, batching, NaN guards -- is shared code in `services.guidance.sds`.
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Generic, Hashable, TypeVar

import torch

from shared.cameras import Camera
from shared.guidance_types import PromptCheck, Weighting


class PriorKind(str, Enum):
    PIXEL = "pixel"
    LATENT = "latent"
    ANALYTIC = "analytic"
    VIEW_CONDITIONED = "view_conditioned"


class Conditioning(str, Enum):
    TEXT = "text"
    NEGATIVE_TEXT = "negative_text"
    IMAGE = "image"
    RELATIVE_POSE = "relative_pose"
    CAMERA = "camera"


@dataclass(frozen=True)
class LatentEncoderInfo:
    """A latent prior's image encoder, as a caller needs it to send latents (mirrors magic3d.v1.LatentEncoder)."""

    source: str  # a diffusers checkpoint (directory or hub id) or "random:<size>"
    subfolder: str
    image_resolution: int
    latent_channels: int
    latent_resolution: int
    digest: str  # SHA-256 of the weights; latents made with other weights are refused

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_resolution, self.latent_resolution)


@dataclass(frozen=True)
class PriorInfo:
    """What a caller needs to know about a served prior (mirrors magic3d.v1.PriorInfo)."""

    name: str
    kind: PriorKind
    native_resolution: int
    max_prompt_tokens: int
    accepted_conditioning: tuple[Conditioning, ...]
    default_guidance_scale: float
    default_time_range: tuple[float, float]
    default_weighting: Weighting = Weighting.SDS
    checkpoint_ids: tuple[str, ...] = ("default",)
    max_batch_size: int = 8
    # True where the prior cannot work without one camera per image (the analytic prior re-renders them).
    requires_cameras: bool = False
    # Set where a caller may encode images itself and send latents (SdsRequest.latents) instead.
    latent_encoder: LatentEncoderInfo | None = None


@dataclass(frozen=True)
class ViewCondition:
    """The conditioning of one image: its prompt (view suffix already applied) and camera."""

    prompt: str
    negative_prompt: str
    camera: Camera | None = None


@dataclass
class SdsRequest:
    """One ComputeSds call, validated and decoded, on any device. Exactly one input: `images` (B, 3, H, W) float in
    [0, 1], or `latents` (B, C, h, w) made by the prior's published encoder (PriorInfo.latent_encoder), whose digest
    the request then carries. The result's gradient is w.r.t. that input."""

    job_id: str
    prior: str
    images: torch.Tensor | None
    prompt: str
    negative_prompt: str = ""
    cameras: list[Camera] = field(default_factory=list)
    checkpoint_id: str = ""
    view_dependent_prompt: bool = False
    time_range: tuple[float, float] | None = None
    explicit_t: list[float] | None = None
    guidance_scale: float | None = None
    weighting: Weighting | None = None
    seed: int = 0
    grad_dtype: torch.dtype = torch.float32
    latents: torch.Tensor | None = None
    latent_encoder_digest: str = ""

    @property
    def inputs(self) -> torch.Tensor:
        """What the gradient is taken w.r.t.: the latents where sent, else the images."""
        return self.latents if self.latents is not None else self.images

    @property
    def batch_size(self) -> int:
        return int(self.inputs.shape[0])


@dataclass
class SdsResult:
    grad: torch.Tensor  # the shape of the request's input (images or latents), in its grad_dtype, on the prior's device
    t: list[float]
    loss: list[float]
    finite: list[bool]
    prompts: list[str]
    server_time_s: float = 0.0


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


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """A small least-recently-used cache; one per replica for prompt embeddings (not thread-safe on its own)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[K, V] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get_or_compute(self, key: K, compute: Callable[[], V]) -> V:
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        value = compute()
        self._items[key] = value
        if len(self._items) > self.maxsize:
            self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)
