"""Procedural shapes that probe what smooth blobs do not: flat bottoms, thin parts, narrow gaps, several colours, a
handle. The fidelity benchmark (bench/fidelity.py) and test (tests/test_fidelity.py) add them to the analytic
prior's set as user meshes and score the final GLB against them.

Each shape is centred, +Z up, within a radius-0.5 sphere, made of closed outward-wound parts; parts may touch
(table legs under the top, the mug's handle ends inside its wall) but never cross the visible surface. A shape's
`color_at(points)` gives its albedo at surface points (the colour the analytic prior renders it with).

| name       | what it tests                | parts                                                              |
|------------|------------------------------|--------------------------------------------------------------------|
| cone       | a flat bottom, a sharp tip   | cone radius 0.35, height 0.7                                       |
| table      | thin parts                   | top 0.76 x 0.48 x 0.06, four legs 0.06 x 0.06 x 0.34               |
| rings      | narrow gaps                  | three tori (major 0.3, minor 0.05) stacked 0.04 apart              |
| two-tone   | two colours                  | cylinder radius 0.3, height 0.6: red above z = 0, blue below       |
| mug        | a hollow and a handle        | open cylinder (outer 0.25, wall 0.04, floor 0.05) + tube handle    |
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from shared import meshes
from shared.meshes import Mesh

RED = (0.85, 0.15, 0.12)
BLUE = (0.15, 0.30, 0.85)


@dataclass(frozen=True, eq=False)
class Shape:
    """A named test shape: its mesh (vertex colours set) and its albedo at any surface point."""

    name: str
    mesh: Mesh
    color_at: Callable[[torch.Tensor], torch.Tensor]  # (N, 3) points -> (N, 3) colours in [0, 1]
    # Points this close to a colour boundary are left out of the colour error (vertex colours blend across it).
    color_margin: float = 0.0
    color_boundaries: tuple[float, ...] = ()  # z values where the colour changes


def concatenate(parts: list[Mesh]) -> Mesh:
    """One mesh of several closed parts (vertex colours kept when every part has them)."""
    offsets = torch.tensor([0] + [p.num_vertices for p in parts[:-1]]).cumsum(0)
    known = [p.vertex_colors for p in parts if p.vertex_colors is not None]
    colors = torch.cat(known) if len(known) == len(parts) else None
    return Mesh(
        torch.cat([p.vertices for p in parts]),
        torch.cat([p.faces + int(o) for p, o in zip(parts, offsets)]),
        colors,
    )


def cuboid(low: tuple[float, float, float], high: tuple[float, float, float]) -> Mesh:
    """Axis-aligned box from `low` to `high` (the unit cube of `meshes.box`, scaled and moved)."""
    unit = meshes.box(1.0)
    low_t, high_t = torch.tensor(low), torch.tensor(high)
    return Mesh((unit.vertices + 0.5) * (high_t - low_t) + low_t, unit.faces)


def tube_arc(
    centre: tuple[float, float, float], radius: float, tube_radius: float, start_deg: float, end_deg: float,
    segments: int = 24, tube_segments: int = 12,
) -> Mesh:
    """A capped tube along an arc in the XZ plane about `centre` (angle 0 along +X, 90 along +Z)."""
    angles = torch.linspace(math.radians(start_deg), math.radians(end_deg), segments + 1, dtype=torch.float64)
    around = torch.arange(tube_segments, dtype=torch.float64) * (2 * math.pi / tube_segments)
    # Tube cross-section in the plane spanned by the arc's outward radial direction and the Y axis.
    radial = torch.stack([angles.cos(), torch.zeros_like(angles), angles.sin()], 1)  # (S, 3)
    y_axis = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    path = torch.tensor(centre, dtype=torch.float64) + radius * radial
    ring = path[:, None] + tube_radius * (around.cos()[None, :, None] * radial[:, None]
                                          + around.sin()[None, :, None] * y_axis)
    count = segments + 1
    vertices = torch.cat([ring.reshape(-1, 3), path[[0, -1]]])
    j = torch.arange(tube_segments)
    jn = (j + 1) % tube_segments
    faces = []
    for i in range(segments):
        a, b = i * tube_segments + j, (i + 1) * tube_segments + j
        c, d = (i + 1) * tube_segments + jn, i * tube_segments + jn
        faces += [torch.stack([a, c, b], 1), torch.stack([a, d, c], 1)]
    start_cap, end_cap = count * tube_segments, count * tube_segments + 1
    last = (count - 1) * tube_segments
    faces += [
        torch.stack([torch.full_like(j, start_cap), j, jn], 1),
        torch.stack([torch.full_like(j, end_cap), last + jn, last + j], 1),
    ]
    mesh = Mesh(vertices.float(), torch.cat(faces))
    return mesh if _signed_volume(mesh) > 0 else Mesh(mesh.vertices, mesh.faces.flip(1))


def _signed_volume(mesh: Mesh) -> float:
    v = mesh.vertices.double()[mesh.faces]
    return float(torch.linalg.det(v).sum() / 6)


def _constant(color: tuple[float, float, float]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda points: torch.tensor(color).expand(points.shape[0], 3)


def _painted(mesh: Mesh, color_at: Callable[[torch.Tensor], torch.Tensor]) -> Mesh:
    return Mesh(mesh.vertices, mesh.faces, color_at(mesh.vertices))


def cone_shape() -> Shape:
    color = _constant((0.90, 0.80, 0.15))
    return Shape("cone", _painted(meshes.cone(0.35, 0.7, segments=48), color), color)


def table_shape() -> Shape:
    top_z, thickness, leg, bottom = 0.14, 0.06, 0.06, -0.20
    half_x, half_y = 0.38, 0.24
    parts = [cuboid((-half_x, -half_y, top_z), (half_x, half_y, top_z + thickness))]
    inset_x, inset_y = half_x - 0.04, half_y - 0.04
    for sx in (-1, 1):
        for sy in (-1, 1):
            x, y = sx * inset_x, sy * inset_y
            parts.append(cuboid((x - leg / 2, y - leg / 2, bottom), (x + leg / 2, y + leg / 2, top_z)))
    color = _constant((0.60, 0.40, 0.20))
    return Shape("table", _painted(concatenate(parts), color), color)


def rings_shape(gap: float = 0.04, major: float = 0.3, minor: float = 0.05) -> Shape:
    pitch = 2 * minor + gap
    parts = []
    for k in (-1, 0, 1):
        ring = meshes.torus(major, minor, segments=48, minor_segments=12)
        parts.append(Mesh(ring.vertices + torch.tensor([0.0, 0.0, k * pitch]), ring.faces))
    color = _constant((0.80, 0.65, 0.20))
    return Shape("rings", _painted(concatenate(parts), color), color)


def two_tone_shape(radius: float = 0.3, height: float = 0.6, band: float = 0.01) -> Shape:
    """A cylinder whose vertex rings at z = +-band make the red/blue boundary at z = 0 sharp."""
    h = height / 2
    profile = [(0.0, h), (radius, h), (radius, band), (radius, -band), (radius, -h), (0.0, -h)]
    mesh = meshes.revolve(profile, 48)  # the same revolve as the built-in shapes

    def color_at(points: torch.Tensor) -> torch.Tensor:
        return torch.where(points[:, 2:3] > 0, torch.tensor(RED), torch.tensor(BLUE))

    return Shape("two-tone", _painted(mesh, color_at), color_at, color_margin=0.05, color_boundaries=(0.0,))


def mug_shape(outer: float = 0.25, wall: float = 0.04, height: float = 0.5, floor: float = 0.05) -> Shape:
    h = height / 2
    inner = outer - wall
    body = meshes.revolve(
        [(0.0, -h + floor), (inner, -h + floor), (inner, h), (outer, h), (outer, -h), (0.0, -h)], 48
    )
    # Ends at x = outer - wall / 2: inside the wall, where the handle meets it.
    handle = tube_arc((outer - wall / 2, 0.0, 0.0), 0.14, 0.03, -90.0, 90.0)
    color = _constant((0.92, 0.92, 0.88))
    return Shape("mug", _painted(concatenate([body, handle]), color), color)


def shape_set() -> list[Shape]:
    """Every shape of the fidelity set, in a fixed order."""
    return [cone_shape(), table_shape(), rings_shape(), two_tone_shape(), mug_shape()]


__all__ = ["Shape", "shape_set", "concatenate", "cuboid", "tube_arc", "cone_shape", "table_shape", "rings_shape",
           "two_tone_shape", "mug_shape"]
