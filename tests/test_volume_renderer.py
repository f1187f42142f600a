"""Volume renderer of the coarse stage (services/scene/field/renderer.py): rays, compositing, shading, pruning."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from services.scene.field import (
    BackgroundMLP,
    FieldConfig,
    HashGridConfig,
    NeuralField,
    OccupancyConfig,
    OccupancyGrid,
    RendererConfig,
    VolumeRenderer,
    camera_rays,
    distortion_loss,
    opacity_entropy,
    orientation_loss,
    ray_sphere,
    sparsity_loss,
)
from shared.cameras import Light, Shading, orbit_camera

ENC = HashGridConfig(n_levels=8, log2_hashmap_size=14, base_resolution=8, per_level_scale=1.6)


class AnalyticField(nn.Module):
    """A field with known density: `value` inside |x - center| < radius (everywhere when radius is None), constant
    albedo and constant normal. Counts evaluated points."""

    def __init__(self, value=5.0, radius=None, center=(0.0, 0.0, 0.0), albedo=(0.2, 0.4, 0.6), normal=(0.0, 0.0, 1.0)):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # something for gradients and the device
        self.value, self.radius = value, radius
        self.center = torch.tensor(center)
        self.albedo, self.normal = torch.tensor(albedo), torch.tensor(normal)
        self.evaluated = 0

    def density(self, x):
        self.evaluated += x.shape[0]
        if self.radius is None:
            inside = torch.ones(x.shape[0])
        else:
            inside = ((x - self.center).norm(dim=-1) < self.radius).float()
        return inside * self.value + 0 * self.anchor

    def forward(self, x, with_normal=False):
        out = {"density": self.density(x), "albedo": self.albedo.expand(x.shape[0], 3) + 0 * self.anchor}
        if with_normal:
            out["normal"] = self.normal.expand(x.shape[0], 3)
        return out


def _blob_field() -> NeuralField:
    torch.manual_seed(0)
    return NeuralField(FieldConfig(encoding=ENC, backend="torch"))


def _front_camera(size=17, fovy=40.0, **kwargs):
    return orbit_camera(0.0, 0.0, 2.0, fovy_deg=fovy, size=size, **kwargs)


# -- rays --------------------------------------------------------------------------------------------------------
def test_centre_ray_hits_origin_and_rows_run_top_down():
    camera = orbit_camera(30.0, 20.0, 2.5, fovy_deg=50.0, size=9)
    origins, dirs = camera_rays([camera], 9)
    assert origins.shape == dirs.shape == (1, 9, 9, 3)
    assert torch.allclose(dirs.norm(dim=-1), torch.ones(1, 9, 9), atol=1e-6)
    o, d = origins[0, 4, 4], dirs[0, 4, 4]
    closest = o - (o @ d) * d  # the ray's closest point to the origin
    assert closest.norm() < 1e-5
    c2w = camera.camera_to_world
    right, up, back = c2w[:3, 0], c2w[:3, 1], c2w[:3, 2]
    assert (dirs[0, 0] @ up > 0).all() and (dirs[0, -1] @ up < 0).all()  # row 0 looks up
    assert (dirs[0, :, 0] @ right < 0).all() and (dirs[0, :, -1] @ right > 0).all()  # column 0 looks left
    assert (dirs[0].reshape(-1, 3) @ back < 0).all()  # looking along -Z
    # the top-centre pixel centre is half a pixel inside the top edge of the field of view
    angle = math.degrees(math.atan2(float(dirs[0, 0, 4] @ up), float(-(dirs[0, 0, 4] @ back))))
    expected = math.degrees(math.atan((1 - 1 / 9) * math.tan(math.radians(25.0))))
    assert angle == pytest.approx(expected, abs=1e-4)


def test_ray_sphere_near_far():
    origins = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    dirs = torch.tensor([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    near, far, hit = ray_sphere(origins, dirs, 1.0, min_near=0.05)
    assert hit.tolist() == [True, False, True]
    assert torch.allclose(near, torch.tensor([2.0, 0.0, 0.05])) and torch.allclose(far, torch.tensor([4.0, 0.0, 1.0]))


# -- compositing against known densities -------------------------------------------------------------------------
def test_constant_density_opacity_is_exact():
    sigma, radius = 0.5, 1.0
    field = AnalyticField(value=sigma)
    renderer = VolumeRenderer(RendererConfig(num_samples_per_ray=16, radius=radius, background="white"))
    camera = _front_camera(size=9)
    out = renderer.render(field, None, [camera], 9, stratified=False)
    origins, dirs = camera_rays([camera], 9)
    near, far, hit = ray_sphere(origins.reshape(-1, 3), dirs.reshape(-1, 3), radius)
    expected = 1 - torch.exp(-sigma * (far - near))  # the chord inside the sphere, whatever the sampling
    assert torch.allclose(out["opacity"].reshape(-1), expected, atol=1e-5)
    # constant albedo composited over white
    albedo = field.albedo[:, None, None]
    expected_rgb = albedo * out["opacity"][0] + (1 - out["opacity"][0])
    assert torch.allclose(out["rgb"][0], expected_rgb, atol=1e-5)


def test_sphere_silhouette_and_constant_colour():
    field = AnalyticField(value=60.0, radius=0.5)
    renderer = VolumeRenderer(RendererConfig(num_samples_per_ray=48, background="camera"))
    size, fovy = 24, 40.0
    camera = _front_camera(size=size, fovy=fovy, background_color=(0.0, 1.0, 0.0))
    out = renderer.render(field, None, [camera], size, stratified=False)
    assert out["rgb"].shape == (1, 3, size, size) and out["opacity"].shape == (1, 1, size, size)
    # silhouette radius in NDC: tan(asin(r / d)) / tan(fovy / 2)
    edge = math.tan(math.asin(0.5 / 2.0)) / math.tan(math.radians(fovy / 2))
    ndc = (2 * torch.arange(size) + 1) / size - 1
    r_ndc = torch.sqrt(ndc[None, :] ** 2 + ndc[:, None] ** 2)
    opacity = out["opacity"][0, 0]
    assert (opacity[r_ndc < edge - 0.12] > 0.99).all()
    assert (opacity[r_ndc > edge + 0.12] < 1e-6).all()
    rgb = out["rgb"][0]
    inside, outside = r_ndc < edge - 0.12, r_ndc > edge + 0.12
    assert torch.allclose(rgb[:, inside], field.albedo[:, None].expand(3, int(inside.sum())), atol=0.01)
    assert torch.allclose(rgb[:, outside], torch.tensor([0.0, 1.0, 0.0])[:, None].expand(3, int(outside.sum())))
    # depth of the centre ray: the front of the sphere at distance 2 - 0.5 (to within a sample)
    c = size // 2
    assert out["depth"][0, 0, c - 1 : c + 1, c - 1 : c + 1].mean().item() == pytest.approx(1.5, abs=0.05)


def test_object_above_the_origin_is_in_the_top_rows():
    field = AnalyticField(value=60.0, radius=0.3, center=(0.0, 0.0, 0.5))  # world +Z is up
    renderer = VolumeRenderer(RendererConfig(num_samples_per_ray=32, background="white"))
    out = renderer.render(field, None, [_front_camera(size=16)], 16, stratified=False)
    opacity = out["opacity"][0, 0]
    assert opacity[:8].sum() > 10 and opacity[8:].sum() < 1e-3


# -- shading -----------------------------------------------------------------------------------------------------
def test_shading_modes():
    normal = torch.nn.functional.normalize(torch.tensor([1.0, 0.0, 1.0]), dim=0)
    field = AnalyticField(value=200.0, radius=0.5, normal=tuple(normal.tolist()))
    light = Light(position=(0.0, 0.0, 1000.0), ambient=0.3, diffuse=0.5)  # a distant light straight above
    renderer = VolumeRenderer(RendererConfig(num_samples_per_ray=32, background="white"))
    cams = [_front_camera(size=8, shading=mode, light=light) for mode in Shading]
    out = renderer.render(field, None, cams, 8, stratified=False)
    centre = out["rgb"][:, :, 3:5, 3:5].mean(dim=(2, 3))  # (4, 3), opacity ~1 there
    albedo, lighting = field.albedo, 0.3 + 0.5 * float(normal[2])
    expected = {
        Shading.ALBEDO: albedo,
        Shading.LAMBERTIAN: albedo * lighting,
        Shading.TEXTURELESS: torch.full((3,), lighting),
        Shading.NORMAL: (normal + 1) / 2,
    }
    for i, mode in enumerate(Shading):
        assert torch.allclose(centre[i], expected[mode], atol=1e-3), mode
    assert out["normal"].shape == (4, 3, 8, 8)
    # the shading argument overrides every camera's own mode
    override = renderer.render(field, None, cams, 8, stratified=False, shading=Shading.NORMAL)
    assert torch.allclose(override["rgb"][:, :, 3:5, 3:5].mean(dim=(2, 3)), ((normal + 1) / 2).expand(4, 3), atol=1e-3)
    with pytest.raises(ValueError, match="needs normals"):
        renderer.render(field, None, cams, 8, with_normals=False)


def test_background_modes():
    field = AnalyticField(value=0.0)  # empty scene
    camera = _front_camera(size=6, background_color=(0.1, 0.2, 0.3))
    cam_bg = VolumeRenderer(RendererConfig(num_samples_per_ray=4, background="camera")).render(field, None, [camera], 6)
    assert torch.allclose(cam_bg["rgb"][0], torch.tensor([0.1, 0.2, 0.3])[:, None, None].expand(3, 6, 6))
    white = VolumeRenderer(RendererConfig(num_samples_per_ray=4, background="white")).render(field, None, [camera], 6)
    assert torch.allclose(white["rgb"], torch.ones(1, 3, 6, 6))
    torch.manual_seed(0)
    background = BackgroundMLP()
    learned = VolumeRenderer(RendererConfig(num_samples_per_ray=4)).render(field, background, [camera], 6)
    _, dirs = camera_rays([camera], 6)
    assert torch.allclose(learned["rgb"][0], background(dirs[0]).permute(2, 0, 1), atol=1e-6)
    learned["rgb"].sum().backward()
    assert all(p.grad is not None for p in background.parameters())


# -- the blob field: pruning, gradients, determinism -------------------------------------------------------------
def test_blob_renders_a_centred_disk():
    field = _blob_field()
    renderer = VolumeRenderer(RendererConfig(num_samples_per_ray=48, background="white"))
    with torch.no_grad():
        out = renderer.render(field, None, [_front_camera(size=24)], 24, stratified=False)
    opacity = out["opacity"][0, 0]
    assert opacity[11:13, 11:13].min() > 0.9
    assert opacity[[0, 0, -1, -1], [0, -1, 0, -1]].max() < 0.01
    # rotationally symmetric: a sphere seen head-on (the 1e-4 hash features barely perturb it)
    assert torch.allclose(opacity, opacity.flip(0), atol=2e-3) and torch.allclose(opacity, opacity.T, atol=2e-3)
    ndc = (2 * torch.arange(24) + 1) / 24 - 1
    r_ndc = torch.sqrt(ndc[None, :] ** 2 + ndc[:, None] ** 2)
    assert opacity[r_ndc < 0.4].min() > 0.5 and opacity[r_ndc > 1.0].max() < 0.05


def test_occupancy_pruning_matches_full_render_with_fewer_samples():
    field = _blob_field()
    renderer = VolumeRenderer(RendererConfig(num_samples_per_ray=40))
    torch.manual_seed(1)
    background = BackgroundMLP()
    cams = [orbit_camera(a, 15.0, 1.8, fovy_deg=55.0, size=16, shading=Shading.LAMBERTIAN) for a in (0.0, 120.0)]

    def render(grid=None, r=renderer):
        with torch.no_grad():
            return r.render(field, background, cams, 16, generator=torch.Generator().manual_seed(2), occupancy=grid)

    grid = OccupancyGrid(OccupancyConfig(resolution=32, step_size=renderer.cfg.step_size))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # a few refreshes, as in training, so each cell's value has seen several jitters
        grid.update(field, 0, generator=g, force=True)
    full = render()
    assert full["n_evaluated"] == full["n_samples"]
    # nerfacc's threshold (0.01 opacity per step): ~15% of the samples; only the faint halo at grazing
    # silhouettes (many samples each under 1%) is cut.
    pruned = render(grid)
    assert pruned["n_samples"] == full["n_samples"]
    assert pruned["n_evaluated"] < 0.2 * full["n_evaluated"]
    assert (pruned["rgb"] - full["rgb"]).abs().max() < 0.06 and (pruned["opacity"] - full["opacity"]).abs().max() < 0.15
    assert (pruned["rgb"] - full["rgb"]).abs().mean() < 0.008
    # a stricter threshold (same cell values) keeps the halo: the same image to 1%, with a third of the samples
    strict = OccupancyGrid(OccupancyConfig(resolution=32, step_size=renderer.cfg.step_size, alpha_threshold=0.001))
    strict.load_state_dict(grid.state_dict())
    strict.recompute_occupancy()
    kept = render(strict)
    assert kept["n_evaluated"] < 0.35 * full["n_evaluated"]
    assert (kept["rgb"] - full["rgb"]).abs().max() < 0.01 and (kept["opacity"] - full["opacity"]).abs().max() < 0.02
    # the renderer honours use_occupancy=False
    off = VolumeRenderer(RendererConfig(num_samples_per_ray=4, use_occupancy=False))
    ignored = off.render(field, None, cams[:1], 4, occupancy=grid)
    assert ignored["n_evaluated"] == ignored["n_samples"] > 0


def test_gradients_reach_table_mlp_and_background():
    field = _blob_field()
    torch.manual_seed(0)
    background = BackgroundMLP()
    renderer = VolumeRenderer(RendererConfig(num_samples_per_ray=24))
    grid = OccupancyGrid(OccupancyConfig(resolution=16, step_size=renderer.cfg.step_size))
    grid.update(field, 0, generator=torch.Generator().manual_seed(0))
    cams = [orbit_camera(a, 10.0, 2.0, fovy_deg=50.0, size=12, shading=Shading.LAMBERTIAN) for a in (0.0, 90.0)]
    out = renderer.render(field, background, cams, 12, generator=torch.Generator().manual_seed(0), occupancy=grid)
    grad_image = torch.randn(out["rgb"].shape, generator=torch.Generator().manual_seed(1))
    out["rgb"].backward(grad_image)  # as the service does with the guidance gradient
    assert field.encoding.table.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in field.network.parameters())
    assert all(p.grad is not None for p in background.parameters())
    # the regularisers reach the field too: the orientation loss through the analytic normals
    field.zero_grad()
    out = renderer.render(field, background, cams, 12, generator=torch.Generator().manual_seed(0), occupancy=grid)
    assert out["normals"].shape == (out["weights"].shape[0], 3) == out["view_dirs"].shape
    orient = orientation_loss(out["weights"], -out["normals"], out["view_dirs"], out["opacity"])  # flipped: > 0
    assert orient > 0
    (orient + sparsity_loss(out["opacity"]) + opacity_entropy(out["opacity"])).backward()
    assert field.encoding.table.grad.abs().sum() > 0


def test_renders_are_deterministic_given_the_generator():
    field = _blob_field()
    renderer = VolumeRenderer(RendererConfig(num_samples_per_ray=16))
    cams = [orbit_camera(45.0, 30.0, 2.0, fovy_deg=60.0, size=10)]
    with torch.no_grad():
        a = renderer.render(field, None, cams, 10, generator=torch.Generator().manual_seed(5))
        b = renderer.render(field, None, cams, 10, generator=torch.Generator().manual_seed(5))
        c = renderer.render(field, None, cams, 10, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["t"], b["t"])
    assert not torch.equal(a["t"], c["t"])


def test_everything_pruned_gives_the_background():
    field = _blob_field()
    grid = OccupancyGrid(OccupancyConfig(resolution=8))
    grid.occupancy.fill_(False)
    background = BackgroundMLP()
    renderer = VolumeRenderer(RendererConfig(num_samples_per_ray=8))
    out = renderer.render(field, background, [_front_camera(size=6)], 6, occupancy=grid)
    assert out["n_evaluated"] == 0 and torch.all(out["opacity"] == 0)
    assert torch.allclose(out["rgb"], out["background"])
    out["rgb"].sum().backward()


# -- regularisers --------------------------------------------------------------------------------------------------
def test_regularisers():
    view = torch.tensor([[0.0, 0.0, -1.0]] * 3)  # rays going down -z
    normals = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [0.0, 0.6, -0.8]])  # facing camera, away, half away
    weights = torch.tensor([0.5, 0.25, 1.0], requires_grad=True)
    normals.requires_grad_()
    loss = orientation_loss(weights, normals, view, opacity=torch.tensor([0.7, 0.0]))
    assert loss.item() == pytest.approx((0.25 * 1.0 + 1.0 * 0.8**2) / 1)
    loss.backward()
    assert weights.grad is None  # weights are detached: the penalty moves normals only
    assert normals.grad[0].abs().sum() == 0 and normals.grad[1].abs().sum() > 0
    assert orientation_loss(weights, normals, view).item() == pytest.approx((0.25 + 0.64) / 3)
    assert sparsity_loss(torch.zeros(4)).item() == pytest.approx(0.1)
    assert sparsity_loss(torch.ones(4)).item() == pytest.approx(math.sqrt(1.01))
    assert opacity_entropy(torch.full((3,), 0.5)).item() == pytest.approx(math.log(2))
    assert opacity_entropy(torch.tensor([0.0, 1.0])).item() < 0.01


def test_distortion_loss_matches_the_pairwise_sum_and_prefers_a_thin_surface():
    """The O(M) prefix-sum form equals the O(S^2) definition ray by ray, with rays of different sample counts
    (and an empty one) packed ray-major; a ray's weight gathered in one bin costs less than the same opacity spread."""
    generator = torch.Generator().manual_seed(0)
    counts = [5, 0, 9, 1, 7]
    weights, t, delta, ray_indices, expected = [], [], [], [], 0.0
    for ray, count in enumerate(counts):
        w = torch.rand(count, generator=generator, dtype=torch.float64) / max(count, 1)
        tt = torch.sort(torch.rand(count, generator=generator, dtype=torch.float64) * 2.0).values
        d = torch.rand(count, generator=generator, dtype=torch.float64) * 0.05
        pairs = (w[:, None] * w[None, :] * (tt[:, None] - tt[None, :]).abs()).sum()
        expected += float(pairs + (w * w * d).sum() / 3)
        weights.append(w), t.append(tt), delta.append(d), ray_indices.append(torch.full((count,), ray))
    weights = torch.cat(weights).requires_grad_()
    loss = distortion_loss(weights, torch.cat(t), torch.cat(delta), torch.cat(ray_indices), len(counts))
    assert loss.item() == pytest.approx(expected / len(counts), rel=1e-10)
    loss.backward()
    assert torch.isfinite(weights.grad).all() and weights.grad.abs().sum() > 0

    t_bins = torch.linspace(0.0, 1.0, 20)
    delta = torch.full((20,), 0.05)
    rays = torch.zeros(20, dtype=torch.long)
    surface = torch.zeros(20).index_fill(0, torch.tensor([10]), 0.9)
    slab = torch.zeros(20).index_fill(0, torch.arange(6, 15), 0.1)
    assert distortion_loss(surface, t_bins, delta, rays, 1) < 0.2 * distortion_loss(slab, t_bins, delta, rays, 1)
    assert distortion_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.long), 3) == 0

