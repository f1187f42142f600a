"""Coarse-stage step time split (rays, encoding, MLP, normals, compositing, guidance call, backward, optimiser).

    python -m bench.coarse_step [--warmup 150] [--steps 10] [--resolution 32] [--batch 4] [--samples 48]
    python -m bench.coarse_step --guidance grpc      # the guidance call over a standalone gRPC server

The scene is first fitted for --warmup steps with the analytic prior ("a red torus") so that timings are taken on
real geometry (occupancy pruning then skips what it would in practice), then --steps steps are timed, under
torch.profiler for the render's inner split. Not a test: prints a markdown table and optional JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from services.guidance.config import GuidanceConfig, PriorSpec
from services.guidance.engine import GuidanceEngine
from services.scene.coarse import CoarseStage
from services.scene.config import CoarseConfig
from services.scene.field import FieldConfig, HashGridConfig, OccupancyConfig, RendererConfig
from services.scene.guidance import InProcessGuidance
from shared.cameras import CameraRanges
from shared.guidance_api import PriorKind
from shared.schedules import Schedule

LABELS = ("render.rays", "field.encoding", "field.mlp", "field.normals", "render.composite")


def make_guidance(kind: str, resolution: int):
    config = GuidanceConfig(
        priors=[PriorSpec(name="analytic", kind=PriorKind.ANALYTIC, resolution=resolution)],
        batching={"wait_s": 0},
        port=0,
    )
    if kind == "inproc":
        guidance = InProcessGuidance(GuidanceEngine(config))
        return guidance, guidance.close
    from services.guidance import standalone
    from shared.guidance_client import GuidanceClient
    from shared.registry import Registry

    running = standalone.start(config)
    client = GuidanceClient(Registry.model_validate({"priors": {"analytic": {"kind": "standalone", "address": running.address}}}))

    def close():
        client.close()
        running.stop(grace=None)

    return client, close


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--log2-hashmap-size", type=int, default=15)
    parser.add_argument("--levels", type=int, default=8)
    parser.add_argument("--guidance", choices=["inproc", "grpc"], default="inproc")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="torch", help="hash-grid backend: torch, triton (CUDA), tcnn, auto")
    # On a shared 2-core machine, two OpenMP threads spin against other processes and run up to 10x slower
    # (measured); one thread gives stable per-core figures. 0 keeps torch's default.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = CoarseConfig(
        prompt="a red torus",
        resolution=args.resolution,
        batch_size=args.batch,
        field=FieldConfig(
            encoding=HashGridConfig(n_levels=args.levels, log2_hashmap_size=args.log2_hashmap_size), backend=args.backend
        ),
        renderer=RendererConfig(num_samples_per_ray=args.samples),
        occupancy=OccupancyConfig(resolution=32, step_size=2.0 / args.samples, warmup_steps=32),
        cameras=CameraRanges(elevation_deg=(-10.0, 60.0)),
        loss_weights={"orientation": Schedule.linear(0, 1.0, 1000, 100.0), "sparsity": Schedule.constant(0.1)},
    )
    guidance, close = make_guidance(args.guidance, args.resolution)
    try:
        stage = CoarseStage(config, guidance, "bench", device=args.device)
        for _ in range(args.warmup):
            stage.step()
        reports = []
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(args.steps):
                reports.append(stage.step())
    finally:
        close()

    phases = {k: statistics.median(r.phase_seconds[k] for r in reports) * 1e3 for k in reports[0].phase_seconds}
    inner = {e.key: e.cpu_time_total / 1e3 / args.steps for e in profiler.key_averages() if e.key in LABELS}
    total = sum(phases.values())
    machine = f"CPU {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    print(f"\nmachine: {machine}; torch {torch.__version__}; guidance {args.guidance}; "
          f"{args.resolution}x{args.resolution}, batch {args.batch}, {args.samples} samples/ray, after {args.warmup} steps")
    print("| phase | ms per step (median) |\n|---|---|")
    for name in ("render", "guidance", "backward", "optimizer"):
        print(f"| {name} | {phases[name]:.1f} |")
        if name == "render":
            for label in LABELS:
                if label in inner:
                    print(f"| &nbsp;&nbsp;{label} (forward, profiler) | {inner[label]:.1f} |")
    print(f"| **step** | **{total:.1f}** |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"phases_ms": phases, "render_split_ms": inner, "args": vars(args)}, default=str))


if __name__ == "__main__":
    main()
