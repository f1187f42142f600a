"""SDS time per request at batch 1/4/8: in-process vs standalone gRPC vs Ray Serve.

CPU (tiny random-weight models, the analytic prior):
    python -m bench.guidance_sds --size tiny --priors analytic,pixel,latent --modes inproc,standalone,serve
GPU (full-size random-weight models of SD 2.1-base's and IF-I-XL's architectures, fp16):
    python -m bench.guidance_sds --size full --priors pixel,latent --modes inproc,standalone --device cuda
The analytic prior as issue 16's GPU fidelity run's fine stage calls it (512 pixels, the fidelity shapes in its set,
each camera carrying its background image as a scene sends it), e.g. on the device machine:
    bash bench/gpu/run.sh sds --priors analytic --modes inproc,standalone --batches 4 \
        --analytic-resolution 512 --analytic-shapes --backgrounds --device cuda

`--profile DIR` also writes torch.profiler's ops table of the in-process calls per prior and batch.
`--dtype float16` sends images, backgrounds and gradients as a GPU scene does (`guidance_transfer_dtype: auto`).
gRPC rows also give the server's own time (the response's `server_time_s`: queue and compute), so a call's hop is
its median minus that; `--codec` adds a table of the hop's serialisation steps, timed alone on this process.
Prints a markdown table and writes JSON (--json). Times are medians over --repeats calls after one warm-up;
a "call" is one ComputeSds of B images (encode, noise, UNet with CFG, gradient back to the images), end to end as
the caller sees it. Not a test: no assertions on speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
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
    server_ms: float | None = None  # gRPC paths: median of the responses' server_time_s


@dataclass
class CodecRow:
    """One serialisation step of a ComputeSds call, timed alone (median ms), and the bytes it handles."""

    prior: str
    batch: int
    dtype: str
    step: str
    median_ms: float
    mib: float


def build_prior(kind: str, size: str, device: str, workdir: Path, analytic_resolution: int = 64,
                analytic_shapes: bool = False) -> tuple[DiffusionPrior, PriorSpec]:
    """The prior object for in-process/standalone runs, and a spec a Serve replica can rebuild it from.

    `analytic_shapes` adds the fidelity shapes (shared.shape_set, vertex colours) to the analytic prior's set, as
    bench.fidelity does: each SDS call then renders those objects too (a Serve replica rebuilt from the spec lacks
    them)."""
    if kind == "analytic":
        spec = PriorSpec(name="analytic", kind=PriorKind.ANALYTIC, device=device, resolution=analytic_resolution)
        from services.guidance.pool import PRIORS
        from services.guidance.priors.analytic import ReferenceObject
        from shared.shape_set import shape_set

        prior = PRIORS.build(spec, "default")
        for shape in shape_set() if analytic_shapes else ():
            prior.add_object(ReferenceObject(shape.name, shape.mesh, None))
        return prior, spec
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


def make_request(prior: DiffusionPrior, batch: int, seed: int, backgrounds: bool = False,
                 dtype: torch.dtype = torch.float32) -> SdsRequest:
    """B random images at the prior's resolution from an orbit; `backgrounds`: each camera carries a random
    background image (H, W, 3), as a scene's step sends one to a prior that re-renders views. Images, backgrounds
    and the requested gradient are in `dtype` (a GPU scene's guidance traffic is float16)."""
    resolution = prior.info.native_resolution
    offset = 360.0 * ((seed * 0.618) % 1.0) / batch  # each seed its own azimuths (golden-ratio steps)
    cameras = [orbit_camera(360.0 * i / batch + (offset if backgrounds else 0.0), 15.0, 2.0, size=resolution)
               for i in range(batch)]
    if backgrounds:
        generator = torch.Generator().manual_seed(seed + 1)
        cameras = [dataclasses.replace(camera, background_image=torch.rand(resolution, resolution, 3,
                                                                           generator=generator).to(dtype))
                   for camera in cameras]
    prompt = "a red torus" if prior.info.kind == PriorKind.ANALYTIC else "a DSLR photo of a red torus"
    return SdsRequest(
        job_id="bench",
        prior=prior.info.name,
        images=torch.rand(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed)).to(dtype),
        cameras=cameras,
        prompt=prompt,
        seed=seed,
        view_dependent_prompt=True,
        grad_dtype=dtype,
    )


def time_calls(call, repeats: int) -> tuple[float, float]:
    # One warm-up call: first-call allocations, prompt-embedding cache.
    samples = wall_ms(call, repeats, warmup=1)
    return statistics.median(samples), min(samples)


def requests_for(prior, batch, repeats, backgrounds, first_seed=1, dtype=torch.float32):
    """The calls' requests, built before timing. With `backgrounds` (a scene's training steps) each call has its own
    cameras and backgrounds, as every training step does, so that the analytic prior's render cache cannot serve
    a repeated view; otherwise one request is repeated."""
    if not backgrounds:
        return itertools.repeat(make_request(prior, batch, seed=first_seed, dtype=dtype))
    return iter([make_request(prior, batch, seed=first_seed + call, backgrounds=True, dtype=dtype)
                 for call in range(repeats + 1)])


def bench_inproc(prior, batch, repeats, backgrounds=False, dtype=torch.float32):
    requests = requests_for(prior, batch, repeats, backgrounds, dtype=dtype)
    return time_calls(lambda: sds.compute_sds(prior, [next(requests)]), repeats)


def profile_inproc(prior, batch, repeats, backgrounds, device: str, out: Path, dtype=torch.float32) -> Path:
    """torch.profiler over `repeats` in-process calls (after one warm-up), the ops' table by self time (CUDA time
    on a GPU) written to `out`: where a call's time goes (renders, copies to the device, the posterior), which
    the timings alone do not say."""
    requests = requests_for(prior, batch, repeats, backgrounds, first_seed=1000, dtype=dtype)  # views new to the cache
    sds.compute_sds(prior, [next(requests)])
    cuda = device.startswith("cuda")
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(repeats):
            sds.compute_sds(prior, [next(requests)])
        if cuda:
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"{repeats} calls, batch {batch}\n" + profiler.key_averages().table(sort_by=sort, row_limit=30))
    return out


def bench_grpc(stub, prior, batch, repeats, metadata=(), backgrounds=False, dtype=torch.float32):
    """(median ms, min ms, median server ms). The proto messages are built before timing, as this bench always did:
    a call is the request's serialisation, the transport both ways, the server's decoding, work and encoding, and
    the response's parsing (not its decoding to tensors). The server ms are the responses' `server_time_s` (queue
    and compute in the engine), so median - server is the hop."""
    requests = requests_for(prior, batch, repeats, backgrounds, dtype=dtype)
    messages = iter([guidance_api.sds_request_to_proto(next(requests)) for _ in range(repeats + 1)])
    server_s: list[float] = []

    def call() -> None:
        server_s.append(stub.ComputeSds(next(messages), timeout=600, metadata=metadata).server_time_s)

    median, best = time_calls(call, repeats)
    return median, best, statistics.median(server_s[1:]) * 1e3  # the warm-up call's left out, as in the timings


def codec_rows(prior, kind: str, batch: int, repeats: int, backgrounds: bool, dtype: torch.dtype) -> list[CodecRow]:
    """The hop's serialisation steps on one request and its response, each timed alone (median of `repeats` after
    one warm-up): what a ComputeSds call spends outside the transport and the prior on this machine. On a GPU the
    response's encoding includes the gradient's copy to the host."""
    from magic3d.v1 import guidance_pb2

    request = make_request(prior, batch, seed=1, backgrounds=backgrounds, dtype=dtype)
    result = sds.compute_sds(prior, [request])[0]
    message = guidance_api.sds_request_to_proto(request)
    response = guidance_api.sds_response_to_proto(result, prior.info.name, "")
    wire, response_wire = message.SerializeToString(), response.SerializeToString()
    steps = [
        ("request: tensors to proto (client)", wire, lambda: guidance_api.sds_request_to_proto(request)),
        ("request: serialise (client)", wire, message.SerializeToString),
        ("request: parse (server)", wire, lambda: guidance_pb2.ComputeSdsRequest.FromString(wire)),
        ("request: proto to tensors (server)", wire, lambda: guidance_api.sds_request_from_proto(message)),
        ("response: tensors to proto (server)", response_wire,
         lambda: guidance_api.sds_response_to_proto(result, prior.info.name, "")),
        ("response: serialise (server)", response_wire, response.SerializeToString),
        ("response: parse (client)", response_wire, lambda: guidance_pb2.ComputeSdsResponse.FromString(response_wire)),
        ("response: proto to tensors (client)", response_wire, lambda: guidance_api.sds_result_from_proto(response)),
    ]
    name = str(dtype).removeprefix("torch.")
    return [CodecRow(kind, batch, name, step, statistics.median(wall_ms(fn, repeats, warmup=1)), len(data) / 2**20)
            for step, data, fn in steps]


def run_standalone(prior, spec, batches, repeats, backgrounds=False, dtype=torch.float32):
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
        return {b: bench_grpc(stub, prior, b, repeats, backgrounds=backgrounds, dtype=dtype) for b in batches}
    finally:
        channel.close()
        running.stop(grace=None)


def run_serve(prior, spec, batches, repeats, dtype=torch.float32):
    from magic3d.v1 import guidance_pb2_grpc

    from services.guidance import serve_app
    from shared.grpcio import insecure_channel

    app = serve_app.ServeAppSettings(name=f"bench-{spec.name}", max_batch_size=8, batch_wait_timeout_s=0.0)
    handle = serve_app.start_local([(GuidanceConfig(priors=[spec]), app)], grpc_port=0)
    channel = insecure_channel(handle.grpc_address)
    try:
        stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
        metadata = (("application", app.name),)
        return {b: bench_grpc(stub, prior, b, repeats, metadata, dtype=dtype) for b in batches}
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
    parser.add_argument("--analytic-resolution", type=int, default=64, help="the analytic prior's render size")
    parser.add_argument("--analytic-shapes", action="store_true", help="the fidelity shapes join its object set")
    parser.add_argument("--backgrounds", action="store_true", help="cameras carry background images")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="also profile the in-process calls: one ops table per prior and batch in DIR")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                        help="images, backgrounds and gradients on the wire (a GPU scene sends float16)")
    parser.add_argument("--codec", action="store_true", help="also time the hop's serialisation steps alone")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    project_logging.configure("WARNING")  # per-request server logs would drown the table

    modes = args.modes.split(",")
    rows: list[Row] = []
    codec: list[CodecRow] = []
    with tempfile.TemporaryDirectory() as workdir:
        for kind in args.priors.split(","):
            prior, spec = build_prior(kind, args.size, args.device, Path(workdir), args.analytic_resolution,
                                      args.analytic_shapes)
            model = "analytic" if kind == "analytic" else (args.size if args.size == "tiny" else FULL_SIZES[kind])
            results: dict[str, dict[int, tuple[float, ...]]] = {}  # (median, min[, server]) ms per batch
            if "inproc" in modes:
                results["in-process"] = {b: bench_inproc(prior, b, args.repeats, args.backgrounds, dtype)
                                         for b in args.batches}
                for batch in args.batches if args.profile else ():
                    profile_inproc(prior, batch, args.repeats, args.backgrounds, args.device,
                                   args.profile / f"profile-{kind}-b{batch}.txt", dtype)
            if "standalone" in modes:
                results["standalone gRPC"] = run_standalone(prior, spec, args.batches, args.repeats, args.backgrounds,
                                                            dtype)
            if "serve" in modes:
                results["Ray Serve gRPC"] = run_serve(prior, spec, args.batches, args.repeats, dtype)
            for mode, by_batch in results.items():
                for batch, (median, best, *server) in by_batch.items():
                    rows.append(Row(kind, model, mode, batch, prior.info.native_resolution, median, best, args.device,
                                    server[0] if server else None))
                    print(json.dumps(asdict(rows[-1])), flush=True)
            for batch in args.batches if args.codec else ():
                codec += codec_rows(prior, kind, batch, args.repeats, args.backgrounds, dtype)
            del prior
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\nmachine: {machine_description(args.device)}; torch {torch.__version__}; commit {commit or 'unknown'}")
    print(f"wire dtype {args.dtype}; backgrounds {'on' if args.backgrounds else 'off'}")
    print("| prior | model | path | batch | resolution | median ms | min ms | server ms | hop ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        server = "" if r.server_ms is None else f"{r.server_ms:.1f}"
        hop = "" if r.server_ms is None else f"{r.median_ms - r.server_ms:.1f}"
        print(f"| {r.prior} | {r.model} | {r.mode} | {r.batch} | {r.resolution} | {r.median_ms:.1f} | {r.min_ms:.1f} "
              f"| {server} | {hop} |")
    if codec:
        print("\n| prior | batch | dtype | step | median ms | MiB |\n|---|---|---|---|---|---|")
        for c in codec:
            print(f"| {c.prior} | {c.batch} | {c.dtype} | {c.step} | {c.median_ms:.1f} | {c.mib:.1f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
        if codec:
            args.json.with_suffix(".codec.json").write_text(json.dumps([asdict(c) for c in codec], indent=1))


if __name__ == "__main__":
    main()
