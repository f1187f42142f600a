"""fp8 linears in the denoiser: the UNet-with-CFG time and the SDS gradient's cosine to the service's (issue 17).

GPU (random weights of IF-I-XL's and SD 2.1-base's architectures, fp16, the service's CUDA graphs):
    python -m bench.fp8_unet --out out/bench          (or: bash bench/gpu/run.sh fp8)
CPU smoke (tiny models, fp8 emulated; checks the runner, the times mean nothing):
    python -m bench.fp8_unet --smoke --out out/bench

Per prior, the same z0, noise and timesteps go through the UNet with classifier-free guidance twice: as the service
builds it (the baseline: fp16 on CUDA, float32 on the CPU) and with every eligible nn.Linear in float8 e4m3
(services/guidance/priors/fp8.py; convolutions stay in the baseline dtype). Reported: the UNet+CFG call's median and
minimum time per variant, in interleaved rounds (the lent GPUs drift), and per timestep the cosine and relative norm
error against the baseline of the UNet's conditional output and of the SDS gradient w(t) (eps_hat - eps). Random
weights give the numerics of the architecture, not of trained weights: a trained model's activations may have
outliers that per-tensor scales handle worse. Writes fp8_unet.json and fp8_unet.md. No assertions on speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bench.prior_speed import GPU_CASES, SMOKE_CASES, Case, build
from bench.timing import wall_ms
from services.guidance import sds
from services.guidance.priors.base import DiffusionPrior, ViewCondition
from services.guidance.priors.cuda_graphs import GraphedForward
from services.guidance.priors.fp8 import swap_linears_to_fp8
from shared.guidance_types import Weighting

TIMESTEPS = (50, 200, 500, 800, 950)


def sds_gradient(prior: DiffusionPrior, z0: torch.Tensor, noise: torch.Tensor, step: int,
                 conditions: list[ViewCondition]) -> tuple[torch.Tensor, torch.Tensor]:
    """(w(t) (eps_hat - eps), eps_cond) at one integer timestep for every row, as services/guidance/sds.py forms
    them. eps_cond is the UNet's own output; eps_hat = eps_uncond + s (eps_cond - eps_uncond) multiplies the
    difference of two nearly equal outputs by s (100 for SD, 20 for IF), and with it their rounding errors."""
    steps = torch.full((z0.shape[0],), step, device=z0.device, dtype=torch.long)
    alpha_bar = prior.alphas_cumprod.to(z0.device)[steps].view(-1, *[1] * (z0.dim() - 1))
    noisy = alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * noise
    eps_cond, eps_uncond = prior.predict_noise(noisy, steps, conditions)
    eps_hat = sds.classifier_free_guidance(eps_cond, eps_uncond, prior.info.default_guidance_scale)
    return sds.sds_weight(Weighting.SDS, alpha_bar) * (eps_hat - noise), eps_cond


def agreement(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    a, b = reference.flatten().double(), other.flatten().double()
    rows = [torch.nn.functional.cosine_similarity(r.flatten().double(), o.flatten().double(), dim=0)
            for r, o in zip(reference, other)]
    return {"cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
            "min_row_cosine": float(min(rows)),
            "relative_error": float((a - b).norm() / a.norm().clamp(min=1e-30))}


def run_case(case: Case, device: str, repeats: int, warmup: int, rounds: int) -> dict:
    prior = build(case, device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    images = torch.rand(case.batch, 3, case.image_side, case.image_side, generator=generator).to(prior.device)
    conditions = [ViewCondition(prompt="a red torus", negative_prompt="")] * case.batch
    with torch.no_grad():
        z0 = prior.encode(images, conditions).detach().float()
    noise = torch.randn(z0.shape, generator=generator).to(z0.device)

    graphs = {"baseline": prior.denoiser_graph, "fp8": GraphedForward() if prior.denoiser_graph is not None else None}
    swapped = swap_linears_to_fp8(prior.unet)

    def use(variant: str) -> None:
        swapped.use_fp8(variant == "fp8")
        prior.denoiser_graph = graphs[variant]  # each variant's graph records its own modules

    outputs: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for variant in graphs:
        use(variant)
        outputs[variant] = {t: tuple(x.cpu() for x in sds_gradient(prior, z0, noise, t, conditions))
                            for t in TIMESTEPS}
    steps = torch.full((case.batch,), 500, device=prior.device)
    samples: dict[str, list[float]] = {variant: [] for variant in graphs}
    for _ in range(rounds):
        for variant in graphs:
            use(variant)
            samples[variant].extend(wall_ms(lambda: prior.predict_noise(z0, steps, conditions), repeats, warmup,
                                            prior.device))
    use("baseline")
    result = {
        "prior": case.kind, "model": case.size, "batch": case.batch, "image_side": case.image_side,
        "latent_side": int(z0.shape[-1]), "fp8_linears": len(swapped), "rounds": rounds,
        "unet_cfg_ms": {v: round(statistics.median(s), 2) for v, s in samples.items()},
        "unet_cfg_min_ms": {v: round(min(s), 2) for v, s in samples.items()},
        "sds_gradient_vs_baseline": {t: agreement(outputs["baseline"][t][0], outputs["fp8"][t][0]) for t in TIMESTEPS},
        "eps_cond_vs_baseline": {t: agreement(outputs["baseline"][t][1], outputs["fp8"][t][1]) for t in TIMESTEPS},
        "guidance_scale": prior.info.default_guidance_scale,
        "baseline_dtype": str(prior.dtype).removeprefix("torch."),  # the service's: float16 on CUDA
    }
    result["speedup"] = round(result["unet_cfg_ms"]["baseline"] / result["unet_cfg_ms"]["fp8"], 3)
    print(json.dumps(result), flush=True)
    return result


def markdown(results: list[dict]) -> str:
    lines = ["| prior | batch x side | baseline dtype | fp8 linears | UNet+CFG baseline ms | fp8 ms | baseline/fp8 "
             "| eps_cond cosine min | CFG scale | SDS cosine min over t | rel. error max over t |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        per_t = r["sds_gradient_vs_baseline"].values()
        eps_cosine = min(a["cosine"] for a in r["eps_cond_vs_baseline"].values())
        times = r["unet_cfg_ms"]
        lines.append(f"| {r['prior']} {r['model']} | {r['batch']} x {r['image_side']} | {r['baseline_dtype']} "
                     f"| {r['fp8_linears']} | {times['baseline']} | {times['fp8']} | {r['speedup']} "
                     f"| {eps_cosine:.4f} | {r['guidance_scale']:g} | {min(a['cosine'] for a in per_t):.4f} "
                     f"| {max(a['relative_error'] for a in per_t):.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU (checks the runner only)")
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--prior", choices=("latent", "pixel"), help="only this prior")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    repeats = args.repeats or (2 if args.smoke else 10)
    warmup, rounds = (0, 1) if args.smoke else (3, 3)
    args.out.mkdir(parents=True, exist_ok=True)
    cases = [c for c in (SMOKE_CASES if args.smoke else GPU_CASES) if args.prior in (None, c.kind)]
    results = []
    for case in cases:
        results.append(run_case(case, device, repeats, warmup, rounds))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the case's prior is gone with its frame
    (args.out / "fp8_unet.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (args.out / "fp8_unet.md").write_text(table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
