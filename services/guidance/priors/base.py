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


class Weighting(str, Enum):
    SDS = "sds"  # w = 1 - abar_t
    UNIFORM = "uniform"  # w = 1
    FANTASIA3D = "fantasia3d"  # w = sqrt(abar_t) * (1 - abar_t)


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


@dataclass(frozen=True)
class ViewCondition:
    """The conditioning of one image: its prompt (view suffix already applied) and camera."""

    prompt: str
    negative_prompt: str
    camera: Camera | None = None


@dataclass
class SdsRequest:
    """One ComputeSds call, validated and decoded. Images are (B, 3, H, W) float in [0, 1], on any device."""

    job_id: str
    prior: str
    images: torch.Tensor
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


@dataclass
class SdsResult:
    grad: torch.Tensor  # same shape as the request's images, in its grad_dtype, on the prior's device
    t: list[float]
    loss: list[float]
    finite: list[bool]
    prompts: list[str]
    server_time_s: float = 0.0


@dataclass(frozen=True)
class PromptCheck:
    """An accepted prompt's size (mirrors magic3d.v1.CheckPromptResponse).

    `token_count` is the prompt with the longest view suffix appended, as the prior's text encoder counts it;
    `negative_token_count` is 0 for an empty negative prompt. Both are <= `max_tokens`.
    """

    token_count: int
    negative_token_count: int
    max_tokens: int


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

    @abc.abstractmethod
    def predict_noise(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, conditions: list[ViewCondition]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_cond, eps_uncond) for noisy z_t (B, ...) at integer timesteps (B,). Called without grad.

        The unconditional branch is conditioned on the negative prompt (empty: the null prompt).
        """


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
