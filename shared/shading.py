"""The one shading model, shared by the analytic prior's targets (`shared.render`) and the scene's two renderers
(`services.scene.mesh.renderer`, `services.scene.field.renderer`), so that what a prior asks for and what a scene
renders cannot drift apart.

Modes (`Shading`):
* ALBEDO: the colour itself.
* LAMBERTIAN: albedo * (ambient + diffuse * max(0, n . l)), l the unit direction from the point to the light.
* TEXTURELESS: the same lighting on a white albedo.
* NORMAL: (n + 1) / 2 with world-space unit normals.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from shared.cameras import Camera, Shading

Scalar = float | torch.Tensor  # a number, or a tensor broadcasting against (..., 1)


def shade(
    mode: Shading,
    albedo: torch.Tensor,
    normals: torch.Tensor | None,
    points: torch.Tensor | None,
    light_position: torch.Tensor | None = None,
    ambient: Scalar = 0.0,
    diffuse: Scalar = 0.0,
) -> torch.Tensor:
    """Colours (..., 3) of surface points under `mode`.

    albedo, normals (unit, world), points (world): (..., 3); light_position (3,) or (..., 3) in world
    coordinates; ambient and diffuse: numbers or tensors (..., 1). ALBEDO reads only `albedo`, NORMAL only
    `normals`. Differentiable w.r.t. every tensor input.
    """
    if mode == Shading.ALBEDO:
        return albedo
    if normals is None:
        raise ValueError(f"shading {mode.value!r} needs normals")
    if mode == Shading.NORMAL:
        return (normals + 1) / 2
    if points is None or light_position is None:
        raise ValueError(f"shading {mode.value!r} needs points and a light position")
    direction = F.normalize(light_position - points, dim=-1)
    lambert = (normals * direction).sum(-1, keepdim=True).clamp(min=0)
    intensity = ambient + diffuse * lambert
    base = torch.ones_like(albedo) if mode == Shading.TEXTURELESS else albedo
    return base * intensity


def shade_view(
    camera: Camera, albedo: torch.Tensor, normals: torch.Tensor | None, points: torch.Tensor | None
) -> torch.Tensor:
    """`shade` under one camera's shading mode and point light (an image's pixels, (H, W, 3))."""
    light = camera.light
    position = None
    if points is not None:
        position = torch.tensor(light.position, dtype=points.dtype, device=points.device)
    return shade(camera.shading, albedo, normals, points, position, light.ambient, light.diffuse)
