"""The latent prior's VAE image encoder, forward + backward, as the fine-stage scene runs it when it sends latents.

GPU (random weights of SD 2.1-base's VAE, fp16, 4 images at 512x512):
    python -m bench.encoder_speed --out out/bench
CPU smoke (the tiny VAE; checks that the runner works, the times mean nothing):
    python -m bench.encoder_speed --smoke --out out/bench

Variants: eager with contiguous weights (the default), eager channels-last, and torch.compile of the encoder with
each layout (inductor fuses GroupNorm + SiLU and can keep channels-last through the norms, which PyTorch's eager
GroupNorm cannot). For each: the first call's time (compilation), medians over interleaved rounds, and the latents'
and image gradient's agreement with the eager default. Writes `encoder_speed.json`. Not a test: no assertions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from bench.timing import wall_ms
from services.guidance.priors import random_init
from services.guidance.priors.vae_encoder import VaeImageEncoder


def forward_backward(encoder: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, upstream: torch.Tensor):
    leaf = images.detach().requires_grad_(True)
    latents = encoder(leaf)
    (grad,) = torch.autograd.grad(latents, leaf, upstream.to(latents.dtype))
    return latents, grad


def build_variants(size: str, device: torch.device, dtype: torch.dtype, resolution: int, compile_: bool):
    variants = {}
    for layout in ("contiguous", "channels_last"):
        vae = random_init.build_random_vae(size, device=device, dtype=dtype)
        if layout == "channels_last":
            vae = vae.to(memory_format=torch.channels_last)
        encoder = VaeImageEncoder(vae, resolution)
        variants[f"eager, {layout}"] = encoder
        if compile_:
            variants[f"compiled, {layout}"] = torch.compile(encoder)
    return variants


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.float16
    size, resolution = ("tiny", 64) if args.smoke else ("sd21-base", 512)
    repeats, rounds = (args.repeats or (2 if args.smoke else 8)), (1 if args.smoke else 3)
    variants = build_variants(size, device, dtype, resolution, compile_=not args.no_compile)
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(args.batch, 3, resolution, resolution, device=device, generator=generator)
    reference_latents, reference_grad = None, None
    rows: dict[str, dict] = {}
    for name, encoder in variants.items():
        start = time.perf_counter()
        latents = encoder(images)
        upstream = torch.randn(latents.shape, device=device, generator=torch.Generator(device=device).manual_seed(1))
        latents, grad = forward_backward(encoder, images, upstream)
        if device.type == "cuda":
            torch.cuda.synchronize()
        first_s = time.perf_counter() - start
        if reference_latents is None:
            reference_latents, reference_grad = latents.detach().float(), grad.float()
        cosine = torch.nn.functional.cosine_similarity(grad.float().flatten(), reference_grad.flatten(), dim=0)
        latent_diff = float((latents.detach().float() - reference_latents).abs().max() / reference_latents.abs().max())
        rows[name] = {"variant": name, "first_call_s": first_s, "grad_cosine": float(cosine),
                      "latent_max_rel_diff": latent_diff, "times_ms": []}
        print(json.dumps({k: v for k, v in rows[name].items() if k != "times_ms"}), flush=True)
    for _ in range(rounds):  # interleaved: machine drift falls on all variants alike
        for name, encoder in variants.items():
            rows[name]["times_ms"] += wall_ms(lambda: forward_backward(encoder, images, upstream), repeats, 1, device)
    result = []
    for row in rows.values():
        times = row.pop("times_ms")
        row.update(median_ms=statistics.median(times), min_ms=min(times), batch=args.batch, resolution=resolution)
        result.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "encoder_speed.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
