"""The fine stage's geometry: a deformable tetrahedral grid carrying an SDF (DMTet, as in Magic3D).

Parameters, one per grid vertex:
* `sdf` (V,): signed distance, positive inside (the convention of `marching_tets`), in world units.
* `deformation` (V, 3): unbounded; the vertex moves by `max_offset * tanh(deformation)`, so every vertex stays
  within `max_offset` (a fraction of a cell, half by default as in DMTet) of its rest position and tetrahedra
  cannot invert.

Every call to `surface()` runs differentiable marching tetrahedra: the triangles' vertices are differentiable in
both the SDF values and the deformed positions of the sign-changing edges' ends.
"""

from __future__ import annotations

import torch
from torch import nn

from services.scene.mesh.tets import marching_tets, tet_grid


class DMTetGeometry(nn.Module):
    def __init__(self, cells: int, radius: float, max_offset_cells: float = 0.5) -> None:
        super().__init__()
        if cells < 2:
            raise ValueError(f"the tetrahedral grid needs at least 2 cells per side, got {cells}")
        if not 0 <= max_offset_cells <= 0.5:
            raise ValueError(f"max_offset_cells must be within [0, 0.5] (larger offsets can invert tets), got {max_offset_cells}")
        self.cells = cells
        self.radius = radius
        self.cell_size = 2.0 * radius / cells
        self.max_offset = max_offset_cells * self.cell_size
        positions, tets = tet_grid(cells, radius)
        self.register_buffer("rest_positions", positions, persistent=False)  # regenerated from (cells, radius)
        self.register_buffer("tets", tets, persistent=False)
        self.sdf = nn.Parameter(torch.zeros(positions.shape[0]))
        self.deformation = nn.Parameter(torch.zeros_like(positions))

    @property
    def positions(self) -> torch.Tensor:
        """Deformed grid vertices (V, 3)."""
        return self.rest_positions + self.max_offset * torch.tanh(self.deformation)

    @torch.no_grad()
    def has_surface(self) -> bool:
        """Whether `surface()` has faces, without marching: one comparison and one sum over the grid's vertices (and
        one host read of the count). Exact for this grid: a tetrahedron emits triangles iff its vertices' signs
        differ (all 14 mixed patterns emit one or two), every vertex belongs to a tetrahedron, and the tetrahedra's
        edges connect the whole grid, so some tetrahedron is mixed iff some vertex is inside and another is not.
        "Inside" is `sdf > 0`, as in `marching_tets` (a NaN counts as outside in both). The deformation never
        changes the count."""
        inside = int((self.sdf > 0).sum())
        return 0 < inside < self.sdf.numel()

    def surface(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(vertices (M, 3), faces (F, 3)) of {sdf > 0}, outward-wound, watertight where the SDF is."""
        return marching_tets(self.positions, self.sdf, self.tets)
