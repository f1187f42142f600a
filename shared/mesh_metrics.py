"""Geometry scores of a mesh against a reference: mean symmetric surface distance and volumetric IoU.

Both work on plain (vertices, faces) tensors. Inside/outside uses the generalised winding number (Jacobson et al.
2013), which is exact for closed meshes and degrades gracefully on small holes.
"""

from __future__ import annotations

import math

import torch

from shared.meshes import face_normals


def sample_surface(vertices: torch.Tensor, faces: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` points uniformly distributed by area on the surface."""
    tri = vertices[faces].double()  # (F, 3, 3)
    areas = face_normals(vertices.double(), faces).norm(dim=1) / 2
    chosen = torch.multinomial(areas / areas.sum(), count, replacement=True, generator=generator)
    u, v = torch.rand(count, generator=generator, dtype=torch.float64), torch.rand(count, generator=generator, dtype=torch.float64)
    flip = u + v > 1
    u, v = torch.where(flip, 1 - u, u), torch.where(flip, 1 - v, v)
    t = tri[chosen]
    return (t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])).float()


def _nearest_distance(queries: torch.Tensor, points: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    return torch.cat([torch.cdist(q, points).min(dim=1).values for q in queries.split(chunk)])


def mean_symmetric_surface_distance(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    ref_vertices: torch.Tensor,
    ref_faces: torch.Tensor,
    samples: int = 20000,
    seed: int = 0,
) -> float:
    """(mean over A of d(a, B) + mean over B of d(b, A)) / 2, by surface sampling. Same units as the vertices."""
    generator = torch.Generator().manual_seed(seed)
    a = sample_surface(vertices, faces, samples, generator)
    b = sample_surface(ref_vertices, ref_faces, samples, generator)
    return float((_nearest_distance(a, b).mean() + _nearest_distance(b, a).mean()) / 2)


def winding_number(points: torch.Tensor, vertices: torch.Tensor, faces: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Generalised winding number of each point: ~1 inside a closed outward-wound mesh, ~0 outside."""
    tri = vertices[faces].float()
    out = []
    for q in points.float().split(chunk):
        # Per-component (Q, F) planes keep the intermediates small and the arithmetic vectorised.
        ax, ay, az = (tri[None, :, 0, k] - q[:, k, None] for k in range(3))
        bx, by, bz = (tri[None, :, 1, k] - q[:, k, None] for k in range(3))
        cx, cy, cz = (tri[None, :, 2, k] - q[:, k, None] for k in range(3))
        la = (ax * ax + ay * ay + az * az).sqrt()
        lb = (bx * bx + by * by + bz * bz).sqrt()
        lc = (cx * cx + cy * cy + cz * cz).sqrt()
        det = ax * (by * cz - bz * cy) - ay * (bx * cz - bz * cx) + az * (bx * cy - by * cx)
        ab, bc, ca = ax * bx + ay * by + az * bz, bx * cx + by * cy + bz * cz, cx * ax + cy * ay + cz * az
        denom = la * lb * lc + ab * lc + bc * la + ca * lb
        out.append(torch.atan2(det, denom).sum(dim=1) / (2 * math.pi))
    return torch.cat(out)


def voxelize(vertices: torch.Tensor, faces: torch.Tensor, low: torch.Tensor, high: torch.Tensor, resolution: int) -> torch.Tensor:
    """Inside/outside at the centres of a resolution^3 grid over [low, high], by ray parity along +Z per column.

    Exact for closed meshes (a column through an edge is avoided by a tiny offset of the columns).
    """
    step = (high - low) / resolution
    centres = [low[k] + step[k] * (torch.arange(resolution) + 0.5) for k in range(3)]
    gx, gy = torch.meshgrid(centres[0] + 1e-7, centres[1] - 1.3e-7, indexing="ij")
    columns = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1).double()  # (C, 2)
    tri = vertices[faces].double()  # (F, 3, 3)
    x0, y0, x1, y1, x2, y2 = tri[:, 0, 0], tri[:, 0, 1], tri[:, 1, 0], tri[:, 1, 1], tri[:, 2, 0], tri[:, 2, 1]
    area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    keep = area.abs() > 1e-18
    tri, area = tri[keep], area[keep]
    x0, y0, x1, y1, x2, y2 = tri[:, 0, 0], tri[:, 0, 1], tri[:, 1, 0], tri[:, 1, 1], tri[:, 2, 0], tri[:, 2, 1]
    z = centres[2].double()
    counts = torch.zeros(columns.shape[0], resolution + 1, dtype=torch.int64)
    chunk = max(1, 2**23 // max(1, tri.shape[0]))
    for first in range(0, columns.shape[0], chunk):
        cols = columns[first : first + chunk]
        px, py = cols[:, :1], cols[:, 1:]
        w0 = ((x1 - px) * (y2 - py) - (x2 - px) * (y1 - py)) / area
        w1 = ((x2 - px) * (y0 - py) - (x0 - px) * (y2 - py)) / area
        w2 = 1 - w0 - w1
        col, face = torch.nonzero((w0 >= 0) & (w1 >= 0) & (w2 >= 0), as_tuple=True)  # sparse hits
        z_hit = w0[col, face] * tri[face, 0, 2] + w1[col, face] * tri[face, 1, 2] + w2[col, face] * tri[face, 2, 2]
        # A hit at height h lies above every centre z_k < h: bin it at k = #centres below h, then suffix-sum.
        below = torch.searchsorted(z, z_hit)
        counts.index_put_((col + first, below), torch.ones_like(below), accumulate=True)
    above = counts.flip(1).cumsum(1).flip(1)[:, 1:]  # hits strictly above each centre
    return (above % 2 == 1).reshape(resolution, resolution, resolution)


def volumetric_iou(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    ref_vertices: torch.Tensor,
    ref_faces: torch.Tensor,
    resolution: int = 64,
) -> float:
    """IoU of the two solids on a resolution^3 grid over the union of their bounding boxes."""
    both = torch.cat([vertices, ref_vertices])
    low, high = both.min(dim=0).values, both.max(dim=0).values
    pad = (high - low) * 0.01
    low, high = low - pad, high + pad
    inside = voxelize(vertices, faces, low, high, resolution)
    inside_ref = voxelize(ref_vertices, ref_faces, low, high, resolution)
    union = (inside | inside_ref).sum()
    return float((inside & inside_ref).sum() / union) if union > 0 else 0.0


def bounding_box_diagonal(vertices: torch.Tensor) -> float:
    return float((vertices.max(dim=0).values - vertices.min(dim=0).values).norm())
