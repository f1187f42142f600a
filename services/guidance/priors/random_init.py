"""Random-weight Stable Diffusion and DeepFloyd IF models: built in code, saved in the diffusers layout.

No pretrained weights can be downloaded on the build machines, so the learned priors are tested (and
benchmarked) on models built here. Two sizes each:

- "tiny": a few hundred thousand parameters, fast on a CPU; the same component classes and data path as the real
  checkpoints (CLIP/T5 text encoder, UNet2DConditionModel, AutoencoderKL with scale factor 8, DDPM schedule).
- "sd21-base" / "if-i-xl": the architectures of Stable Diffusion 2.1-base and DeepFloyd IF-I-XL, for timing and
  memory on a GPU. ONLY THE ARCHITECTURE IS REAL: weights are random, and the tokenizers are synthetic (a few
  hundred pieces built in code; the text encoders keep the real vocab_size, so only the embedding rows of the
  synthetic ids are ever looked up). Outputs are therefore meaningless as images; shapes, FLOPs, memory and
  numerics of the data path are those of the real models.

What is exact and what is approximate:
- SD 2.1-base: UNet (865.9 M params), OpenCLIP-ViT-H text encoder shape (hidden 1024, 23 layers, 16 heads,
  intermediate 4096, gelu), VAE (128, 256, 512, 512; 4 latent channels; scaling 0.18215) and the DDPM schedule
  (scaled_linear 0.00085 - 0.012, 1000 steps, epsilon) are the published configs.
- IF-I-XL: the published UNet config was not available offline. It is reconstructed from the public conversion
  script (diffusers scripts/convert_if.py: ResnetDownsample + SimpleCrossAttn blocks, attention at 32/16/8,
  head dim 64, group-norm cross attention, scale-shift resnets, gelu, T5 states projected from 4096 and
  attention-pooled into the time embedding with 64 heads, 6 output channels) with model_channels 704 and
  channel_mult (1, 2, 3, 4), cross_attention_dim 2816 = 4 x 704: that gives 4.305 B parameters, the model card's
  "4.3B". Treat the block widths as an approximation. The text encoder is T5-v1.1-XXL's encoder (d_model 4096,
  24 layers, 64 heads, d_ff 10240, gated-gelu; 4.76 B params). Schedule: squaredcos_cap_v2, learned_range
  variance, epsilon, as in convert_if.py.

Full-size models must not be instantiated in CPU tests. Build them on the GPU with `build_random_latent_prior` /
`build_random_pixel_prior(size=..., device="cuda")`, which construct the modules directly on the device (no disk
round trip); `text_encoder_layers` shrinks the text encoder's depth when only the UNet matters (the text encoder
runs only on prompt-cache misses).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from shared.devices import resolve_device, resolve_dtype

LATENT_SIZES = ("tiny", "sd21-base", "sd15")
PIXEL_SIZES = ("tiny", "if-i-xl")

# Words that prompts of this project use often: whole-word pieces keep token counts realistic (about one per
# word, as with the real tokenizers) instead of one per character.
_WORDS = (
    "a an the of on in with and at to from by for is photo dslr zoomed out view front back side overhead "
    "red green blue yellow white black orange purple pink brown gold silver wooden metal glass stone plastic "
    "torus cube sphere ball car chair table lamp cup mug teapot vase house castle tree flower rose robot dog "
    "cat bunny rabbit squirrel owl frog fox bear lion horse dragon knight astronaut tiger baby small big "
    "highly detailed realistic render 3d model cute sitting standing riding wearing hat stack pancakes "
    "plate bowl pineapple ice cream cake banana apple hamburger pizza sculpture statue toy"
).split()
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-:;()&/\"#+"


# ---------------------------------------------------------------------------------------------------- tokenizers
def synthetic_clip_tokenizer(model_max_length: int = 77):
    """A CLIP BPE tokenizer with a small synthetic vocabulary: every character, plus whole common words."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    for char in _CHARS:
        add(char)
    for char in _CHARS:
        add(char + "</w>")
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in _WORDS:
        # CLIP's BPE marks the word end on the last symbol: "red" is r, e, d</w>. Merge left to right.
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        prefix = symbols[0]
        for symbol in symbols[1:]:
            pair = (prefix, symbol)
            prefix = prefix + symbol
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            add(prefix)
    add("<|startoftext|>")
    add("<|endoftext|>")
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def synthetic_t5_tokenizer(model_max_length: int = 77):
    """A T5 (sentencepiece unigram) tokenizer with a small synthetic vocabulary; ids 0/1/2 are pad/eos/unk as in T5."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -1.0) for word in _WORDS]
    pieces += [(char, -5.0) for char in _CHARS]
    pieces += [("\u2581" + char, -5.5) for char in _CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


# ------------------------------------------------------------------------------------------------------ configs
def latent_configs(size: str = "tiny", *, prediction_type: str = "epsilon") -> dict[str, dict[str, Any]]:
    """Constructor kwargs of text_encoder (CLIPTextConfig), unet, vae and scheduler for a latent prior."""
    scheduler = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )
    if size == "tiny":
        return {
            "text_encoder": dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                hidden_act="gelu",
                projection_dim=32,
            ),
            "unet": dict(
                sample_size=64,
                in_channels=4,
                out_channels=4,
                layers_per_block=1,
                block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32,
                attention_head_dim=8,
                use_linear_projection=True,
            ),
            # Four blocks (scale factor 8, as SD), narrow and one layer each to stay fast at 512x512 on a CPU.
            "vae": dict(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(8, 16, 16, 16),
                layers_per_block=1,
                latent_channels=4,
                norm_num_groups=8,
                sample_size=512,
                scaling_factor=0.18215,
            ),
            "scheduler": scheduler,
        }
    if size == "sd21-base":
        return {
            # OpenCLIP ViT-H/14's text tower as SD 2.x uses it (penultimate layer: 23 of 24 layers kept).
            "text_encoder": dict(
                vocab_size=49408,
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=23,
                num_attention_heads=16,
                max_position_embeddings=77,
                hidden_act="gelu",
                layer_norm_eps=1e-5,
                projection_dim=512,
            ),
            "unet": dict(
                sample_size=64,
                in_channels=4,
                out_channels=4,
                layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=(
                    "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"
                ),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=1024,
                attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True,
                act_fn="silu",
                norm_num_groups=32,
                norm_eps=1e-5,
                flip_sin_to_cos=True,
                freq_shift=0,
            ),
            "vae": dict(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                latent_channels=4,
                norm_num_groups=32,
                act_fn="silu",
                sample_size=512,
                scaling_factor=0.18215,
            ),
            "scheduler": scheduler,
        }
    if size == "sd15":  # SD 1.5 (Magic123's 2D prior): CLIP ViT-L/14's text tower, 768-wide cross-attention
        sd21 = latent_configs("sd21-base")
        text_encoder = dict(sd21["text_encoder"], hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768)
        unet = dict(sd21["unet"], cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False)
        return {**sd21, "text_encoder": text_encoder, "unet": unet}
    raise ValueError(f"size must be one of {LATENT_SIZES}, got {size!r}")


def pixel_configs(size: str = "tiny") -> dict[str, dict[str, Any]]:
    """Constructor kwargs of text_encoder (T5Config), unet and scheduler for an IF-stage-I-like pixel prior."""
    scheduler = dict(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        variance_type="learned_range",
        prediction_type="epsilon",
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.5,
    )
    if_blocks = dict(
        down_block_types=(
            "ResnetDownsampleBlock2D",
            "SimpleCrossAttnDownBlock2D",
            "SimpleCrossAttnDownBlock2D",
            "SimpleCrossAttnDownBlock2D",
        ),
        up_block_types=(
            "SimpleCrossAttnUpBlock2D",
            "SimpleCrossAttnUpBlock2D",
            "SimpleCrossAttnUpBlock2D",
            "ResnetUpsampleBlock2D",
        ),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        encoder_hid_dim_type="text_proj",
        addition_embed_type="text",
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
        upcast_attention=False,
        use_linear_projection=False,
        sample_size=64,
        in_channels=3,
        out_channels=6,
    )
    if size == "tiny":
        t5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                  relative_attention_max_distance=20)
        unet = dict(if_blocks)
        unet.update(
            down_block_types=if_blocks["down_block_types"][:2],
            up_block_types=if_blocks["up_block_types"][-2:],
            block_out_channels=(32, 64),
            layers_per_block=1,
            attention_head_dim=8,
            cross_attention_dim=64,
            encoder_hid_dim=32,
            addition_embed_type_num_heads=2,
        )
    elif size == "if-i-xl":
        # T5-v1.1-XXL's encoder.
        t5 = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                  relative_attention_num_buckets=32, relative_attention_max_distance=128)
        unet = dict(if_blocks)
        unet.update(
            block_out_channels=(704, 1408, 2112, 2816),  # model_channels 704 x (1, 2, 3, 4): approximate
            layers_per_block=3,
            attention_head_dim=64,
            cross_attention_dim=2816,
            encoder_hid_dim=4096,
            addition_embed_type_num_heads=64,
        )
    else:
        raise ValueError(f"size must be one of {PIXEL_SIZES}, got {size!r}")
    t5.update(feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0, tie_word_embeddings=False,
              is_encoder_decoder=False, use_cache=False)
    return {"text_encoder": t5, "unet": unet, "scheduler": scheduler}


# ---------------------------------------------------------------------------------------------------- building
def _seeded_build(build, seed: int, device: torch.device):
    """Calls build() with the RNG seeded, on `device`, without disturbing the caller's RNG state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with device:
            return build()


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    if getattr(module, "dtype", None) == dtype:
        return module
    module = module.to(dtype)
    if dtype in (torch.float16, torch.bfloat16):
        # As transformers' from_pretrained does for T5: keep `_keep_in_fp32_modules` (T5's `wo`) in fp32.
        keep = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
        for name, sub in module.named_modules():
            if keep and name.split(".")[-1] in keep:
                sub.to(torch.float32)
    return module


def _resolve(device: str | torch.device, dtype: str | torch.dtype) -> tuple[torch.device, torch.dtype]:
    torch_device = device if isinstance(device, torch.device) else resolve_device(device)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, torch_device)
    return torch_device, torch_dtype


def build_latent_components(
    size: str = "tiny",
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    prediction_type: str = "epsilon",
    text_encoder_layers: int | None = None,
) -> dict[str, Any]:
    """tokenizer, text_encoder, unet, vae, scheduler of a random SD-like model, built on `device` in `dtype`."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch_device, torch_dtype = _resolve(device, dtype)
    configs = latent_configs(size, prediction_type=prediction_type)
    tokenizer = synthetic_clip_tokenizer()
    text_config = dict(configs["text_encoder"])
    text_config.setdefault("vocab_size", len(tokenizer))
    text_config.update(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    if text_encoder_layers is not None:
        text_config["num_hidden_layers"] = text_encoder_layers
    text_encoder = _seeded_build(lambda: CLIPTextModel(CLIPTextConfig(**text_config)), seed, torch_device)
    text_encoder = _cast(text_encoder, torch_dtype)
    unet = _cast(_seeded_build(lambda: UNet2DConditionModel(**configs["unet"]), seed + 1, torch_device), torch_dtype)
    vae = build_random_vae(size, seed=seed, device=torch_device, dtype=torch_dtype)
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder.eval(),
        "unet": unet.eval(),
        "vae": vae.eval(),
        "scheduler": DDPMScheduler(**configs["scheduler"]),
    }


def build_random_vae(
    size: str = "tiny", *, seed: int = 0, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32"
):
    """The VAE of `build_latent_components(size, seed=seed)` alone: the same weights, for a caller that sends
    latents (it rebuilds the prior's published encoder without the UNet and text model)."""
    from diffusers import AutoencoderKL

    torch_device, torch_dtype = _resolve(device, dtype)
    if size not in LATENT_SIZES:
        raise ValueError(f"no random latent architecture {size!r}; known: {', '.join(LATENT_SIZES)}")
    config = latent_configs(size)["vae"]
    return _cast(_seeded_build(lambda: AutoencoderKL(**config), seed + 2, torch_device), torch_dtype).eval()


def build_pixel_components(
    size: str = "tiny",
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    text_encoder_layers: int | None = None,
) -> dict[str, Any]:
    """tokenizer, text_encoder, unet, scheduler of a random IF-stage-I-like model, built on `device` in `dtype`."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    torch_device, torch_dtype = _resolve(device, dtype)
    configs = pixel_configs(size)
    tokenizer = synthetic_t5_tokenizer()
    text_config = dict(configs["text_encoder"])
    text_config.setdefault("vocab_size", len(tokenizer))
    text_config.update(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0
    )
    if text_encoder_layers is not None:
        text_config["num_layers"] = text_encoder_layers
    text_encoder = _seeded_build(lambda: T5EncoderModel(T5Config(**text_config)), seed, torch_device)
    text_encoder = _cast(text_encoder, torch_dtype)
    unet = _cast(_seeded_build(lambda: UNet2DConditionModel(**configs["unet"]), seed + 1, torch_device), torch_dtype)
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder.eval(),
        "unet": unet.eval(),
        "scheduler": DDPMScheduler(**configs["scheduler"]),
    }


def build_random_latent_prior(
    size: str = "tiny",
    *,
    seed: int = 0,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    prediction_type: str = "epsilon",
    text_encoder_layers: int | None = None,
    **prior_kwargs: Any,
):
    """A LatentPrior on random weights, built directly on the device (no disk round trip). For benchmarks."""
    from services.guidance.priors.latent import LatentPrior

    torch_device, torch_dtype = _resolve(device, dtype)
    components = build_latent_components(
        size, seed=seed, device=torch_device, dtype=torch_dtype, prediction_type=prediction_type,
        text_encoder_layers=text_encoder_layers,
    )
    prior_kwargs.setdefault("name", "sd")
    return LatentPrior.from_components(**components, device=torch_device, dtype=torch_dtype, **prior_kwargs)


def build_random_pixel_prior(
    size: str = "tiny",
    *,
    seed: int = 0,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    text_encoder_layers: int | None = None,
    **prior_kwargs: Any,
):
    """A PixelPrior on random weights, built directly on the device (no disk round trip). For benchmarks."""
    from services.guidance.priors.pixel import PixelPrior

    torch_device, torch_dtype = _resolve(device, dtype)
    components = build_pixel_components(
        size, seed=seed, device=torch_device, dtype=torch_dtype, text_encoder_layers=text_encoder_layers
    )
    prior_kwargs.setdefault("name", "if")
    return PixelPrior.from_components(**components, device=torch_device, dtype=torch_dtype, **prior_kwargs)


# ------------------------------------------------------------------------------------------------------ saving
def save_random_latent_prior(
    path: str | os.PathLike,
    size: str = "tiny",
    seed: int = 0,
    *,
    prediction_type: str = "epsilon",
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
) -> Path:
    """Writes a random SD-like model as a diffusers StableDiffusionPipeline directory; returns the path."""
    from diffusers import StableDiffusionPipeline

    components = build_latent_components(size, seed=seed, device=device, dtype=dtype, prediction_type=prediction_type)
    pipeline = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipeline.save_pretrained(os.fspath(path))
    return Path(path)


def save_random_pixel_prior(
    path: str | os.PathLike,
    size: str = "tiny",
    seed: int = 0,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
) -> Path:
    """Writes a random IF-stage-I-like model as a diffusers IFPipeline directory; returns the path."""
    from diffusers import IFPipeline

    components = build_pixel_components(size, seed=seed, device=device, dtype=dtype)
    pipeline = IFPipeline(
        **components, safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False
    )
    pipeline.save_pretrained(os.fspath(path))
    return Path(path)


# ------------------------------------------------------------------------------------------------------ zero123
ZERO123_SIZES = ("tiny", "zero123")


def zero123_configs(size: str = "tiny") -> dict[str, dict[str, Any]]:
    """Constructor kwargs of unet, vae, image_encoder (CLIPVisionConfig), cc_projection and scheduler of a
    Zero-1-to-3-like model. "zero123": the released Zero123 / Zero123-XL architecture (SD 1.5's UNet with 8 input
    channels and 768-wide cross attention, SD's VAE, CLIP ViT-L/14's vision tower with its 768 projection,
    cc_projection 772 -> 768, SD's schedule); "tiny": the same classes, small."""
    latent = latent_configs("tiny" if size == "tiny" else "sd21-base")
    if size == "tiny":
        unet = dict(latent["unet"], in_channels=8, cross_attention_dim=32)
        image_encoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=32, patch_size=8, projection_dim=32, hidden_act="quick_gelu")
        width = 32
    elif size == "zero123":
        unet = dict(
            sample_size=32,
            in_channels=8,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768,
            attention_head_dim=8,
            act_fn="silu",
            norm_num_groups=32,
            norm_eps=1e-5,
            flip_sin_to_cos=True,
            freq_shift=0,
        )
        image_encoder = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                             image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                             layer_norm_eps=1e-5)
        width = 768
    else:
        raise ValueError(f"size must be one of {ZERO123_SIZES}, got {size!r}")
    return {
        "unet": unet,
        "vae": latent["vae"],
        "image_encoder": image_encoder,
        "cc_projection": dict(in_channel=width + 4, out_channel=width),
        "scheduler": latent["scheduler"],
    }


def build_zero123_components(
    size: str = "tiny",
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
) -> dict[str, Any]:
    """unet, vae, image_encoder, cc_projection, scheduler of a random Zero123-like model, on `device` in `dtype`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from services.guidance.priors.zero123 import CCProjection

    torch_device, torch_dtype = _resolve(device, dtype)
    configs = zero123_configs(size)
    vision = CLIPVisionConfig(**configs["image_encoder"])

    def build(make, offset):
        return _cast(_seeded_build(make, seed + offset, torch_device), torch_dtype).eval()

    return {
        "unet": build(lambda: UNet2DConditionModel(**configs["unet"]), 1),
        "vae": build(lambda: AutoencoderKL(**configs["vae"]), 2),
        "image_encoder": build(lambda: CLIPVisionModelWithProjection(vision), 3),
        "cc_projection": build(lambda: CCProjection(**configs["cc_projection"]), 4),
        "scheduler": DDPMScheduler(**configs["scheduler"]),
    }


def build_random_zero123_prior(
    size: str = "tiny",
    *,
    seed: int = 0,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    **prior_kwargs: Any,
):
    """A Zero123Prior on random weights, built directly on the device (no disk round trip). For benchmarks."""
    from services.guidance.priors.zero123 import Zero123Prior

    torch_device, torch_dtype = _resolve(device, dtype)
    components = build_zero123_components(size, seed=seed, device=torch_device, dtype=torch_dtype)
    prior_kwargs.setdefault("name", "zero123")
    return Zero123Prior.from_components(**components, device=torch_device, dtype=torch_dtype, **prior_kwargs)


def save_random_zero123_prior(
    path: str | os.PathLike,
    size: str = "tiny",
    seed: int = 0,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
) -> Path:
    """Writes a random Zero123-like model in the diffusers layout of the community `pipeline_zero1to3` checkpoints
    (unet/, vae/, image_encoder/, scheduler/, cc_projection/, safetensors throughout); returns the path."""
    import json

    components = build_zero123_components(size, seed=seed, device=device, dtype=dtype)
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "image_encoder", "scheduler"):
        components[name].save_pretrained(os.fspath(root / name))
    components["cc_projection"].save(root / "cc_projection")
    index = {
        "_class_name": "Zero1to3StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "cc_projection": ["pipeline_zero1to3", "CCProjection"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root
