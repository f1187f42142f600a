"""The zero123 prior's SDS call (Magic123's 3D prior) on random weights of Zero123's architecture.

GPU (SD 1.5-size UNet with 8 input channels, SD's VAE, CLIP ViT-L/14 vision tower; fp16):
    python -m bench.zero123_speed --out out/bench
CPU smoke (tiny model; the times mean nothing):
    python -m bench.zero123_speed --smoke --out out/bench

Times, after warm-up calls (median and minimum): the first call for a new reference image (its CLIP embedding and
VAE latent computed), and a whole `compute_sds` call of B rendered images with the reference cached, as the
guidance service runs it; reports the peak GPU memory. Writes `zero123_speed.json`. Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bench.timing import wall_ms
from services.guidance import sds
from services.guidance.priors import random_init
from shared import tensors
from shared.cameras import orbit_camera
from shared.guidance_api import ImageCondition, SdsRequest
from shared.tensor_digest import tensor_sha256


def reference(seed: int, side: int) -> ImageCondition:
    image = torch.rand(1, 4, side, side, generator=torch.Generator().manual_seed(seed))
    return ImageCondition(reference_camera=orbit_camera(0.0, 0.0, 2.0), image_sha256=tensor_sha256(
        tensors.to_proto(image)), image=image)


def request(batch: int, side: int, condition: ImageCondition, seed: int) -> SdsRequest:
    cameras = [orbit_camera(90.0 * i + 20.0, 10.0, 2.0, size=side) for i in range(batch)]
    return SdsRequest(job_id="bench", prior="zero123", images=torch.rand(batch, 3, side, side), prompt="",
                      cameras=cameras, image_condition=condition, seed=seed)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default="out/bench")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    size, device, side = ("tiny", "cpu", 64) if args.smoke else ("zero123", "cuda", 256)
    repeats = 2 if args.smoke else args.repeats
    prior = random_init.build_random_zero123_prior(size, device=device, resolution=side)
    torch_device = prior.device if prior.device.type == "cuda" else None
    rows = []
    for batch in (1, 4):
        seeds = iter(range(10_000))

        def fresh_reference() -> None:
            condition = reference(next(seeds), 512 if not args.smoke else 64)
            sds.compute_sds(prior, [request(batch, side, condition, 0)])

        cached = reference(123_456, 512 if not args.smoke else 64)
        if torch_device is not None:
            torch.cuda.reset_peak_memory_stats()
        new_ms = wall_ms(fresh_reference, repeats=max(3, repeats // 4), warmup=1, device=torch_device)
        cached_ms = wall_ms(lambda: sds.compute_sds(prior, [request(batch, side, cached, 1)]), repeats=repeats,
                            warmup=2, device=torch_device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch_device is not None else 0.0
        rows.append({
            "size": size, "batch": batch, "image_side": side, "dtype": str(prior.dtype),
            "sds_ms_median": statistics.median(cached_ms), "sds_ms_min": min(cached_ms),
            "new_reference_sds_ms_median": statistics.median(new_ms), "peak_gib": round(peak, 2),
            "device": torch.cuda.get_device_name() if torch_device is not None else "cpu",
        })
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "zero123_speed.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
