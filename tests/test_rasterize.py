"""The pure-PyTorch rasteriser against hand computations, finite differences and known projected areas."""

from __future__ import annotations

import math

import pytest
import torch

from shared import meshes
from shared.cameras import orbit_camera
from shared.rasterize import make_rasterizer
from shared.rasterize.base import coverage
from shared.render import clip_positions, render_mesh

SIDE = 16


@pytest.fixture(scope="module")
def rasterizer():
    return make_rasterizer("torch")


def pixel_centre(row: int, col: int, side: int = SIDE) -> tuple[float, float]:
    """nvdiffrast convention: row 0 is the bottom row (y = -1 side)."""
    return (2 * col + 1) / side - 1, (2 * row + 1) / side - 1


def test_single_triangle_coverage_and_barycentrics(rasterizer):
    pos = torch.tensor([[[-0.5, -0.5, 0.0, 1.0], [0.5, -0.5, 0.0, 1.0], [0.0, 0.5, 0.0, 1.0]]])
    tri = torch.tensor([[0, 1, 2]])
    rast = rasterizer.rasterize(pos, tri, (SIDE, SIDE))
    assert rast.shape == (1, SIDE, SIDE, 4)
    for row in range(SIDE):
        for col in range(SIDE):
            x, y = pixel_centre(row, col)
            # Weights (w0, w1, w2) of vertices a, b, c: (x, y) = a + w1 (b - a) + w2 (c - a).
            w2 = y + 0.5
            w1 = x + 0.5 - 0.5 * w2
            w0 = 1 - w1 - w2
            inside = min(w0, w1, w2) > 1e-6
            assert bool(rast[0, row, col, 3] > 0) == inside, (row, col)
            if inside:  # nvdiffrast's convention: u weights vertex 0, v vertex 1
                assert rast[0, row, col, 0].item() == pytest.approx(w0, abs=1e-5)
                assert rast[0, row, col, 1].item() == pytest.approx(w1, abs=1e-5)


def test_nearer_triangle_wins(rasterizer):
    square = [[-1, -1], [1, -1], [0, 1]]
    pos = torch.tensor([[[x, y, 0.5, 1.0] for x, y in square] + [[x, y, -0.5, 1.0] for x, y in square]])
    rast = rasterizer.rasterize(pos, torch.tensor([[0, 1, 2], [3, 4, 5]]), (SIDE, SIDE))
    ids = rast[0, ..., 3][rast[0, ..., 3] > 0]
    assert ids.numel() > 0 and bool((ids == 2).all())  # triangle index 1 (+1) has the smaller depth
    assert torch.allclose(rast[0, ..., 2][rast[0, ..., 3] > 0], torch.tensor(-0.5))


def test_gradients_match_finite_differences(rasterizer):
    generator = torch.Generator().manual_seed(0)
    pos = torch.tensor(
        [[[-0.7, -0.6, 0.1, 1.2], [0.8, -0.5, -0.2, 0.9], [0.1, 0.7, 0.3, 1.1]]], dtype=torch.float64
    )
    tri = torch.tensor([[0, 1, 2]])
    attr = torch.rand(1, 3, 2, generator=generator, dtype=torch.float64)
    probe = torch.rand(1, SIDE, SIDE, 2, generator=generator, dtype=torch.float64)
    rast0 = rasterizer.rasterize(pos, tri, (SIDE, SIDE))
    covered = coverage(rast0)

    def loss(p, a):
        rast = rasterizer.rasterize(p, tri, (SIDE, SIDE))
        assert torch.equal(coverage(rast), covered)  # interior pixels only: coverage must not change
        return (rasterizer.interpolate(a, rast, tri) * probe).sum() + rast[..., 2].sum()

    p, a = pos.clone().requires_grad_(True), attr.clone().requires_grad_(True)
    grad_p, grad_a = torch.autograd.grad(loss(p, a), (p, a))
    assert grad_p.abs().sum() > 0 and grad_a.abs().sum() > 0
    eps = 1e-6
    for index in [(0, 0, 0), (0, 1, 1), (0, 2, 3), (0, 2, 0)]:
        bumped = pos.clone()
        bumped[index] += eps
        lowered = pos.clone()
        lowered[index] -= eps
        numeric = (loss(bumped, attr) - loss(lowered, attr)) / (2 * eps)
        assert grad_p[index].item() == pytest.approx(numeric.item(), rel=1e-4, abs=1e-6)
    bumped = attr.clone()
    bumped[0, 1, 0] += eps
    numeric = (loss(pos, bumped) - loss(pos, attr)) / eps
    assert grad_a[0, 1, 0].item() == pytest.approx(numeric.item(), rel=1e-4)


def test_sphere_silhouette_area(rasterizer):
    side, distance, fovy, radius = 64, 2.0, 45.0, 0.4
    camera = orbit_camera(30.0, 20.0, distance, fovy_deg=fovy, size=side)
    mesh = meshes.uv_sphere(radius=radius, segments=64, rings=32)
    rast = rasterizer.rasterize(clip_positions(mesh.vertices, [camera]), mesh.faces, (side, side))
    # The silhouette is the cone tangent to the sphere: its half-angle is asin(r / d).
    ndc_radius = math.tan(math.asin(radius / distance)) / math.tan(math.radians(fovy) / 2)
    expected = math.pi * ndc_radius**2 / 4 * side * side
    assert float(coverage(rast).sum()) == pytest.approx(expected, rel=0.03)


def test_torus_seen_from_above_has_a_hole(rasterizer):
    camera = orbit_camera(0.0, 89.0, 2.0, fovy_deg=45.0, size=32)
    image = render_mesh(meshes.torus(), [camera], rasterizer, albedo=(1.0, 0.0, 0.0))
    centre, ring = image[0, :, 16, 16], image[0, :, 16, 16 + 7]
    assert torch.allclose(centre, torch.ones(3))  # background shows through the hole
    assert ring[0] > 0.5 and ring[1] < 0.2  # the red ring around it
