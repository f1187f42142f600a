"""Tetrahedral grids generated at run time, and differentiable marching tetrahedra.

Grid: each cube of an N^3 grid over [-r, r]^3 is split into 6 tetrahedra, one per ordering of the axes (the path
low corner -> +e_a -> +e_a +e_b -> high corner), all with positive volume. Neighbouring cubes share faces exactly,
so the extracted surface is watertight. N cells match the vertex spacing of the public "2N" Quartet grids.

Marching tetrahedra (the DMTet surface, after nvdiffrec's formulation): the SDF is positive inside. Each tetrahedron
whose vertices' signs differ emits one or two triangles whose vertices lie on its sign-changing edges, at the
linear zero crossing p = (p_a s_b - p_b s_a) / (s_b - s_a), which is differentiable in the SDF values and in the
(deformed) vertex positions. Crossing vertices are shared between tetrahedra through their global edge, so the mesh
is watertight where the SDF is, and triangles are wound counter-clockwise seen from outside.
"""

from __future__ import annotations

import itertools

import torch

# For each of the 16 sign patterns (bit i = vertex i inside): triangles as indices into the tet's 6 edges.
_TRIANGLES = torch.tensor(
    [
        [-1, -1, -1, -1, -1, -1],
        [1, 0, 2, -1, -1, -1],
        [4, 0, 3, -1, -1, -1],
        [1, 4, 2, 1, 3, 4],
        [3, 1, 5, -1, -1, -1],
        [2, 3, 0, 2, 5, 3],
        [1, 4, 0, 1, 5, 4],
        [4, 2, 5, -1, -1, -1],
        [4, 5, 2, -1, -1, -1],
        [4, 1, 0, 4, 5, 1],
        [3, 2, 0, 3, 5, 2],
        [1, 3, 5, -1, -1, -1],
        [4, 1, 2, 4, 3, 1],
        [3, 0, 4, -1, -1, -1],
        [2, 0, 1, -1, -1, -1],
        [-1, -1, -1, -1, -1, -1],
    ],
    dtype=torch.long,
)
_TRIANGLE_COUNT = torch.tensor([0, 1, 1, 2, 1, 2, 2, 1, 1, 2, 2, 1, 2, 1, 1, 0], dtype=torch.long)
_TET_EDGES = torch.tensor([0, 1, 0, 2, 0, 3, 1, 2, 1, 3, 2, 3], dtype=torch.long)  # 6 edges as vertex pairs


def tet_grid(cells: int, radius: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertices ((cells+1)^3, 3) over [-radius, radius]^3 and tetrahedra (6 cells^3, 4), positive volume."""
    if cells < 1:
        raise ValueError(f"cells must be >= 1, got {cells}")
    side = cells + 1
    axis = torch.linspace(-radius, radius, side)
    vertices = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    ijk = torch.stack(torch.meshgrid(*(torch.arange(cells),) * 3, indexing="ij"), dim=-1).reshape(-1, 3)

    def index(offset: tuple[int, int, int]) -> torch.Tensor:
        c = ijk + torch.tensor(offset)
        return (c[:, 0] * side + c[:, 1]) * side + c[:, 2]

    tets = []
    for order in itertools.permutations(range(3)):
        path, corner = [(0, 0, 0)], [0, 0, 0]
        for axis_index in order:
            corner[axis_index] = 1
            path.append(tuple(corner))
        tets.append(torch.stack([index(p) for p in path], dim=1))
    tets = torch.cat(tets)
    # Odd axis orderings come out with negative volume: swap two vertices to make every tetrahedron positive.
    a, b, c, d = (vertices[tets[:, i]] for i in range(4))
    negative = (torch.linalg.cross(b - a, c - a) * (d - a)).sum(-1) < 0
    tets[negative] = tets[negative][:, [0, 2, 1, 3]]
    return vertices, tets


def marching_tets(
    positions: torch.Tensor, sdf: torch.Tensor, tets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Surface (vertices (M, 3), faces (F, 3)) of {sdf > 0}; vertices are differentiable in positions and sdf."""
    with torch.no_grad():
        inside = sdf > 0
        inside_tets = inside[tets]  # (T, 4)
        count = inside_tets.sum(-1)
        crossing = (count > 0) & (count < 4)
        edges = tets[crossing][:, _TET_EDGES].reshape(-1, 2).sort(dim=1).values
        # Unique edges through one int64 key per edge: much faster than torch.unique(dim=0)'s row sort.
        count_v = positions.shape[0]
        keys, edge_of = torch.unique(edges[:, 0] * count_v + edges[:, 1], return_inverse=True)
        unique_edges = torch.stack([keys // count_v, keys % count_v], dim=1)
        changes = inside[unique_edges].sum(-1) == 1
        vertex_of_edge = torch.full((unique_edges.shape[0],), -1, dtype=torch.long, device=sdf.device)
        vertex_of_edge[changes] = torch.arange(int(changes.sum()), device=sdf.device)
        tet_edge_vertex = vertex_of_edge[edge_of].reshape(-1, 6)  # (T', 6) crossing vertex per tet edge
        ends = unique_edges[changes]  # (M, 2)
        pattern = (inside_tets[crossing].long() * (2 ** torch.arange(4, device=sdf.device))).sum(-1)

    p0, p1 = positions[ends[:, 0]], positions[ends[:, 1]]
    s0, s1 = sdf[ends[:, 0]][:, None], sdf[ends[:, 1]][:, None]
    vertices = (p0 * s1 - p1 * s0) / (s1 - s0)

    triangles = _TRIANGLES.to(sdf.device)[pattern]
    counts = _TRIANGLE_COUNT.to(sdf.device)[pattern]
    one = torch.gather(tet_edge_vertex[counts == 1], 1, triangles[counts == 1][:, :3]).reshape(-1, 3)
    two = torch.gather(tet_edge_vertex[counts == 2], 1, triangles[counts == 2][:, :6]).reshape(-1, 3)
    # The table winds triangles clockwise seen from the positive (inside) side; reverse them to face outwards.
    return vertices, torch.cat([one, two])[:, [0, 2, 1]]
