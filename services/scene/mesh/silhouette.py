"""A soft silhouette of a triangle mesh (SoftRas-style), differentiable w.r.t. the vertices: what carries the
reference mask loss to the fine stage's geometry when the rasteriser's coverage has no gradient (the pure-PyTorch
rasteriser; nvdiffrast's antialiasing gives edge gradients to colour only).

Each face covers pixel q by sigmoid(-d(q) / sigma), d the signed screen-space distance from q's centre to the
projected triangle (negative inside); the pixel's coverage is the largest over the faces (the nearest edge decides:
SoftRas's probabilistic union over every face would grow the silhouette where many layers overlap). Each face is only
evaluated over a square window of pixels around its bounding box (a few sigma of margin), so the cost is
faces x window^2, not faces x pixels.
"""

from __future__ import annotations

import torch

from shared.cameras import Camera
from shared.rasterize.base import to_top_row_first
from shared.render import clip_positions

MAX_WINDOW = 24  # pixels per side: a face larger on screen than this contributes only near its window


def soft_silhouette(
    vertices: torch.Tensor, faces: torch.Tensor, cameras: list[Camera], resolution: int, sigma_px: float = 0.5
) -> torch.Tensor:
    """(B, 1, H, W) coverage in [0, 1], row 0 = top, differentiable w.r.t. `vertices` (V, 3)."""
    size = resolution
    clip = clip_positions(vertices, cameras)  # (B, V, 4)
    w = clip[..., 3:].clamp_min(1e-6)
    pixels = (clip[..., :2] / w + 1.0) * 0.5 * size  # (B, V, 2), x right, y up; pixel centres at i + 0.5
    tri = pixels[:, faces]  # (B, F, 3, 2)
    in_front = (clip[..., 3] > 1e-6)[:, faces].all(dim=-1)  # (B, F)
    pad = 3.0 * sigma_px + 1.0
    low = torch.floor(tri.detach().amin(dim=2) - pad)  # (B, F, 2)
    extent = float((tri.detach().amax(dim=2) - tri.detach().amin(dim=2)).max()) if faces.shape[0] else 0.0
    window = int(min(MAX_WINDOW, max(1, int(extent + 2 * pad + 2))))
    offsets = torch.arange(window, device=vertices.device, dtype=vertices.dtype)
    grid = torch.stack(torch.meshgrid(offsets, offsets, indexing="xy"), dim=-1).reshape(-1, 2)  # (K, 2) (x, y)
    cells = low[:, :, None, :] + grid[None, None]  # (B, F, K, 2) integer pixel indices
    centres = cells + 0.5
    distance = _signed_distance(centres, tri)  # (B, F, K)
    inside_image = ((cells >= 0) & (cells < size)).all(dim=-1) & in_front[..., None]
    covered = torch.sigmoid(-distance / sigma_px) * inside_image
    index = (cells[..., 1].clamp(0, size - 1) * size + cells[..., 0].clamp(0, size - 1)).long()
    batch = clip.shape[0]
    coverage = torch.zeros(batch, size * size, dtype=vertices.dtype, device=vertices.device)
    coverage = coverage.scatter_reduce(1, index.reshape(batch, -1), covered.reshape(batch, -1), reduce="amax")
    return to_top_row_first(coverage.reshape(batch, size, size, 1)).permute(0, 3, 1, 2)


def _signed_distance(points: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Signed distance from points (B, F, K, 2) to triangles (B, F, 3, 2): negative inside, either winding."""
    a, b, c = (tri[:, :, i, None, :] for i in range(3))  # (B, F, 1, 2)
    distances, signs = [], []
    for start, end in ((a, b), (b, c), (c, a)):
        edge = end - start
        rel = points - start
        t = ((rel * edge).sum(-1) / (edge * edge).sum(-1).clamp_min(1e-12)).clamp(0.0, 1.0)
        closest = start + t[..., None] * edge
        distances.append((points - closest).pow(2).sum(-1).clamp_min(1e-12).sqrt())
        signs.append(edge[..., 0] * rel[..., 1] - edge[..., 1] * rel[..., 0])
    nearest = torch.stack(distances).amin(dim=0)
    cross = torch.stack(signs)
    inside = (cross >= 0).all(dim=0) | (cross <= 0).all(dim=0)
    return torch.where(inside, -nearest, nearest)


__all__ = ["soft_silhouette"]
