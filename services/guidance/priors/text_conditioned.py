"""What the two learned, text-conditioned priors (Stable Diffusion, DeepFloyd IF) share.

Both are a diffusers `UNet2DConditionModel` conditioned on a frozen text encoder's token states, with a
DDPM noise schedule. This module holds everything that is the same for both:

- loading the components with `X.from_pretrained(source, subfolder=...)` (a local directory in the standard
  diffusers layout, or a hub id), in eval mode, frozen, on the resolved device and dtype;
- prompt validation by token count (special tokens included) and the per-replica prompt-embedding LRU cache;
- `predict_noise`: one UNet call on [cond; uncond] (2B rows), learned-variance outputs cut to their first
  channels, and the conversion of "v_prediction" / "sample" outputs into epsilon;
- the differentiable resize into the prior's resolution.

Subclasses say how images enter the working space (`encode`) and how the text encoder is fed.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Mapping, Self, Sequence

import torch

from services.guidance.cache import LruCache
from services.guidance.priors.base import DiffusionPrior, ViewCondition
from services.guidance.priors.cuda_graphs import GraphedForward, resolve_cuda_graphs
from services.guidance.priors.layout import apply_layout, resolve_channels_last
from services.guidance.priors.learned_embeddings import add_to_text_model, expand_placeholders, read_learned_embeddings
from shared.devices import resolve_device, resolve_dtype
from shared.errors import InvalidArgument
from shared.guidance_api import Conditioning, PriorInfo, PriorKind, SdsRequest, Weighting

# Tokenizers without a configured limit report a huge sentinel (transformers' VERY_LARGE_INTEGER).
_UNSET_TOKEN_LIMIT = 1_000_000


def is_local_source(source: str | os.PathLike) -> bool:
    """A local directory is loaded with `local_files_only`; anything else is a hub id (HF settings decide)."""
    return os.path.isdir(os.fspath(source))


def load_component(cls: Any, source: str | os.PathLike, subfolder: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained(source, subfolder=...)`, offline when `source` is a local directory."""
    if is_local_source(source):
        kwargs.setdefault("local_files_only", True)
    return cls.from_pretrained(os.fspath(source), subfolder=subfolder, **kwargs)


def freeze(module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> torch.nn.Module:
    """Eval mode, no parameter gradients, on `device` and (unless None or already so) in `dtype`."""
    module.requires_grad_(False)
    module.eval()
    if dtype is not None and getattr(module, "dtype", None) != dtype:
        module = module.to(dtype=dtype)
    return module.to(device)


def as_device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else resolve_device(device)


def as_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)


class TextConditionedPrior(DiffusionPrior):
    """A text-conditioned epsilon (or v) UNet with a DDPM schedule. Not used directly: see LatentPrior, PixelPrior."""

    kind: PriorKind
    #: Hard cap on the text length the family was trained with (IF: 77 T5 tokens, hard-coded in IFPipeline).
    text_length_cap: int | None = None
    #: Whether memory_format "auto" picks channels-last on CUDA (measured per family in bench/prior_speed.py).
    channels_last_helps: bool = False

    @classmethod
    def from_components(cls, **kwargs: Any) -> Self:
        """Built from modules already in memory (benchmarks, random weights): the constructor, by name."""
        return cls(**kwargs)

    def __init__(
        self,
        *,
        tokenizer: Any,
        text_encoder: torch.nn.Module,
        unet: torch.nn.Module,
        scheduler: Any,
        name: str,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        resolution: int,
        guidance_scale: float,
        time_range: tuple[float, float],
        weighting: Weighting = Weighting.SDS,
        max_batch_size: int = 8,
        embedding_cache_size: int = 256,
        checkpoint_ids: Sequence[str] = ("default",),
        memory_format: str = "auto",
        cuda_graphs: str = "auto",
        learned_embeddings: Mapping[str, str | os.PathLike] | None = None,
    ) -> None:
        """`learned_embeddings`: textual-inversion files a request may name, name -> path (loaded on first use)."""
        self._device = as_device(device)
        self.dtype = as_dtype(dtype, self._device)
        self.tokenizer = tokenizer
        # Cast only when the dtype differs: from_pretrained keeps some modules in fp32 on purpose (T5's `wo`).
        self.text_encoder = freeze(text_encoder, self._device, self.dtype)
        self.unet = freeze(unet, self._device, self.dtype)
        self.scheduler = scheduler
        self.channels_last = resolve_channels_last(memory_format, self._device, self.channels_last_helps)
        apply_layout(self, channels_last=self.channels_last)
        self.cuda_graphs = resolve_cuda_graphs(cuda_graphs, self._device)
        self.denoiser_graph = GraphedForward() if self.cuda_graphs else None
        self.prediction_type = str(scheduler.config.get("prediction_type", "epsilon"))
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        self._alphas_cumprod = scheduler.alphas_cumprod.detach().to("cpu", torch.float32).clone()
        self.resolution = int(resolution)
        self.max_prompt_tokens = self._token_limit()
        self.embedding_cache: LruCache[str, torch.Tensor] = LruCache(embedding_cache_size)
        self._cache_lock = threading.Lock()
        self.learned_embedding_files = {name: Path(path) for name, path in (learned_embeddings or {}).items()}
        self._loaded_embeddings: set[str] = set()
        self._placeholder_expansions: dict[str, str] = {}
        self.info = PriorInfo(
            name=name,
            kind=self.kind,
            native_resolution=self.resolution,
            max_prompt_tokens=self.max_prompt_tokens,
            accepted_conditioning=(Conditioning.TEXT, Conditioning.NEGATIVE_TEXT),
            default_guidance_scale=float(guidance_scale),
            default_time_range=(float(time_range[0]), float(time_range[1])),
            default_weighting=Weighting(weighting),
            checkpoint_ids=tuple(checkpoint_ids),
            max_batch_size=int(max_batch_size),
            learned_embeddings=tuple(self.learned_embedding_files),
        )

    # -------------------------------------------------------------------------------------- learned embeddings
    def validate_conditioning(self, request: SdsRequest) -> None:
        """Unknown names are NOT_FOUND (the base class); the named embeddings are loaded here, before the prompt's
        tokens are counted, since a placeholder counts as one token (per vector) only once it is loaded."""
        super().validate_conditioning(request)
        for name in request.learned_embeddings:
            self.load_learned_embeddings(name)

    def load_learned_embeddings(self, name: str) -> None:
        """Adds the named textual-inversion file's tokens to the text model, once. A placeholder stays in the
        vocabulary from then on (for every job); prompt embeddings cached before are dropped."""
        with self._cache_lock:
            if name in self._loaded_embeddings:
                return
            vectors = read_learned_embeddings(self.learned_embedding_files[name])
            self._placeholder_expansions.update(add_to_text_model(self.tokenizer, self.text_encoder, vectors))
            self.embedding_cache = LruCache(self.embedding_cache.maxsize)
            self._loaded_embeddings.add(name)

    def _text_for_tokenizer(self, prompt: str) -> str:
        return self.preprocess_text(expand_placeholders(prompt, self._placeholder_expansions))

    # ----------------------------------------------------------------------------------------------- schedule
    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    @property
    def device(self) -> torch.device:
        return self._device

    # ------------------------------------------------------------------------------------------------- prompts
    def _token_limit(self) -> int:
        limit = int(getattr(self.tokenizer, "model_max_length", _UNSET_TOKEN_LIMIT) or _UNSET_TOKEN_LIMIT)
        if limit >= _UNSET_TOKEN_LIMIT:
            positions = getattr(self.text_encoder.config, "max_position_embeddings", None)
            limit = int(positions) if positions else 77
        if self.text_length_cap is not None:
            limit = min(limit, self.text_length_cap)
        return limit

    def preprocess_text(self, text: str) -> str:
        """What the family's pipeline does to a prompt before tokenizing it (identity by default)."""
        return text

    def count_tokens(self, prompt: str) -> int:
        """Tokens of the prompt as the text encoder sees it, special tokens (BOS/EOS) included."""
        return len(self.tokenizer(self._text_for_tokenizer(prompt), add_special_tokens=True).input_ids)

    def validate_prompt(self, prompt: str, field: str) -> None:
        if not prompt or not prompt.strip():
            raise InvalidArgument("prompt must not be empty or blank", field)
        count = self.count_tokens(prompt)
        if count > self.max_prompt_tokens:
            raise InvalidArgument(
                f"prompt is {count} tokens long (special tokens included), over the limit of "
                f"{self.max_prompt_tokens} of prior {self.info.name!r}",
                field,
            )

    def _text_encoder_uses_attention_mask(self) -> bool:
        return bool(getattr(self.text_encoder.config, "use_attention_mask", False))

    @torch.no_grad()
    def _encode_text(self, prompt: str) -> torch.Tensor:
        """Token states (L, D) of one prompt, padded to the token limit, in the UNet's dtype on its device."""
        tokens = self.tokenizer(
            self._text_for_tokenizer(prompt),
            padding="max_length",
            max_length=self.max_prompt_tokens,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(self._device) if self._text_encoder_uses_attention_mask() else None
        states = self.text_encoder(tokens.input_ids.to(self._device), attention_mask=mask)[0]
        return states[0].to(self.dtype)

    def prompt_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, L, D) token states for the prompts; each distinct prompt is encoded once, through the cache."""
        unique: dict[str, torch.Tensor] = {}
        with self._cache_lock:
            for prompt in prompts:
                if prompt not in unique:
                    unique[prompt] = self.embedding_cache.get_or_compute(prompt, lambda p=prompt: self._encode_text(p))
        return torch.stack([unique[p] for p in prompts])

    # --------------------------------------------------------------------------------------------------- noise
    def _unet_kwargs(self, hidden_states: torch.Tensor) -> dict[str, Any]:
        return {"encoder_hidden_states": hidden_states}

    def _to_epsilon(self, output: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The network's output as epsilon, in float32. v = sqrt(abar) eps - sqrt(1 - abar) x0."""
        if self.prediction_type == "epsilon":
            return output
        abar = self._alphas_cumprod.to(output.device)[timesteps.to(output.device)]
        abar = abar.reshape((-1,) + (1,) * (output.ndim - 1))
        if self.prediction_type == "v_prediction":
            return abar.sqrt() * output + (1.0 - abar).sqrt() * noisy
        # "sample": the network predicts x0.
        return (noisy - abar.sqrt() * output) / (1.0 - abar).sqrt()

    def _denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """One UNet call on rows that already hold [cond; uncond]; what the CUDA graph records."""
        return self.unet(noisy, timesteps, return_dict=False, **self._unet_kwargs(hidden))[0]

    def predict_noise(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, conditions: list[ViewCondition]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, channels = noisy.shape[0], noisy.shape[1]
        if len(conditions) != batch:
            raise ValueError(f"{len(conditions)} conditions for {batch} noisy inputs")
        hidden = self.prompt_embeddings([c.prompt for c in conditions] + [c.negative_prompt for c in conditions])
        noisy = noisy.to(self._device)
        steps = timesteps.to(self._device).long()
        inputs = (torch.cat([noisy, noisy]).to(self.dtype), torch.cat([steps, steps]), hidden)
        if self.denoiser_graph is not None:
            output = self.denoiser_graph(self._denoise, *inputs)
        else:
            with torch.no_grad():
                output = self._denoise(*inputs)
        # Learned-variance models (IF) output [eps, variance] along channels: the first `channels` are eps.
        output = output[:, :channels].float()
        eps = self._to_epsilon(output, torch.cat([noisy, noisy]).float(), torch.cat([steps, steps]))
        return eps[:batch], eps[batch:]
