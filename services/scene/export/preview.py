"""Turntable preview of the textured mesh: N views about the world +Z axis, as an image grid and an animated GIF.

Rendering goes through the `Rasterizer` interface only (so nvdiffrast can replace the torch backend). The baked
texture is sampled with the interpolated uvs by `grid_sample` (bilinear, `align_corners=False`), on the texture
in rasteriser layout (row 0 = v near 0), so grid (2u - 1, 2v - 1) hits texel centres exactly as the bake wrote
them. Optional Lambertian shading uses a headlight (light at the eye, two-sided), composited over white.
The views look at the centre of the bounding box; by default the camera distance fits the bounding sphere.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from shared.cameras import orbit_camera
from shared.rasterize.base import Rasterizer, to_top_row_first

AMBIENT, DIFFUSE = 0.35, 0.65


def render_turntable(
    positions: torch.Tensor,
    normals: torch.Tensor,
    uvs: torch.Tensor,
    faces: torch.Tensor,
    texture: torch.Tensor,
    rasterizer: Rasterizer,
    views: int = 8,
    resolution: int = 256,
    elevation_deg: float = 20.0,
    distance: float | None = None,
    fovy_deg: float = 40.0,
    shading: bool = True,
    supersample: int = 1,
) -> torch.Tensor:
    """(N, H, W, 3) uint8 frames, top-row-first, azimuth 360 k / N for k = 0..N-1.

    positions, normals (W, 3) world +Z up; uvs (W, 2) v up; faces (F, 3) into them; texture (S, S, 3) float in
    rasteriser layout (see module docstring). supersample renders at k x resolution and box-filters down.
    """
    low, high = positions.min(dim=0).values, positions.max(dim=0).values
    centred = positions - (low + high) / 2  # orbit cameras look at the origin
    radius = float(centred.norm(dim=1).max().clamp(min=1e-6))
    if distance is None:
        distance = 1.08 * radius / math.sin(math.radians(fovy_deg) / 2)
    size = resolution * supersample
    cameras = [orbit_camera(360.0 * k / views, elevation_deg, distance, fovy_deg, size=size) for k in range(views)]
    near = max(distance - 1.5 * radius, 1e-3 * distance)
    far = distance + 1.5 * radius
    homogeneous = torch.cat([centred, torch.ones_like(centred[:, :1])], dim=1)
    matrices = torch.stack([camera.world_to_clip(near, far) for camera in cameras]).to(centred)
    pos_clip = homogeneous[None] @ matrices.transpose(1, 2)  # (N, W, 4)

    with torch.no_grad():
        rast = rasterizer.rasterize(pos_clip, faces, (size, size))
        uv = rasterizer.interpolate(uvs.to(centred), rast, faces)  # (N, H, W, 2)
        grid = uv * 2.0 - 1.0
        tex = texture.permute(2, 0, 1)[None].expand(views, -1, -1, -1).to(centred)
        color = torch.nn.functional.grid_sample(tex, grid, mode="bilinear", padding_mode="border",
                                                align_corners=False).permute(0, 2, 3, 1)
        if shading:
            normal = torch.nn.functional.normalize(rasterizer.interpolate(normals.to(centred), rast, faces), dim=-1)
            world = rasterizer.interpolate(centred, rast, faces)
            eyes = torch.stack([camera.camera_to_world[:3, 3] for camera in cameras]).to(centred)
            to_eye = torch.nn.functional.normalize(eyes[:, None, None, :] - world, dim=-1)
            lambert = (normal * to_eye).sum(-1, keepdim=True).abs()
            color = color * (AMBIENT + DIFFUSE * lambert)
        mask = (rast[..., 3:4] > 0).to(color.dtype)
        image = mask * color + (1.0 - mask)  # over white
        image = rasterizer.antialias(image, rast, pos_clip, faces)
        if supersample > 1:
            image = torch.nn.functional.avg_pool2d(image.permute(0, 3, 1, 2), supersample).permute(0, 2, 3, 1)
        image = to_top_row_first(image)
    return (image.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu()


def grid_image(frames: torch.Tensor, columns: int = 4) -> Image.Image:
    """Tiles (N, H, W, 3) uint8 frames row-major into ceil(N / columns) rows; unused cells are white."""
    count, height, width = frames.shape[:3]
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    canvas = np.full((rows * height, columns * width, 3), 255, dtype=np.uint8)
    for k in range(count):
        r, c = divmod(k, columns)
        canvas[r * height:(r + 1) * height, c * width:(c + 1) * width] = frames[k].numpy()
    return Image.fromarray(canvas, mode="RGB")


def encode_grid_png(frames: torch.Tensor, columns: int = 4) -> bytes:
    buffer = io.BytesIO()
    grid_image(frames, columns).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_gif(frames: torch.Tensor, frame_ms: int = 120) -> bytes:
    """Looping animated GIF. Pillow merges consecutive identical frames (e.g. a uniformly coloured body of
    revolution) into one longer frame, so the frame count can be below N while the loop time stays the same."""
    images = [Image.fromarray(frame.numpy(), mode="RGB") for frame in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return buffer.getvalue()
