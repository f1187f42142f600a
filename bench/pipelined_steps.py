"""Step time, sequential against one-step-stale pipelined SDS (`pipelined_guidance`), guidance of a fixed wall time.

    python -m bench.pipelined_steps [--guidance-ms 60] [--steps 20] [--warmup 3] [--rounds 3] [--stages coarse,fine]

The guidance is a stand-in that takes `--guidance-ms` of wall time without using this process's CPU (it sleeps, as a
prior on another device or in another process leaves the scene's device free) and returns a small random gradient
of the right shape; the render, backward and optimiser step are the real stages' at small sizes (coarse: 16x16,
batch 4, 32 samples per ray; fine: 64x64, batch 4, a 16-cell DMTet grid). Sequentially a step costs render + guidance
+ backward + optimiser; pipelined, max(guidance, render + backward + optimiser) plus the hand-over, which this
measures. Every timed call but the last prefetches, as RunSteps does within a chunk (the last, a sequential step
with no render of its own, is not counted); the two modes alternate over `--rounds` fresh stages, since the host's
load drifts. Not a test: prints a markdown
table and writes JSON (`--smoke`: tiny sizes, CI checks it runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from bench.fine_step import torus_sdf
from services.scene.coarse import CoarseStage
from services.scene.config import CoarseConfig, DMTetConfig, FineConfig, PriorTerm
from services.scene.field import FieldConfig, HashGridConfig, OccupancyConfig, RendererConfig
from services.scene.fine import FineStage
from shared.guidance_api import Conditioning, PriorInfo, PriorKind, SdsRequest, SdsResult

SCENE_PHASES = ("render", "reference", "marching_tets", "rasterize", "texture", "shade", "backward", "optimizer")


class FixedTimeGuidance:
    """A prior that takes `seconds` of wall time and no CPU: a seeded random gradient (0.01 scale) per request."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def compute_sds(self, request: SdsRequest, timeout_s: float | None = None) -> SdsResult:
        start = time.perf_counter()
        inputs = request.images if request.images is not None else request.latents
        assert inputs is not None
        generator = torch.Generator().manual_seed(request.seed)
        grad = (0.01 * torch.randn(inputs.shape, generator=generator)).to(request.grad_dtype)
        time.sleep(max(0.0, self.seconds - (time.perf_counter() - start)))
        batch = inputs.shape[0]
        return SdsResult(grad=grad, t=[0.5] * batch, loss=[0.0] * batch, finite=[True] * batch,
                         prompts=[request.prompt] * batch)

    def prior_info(self, name: str, timeout_s: float | None = None) -> PriorInfo:
        return PriorInfo(name=name, kind=PriorKind.PIXEL, native_resolution=64, max_prompt_tokens=77,
                         accepted_conditioning=(Conditioning.TEXT,), default_guidance_scale=100.0,
                         default_time_range=(0.02, 0.98))


def coarse_config(smoke: bool, pipelined: bool) -> CoarseConfig:
    return CoarseConfig(
        prompt="a red torus", priors=(PriorTerm(prior="fixed"),), resolution=16, batch_size=2 if smoke else 4,
        field=FieldConfig(encoding=HashGridConfig(n_levels=8, log2_hashmap_size=15, base_resolution=16),
                          backend="torch"),
        renderer=RendererConfig(num_samples_per_ray=16 if smoke else 32),
        occupancy=OccupancyConfig(resolution=16, step_size=2.0 / 48, warmup_steps=4),
        seed=0, pipelined_guidance=pipelined,
    )


def fine_config(smoke: bool, pipelined: bool) -> FineConfig:
    return FineConfig(
        prompt="a red torus", priors=(PriorTerm(prior="fixed"),), resolution=32 if smoke else 64,
        batch_size=2 if smoke else 4, rasterizer="torch",
        field=FieldConfig(encoding=HashGridConfig(n_levels=8, log2_hashmap_size=15, base_resolution=16),
                          backend="torch"),
        dmtet=DMTetConfig(grid_cells=16, level=10.0), seed=0, pipelined_guidance=pipelined,
    )


def make_stage(stage: str, smoke: bool, pipelined: bool, guidance: FixedTimeGuidance):
    if stage == "coarse":
        return CoarseStage(coarse_config(smoke, pipelined), guidance, "bench-pipelined")
    scene = FineStage(fine_config(smoke, pipelined), guidance, "bench-pipelined")
    with torch.no_grad():
        scene.geometry.sdf.copy_(torus_sdf(scene.geometry.rest_positions))
    return scene


def timed_calls(stage: str, pipelined: bool, args: argparse.Namespace) -> tuple[list[float], list]:
    """Wall seconds and reports of `--steps` calls on a fresh stage after `--warmup` untimed ones."""
    scene = make_stage(stage, args.smoke, pipelined, FixedTimeGuidance(args.guidance_ms / 1e3))
    for _ in range(args.warmup):
        scene.step(prefetch=True)
    totals, reports = [], []
    for index in range(args.steps):
        start = time.perf_counter()
        reports.append(scene.step(prefetch=index + 1 < args.steps))
        totals.append(time.perf_counter() - start)
    assert not scene.step_in_flight
    # The last call has nothing to prefetch (a sequential step's length, no render of its own): left out.
    return totals[:-1], reports[:-1]


def time_stage(stage: str, args: argparse.Namespace) -> list[dict]:
    """Both modes, alternating over `--rounds` fresh stages (the host's load drifts: each mode sees the same)."""
    calls: dict[bool, tuple[list[float], list]] = {False: ([], []), True: ([], [])}
    for _ in range(args.rounds):
        for pipelined in (False, True):
            totals, reports = timed_calls(stage, pipelined, args)
            calls[pipelined][0].extend(totals)
            calls[pipelined][1].extend(reports)
    rows = []
    for pipelined, (totals, reports) in calls.items():
        names = dict.fromkeys(k for r in reports for k in r.phase_seconds)
        phases = {k: 1e3 * statistics.median(r.phase_seconds.get(k, 0.0) for r in reports) for k in names}
        scene_ms = 1e3 * statistics.median(
            sum(v for k, v in r.phase_seconds.items() if k in SCENE_PHASES) for r in reports
        )
        step_ms = 1e3 * statistics.median(totals)
        floor_ms = max(args.guidance_ms, scene_ms) if pipelined else args.guidance_ms + scene_ms
        rows.append({"stage": stage, "mode": "pipelined" if pipelined else "sequential",
                     "guidance_ms": args.guidance_ms, "step_ms": step_ms, "phases_ms": phases,
                     "scene_work_ms": scene_ms, "floor_ms": floor_ms, "over_floor": step_ms / floor_ms})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| stage | mode | step ms | scene work ms (render + backward + optimiser) | guidance wait ms | "
             "floor ms | step / floor |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['mode']} | **{r['step_ms']:.1f}** | {r['scene_work_ms']:.1f} | "
                     f"{r['phases_ms'].get('guidance', 0.0):.1f} | {r['floor_ms']:.1f} | {r['over_floor']:.2f} |")
    by = {(r["stage"], r["mode"]): r["step_ms"] for r in rows}
    lines += ["", "| stage | pipelined / sequential step time |", "|---|---:|"]
    for stage in dict.fromkeys(r["stage"] for r in rows):
        if (stage, "pipelined") in by and (stage, "sequential") in by:
            lines.append(f"| {stage} | {by[stage, 'pipelined'] / by[stage, 'sequential']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guidance-ms", type=float, default=60.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="fresh stages per mode, the modes alternating")
    parser.add_argument("--stages", default="coarse,fine")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the bench runs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.steps < 2 or args.rounds < 1 or args.guidance_ms < 0:
        parser.error("--steps must be at least 2, --rounds at least 1 and --guidance-ms not negative")
    rows = []
    for stage in args.stages.split(","):
        if stage not in ("coarse", "fine"):
            parser.error(f"--stages: unknown stage {stage!r}; known: coarse, fine")
        for row in time_stage(stage, args):
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = markdown(rows)
    print(f"\nCPU {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n\n{table}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "pipelined_steps.json").write_text(json.dumps(rows, indent=1))
        (args.out / "pipelined_steps.md").write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
