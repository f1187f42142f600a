"""The one shading model and the one face-normal function give, bit for bit, what the formulas they replaced gave:
shared.render's and the mesh renderer's per-camera shading, the volume renderer's per-sample shading, and the
four face-normal cross products."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn import functional as F

from services.scene.field.renderer import VolumeRenderer
from shared.cameras import Light, Shading, orbit_camera
from shared.meshes import face_normals, torus
from shared.shading import shade, shade_view

IDS = {Shading.ALBEDO: 0, Shading.LAMBERTIAN: 1, Shading.TEXTURELESS: 2, Shading.NORMAL: 3}


def inputs(shape=(6, 5), seed=0):
    generator = torch.Generator().manual_seed(seed)
    albedo = torch.rand(*shape, 3, generator=generator)
    normals = F.normalize(torch.randn(*shape, 3, generator=generator), dim=-1)
    points = torch.randn(*shape, 3, generator=generator)
    return albedo, normals, points


def old_per_camera(mode, albedo, normals, world, light: Light):
    """shared/render.py's loop body (the mesh renderer's `_shade` was the same formula)."""
    if mode == Shading.ALBEDO:
        return albedo
    if mode == Shading.NORMAL:
        return (normals + 1) / 2
    position = torch.tensor(light.position, dtype=world.dtype)
    direction = F.normalize(position - world, dim=-1)
    lambert = (normals * direction).sum(-1, keepdim=True).clamp(min=0)
    intensity = light.ambient + light.diffuse * lambert
    base = torch.ones_like(albedo) if mode == Shading.TEXTURELESS else albedo
    return base * intensity


def old_per_sample(albedo, normals, x, camera_idx, modes, cameras):
    """services/scene/field/renderer.py's `VolumeRenderer._shade` before `shade`."""
    if all(m == Shading.ALBEDO for m in modes):
        return albedo
    mode = torch.tensor([IDS[m] for m in modes])[camera_idx]
    light_pos = torch.tensor([c.light.position for c in cameras])[camera_idx]
    ambient = torch.tensor([c.light.ambient for c in cameras])[camera_idx, None]
    diffuse = torch.tensor([c.light.diffuse for c in cameras])[camera_idx, None]
    to_light = F.normalize(light_pos - x, dim=-1)
    lighting = ambient + diffuse * (normals * to_light).sum(-1, keepdim=True).clamp(min=0.0)
    color = torch.where((mode == 1)[:, None], albedo * lighting, albedo)
    color = torch.where((mode == 2)[:, None], lighting.expand_as(albedo), color)
    return torch.where((mode == 3)[:, None], (normals + 1.0) * 0.5, color)


def camera(mode: Shading, index: int = 0):
    light = Light(position=(1.0, 2.0 - index, 3.0), ambient=0.15 + 0.1 * index, diffuse=0.8 - 0.05 * index)
    return dataclasses.replace(orbit_camera(40.0 * index, 20.0, 2.5, size=8), shading=mode, light=light)


@pytest.mark.parametrize("mode", list(Shading))
def test_per_camera_shading_is_the_old_formula(mode):
    albedo, normals, points = inputs()
    view = camera(mode)
    expected = old_per_camera(mode, albedo, normals, points, view.light)
    assert torch.equal(shade_view(view, albedo, normals, points), expected)
    light = view.light
    position = torch.tensor(light.position)
    assert torch.equal(shade(mode, albedo, normals, points, position, light.ambient, light.diffuse), expected)


@pytest.mark.parametrize("modes", [list(Shading), [Shading.ALBEDO] * 2, [Shading.TEXTURELESS, Shading.LAMBERTIAN]])
def test_per_sample_shading_is_the_old_formula(modes):
    albedo, normals, points = inputs((40,), seed=1)
    cameras = [camera(m, i) for i, m in enumerate(modes)]
    camera_idx = torch.arange(40) % len(modes)
    expected = old_per_sample(albedo, normals, points, camera_idx, modes, cameras)
    assert torch.equal(VolumeRenderer._shade(albedo, normals, points, camera_idx, modes, cameras), expected)


def test_shading_names_what_it_lacks():
    albedo, normals, points = inputs()
    with pytest.raises(ValueError, match="needs normals"):
        shade(Shading.NORMAL, albedo, None, points)
    with pytest.raises(ValueError, match="light position"):
        shade(Shading.LAMBERTIAN, albedo, normals, points)
    assert shade(Shading.ALBEDO, albedo, None, None) is albedo


def test_face_normals_are_the_old_cross_products():
    mesh = torus()
    vertices, faces = mesh.vertices, mesh.faces
    gathered = vertices.index_select(0, faces.reshape(-1)).reshape(-1, 3, 3).unbind(1)  # render.py, export
    indexed = vertices[faces].unbind(1)  # shared/meshes.py
    for v0, v1, v2 in (gathered, indexed):
        assert torch.equal(face_normals(vertices, faces), torch.linalg.cross(v1 - v0, v2 - v0))
    tri = vertices[faces].double()  # mesh_metrics' areas
    areas = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]).norm(dim=1) / 2
    assert torch.equal(face_normals(vertices.double(), faces).norm(dim=1) / 2, areas)
