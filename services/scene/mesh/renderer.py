"""Rendering the fine stage's mesh with a neural colour field, through the `Rasterizer` interface only.

Per camera: rasterise -> interpolate world positions -> query the colour field at the covered pixels only ->
shade (`shared.shading`: the camera's mode and point light, as the coarse stage and the analytic prior)
with smooth vertex normals -> composite over the background -> antialias (nvdiffrast's gives silhouette
gradients; so does the torch backend's where made with `edge_antialias`, as the fine stage's is) -> row 0 = top,
(B, 3, H, W).

The background is the coarse stage's environment-map MLP (view direction -> colour) when given, else the camera's
own background; it is returned too, since the priors that re-render views need what the image was composited over.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from services.scene.field.renderer import camera_rays
from services.scene.mesh.regularizers import vertex_normals
from shared.cameras import Camera, Shading
from shared.rasterize.base import Rasterizer, to_top_row_first
from shared.render import clip_positions
from shared.shading import shade_view

AlbedoFn = Callable[[torch.Tensor], torch.Tensor]  # world points (N, 3) -> albedo (N, 3) in [0, 1]


class MeshRenderer:
    def __init__(self, rasterizer: Rasterizer, antialias: bool = True) -> None:
        self.rasterizer = rasterizer
        self.antialias = antialias

    def render(
        self,
        vertices: torch.Tensor,
        faces: torch.Tensor,
        albedo_fn: AlbedoFn,
        cameras: list[Camera],
        resolution: int,
        background: nn.Module | None = None,
        lap: Callable[[str], None] = lambda name: None,
        with_depth: bool = False,
    ) -> dict[str, torch.Tensor]:
        """-> {"rgb" (B, 3, H, W), "opacity" (B, 1, H, W), "background" (B, 3, H, W)}, all row 0 = top, and
        with `with_depth` "depth" (B, 1, H, W): the distance from the camera to the surface (0 where uncovered).

        `lap(name)` is called after the "rasterize" and "texture" phases (for step profiling).
        """
        size = (resolution, resolution)
        pos_clip = clip_positions(vertices, cameras)
        rast = self.rasterizer.rasterize(pos_clip, faces, size)
        covered = rast[..., 3] > 0  # (B, H, W), bottom row first
        world = self.rasterizer.interpolate(vertices, rast, faces)
        normals = None
        if any(camera.shading != Shading.ALBEDO for camera in cameras):
            normals = self.rasterizer.interpolate(vertex_normals(vertices, faces), rast, faces)
            normals = nn.functional.normalize(normals, dim=-1, eps=1e-12)
        lap("rasterize")

        albedo = torch.zeros_like(world)
        if covered.any():
            albedo = albedo.index_put((covered,), albedo_fn(world[covered]))
        lap("texture")

        color = torch.stack([
            shade_view(camera, albedo[i], None if normals is None else normals[i], world[i])
            for i, camera in enumerate(cameras)
        ])
        backdrop = self._background(background, cameras, size, vertices.device).to(vertices.dtype)
        mask = covered[..., None].to(vertices.dtype)
        image = mask * color + (1 - mask) * to_top_row_first(backdrop)
        if self.antialias:
            image = self.rasterizer.antialias(image, rast, pos_clip, faces)
        out = {
            "rgb": to_top_row_first(image).permute(0, 3, 1, 2),
            "opacity": to_top_row_first(mask).permute(0, 3, 1, 2),
            "background": backdrop.permute(0, 3, 1, 2),
        }
        if with_depth:
            eyes = torch.stack([camera.camera_to_world[:3, 3] for camera in cameras]).to(world)  # (B, 3)
            depth = (world - eyes[:, None, None, :]).norm(dim=-1, keepdim=True) * mask
            out["depth"] = to_top_row_first(depth).permute(0, 3, 1, 2)
        return out

    @staticmethod
    def _background(
        background: nn.Module | None, cameras: list[Camera], size: tuple[int, int], device: torch.device
    ) -> torch.Tensor:
        """(B, H, W, 3), row 0 = top."""
        if background is None:
            return torch.stack([camera.background(*size) for camera in cameras]).to(device)
        _, directions = camera_rays(cameras, size, device)
        return background(directions)
