"""A job through Generate on the whole local stack, timed from the client's side.

    python -m bench.generate_e2e --out out/bench [--preset magic3d] [--max-seconds 540] [--guidance standalone|serve]
    python -m bench.generate_e2e --smoke --max-seconds 20 --out DIR     # CPU, tiny random priors: checks the runner
    bash bench/gpu/run.sh generate [args]                                # the same on the GPU machine

The stack is `magic3d serve`'s (services/local_stack.py) on 127.0.0.1: the orchestrator, one scene service and the
guidance tier (standalone gRPC server in this process, or Ray Serve), with a guidance config naming `pixel` and
`latent` priors on random weights of the real architectures (IF-I-XL, SD 2.1 base; under --smoke tiny ones on CPU
and a shrunk copy of the preset). Measured: submit -> accepted (first event), -> first progress, -> first preview,
each stage's median step time from the progress events (seconds between events over steps between them), each
stage's set-up (from the previous stage's last event, or from submit, to its first progress, less the steps done by
then: scene creation, the fine stage's DMTet conversion, first-call compiles). With --max-seconds the job is
cancelled then (a device command may run 10 minutes) and the full schedule's time is projected: each stage's
set-up + its steps x its median step time, labelled `projected` (the export is not in it); a job that finishes in time gets its
`measured` end-to-end time. --steps coarse=N shortens the run (to reach the fine stage) without changing the
projection, which uses the preset's steps.

--warm-up coarse=N,fine=M first runs a short job on the same stack (untimed, summarised under "warm_up"): the timed
job then finds what a long-running service keeps between jobs (the compiled latent encoder, CUDA graphs, inductor's
caches), i.e. a job after the service's first rather than the first after a deploy. --vanish-recoveries N lets the
fine stage recover from N vanished meshes (`dmtet.vanish_recoveries`, scene service default 2): random-weight priors
give noise for gradients, which can empty the mesh long before the schedule ends, and the bench is about time.
--log-level INFO keeps the services' own events on stderr (default WARNING): the scene's creation, the warm-ups'
start and end, each SDS call with its server time, each progress report, all timestamped, so that a cold run's
set-up can be split (what ran between submit and the first step) from its log.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from magic3d.v1 import orchestrator_pb2, orchestrator_pb2_grpc

from services.guidance.config import GuidanceConfig, PriorSpec
from services.local_stack import CONFIG_DIR, LocalStackSettings, start_local_stack
from services.orchestrator import presets as presets_module
from shared import logging as project_logging
from shared.grpcio import insecure_channel
from shared.guidance_api import PriorKind
from shared.store import LocalStore

PROMPT = "a red torus"
SMOKE_PRESET = "bench-smoke"
GPU_SOURCES = {"pixel": "random:if-i-xl", "latent": "random:sd21-base"}


def guidance_config(smoke: bool) -> GuidanceConfig:
    device, source = ("cpu", "random:tiny") if smoke else ("cuda", None)
    return GuidanceConfig(priors=[
        PriorSpec(name="pixel", kind=PriorKind.PIXEL, source=source or GPU_SOURCES["pixel"], device=device),
        PriorSpec(name="latent", kind=PriorKind.LATENT, source=source or GPU_SOURCES["latent"], device=device,
                  resolution=64 if smoke else None),
    ], batching={"wait_s": 0.0})


def preset_book(smoke: bool) -> dict:
    """deploy/config/presets.yaml, plus under --smoke a CPU-sized copy of `magic3d` (same priors, tiny sizes)."""
    book = yaml.safe_load((CONFIG_DIR / "presets.yaml").read_text())
    if smoke:
        preset = copy.deepcopy(book["presets"]["magic3d"])
        preset.update(checkpoint_every=20, progress_every=2, preview_every=20, first_preview_step=4)
        coarse, fine = preset["stages"]
        coarse["steps"], fine["steps"] = 40, 200
        coarse["config"].update(resolution=32, batch_size=2, samples_per_ray=16,
                                hashGrid={"nLevels": 4, "log2HashmapSize": 12, "baseResolution": 8})
        coarse["config"]["tMax"] = {"steps": [0, 40], "values": [0.98, 0.5]}
        fine["config"].update(resolution=64, batch_size=2, dmtet={"gridCells": 16})
        book["presets"][SMOKE_PRESET] = preset
    return book


def parse_steps(text: str) -> dict[str, int]:
    """"coarse=20,fine=10" -> {"coarse": 20, "fine": 10}."""
    return {name: int(count) for name, count in (item.split("=") for item in text.split(",") if item)}


def build_spec(preset: str, seed: int, steps: dict[str, int]) -> orchestrator_pb2.JobSpec:
    spec = orchestrator_pb2.JobSpec(preset=preset, seed=seed)
    spec.text.prompt = PROMPT
    for stage, count in steps.items():
        spec.overrides.add(steps=count).config.stage = presets_module.STAGE_ENUM[stage]
    return spec


def watch(
    stub, spec: orchestrator_pb2.JobSpec, max_seconds: float | None, echo_every_s: float = 60.0
) -> tuple[float, list[tuple[float, object]]]:
    """Generate's events with their seconds since submit; the job is cancelled after `max_seconds`. Stage starts,
    the last event and every `echo_every_s` a progress line go to stderr (a long run is watched from its log)."""
    submitted = time.perf_counter()
    stream = stub.Generate(orchestrator_pb2.GenerateRequest(spec=spec), timeout=(max_seconds or 86400) + 120)
    events: list[tuple[float, object]] = []
    cancelled, echoed_at = False, 0.0
    for response in stream:
        now = time.perf_counter() - submitted
        events.append((now, response.event))
        kind = response.event.WhichOneof("event")
        if kind in ("stage_started", "done", "failed") or (kind == "progress" and now - echoed_at > echo_every_s):
            echoed_at = now
            print(f"[generate_e2e {now:7.1f} s] {kind}: {str(getattr(response.event, kind)).strip()[:200]!r}",
                  file=sys.stderr, flush=True)
        if kind in ("done", "failed"):
            break
        if max_seconds is not None and now > max_seconds and not cancelled:
            stub.CancelJob(orchestrator_pb2.CancelJobRequest(name=response.event.job_name), timeout=30)
            cancelled = True
    return submitted, events


def stage_rates(events: list[tuple[float, object]]) -> dict[str, dict]:
    """Per stage: median seconds per step between progress events, and its set-up: from the previous stage's last
    event (the first stage: from submit) to its first progress, less the steps done by then."""
    points: dict[str, list] = {}
    current, last_at = None, 0.0
    for at, event in events:
        kind = event.WhichOneof("event")
        if kind == "stage_started":
            current = presets_module.STAGE_NAME[event.stage_started.stage]
            points[current] = [(last_at if points else 0.0, None)]
        elif kind == "progress" and current and not event.progress.preview_uri:
            points[current].append((at, event.progress.step))
        last_at = at
    stages: dict[str, dict] = {}
    for name, series in points.items():
        (start, _), steps = series[0], series[1:]
        per_step = [(t1 - t0) / (s1 - s0) for (t0, s0), (t1, s1) in zip(steps, steps[1:]) if s1 > s0]
        if not per_step:
            stages[name] = {"progress_events": len(steps)}
            continue
        median = statistics.median(per_step)
        stages[name] = {
            "progress_events": len(steps), "steps_done": steps[-1][1], "median_step_s": median,
            "setup_s": max(0.0, steps[0][0] - start - steps[0][1] * median),
        }
    return stages


def summarise(events: list[tuple[float, object]], schedule: dict[str, int], max_seconds: float | None) -> dict:
    def first(predicate):
        return next((at for at, event in events if predicate(event)), None)

    kinds = [event.WhichOneof("event") for _, event in events]
    stages = stage_rates(events)
    result = {
        "accepted_s": events[0][0] if events else None,
        "first_progress_s": first(lambda e: e.WhichOneof("event") == "progress"),
        "first_preview_s": first(lambda e: e.WhichOneof("event") == "progress" and bool(e.progress.preview_uri)),
        "previews": sum(1 for _, e in events if e.WhichOneof("event") == "progress" and e.progress.preview_uri),
        "final_event": kinds[-1] if kinds else None,
        "failure": events[-1][1].failed.reason if kinds and kinds[-1] == "failed" else "",
        "stages": stages, "schedule_steps": schedule, "max_seconds": max_seconds,
    }
    if kinds and kinds[-1] == "done":
        result["measured_total_s"] = events[-1][0]
        return result
    known = all("median_step_s" in stages.get(name, {}) for name in schedule)
    result["projected_total_s"] = (
        sum(stages[n]["setup_s"] + steps * stages[n]["median_step_s"] for n, steps in schedule.items()) if known else None
    )
    result["projection_excludes"] = ["export"] + [n for n in schedule if "median_step_s" not in stages.get(n, {})]
    return result


def markdown_line(result: dict) -> str:
    def seconds(key):
        value = result.get(key)
        return "-" if value is None else f"{value:.1f} s"

    rates = ", ".join(f"{n} {1e3 * s['median_step_s']:.1f} ms/step" for n, s in result["stages"].items() if "median_step_s" in s)
    total = (f"measured end to end {seconds('measured_total_s')}" if "measured_total_s" in result
             else f"projected {seconds('projected_total_s')} (excl. {', '.join(result['projection_excludes'])})")
    return (f"| {result['preset']} ({result['guidance']}) | accepted {seconds('accepted_s')} | first progress "
            f"{seconds('first_progress_s')} | first preview {seconds('first_preview_s')} | {rates} | {total} |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default=None, help=f"default: magic3d ({SMOKE_PRESET} under --smoke)")
    parser.add_argument("--guidance", choices=("standalone", "serve"), default="standalone")
    parser.add_argument("--max-seconds", type=float, default=None, help="cancel the job then and project the rest")
    parser.add_argument("--steps", default="", help="run shorter stages, e.g. coarse=1000 (the projection keeps the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm-up", default="", help="first an untimed short job on the same stack, e.g. coarse=20,fine=20")
    parser.add_argument("--vanish-recoveries", type=int, default=None, help="the scene's dmtet.vanish_recoveries (<= 32)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny random priors, a CPU-sized preset")
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="WARNING",
                        help="the services' log level on stderr (INFO: where a cold set-up's time goes)")
    args = parser.parse_args(argv)
    project_logging.configure(args.log_level)
    preset = args.preset or (SMOKE_PRESET if args.smoke else "magic3d")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="magic3d-generate-") as state:  # checkpoints stay out of --out
        result = run(args, preset, Path(state))
    result["markdown"] = markdown_line(result)
    (args.out / "generate_e2e.json").write_text(json.dumps(result, indent=1))
    with open(args.out / "generate_e2e.md", "a") as handle:
        handle.write(result["markdown"] + "\n")
    print(json.dumps(result), flush=True)
    return result


def run(args: argparse.Namespace, preset: str, state: Path) -> dict:
    (state / "presets.yaml").write_text(yaml.safe_dump(preset_book(args.smoke)))
    (state / "guidance.yaml").write_text(yaml.safe_dump(guidance_config(args.smoke).model_dump(mode="json")))
    book = presets_module.PresetBook.load(state / "presets.yaml")
    schedule = {stage.stage: stage.steps for stage in book.get(preset).stages}
    steps, warm_up_steps = parse_steps(args.steps), parse_steps(args.warm_up)
    scene_config = CONFIG_DIR / "scene.yaml"
    if args.vanish_recoveries is not None:
        scene = yaml.safe_load(scene_config.read_text())
        scene["fine_defaults"].setdefault("dmtet", {})["vanish_recoveries"] = args.vanish_recoveries
        scene_config = state / "scene.yaml"
        scene_config.write_text(yaml.safe_dump(scene))
    began = time.perf_counter()
    stack = start_local_stack(LocalStackSettings(
        guidance=args.guidance, state_dir=state, orchestrator_port=0, guidance_config=state / "guidance.yaml",
        presets=state / "presets.yaml", scene_config=scene_config, scene_device="cpu" if args.smoke else "auto",
        guidance_gpus=0 if args.smoke else 1,
    ))
    warm_up = None
    try:
        stack_start_s = time.perf_counter() - began
        channel = insecure_channel(stack.orchestrator_address, token=stack.client_token)
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        if warm_up_steps:
            _, warm_events = watch(stub, build_spec(preset, args.seed + 1, warm_up_steps), None)
            warm_up = {"steps": warm_up_steps, **summarise(warm_events, warm_up_steps, None)}
        _, events = watch(stub, build_spec(preset, args.seed, steps), args.max_seconds)
        channel.close()
    finally:
        stack.stop()
    result = {"bench": "generate_e2e", "preset": preset, "guidance": args.guidance, "smoke": args.smoke,
              "stack_start_s": stack_start_s, "run_steps": steps, "warm_up": warm_up,
              "vanish_recoveries": args.vanish_recoveries, **summarise(events, schedule, args.max_seconds)}
    first_preview = next((e.progress.preview_uri for _, e in events if e.progress.preview_uri), "")
    if first_preview:  # the strip itself, to look at
        store = LocalStore(stack.store_dir)
        (args.out / "generate_first_preview.png").write_bytes(store.get(store.key_from_uri(first_preview)))
    return result


__all__ = ["main", "stage_rates", "summarise"]

if __name__ == "__main__":
    main()
