"""Mesh regularisers of the fine stage (Magic3D / threestudio): normal consistency and Laplacian smoothing.

Both are computed on the marching-tetrahedra mesh of the current step, so their gradients reach the SDF and the
vertex offsets through the crossing vertices.
"""

from __future__ import annotations

import torch

from shared.meshes import face_normals


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals (V, 3), differentiable."""
    normals = face_normals(vertices, faces)
    accumulated = torch.zeros_like(vertices).index_add(0, faces.reshape(-1), normals.repeat_interleave(3, dim=0))
    return torch.nn.functional.normalize(accumulated, dim=-1, eps=1e-12)


def interior_edge_faces(faces: torch.Tensor) -> torch.Tensor:
    """Pairs of faces (P, 2) sharing an edge (each undirected edge shared by exactly two faces)."""
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(dim=1).values
    face_of = torch.arange(faces.shape[0], device=faces.device).repeat(3)
    keys = edges[:, 0] * (int(faces.max()) + 1) + edges[:, 1]
    _, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    shared = counts[inverse[order]] == 2
    pairs = face_of[order][shared].reshape(-1, 2)
    return pairs


def normal_consistency(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Mean (1 - cos) between the normals of faces sharing an edge: penalises creases and noise."""
    if faces.shape[0] == 0:
        return vertices.sum() * 0.0
    normals = torch.nn.functional.normalize(face_normals(vertices, faces), dim=-1, eps=1e-12)
    pairs = interior_edge_faces(faces.detach())
    if pairs.shape[0] == 0:
        return vertices.sum() * 0.0
    return (1.0 - (normals[pairs[:, 0]] * normals[pairs[:, 1]]).sum(-1)).mean()


def laplacian_smoothness(vertices: torch.Tensor, faces: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Mean squared length of the uniform Laplacian (vertex minus the mean of its neighbours), divided by scale^2
    so that the weight does not depend on the grid's cell size (pass the cell size as `scale`)."""
    if faces.shape[0] == 0:
        return vertices.sum() * 0.0
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    both = torch.cat([edges, edges.flip(1)])
    count_v = vertices.shape[0]
    keys = torch.unique(both[:, 0] * count_v + both[:, 1])  # both directions, each once
    edges = torch.stack([keys // count_v, keys % count_v], dim=1)
    sums = torch.zeros_like(vertices).index_add(0, edges[:, 0], vertices[edges[:, 1]])
    degree = torch.zeros(vertices.shape[0], device=vertices.device, dtype=vertices.dtype)
    degree = degree.index_add(0, edges[:, 0], torch.ones_like(edges[:, 0], dtype=vertices.dtype)).clamp(min=1)
    laplacian = vertices - sums / degree[:, None]
    return (laplacian.square().sum(-1)).mean() / (scale * scale)
