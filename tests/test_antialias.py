"""The pure-PyTorch analytic antialiasing (`shared.rasterize.antialias`, nvdiffrast's algorithm): gradients against
finite differences, edits only along outlines of a closed mesh, and the coverage gradient against the area
derivative of a flat polygon. On a GPU, tests/test_gpu_rasterize.py checks nvdiffrast's own `antialias`."""

from __future__ import annotations

import math

import pytest
import torch

from shared import meshes
from shared.cameras import orbit_camera
from shared.rasterize import TorchRasterizer
from shared.rasterize.antialias import silhouette_edges
from shared.rasterize.base import coverage
from shared.render import clip_positions

SIDE = 24


@pytest.fixture(scope="module", params=["triangle", "contour"])
def rasterizer(request) -> TorchRasterizer:
    return TorchRasterizer(edge_antialias=request.param)


def sphere_views() -> tuple[torch.Tensor, torch.Tensor, list]:
    mesh = meshes.uv_sphere(0.4, segments=16, rings=8)
    cameras = [orbit_camera(30.0, 20.0, 2.0, fovy_deg=40.0, size=SIDE), orbit_camera(100.0, -30.0, 1.8, 40.0, SIDE)]
    return mesh.vertices.double(), mesh.faces, cameras


def shaded(rasterizer: TorchRasterizer, vertices: torch.Tensor, faces: torch.Tensor, cameras: list):
    """A colour that varies over the surface (height) on a grey background, antialiased; and the raw raster."""
    pos = clip_positions(vertices, cameras)
    rast = rasterizer.rasterize(pos, faces, (SIDE, SIDE))
    covered = coverage(rast)
    world = rasterizer.interpolate(vertices, rast, faces)
    color = covered * torch.cat([0.5 + world[..., 2:], 0.3 + 0.0 * world[..., :2]], dim=-1) + (1 - covered) * 0.2
    return rasterizer.antialias(color, rast, pos, faces), color, rast


def test_off_by_default_and_only_outlines_change(rasterizer):
    vertices, faces, cameras = sphere_views()
    smoothed, color, rast = shaded(rasterizer, vertices, faces, cameras)
    pos = clip_positions(vertices, cameras)
    assert torch.equal(TorchRasterizer().antialias(color, rast, pos, faces), color)
    changed = (smoothed - color).abs().amax(-1) > 1e-9
    covered = rast[..., 3] > 0
    padded = torch.nn.functional.pad(covered.double(), (1, 1, 1, 1))
    neighbours = padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:] + padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1]
    outline = (covered & (neighbours < 4)) | (~covered & (neighbours > 0))
    assert changed.any(), "no outline pixel was blended"
    assert not (changed & ~outline).any(), "an interior edge of the closed sphere was blended"


def test_silhouette_edges_of_a_closed_mesh_fold_back():
    """Seen from outside, a convex closed mesh's silhouette edges are those between a front- and a back-facing
    face; a single triangle's edges are all boundary (silhouette) edges."""
    vertices, faces, cameras = sphere_views()
    screen = clip_positions(vertices, cameras[:1])
    screen = screen[..., :2] / screen[..., 3:]
    edges = silhouette_edges(screen, faces)[0]
    a, b, c = (screen[0, faces[:, i]] for i in range(3))
    area = (b - a)[:, 0] * (c - a)[:, 1] - (b - a)[:, 1] * (c - a)[:, 0]
    front = area > 0
    neighbour_front = {}
    for f, face in enumerate(faces.tolist()):
        for k in range(3):
            neighbour_front.setdefault(frozenset((face[k], face[(k + 1) % 3])), []).append(bool(front[f]))
    for f, face in enumerate(faces.tolist()):
        for k in range(3):
            sides = neighbour_front[frozenset((face[k], face[(k + 1) % 3]))]
            assert bool(edges[f, k]) == (len(set(sides)) == 2), (f, k)
    single = silhouette_edges(torch.rand(1, 3, 2, dtype=torch.float64), torch.tensor([[0, 1, 2]]))
    assert bool(single.all())


def test_gradients_match_finite_differences(rasterizer):
    vertices, faces, cameras = sphere_views()
    probe = torch.rand(len(cameras), SIDE, SIDE, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def loss(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        smoothed, _, rast = shaded(rasterizer, v, faces, cameras)
        return (smoothed * probe).sum(), rast[..., 3]

    moving = vertices.clone().requires_grad_(True)
    value, ids = loss(moving)
    (grad,) = torch.autograd.grad(value, moving)
    eps = 1e-6
    checked = 0
    for index in torch.argsort(grad.norm(dim=1), descending=True)[:4].tolist():
        for axis in range(3):
            up, down = vertices.clone(), vertices.clone()
            up[index, axis] += eps
            down[index, axis] -= eps
            (high, ids_up), (low, ids_down) = loss(up), loss(down)
            if not (torch.equal(ids_up, ids) and torch.equal(ids_down, ids)):
                continue  # a pixel changed triangle: not differentiable there
            numeric = float(high - low) / (2 * eps)
            assert float(grad[index, axis]) == pytest.approx(numeric, rel=1e-4, abs=1e-6)
            checked += 1
    assert checked >= 8


def test_coverage_gradient_of_a_flat_polygon_is_its_area_derivative(rasterizer):
    """A flat regular octagon facing the camera (all outline edges are boundary edges): scaling it by (1 + s)
    scales its area A by (1 + s)^2, so the antialiased coverage's gradient at s = 0 should be about 2 A (pixels)."""
    corners = [(0.6 * math.cos(a), 0.6 * math.sin(a)) for a in [2 * math.pi * (k + 0.3) / 8 for k in range(8)]]
    flat = torch.tensor([[0.0, 0.0, 0.0, 1.0]] + [[x, y, 0.0, 1.0] for x, y in corners], dtype=torch.float64)
    faces = torch.tensor([[0, k + 1, (k + 1) % 8 + 1] for k in range(8)])
    scale = torch.zeros((), dtype=torch.float64, requires_grad=True)
    pos = (flat * torch.stack([1 + scale, 1 + scale, torch.ones_like(scale), torch.ones_like(scale)]))[None]
    rast = rasterizer.rasterize(pos.detach(), faces, (SIDE, SIDE))
    covered = coverage(rast)
    (gradient,) = torch.autograd.grad(rasterizer.antialias(covered, rast, pos, faces).sum(), scale)
    area = 0.5 * 8 * 0.6**2 * math.sin(2 * math.pi / 8) * (SIDE / 2) ** 2  # in pixels
    assert float(gradient) == pytest.approx(2 * area, rel=0.15)


def test_contour_mode_reaches_the_outline_of_a_finely_tessellated_mesh():
    """Triangles smaller than pixels (a 96 x 48 sphere at 24x24, like the fine stage's marching-tetrahedra mesh at
    CPU settings): nvdiffrast's choice ("triangle": the silhouette edge must belong to the triangle seen at a pixel)
    misses most of the outline; "contour" gives about the area derivative 2 A under an image-plane scaling."""
    mesh = meshes.uv_sphere(0.4, segments=96, rings=48)
    camera = orbit_camera(30.0, 20.0, 2.0, fovy_deg=40.0, size=SIDE)
    flat = clip_positions(mesh.vertices.double(), [camera])
    ratios = {}
    for mode in ("triangle", "contour"):
        rasterizer = TorchRasterizer(edge_antialias=mode)
        scale = torch.zeros((), dtype=torch.float64, requires_grad=True)
        pos = flat * torch.stack([1 + scale, 1 + scale, torch.ones_like(scale), torch.ones_like(scale)])
        rast = rasterizer.rasterize(pos.detach(), mesh.faces, (SIDE, SIDE))
        covered = coverage(rast)
        smoothed = rasterizer.antialias(covered, rast, pos, mesh.faces).sum()
        gradient = torch.autograd.grad(smoothed, scale)[0] if smoothed.requires_grad else torch.zeros(())
        ratios[mode] = float(gradient) / (2 * float(covered.sum()))
    assert ratios["triangle"] < 0.5, ratios
    assert 0.7 < ratios["contour"] < 1.2, ratios


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="edge_antialias"):
        TorchRasterizer(edge_antialias="smooth")
