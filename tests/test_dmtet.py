"""The fine stage's building blocks without a trained scene: DMTet geometry, regularisers, level choice, floaters,
and the mesh renderer's gradients."""

from __future__ import annotations

import math

import pytest
import torch

from services.scene.mesh import conversion
from services.scene.mesh.dmtet import DMTetGeometry
from services.scene.mesh.regularizers import interior_edge_faces, laplacian_smoothness, normal_consistency
from services.scene.mesh.renderer import MeshRenderer
from services.scene.mesh.tets import marching_tets
from shared.cameras import Shading, orbit_camera
from shared.meshes import box, uv_sphere
from shared.rasterize import make_rasterizer


def ball_density(points: torch.Tensor, radius: float = 0.5, peak: float = 20.0) -> torch.Tensor:
    """A density falling linearly from `peak` at the centre to 0 at 2 * radius: its level peak/2 is the ball."""
    return (peak * (1 - points.norm(dim=-1) / (2 * radius))).clamp(min=0)


def test_offsets_are_bounded_and_surface_moves_with_them():
    geometry = DMTetGeometry(cells=8, radius=1.0, max_offset_cells=0.5)
    with torch.no_grad():
        geometry.sdf.copy_(0.5 - geometry.rest_positions.norm(dim=-1))
        geometry.deformation.fill_(100.0)  # saturates tanh
    offsets = (geometry.positions - geometry.rest_positions).detach()
    assert float(offsets.abs().max()) <= geometry.max_offset + 1e-6
    assert math.isclose(float(offsets.abs().max()), 0.5 * geometry.cell_size, rel_tol=1e-4)
    vertices, faces = geometry.surface()
    vertices.sum().backward()
    assert geometry.sdf.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="max_offset_cells"):
        DMTetGeometry(cells=8, radius=1.0, max_offset_cells=0.8)


def test_normal_consistency_is_zero_on_a_plane_and_positive_on_creases():
    sphere = uv_sphere(0.5, 24, 48)
    cube = box(0.5)
    flat = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=torch.float32)
    flat_faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    assert float(normal_consistency(flat, flat_faces)) == pytest.approx(0.0, abs=1e-7)
    smooth = float(normal_consistency(sphere.vertices, sphere.faces))
    creased = float(normal_consistency(cube.vertices, cube.faces))
    assert 0 < smooth < 0.02 < creased
    assert interior_edge_faces(cube.faces).shape[0] == cube.faces.shape[0] * 3 // 2  # closed: every edge shared


def test_laplacian_shrinks_noise_and_is_scale_free():
    sphere = uv_sphere(0.5, 16, 32)
    noisy = sphere.vertices + 0.03 * torch.randn(sphere.vertices.shape, generator=torch.Generator().manual_seed(0))
    clean = float(laplacian_smoothness(sphere.vertices, sphere.faces, scale=0.1))
    rough = float(laplacian_smoothness(noisy, sphere.faces, scale=0.1))
    assert rough > 2 * clean
    scaled = float(laplacian_smoothness(noisy * 2, sphere.faces, scale=0.2))
    assert scaled == pytest.approx(rough, rel=1e-5)


def test_level_choice_recovers_the_silhouettes_of_the_true_surface():
    geometry = DMTetGeometry(cells=24, radius=1.0)
    positions, tets = geometry.rest_positions, geometry.tets
    densities = ball_density(positions)  # level 10 is the ball of radius 0.5
    cameras = conversion.level_views(1.0, 48, count=4)
    rasterizer = make_rasterizer("torch")
    target_vertices, target_faces = marching_tets(positions, densities - 10.0, tets)
    target = conversion.silhouettes(target_vertices, target_faces, cameras, 48, rasterizer)
    levels = [2.5, 5.0, 8.0, 10.0, 12.0, 15.0, 19.5]
    choice = conversion.choose_level(densities, positions, tets, target, cameras, rasterizer, levels=levels)
    assert choice.level == 10.0 and choice.silhouette_iou == pytest.approx(1.0)
    assert [level for level, _ in choice.candidates] == levels
    assert all(iou < 0.95 for level, iou in choice.candidates if level != 10.0)
    default = conversion.candidate_levels(densities, 16)
    assert len(default) == 16 and default[0] < 0.1 < 18.0 < default[-1] < 20.0
    assert choice.silhouette_iou == max(iou for _, iou in choice.candidates if not math.isnan(iou))


def test_level_choice_refines_between_far_apart_candidates():
    """Candidates a factor of 2 or more apart miss the true level; the refinement between the best one's neighbours
    comes close to it, and only adds levels inside that bracket."""
    geometry = DMTetGeometry(cells=24, radius=1.0)
    positions, tets = geometry.rest_positions, geometry.tets
    densities = ball_density(positions)
    cameras = conversion.level_views(1.0, 48, count=4)
    rasterizer = make_rasterizer("torch")
    target_vertices, target_faces = marching_tets(positions, densities - 10.0, tets)
    target = conversion.silhouettes(target_vertices, target_faces, cameras, 48, rasterizer)
    levels = [1.0, 2.5, 6.0, 15.0, 19.5]
    coarse = conversion.choose_level(densities, positions, tets, target, cameras, rasterizer, levels=levels)
    refined = conversion.choose_level(densities, positions, tets, target, cameras, rasterizer, levels=levels,
                                      refinements=6)
    assert coarse.level in (6.0, 15.0) and coarse.silhouette_iou < 0.95
    assert 8.5 < refined.level < 11.5 and refined.silhouette_iou > coarse.silhouette_iou + 0.03
    added = [level for level, _ in refined.candidates[len(levels):]]
    best = levels.index(coarse.level)
    assert len(added) == 6 and all(levels[best - 1] < level < levels[best + 1] for level in added)


def test_level_tolerance_takes_the_thinnest_surface_near_the_best_silhouettes():
    """Within the tolerance the highest level wins (a thinner surface), outside it the best one; NaNs ignored."""
    scored = [(5.0, 0.90), (8.0, 0.96), (10.0, 0.95), (13.0, 0.93), (20.0, float("nan"))]
    valid = [pair for pair in scored if not math.isnan(pair[1])]
    assert conversion.thinnest_within(valid, 0.0) == (8.0, 0.96)
    assert conversion.thinnest_within(valid, 0.02) == (10.0, 0.95)
    assert conversion.thinnest_within(valid, 0.05) == (13.0, 0.93)
    geometry = DMTetGeometry(cells=24, radius=1.0)
    positions, tets = geometry.rest_positions, geometry.tets
    densities = ball_density(positions)
    cameras = conversion.level_views(1.0, 48, count=4)
    rasterizer = make_rasterizer("torch")
    target_vertices, target_faces = marching_tets(positions, densities - 10.0, tets)
    target = conversion.silhouettes(target_vertices, target_faces, cameras, 48, rasterizer)
    levels = [8.0, 10.0, 12.0, 15.0]
    exact = conversion.choose_level(densities, positions, tets, target, cameras, rasterizer, levels=levels)
    loose = conversion.choose_level(densities, positions, tets, target, cameras, rasterizer, levels=levels,
                                    tolerance=1.0 - min(iou for _, iou in exact.candidates) + 1e-9)
    assert exact.level == 10.0 and loose.level == 15.0 and loose.silhouette_iou < exact.silhouette_iou


def test_no_surface_at_any_level_is_a_failed_precondition():
    geometry = DMTetGeometry(cells=6, radius=1.0)
    cameras = conversion.level_views(1.0, 16, count=2)
    empty = torch.zeros(2, 16, 16, dtype=torch.bool)
    from shared.errors import FailedPrecondition

    with pytest.raises(FailedPrecondition, match="no surface") as raised:
        conversion.choose_level(
            torch.zeros(geometry.rest_positions.shape[0]), geometry.rest_positions, geometry.tets, empty, cameras,
            make_rasterizer("torch"),
        )
    assert raised.value.field == "dmtet.level"


def test_floaters_are_removed_and_the_main_body_kept():
    geometry = DMTetGeometry(cells=20, radius=1.0)
    positions = geometry.rest_positions
    body = positions.norm(dim=-1) < 0.5
    speck = (positions - torch.tensor([0.8, 0.8, 0.8])).norm(dim=-1) < 0.12
    inside = body | speck
    edges = conversion.tet_edges(geometry.tets)
    kept = conversion.remove_floaters(inside, edges, min_fraction=0.05)
    assert torch.equal(kept, body)
    assert torch.equal(conversion.remove_floaters(inside, edges, min_fraction=0.0), inside)


def test_sdf_from_density_is_close_to_a_distance_near_the_surface():
    geometry = DMTetGeometry(cells=24, radius=1.0)
    positions = geometry.rest_positions
    edges = conversion.tet_edges(geometry.tets)
    sdf = conversion.sdf_from_density(ball_density(positions), 10.0, geometry.cells, geometry.cell_size, edges)
    true = 0.5 - positions.norm(dim=-1)
    near = true.abs() < 2 * geometry.cell_size
    assert float((sdf[near] - true[near]).abs().max()) < 0.02
    assert float(sdf.abs().max()) <= 3 * geometry.cell_size + 1e-6


def test_mesh_renderer_gradients_reach_geometry_and_colour():
    geometry = DMTetGeometry(cells=12, radius=1.0)
    with torch.no_grad():
        geometry.sdf.copy_(0.5 - geometry.rest_positions.norm(dim=-1))
    colour = torch.nn.Parameter(torch.tensor([0.2, 0.5, 0.8]))
    cameras = [
        orbit_camera(30.0, 20.0, 2.5, size=32),
        orbit_camera(200.0, 40.0, 2.5, size=32),
    ]
    cameras[1] = type(cameras[1])(**{**cameras[1].__dict__, "shading": Shading.LAMBERTIAN})
    renderer = MeshRenderer(make_rasterizer("torch"))
    vertices, faces = geometry.surface()
    out = renderer.render(vertices, faces, lambda p: colour.expand(p.shape[0], 3), cameras, 32)
    assert out["rgb"].shape == (2, 3, 32, 32) and out["opacity"].shape == (2, 1, 32, 32)
    centre = out["rgb"][0, :, 16, 16]
    assert torch.allclose(centre, colour.detach(), atol=1e-6)  # albedo view: the colour itself
    assert torch.allclose(out["rgb"][0, :, 0, 0], torch.ones(3))  # white camera background in the corner
    out["rgb"].square().sum().backward()
    assert colour.grad.abs().sum() > 0
    assert geometry.sdf.grad.abs().sum() > 0 and geometry.deformation.grad.abs().sum() > 0


def test_connected_labels_match_a_union_find():
    generator = torch.Generator().manual_seed(0)
    edges = torch.randint(0, 300, (200, 2), generator=generator)
    labels = conversion.connected_labels(300, edges)
    parent = list(range(300))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges.tolist():
        parent[find(a)] = find(b)
    for a in range(300):
        for b in (0, 17, 123, 299):
            assert (labels[a] == labels[b]) == (find(a) == find(b))


def test_has_surface_says_whether_marching_tetrahedra_find_faces():
    """The fine stage's cheap vanish check against the marching itself: every lone inside or outside vertex of the
    grid (corners included), all in, all out, random signs, and NaNs (outside, as marching_tets counts them)."""
    geometry = DMTetGeometry(cells=2, radius=1.0)
    count = geometry.sdf.numel()
    patterns = [torch.full((count,), -1.0), torch.full((count,), 1.0)]
    for vertex in range(count):
        alone = torch.full((count,), -1.0)
        alone[vertex] = 1.0
        patterns += [alone, -alone]
    generator = torch.Generator().manual_seed(0)
    patterns += [torch.randn(count, generator=generator) for _ in range(8)]
    patterns += [torch.where(torch.arange(count) % 2 == 0, float("nan"), 1.0), torch.full((count,), float("nan"))]
    faces_found = []
    for sdf in patterns:
        with torch.no_grad():
            geometry.sdf.copy_(sdf)
        faces = int(geometry.surface()[1].shape[0])
        assert geometry.has_surface() == (faces > 0), sdf
        faces_found.append(faces > 0)
    assert faces_found[:2] == [False, False] and all(faces_found[2 : 2 + 2 * count]) and not faces_found[-1]
