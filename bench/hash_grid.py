"""Hash-grid encoding forward + backward: the pure-PyTorch grid against the Triton kernels (GPU).

    python -m bench.hash_grid [--device cuda] [--log2-points 18 19 20 21] [--repeats 20] [--json out.json]

Magic3D's grid (16 levels, 2 features, 2^19 rows per hashed level, base 16, finest 4096). One iteration: encode N
random points, multiply by a random upstream gradient, backward into the table (what a render step does), timed
with CUDA events around the whole iteration; medians of --repeats after 3 warm-up iterations. Also times the
analytic-normal path (features plus the input vjp with its backward). Not a test: prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from services.scene.field.encoding import HashGridConfig, TorchHashGrid


def timed(fn, repeats: int, device: torch.device) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time

            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def step(grid, x, upstream):
    def run():
        grid.zero_grad(set_to_none=True)
        (grid(x) * upstream).sum().backward()

    return run


def normal_step(grid, x, upstream, v):
    def run():
        grid.zero_grad(set_to_none=True)
        features, vjp = grid.forward_with_input_vjp(x, create_graph=True)
        ((features * upstream).sum() + vjp(v).square().sum()).backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--log2-points", type=int, nargs="+", default=[18, 19, 20, 21])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from services.scene.field.triton_encoding import TritonHashGrid

    device = torch.device(args.device)
    cfg = HashGridConfig()
    reference = TorchHashGrid(cfg).to(device)
    fast = TritonHashGrid(cfg).to(device)
    with torch.no_grad():
        fast.table.copy_(reference.table)
    rows = []
    print(f"hash grid fwd+bwd, {cfg.n_levels} levels x {cfg.n_features_per_level} features, 2^{cfg.log2_hashmap_size} "
          f"rows, {device}; median ms of {args.repeats}")
    print("| points | torch | triton | speed-up | torch (normals) | triton (normals) | speed-up |\n|---|---:|---:|---:|---:|---:|---:|")
    for log2 in args.log2_points:
        n = 1 << log2
        generator = torch.Generator(device=device).manual_seed(log2)
        x = torch.rand(n, 3, device=device, generator=generator)
        upstream = torch.randn(n, cfg.output_dim, device=device, generator=generator)
        v = torch.randn(n, cfg.output_dim, device=device, generator=generator)
        with torch.no_grad():
            error = float((fast(x) - reference(x)).abs().max())
        row = {"points": n, "max_abs_diff": error}
        row["torch_ms"] = timed(step(reference, x, upstream), args.repeats, device)
        row["triton_ms"] = timed(step(fast, x, upstream), args.repeats, device)
        row["torch_normals_ms"] = timed(normal_step(reference, x, upstream, v), args.repeats, device)
        row["triton_normals_ms"] = timed(normal_step(fast, x, upstream, v), args.repeats, device)
        rows.append(row)
        print(f"| 2^{log2} | {row['torch_ms']:.2f} | {row['triton_ms']:.2f} | {row['torch_ms'] / row['triton_ms']:.1f}x "
              f"| {row['torch_normals_ms']:.2f} | {row['triton_normals_ms']:.2f} | "
              f"{row['torch_normals_ms'] / row['triton_normals_ms']:.1f}x |  (max |diff| {error:.1e})")
    if args.json:
        args.json.write_text(json.dumps({"bench": "hash_grid", "device": str(device), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
