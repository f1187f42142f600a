"""A job's progress previews without torch: the four views the orchestrator asks a scene to render, and the PNG
strip it stores from the scene's answer (uint8 pixels as raw bytes with dtype and shape, magic3d.v1.Tensor).

The views are shared.cameras' `orbit_camera(azimuth, 20, 2.2, fovy_deg=45, size=128)` at four azimuths, built here
with numpy (the same float32 look-at) so that the orchestrator needs no torch."""

from __future__ import annotations

import io
import math

import numpy as np
from magic3d.v1 import common_pb2

from shared.errors import InvalidArgument

AZIMUTHS_DEG = (0.0, 90.0, 180.0, 270.0)
ELEVATION_DEG, DISTANCE, FOVY_DEG, SIZE = 20.0, 2.2, 45.0, 128


def preview_cameras() -> list[common_pb2.Camera]:
    return [_orbit_camera(azimuth) for azimuth in AZIMUTHS_DEG]


def _orbit_camera(azimuth_deg: float) -> common_pb2.Camera:
    """shared.cameras.to_proto(orbit_camera(azimuth_deg, ...)) with the defaults a Camera has there."""
    a, e = math.radians(azimuth_deg), math.radians(ELEVATION_DEG)
    eye = np.float32(DISTANCE) * np.array([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)], np.float32)
    message = common_pb2.Camera(
        intrinsics=common_pb2.Intrinsics(fovy_deg=FOVY_DEG, width=SIZE, height=SIZE),
        pose=common_pb2.Pose(
            camera_to_world=_look_at(eye).reshape(-1).tolist(),
            azimuth_deg=azimuth_deg, elevation_deg=ELEVATION_DEG, distance=DISTANCE,
        ),
        shading=common_pb2.SHADING_MODE_ALBEDO,
        light=common_pb2.Light(position=common_pb2.Vec3(x=0.0, y=0.0, z=3.0), ambient=0.1, diffuse=0.9),
    )
    message.background.color.CopyFrom(common_pb2.Vec3(x=1.0, y=1.0, z=1.0))
    return message


def _look_at(eye: np.ndarray) -> np.ndarray:
    """shared.cameras.look_at(eye) (target the origin, +Z up) in float32."""
    back = _normalize(eye)
    right = np.cross(np.array([0.0, 0.0, 1.0], np.float32), back)
    if np.linalg.norm(right) < 1e-6:  # looking straight down or up: any right vector will do
        right = np.array([0.0, 1.0, 0.0], np.float32)
    right = _normalize(right)
    cam_up = np.cross(back, right)
    c2w = np.eye(4, dtype=np.float32)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, cam_up, back, eye
    return c2w


def _normalize(vector: np.ndarray) -> np.ndarray:
    return (vector / max(np.linalg.norm(vector), np.float32(1e-12))).astype(np.float32)


def strip_png(images: common_pb2.Tensor) -> bytes:
    """The rendered views (N, H, W, 3) uint8, side by side as one PNG."""
    pixels = _uint8_images(images)
    strip = pixels.transpose(1, 0, 2, 3).reshape(pixels.shape[1], -1, 3)
    return png(strip)


def _uint8_images(message: common_pb2.Tensor, field: str = "tensor") -> np.ndarray:
    if message.dtype != common_pb2.SCALAR_TYPE_UINT8:
        raise InvalidArgument("preview images must be uint8", field=f"{field}.dtype")
    shape = tuple(int(d) for d in message.shape)
    if len(shape) != 4 or any(d < 0 for d in shape):
        raise InvalidArgument(f"preview images must be (N, H, W, 3), got {list(shape)}", field=f"{field}.shape")
    expected = math.prod(shape)
    if len(message.data) != expected:
        raise InvalidArgument(
            f"{len(message.data)} bytes do not match dtype x shape {list(shape)} ({expected} bytes)", field=f"{field}.data"
        )
    return np.frombuffer(message.data, dtype=np.uint8).reshape(shape)


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


__all__ = ["preview_cameras", "strip_png", "png"]
