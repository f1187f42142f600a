"""The rasteriser interface: nvdiffrast's three calls, with nvdiffrast's conventions.

Conventions (identical to nvdiffrast, so its backend can be dropped in):

* `pos_clip` are homogeneous clip-space positions (x, y, z, w), e.g. `verts_h @ camera.world_to_clip().T`.
  A pixel (row, col) has its centre at NDC ((2 col + 1) / W - 1, (2 row + 1) / H - 1): **row 0 is the BOTTOM row**
  (clip-space +y maps to increasing row index). Use `to_top_row_first` before showing an image or sending it to a
  prior (priors take ordinary images, row 0 = top).
* `rasterize` returns (B, H, W, 4) float: (u, v, z/w, triangle_id + 1), with 0 in all four channels where no
  triangle covers the pixel. (u, v) are perspective-correct barycentric weights, as in nvdiffrast's
  `interpolate` kernel: **u weights vertex 0, v weights vertex 1, and vertex 2 gets 1 - u - v**.
  z/w is the NDC depth in [-1, 1]; the smallest z/w wins the depth test.
* `interpolate(attr, rast, tri)` returns u a0 + v a1 + (1 - u - v) a2 per pixel, 0 on background.
  `tri` may differ from the rasterised triangles (same F), e.g. to index per-corner normals.
* `antialias(color, rast, pos_clip, tri)` smooths silhouette edges (and in nvdiffrast gives visibility
  gradients). Backends document what they do.

Unlike nvdiffrast, `rasterize` and `interpolate` return just the tensor (no image-space derivatives).
"""

from __future__ import annotations

import abc

import torch


class Rasterizer(abc.ABC):
    """A differentiable triangle rasteriser with nvdiffrast's API and conventions."""

    name: str = "abstract"

    @abc.abstractmethod
    def rasterize(
        self, pos_clip: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int]
    ) -> torch.Tensor:
        """pos_clip (B, V, 4) float, tri (F, 3) int32/int64, resolution (H, W) -> rast (B, H, W, 4).

        Channels (u, v, z/w, triangle_id + 1); background pixels are all zero. Differentiable w.r.t. pos_clip
        through (u, v, z/w) at covered pixels (visibility itself carries no gradient).
        """

    @abc.abstractmethod
    def interpolate(self, attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
        """attr (B, V, C) or (V, C), rast (B, H, W, 4), tri (F, 3) -> (B, H, W, C); zero on background."""

    @abc.abstractmethod
    def antialias(
        self, color: torch.Tensor, rast: torch.Tensor, pos_clip: torch.Tensor, tri: torch.Tensor
    ) -> torch.Tensor:
        """color (B, H, W, C) -> (B, H, W, C) with silhouette edges antialiased (backend-specific)."""


def check_rasterize_inputs(pos_clip: torch.Tensor, tri: torch.Tensor) -> None:
    """The interface's shape rules for `rasterize`: ValueError naming the argument that breaks them."""
    if pos_clip.ndim != 3 or pos_clip.shape[-1] != 4:
        raise ValueError(f"pos_clip must be (B, V, 4), got {list(pos_clip.shape)}")
    if tri.ndim != 2 or tri.shape[-1] != 3:
        raise ValueError(f"tri must be (F, 3), got {list(tri.shape)}")
    if not pos_clip.is_floating_point():
        raise ValueError("pos_clip must be floating point")


def to_top_row_first(image: torch.Tensor) -> torch.Tensor:
    """Flips a (B, H, W, C) image from nvdiffrast's bottom-row-first layout to row 0 = top (and back)."""
    return torch.flip(image, dims=[1])


def to_nchw_top_row_first(image: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) bottom-row-first (rasteriser layout) -> (B, C, H, W) top-row-first (prior layout)."""
    return to_top_row_first(image).permute(0, 3, 1, 2)


def coverage(rast: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 1) float mask: 1 where a triangle covers the pixel."""
    return (rast[..., 3:4] > 0).to(rast.dtype)
