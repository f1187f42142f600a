"""Reference images for the image-to-3D tests: a built-in analytic object rendered by the repo's own renderer at a
reference camera, as the RGBA uint8 image a client would send (alpha = coverage, colour straight)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from magic3d.v1 import scene_pb2

from services.guidance.priors.analytic import builtin_objects
from shared import cameras as camera_proto
from shared.cameras import Shading
from shared.image_input import array_to_proto, reference_camera
from shared.rasterize import make_rasterizer
from shared.render import render_mesh


def analytic_object(name: str = "red torus"):
    return next(o for o in builtin_objects() if o.name == name)


def render_rgba(obj, elevation_deg: float, distance: float, fovy_deg: float, size: int) -> np.ndarray:
    """(size, size, 4) uint8: `obj` at the reference camera (albedo shading), alpha its coverage."""
    camera = camera_proto.from_proto(reference_camera(elevation_deg, distance, fovy_deg, size))
    black = dataclasses.replace(camera, background_color=(0.0, 0.0, 0.0), shading=Shading.ALBEDO)
    rasterizer = make_rasterizer("torch")
    with torch.no_grad():
        color = render_mesh(obj.mesh, [black], rasterizer, albedo=obj.color, resolution=size)[0]
        mask = render_mesh(obj.mesh, [black], rasterizer, albedo=(1.0, 1.0, 1.0), resolution=size)[0, :1]
    rgba = torch.cat([color, mask]).permute(1, 2, 0).clamp(0, 1)
    return (rgba.numpy() * 255.0 + 0.5).astype(np.uint8)


def reference_view(rgba: np.ndarray, elevation_deg: float = 20.0, distance: float = 1.8, fovy_deg: float = 40.0,
                   depth: np.ndarray | None = None, every_steps: int = 0, mask_erode_px: int = 0) -> scene_pb2.ReferenceView:
    message = scene_pb2.ReferenceView(
        image=array_to_proto(rgba), camera=reference_camera(elevation_deg, distance, fovy_deg, rgba.shape[0]),
        every_steps=every_steps, mask_erode_px=mask_erode_px,
    )
    if depth is not None:
        message.depth.CopyFrom(array_to_proto(depth.astype(np.float32)))
    return message
