"""The reference view of an image-to-3D stage (Magic123), as tensors, and its losses.

`ReferenceTarget` decodes a stage's `ReferenceConfig` once: the image (1, 4, S, S) in [0, 1] (straight alpha), its
mask eroded by `mask_erode_px`, the optional depth, the camera (albedo shading, the camera's own white background)
and the `ImageCondition` that image-conditioned priors receive (its digest is that of the image as sent).

Losses, each a mean over the reference image's pixels:
* ref_rgb: MSE between the rendered view and the input composited over the same background (Magic123's
  `gt_rgb = rgb * mask + bg * (1 - mask)`);
* ref_mask: MSE between the rendered opacity and the (eroded) alpha;
* ref_depth: 1 - Pearson correlation between rendered and given depth over the eroded foreground (the given
  depth may be in any affine scale, as a monocular estimate is).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from services.scene.config import ReferenceConfig
from shared import tensors
from shared.cameras import Camera, Shading
from shared.guidance_api import ImageCondition
from shared.tensor_digest import tensor_sha256


@dataclasses.dataclass(frozen=True)
class ReferenceTarget:
    image: torch.Tensor  # (1, 4, S, S) float32 in [0, 1], straight alpha, row 0 = top
    mask: torch.Tensor  # (1, 1, S, S) the alpha eroded by mask_erode_px
    depth: torch.Tensor | None  # (1, 1, S, S)
    camera: Camera
    condition: ImageCondition

    @property
    def resolution(self) -> int:
        return int(self.image.shape[-1])

    @classmethod
    def from_config(cls, config: ReferenceConfig, device: torch.device) -> "ReferenceTarget":
        image = torch.from_numpy(config.rgba().copy()).permute(2, 0, 1)[None].float() / 255.0
        depth = config.depth_map()
        camera = reference_camera(config)
        condition = ImageCondition(reference_camera=camera, image_sha256=tensor_sha256(tensors.to_proto(image)),
                                   image=image)
        return cls(
            image=image.to(device),
            mask=erode(image[:, 3:], config.mask_erode_px).to(device),
            depth=None if depth is None else torch.from_numpy(depth.copy())[None, None].to(device),
            camera=camera,
            condition=condition,
        )


def reference_camera(config: ReferenceConfig) -> Camera:
    cam = config.camera
    return Camera(
        camera_to_world=torch.tensor(cam.camera_to_world, dtype=torch.float32).reshape(4, 4),
        fovy_deg=cam.fovy_deg, width=config.resolution, height=config.resolution,
        azimuth_deg=cam.azimuth_deg, elevation_deg=cam.elevation_deg, distance=cam.distance,
        shading=Shading.ALBEDO, background_color=(1.0, 1.0, 1.0),
    )


def erode(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grey-scale erosion (a minimum over a (2p+1)^2 square) of (N, 1, H, W); outside the image counts as
    background, so the foreground also shrinks away from the frame's edges."""
    if pixels <= 0:
        return mask
    padded = F.pad(mask, (pixels,) * 4, value=0.0)
    return -F.max_pool2d(-padded, kernel_size=2 * pixels + 1, stride=1)


def pearson_depth_loss(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Pearson correlation of `predicted` and `target` over the pixels where `mask` > 0.5 (0 when fewer than two
    pixels are foreground: nothing to correlate)."""
    selected = mask > 0.5
    x, y = predicted[selected], target[selected].to(predicted)
    if x.numel() < 2:
        return predicted.sum() * 0.0
    x, y = x - x.mean(), y - y.mean()
    correlation = (x * y).sum() / (x.norm() * y.norm() + 1e-8)
    return 1.0 - correlation


def reference_losses(render: dict, target: ReferenceTarget, with_depth: bool) -> dict[str, torch.Tensor]:
    """`render`: the reference view's "rgb" (1, 3, S, S), "opacity" (1, 1, S, S), "background" (1, 3, S, S) and,
    for depth, "depth" (1, 1, S, S)."""
    rgb, alpha = target.image[:, :3], target.image[:, 3:]
    composited = rgb * alpha + render["background"].detach() * (1.0 - alpha)
    losses = {
        "ref_rgb": F.mse_loss(render["rgb"], composited),
        "ref_mask": F.mse_loss(render["opacity"], target.mask),
    }
    if with_depth and target.depth is not None and "depth" in render:
        losses["ref_depth"] = pearson_depth_loss(render["depth"], target.depth, target.mask)
    return losses


__all__ = ["ReferenceTarget", "erode", "pearson_depth_loss", "reference_camera", "reference_losses"]
