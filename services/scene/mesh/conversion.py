"""Coarse field -> DMTet SDF: the density level chosen from what the coarse model renders, floaters removed.

Public implementations take the isosurface at a fixed density or at the mean density, which breaks whenever the
field's density scale differs from the one the constant was tuned for (an empty mesh, or a bloated one). Here the
level is the one whose extracted surface best reproduces the coarse model's own silhouettes: the coarse field is
volume-rendered from fixed views, its opacity thresholded at 0.5, and each candidate level's marching-tetrahedra
mesh is rasterised from the same views; the level with the highest mean silhouette IoU wins, and is then refined
between its two neighbours (the first candidates are far apart, a factor of nearly 2 with 16 of them, and on thin
parts such a step moves the surface by about a grid cell). Of the levels whose IoU is within a tolerance of the
best one the highest (the thinnest surface) is taken: silhouettes at the coarse renders' resolution hardly tell
a grid cell of thickness apart (the table's slab, seen edge-on, is 3 pixels), while the fine stage grows a
too-thin part back far more readily than it thins a bloated one (issue 16, round 4). A level can be forced
instead (config `dmtet.level`).

The SDF is the density minus the level, rescaled to world units: divided by the median density gradient along
the grid edges that cross the surface (so that values near the surface approximate distances and the optimiser's
step sizes mean lengths), then clamped to a few cells so that deep inside and far outside stay easy to flip.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from services.scene.mesh.tets import marching_tets
from shared.cameras import Camera, orbit_camera
from shared.errors import FailedPrecondition
from shared.rasterize.base import Rasterizer, to_top_row_first
from shared.render import clip_positions

_TET_EDGE_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


@dataclass(frozen=True)
class LevelChoice:
    level: float
    silhouette_iou: float
    candidates: tuple[tuple[float, float], ...]  # (level, IoU); IoU NaN where the surface was empty


def level_views(radius: float, resolution: int, count: int = 8) -> list[Camera]:
    """Fixed views all round the scene box, alternating low and high elevations."""
    return [
        orbit_camera(360.0 * k / count, 10.0 if k % 2 == 0 else 45.0, 2.5 * radius, fovy_deg=45.0, size=resolution)
        for k in range(count)
    ]


def tet_edges(tets: torch.Tensor) -> torch.Tensor:
    """Unique undirected edges (E, 2) of a tetrahedral mesh."""
    pairs = torch.cat([tets[:, [a, b]] for a, b in _TET_EDGE_PAIRS]).sort(dim=1).values
    count_v = int(tets.max()) + 1
    keys = torch.unique(pairs[:, 0] * count_v + pairs[:, 1])
    return torch.stack([keys // count_v, keys % count_v], dim=1)


def silhouettes(
    vertices: torch.Tensor, faces: torch.Tensor, cameras: list[Camera], resolution: int, rasterizer: Rasterizer
) -> torch.Tensor:
    """(B, H, W) bool coverage, row 0 = top."""
    rast = rasterizer.rasterize(clip_positions(vertices, cameras), faces, (resolution, resolution))
    return to_top_row_first(rast[..., 3:4] > 0)[..., 0]


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over the batch of |a & b| / |a | b| (1 where both are empty)."""
    inter = (a & b).flatten(1).sum(1).double()
    union = (a | b).flatten(1).sum(1).double()
    return float(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).mean())


def candidate_levels(densities: torch.Tensor, count: int) -> list[float]:
    """Log-spaced levels between 0.1% and 95% of the highest density on the grid."""
    top = float(densities.max())
    if not top > 0:
        return []
    return np.geomspace(max(top * 1e-3, 1e-4), top * 0.95, count).tolist()


def refined_levels(scored: list[tuple[float, float]], count: int) -> list[float]:
    """`count` levels log-spaced strictly between the neighbours (in level order) of the best-scoring level of
    `scored` ((level, IoU) pairs, NaN for no surface); the best one's own side stands for a missing neighbour."""
    ranked = sorted((level, iou) for level, iou in scored if not np.isnan(iou))
    if count < 1 or len(ranked) < 2:
        return []
    best = max(range(len(ranked)), key=lambda i: ranked[i][1])
    low, high = ranked[max(best - 1, 0)][0], ranked[min(best + 1, len(ranked) - 1)][0]
    inner = np.geomspace(low, high, count + 2)[1:-1].tolist()
    return [level for level in inner if not np.isclose(level, ranked[best][0])]


def thinnest_within(valid: list[tuple[float, float]], tolerance: float) -> tuple[float, float]:
    """The highest level of `valid` (level, IoU) pairs whose IoU is at most `tolerance` below the best one's."""
    best = max(iou for _, iou in valid)
    return max((pair for pair in valid if pair[1] >= best - tolerance), key=lambda pair: pair[0])


@torch.no_grad()
def choose_level(
    densities: torch.Tensor,
    positions: torch.Tensor,
    tets: torch.Tensor,
    target_masks: torch.Tensor,
    cameras: list[Camera],
    rasterizer: Rasterizer,
    count: int = 16,
    levels: list[float] | None = None,
    refinements: int = 0,
    tolerance: float = 0.0,
) -> LevelChoice:
    """The candidate level whose marching-tets surface best matches `target_masks` (B, H, W) bool, row 0 = top.
    Candidates: `levels` if given, else `count` log-spaced levels (`candidate_levels`); then `refinements` more,
    log-spaced strictly between the best one's neighbours (`refined_levels`). The highest level within `tolerance`
    of the best mean silhouette IoU is taken (`thinnest_within`; 0: the best one)."""
    resolution = target_masks.shape[-1]

    def score(level: float) -> tuple[float, float]:
        vertices, faces = marching_tets(positions, densities - level, tets)
        if faces.shape[0] == 0:
            return level, float("nan")
        return level, mask_iou(silhouettes(vertices, faces, cameras, resolution, rasterizer), target_masks)

    scored = [score(level) for level in (candidate_levels(densities, count) if levels is None else levels)]
    scored += [score(level) for level in refined_levels(scored, refinements)]
    valid = [(level, iou) for level, iou in scored if not np.isnan(iou)]
    if not valid:
        top = float(densities.max()) if densities.numel() else float("nan")
        raise FailedPrecondition(
            f"the coarse field has no surface at any density level tried (highest density on the grid {top:.3g})",
            "dmtet.level",
        )
    level, iou = thinnest_within(valid, tolerance)
    return LevelChoice(level, iou, tuple(scored))


def connected_labels(count: int, edges: torch.Tensor) -> torch.Tensor:
    """Connected-component label (the smallest vertex index in the component) of each of `count` vertices joined
    by `edges` (E, 2): min-label propagation with pointer jumping, in torch (any device, no SciPy needed)."""
    labels = torch.arange(count, device=edges.device)
    a, b = edges[:, 0], edges[:, 1]
    while True:
        smaller = torch.minimum(labels[a], labels[b])
        updated = labels.scatter_reduce(0, a, smaller, reduce="amin").scatter_reduce(0, b, smaller, reduce="amin")
        updated = updated[updated]  # pointer jumping: follow labels to their own labels (fewer rounds)
        if torch.equal(updated, labels):
            return labels
        labels = updated


def remove_floaters(inside: torch.Tensor, edges: torch.Tensor, min_fraction: float) -> torch.Tensor:
    """`inside` (V,) bool with every connected inside component smaller than `min_fraction` of the largest one
    turned outside (components connect through grid edges)."""
    if not inside.any():
        return inside
    both_inside = edges[inside[edges[:, 0]] & inside[edges[:, 1]]]
    labels = connected_labels(inside.shape[0], both_inside)
    sizes = torch.bincount(labels[inside], minlength=inside.shape[0])
    small = sizes[labels] < min_fraction * sizes.max()
    return inside & ~small


def sdf_from_density(
    densities: torch.Tensor, level: float, cells: int, cell_size: float, edges: torch.Tensor, clamp_cells: float = 3.0
) -> torch.Tensor:
    """(densities - level) in approximate world units (see the module docstring), positive inside.

    `densities` are at the rest vertices of `tet_grid(cells, ...)`, i.e. a regular (cells+1)^3 lattice: the
    density gradient is taken by central differences on it, and its median over the ends of surface-crossing
    edges converts density to distance.
    """
    shifted = densities - level
    side = cells + 1
    gradients = torch.gradient(shifted.reshape(side, side, side), spacing=cell_size)
    magnitude = torch.stack(gradients, dim=-1).norm(dim=-1).reshape(-1)
    a, b = edges[:, 0], edges[:, 1]
    crossing = (shifted[a] > 0) != (shifted[b] > 0)
    ends = torch.cat([a[crossing], b[crossing]])
    scale = float(magnitude[ends].median()) if ends.numel() else float(magnitude.max())
    limit = clamp_cells * cell_size
    return (shifted / max(scale, 1e-12)).clamp(-limit, limit)
