"""Differentiable rasterisers behind nvdiffrast's API (`base.Rasterizer`); see `base` for the conventions."""

from __future__ import annotations

import importlib.util

import torch

from shared.components import Registry
from shared.rasterize.base import Rasterizer, coverage, to_nchw_top_row_first, to_top_row_first
from shared.rasterize.torch_backend import TorchRasterizer

__all__ = [
    "RASTERIZERS",
    "Rasterizer",
    "TorchRasterizer",
    "coverage",
    "make_rasterizer",
    "to_nchw_top_row_first",
    "to_top_row_first",
]


# Rasterisers by backend name: `build(**kwargs) -> Rasterizer`. A new backend is one `@RASTERIZERS.register(name)`
# function that imports its package lazily, so machines without it never need it.
RASTERIZERS: Registry[Rasterizer] = Registry("rasteriser")
RASTERIZERS.add("torch", TorchRasterizer)


def _nvdiffrast_usable() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("nvdiffrast") is not None


@RASTERIZERS.register("nvdiffrast", available=_nvdiffrast_usable)
def _nvdiffrast(**kwargs) -> Rasterizer:
    from shared.rasterize.nvdiffrast_backend import NvdiffrastRasterizer

    return NvdiffrastRasterizer(**kwargs)


def make_rasterizer(name: str = "torch", **kwargs) -> Rasterizer:
    """'torch' -> TorchRasterizer(**kwargs); 'nvdiffrast' -> NvdiffrastRasterizer(**kwargs); any other registered
    name likewise (case and surrounding spaces ignored). An unknown name raises `UnknownKind` (a ValueError).

    nvdiffrast is imported only here (lazily), so CPU machines never need it; without the package
    (`diffrp-nvdiffrast`) or without CUDA this raises ImportError saying which, and callers may fall back to 'torch'.
    """
    return RASTERIZERS.find(name.strip().lower())(**kwargs)
