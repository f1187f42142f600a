"""Times one coarse-stage render step (forward + backward) with and without occupancy pruning, on the blob field.

    python -m bench.volume_render                     # 64x64, batch 4, 64 samples, CPU
    python -m bench.volume_render --device cuda --json out.json

The loss is what a training step backpropagates: a random image gradient on rgb (standing in for SDS), plus the
orientation and sparsity regularisers (so analytic normals are differentiated twice).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from services.scene.field_config import HashGridConfig
from services.scene.field.field import BackgroundMLP, FieldConfig, NeuralField
from services.scene.field.occupancy import OccupancyConfig, OccupancyGrid
from services.scene.field.renderer import RendererConfig, VolumeRenderer, orientation_loss, sparsity_loss
from shared.cameras import Shading, orbit_camera


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--grid-resolution", type=int, default=32)
    parser.add_argument("--normals", default="analytic", choices=["analytic", "finite_difference", "predicted"])
    parser.add_argument("--shading", default="lambertian", choices=[s.value for s in Shading])
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--log2-hashmap-size", type=int, default=19)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--pruned-only", action="store_true", help="skip the (slow) unpruned render")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    enc = HashGridConfig(log2_hashmap_size=args.log2_hashmap_size)
    field = NeuralField(FieldConfig(encoding=enc, backend=args.backend, normals=args.normals)).to(device)
    background = BackgroundMLP().to(device)
    renderer = VolumeRenderer(RendererConfig(num_samples_per_ray=args.samples))
    grid = OccupancyGrid(
        OccupancyConfig(resolution=args.grid_resolution, step_size=renderer.cfg.step_size)
    ).to(device)
    shading = Shading(args.shading)
    cameras = [
        orbit_camera(360.0 * i / args.batch, 15.0, 2.0, fovy_deg=60.0, size=args.resolution, shading=shading)
        for i in range(args.batch)
    ]
    generator = torch.Generator().manual_seed(0)

    _sync(device)
    start = time.perf_counter()
    grid.update(field, 0, generator=generator)
    _sync(device)
    update_s = time.perf_counter() - start

    def step(occupancy):
        field.zero_grad(set_to_none=True)
        background.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        out = renderer.render(field, background, cameras, args.resolution, generator=generator, occupancy=occupancy)
        grad = torch.randn(out["rgb"].shape, generator=generator).to(device) * 1e-3
        loss = (out["rgb"] * grad).sum() + 10.0 * orientation_loss(
            out["weights"], out["normals"], out["view_dirs"], out["opacity"]
        ) + sparsity_loss(out["opacity"])
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, out["n_samples"], out["n_evaluated"]

    results: dict = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": vars(args),
        "grid_update_s": update_s,
        "occupied_fraction": grid.occupied_fraction(),
    }
    variants = [("occupancy", grid)] if args.pruned_only else [("no_pruning", None), ("occupancy", grid)]
    for name, occupancy in variants:
        step(occupancy)  # warm-up
        timings = [step(occupancy) for _ in range(args.reps)]
        best = min(timings, key=lambda t: t[0] + t[1])
        results[name] = {
            "forward_s": best[0],
            "backward_s": best[1],
            "step_s": best[0] + best[1],
            "n_samples": best[2],
            "n_evaluated": best[3],
        }
    if "no_pruning" in results:
        results["speedup"] = results["no_pruning"]["step_s"] / results["occupancy"]["step_s"]
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
