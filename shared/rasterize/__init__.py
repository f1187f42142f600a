"""Differentiable rasterisers behind nvdiffrast's API (`base.Rasterizer`); see `base` for the conventions."""

from __future__ import annotations

from shared.rasterize.base import Rasterizer, coverage, to_nchw_top_row_first, to_top_row_first
from shared.rasterize.torch_backend import TorchRasterizer

__all__ = [
    "Rasterizer",
    "TorchRasterizer",
    "coverage",
    "make_rasterizer",
    "to_nchw_top_row_first",
    "to_top_row_first",
]


def make_rasterizer(name: str = "torch", **kwargs) -> Rasterizer:
    """'torch' -> TorchRasterizer(**kwargs); 'nvdiffrast' -> NvdiffrastRasterizer(**kwargs).

    nvdiffrast is imported only here (lazily), so CPU machines never need it; without the package
    (`diffrp-nvdiffrast`) or without CUDA this raises ImportError saying which, and callers may fall back to 'torch'.
    """
    key = name.strip().lower()
    if key == "torch":
        return TorchRasterizer(**kwargs)
    if key == "nvdiffrast":
        from shared.rasterize.nvdiffrast_backend import NvdiffrastRasterizer

        return NvdiffrastRasterizer(**kwargs)
    raise ValueError(f"unknown rasteriser {name!r}; known: 'torch', 'nvdiffrast'")
