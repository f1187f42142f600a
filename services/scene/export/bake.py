"""Baking a colour function of world position into a UV texture through the `Rasterizer` interface.

The atlas is rasterised in UV space: uv vertex (u, v) goes to clip position (2u - 1, 2v - 1, 0, 1), so texel
(row r, col c) of the S x S raster has its centre at uv ((c + .5) / S, (r + .5) / S). Row 0 of the rasteriser is
the BOTTOM row, which is v = 0: the raster is therefore already in "v up" layout and is flipped once, at the end,
into an ordinary top-row-first image (the PNG). Interpolation is affine in uv (w = 1), so each texel gets the
exact world point of the surface under its centre; `albedo_fn` is queried there.

Chart borders are padded by iterative dilation so that bilinear (and a few mip levels of) filtering read chart
colours rather than background: each step, every empty texel touching a filled one (8-neighbourhood) takes the
mean of its filled neighbours. Texels still empty afterwards get the mean chart colour, which keeps coarse mip
levels from darkening towards black.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from shared.rasterize.base import Rasterizer, to_top_row_first
from services.scene.export.unwrap import UVAtlas

AlbedoFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BakedTexture:
    """An S x S RGB texture, top-row-first (file layout: row 0 = v near 1), with its coverage masks."""

    image: torch.Tensor  # (S, S, 3) uint8
    covered: torch.Tensor  # (S, S) bool: texel centre inside a chart (colour from albedo_fn)
    filled: torch.Tensor  # (S, S) bool: covered or filled by padding

    def as_float_raster(self) -> torch.Tensor:
        """(S, S, 3) float in [0, 1] in rasteriser layout (row 0 = v near 0), for `grid_sample` with (2u-1, 2v-1)."""
        return torch.flip(self.image, dims=[0]).float() / 255.0


def uv_clip_positions(uvs: torch.Tensor) -> torch.Tensor:
    """(W, 2) uvs -> (1, W, 4) clip positions (2u - 1, 2v - 1, 0, 1): the atlas fills the viewport."""
    ones = torch.ones_like(uvs[:, :1])
    return torch.cat([uvs * 2.0 - 1.0, torch.zeros_like(ones), ones], dim=1)[None]


def bake_texture(
    atlas: UVAtlas,
    vertices: torch.Tensor,
    albedo_fn: AlbedoFn,
    rasterizer: Rasterizer,
    size: int = 1024,
    padding_px: int = 8,
    chunk: int = 65536,
) -> BakedTexture:
    """Rasterises the atlas at size x size, queries albedo_fn at each covered texel's world point, pads."""
    device = vertices.device
    uvs = atlas.uvs.to(device)
    tri = atlas.faces.to(device)
    with torch.no_grad():
        rast = rasterizer.rasterize(uv_clip_positions(uvs), tri, (size, size))
        world_attr = vertices.detach().float().index_select(0, atlas.vertex_index.to(device))
        world = rasterizer.interpolate(world_attr, rast, tri)[0]  # (S, S, 3)
        covered = rast[0, ..., 3] > 0
        colors = torch.zeros(size, size, 3, device=device)
        colors[covered] = query_albedo(albedo_fn, world[covered], chunk)
        colors, filled = dilate(colors, covered, padding_px)
        if bool(covered.any()):
            colors[~filled] = colors[covered].mean(dim=0)
    image = (to_top_row_first(colors[None])[0] * 255.0).round().clamp(0, 255).to(torch.uint8).cpu()
    return BakedTexture(
        image=image,
        covered=torch.flip(covered, dims=[0]).cpu(),
        filled=torch.flip(filled, dims=[0]).cpu(),
    )


def query_albedo(albedo_fn: AlbedoFn, points: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """albedo_fn over (N, 3) points in chunks (bounded memory for neural fields), checked and clamped to [0, 1]."""
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    out = []
    with torch.no_grad():
        for part in points.split(chunk):
            value = torch.as_tensor(albedo_fn(part))
            if value.shape != (part.shape[0], 3):
                raise ValueError(
                    f"albedo_fn must map (N, 3) points to (N, 3) colours; got {list(value.shape)} "
                    f"for {part.shape[0]} points"
                )
            value = value.to(points.device, torch.float32)
            if not bool(torch.isfinite(value).all()):
                raise ValueError("albedo_fn returned NaN or Inf")
            out.append(value.clamp(0.0, 1.0))
    return torch.cat(out) if out else points.new_zeros(0, 3)


def dilate(colors: torch.Tensor, filled: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grows filled regions of an (H, W, 3) image by `steps` texels; new texels take their filled neighbours' mean."""
    kernel = torch.ones(1, 1, 3, 3, dtype=colors.dtype, device=colors.device)
    colors, filled = colors.clone(), filled.clone()
    for _ in range(steps):
        mask = filled.to(colors.dtype)
        # One convolution over four planes (masked r, g, b and the mask): neighbour sums and neighbour counts.
        planes = torch.cat([(colors * mask[..., None]).permute(2, 0, 1), mask[None]])[:, None]
        sums = torch.nn.functional.conv2d(planes, kernel, padding=1)[:, 0]
        count = sums[3]
        grow = (~filled) & (count > 0)
        if not bool(grow.any()):
            break
        mean = (sums[:3] / count.clamp(min=1)).permute(1, 2, 0)
        colors = torch.where(grow[..., None], mean, colors)
        filled = filled | grow
    return colors, filled
