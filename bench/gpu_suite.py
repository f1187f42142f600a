"""The GPU benchmark suite: one command, a markdown table and JSON.

    bash bench/gpu/run.sh                              # on the GPU machine: wheels from .whl/, then this
    python -m bench.gpu_suite --out DIR [--sections hash_grid,coarse,fine] [--smoke] [--pipelined]

Sections:
* hash_grid: encoding forward+backward at 2^18..2^21 points, PyTorch reference against the Triton kernel.
* coarse: a step of the `magic3d` preset's coarse stage (64x64, 64 samples per ray, occupancy grid) at batch 4 and 8,
  guided by a random-weight prior of IF-I-XL's architecture; the field is first fitted to a torus with the analytic
  prior, so the step is timed on real geometry (occupancy pruning skips what it would in practice).
* serve: the coarse (batch 4) and fine steps with the guidance under Ray Serve (a local Ray on 127.0.0.1, one
  replica holding the GPU), called through Serve's gRPC ingress and through the deployment handle, beside the same
  steps through a standalone service in the same run; the table gives the Serve / standalone ratio per stage and
  route and splits the guidance phase into the server's time (request in to result out, `server_time_s`) and the
  hop (the rest: transport, Serve's proxy, serialisation). Not in the default sections (Ray's start costs ~20 s).
* magic123: a coarse and a fine step of the `magic123` preset (image to 3D) with an image of the red torus rendered
  here: the latent prior on SD 1.5's architecture (`random:sd15`) and Zero-1-to-3's (`random:zero123`) in one
  standalone guidance service, and the reference-view losses. Not in the default sections.
* fine: a step of the preset's fine stage (512x512, batch 4, 128-cell DMTet grid) on the exact SDF of the same torus,
  guided by a random-weight prior of SD 2.1-base's architecture.
Each step is run with the guidance in this process and through a standalone guidance service in its own process
(gRPC on 127.0.0.1; float16 traffic from a GPU scene), split into render, encoding, guidance, backward and optimiser,
with the peak GPU memory of the scene (this process) and of each guidance service (read from its /metrics). A GPU fine
scene sends latents by default (it runs the prior's VAE encoder itself, `guidance_input`, compiled,
`latent_encoder_compile`); --pipelined adds each path with one-step-stale pipelined SDS (`pipelined_guidance`,
"<path>, pipelined", and a pipelined / sequential table). The fine stage is also timed through the service with that encoder eager ("standalone
gRPC, encoder eager") and sending 512x512 images ("standalone gRPC, images sent"). `first_step_s` in the JSON is the
first step's time (compilation, graph captures). Before the in-process steps of a stage, its floor is timed alone on
the same device and printed at once (a crash in a later row keeps it) (issue 17's definition: the prior's UNet with CFG, plus for the fine stage the VAE encoder forward and
backward, `floor_ms`), and a table gives each row's step / floor.

--smoke runs the same code at CPU sizes with tiny random priors (CI runs it: the numbers mean nothing there).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from bench.fine_step import torus_sdf
from bench.hash_grid import step as hash_grid_step
from bench.hash_grid import timed
from services.guidance.config import GuidanceConfig, PriorSpec
from services.guidance.engine import GuidanceEngine
from services.orchestrator.presets import PresetBook, plan_job
from services.scene.coarse import CoarseStage
from services.scene.config import CoarseConfig, FineConfig, PriorTerm
from services.scene.field import HashGridConfig
from services.scene.field.encoding import make_encoding, triton_usable
from services.scene.fine import FineStage
from services.scene.guidance import InProcessGuidance
from services.scene.messages import coarse_config_from_proto, fine_config_from_proto
from shared import logging as project_logging
from shared.grpcio import free_port
from shared.guidance_api import PriorKind
from shared.guidance_client import GuidanceClient
from shared.registry import Registry
from shared.schedules import Schedule

PRESETS = Path(__file__).resolve().parents[1] / "deploy" / "config" / "presets.yaml"
PROMPT = "a red torus"


@dataclasses.dataclass(frozen=True)
class SuiteSettings:
    device: str
    pixel_source: str
    latent_source: str
    latent_resolution: int | None  # None: the prior's native 512
    magic123_latent_source: str
    zero123_source: str
    hash_points: tuple[int, ...]
    hash_grid: HashGridConfig
    coarse_batches: tuple[int, ...]
    coarse_overrides: dict  # on top of the `magic3d` preset's coarse stage
    fine_overrides: dict  # on top of its fine stage
    fit_steps: int  # analytic-prior steps that give the coarse field its torus
    warmup_steps: int
    timed_steps: int
    profiled_steps: int = 5  # steps under torch.profiler for the encoding's share (its key_averages is slow on CPU)
    # The GPU the standalone guidance services use (CUDA_VISIBLE_DEVICES of their process); None: the scene's.
    # On a 2-GPU machine, 1 puts guidance and scene on separate GPUs, as a deployment does.
    guidance_gpu: int | None = None


GPU = SuiteSettings(
    device="cuda",
    pixel_source="random:if-i-xl",
    latent_source="random:sd21-base",
    latent_resolution=None,
    magic123_latent_source="random:sd15",
    zero123_source="random:zero123",
    hash_points=(1 << 18, 1 << 19, 1 << 20, 1 << 21),
    hash_grid=HashGridConfig(n_levels=16, log2_hashmap_size=19),
    coarse_batches=(4, 8),
    coarse_overrides={},
    fine_overrides={},
    fit_steps=200,
    warmup_steps=5,
    timed_steps=20,
)

SMOKE = SuiteSettings(
    device="cpu",
    pixel_source="random:tiny",
    latent_source="random:tiny",
    latent_resolution=64,
    magic123_latent_source="random:tiny",
    zero123_source="random:tiny",
    hash_points=(1 << 10,),
    hash_grid=HashGridConfig(n_levels=4, log2_hashmap_size=12),
    coarse_batches=(2,),
    coarse_overrides={"resolution": 32, "batch_size": 2},
    # "latents" is what "auto" gives a GPU scene: CI then runs the latents contract across processes.
    fine_overrides={"resolution": 64, "batch_size": 2, "guidance_input": "latents"},
    fit_steps=2,
    warmup_steps=1,
    timed_steps=2,
    profiled_steps=1,
)


# ------------------------------------------------------------------------------------------------- hash grid
def bench_hash_grid(settings: SuiteSettings) -> list[dict]:
    device = torch.device(settings.device)
    backends = ["torch"] + (["triton"] if triton_usable() else [])
    grids = {name: make_encoding(settings.hash_grid, name).to(device) for name in backends}
    if "triton" in grids:  # the same table: the two backends must agree, not only be fast
        grids["triton"].load_state_dict(grids["torch"].state_dict())
    rows = []
    for points in settings.hash_points:
        generator = torch.Generator(device=device).manual_seed(points)
        x = torch.rand(points, 3, device=device, generator=generator)
        upstream = torch.randn(points, settings.hash_grid.output_dim, device=device, generator=generator)
        row: dict = {"points": points}
        outputs = {}
        for name, grid in grids.items():
            with torch.no_grad():
                outputs[name] = grid(x)
            row[f"{name}_ms"] = timed(hash_grid_step(grid, x, upstream), 10, device)
        if "triton" in outputs:
            row["max_abs_diff"] = float((outputs["triton"] - outputs["torch"]).abs().max())
            row["speedup"] = row["torch_ms"] / row["triton_ms"]
        rows.append(row)
        print(json.dumps({"hash_grid": row}), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- guidance
def guidance_config(settings: SuiteSettings, kind: str, resolution: int) -> GuidanceConfig:
    if kind == "analytic":
        spec = PriorSpec(name="analytic", kind=PriorKind.ANALYTIC, resolution=resolution)
    elif kind == "pixel":
        spec = PriorSpec(name="pixel", kind=PriorKind.PIXEL, source=settings.pixel_source, device=settings.device)
    else:
        spec = PriorSpec(
            name="latent", kind=PriorKind.LATENT, source=settings.latent_source, device=settings.device,
            resolution=settings.latent_resolution,
        )
    return GuidanceConfig(priors=[spec], batching={"wait_s": 0.0}, port=0)


@contextlib.contextmanager
def standalone_guidance(config: GuidanceConfig, workdir: Path, gpu: int | None = None, timeout_s: float = 600.0):
    """A guidance server in its own process (as deployed: its own CUDA context), on GPU `gpu` if given; yields
    (client, metrics_url)."""
    port, metrics_port = free_port(), free_port()
    path = workdir / f"guidance-{config.priors[0].name}.yaml"
    path.write_text(json.dumps(config.model_copy(update={"metrics_port": metrics_port}).model_dump(mode="json")))
    log = open(workdir / f"guidance-{config.priors[0].name}.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.guidance.standalone", "--config", str(path), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, **({"CUDA_VISIBLE_DEVICES": str(gpu)} if gpu is not None else {})},
    )
    name = config.priors[0].name
    # A short outage window while waiting for the start, so that a server that died is seen at once.
    route = {"kind": "standalone", "address": f"127.0.0.1:{port}"}
    registry = {"priors": {p.name: dict(route) for p in config.priors}, "client": {"outage_window_s": 2.0}}
    client = GuidanceClient(Registry.model_validate(registry))
    try:
        deadline = time.monotonic() + timeout_s
        while True:  # the server answers once its prior is built (warm start)
            if process.poll() is not None:
                log.flush()
                tail = Path(log.name).read_text()[-4000:]
                raise RuntimeError(f"guidance server exited with {process.returncode}; its log ends:\n{tail}")
            try:
                client.prior_info(name, timeout_s=5.0)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        yield client, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@contextlib.contextmanager
def serve_guidance(config: GuidanceConfig):
    """The guidance tier as deployed on Kubernetes: one Ray Serve application on a local Ray pinned to 127.0.0.1;
    yields two clients of it: `grpc` through Serve's gRPC proxy (a `serve` registry entry, callers outside the Ray
    cluster) and `handle` through the deployment handle (a `serve-handle` entry, callers inside it)."""
    from services.guidance.serve_app import ServeAppSettings, start_local

    name = config.priors[0].name
    gpus = 1 if torch.cuda.is_available() else 0
    app = ServeAppSettings(name=name, route_prefix=f"/{name}", num_gpus=gpus, num_cpus=1)
    local = start_local([(config, app)], num_gpus=gpus, request_timeout_s=600.0)
    routes = {"grpc": {"kind": "serve", "address": local.grpc_address, "application": name},
              "handle": {"kind": "serve-handle", "application": name}}
    clients = {path: GuidanceClient(Registry.model_validate({"priors": {name: route}})) for path, route in routes.items()}
    try:
        yield clients
    finally:
        for client in clients.values():
            client.close()
        local.shutdown()


def scrape_metric(metrics_url: str, name: str) -> float | None:
    """The first sample of `name` on a service's /metrics (None if it has none)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return None


def scrape_gpu_peak(metrics_url: str) -> int | None:
    """Peak bytes held by live tensors in a service's process, from its /metrics (None without CUDA)."""
    value = scrape_metric(metrics_url, "magic3d_gpu_memory_peak_allocated_bytes")
    return None if value is None else int(value)


# ------------------------------------------------------------------------------------------------- stages
def _replace(config, **changes):
    """A changed copy of a pydantic model or a dataclass."""
    return config.model_copy(update=changes) if hasattr(config, "model_copy") else dataclasses.replace(config, **changes)


def preset_configs(settings: SuiteSettings) -> tuple[CoarseConfig, FineConfig]:
    """The `magic3d` preset's stage configs as the scene service would parse them, with the suite's overrides."""
    plan = plan_job(PresetBook.load(PRESETS), "magic3d", [], PROMPT, "", 0)
    coarse = coarse_config_from_proto(plan.stage("coarse").config, CoarseConfig(prompt=PROMPT))
    fine = fine_config_from_proto(plan.stage("fine").config, FineConfig(prompt=PROMPT))
    backend = "auto" if settings.device != "cpu" else "torch"
    coarse = _replace(coarse, field=_replace(coarse.field, backend=backend), **settings.coarse_overrides)
    fine = _replace(fine, field=_replace(fine.field, backend=backend), **settings.fine_overrides)
    if settings.device == "cpu":  # the smoke run: a small table and grid
        coarse = _replace(
            coarse,
            field=_replace(coarse.field, encoding=settings.hash_grid),
            renderer=_replace(coarse.renderer, num_samples_per_ray=16),
            occupancy=_replace(coarse.occupancy, resolution=16),
        )
        fine = _replace(fine, field=_replace(fine.field, encoding=settings.hash_grid), dmtet=_replace(fine.dmtet, grid_cells=16))
    return coarse, fine


def fitted_coarse_state(config: CoarseConfig, settings: SuiteSettings) -> dict:
    """A coarse field fitted to the torus by the analytic prior: real geometry for the timed steps."""
    fit = _replace(
        config,
        priors=(PriorTerm(prior="analytic"),),
        batch_size=4,
        # The cpu-demo preset's weights, with which the analytic prior fits the torus.
        loss_weights={
            **config.loss_weights, "orientation": Schedule.linear(0, 1.0, 1000, 100.0), "sparsity": Schedule.constant(0.1)
        },
    )
    guidance = InProcessGuidance(GuidanceEngine(guidance_config(settings, "analytic", config.resolution)))
    try:
        stage = CoarseStage(fit, guidance, "bench-fit", device=settings.device)
        for _ in range(settings.fit_steps):
            stage.step()
        occupied = float(stage.occupancy.occupancy.float().mean())
        print(json.dumps({"fit": {"steps": settings.fit_steps, "occupied_fraction": occupied}}), flush=True)
        return {k: v for k, v in stage.state_dict().items() if k in ("field", "background", "occupancy")}
    finally:
        guidance.close()


def make_stage(stage: str, config, guidance, settings: SuiteSettings, fitted: dict | None):
    if stage == "coarse":
        scene = CoarseStage(config, guidance, "bench", device=settings.device)
        scene.field.load_state_dict(fitted["field"])
        scene.background.load_state_dict(fitted["background"])
        scene.occupancy.load_state_dict(fitted["occupancy"])
        return scene
    scene = FineStage(config, guidance, "bench", settings.device)
    with torch.no_grad():
        scene.geometry.sdf.copy_(torus_sdf(scene.geometry.rest_positions))
    return scene


ENCODING_LABEL = "field.encoding"
ENCODING_BACKWARD_KERNELS = ("_encode_bwd", "_input_vjp_bwd")  # Triton kernel names (services/scene/field)


def encoding_ms(profiler, steps: int, on_gpu: bool) -> dict[str, float | None]:
    """Hash-grid encoding time per step: kernels under the forward's profiler range, and the Triton backward kernels
    by name (the PyTorch backend's backward is generic autograd kernels, not attributable: None)."""
    forward = backward = 0.0
    found_backward = False
    for event in profiler.key_averages():
        time_us = event.device_time_total if on_gpu else event.cpu_time_total
        if event.key == ENCODING_LABEL:
            forward += time_us
        elif on_gpu and any(name in event.key for name in ENCODING_BACKWARD_KERNELS):
            backward += event.device_time_total
            found_backward = True
    return {"forward": forward / 1e3 / steps, "backward": backward / 1e3 / steps if found_backward else None}


def time_steps(scene, settings: SuiteSettings) -> dict:
    """Median phase times over the timed steps, the encoding's share, and this process's peak GPU memory."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = scene.device.type == "cuda"
    start = time.perf_counter()
    # prefetch: a pipelined stage (`pipelined_guidance`) renders the next step during this one's guidance, as
    # RunSteps does within a chunk; a sequential stage ignores it. Whatever is in flight at the end is discarded.
    scene.step(prefetch=True)  # the first step pays one-time costs: a compiled encoder's compilation, graph captures
    if on_gpu:
        torch.cuda.synchronize()
    first_step_s = time.perf_counter() - start
    for _ in range(settings.warmup_steps - 1):
        scene.step(prefetch=True)
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reports, totals = [], []
    for _ in range(settings.timed_steps):
        start = time.perf_counter()
        reports.append(scene.step(prefetch=True))
        totals.append(time.perf_counter() - start)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    profiled = min(settings.profiled_steps, settings.timed_steps)
    with profile(activities=activities) as profiler:
        for _ in range(profiled):
            scene.step(prefetch=True)
    scene.discard_pending()
    phases = {k: 1e3 * statistics.median(r.phase_seconds.get(k, 0.0) for r in reports) for k in reports[0].phase_seconds}
    return {
        "step_ms": 1e3 * statistics.median(totals),
        "first_step_s": first_step_s,
        "phases_ms": phases,
        "encoding_ms": encoding_ms(profiler, profiled, on_gpu),
        "scene_peak_bytes": torch.cuda.max_memory_allocated() if on_gpu else None,
    }


def bench_stage(stage: str, batches: tuple[int, ...], config, settings: SuiteSettings, fitted: dict | None,
                workdir: Path, pipelined: bool = False) -> list[dict]:
    """The same steps with the guidance behind gRPC in its own process, then in this process (each prior built once
    per path: building IF-I-XL takes longer than timing it). `pipelined`: each path also with one-step-stale
    pipelined SDS (`pipelined_guidance`), rows "<path>, pipelined"."""
    piped = _replace(config, pipelined_guidance=True)
    kind = "pixel" if stage == "coarse" else "latent"
    gconfig = guidance_config(settings, kind, config.resolution)
    rows = []

    def run(guidance, path: str, extra=dict, stage_config=config) -> None:
        for batch in batches:
            scene = make_stage(stage, _replace(stage_config, batch_size=batch), guidance, settings, fitted)
            row = time_steps(scene, settings)
            del scene
            rows.append({"stage": stage, "batch": batch, "path": path, **row, **extra()})
            print(json.dumps(rows[-1]), flush=True)

    with standalone_guidance(gconfig, workdir, settings.guidance_gpu) as (client, metrics_url):
        peak = lambda: {"guidance_peak_bytes": scrape_gpu_peak(metrics_url)}  # noqa: E731
        run(client, "standalone gRPC", peak)  # the default guidance_input: latents from a GPU scene
        if pipelined:
            run(client, "standalone gRPC, pipelined", peak, piped)
        if kind == "latent":  # what the defaults save: the encoder left eager; 512x512 images sent instead
            run(client, "standalone gRPC, encoder eager", peak, _replace(config, latent_encoder_compile="off"))
            run(client, "standalone gRPC, images sent", peak, _replace(config, guidance_input="images"))
    engine = GuidanceEngine(gconfig)
    guidance = InProcessGuidance(engine)
    try:
        # The floor goes first and is printed at once: a crash in a later row (one fine in-process run segfaulted
        # on the H100) must not take the floor with it.
        floors = {batch: floor_ms(engine.prior(gconfig.priors[0].name), kind, batch, config.resolution, settings)
                  for batch in batches}
        for batch, floor in floors.items():
            print(json.dumps({"floor": {"stage": stage, "batch": batch, **floor}}), flush=True)
        run(guidance, "in-process")
        if pipelined:
            run(guidance, "in-process, pipelined", stage_config=piped)
        for row in rows:
            row["floor"] = floors[row["batch"]]
    finally:
        guidance.close()
        del guidance
        if settings.device != "cpu":
            torch.cuda.empty_cache()
    return rows


def floor_ms(prior, kind: str, batch: int, image_side: int, settings: SuiteSettings) -> dict[str, float]:
    """A step's floor, timed alone on the prior's device right after the steps: the prior's UNet with CFG (2B rows,
    no grad) and, for a latent prior, its VAE encoder forward + backward at the scene's resolution (the chain rule
    from latents to pixels that a fine step needs). Medians; `floor_ms` is their sum."""
    from bench.prior_speed import Case, component_timers
    from bench.timing import wall_ms

    timers = component_timers(prior, Case(kind, "", batch, image_side))
    parts = ("unet_cfg", "vae_forward_backward") if kind == "latent" else ("unet_cfg",)
    repeats = max(settings.timed_steps, 3)
    floor = {f"{name}_ms": statistics.median(wall_ms(timers[name], repeats, settings.warmup_steps, prior.device))
             for name in parts}
    return {**floor, "floor_ms": sum(floor.values())}


class ServerTimedGuidance:
    """A guidance client that keeps each SDS answer's `server_time_s` (request in to result out, on the server), so
    that a step's guidance phase splits into the server's time and the hop (transport, proxy, serialisation)."""

    def __init__(self, client) -> None:
        self.client = client
        self.server_seconds: list[float] = []

    def compute_sds(self, *args, **kwargs):
        result = self.client.compute_sds(*args, **kwargs)
        self.server_seconds.append(result.server_time_s)
        return result

    def __getattr__(self, name: str):
        return getattr(self.client, name)


def time_steps_split(stage: str, config, client, settings: SuiteSettings, fitted: dict) -> dict:
    """`time_steps`, plus the median server-side guidance time and the hop (guidance phase less server time)."""
    timed = ServerTimedGuidance(client)
    row = time_steps(make_stage(stage, config, timed, settings, fitted), settings)
    # One SDS call per step: warm-up steps, then the timed ones, then the profiled ones.
    timed_calls = timed.server_seconds[settings.warmup_steps : settings.warmup_steps + settings.timed_steps]
    server_ms = 1e3 * statistics.median(timed_calls or timed.server_seconds)
    return {**row, "guidance_server_ms": server_ms, "guidance_hop_ms": row["phases_ms"].get("guidance", 0.0) - server_ms}


def bench_serve(coarse, fine, settings: SuiteSettings, fitted: dict, workdir: Path) -> list[dict]:
    """Coarse (batch 4) and fine steps through a standalone service, Serve's gRPC ingress and Serve's deployment
    handle, in one run so that the ratios compare like with like."""
    rows = []
    for stage, config in (("coarse", _replace(coarse, batch_size=settings.coarse_batches[0])), ("fine", fine)):
        kind = "pixel" if stage == "coarse" else "latent"
        gconfig = guidance_config(settings, kind, config.resolution)
        with standalone_guidance(gconfig, workdir, settings.guidance_gpu) as (client, _):
            rows.append({"stage": stage, "batch": config.batch_size, "path": "standalone gRPC",
                         **time_steps_split(stage, config, client, settings, fitted)})
            print(json.dumps(rows[-1]), flush=True)
        with serve_guidance(gconfig) as clients:
            for route, path in (("grpc", "Ray Serve gRPC"), ("handle", "Ray Serve handle")):
                rows.append({"stage": stage, "batch": config.batch_size, "path": path,
                             **time_steps_split(stage, config, clients[route], settings, fitted)})
                print(json.dumps(rows[-1]), flush=True)
        if settings.device != "cpu":
            torch.cuda.empty_cache()
    return rows


def reference_rgba(size: int, elevation_deg: float, distance: float, fovy_deg: float) -> np.ndarray:
    """(size, size, 4) uint8: a red torus at the reference camera, alpha its coverage (what a client would send)."""
    from shared import cameras as camera_proto
    from shared.cameras import Shading
    from shared.image_input import reference_camera
    from shared.meshes import torus
    from shared.rasterize import make_rasterizer
    from shared.render import render_mesh

    camera = camera_proto.from_proto(reference_camera(elevation_deg, distance, fovy_deg, size))
    black = dataclasses.replace(camera, background_color=(0.0, 0.0, 0.0), shading=Shading.ALBEDO)
    rasterizer = make_rasterizer("torch")
    with torch.no_grad():
        color = render_mesh(torus(), [black], rasterizer, albedo=(0.8, 0.1, 0.1), resolution=size)[0]
        mask = render_mesh(torus(), [black], rasterizer, albedo=(1.0, 1.0, 1.0), resolution=size)[0, :1]
    rgba = torch.cat([color, mask]).permute(1, 2, 0).clamp(0, 1)
    return (rgba.numpy() * 255.0 + 0.5).astype(np.uint8)


def magic123_configs(settings: SuiteSettings) -> tuple[CoarseConfig, FineConfig]:
    """The `magic123` preset's stages for an image of the torus with the prompt, as the scene service parses them."""
    from magic3d.v1 import orchestrator_pb2

    from services.orchestrator.image_jobs import plan_image_job
    from shared.image_input import array_to_proto

    image = orchestrator_pb2.ImageInput(image=array_to_proto(reference_rgba(256, 0.0, 1.8, 40.0)), prompt=PROMPT)
    plan = plan_image_job(plan_job(PresetBook.load(PRESETS), "magic123", [], PROMPT, "", 0), image, [])
    coarse = coarse_config_from_proto(plan.stage("coarse").config, CoarseConfig(prompt=PROMPT))
    fine = fine_config_from_proto(plan.stage("fine").config, FineConfig(prompt=PROMPT))
    backend = "auto" if settings.device != "cpu" else "torch"
    coarse = _replace(coarse, field=_replace(coarse.field, backend=backend))
    fine = _replace(fine, field=_replace(fine.field, backend=backend))
    if settings.device == "cpu":  # the smoke run: small renders, table and grid
        coarse = _replace(coarse, resolution=32, field=_replace(coarse.field, encoding=settings.hash_grid),
                          renderer=_replace(coarse.renderer, num_samples_per_ray=16),
                          occupancy=_replace(coarse.occupancy, resolution=16))
        fine = _replace(fine, resolution=64, field=_replace(fine.field, encoding=settings.hash_grid),
                        dmtet=_replace(fine.dmtet, grid_cells=16))
    return coarse, fine


def bench_magic123(settings: SuiteSettings, workdir: Path) -> list[dict]:
    """A step of each Magic123 stage, both priors behind one standalone guidance service (as text jobs are timed)."""
    coarse, fine = magic123_configs(settings)
    specs = [
        PriorSpec(name="latent", kind=PriorKind.LATENT, source=settings.magic123_latent_source, device=settings.device,
                  resolution=settings.latent_resolution),
        PriorSpec(name="zero123", kind=PriorKind.VIEW_CONDITIONED, source=settings.zero123_source,
                  device=settings.device),
    ]
    gconfig = GuidanceConfig(priors=specs, batching={"wait_s": 0.0}, port=0)
    fitted = fitted_coarse_state(coarse, settings)
    rows = []
    with standalone_guidance(gconfig, workdir, settings.guidance_gpu) as (client, metrics_url):
        for stage, config in (("coarse", coarse), ("fine", fine)):
            scene = make_stage(stage, config, client, settings, fitted if stage == "coarse" else None)
            rows.append({"stage": f"magic123 {stage}", "batch": config.batch_size, "path": "standalone gRPC",
                         **time_steps(scene, settings), "guidance_peak_bytes": scrape_gpu_peak(metrics_url)})
            del scene
            print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_concurrent(config, settings: SuiteSettings, fitted: dict, workdir: Path, jobs: int = 2) -> list[dict]:
    """Overlap on one GPU: 1 then `jobs` coarse jobs at once against one guidance service with its default dynamic
    batching (requests arriving within 5 ms share one denoiser call). Each job steps in its own thread."""
    import threading

    gconfig = guidance_config(settings, "pixel", config.resolution)
    gconfig = gconfig.model_copy(update={"batching": type(gconfig.batching)()})
    rows = []
    with standalone_guidance(gconfig, workdir, settings.guidance_gpu) as (client, metrics_url):
        for count in (1, jobs):
            scenes = [make_stage("coarse", config, client, settings, fitted) for _ in range(count)]
            times: list[list[float]] = [[] for _ in scenes]

            def run(scene, job_times: list[float]) -> None:
                for step in range(settings.warmup_steps + settings.timed_steps):
                    start = time.perf_counter()
                    scene.step()
                    if step >= settings.warmup_steps:
                        job_times.append(time.perf_counter() - start)

            calls_before = scrape_metric(metrics_url, "magic3d_guidance_denoiser_calls_total") or 0.0
            images_before = scrape_metric(metrics_url, "magic3d_guidance_images_total") or 0.0
            began = time.perf_counter()
            threads = [threading.Thread(target=run, args=(scene, job_times)) for scene, job_times in zip(scenes, times)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - began
            steps = count * (settings.warmup_steps + settings.timed_steps)
            rows.append({
                "stage": "coarse", "batch": config.batch_size, "jobs": count,
                "step_ms_per_job": 1e3 * statistics.median(t for job in times for t in job),
                "steps_per_s": steps / wall,
                "images_per_denoiser_call": (scrape_metric(metrics_url, "magic3d_guidance_images_total") - images_before)
                / (scrape_metric(metrics_url, "magic3d_guidance_denoiser_calls_total") - calls_before),
            })
            print(json.dumps({"concurrent": rows[-1]}), flush=True)
            del scenes
    return rows


PHASE_GROUPS = {
    "render": ("render", "reference", "marching_tets", "rasterize", "texture", "shade"),  # reference: the image view
    "guidance": ("guidance",),
    "backward": ("backward",),
    "optimizer": ("optimizer",),
}


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def markdown(results: dict) -> str:
    lines = []
    if results.get("hash_grid"):
        lines += ["| points | PyTorch fwd+bwd ms | Triton fwd+bwd ms | speed-up | max abs diff |", "|---:|---:|---:|---:|---:|"]
        for r in results["hash_grid"]:
            lines.append(
                f"| 2^{r['points'].bit_length() - 1} | {_ms(r.get('torch_ms'))} | {_ms(r.get('triton_ms'))} | "
                f"{r['speedup']:.1f}x | {r['max_abs_diff']:.1e} |" if "speedup" in r else
                f"| 2^{r['points'].bit_length() - 1} | {_ms(r['torch_ms'])} | n/a | n/a | n/a |"
            )
        lines.append("")
    if results.get("steps") or results.get("serve") or results.get("magic123"):
        lines += [
            "| stage | batch | guidance path | render | (encoding fwd / bwd) | guidance | backward | optimiser | step ms"
            " | first step s | scene process peak MiB | guidance process peak MiB |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results.get("steps", []) + results.get("serve", []) + results.get("magic123", []):
            groups = {g: sum(r["phases_ms"].get(k, 0.0) for k in keys) for g, keys in PHASE_GROUPS.items()}
            enc = r["encoding_ms"]
            lines.append(
                f"| {r['stage']} | {r['batch']} | {r['path']} | {groups['render']:.1f} | {_ms(enc['forward'])} / "
                f"{_ms(enc['backward'])} | {groups['guidance']:.1f} | {groups['backward']:.1f} | "
                f"{groups['optimizer']:.1f} | **{r['step_ms']:.1f}** | {r['first_step_s']:.1f} | "
                f"{_mib(r['scene_peak_bytes'])} | "
                f"{_mib(r.get('guidance_peak_bytes'))} |"
            )
        lines += ["", "| stage | batch | standalone / in-process step time |", "|---|---:|---:|"]
        by_key = {(r["stage"], r["batch"], r["path"]): r["step_ms"] for r in results["steps"]}
        for (stage, batch, path), value in by_key.items():
            if path == "standalone gRPC" and (stage, batch, "in-process") in by_key:
                lines.append(f"| {stage} | {batch} | {value / by_key[(stage, batch, 'in-process')]:.3f} |")
        floored = [r for r in results["steps"] if r.get("floor")]
        if floored:
            lines += ["", "| stage | batch | guidance path | UNet with CFG ms | VAE encoder fwd+bwd ms | floor ms | "
                      "step ms | step / floor |", "|---|---:|---|---:|---:|---:|---:|---:|"]
            for r in floored:
                floor = r["floor"]
                lines.append(f"| {r['stage']} | {r['batch']} | {r['path']} | {floor['unet_cfg_ms']:.1f} | "
                             f"{_ms(floor.get('vae_forward_backward_ms'))} | {floor['floor_ms']:.1f} | "
                             f"{r['step_ms']:.1f} | {r['step_ms'] / floor['floor_ms']:.2f} |")
        piped = [(key, value) for key, value in by_key.items() if key[2].endswith(", pipelined")]
        if piped:
            lines += ["", "| stage | batch | guidance path | sequential step ms | pipelined step ms | pipelined / "
                      "sequential |", "|---|---:|---|---:|---:|---:|"]
            for (stage, batch, path), value in piped:
                base = by_key.get((stage, batch, path.removesuffix(", pipelined")))
                if base:
                    lines.append(f"| {stage} | {batch} | {path.removesuffix(', pipelined')} | {base:.1f} | "
                                 f"{value:.1f} | {value / base:.3f} |")
    if results.get("serve"):
        lines += ["", "| stage | batch | path | standalone step ms | Ray Serve step ms | Serve / standalone | "
                  "guidance server ms (standalone / Serve) | guidance hop ms (standalone / Serve) |",
                  "|---|---:|---|---:|---:|---:|---:|---:|"]
        by_key = {(r["stage"], r["batch"], r["path"]): r for r in results["serve"]}
        for (stage, batch, path), served in by_key.items():
            if path.startswith("Ray Serve") and (stage, batch, "standalone gRPC") in by_key:
                alone = by_key[(stage, batch, "standalone gRPC")]
                lines.append(
                    f"| {stage} | {batch} | {path} | {alone['step_ms']:.1f} | {served['step_ms']:.1f} | "
                    f"{served['step_ms'] / alone['step_ms']:.3f} | "
                    f"{alone['guidance_server_ms']:.1f} / {served['guidance_server_ms']:.1f} | "
                    f"{alone['guidance_hop_ms']:.1f} / {served['guidance_hop_ms']:.1f} |"
                )
    if results.get("concurrent"):
        lines += ["", "| stage | batch | jobs at once | step ms per job | steps/s, all jobs | images per denoiser call |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in results["concurrent"]:
            lines.append(f"| {r['stage']} | {r['batch']} | {r['jobs']} | {r['step_ms_per_job']:.1f} | "
                         f"{r['steps_per_s']:.2f} | {r['images_per_denoiser_call']:.1f} |")
    return "\n".join(lines)


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument("--sections", default="hash_grid,coarse,fine")
    parser.add_argument("--smoke", action="store_true", help="CPU sizes, tiny priors: checks the suite runs")
    parser.add_argument("--guidance-gpu", type=int, default=None, help="GPU index for the guidance services")
    parser.add_argument("--pipelined", action="store_true",
                        help="coarse and fine also with one-step-stale pipelined SDS (rows '<path>, pipelined')")
    parser.add_argument("--coarse-batches", default=None, help="e.g. 4 (default: 4,8 on the GPU)")
    parser.add_argument("--no-concurrent", action="store_true", help="skip the two-jobs-at-once coarse rows")
    args = parser.parse_args(argv)
    settings = dataclasses.replace(SMOKE if args.smoke else GPU, guidance_gpu=args.guidance_gpu)
    if args.coarse_batches:
        settings = dataclasses.replace(settings, coarse_batches=tuple(int(b) for b in args.coarse_batches.split(",")))
    if settings.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on the GPU machine, or pass --smoke")
    project_logging.configure("WARNING")  # per-request service logs would drown the table
    sections = args.sections.split(",")
    # The GPU machine gets a copy of the working tree whose .git may lag: the caller names the commit there.
    commit = os.environ.get("MAGIC3D_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    results: dict = {"machine": machine(), "commit": commit or "unknown",
                     "date": time.strftime("%Y-%m-%d"), "settings": dataclasses.asdict(settings), "steps": []}
    if "hash_grid" in sections:
        results["hash_grid"] = bench_hash_grid(settings)
    coarse, fine = preset_configs(settings)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if "coarse" in sections:
            fitted = fitted_coarse_state(coarse, settings)
            results["steps"] += bench_stage("coarse", settings.coarse_batches, coarse, settings, fitted, workdir,
                                            args.pipelined)
            if not args.no_concurrent:
                results["concurrent"] = bench_concurrent(coarse, settings, fitted, workdir)
        if "fine" in sections:
            results["steps"] += bench_stage("fine", (fine.batch_size,), fine, settings, None, workdir, args.pipelined)
        if "magic123" in sections:
            results["magic123"] = bench_magic123(settings, workdir)
        if "serve" in sections:
            fitted = fitted if "coarse" in sections else fitted_coarse_state(coarse, settings)
            results["serve"] = bench_serve(coarse, fine, settings, fitted, workdir)
    table = markdown(results)
    print(f"\nmachine: {results['machine']}; commit {results['commit']}; {results['date']}\n\n{table}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_suite.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out / "gpu_suite.md").write_text(table + "\n")
    return results


if __name__ == "__main__":
    main()
