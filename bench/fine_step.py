"""Fine-stage step time split (marching tets, rasterise, texture field, shading, guidance call, backward, optimiser).

    python -m bench.fine_step [--cells 56] [--resolution 64] [--batch 4] [--steps 10] [--threads 1]
    python -m bench.fine_step --guidance grpc      # the guidance call over a standalone gRPC server

The DMTet grid starts from the exact SDF of the analytic prior's red torus (real geometry, no coarse run needed)
with a fresh colour field (the cpu-demo preset's hash grid by default); after --warmup steps, --steps steps are timed. Guidance is the analytic prior ("a red
torus"), so the guidance phase here is that prior's cost, not a diffusion model's. Not a test: prints a markdown
table and optional JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch

from bench.coarse_step import make_guidance
from services.scene.config import DMTetConfig, FineConfig, PriorTerm
from services.scene.field import FieldConfig, HashGridConfig
from services.scene.fine import FineStage
from shared.cameras import CameraRanges

PHASES = ("marching_tets", "rasterize", "texture", "shade", "guidance", "backward", "optimizer")


def torus_sdf(points: torch.Tensor, major: float = 0.32, minor: float = 0.12) -> torch.Tensor:
    """Signed distance to the built-in torus (axis +Z), positive inside."""
    ring = torch.sqrt(points[:, 0] ** 2 + points[:, 1] ** 2) - major
    return minor - torch.sqrt(ring**2 + points[:, 2] ** 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=56)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a 2-core host; 0 keeps torch's default)")
    parser.add_argument("--prior-resolution", type=int, default=None, help="the analytic prior's resolution (default: --resolution)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rasterizer", default="auto", choices=("auto", "torch", "nvdiffrast"))
    parser.add_argument("--guidance", default="inproc", choices=("inproc", "grpc"))
    parser.add_argument("--levels", type=int, default=8, help="colour field hash grid levels (cpu-demo: 8)")
    parser.add_argument("--log2-hashmap", type=int, default=15, help="colour field hash table size (cpu-demo: 15)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    guidance, close = make_guidance(args.guidance, args.prior_resolution or args.resolution)
    config = FineConfig(
        prompt="a red torus",
        priors=(PriorTerm(prior="analytic"),),
        resolution=args.resolution,
        batch_size=args.batch,
        dmtet=DMTetConfig(grid_cells=args.cells),
        rasterizer=args.rasterizer,
        cameras=CameraRanges(elevation_deg=(-10.0, 60.0)),
        field=FieldConfig(
            encoding=HashGridConfig(n_levels=args.levels, log2_hashmap_size=args.log2_hashmap, base_resolution=16),
            backend="torch" if args.device == "cpu" else "auto",
        ),
    )
    stage = FineStage(config, guidance, "bench", args.device)
    with torch.no_grad():
        stage.geometry.sdf.copy_(torus_sdf(stage.geometry.rest_positions))
    sync = torch.cuda.synchronize if stage.device.type == "cuda" else (lambda: None)
    try:
        for _ in range(args.warmup):
            stage.step()
        per_phase: dict[str, list[float]] = {name: [] for name in PHASES}
        totals = []
        for _ in range(args.steps):
            sync()
            report = stage.step()
            sync()
            for name in PHASES:
                per_phase[name].append(report.phase_seconds.get(name, 0.0))
            totals.append(sum(report.phase_seconds.values()))
    finally:
        close()

    faces = stage.extract_mesh()[1].shape[0]
    medians = {name: 1000 * statistics.median(values) for name, values in per_phase.items()}
    total = 1000 * statistics.median(totals)
    print(f"fine step, {args.cells}-cell grid ({faces} faces), {args.resolution}x{args.resolution}, batch {args.batch}, "
          f"{args.device}, {args.threads} thread(s), guidance {args.guidance}; medians over {args.steps} steps")
    print("| phase | ms | share |\n|---|---:|---:|")
    for name, value in medians.items():
        print(f"| {name} | {value:.1f} | {100 * value / total:.0f}% |")
    print(f"| **step** | **{total:.1f}** | |")
    if args.json:
        args.json.write_text(json.dumps({
            "bench": "fine_step", "args": {k: str(v) for k, v in vars(args).items()}, "faces": faces,
            "median_ms": medians, "step_ms": total, "host": platform.node(), "cpus": os.cpu_count(),
        }, indent=2))


if __name__ == "__main__":
    main()
