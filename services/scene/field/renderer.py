"""Volume rendering of a NeuralField from shared `Camera`s (the Magic3D coarse stage's renderer).

Rays: one per pixel centre. Pixel (row i, col j) of an H x W image, row 0 = TOP, looks along the camera-space
direction (x_ndc tan(fovy/2) aspect, y_ndc tan(fovy/2), -1) with x_ndc = (2j + 1) / W - 1 and
y_ndc = 1 - (2i + 1) / H, aspect = camera.width / camera.height (the camera's own aspect, whatever the render
resolution: the same rule as shared.render). Directions are rotated to the world by camera_to_world and normalised.

Samples: the ray's segment inside the bounding sphere (radius `RendererConfig.radius`) is cut into
num_samples_per_ray equal bins; a sample sits at each bin's centre, or uniformly within it when stratified
(training; jitter drawn from the generator passed to `render`, so renders are reproducible), and represents its bin
(delta = bin width). Rays that miss the sphere have no samples.

Empty-space skipping: with an OccupancyGrid, samples in unoccupied cells are dropped before the field is called;
the field (hash grid + MLP, and normals) runs on the surviving samples only and the results are scattered back
(skipped samples have density 0).

Compositing: alpha_i = 1 - exp(-sigma_i delta_i), T_i = prod_{j<i} (1 - alpha_j), w_i = alpha_i T_i,
rgb = sum_i w_i c_i + (1 - opacity) background, opacity = sum_i w_i, depth = sum_i w_i t_i (distance along the
unit ray; 0 where empty, not divided by opacity), normal = sum_i w_i n_i (world space, not renormalised).

Shading per sample: `shared.shading.shade` under the sample's camera's mode and point light (the model the mesh
renderer and the analytic prior's targets use).

Regularisers (threestudio's Magic3D system): `orientation_loss` (DreamFusion's normal orientation penalty),
`sparsity_loss` (threestudio's "sparsity": mean sqrt(opacity^2 + 0.01)), `opacity_entropy` (threestudio's
"opaque" loss, binary entropy of the opacity; weight 0 in its Magic3D configs), `distortion_loss` (Mip-NeRF 360's,
weight 0 by default).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.profiler import record_function

from services.scene.field.occupancy import OccupancyGrid, uniform
from services.scene.field_config import RendererConfig
from shared.cameras import Camera, Shading
from shared.shading import shade

_SHADING_IDS = {Shading.ALBEDO: 0, Shading.LAMBERTIAN: 1, Shading.TEXTURELESS: 2, Shading.NORMAL: 3}


def _resolution(resolution: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        height = width = resolution
    else:
        height, width = int(resolution[0]), int(resolution[1])
    if height < 1 or width < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    return height, width


def camera_rays(
    cameras: list[Camera], resolution: int | tuple[int, int], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (origins (B, H, W, 3), unit directions (B, H, W, 3)) in world space, row 0 = top of the image."""
    height, width = _resolution(resolution)
    rows = torch.arange(height, dtype=torch.float32, device=device)
    cols = torch.arange(width, dtype=torch.float32, device=device)
    y_ndc = 1.0 - (2.0 * rows + 1.0) / height  # (H,): +1 at the top
    x_ndc = (2.0 * cols + 1.0) / width - 1.0  # (W,)
    origins, directions = [], []
    for camera in cameras:
        tan_y = math.tan(math.radians(camera.fovy_deg) / 2.0)
        tan_x = tan_y * camera.width / camera.height
        d_cam = torch.stack(
            [
                (x_ndc * tan_x)[None, :].expand(height, width),
                (y_ndc * tan_y)[:, None].expand(height, width),
                -torch.ones(height, width, device=device),
            ],
            dim=-1,
        )  # (H, W, 3)
        c2w = camera.camera_to_world.to(device=device, dtype=torch.float32)
        d_world = F.normalize(d_cam @ c2w[:3, :3].T, dim=-1)
        directions.append(d_world)
        origins.append(c2w[:3, 3].expand(height, width, 3))
    return torch.stack(origins), torch.stack(directions)


def ray_sphere(
    origins: torch.Tensor, directions: torch.Tensor, radius: float, min_near: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit-direction rays (..., 3) against the sphere |p| = radius -> (near (...), far (...), hit mask (...))."""
    b = (origins * directions).sum(-1)
    c = (origins * origins).sum(-1) - radius * radius
    disc = b * b - c
    root = torch.sqrt(disc.clamp(min=0.0))
    near = (-b - root).clamp(min=min_near)
    far = -b + root
    hit = (disc > 0) & (far > near)
    return torch.where(hit, near, torch.zeros_like(near)), torch.where(hit, far, torch.zeros_like(far)), hit


class VolumeRenderer:
    """Renders a NeuralField (+ background) from cameras; see the module docstring for conventions."""

    def __init__(self, cfg: RendererConfig | None = None) -> None:
        self.cfg = cfg or RendererConfig()

    def render(
        self,
        field: nn.Module,
        background: nn.Module | None,
        cameras: list[Camera],
        resolution: int | tuple[int, int],
        generator: torch.Generator | None = None,
        shading: Shading | None = None,
        occupancy: OccupancyGrid | None = None,
        stratified: bool | None = None,
        with_normals: bool | None = None,
    ) -> dict[str, Any]:
        """Renders B = len(cameras) images.

        shading: overrides every camera's own `shading` when given.
        occupancy: an OccupancyGrid; used when cfg.use_occupancy.
        stratified: overrides cfg.stratified (pass False for evaluation renders).
        with_normals: compute normals (None: when a shading mode needs them or autograd is on, i.e. training,
            where the orientation loss needs them).

        Returns images, all top-row-first:
          "rgb" (B, 3, H, W) in [0, 1], "opacity" (B, 1, H, W), "depth" (B, 1, H, W), "background" (B, 3, H, W),
          "normal" (B, 3, H, W) when normals were computed (weighted world normals, sum_i w_i n_i);
        per evaluated sample (M of them; packed, ray-major; for the regularisers):
          "weights" (M,), "normals" (M, 3) (when computed), "view_dirs" (M, 3) (unit ray directions, camera to
          point), "ray_indices" (M,) into the B*H*W rays, "t" (M,), "delta" (M,);
        counters (ints): "n_samples" (samples inside the sphere), "n_evaluated" (samples the field ran on).
        """
        if not cameras:
            raise ValueError("render needs at least one camera")
        height, width = _resolution(resolution)
        cfg = self.cfg
        device = _device_of(field)
        batch, n_pix, n_s = len(cameras), height * width, cfg.num_samples_per_ray
        n_rays = batch * n_pix

        rays_scope = record_function("render.rays")  # rays, samples and occupancy pruning
        rays_scope.__enter__()
        origins, directions = camera_rays(cameras, (height, width), device)
        origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)
        near, far, hit = ray_sphere(origins, directions, cfg.radius, cfg.min_near)

        # -- samples along rays (R, S) ---------------------------------------------------------------------------
        stratified = cfg.stratified if stratified is None else stratified
        if stratified:
            u = uniform((n_rays, n_s), generator, device)
        else:
            u = torch.full((n_rays, n_s), 0.5, device=device)
        bin_width = (far - near) / n_s  # (R,)
        t = near[:, None] + (torch.arange(n_s, device=device)[None, :] + u) * bin_width[:, None]  # (R, S)
        points = origins[:, None, :] + directions[:, None, :] * t[..., None]  # (R, S, 3)
        valid = hit[:, None].expand(n_rays, n_s)
        n_samples = int(valid.sum())
        if occupancy is not None and cfg.use_occupancy:
            valid = valid & occupancy.occupied(points)

        flat = valid.reshape(-1).nonzero().reshape(-1)  # evaluated samples, ray-major
        ray_idx = torch.div(flat, n_s, rounding_mode="floor")
        x = points.reshape(-1, 3)[flat]
        dirs = directions[ray_idx]
        delta = bin_width[ray_idx]

        rays_scope.__exit__(None, None, None)

        # -- shading modes and normals --------------------------------------------------------------------------
        modes = [shading if shading is not None else camera.shading for camera in cameras]
        needs_normals = any(m != Shading.ALBEDO for m in modes)
        if with_normals is None:
            with_normals = needs_normals or torch.is_grad_enabled()
        elif needs_normals and not with_normals:
            raise ValueError(f"shading {sorted({m.value for m in modes})} needs normals; with_normals=False")

        out_field = field(x, with_normal=with_normals)
        sigma = out_field["density"].reshape(-1)
        albedo = out_field["albedo"]
        normals = out_field.get("normal")
        composite_scope = record_function("render.composite")  # shading, compositing, background
        composite_scope.__enter__()
        colors = self._shade(albedo, normals, x, ray_idx // n_pix, modes, cameras)

        # -- compositing on the dense (R, S) layout; skipped samples contribute nothing -------------------------
        sigma_delta = torch.zeros(n_rays * n_s, device=device, dtype=sigma.dtype).index_put((flat,), sigma * delta)
        sigma_delta = sigma_delta.reshape(n_rays, n_s)
        alpha = 1.0 - torch.exp(-sigma_delta)
        # T_i = exp(-sum_{j<i} sigma_j delta_j): exclusive cumulative sum, computed in log space.
        transmittance = torch.exp(-torch.cumsum(sigma_delta, dim=1) + sigma_delta)
        weights_dense = alpha * transmittance  # (R, S)
        weights = weights_dense.reshape(-1)[flat]  # (M,)

        opacity = weights_dense.sum(dim=1)  # (R,)
        depth = (weights_dense * t).sum(dim=1)
        rgb_fg = _accumulate(weights[:, None] * colors, ray_idx, n_rays)
        bg = self._background(background, cameras, directions, height, width, device)  # (R, 3)
        rgb = rgb_fg + (1.0 - opacity)[:, None] * bg
        composite_scope.__exit__(None, None, None)

        def image(v: torch.Tensor) -> torch.Tensor:  # (R, C) -> (B, C, H, W)
            return v.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()

        result = {
            "rgb": image(rgb),
            "opacity": image(opacity[:, None]),
            "depth": image(depth[:, None]),
            "background": image(bg),
            "weights": weights,
            "view_dirs": dirs,
            "ray_indices": ray_idx,
            "t": t.reshape(-1)[flat],
            "delta": delta,
            "n_samples": n_samples,
            "n_evaluated": int(flat.numel()),
        }
        if normals is not None:
            result["normals"] = normals
            result["normal"] = image(_accumulate(weights[:, None] * normals, ray_idx, n_rays))
        return result

    @staticmethod
    def _shade(
        albedo: torch.Tensor,
        normals: torch.Tensor | None,
        x: torch.Tensor,
        camera_idx: torch.Tensor,
        modes: list[Shading],
        cameras: list[Camera],
    ) -> torch.Tensor:
        """Per-sample colour (M, 3) under each sample's camera's shading mode."""
        if all(m == Shading.ALBEDO for m in modes):
            return albedo
        device, dtype = albedo.device, albedo.dtype
        mode = torch.tensor([_SHADING_IDS[m] for m in modes], device=device)[camera_idx]  # (M,)
        light_pos = torch.tensor([c.light.position for c in cameras], device=device, dtype=dtype)[camera_idx]
        ambient = torch.tensor([c.light.ambient for c in cameras], device=device, dtype=dtype)[camera_idx, None]
        diffuse = torch.tensor([c.light.diffuse for c in cameras], device=device, dtype=dtype)[camera_idx, None]
        color = albedo
        for shading in sorted(set(modes) - {Shading.ALBEDO}, key=_SHADING_IDS.get):  # each sample takes its mode
            shaded = shade(shading, albedo, normals, x, light_pos, ambient, diffuse)
            color = torch.where((mode == _SHADING_IDS[shading])[:, None], shaded, color)
        return color

    def _background(
        self,
        background: nn.Module | None,
        cameras: list[Camera],
        directions: torch.Tensor,
        height: int,
        width: int,
        device: torch.device,
    ) -> torch.Tensor:
        mode = self.cfg.background
        if mode == "white":
            return torch.ones_like(directions)
        if mode == "learned" and background is not None:
            return background(directions)
        return torch.stack([c.background(height, width).to(device) for c in cameras]).reshape(-1, 3)


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def _accumulate(values: torch.Tensor, ray_idx: torch.Tensor, n_rays: int) -> torch.Tensor:
    """Sums per-sample values (M, C) into their rays -> (R, C)."""
    return torch.zeros(n_rays, values.shape[1], device=values.device, dtype=values.dtype).index_add(0, ray_idx, values)


def orientation_loss(
    weights: torch.Tensor, normals: torch.Tensor, view_dirs: torch.Tensor, opacity: torch.Tensor | None = None
) -> torch.Tensor:
    """DreamFusion's orientation penalty, as threestudio computes it:
    sum_i stopgrad(w_i) relu(n_i . d_i)^2 / #(rays with opacity > 0), with d the ray direction (camera -> point).

    It penalises visible normals that face away from the camera. Weights are detached so the penalty moves the
    normals (and, for analytic normals, the density gradient), not the compositing. Without `opacity` the sum is
    divided by the number of samples with positive weight.
    """
    facing_away = (normals * view_dirs).sum(-1).clamp(min=0.0)
    total = (weights.detach() * facing_away**2).sum()
    count = (opacity > 0).sum() if opacity is not None else (weights.detach() > 0).sum()
    return total / count.clamp(min=1)


def sparsity_loss(opacity: torch.Tensor, eps: float = 0.01) -> torch.Tensor:
    """threestudio's sparsity regulariser: mean sqrt(opacity^2 + eps), a smooth L1 that empties the background."""
    return torch.sqrt(opacity * opacity + eps).mean()


def opacity_entropy(opacity: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """threestudio's "opaque" loss: mean binary entropy of the (clamped) opacity; pushes pixels to 0 or 1."""
    p = opacity.clamp(eps, 1.0 - eps)
    return -(p * torch.log(p) + (1.0 - p) * torch.log(1.0 - p)).mean()


def distortion_loss(
    weights: torch.Tensor, t: torch.Tensor, delta: torch.Tensor, ray_indices: torch.Tensor, n_rays: int
) -> torch.Tensor:
    """Mip-NeRF 360's distortion loss, mean over the rays:
    sum_{i,j} w_i w_j |t_i - t_j| + 1/3 sum_i w_i^2 delta_i, for the packed, ray-major samples a render returns.

    It is small when a ray's weight sits in one short interval and large when it is spread along the ray, so it
    favours an opaque surface over opacity gathered from a thick, semi-transparent slab (a thin wall grown
    inward, a cavity filled to make the walls in front of it opaque). The pairwise sum is computed in O(M) as
    2 sum_i w_i (t_i W_i - (wt)_i), W_i and (wt)_i the sums of w and w t over the samples before i on i's ray
    (prefix sums over all samples, less the ray's start; in float64, where the prefix sums run over every ray).
    """
    if weights.numel() == 0:
        return weights.sum()
    w, tt = weights.double(), t.double()

    def exclusive_within_ray(values: torch.Tensor) -> torch.Tensor:
        inclusive = torch.cumsum(values, 0)
        per_ray = torch.zeros(n_rays, dtype=values.dtype, device=values.device).index_add(0, ray_indices, values)
        ray_start = torch.cumsum(per_ray, 0) - per_ray  # what the prefix sum holds before each ray
        return inclusive - values - ray_start[ray_indices]

    pairwise = 2.0 * (w * (tt * exclusive_within_ray(w) - exclusive_within_ray(w * tt))).sum()
    within = (w * w * delta.double()).sum() / 3.0
    return ((pairwise + within) / n_rays).to(weights.dtype)
