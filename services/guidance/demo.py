"""`make run` today: the guidance tier end to end on the embedded default (the analytic prior).

Starts a standalone guidance server on 127.0.0.1, renders the wrong object (a blue sphere) from a few cameras, and
follows SDS gradients requested over gRPC until the images show what the prompt names. Writes
OUT/steps.png (rows: start, after SDS, target render) and OUT/metrics.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from magic3d.v1 import guidance_pb2_grpc
from PIL import Image

from services.guidance import standalone
from services.guidance.config import DEFAULT_CONFIG
from services.guidance.priors.analytic import builtin_objects
from shared import guidance_api, logging as project_logging
from shared.cameras import Shading, orbit_camera
from shared.grpcio import insecure_channel
from shared.guidance_api import SdsRequest
from shared.rasterize import make_rasterizer
from shared.render import render_mesh


def render_object(name: str, cameras) -> torch.Tensor:
    obj = next(o for o in builtin_objects() if o.name == name)
    return render_mesh(obj.mesh, cameras, make_rasterizer("torch"), albedo=obj.color)


def save_grid(rows: list[torch.Tensor], path: Path) -> None:
    """Rows of (B, 3, H, W) images in [0, 1] -> one PNG."""
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)  # (3, rows*H, B*W)
    array = (grid.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).resize((array.shape[1] * 3, array.shape[0] * 3), Image.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--prompt", default="a red torus")
    parser.add_argument("--start", default="blue sphere", help="built-in object the images start from")
    parser.add_argument("--target", default="red torus", help="built-in object the prompt names (for the metric)")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    args = parser.parse_args()
    project_logging.configure()
    log = project_logging.get_logger("demo", job_id="demo")
    args.out.mkdir(parents=True, exist_ok=True)

    running = standalone.start(DEFAULT_CONFIG.model_copy(update={"port": 0}))
    channel = insecure_channel(running.address)
    stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
    try:
        cameras = [orbit_camera(a, 30.0, 2.0, fovy_deg=45.0, size=64, shading=Shading.LAMBERTIAN) for a in (0, 90, 180, 270)]
        start = render_object(args.start, cameras)
        target = render_object(args.target, cameras)
        images = start.clone()
        history = []
        for step in range(args.steps + 1):
            mse = float((images - target).pow(2).mean())
            if step % 10 == 0:
                log.info("progress", step=step, mse_to_target=round(mse, 5))
                history.append({"step": step, "mse_to_target": mse})
            if step == args.steps:
                break
            request = SdsRequest(
                job_id="demo",
                prior="analytic",
                images=images,
                cameras=cameras,
                prompt=args.prompt,
                guidance_scale=args.guidance_scale,
                seed=step,
            )
            response = stub.ComputeSds(guidance_api.sds_request_to_proto(request), timeout=60)
            grad = guidance_api.sds_result_from_proto(response).grad
            images = (images - args.lr * grad).clamp(0, 1)
        save_grid([start, images, target], args.out / "steps.png")
        (args.out / "metrics.json").write_text(json.dumps(history, indent=1))
        log.info("done", out=str(args.out / "steps.png"), mse_start=history[0]["mse_to_target"], mse_end=history[-1]["mse_to_target"])
    finally:
        channel.close()
        running.stop(grace=None)


if __name__ == "__main__":
    main()
