"""Tetrahedral grid and differentiable marching tetrahedra: watertight, outward-wound, accurate, differentiable."""

from __future__ import annotations

import math

import pytest
import torch

from services.scene.mesh.tets import marching_tets, tet_grid


def signed_volume(vertices: torch.Tensor, faces: torch.Tensor) -> float:
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    return float((a * torch.linalg.cross(b, c)).sum() / 6)


def test_grid_fills_the_box_with_positive_tetrahedra():
    vertices, tets = tet_grid(4, radius=1.0)
    assert vertices.shape == (125, 3) and tets.shape == (6 * 64, 4)
    a, b, c, d = (vertices[tets[:, i]] for i in range(4))
    volumes = (torch.linalg.cross(b - a, c - a) * (d - a)).sum(-1) / 6
    assert bool((volumes > 0).all())
    assert float(volumes.sum()) == pytest.approx(8.0, rel=1e-5)  # the 2x2x2 box, no gaps or overlaps


def test_sphere_surface_is_watertight_outward_and_accurate():
    radius = 0.6
    vertices, tets = tet_grid(24, radius=1.0)
    sdf = radius - vertices.norm(dim=1)  # positive inside
    surface, faces = marching_tets(vertices, sdf, tets)
    # Watertight and consistently wound: every directed edge appears once, with its reverse once.
    directed = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    keys = directed[:, 0] * surface.shape[0] + directed[:, 1]
    reverse = directed[:, 1] * surface.shape[0] + directed[:, 0]
    assert torch.unique(keys).numel() == keys.numel()
    assert bool(torch.isin(reverse, keys).all())
    # Outward: positive enclosed volume, close to the ball's.
    assert signed_volume(surface, faces) == pytest.approx(4 / 3 * math.pi * radius**3, rel=0.03)
    assert float((surface.norm(dim=1) - radius).abs().max()) < 0.02


def test_gradients_reach_sdf_and_vertex_positions():
    vertices, tets = tet_grid(8)
    offsets = torch.zeros_like(vertices, requires_grad=True)
    sdf = (0.5 - vertices.norm(dim=1)).requires_grad_(True)
    surface, faces = marching_tets(vertices + offsets, sdf, tets)
    signed_volume_tensor = (surface[faces[:, 0]] * torch.linalg.cross(surface[faces[:, 1]], surface[faces[:, 2]])).sum()
    signed_volume_tensor.backward()
    assert torch.isfinite(sdf.grad).all() and sdf.grad.abs().sum() > 0
    assert torch.isfinite(offsets.grad).all() and offsets.grad.abs().sum() > 0
    # Raising the SDF everywhere grows the solid: the volume's gradient w.r.t. the SDF is non-negative.
    assert float(sdf.grad.sum()) > 0


def test_empty_and_full_fields_give_no_surface():
    vertices, tets = tet_grid(4)
    for value in (-1.0, 1.0):
        surface, faces = marching_tets(vertices, torch.full((vertices.shape[0],), value), tets)
        assert surface.shape[0] == 0 and faces.shape[0] == 0
