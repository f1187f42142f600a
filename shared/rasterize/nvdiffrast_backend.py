"""`NvdiffrastRasterizer`: NVIDIA's nvdiffrast behind the `base.Rasterizer` interface (CUDA only).

Installation and the import workaround
--------------------------------------
nvdiffrast comes from PyPI as `diffrp-nvdiffrast` (a pure-Python wheel; the project's `[gpu]` extra). Its CUDA
plugin is JIT-compiled by `torch.utils.cpp_extension` on the first context (about 20 s on 16 cores with
`TORCH_CUDA_ARCH_LIST=9.0`, which builds for one architecture only). With torch 2.11 the loader compiles
the plugin but then fails to import it (`No module named 'nvdiffrast_plugin_...'`), because the build directory is
no longer on `sys.path`. `ensure_plugin_importable` puts that directory (named exactly as nvdiffrast names it) on
`sys.path` before the first context is created, and the first context is retried once after refreshing the
import caches. Only `dr.RasterizeCudaContext` is used: no EGL/OpenGL is needed. On a machine without the package or
without CUDA the constructor raises `ImportError` with the reason, so callers can fall back to `TorchRasterizer`.

Conventions
-----------
Those of `base` (nvdiffrast's own): row 0 is the bottom row, rast = (u, v, z/w, triangle_id + 1), u weights
vertex 0. Inputs are converted as nvdiffrast requires (float32 contiguous positions/attributes/colours, int32
contiguous triangles, on one CUDA device); results come back in the caller's dtype and on the caller's device, so
CPU callers (e.g. `render_mesh` with a CPU mesh) work unchanged at the price of host<->device copies -- pass CUDA
tensors to avoid them. One `RasterizeCudaContext` is created lazily per CUDA device. The int32 copy of each `tri`
tensor and its antialiasing topology hash are cached per tensor (identity and in-place version), because training
loops pass the same faces every step.

How it compares with `TorchRasterizer` (measured in tests/test_gpu_rasterize.py, on an H200)
-----------------------------------------------------------------------------------------
* Values: at pixels both backends give to the same triangle, (u, v, z/w) and interpolated attributes agree to
  float32 precision (max |difference| <= 3e-5; <= 1.1e-6 at interior pixels). Coverage differs only along edges
  (>= 99.88 % of pixels agree): nvdiffrast's rasteriser snaps vertices to 1/16 pixel and uses a top-left fill
  rule, and it clips triangles at the near/far planes where the torch backend culls them. nvdiffrast clamps u and
  v to [0, 1] individually.
* Gradients: at interior pixels both give perspective-correct barycentric gradients w.r.t. `pos_clip` (through u
  and v) and w.r.t. attributes (cosine similarity > 0.9999). Two differences: nvdiffrast's rasterize backward
  ignores the gradient of the z/w channel (the torch backend propagates it), and it adds 1e-6 (times the sign) to
  the barycentric denominator, so its pos_clip gradient is exactly that of a / (sum a + 1e-6): about 3e-4
  relative on a torus's interior pixels, up to ~2e-2 where thin, grazing triangles weigh in. So compare gradients
  through u, v and attributes at interior pixels (pixels whose 3x3 neighbourhood has one triangle id).
* Antialiasing: the torch backend's `antialias` is the identity (no silhouette gradients) unless it is made with
  `edge_antialias` (`shared.rasterize.antialias`, the same blend in PyTorch). nvdiffrast's blends
  pixel pairs across silhouette edges and gives gradients w.r.t. `pos_clip` there (visibility gradients), which is
  why this backend exists; compare images only away from silhouette edges or with antialiasing off. It only sees
  silhouette edges of the triangle visible at one of the two pixels: on large faces the gradient of antialiased
  coverage is close to the true area derivative (0.96 of it on a box), but on fine tessellations the contour
  triangles are sub-pixel slivers covering no pixel centre and part of the outline gives no gradient (0.50 of it on
  a 48x24 torus at 512x512).
"""

from __future__ import annotations

import importlib
import re
import sys
import weakref
from types import ModuleType
from typing import Any, Callable, Hashable

import torch

from shared.rasterize.base import Rasterizer, check_rasterize_inputs

PACKAGE = "diffrp-nvdiffrast"
REQUIREMENT = "diffrp-nvdiffrast==0.3.3.1"


# --------------------------------------------------------------------------- import and plugin workaround
def plugin_name(nvdiffrast_version: str, torch_version: str) -> str:
    """The CUDA plugin's module name, built exactly as `nvdiffrast.torch.ops._get_plugin` builds it (non-GL)."""
    return re.sub(r"\W|^(?=\d)", "_", f"nvdiffrast_plugin_{nvdiffrast_version}_torch{torch_version}")


def plugin_build_directory(nvdiffrast_version: str, torch_version: str | None = None) -> str:
    """Where torch's JIT loader builds (and leaves) the plugin; honours TORCH_EXTENSIONS_DIR like torch does."""
    from torch.utils import cpp_extension

    name = plugin_name(nvdiffrast_version, torch_version or torch.__version__)
    return cpp_extension._get_build_directory(name, False)


def ensure_plugin_importable(nvdiffrast_version: str, torch_version: str | None = None) -> str:
    """Appends the plugin's build directory to sys.path (once), so nvdiffrast's `import_module` finds it."""
    path = plugin_build_directory(nvdiffrast_version, torch_version)
    if path not in sys.path:
        sys.path.append(path)
    importlib.invalidate_caches()
    return path


def import_nvdiffrast() -> ModuleType:
    """`nvdiffrast.torch`, with the plugin workaround applied; ImportError naming the package if it is missing."""
    try:
        import nvdiffrast
        import nvdiffrast.torch as dr
    except ImportError as error:
        raise ImportError(
            f"the 'nvdiffrast' rasteriser backend needs the package {PACKAGE!r} and a CUDA device "
            f"(pip install '{REQUIREMENT}', or the project's [gpu] extra); "
            "on machines without them use make_rasterizer('torch')"
        ) from error
    ensure_plugin_importable(nvdiffrast.__version__)
    return dr


# --------------------------------------------------------------------------- per-tri cache
def _version_of(tensor: torch.Tensor) -> int | None:
    """The in-place version counter, or None for tensors without one (inference-mode tensors)."""
    try:
        return int(tensor._version)
    except RuntimeError:
        return None


class TriCache:
    """Values derived from a `tri` tensor (int32 copy per device, topology hash), kept while the tensor lives.

    Keyed by identity (id + weakref, so a recycled id never hits) and the in-place version counter (so edited
    faces are rebuilt). Why: callers pass the same faces tensor every step, and nvdiffrast's topology hash costs a
    kernel launch and a hash-table build each time it is made.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, int, dict[Hashable, Any]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, tri: torch.Tensor, key: Hashable, build: Callable[[], Any]) -> Any:
        """The cached value `key` for `tri`, built with `build()` on a miss (never cached without a version)."""
        version = _version_of(tri)
        if version is None:
            return build()
        entry = self._entries.get(id(tri))
        if entry is None or entry[0]() is not tri or entry[1] != version:
            self._prune()
            entry = (weakref.ref(tri), version, {})
            self._entries[id(tri)] = entry
        values = entry[2]
        if key not in values:
            values[key] = build()
        return values[key]

    def _prune(self) -> None:
        """Drops entries whose tensor has been freed (their GPU copies with them)."""
        dead = [ident for ident, (ref, _, _) in self._entries.items() if ref() is None]
        for ident in dead:
            del self._entries[ident]


# --------------------------------------------------------------------------- the backend
class NvdiffrastRasterizer(Rasterizer):
    """nvdiffrast's CUDA rasteriser (no OpenGL) with the interface's conventions; see the module docstring."""

    name = "nvdiffrast"

    def __init__(self, device: str | torch.device = "cuda") -> None:
        """device: the CUDA device that CPU inputs are sent to (CUDA inputs stay on their own device).

        Imports nvdiffrast but creates no context (and compiles nothing) until the first call.
        """
        self._dr = import_nvdiffrast()
        if not torch.cuda.is_available():
            raise ImportError(
                "the 'nvdiffrast' rasteriser backend needs a CUDA device (torch.cuda.is_available() is False); "
                "use make_rasterizer('torch')"
            )
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"nvdiffrast runs on CUDA devices only, got {device}")
        index = torch.cuda.current_device() if device.index is None else device.index
        self.device = torch.device("cuda", index)
        self._contexts: dict[int, Any] = {}
        self._tris = TriCache()

    # ------------------------------------------------------------ helpers
    def _target(self, tensor: torch.Tensor) -> torch.device:
        """The CUDA device to work on: the tensor's own if it is on CUDA, else the configured one."""
        return tensor.device if tensor.is_cuda else self.device

    def _context(self, device: torch.device) -> Any:
        """The device's RasterizeCudaContext, made on first use (this is when the plugin is compiled/loaded)."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._contexts:
            try:
                context = self._dr.RasterizeCudaContext(device=torch.device("cuda", index))
            except ImportError:  # the plugin was just built into a directory the finders had cached as empty
                importlib.invalidate_caches()
                context = self._dr.RasterizeCudaContext(device=torch.device("cuda", index))
            self._contexts[index] = context
        return self._contexts[index]

    def _tri32(self, tri: torch.Tensor, device: torch.device) -> torch.Tensor:
        """int32 contiguous copy of `tri` on `device` (cached per tensor)."""
        return self._tris.get(
            tri, ("tri32", str(device)), lambda: tri.detach().to(device=device, dtype=torch.int32).contiguous()
        )

    def _topology(self, tri: torch.Tensor, device: torch.device) -> Any:
        """nvdiffrast's antialias topology hash for `tri` (cached per tensor and device)."""
        tri32 = self._tri32(tri, device)
        return self._tris.get(
            tri, ("topology", str(device)), lambda: self._dr.antialias_construct_topology_hash(tri32)
        )

    @staticmethod
    def _f32(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """float32 contiguous on `device` (differentiable; a no-op when already so)."""
        return tensor.to(device=device, dtype=torch.float32).contiguous()

    # ------------------------------------------------------------ the three calls
    def rasterize(self, pos_clip: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
        if pos_clip.ndim == 2:
            pos_clip = pos_clip[None]
        check_rasterize_inputs(pos_clip, tri)  # before nvdiffrast's terser asserts
        height, width = int(resolution[0]), int(resolution[1])
        if tri.shape[0] == 0 or pos_clip.shape[1] == 0:  # nvdiffrast rejects empty buffers
            return pos_clip.new_zeros(pos_clip.shape[0], height, width, 4)
        device = self._target(pos_clip)
        rast, _ = self._dr.rasterize(
            self._context(device), self._f32(pos_clip, device), self._tri32(tri, device), (height, width),
            grad_db=False,
        )
        return rast.to(device=pos_clip.device, dtype=pos_clip.dtype)

    def interpolate(self, attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
        if rast.ndim != 4 or rast.shape[-1] != 4:
            raise ValueError(f"rast must be (B, H, W, 4), got {list(rast.shape)}")
        if attr.ndim not in (2, 3) or (attr.ndim == 3 and attr.shape[0] not in (1, rast.shape[0])):
            shape = list(attr.shape)
            raise ValueError(f"attr must be (V, C) or (B or 1, V, C) with B = {rast.shape[0]}, got {shape}")
        if tri.shape[0] == 0:
            return rast.new_zeros(*rast.shape[:3], attr.shape[-1]).to(attr.dtype)
        device = self._target(rast)
        out, _ = self._dr.interpolate(self._f32(attr, device), self._f32(rast, device), self._tri32(tri, device))
        return out.to(device=rast.device, dtype=attr.dtype)

    def antialias(
        self, color: torch.Tensor, rast: torch.Tensor, pos_clip: torch.Tensor, tri: torch.Tensor
    ) -> torch.Tensor:
        """nvdiffrast's analytic antialiasing: blends across silhouette edges and so gives visibility gradients
        w.r.t. pos_clip. Needs shared vertex indices along edges (the faces that were rasterised)."""
        if pos_clip.ndim == 2:
            pos_clip = pos_clip[None]
        if tri.shape[0] == 0:
            return color
        device = self._target(color)
        out = self._dr.antialias(
            self._f32(color, device), self._f32(rast, device), self._f32(pos_clip, device),
            self._tri32(tri, device), topology_hash=self._topology(tri, device),
        )
        return out.to(device=color.device, dtype=color.dtype)

