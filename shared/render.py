"""Rendering a `Mesh` from `Camera`s through the `Rasterizer` interface only (so nvdiffrast can replace it).

Shading: the camera's mode and point light, by `shared.shading.shade` (the scene's renderers use it too).

Normals are per-corner with 45-degree creases (`Mesh.shading_normals`): smooth on spheres and tori, flat on
box faces and cylinder caps. They are turned to face the camera on triangles seen from behind (open or
inconsistently wound uploads). The result is composited over `camera.background(H, W)` by coverage
(triangle id > 0), passed through `rasterizer.antialias`, and returned top-row-first as (B, 3, H, W) in [0, 1].
Differentiable w.r.t. the mesh vertices and the albedo.
"""

from __future__ import annotations

import torch

from shared.cameras import Camera, Shading
from shared.meshes import Mesh, crease_normals, face_normals
from shared.rasterize.base import Rasterizer, to_top_row_first
from shared.shading import shade_view


def clip_positions(vertices: torch.Tensor, cameras: list[Camera]) -> torch.Tensor:
    """World vertices (V, 3) -> homogeneous clip positions (B, V, 4), one batch item per camera."""
    homogeneous = torch.cat([vertices, torch.ones_like(vertices[:, :1])], dim=1)
    matrices = torch.stack([camera.world_to_clip().to(vertices) for camera in cameras])  # (B, 4, 4)
    return homogeneous[None] @ matrices.transpose(1, 2)


def render_mesh(
    mesh: Mesh,
    cameras: list[Camera],
    rasterizer: Rasterizer,
    albedo: torch.Tensor | tuple[float, float, float] | None = None,
    resolution: int | tuple[int, int] | None = None,
    vertices: torch.Tensor | None = None,
    backgrounds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Renders `mesh` from each camera -> (B, 3, H, W) in [0, 1], top-row-first.

    albedo: (3,) colour, (V, 3) per-vertex colours, or None (the mesh's vertex colours, else white).
    resolution: int (square) or (H, W); None uses the cameras' own size (which must then agree). The
    projection always uses each camera's own aspect (width / height).
    vertices: optional (V, 3) replacement for mesh.vertices (e.g. a tensor being optimised), same topology.
    backgrounds: optional (B, H, W, 3) `background_images(cameras, ...)`, made once by a caller that renders several
    meshes from the same cameras (otherwise each call converts, resizes and copies every camera's background image to
    the device again).
    """
    if not cameras:
        raise ValueError("render_mesh needs at least one camera")
    if resolution is None:
        sizes = {(camera.height, camera.width) for camera in cameras}
        if len(sizes) != 1:
            raise ValueError(f"cameras disagree on image size {sorted(sizes)}; pass resolution")
        height, width = sizes.pop()
    elif isinstance(resolution, int):
        height = width = resolution
    else:
        height, width = int(resolution[0]), int(resolution[1])

    verts = mesh.vertices if vertices is None else vertices
    faces = mesh.faces
    pos_clip = clip_positions(verts, cameras)
    rast = rasterizer.rasterize(pos_clip, faces, (height, width))
    covered = rast[..., 3:4] > 0
    mask = covered.to(verts.dtype)

    colors = _albedo(mesh, albedo, verts)
    need_normals = any(camera.shading != Shading.ALBEDO for camera in cameras)
    shaded: list[torch.Tensor] = []
    normals: torch.Tensor | None = None
    world: torch.Tensor | None = None
    if need_normals:
        if vertices is None:
            corner_normals, normal_tri = mesh.shading_normals
        else:  # geometry being optimised: recompute (differentiably) from the given positions
            corner_normals, normal_tri = crease_normals(mesh, 45.0, vertices=verts)
        normals = rasterizer.interpolate(corner_normals.to(verts), rast, normal_tri)
        normals = torch.nn.functional.normalize(normals, dim=-1)
        world = rasterizer.interpolate(verts, rast, faces)  # (B, H, W, 3) world positions
        # Face the camera on back-facing triangles (judged by the geometric face normal).
        face_id = ((rast[..., 3].detach() + 0.5).long() - 1).clamp(min=0)
        geometric = torch.nn.functional.normalize(face_normals(verts, faces), dim=1)
        geometric = geometric.index_select(0, face_id.reshape(-1)).reshape(*face_id.shape, 3)
        eyes = torch.stack([camera.camera_to_world[:3, 3] for camera in cameras]).to(verts)
        to_eye = eyes[:, None, None, :] - world
        flip = ((geometric * to_eye).sum(-1, keepdim=True) < 0).to(verts.dtype)
        normals = normals * (1 - 2 * flip)

    albedo_image = rasterizer.interpolate(colors, rast, faces) if colors.ndim == 2 else None
    for index, camera in enumerate(cameras):
        if albedo_image is not None:
            base = albedo_image[index]
        else:
            base = colors.to(verts).expand(height, width, 3)
        normal = None if normals is None else normals[index]
        point = None if world is None else world[index]
        shaded.append(shade_view(camera, base, normal, point))
    color = torch.stack(shaded)  # (B, H, W, 3), bottom-row-first
    if backgrounds is None:
        backgrounds = background_images(cameras, height, width, verts.device)
    elif tuple(backgrounds.shape) != (len(cameras), height, width, 3):
        raise ValueError(f"backgrounds must be ({len(cameras)}, {height}, {width}, 3), got {list(backgrounds.shape)}")
    background = backgrounds.to(verts)
    image = mask * color + (1 - mask) * background
    image = rasterizer.antialias(image, rast, pos_clip, faces)
    return to_top_row_first(image).permute(0, 3, 1, 2).clamp(0.0, 1.0).contiguous()


def background_images(cameras: list[Camera], height: int, width: int, device: torch.device | str) -> torch.Tensor:
    """Each camera's background at (height, width) in the rasteriser's row order: (B, H, W, 3) float32 on `device`."""
    return torch.stack(
        [to_top_row_first(camera.background(height, width)[None])[0] for camera in cameras]
    ).to(device)


def _albedo(mesh: Mesh, albedo, verts: torch.Tensor) -> torch.Tensor:
    if albedo is None:
        if mesh.vertex_colors is not None:
            return mesh.vertex_colors.to(verts)
        return torch.ones(3, dtype=verts.dtype, device=verts.device)
    albedo = torch.as_tensor(albedo, dtype=verts.dtype, device=verts.device)
    if albedo.shape == (3,) or albedo.shape == (mesh.num_vertices, 3):
        return albedo
    raise ValueError(f"albedo must be (3,) or (V, 3), got {list(albedo.shape)}")

