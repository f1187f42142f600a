"""Wall time of the `magic3d` preset's full schedule on one GPU, measured step by step, resumable across commands.

    python -m bench.schedule --stage coarse --state DIR [--budget-s 540]   # repeat until it prints done
    python -m bench.schedule --stage fine --state DIR
    bash bench/gpu/run.sh schedule coarse                                   # the same on the GPU machine

Each stage runs the preset's steps (5,000 coarse, 3,000 fine at batch 4) as the services run them: the scene here,
the guidance (random weights of IF-I-XL's / SD 2.1-base's architecture) in a standalone gRPC service in its own
process, float16 traffic from a GPU scene. A command stops before --budget-s, writes a checkpoint to --state and a JSON record of
the segment; the next command resumes from it (a device command may run 10 minutes; the coarse stage needs more).
The coarse stage starts from an empty field, as a job does; the fine stage starts from the exact SDF of a torus
(a random-weight prior gives the coarse stage no shape to convert). Totals add the segments' stepping time and,
separately, the set-up (service start, model build, checkpoint load) that a single long-running job pays once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from bench.gpu_suite import GPU, SMOKE, guidance_config, make_stage, preset_configs, standalone_guidance
from services.scene import checkpoint as checkpoints
from services.scene.coarse import CoarseStage
from services.scene.fine import FineStage
from shared import logging as project_logging


def load_or_start(stage: str, config, guidance, settings, state: Path):
    path = state / f"{stage}.ckpt"
    if path.exists():
        loaded = checkpoints.loads(path.read_bytes(), str(path))
        cls = CoarseStage if stage == "coarse" else FineStage
        return cls.from_checkpoint(loaded, guidance, "schedule", settings.device)
    if stage == "coarse":
        return CoarseStage(config, guidance, "schedule", device=settings.device)
    return make_stage("fine", config, guidance, settings, None)


def summary(records: list[dict], total_steps: int) -> dict:
    stepping = sum(r["stepping_s"] for r in records)
    setup = sum(r["setup_s"] for r in records)
    return {
        "segments": len(records),
        "steps_done": records[-1]["step_end"] if records else 0,
        "total_steps": total_steps,
        "stepping_s": stepping,
        "setup_s_first_segment": records[0]["setup_s"] if records else 0.0,
        "setup_s_all_segments": setup,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("coarse", "fine"), required=True)
    parser.add_argument("--state", type=Path, required=True, help="checkpoint and records between commands")
    parser.add_argument("--budget-s", type=float, default=540.0, help="stop (with a checkpoint) before this")
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--log-every", type=int, default=250)
    parser.add_argument("--smoke", action="store_true", help="CPU sizes, tiny priors: checks the runner works")
    parser.add_argument("--guidance-gpu", type=int, default=None, help="GPU index for the guidance service")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    settings = dataclasses.replace(SMOKE if args.smoke else GPU, guidance_gpu=args.guidance_gpu)
    project_logging.configure("WARNING")
    args.state.mkdir(parents=True, exist_ok=True)
    coarse, fine = preset_configs(settings)
    config = coarse if args.stage == "coarse" else fine
    total = args.steps or (5000 if args.stage == "coarse" else 3000)
    records_path = args.state / f"{args.stage}.records.json"
    records = json.loads(records_path.read_text()) if records_path.exists() else []
    if records and records[-1]["step_end"] >= total:
        result = {"stage": args.stage, "done": True, **summary(records, total), "last": records[-1]}
        print(json.dumps(result), flush=True)
        return result
    kind = "pixel" if args.stage == "coarse" else "latent"
    guidance = guidance_config(settings, kind, config.resolution)
    with standalone_guidance(guidance, args.state, settings.guidance_gpu) as (client, _):
        scene = load_or_start(args.stage, config, client, settings, args.state)
        start_step = scene.step_count
        setup_s = time.perf_counter() - began
        step_times: list[float] = []
        stepping_began = time.perf_counter()
        while scene.step_count < total and time.perf_counter() - began < args.budget_s:
            t0 = time.perf_counter()
            scene.step()
            step_times.append(time.perf_counter() - t0)
            if scene.step_count % args.log_every == 0:
                window = step_times[-args.log_every :]
                print(json.dumps({"stage": args.stage, "step": scene.step_count,
                                  "median_ms": 1e3 * statistics.median(window)}), flush=True)
        if scene.device.type == "cuda":
            torch.cuda.synchronize()
        stepping_s = time.perf_counter() - stepping_began
        (args.state / f"{args.stage}.ckpt").write_bytes(checkpoints.dumps(scene.to_checkpoint()))
        record = {
            "step_start": start_step, "step_end": scene.step_count, "setup_s": setup_s, "stepping_s": stepping_s,
            "median_step_ms": 1e3 * statistics.median(step_times) if step_times else None,
        }
        if args.stage == "coarse":
            record["occupied_fraction"] = float(scene.occupancy.occupancy.float().mean())
        else:
            record["faces"] = int(scene.extract_mesh()[1].shape[0])
        records.append(record)  # before the guidance service's shutdown: a command killed there keeps the record
        records_path.write_text(json.dumps(records, indent=1))
    result = {"stage": args.stage, "done": records[-1]["step_end"] >= total, **summary(records, total), "last": record}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
