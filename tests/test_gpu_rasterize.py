"""The nvdiffrast backend against the pure-PyTorch one, on a CUDA device (deselected in CI: `-m 'not gpu'`).

Scenes: procedural meshes (torus, box, uv sphere) seen by seeded random orbit cameras, batches of 2-4, at 512x512
and 64x64; both backends get the same float32 clip positions on the GPU. What is measured (each test prints a
`METRIC` line; run with `-s` to see them):

* coverage: the fraction of pixels whose covered/uncovered state agrees (>= 99.5 %), every disagreement lying on
  a coverage edge; the fraction of pixels covered by both that have the same triangle id;
* values: max |difference| of u, v, z/w and of interpolated attributes ((V, C) and (B, V, C)) over pixels where
  both backends pick the same triangle, and over interior pixels (same triangle, and a 3x3 neighbourhood of that
  one triangle in both), each < 1e-4;
* gradients of a loss through u, v and interpolated attributes restricted to interior pixels (and, separately,
  to all same-triangle pixels), w.r.t. pos_clip and the attributes: cosine similarity (> 0.999) and relative L2
  error ||g_nv - g_torch|| / ||g_torch|| (pos_clip: < 1e-2 on interior pixels, < 5e-2 on all same-triangle
  pixels; attributes: < 1e-3); the pos_clip difference is shown to be nvdiffrast's 1e-6 in the backward
  denominator (its gradient matches autograd of the epsilon-shifted barycentrics); nvdiffrast drops the gradient
  of z/w (asserted, documented in the backend);
* antialias: changes only pixels next to a triangle-id edge, some on the coverage silhouette, and gives non-zero
  pos_clip gradients on the vertices of triangles at edges (the torch backend's antialias is the identity); the
  gradient of the antialiased coverage w.r.t. an image-plane scaling is compared with the area derivative 2 A
  (close on the box; about half on the finely tessellated torus, whose contour slivers cover no pixel centre);
* render_mesh: both backends' images agree to < 1e-3 at interior pixels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

from shared import meshes
from shared.cameras import Camera, Shading, orbit_camera
from shared.meshes import Mesh
from shared.rasterize import Rasterizer, TorchRasterizer, make_rasterizer
from shared.rasterize.base import to_top_row_first
from shared.render import clip_positions, render_mesh

pytestmark = pytest.mark.gpu

BUILDERS = {"torus": meshes.torus, "box": meshes.box, "uv_sphere": meshes.uv_sphere}
# (mesh, resolution, batch)
SCENES = [("torus", 512, 2), ("box", 512, 3), ("torus", 64, 4), ("box", 64, 2), ("uv_sphere", 64, 3)]
SCENE_IDS = [f"{name}-{side}px-b{batch}" for name, side, batch in SCENES]


def report(test: str, label: str, **values: float) -> None:
    """One greppable line of measured figures per check."""
    print(f"\nMETRIC {test} [{label}] " + " ".join(f"{key}={value:.6g}" for key, value in values.items()))


@pytest.fixture(scope="module")
def nv() -> Rasterizer:
    """The nvdiffrast backend; skips without the package or CUDA. Builds the plugin (timed) on first use."""
    pytest.importorskip("nvdiffrast.torch", reason="needs diffrp-nvdiffrast")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    rasterizer = make_rasterizer("nvdiffrast")
    start = time.perf_counter()
    pos = torch.tensor([[[-0.5, -0.5, 0.0, 1.0], [0.5, -0.5, 0.0, 1.0], [0.0, 0.5, 0.0, 1.0]]], device="cuda")
    rasterizer.rasterize(pos, torch.tensor([[0, 1, 2]], device="cuda"), (8, 8))
    torch.cuda.synchronize()
    report("plugin", "first context", seconds=time.perf_counter() - start)
    return rasterizer


@pytest.fixture(scope="module")
def tr() -> Rasterizer:
    return TorchRasterizer()


def random_cameras(batch: int, size: int, seed: int, **kwargs) -> list[Camera]:
    """Seeded orbit cameras: azimuth 0-360, elevation -30..60 degrees, distance 1.6-2.2."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(batch, 3, generator=generator).tolist()
    return [
        orbit_camera(360 * a, -30 + 90 * e, 1.6 + 0.6 * d, size=size, **kwargs) for a, e, d in values
    ]


def triangle_ids(rast: torch.Tensor) -> torch.Tensor:
    """(B, H, W) long: triangle id + 1, 0 on background."""
    return (rast[..., 3].detach() + 0.5).long()


def uniform_3x3(labels: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: the 3x3 neighbourhood holds one label (image-border pixels never do)."""
    padded = F.pad(labels[:, None].double(), (1, 1, 1, 1), value=-1.0)
    high = F.max_pool2d(padded, 3, stride=1)
    low = -F.max_pool2d(-padded, 3, stride=1)
    return (high == low)[:, 0]


@dataclass
class Scene:
    label: str
    pos: torch.Tensor  # (B, V, 4) float32, CUDA
    tri: torch.Tensor  # (F, 3) int64, CUDA
    resolution: tuple[int, int]
    rast_nv: torch.Tensor
    rast_torch: torch.Tensor

    @property
    def ids_nv(self) -> torch.Tensor:
        return triangle_ids(self.rast_nv)

    @property
    def ids_torch(self) -> torch.Tensor:
        return triangle_ids(self.rast_torch)

    @property
    def same_triangle(self) -> torch.Tensor:
        """Covered in both backends by the same triangle."""
        return (self.ids_nv == self.ids_torch) & (self.ids_torch > 0)

    @property
    def interior(self) -> torch.Tensor:
        """Same triangle in both backends and a 3x3 neighbourhood of that one triangle in both."""
        a, b = self.ids_nv, self.ids_torch
        return (a == b) & (a > 0) & uniform_3x3(a) & uniform_3x3(b)


@lru_cache(maxsize=None)
def _scene(spec: tuple[str, int, int], nv: Rasterizer, tr: Rasterizer) -> Scene:
    name, side, batch = spec
    mesh = BUILDERS[name]()
    cameras = random_cameras(batch, side, seed=side + batch)
    pos = clip_positions(mesh.vertices, cameras).cuda().contiguous()
    tri = mesh.faces.cuda()
    resolution = (side, side)
    return Scene(
        f"{name} {side}px b{batch}", pos, tri, resolution,
        nv.rasterize(pos, tri, resolution), tr.rasterize(pos, tri, resolution),
    )


def scene(spec, nv, tr) -> Scene:
    return _scene(tuple(spec), nv, tr)


def _cosine_and_relative(mine: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Cosine similarity and relative L2 error ||mine - reference|| / ||reference|| of two flattened tensors."""
    a, b = mine.double().flatten(), reference.double().flatten()
    cosine = float(F.cosine_similarity(a, b, dim=0))
    relative = float((a - b).norm() / b.norm())
    return cosine, relative


# ---------------------------------------------------------------------------------------------- (a) coverage
@pytest.mark.parametrize("spec", SCENES, ids=SCENE_IDS)
def test_coverage_agrees_except_at_edges(spec, nv, tr):
    s = scene(spec, nv, tr)
    cov_nv, cov_torch = s.ids_nv > 0, s.ids_torch > 0
    differ = cov_nv != cov_torch
    agreement = 1.0 - differ.double().mean().item()
    both = cov_nv & cov_torch
    same_id = (s.ids_nv == s.ids_torch)[both].double().mean().item()
    coverage_edge = ~uniform_3x3(cov_nv.long()) | ~uniform_3x3(cov_torch.long())
    report(
        "coverage", s.label, agreement=agreement, differing_pixels=int(differ.sum()),
        covered_pixels=int(cov_torch.sum()), same_triangle_among_covered=same_id,
        interior_fraction_of_covered=s.interior.sum().item() / max(1, int(both.sum())),
    )
    assert agreement >= 0.995
    assert not (differ & ~coverage_edge).any(), "a coverage difference away from the silhouette"
    assert same_id >= 0.9


# ------------------------------------------------------------------------ (b) values where both pick one triangle
@pytest.mark.parametrize("spec", SCENES, ids=SCENE_IDS)
def test_barycentrics_depth_and_attributes_agree(spec, nv, tr):
    """Max |difference| over pixels where both backends pick the same triangle (reported for interior pixels
    too). Same-triangle pixels suffice: both evaluate the same closed form for the same triangle there."""
    s = scene(spec, nv, tr)
    masks = {"same": s.same_triangle, "interior": s.interior}
    generator = torch.Generator().manual_seed(7)
    batch, verts = s.pos.shape[:2]
    images = {f"{c}": (s.rast_nv[..., i], s.rast_torch[..., i]) for i, c in enumerate(["u", "v", "z_over_w"])}
    for label, attr in [("attr_VC", torch.rand(verts, 3, generator=generator)),
                        ("attr_BVC", torch.rand(batch, verts, 2, generator=generator))]:
        attr = attr.cuda()
        images[label] = (nv.interpolate(attr, s.rast_nv, s.tri), tr.interpolate(attr, s.rast_torch, s.tri))
    figures, worst = {}, 0.0
    for kind, mask in masks.items():
        figures[f"{kind}_pixels"] = int(mask.sum())
        for label, (mine, reference) in images.items():
            error = (mine - reference).abs()[mask].max().item() if mask.any() else 0.0
            figures[f"{kind}_max_abs_{label}"] = error
            worst = max(worst, error)
    report("values", s.label, **figures)
    assert masks["same"].sum() > 0.5 * (s.ids_torch > 0).sum()
    assert worst < 1e-4, figures


# ---------------------------------------------------------------------- (c) gradients through same-triangle pixels
@pytest.mark.parametrize("spec", SCENES, ids=SCENE_IDS)
def test_gradients_agree_through_interior_pixels(spec, nv, tr):
    """Loss = sum over masked pixels of probe . interpolate(attr) + probe' . (u, v), the same masks and probes for
    both backends. Masks: interior pixels (3x3 of one triangle in both; few on small triangles, so checked when
    there are >= 200) and all same-triangle pixels (rasterize has no visibility gradient in either backend, so
    those agree too)."""
    s = scene(spec, nv, tr)
    generator = torch.Generator().manual_seed(11)
    batch, verts = s.pos.shape[:2]
    attr0 = torch.rand(verts, 3, generator=generator).cuda()
    noise = torch.randn(*s.rast_nv.shape[:3], 5, generator=generator).cuda()

    def grads(rasterizer: Rasterizer, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probe = noise * mask[..., None].float()
        pos, attr = s.pos.clone().requires_grad_(True), attr0.clone().requires_grad_(True)
        rast = rasterizer.rasterize(pos, s.tri, s.resolution)
        loss = (rasterizer.interpolate(attr, rast, s.tri) * probe[..., :3]).sum()
        loss = loss + (rast[..., :2] * probe[..., 3:]).sum()
        return torch.autograd.grad(loss, (pos, attr))

    for kind, mask in {"interior": s.interior, "same": s.same_triangle}.items():
        if kind == "interior" and mask.sum() < 200:
            report("gradients", f"{s.label} {kind}", pixels=int(mask.sum()))
            continue
        (pos_nv, attr_nv), (pos_torch, attr_torch) = grads(nv, mask), grads(tr, mask)
        cos_pos, rel_pos = _cosine_and_relative(pos_nv, pos_torch)
        cos_attr, rel_attr = _cosine_and_relative(attr_nv, attr_torch)
        report(
            "gradients", f"{s.label} {kind}", pixels=int(mask.sum()), cos_pos=cos_pos, rel_err_pos=rel_pos,
            cos_attr=cos_attr, rel_err_attr=rel_attr,
        )
        assert pos_torch.abs().sum() > 0 and attr_torch.abs().sum() > 0
        # Thin (grazing) triangles have no interior pixels; there nvdiffrast's 1e-6 in the backward denominator
        # is a larger share (see the next test), hence the looser relative bound on all same-triangle pixels.
        assert cos_pos > 0.999 and rel_pos < (1e-2 if kind == "interior" else 5e-2), (kind, cos_pos, rel_pos)
        assert cos_attr > 0.999 and rel_attr < 1e-3, (kind, cos_attr, rel_attr)


def barycentrics(pos: torch.Tensor, tri: torch.Tensor, ids: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, H, W, 2) perspective-correct (u, v) of the triangles in `ids`, recomputed from pos in closed form with
    the denominator shifted by eps (sign of the area), as nvdiffrast's rasterize backward does with eps = 1e-6;
    eps = 0 is the exact formula (the torch backend's). Differentiable w.r.t. pos."""
    batch, height, width = ids.shape
    b, row, col = torch.nonzero(ids > 0, as_tuple=True)
    verts = pos[b[:, None], tri[ids[b, row, col] - 1]]  # (N, 3, 4)
    fx = ((2 * col + 1).float() / width - 1)[:, None]
    fy = ((2 * row + 1).float() / height - 1)[:, None]
    x, y = verts[..., 0] - fx * verts[..., 3], verts[..., 1] - fy * verts[..., 3]
    a0 = x[:, 1] * y[:, 2] - y[:, 1] * x[:, 2]
    a1 = x[:, 2] * y[:, 0] - y[:, 2] * x[:, 0]
    a2 = x[:, 0] * y[:, 1] - y[:, 0] * x[:, 1]
    total = a0 + a1 + a2
    denominator = total + torch.copysign(torch.full_like(total, eps), total).detach()
    values = torch.stack([a0 / denominator, a1 / denominator], dim=-1)
    return pos.new_zeros(batch, height, width, 2).index_put((b, row, col), values)


@pytest.mark.parametrize("spec", SCENES, ids=SCENE_IDS)
def test_nvdiffrast_gradient_is_that_of_its_epsilon_shifted_barycentrics(spec, nv, tr):
    """Explains the same-triangle gradient differences: nvdiffrast's (u, v) gradient equals the autograd gradient
    of a/(sum a + 1e-6 sign), not of a/sum a. Loss: random probe . (u, v) over same-triangle pixels."""
    s = scene(spec, nv, tr)
    generator = torch.Generator().manual_seed(13)
    probe = torch.randn(*s.rast_nv.shape[:3], 2, generator=generator).cuda() * s.same_triangle[..., None].float()
    pos = s.pos.clone().requires_grad_(True)
    (grad_nv,) = torch.autograd.grad((nv.rasterize(pos, s.tri, s.resolution)[..., :2] * probe).sum(), pos)
    figures = {}
    for label, eps in [("exact", 0.0), ("eps_1e-6", 1e-6)]:
        (grad,) = torch.autograd.grad((barycentrics(pos, s.tri, s.ids_nv, eps) * probe).sum(), pos)
        figures[f"cos_vs_{label}"], figures[f"rel_err_vs_{label}"] = _cosine_and_relative(grad_nv, grad)
    report("gradient_epsilon", s.label, **figures)
    assert figures["cos_vs_eps_1e-6"] > 0.999 and figures["rel_err_vs_eps_1e-6"] < 5e-3
    if figures["rel_err_vs_exact"] > 1e-3:  # a difference large enough to attribute: the epsilon explains most of it
        assert figures["rel_err_vs_eps_1e-6"] < 0.25 * figures["rel_err_vs_exact"]


def test_nvdiffrast_drops_depth_gradient(nv, tr):
    """Documented difference: nvdiffrast's rasterize backward ignores d loss / d (z/w); the torch backend doesn't."""
    s = scene(SCENES[0], nv, tr)
    mask = s.interior.float()
    results = {}
    for rasterizer in (nv, tr):
        pos = s.pos.clone().requires_grad_(True)
        rast = rasterizer.rasterize(pos, s.tri, s.resolution)
        (grad,) = torch.autograd.grad((rast[..., 2] * mask).sum(), pos)
        results[rasterizer.name] = grad.abs().sum().item()
    report("depth_gradient", s.label, nvdiffrast_abs_sum=results["nvdiffrast"], torch_abs_sum=results["torch"])
    assert results["nvdiffrast"] == 0.0 and results["torch"] > 0.0


# ---------------------------------------------------------------------------------------------- (d) antialias
@pytest.mark.parametrize("spec", SCENES, ids=SCENE_IDS)
def test_antialias_touches_only_edges_and_gives_silhouette_gradients(spec, nv, tr):
    s = scene(spec, nv, tr)
    generator = torch.Generator().manual_seed(5)
    batch, verts = s.pos.shape[:2]
    colors = torch.rand(verts, 3, generator=generator).cuda()
    covered = (s.ids_nv > 0)[..., None].float()
    image = (covered * nv.interpolate(colors, s.rast_nv, s.tri) + (1 - covered)).detach()  # white background

    smoothed = nv.antialias(image, s.rast_nv, s.pos, s.tri)
    changed = (smoothed - image).abs().amax(-1) > 1e-6
    id_edge = ~uniform_3x3(s.ids_nv)
    silhouette = ~uniform_3x3((s.ids_nv > 0).long())
    assert changed.any()
    assert not (changed & ~id_edge).any(), "antialias changed a pixel away from every triangle edge"
    assert (changed & silhouette).any()

    pos = s.pos.clone().requires_grad_(True)
    probe = torch.randn(image.shape, generator=generator).cuda()
    (grad,) = torch.autograd.grad((nv.antialias(image, s.rast_nv.detach(), pos, s.tri) * probe).sum(), pos)
    moved = grad.abs().sum(-1) > 0  # (B, V)
    edge_vertices = torch.zeros(batch, verts, dtype=torch.bool, device="cuda")
    for b in range(batch):
        faces = (s.ids_nv[b][id_edge[b] & (s.ids_nv[b] > 0)] - 1).unique()
        edge_vertices[b, s.tri[faces].reshape(-1)] = True
    report(
        "antialias", s.label, changed_pixels=int(changed.sum()),
        changed_on_silhouette=int((changed & silhouette).sum()), vertices_with_pos_grad=int(moved.sum()),
        pos_grad_abs_sum=grad.abs().sum().item(),
    )
    assert moved.any(), "no visibility gradient from nvdiffrast's antialias"
    assert not (moved & ~edge_vertices).any(), "pos gradient on a vertex of no triangle seen at an edge"

    identity = tr.antialias(image, s.rast_torch, pos, s.tri)
    assert torch.equal(identity, image) and not identity.requires_grad  # torch backend: no silhouette gradient


@pytest.mark.parametrize(
    ("spec", "low", "high"), [(SCENES[0], 0.3, 1.15), (SCENES[1], 0.85, 1.15)], ids=SCENE_IDS[:2]
)
def test_antialiased_coverage_gradient_tracks_area(spec, low, high, nv, tr):
    """Scaling clip x, y by (1 + s) scales the projected area A by (1 + s)^2, so dA/ds = 2 A at s = 0. Compared
    with the gradient of the antialiased coverage sum, and with a finite difference of the hard pixel count.

    nvdiffrast only uses silhouette edges of the triangle seen at one of the two pixels of a pair; on a smooth
    tessellation (torus) the contour triangles are sub-pixel slivers covering no pixel centre, so part of the
    outline gives no gradient (about half, measured); on the box's large faces it is close to 2 A."""
    s = scene(spec, nv, tr)
    scale = torch.zeros((), device="cuda", requires_grad=True)

    def scaled(value: torch.Tensor) -> torch.Tensor:
        factor = torch.stack([1 + value, 1 + value, torch.ones_like(value), torch.ones_like(value)])
        return s.pos * factor

    pos = scaled(scale)
    rast = nv.rasterize(pos.detach(), s.tri, s.resolution)
    covered = (rast[..., 3:4] > 0).float()
    (gradient,) = torch.autograd.grad(nv.antialias(covered, rast, pos, s.tri).sum(), scale)
    area = covered.sum().item()
    step = 0.01
    counts = [
        (nv.rasterize(scaled(torch.tensor(h, device="cuda")), s.tri, s.resolution)[..., 3] > 0).sum().item()
        for h in (step, -step)
    ]
    finite_difference = (counts[0] - counts[1]) / (2 * step)
    report(
        "antialias_area", s.label, area_pixels=area, grad=gradient.item(), two_area=2 * area,
        finite_difference=finite_difference, grad_over_two_area=gradient.item() / (2 * area),
    )
    assert low < gradient.item() / (2 * area) < high


# ----------------------------------------------------------------------------------------- (e) render_mesh
@pytest.mark.parametrize("shading", [Shading.ALBEDO, Shading.LAMBERTIAN, Shading.NORMAL], ids=lambda s: s.value)
@pytest.mark.parametrize("name", ["torus", "box"])
def test_render_mesh_agrees_away_from_edges(name, shading, nv, tr):
    """A CPU mesh, as the services use it: the nvdiffrast backend moves tensors to CUDA and back."""
    base = BUILDERS[name]()
    colors = torch.rand(base.num_vertices, 3, generator=torch.Generator().manual_seed(3))
    mesh = Mesh(base.vertices, base.faces, vertex_colors=colors)
    cameras = random_cameras(2, 512, seed=23, shading=shading)
    image_nv, image_torch = render_mesh(mesh, cameras, nv), render_mesh(mesh, cameras, tr)
    assert image_nv.device.type == "cpu" and image_nv.shape == image_torch.shape == (2, 3, 512, 512)

    pos = clip_positions(mesh.vertices, cameras)
    a = triangle_ids(nv.rasterize(pos, mesh.faces, (512, 512)))
    b = triangle_ids(tr.rasterize(pos, mesh.faces, (512, 512)))
    inside = to_top_row_first(((a == b) & (a > 0) & uniform_3x3(a) & uniform_3x3(b))[..., None])[..., 0]
    diff = (image_nv - image_torch).abs().amax(1)
    report(
        "render_mesh", f"{name} {shading.value}", interior_pixels=int(inside.sum()),
        max_abs_interior=diff[inside].max().item(),
        fraction_of_all_pixels_over_1e_2=(diff > 1e-2).double().mean().item(),
    )
    assert inside.sum() > 0.1 * (a > 0).sum()
    assert diff[inside].max() < 1e-3


def test_render_mesh_with_cuda_mesh(nv, tr):
    """The no-copy path: mesh and results on CUDA (albedo shading; the lit modes need CPU meshes, see the report)."""
    base = meshes.box()
    colors = torch.rand(base.num_vertices, 3, generator=torch.Generator().manual_seed(4))
    mesh = Mesh(base.vertices.cuda(), base.faces.cuda(), vertex_colors=colors.cuda())
    cameras = random_cameras(3, 256, seed=29)
    image_nv, image_torch = render_mesh(mesh, cameras, nv), render_mesh(mesh, cameras, tr)
    assert image_nv.is_cuda
    pos = clip_positions(mesh.vertices, cameras)
    a = triangle_ids(nv.rasterize(pos, mesh.faces, (256, 256)))
    b = triangle_ids(tr.rasterize(pos, mesh.faces, (256, 256)))
    inside = to_top_row_first(((a == b) & (a > 0) & uniform_3x3(a) & uniform_3x3(b))[..., None])[..., 0]
    diff = (image_nv - image_torch).abs().amax(1)
    report("render_mesh_cuda", "box albedo 256px b3", interior_pixels=int(inside.sum()),
           max_abs_interior=diff[inside].max().item())
    assert inside.sum() > 0.1 * (a > 0).sum() and diff[inside].max() < 1e-3


# ------------------------------------------------------------------------------------ plumbing on the device
def test_dtype_device_and_caches(nv, tr):
    """float64 / CPU inputs come back float64 / CPU with the float32 CUDA values; one context, cached faces."""
    s = scene(SCENES[3], nv, tr)
    rast64 = nv.rasterize(s.pos.double().cpu(), s.tri.cpu(), s.resolution)
    assert rast64.dtype == torch.float64 and rast64.device.type == "cpu"
    assert torch.equal(rast64.float().cuda(), s.rast_nv)
    attr = torch.rand(s.pos.shape[1], 2, dtype=torch.float64)
    out = nv.interpolate(attr, rast64, s.tri.cpu())
    assert out.dtype == torch.float64 and out.device.type == "cpu"
    assert torch.allclose(out.cuda().float(), nv.interpolate(attr.float().cuda(), s.rast_nv, s.tri), atol=1e-6)
    tri = s.tri.clone()
    for _ in range(3):
        nv.rasterize(s.pos, tri, s.resolution)
        nv.antialias(torch.rand(*s.rast_nv.shape[:3], 1, device="cuda"), s.rast_nv, s.pos, tri)
    assert len(nv._contexts) == 1
    assert nv._tris._entries[id(tri)][2].keys() == {("tri32", "cuda:0"), ("topology", "cuda:0")}
