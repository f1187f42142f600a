"""The pure-PyTorch rasteriser against hand computations, finite differences and known projected areas."""

from __future__ import annotations

import math

import pytest
import torch

from shared import meshes
from shared.cameras import Light, Shading, orbit_camera
from shared.rasterize import Rasterizer, make_rasterizer
from shared.rasterize.base import coverage, to_nchw_top_row_first, to_top_row_first
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


# -- perspective, API, meshes, shading --------------------------------------------------------------------------


def test_barycentrics_are_perspective_correct(rasterizer):
    """Same screen triangle, vertex 2 four times farther (w = 4): its weight shrinks as b_i' / w_i renormalised."""
    ndc = torch.tensor([[-0.8, -0.8], [0.8, -0.8], [-0.8, 0.8]], dtype=torch.float64)
    w = torch.tensor([1.0, 1.0, 4.0], dtype=torch.float64)
    pos = torch.cat([ndc * w[:, None], torch.zeros(3, 1, dtype=torch.float64), w[:, None]], dim=1)[None]
    rast = rasterizer.rasterize(pos, torch.tensor([[0, 1, 2]]), (SIDE, SIDE))
    row, col = 4, 5  # pixel centre (x, y) = (-0.3125, -0.4375); by hand, screen weights are
    x, y = pixel_centre(row, col)
    s1, s2 = (x + 0.8) / 1.6, (y + 0.8) / 1.6  # s1 = 0.3046875, s2 = 0.2265625
    s0 = 1 - s1 - s2  # 0.46875
    assert (s0, s1, s2) == pytest.approx((0.46875, 0.3046875, 0.2265625))
    total = s0 / 1.0 + s1 / 1.0 + s2 / 4.0
    assert rast[0, row, col, 0].item() == pytest.approx(s0 / total, abs=1e-6)
    assert rast[0, row, col, 1].item() == pytest.approx(s1 / total, abs=1e-6)
    assert rast[0, row, col, 3].item() == 1.0


def test_triangles_behind_the_camera_or_outside_the_depth_range_are_dropped(rasterizer):
    front = [[-1.0, -1.0, 0.0, 1.0], [1.0, -1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]]
    behind = [[-1.0, -1.0, 0.0, 1.0], [1.0, -1.0, 0.0, 1.0], [0.0, 1.0, 0.0, -1.0]]
    far = [[-1.0, -1.0, 2.0, 1.0], [1.0, -1.0, 2.0, 1.0], [0.0, 1.0, 2.0, 1.0]]
    pos = torch.tensor([front + behind + far])
    rast = rasterizer.rasterize(pos, torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]]), (SIDE, SIDE))
    ids = set(rast[0, ..., 3].unique().tolist())
    assert ids == {0.0, 1.0}


def test_batched_attributes_and_layout_helpers(rasterizer):
    pos = torch.tensor([[[-1.0, -1.0, 0.0, 1.0], [3.0, -1.0, 0.0, 1.0], [-1.0, 3.0, 0.0, 1.0]]]).expand(2, -1, -1)
    tri = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    rast = rasterizer.rasterize(pos, tri, (8, 8))
    assert bool((rast[..., 3] == 1).all())  # the oversized triangle covers everything
    attr = torch.tensor([[[1.0], [1.0], [1.0]], [[2.0], [2.0], [2.0]]])
    out = rasterizer.interpolate(attr, rast, tri)
    assert out.shape == (2, 8, 8, 1)
    assert torch.allclose(out[0], torch.ones(8, 8, 1)) and torch.allclose(out[1], torch.full((8, 8, 1), 2.0))
    # Attribute = the y coordinate: increases with row (row 0 = bottom); the helper flips to row 0 = top.
    y_attr = pos[0, :, 1:2]
    image = rasterizer.interpolate(y_attr, rast, tri)
    assert bool((image[0, 1:, 0, 0] > image[0, :-1, 0, 0]).all())
    flipped = to_top_row_first(image)
    assert bool((flipped[0, 1:, 0, 0] < flipped[0, :-1, 0, 0]).all())
    assert to_nchw_top_row_first(image).shape == (2, 1, 8, 8)


def test_factory():
    assert isinstance(make_rasterizer("torch"), Rasterizer)
    with pytest.raises(ImportError):
        make_rasterizer("nvdiffrast")
    with pytest.raises(ValueError):
        make_rasterizer("opengl")


BUILDERS = {
    "torus": meshes.torus,
    "uv_sphere": meshes.uv_sphere,
    "box": meshes.box,
    "cone": meshes.cone,
    "cylinder": meshes.cylinder,
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_builders_are_closed_outward_and_fit_the_unit_ball(name):
    mesh = BUILDERS[name]()
    tm = mesh.to_trimesh()
    assert tm.is_watertight and tm.is_winding_consistent
    assert tm.volume > 0  # outward winding gives a positive signed volume
    assert float(mesh.vertices.norm(dim=1).max()) <= 0.5 + 1e-6
    assert torch.allclose((mesh.vertices.amax(0) + mesh.vertices.amin(0)) / 2, torch.zeros(3), atol=1e-6)
    normals = meshes.vertex_normals(mesh)
    assert torch.allclose(normals.norm(dim=1), torch.ones(mesh.num_vertices), atol=1e-5)


def test_load_mesh_normalises_and_turns_gltf_upright(tmp_path):
    import trimesh

    tall = trimesh.creation.box(extents=(1.0, 4.0, 1.0))  # long along +Y, off-centre
    tall.apply_translation((3.0, 1.0, -2.0))
    tall.export(tmp_path / "tall.ply")
    tall.export(tmp_path / "tall.glb")
    as_is = meshes.load_mesh(tmp_path / "tall.ply")
    assert float(as_is.vertices.norm(dim=1).max()) == pytest.approx(0.5, abs=1e-5)
    assert torch.allclose((as_is.vertices.amax(0) + as_is.vertices.amin(0)) / 2, torch.zeros(3), atol=1e-5)
    extent = as_is.vertices.amax(0) - as_is.vertices.amin(0)
    assert extent[1] > 3 * extent[2]  # PLY: coordinates kept, long axis still Y
    upright = meshes.load_mesh(tmp_path / "tall.glb")
    extent = upright.vertices.amax(0) - upright.vertices.amin(0)
    assert extent[2] > 3 * extent[1]  # glTF is Y-up: the long axis becomes Z
    assert upright.to_trimesh().volume > 0


def test_render_modes_orientation_and_gradients(rasterizer):
    side = 32
    camera = orbit_camera(0.0, 0.0, 2.0, fovy_deg=45.0, size=side, background_color=(0.0, 1.0, 0.0))
    cone = meshes.cone()
    albedo = render_mesh(cone, [camera], rasterizer, albedo=(1.0, 0.0, 0.0))
    mask = albedo[0, 0] > 0.5  # red where the cone is, green background
    assert torch.allclose(albedo[0, 1][~mask], torch.ones(()))
    rows = mask.any(dim=1).nonzero().squeeze(1)
    # Top-row-first: the apex (narrow) is in the upper rows, the base (wide) in the lower ones.
    widths = mask.sum(dim=1)
    assert widths[rows[0] + 1] < widths[rows[-1] - 1]

    sphere = meshes.uv_sphere()
    cams = [
        orbit_camera(0.0, 0.0, 2.0, size=side, shading=shading, light=Light(position=(2.0, 0.0, 0.0)))
        for shading in (Shading.NORMAL, Shading.LAMBERTIAN, Shading.TEXTURELESS)
    ]
    normal, lambert, textureless = render_mesh(sphere, cams, rasterizer, albedo=(0.5, 0.5, 0.5))
    centre = normal[:, side // 2, side // 2] * 2 - 1  # facing the camera at +X
    assert centre[0] > 0.95
    # Light at the camera: the centre is lit fully (ambient 0.1 + diffuse 0.9 ~ 1).
    assert lambert[:, side // 2, side // 2] == pytest.approx(torch.full((3,), 0.5), abs=0.03)
    assert textureless[:, side // 2, side // 2] == pytest.approx(torch.ones(3), abs=0.03)

    vertices = sphere.vertices.clone().requires_grad_(True)
    image = render_mesh(sphere, cams[1:2], rasterizer, albedo=(0.5, 0.5, 0.5), vertices=vertices)
    (grad,) = torch.autograd.grad(image.sum(), vertices)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_512_render_with_ten_thousand_triangles_is_bounded(rasterizer):
    mesh = meshes.uv_sphere(segments=100, rings=50)  # 9800 triangles
    assert mesh.num_faces >= 9000
    camera = orbit_camera(30.0, 20.0, 2.0, fovy_deg=45.0, size=512)
    rast = rasterizer.rasterize(clip_positions(mesh.vertices, [camera]), mesh.faces, (512, 512))
    ndc_radius = math.tan(math.asin(0.4 / 2.0)) / math.tan(math.radians(45.0) / 2)
    assert float(coverage(rast).sum()) == pytest.approx(math.pi * ndc_radius**2 / 4 * 512 * 512, rel=0.01)
