"""The nvdiffrast backend's CPU-side logic: clear errors without the package or CUDA, the plugin-import
workaround, lazy context creation and the per-`tri` cache. Values and gradients are checked on a GPU in
tests/test_gpu_rasterize.py."""

from __future__ import annotations

import gc
import os
import sys
import types

import pytest
import torch

from shared.rasterize import Rasterizer, make_rasterizer
from shared.rasterize import nvdiffrast_backend as backend


class _FakeContext:
    """Stands in for dr.RasterizeCudaContext; counts constructions so laziness can be asserted."""

    made = 0

    def __init__(self, device=None) -> None:
        type(self).made += 1


@pytest.fixture
def fake_nvdiffrast(monkeypatch, tmp_path):
    """An importable stand-in for the nvdiffrast package, with the torch extensions root in tmp_path."""
    package = types.ModuleType("nvdiffrast")
    package.__version__ = "0.3.3.1"
    ops = types.ModuleType("nvdiffrast.torch")
    ops.RasterizeCudaContext = _FakeContext
    package.torch = ops
    monkeypatch.setitem(sys.modules, "nvdiffrast", package)
    monkeypatch.setitem(sys.modules, "nvdiffrast.torch", ops)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "path", list(sys.path))
    _FakeContext.made = 0
    return ops


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend a CUDA device 0 is present (nothing here ever touches it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_missing_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvdiffrast", None)  # makes `import nvdiffrast` raise ImportError
    monkeypatch.setitem(sys.modules, "nvdiffrast.torch", None)
    with pytest.raises(ImportError, match="diffrp-nvdiffrast") as info:
        make_rasterizer("nvdiffrast")
    assert "make_rasterizer('torch')" in str(info.value)


def test_missing_cuda_is_a_clear_import_error(fake_nvdiffrast, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ImportError, match="CUDA device"):
        make_rasterizer("nvdiffrast")


def test_plugin_name_matches_nvdiffrast_loader():
    """Same formula as nvdiffrast.torch.ops._get_plugin: sanitised 'nvdiffrast_plugin_<ver>_torch<torch ver>'."""
    assert backend.plugin_name("0.3.3.1", "2.11.0+cu130") == "nvdiffrast_plugin_0_3_3_1_torch2_11_0_cu130"


def test_plugin_directory_goes_on_sys_path_once(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "path", list(sys.path))
    path = backend.ensure_plugin_importable("0.3.3.1", "2.11.0")
    assert path == os.path.join(str(tmp_path), "nvdiffrast_plugin_0_3_3_1_torch2_11_0")
    assert os.path.isdir(path)
    assert backend.ensure_plugin_importable("0.3.3.1", "2.11.0") == path
    assert sys.path.count(path) == 1


def test_constructor_applies_workaround_but_creates_no_context(fake_nvdiffrast, fake_cuda):
    rasterizer = make_rasterizer(" NvDiffRast ")
    assert isinstance(rasterizer, backend.NvdiffrastRasterizer) and isinstance(rasterizer, Rasterizer)
    assert rasterizer.name == "nvdiffrast"
    assert rasterizer.device == torch.device("cuda", 0)
    assert _FakeContext.made == 0  # compiling the plugin waits for the first rasterize call
    assert backend.plugin_build_directory("0.3.3.1") in sys.path


def test_non_cuda_device_is_rejected(fake_nvdiffrast, fake_cuda):
    with pytest.raises(ValueError, match="CUDA"):
        backend.NvdiffrastRasterizer(device="cpu")


def test_empty_triangle_list_rasterises_to_background(fake_nvdiffrast, fake_cuda):
    """nvdiffrast rejects empty buffers; the backend answers them itself, without a context."""
    rasterizer = backend.NvdiffrastRasterizer()
    pos = torch.rand(2, 3, 4, requires_grad=True)
    rast = rasterizer.rasterize(pos, torch.zeros(0, 3, dtype=torch.long), (4, 6))
    assert rast.shape == (2, 4, 6, 4) and not rast.any()
    attr = rasterizer.interpolate(torch.rand(3, 2, dtype=torch.float64), rast, torch.zeros(0, 3, dtype=torch.long))
    assert attr.shape == (2, 4, 6, 2) and attr.dtype == torch.float64 and not attr.any()
    assert _FakeContext.made == 0


def test_shape_errors_come_before_nvdiffrast(fake_nvdiffrast, fake_cuda):
    rasterizer = backend.NvdiffrastRasterizer()
    with pytest.raises(ValueError, match="pos_clip"):
        rasterizer.rasterize(torch.rand(1, 3, 3), torch.zeros(1, 3, dtype=torch.long), (4, 4))
    with pytest.raises(ValueError, match="tri"):
        rasterizer.rasterize(torch.rand(1, 3, 4), torch.zeros(1, 4, dtype=torch.long), (4, 4))
    with pytest.raises(ValueError, match="attr"):
        rasterizer.interpolate(torch.rand(3, 3, 2), torch.zeros(2, 4, 4, 4), torch.zeros(1, 3, dtype=torch.long))


class TestTriCache:
    def test_same_tensor_builds_once_per_key(self):
        cache, calls = backend.TriCache(), []
        tri = torch.tensor([[0, 1, 2]])
        for _ in range(3):
            assert cache.get(tri, "a", lambda: calls.append("a") or 1) == 1
        cache.get(tri, "b", lambda: calls.append("b") or 2)
        assert calls == ["a", "b"] and len(cache) == 1

    def test_in_place_edit_rebuilds(self):
        cache, calls = backend.TriCache(), []
        tri = torch.tensor([[0, 1, 2]])
        cache.get(tri, "k", lambda: calls.append(1))
        tri[0, 0] = 2  # bumps the version counter
        cache.get(tri, "k", lambda: calls.append(2))
        assert calls == [1, 2]

    def test_equal_but_distinct_tensors_do_not_share(self):
        cache = backend.TriCache()
        first, second = torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, 2]])
        assert cache.get(first, "k", lambda: "first") == "first"
        assert cache.get(second, "k", lambda: "second") == "second"
        assert len(cache) == 2

    def test_freed_tensors_are_dropped(self):
        cache = backend.TriCache()
        tri = torch.tensor([[0, 1, 2]])
        cache.get(tri, "k", lambda: torch.zeros(1000))
        del tri
        gc.collect()
        cache.get(torch.tensor([[2, 1, 0]]), "k", lambda: 0)  # an insertion prunes the dead entry
        assert len(cache) == 1

    def test_inference_tensors_are_never_cached(self):
        cache, calls = backend.TriCache(), []
        with torch.inference_mode():
            tri = torch.tensor([[0, 1, 2]])
        for _ in range(2):
            cache.get(tri, "k", lambda: calls.append(1))
        assert calls == [1, 1] and len(cache) == 0
