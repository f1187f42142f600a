"""SDS time per request at batch 1/4/8: in-process vs standalone gRPC vs Ray Serve.

CPU (tiny random-weight models, the analytic prior):
    python -m bench.guidance_sds --size tiny --priors analytic,pixel,latent --modes inproc,standalone,serve
GPU (full-size random-weight models of SD 2.1-base's and IF-I-XL's architectures, fp16):
    python -m bench.guidance_sds --size full --priors pixel,latent --modes inproc,standalone --device cuda

Prints a markdown table and writes JSON (--json). Times are medians over --repeats calls after one warm-up;
a "call" is one ComputeSds of B images (encode, noise, UNet with CFG, gradient back to the images), end to end as
the caller sees it. Not a test: no assertions on speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.timing import wall_ms
from services.guidance import sds
from services.guidance.config import GuidanceConfig, PriorSpec
from services.guidance.priors.base import DiffusionPrior
from shared import guidance_api, logging as project_logging
from shared.cameras import orbit_camera
from shared.guidance_api import PriorKind, SdsRequest

FULL_SIZES = {"pixel": "if-i-xl", "latent": "sd21-base"}
KINDS = {"analytic": PriorKind.ANALYTIC, "pixel": PriorKind.PIXEL, "latent": PriorKind.LATENT}


@dataclass
class Row:
    prior: str
    model: str
    mode: str
    batch: int
    resolution: int
    median_ms: float
    min_ms: float
    device: str


def build_prior(kind: str, size: str, device: str, workdir: Path) -> tuple[DiffusionPrior, PriorSpec]:
    """The prior object for in-process/standalone runs, and a spec a Serve replica can rebuild it from."""
    if kind == "analytic":
        spec = PriorSpec(name="analytic", kind=PriorKind.ANALYTIC, device=device)
        from services.guidance.pool import PRIORS

        return PRIORS.build(spec, "default"), spec
    from services.guidance.priors import random_init

    model = size if size == "tiny" else FULL_SIZES[kind]
    if size == "tiny":  # saved and loaded back: the same path as a real checkpoint, and Serve replicas can load it
        save = random_init.save_random_pixel_prior if kind == "pixel" else random_init.save_random_latent_prior
        source = save(workdir / f"{kind}-{model}", model)
        spec = PriorSpec(name=kind, kind=KINDS[kind], source=str(source), device=device)
        from services.guidance.pool import PRIORS

        return PRIORS.build(spec, "default"), spec
    build = random_init.build_random_pixel_prior if kind == "pixel" else random_init.build_random_latent_prior
    prior = build(model, device=device, dtype="auto", name=kind)
    return prior, PriorSpec(name=kind, kind=KINDS[kind], source="random-weights", device=device)


def make_request(prior: DiffusionPrior, batch: int, seed: int) -> SdsRequest:
    resolution = prior.info.native_resolution
    cameras = [orbit_camera(360.0 * i / batch, 15.0, 2.0, size=resolution) for i in range(batch)]
    prompt = "a red torus" if prior.info.kind == PriorKind.ANALYTIC else "a DSLR photo of a red torus"
    return SdsRequest(
        job_id="bench",
        prior=prior.info.name,
        images=torch.rand(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed)),
        cameras=cameras,
        prompt=prompt,
        seed=seed,
        view_dependent_prompt=True,
    )


def time_calls(call, repeats: int) -> tuple[float, float]:
    # One warm-up call: first-call allocations, prompt-embedding cache.
    samples = wall_ms(call, repeats, warmup=1)
    return statistics.median(samples), min(samples)


def bench_inproc(prior, batch, repeats):
    request = make_request(prior, batch, seed=1)
    return time_calls(lambda: sds.compute_sds(prior, [request]), repeats)


def bench_grpc(stub, prior, batch, repeats, metadata=()):
    message = guidance_api.sds_request_to_proto(make_request(prior, batch, seed=1))
    return time_calls(lambda: stub.ComputeSds(message, timeout=600, metadata=metadata), repeats)


def run_standalone(prior, spec, batches, repeats):
    from magic3d.v1 import guidance_pb2_grpc

    from services.guidance import standalone
    from services.guidance.pool import PRIORS, PriorPool
    from shared.grpcio import insecure_channel

    config = GuidanceConfig(priors=[spec], port=0, batching={"wait_s": 0.0})
    pool = PriorPool(config, priors=PRIORS.with_builders({spec.kind: lambda s, c: prior}))
    running = standalone.start(config, pool=pool)
    channel = insecure_channel(running.address)
    try:
        stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
        return {b: bench_grpc(stub, prior, b, repeats) for b in batches}
    finally:
        channel.close()
        running.stop(grace=None)


def run_serve(prior, spec, batches, repeats):
    from magic3d.v1 import guidance_pb2_grpc

    from services.guidance import serve_app
    from shared.grpcio import insecure_channel

    app = serve_app.ServeAppSettings(name=f"bench-{spec.name}", max_batch_size=8, batch_wait_timeout_s=0.0)
    handle = serve_app.start_local([(GuidanceConfig(priors=[spec]), app)], grpc_port=0)
    channel = insecure_channel(handle.grpc_address)
    try:
        stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
        metadata = (("application", app.name),)
        return {b: bench_grpc(stub, prior, b, repeats, metadata) for b in batches}
    finally:
        channel.close()
        handle.shutdown()


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--priors", default="analytic,pixel,latent")
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--modes", default="inproc,standalone,serve")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    # On a shared 2-core machine, two OpenMP threads spin against other processes and run up to 10x slower
    # (measured); one thread gives stable per-core figures. 0 keeps torch's default.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    project_logging.configure("WARNING")  # per-request server logs would drown the table

    modes = args.modes.split(",")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as workdir:
        for kind in args.priors.split(","):
            prior, spec = build_prior(kind, args.size, args.device, Path(workdir))
            model = "analytic" if kind == "analytic" else (args.size if args.size == "tiny" else FULL_SIZES[kind])
            results: dict[str, dict[int, tuple[float, float]]] = {}
            if "inproc" in modes:
                results["in-process"] = {b: bench_inproc(prior, b, args.repeats) for b in args.batches}
            if "standalone" in modes:
                results["standalone gRPC"] = run_standalone(prior, spec, args.batches, args.repeats)
            if "serve" in modes:
                results["Ray Serve gRPC"] = run_serve(prior, spec, args.batches, args.repeats)
            for mode, by_batch in results.items():
                for batch, (median, best) in by_batch.items():
                    rows.append(
                        Row(kind, model, mode, batch, prior.info.native_resolution, median, best, args.device)
                    )
                    print(json.dumps(asdict(rows[-1])), flush=True)
            del prior
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\nmachine: {machine_description(args.device)}; torch {torch.__version__}; commit {commit or 'unknown'}")
    print("| prior | model | path | batch | resolution | median ms | min ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.prior} | {r.model} | {r.mode} | {r.batch} | {r.resolution} | {r.median_ms:.1f} | {r.min_ms:.1f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
