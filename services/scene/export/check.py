"""Topological and geometric sanity checks of a triangle mesh, run on the welded mesh before UV unwrapping.

Unwrapping splits vertices along chart seams, after which every seam edge looks like a boundary; so the checks
must see the original (welded) index buffer. They are purely topological on the indices: two vertices at the
same position but with different indices are different vertices (nothing is welded here).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


@dataclass(frozen=True)
class MeshReport:
    """What `check_mesh` found. `outward` is None when the mesh is not watertight (volume is then undefined)."""

    num_vertices: int
    num_faces: int
    watertight: bool  # every undirected edge is shared by exactly two faces
    consistently_wound: bool  # every edge shared by two faces is traversed in opposite directions by them
    outward: bool | None  # signed volume > 0 (only decided for watertight, consistently wound meshes)
    signed_volume: float  # sum of v0 . (v1 x v2) / 6 over faces, in world units cubed
    n_components: int  # connected components of faces (through shared vertices)
    n_boundary_edges: int  # edges used by one face
    n_nonmanifold_edges: int  # edges used by three or more faces
    n_inconsistent_edges: int  # two-face edges traversed in the same direction by both faces
    n_degenerate_faces: int  # faces that repeat a vertex index
    n_unreferenced_vertices: int
    bbox_min: tuple[float, float, float]  # over referenced vertices
    bbox_max: tuple[float, float, float]
    centre: tuple[float, float, float]  # centre of the bounding box

    @property
    def extent(self) -> tuple[float, float, float]:
        return tuple(hi - lo for lo, hi in zip(self.bbox_min, self.bbox_max))  # type: ignore[return-value]


def validate_mesh(vertices: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (vertices float32 (V, 3), faces int64 (F, 3)) or raises ValueError saying what is wrong."""
    vertices = torch.as_tensor(vertices)
    faces = torch.as_tensor(faces)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices must be a (V, 3) tensor, got shape {list(vertices.shape)}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must be an (F, 3) tensor, got shape {list(faces.shape)}")
    if faces.shape[0] == 0:
        raise ValueError("the mesh is empty: it has no faces")
    if faces.is_floating_point() or faces.dtype == torch.bool:
        raise ValueError(f"faces must hold integer vertex indices, got dtype {faces.dtype}")
    if not vertices.is_floating_point():
        raise ValueError(f"vertices must be floating point, got dtype {vertices.dtype}")
    faces = faces.long()
    if int(faces.min()) < 0 or int(faces.max()) >= vertices.shape[0]:
        raise ValueError(
            f"faces index vertices out of range: indices span [{int(faces.min())}, {int(faces.max())}] "
            f"but there are {vertices.shape[0]} vertices"
        )
    vertices = vertices.float()
    if not bool(torch.isfinite(vertices).all()):
        raise ValueError("vertices contain NaN or Inf")
    return vertices, faces


def check_mesh(vertices: torch.Tensor, faces: torch.Tensor) -> MeshReport:
    """Watertightness, winding consistency, orientation, components and bounds of (vertices, faces)."""
    vertices, faces = validate_mesh(vertices, faces)
    verts = vertices.detach().cpu().double().numpy()
    tris = faces.detach().cpu().numpy()
    num_vertices = verts.shape[0]

    # Directed edges a->b of every face; an undirected edge is keyed by (min, max).
    a = tris.reshape(-1)
    b = tris[:, [1, 2, 0]].reshape(-1)
    proper = a != b  # edges of degenerate faces (a == b) are not edges
    a, b = a[proper], b[proper]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    keys = lo.astype(np.int64) * num_vertices + hi
    unique, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    # Orientation sum per undirected edge: +1 for lo->hi, -1 for hi->lo. Opposite traversals cancel.
    forward = np.where(a < b, 1, -1)
    orientation = np.zeros(unique.shape[0], dtype=np.int64)
    np.add.at(orientation, inverse, forward)
    n_boundary = int((counts == 1).sum())
    n_nonmanifold = int((counts > 2).sum())
    n_inconsistent = int(((counts == 2) & (orientation != 0)).sum())

    degenerate = (tris[:, 0] == tris[:, 1]) | (tris[:, 1] == tris[:, 2]) | (tris[:, 2] == tris[:, 0])
    watertight = n_boundary == 0 and n_nonmanifold == 0
    consistent = n_inconsistent == 0
    v0, v1, v2 = verts[tris[:, 0]], verts[tris[:, 1]], verts[tris[:, 2]]
    volume = float(np.einsum("ij,ij->", v0, np.cross(v1, v2)) / 6.0)
    outward = (volume > 0) if (watertight and consistent) else None

    referenced = np.zeros(num_vertices, dtype=bool)
    referenced[tris.reshape(-1)] = True
    used = verts[referenced]
    low, high = used.min(axis=0), used.max(axis=0)
    return MeshReport(
        num_vertices=num_vertices,
        num_faces=int(tris.shape[0]),
        watertight=watertight,
        consistently_wound=consistent,
        outward=outward,
        signed_volume=volume,
        n_components=_count_components(tris, referenced),
        n_boundary_edges=n_boundary,
        n_nonmanifold_edges=n_nonmanifold,
        n_inconsistent_edges=n_inconsistent,
        n_degenerate_faces=int(degenerate.sum()),
        n_unreferenced_vertices=int((~referenced).sum()),
        bbox_min=_triple(low),
        bbox_max=_triple(high),
        centre=_triple((low + high) / 2),
    )


def _count_components(tris: np.ndarray, referenced: np.ndarray) -> int:
    """Connected components of the vertex graph, counted over referenced vertices only."""
    n = referenced.shape[0]
    rows = tris.reshape(-1)
    cols = tris[:, [1, 2, 0]].reshape(-1)
    graph = coo_matrix((np.ones(rows.shape[0], dtype=np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return int(np.unique(labels[referenced]).shape[0])


def _triple(values: np.ndarray) -> tuple[float, float, float]:
    return (float(values[0]), float(values[1]), float(values[2]))
