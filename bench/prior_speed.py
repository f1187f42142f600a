"""Where a prior's SDS time goes, and what the weights' memory layout and the VAE's attention kernel change.

GPU (random weights of SD 2.1-base's and IF-I-XL's architectures, fp16):
    python -m bench.prior_speed --out out/bench
CPU smoke (tiny models, checks that the runner works; the times mean nothing):
    python -m bench.prior_speed --smoke --out out/bench

For each prior and each variant (the service's default build, the other memory layout, the UNet without its CUDA
graph, and for the latent prior the VAE attention kernel PyTorch would pick) it times, in interleaved rounds after
warm-up calls (medians and minima over all rounds):
  - the UNet with classifier-free guidance (2B rows), no grad;
  - for the latent prior, the VAE encoder forward alone and forward + backward (the SDS chain rule needs both);
  - one whole `compute_sds` call of B images sent from the host, as the guidance service runs it (the gradient stays
    on the prior's device: a transport copies it to the host, an in-process scene uses it where it is).
Writes `prior_speed.json` and prints a markdown table. Not a test: no assertions on speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bench.timing import wall_ms
from services.guidance import sds
from services.guidance.priors import random_init
from services.guidance.priors.base import DiffusionPrior, ViewCondition
from services.guidance.priors.layout import apply_layout
from services.guidance.priors.vae_encoder import ANY_ATTENTION_KERNEL, vae_attention_backends
from shared.guidance_api import SdsRequest


@dataclass(frozen=True)
class Case:
    kind: str  # "latent" | "pixel"
    size: str
    batch: int
    image_side: int  # what the scene sends: 512 for the fine stage, 64 for the coarse one


GPU_CASES = (Case("latent", "sd21-base", 4, 512), Case("pixel", "if-i-xl", 4, 64))
SMOKE_CASES = (Case("latent", "tiny", 2, 64), Case("pixel", "tiny", 2, 32))


def variants(prior: DiffusionPrior) -> dict[str, Callable[[], None]]:
    """name -> a function that puts the prior in that variant. The first is what the service builds by default."""
    default_layout = prior.channels_last
    default_graph = prior.denoiser_graph
    has_vae_attention = hasattr(prior, "vae_attention_backends")  # latent priors

    def service_default() -> None:
        apply_layout(prior, channels_last=default_layout)
        prior.denoiser_graph = default_graph
        if has_vae_attention:
            prior.vae_attention_backends = vae_attention_backends(prior.device)

    def other_layout() -> None:
        service_default()
        apply_layout(prior, channels_last=not default_layout)

    chosen = {"service default": service_default,
              "contiguous" if default_layout else "channels-last": other_layout}
    if default_graph is not None:
        def eager_unet() -> None:
            service_default()
            prior.denoiser_graph = None

        chosen["UNet eager (no CUDA graph)"] = eager_unet
    if has_vae_attention:
        def any_attention_kernel() -> None:  # what PyTorch picks when free to: the memory-efficient kernel
            service_default()
            prior.vae_attention_backends = list(ANY_ATTENTION_KERNEL)

        chosen["VAE attention: PyTorch's pick"] = any_attention_kernel
    return chosen


def build(case: Case, device: str) -> DiffusionPrior:
    builder = random_init.build_random_latent_prior if case.kind == "latent" else random_init.build_random_pixel_prior
    return builder(case.size, device=device, dtype="auto", resolution=case.image_side)  # the scene renders at it


def component_timers(prior: DiffusionPrior, case: Case) -> dict[str, Callable[[], object]]:
    device = prior.device
    images = torch.rand(case.batch, 3, case.image_side, case.image_side, device=device)
    conditions = [ViewCondition(prompt="a red torus", negative_prompt="")] * case.batch
    z0 = prior.encode(images, conditions).detach()
    steps = torch.full((case.batch,), 500, device=device)

    def unet() -> object:
        return prior.predict_noise(z0, steps, conditions)

    def sds_call() -> object:
        request = SdsRequest(job_id="bench", prior=prior.info.name, images=images.cpu(), prompt="a red torus",
                             grad_dtype=torch.float16)
        return sds.compute_sds(prior, [request])

    timers: dict[str, Callable[[], object]] = {"unet_cfg": unet}
    if case.kind == "latent":
        def encode_forward() -> object:
            with torch.no_grad():
                return prior.encode(images, conditions)

        def encode_forward_backward() -> object:
            x = images.detach().requires_grad_(True)
            latents = prior.encode(x, conditions)
            (grad,) = torch.autograd.grad(latents, x, torch.ones_like(latents))
            return grad

        timers["vae_forward"] = encode_forward
        timers["vae_forward_backward"] = encode_forward_backward
    timers["compute_sds"] = sds_call
    return timers


def run_case(case: Case, device: str, repeats: int, warmup: int, rounds: int) -> list[dict]:
    """Variants are timed in interleaved rounds, so that a drift of the machine's speed during the run (seen on the
    lent GPUs: the same UNet call at 30 and at 57 ms in two runs) falls on every variant alike."""
    prior = build(case, device)
    chosen = variants(prior)
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in chosen}
    for _ in range(rounds):
        for variant, apply_variant in chosen.items():
            apply_variant()
            for name, fn in component_timers(prior, case).items():
                samples[variant].setdefault(name, []).extend(wall_ms(fn, repeats, warmup, prior.device))
    rows = []
    for variant, by_component in samples.items():
        row = {"prior": case.kind, "model": case.size, "batch": case.batch, "image_side": case.image_side,
               "variant": variant, "rounds": rounds}
        for name, times in by_component.items():
            row[f"{name}_ms"] = round(statistics.median(times), 2)
            row[f"{name}_min_ms"] = round(min(times), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    del prior
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def profile_sds(case: Case, device: str, out: Path, calls: int = 3) -> None:
    """torch.profiler over a few compute_sds calls (default layout): where the time beyond the components goes."""
    from torch.profiler import ProfilerActivity, profile

    prior = build(case, device)
    sds_call = component_timers(prior, case)["compute_sds"]
    for _ in range(3):
        sds_call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            sds_call()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    text = (averages.table(sort_by="self_cpu_time_total", row_limit=30)
            + "\n" + averages.table(sort_by="self_device_time_total", row_limit=30))
    (out / f"prior_profile_{case.kind}.txt").write_text(text)
    prof.export_chrome_trace(str(out / f"prior_profile_{case.kind}.json"))
    print(text)


def markdown(rows: list[dict]) -> str:
    columns = ["unet_cfg_ms", "vae_forward_ms", "vae_forward_backward_ms", "compute_sds_ms"]
    lines = ["| prior | batch x side | variant | UNet+CFG | VAE fwd | VAE fwd+bwd | compute_sds |",
             "|---|---|---|---:|---:|---:|---:|"]
    for row in rows:
        cells = [f"{row[c]:.1f}" if c in row else "-" for c in columns]
        lines.append(f"| {row['prior']} ({row['model']}) | {row['batch']} x {row['image_side']} | {row['variant']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU (checks the runner only)")
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--profile", choices=("latent", "pixel"), help="only profile this prior's compute_sds")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    repeats = args.repeats or (2 if args.smoke else 8)
    warmup = 0 if args.smoke else 3
    rounds = 1 if args.smoke else 3
    args.out.mkdir(parents=True, exist_ok=True)
    if args.profile:
        profile_sds(next(c for c in GPU_CASES if c.kind == args.profile), device, args.out)
        return []
    rows = []
    for case in SMOKE_CASES if args.smoke else GPU_CASES:
        rows.extend(run_case(case, device, repeats, warmup, rounds))
    (args.out / "prior_speed.json").write_text(json.dumps(rows, indent=1))
    table = markdown(rows)
    (args.out / "prior_speed.md").write_text(table + "\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
