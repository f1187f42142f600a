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
    """'torch' -> TorchRasterizer(**kwargs). 'nvdiffrast' is not wired in yet (ImportError)."""
    key = name.strip().lower()
    if key == "torch":
        return TorchRasterizer(**kwargs)
    if key == "nvdiffrast":
        raise ImportError(
            "the nvdiffrast rasteriser backend is not available yet; use make_rasterizer('torch')"
        )
    raise ValueError(f"unknown rasteriser {name!r}; known: 'torch', 'nvdiffrast'")
