from __future__ import annotations

import pytest
import torch
import trimesh

from shared.mesh_metrics import bounding_box_diagonal, mean_symmetric_surface_distance, volumetric_iou, winding_number


def _mesh(tm: trimesh.Trimesh):
    return torch.tensor(tm.vertices, dtype=torch.float32), torch.tensor(tm.faces)


def test_concentric_spheres_have_known_scores():
    v, f = _mesh(trimesh.creation.icosphere(3, radius=0.4))
    # IoU of radius r and 1.1 r balls = 1 / 1.1^3; the surface distance is 0.1 r (up to tessellation).
    assert volumetric_iou(v, f, v * 1.1, f, resolution=48) == pytest.approx(1 / 1.331, abs=0.01)
    assert mean_symmetric_surface_distance(v, f, v * 1.1, f, samples=4000) == pytest.approx(0.04, abs=0.002)
    assert bounding_box_diagonal(v) == pytest.approx(0.8 * 3**0.5, rel=0.01)


def test_torus_hole_is_outside():
    v, f = _mesh(trimesh.creation.torus(0.32, 0.12))
    inside = winding_number(torch.tensor([[0.0, 0.0, 0.0], [0.32, 0.0, 0.0], [0.0, 0.0, 0.3]]), v, f)
    assert inside.tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-3)
    torus_volume = 2 * torch.pi**2 * 0.32 * 0.12**2
    ball_v, ball_f = _mesh(trimesh.creation.icosphere(3, radius=0.5))
    # The torus lies inside the ball: IoU = torus volume / ball volume.
    expected = torus_volume / (4 / 3 * torch.pi * 0.5**3)
    assert volumetric_iou(v, f, ball_v, ball_f, resolution=48) == pytest.approx(float(expected), abs=0.02)
