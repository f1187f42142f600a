"""Position encodings for the coarse stage's neural field: the multiresolution hash grid (Instant-NGP).

Backends share one interface, `Encoding`: `forward(x)` takes points (N, 3) in the unit cube [0, 1]^3 and returns
features (N, output_dim). `make_encoding(cfg, backend)` picks one:

* "torch": `TorchHashGrid`, pure PyTorch, runs anywhere (CPU included), vectorised over levels and corners.
* "tcnn":  `TcnnHashGrid`, tiny-cuda-nn's fused CUDA encoding (only when `tinycudann` imports and CUDA is up).
* "triton": `TritonHashGrid` (services/scene/field/triton_encoding.py), Triton kernels for CUDA devices.
* "auto":  tcnn when available, else triton on CUDA, else torch.

Grid convention (the Instant-NGP paper's): level l has N_l = floor(base_resolution * per_level_scale^l) cells per
axis and (N_l + 1)^3 vertices at k / N_l. A level whose (N_l + 1)^3 vertices fit in the table (2^log2_hashmap_size
rows) is indexed densely (x + y (N_l+1) + z (N_l+1)^2) and stores only those rows, as tcnn does; finer levels use
the spatial hash (x * 1) xor (y * 2654435761) xor (z * 805459861) mod 2^log2_hashmap_size. tcnn's own vertex
placement differs by a half-cell offset and a -1 in the scale; capacity and behaviour are the same, the tables are
not interchangeable between backends.
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
import math
from typing import Callable

import torch
from torch import nn

from services.scene.field_config import HashGridConfig
from shared.components import Registry

HASH_PRIMES = (1, 2654435761, 805459861)


class Encoding(nn.Module, metaclass=abc.ABCMeta):
    """Maps points in [0, 1]^3 to features. Inputs outside the cube are clamped onto it."""

    @property
    @abc.abstractmethod
    def output_dim(self) -> int:
        """Features per point."""

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 3) in [0, 1] -> (N, output_dim), differentiable w.r.t. the parameters and x."""

    def forward_with_input_vjp(
        self, x: torch.Tensor, create_graph: bool = True
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """-> (features, vjp) where vjp(v (N, output_dim)) = v^T d features / d x, (N, 3).

        What analytic normals need: the vjp is differentiable w.r.t. the parameters and v (with create_graph), but
        treats x as a constant, so no second derivatives in x are ever formed. This generic version goes through
        autograd; backends override it with a cheaper closed form.
        """
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            features = self(x)

        def vjp(v: torch.Tensor) -> torch.Tensor:
            (grad,) = torch.autograd.grad(features, x, grad_outputs=v, create_graph=create_graph, retain_graph=True)
            return grad

        return features, vjp


class _LevelGroup:
    """Index constants for a set of levels that share an indexing rule (dense or hashed)."""

    def __init__(self, levels: list[int], cfg: HashGridConfig, dense: bool) -> None:
        resolutions, offsets = cfg.resolutions(), cfg.level_offsets()
        self.levels = levels
        self.dense = dense
        self.resolution = torch.tensor([float(resolutions[l]) for l in levels], dtype=torch.float64)
        if dense:
            side = [resolutions[l] + 1 for l in levels]
            self.multipliers = torch.tensor([[1, s, s * s] for s in side], dtype=torch.int64)
        else:
            self.multipliers = torch.tensor([HASH_PRIMES] * len(levels), dtype=torch.int64)
        self.offsets = torch.tensor([offsets[l] for l in levels], dtype=torch.int64)
        self.mask = cfg.table_size - 1


class TorchHashGrid(Encoding):
    """Multiresolution hash encoding in plain PyTorch (trilinear interpolation, vectorised over levels).

    Parameters live in one flat table (sum of level sizes, F) with per-level row offsets, like tcnn. Levels are
    processed in two vectorised groups (dense, hashed) in a corner-major layout; the gather itself is one
    embedding_bag per group (`_WeightedGather`). Autograd keeps about N * n_levels * 8 * 8 bytes per call (int32
    rows and float32 weights); the renderer keeps N down by evaluating only occupied samples.
    """

    def __init__(self, cfg: HashGridConfig, init_scale: float = 1e-4, generator: torch.Generator | None = None) -> None:
        """`generator`: where the initial table is drawn from (None: torch's global RNG)."""
        super().__init__()
        self.cfg = cfg
        dense_flags = cfg.level_is_dense()
        self._groups = [
            _LevelGroup([l for l, d in enumerate(dense_flags) if d], cfg, dense=True),
            _LevelGroup([l for l, d in enumerate(dense_flags) if not d], cfg, dense=False),
        ]
        self._groups = [g for g in self._groups if g.levels]
        # Dense levels come first (coarse), so concatenating group outputs keeps level order.
        n_rows = sum(cfg.level_sizes())
        table = torch.empty(n_rows, cfg.n_features_per_level).uniform_(-init_scale, init_scale, generator=generator)
        self.table = nn.Parameter(table)
        # int32 row indices (half the memory and bandwidth of int64) whenever the table allows.
        self._index_dtype = torch.int32 if n_rows < 2**31 else torch.int64

    @property
    def output_dim(self) -> int:
        return self.cfg.output_dim

    def _group_corners(
        self, x: torch.Tensor, group: _LevelGroup
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One level group, corner-major (long contiguous inner dimensions vectorise well on CPU):
        -> rows (2, 2, 2, N, Lg), trilinear weights (2, 2, 2, N, Lg) and per-axis weights (3, 2, N, Lg)
        (index [axis, 0] = 1 - frac, [axis, 1] = frac)."""
        device = x.device
        res = group.resolution.to(device=device, dtype=x.dtype)  # (Lg,)
        pos = x.T[:, :, None] * res  # (3, N, Lg)
        with torch.no_grad():
            # The cell's low corner; x == 1 falls in the last cell (frac 1), never past the grid.
            low = torch.minimum(pos.floor(), res - 1)
            low_i = low.long()
            mult = group.multipliers.to(device).T[:, None, :]  # (3, 1, Lg)
            terms = torch.stack([low_i * mult, (low_i + 1) * mult], dim=1)  # (3, 2, N, Lg)
            if not group.dense:
                # (a ^ b ^ c) mod 2^k == (a mod 2^k) ^ (b mod 2^k) ^ (c mod 2^k): same as tcnn's uint32 wraparound.
                terms &= group.mask
            terms = terms.to(self._index_dtype)  # every term is below the level's size from here on
            tx, ty, tz = terms[0][:, None, None], terms[1][None, :, None], terms[2][None, None, :]
            if group.dense:
                rows = tx + ty + tz
            else:
                rows = torch.bitwise_xor(torch.bitwise_xor(tx, ty), tz)
            rows = rows + group.offsets.to(device=device, dtype=self._index_dtype)  # (2, 2, 2, N, Lg)
        frac = pos - low  # (3, N, Lg): the only part that carries the gradient w.r.t. x
        axis_weights = torch.stack([1.0 - frac, frac], dim=1)  # (3, 2, N, Lg)
        wx, wy, wz = axis_weights[0][:, None, None], axis_weights[1][None, :, None], axis_weights[2][None, None, :]
        return rows, wx * wy * wz, axis_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._encode(x)[0]

    def forward_with_input_vjp(
        self, x: torch.Tensor, create_graph: bool = True
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """Closed-form input vjp: d out_l / d x_a = N_l sum_c (d w_c / d frac_a) T[row_c], so
        v^T d out / d x = sum_l N_l sum_c (d w_c / d frac_a) s_lc with s_lc = <T[row_lc], v_l>: one extra gather,
        linear in the table and v, and nothing differentiated twice in x (that graph costs 2-3x the rest on CPU)."""
        outputs, saved = self._encode(x.detach(), keep=True)
        n, features = x.shape[0], self.cfg.n_features_per_level
        inside = ((x >= 0.0) & (x <= 1.0)).to(outputs.dtype)  # clamped coordinates have zero derivative

        def vjp(v: torch.Tensor) -> torch.Tensor:
            grad = torch.zeros(3, n, dtype=outputs.dtype, device=outputs.device)
            start = 0
            for group, (rows, w) in zip(self._groups, saved):
                n_levels = len(group.levels)
                v_group = v[:, start : start + n_levels * features].reshape(n * n_levels, features, 1)
                start += n_levels * features
                corners = self.table.index_select(0, rows.reshape(-1).long()).reshape(n * n_levels, 8, features)
                s = torch.bmm(corners, v_group).reshape(n, n_levels, 8).permute(2, 0, 1).reshape(2, 2, 2, n, n_levels)
                # d w_(a,b,c) / d frac_x = (+1 if a else -1) wy[b] wz[c], and likewise for y and z.
                ds_x = ((s[1] - s[0]) * (w[1][:, None] * w[2][None, :])).sum(dim=(0, 1))
                ds_y = ((s[:, 1] - s[:, 0]) * (w[0][:, None] * w[2][None, :])).sum(dim=(0, 1))
                ds_z = ((s[:, :, 1] - s[:, :, 0]) * (w[0][:, None] * w[1][None, :])).sum(dim=(0, 1))
                res = group.resolution.to(device=outputs.device, dtype=outputs.dtype)
                grad = grad + torch.stack([ds_x, ds_y, ds_z]) @ res  # (3, N): sum over levels of N_l * ds
            return grad.T * inside

        return outputs, vjp

    def _encode(self, x: torch.Tensor, keep: bool = False) -> tuple[torch.Tensor, list]:
        if x.ndim != 2 or x.shape[-1] != 3:
            raise ValueError(f"TorchHashGrid expects points (N, 3), got {tuple(x.shape)}")
        n, features = x.shape[0], self.cfg.n_features_per_level
        x = x.to(self.table.dtype).clamp(0.0, 1.0)
        outs, saved = [], []
        for group in self._groups:  # two groups (dense, hashed), each vectorised over its levels
            rows, weights, axis_weights = self._group_corners(x, group)
            n_levels = len(group.levels)
            rows = rows.reshape(8, n * n_levels).T.contiguous()  # (N Lg, 8): embedding_bag's layout
            weights = weights.reshape(8, n * n_levels).T.contiguous()
            out = _WeightedGather.apply(self.table, weights, rows)
            outs.append(out.reshape(n, n_levels * features))
            if keep:
                saved.append((rows, axis_weights.detach()))
        return (torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]), saved


class _WeightedGather(torch.autograd.Function):
    """out[i] = sum_c weights[i, c] * table[rows[i, c]]: the trilinear gather, (M, 8) -> (M, F).

    Faster and leaner than autograd over index_select: the forward is one fused embedding_bag and nothing of size
    (M, 8, F) is kept; indices are kept as they come (int32 for tables under 2^31 rows) and widened only in the
    backward (CPU index_add_ is several times slower with int32 indices). The backward is written in
    differentiable ops, so second derivatives (e.g. autograd normals w.r.t. x, then w.r.t. the table) work.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(table, weights, rows)
        return torch.nn.functional.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        table, weights, rows = ctx.saved_tensors
        rows = rows.reshape(-1).long()
        grad_table = grad_weights = None
        if ctx.needs_input_grad[0]:
            contrib = (weights[..., None] * grad_out[:, None, :]).reshape(-1, table.shape[1])
            grad_table = torch.zeros_like(table).index_add(0, rows, contrib)
        if ctx.needs_input_grad[1]:
            gathered = table.index_select(0, rows).reshape(*weights.shape, table.shape[1])  # (M, 8, F)
            grad_weights = torch.bmm(gathered, grad_out[:, :, None])[..., 0]
        return grad_table, grad_weights, None


def tcnn_encoding_config(cfg: HashGridConfig) -> dict:
    """Our config as tiny-cuda-nn's encoding config dict."""
    return {
        "otype": "HashGrid",
        "n_levels": cfg.n_levels,
        "n_features_per_level": cfg.n_features_per_level,
        "log2_hashmap_size": cfg.log2_hashmap_size,
        "base_resolution": cfg.base_resolution,
        "per_level_scale": float(cfg.per_level_scale),
    }


def tcnn_available() -> bool:
    """True when tinycudann imports and a CUDA device is present."""
    try:
        importlib.import_module("tinycudann")
    except Exception:  # ImportError, or a broken CUDA build raising at import
        return False
    return torch.cuda.is_available()


class TcnnHashGrid(Encoding):
    """tiny-cuda-nn's fused hash grid (CUDA only). Its half-precision output is cast to float32."""

    def __init__(self, cfg: HashGridConfig, generator: torch.Generator | None = None) -> None:
        """`generator` is not used: tiny-cuda-nn draws the initial table from its own fixed seed."""
        super().__init__()
        try:
            tcnn = importlib.import_module("tinycudann")
        except Exception as exc:
            raise RuntimeError(
                "hash-grid backend 'tcnn' needs the tinycudann package (not on this project's registries); "
                "use backend='torch' or 'auto'"
            ) from exc
        if not torch.cuda.is_available():
            raise RuntimeError("hash-grid backend 'tcnn' needs a CUDA device; use backend='torch' or 'auto'")
        self.cfg = cfg
        self.encoding = tcnn.Encoding(n_input_dims=3, encoding_config=tcnn_encoding_config(cfg))

    @property
    def output_dim(self) -> int:
        return self.cfg.output_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoding(x.clamp(0.0, 1.0)).float()


def triton_usable() -> bool:
    """True when the Triton kernels can be compiled here (a CUDA device and the triton package). On CPU they run
    only through Triton's interpreter, in tests, by building `TritonHashGrid` directly."""
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


# Hash-grid builders by backend name: `build(cfg, generator=None) -> Encoding`, with whether it runs here. A new
# backend is one `@ENCODINGS.register(name, available=...)` function; "auto" takes the first usable of _AUTO_ORDER.
ENCODINGS: Registry[Encoding] = Registry("hash-grid backend")
ENCODINGS.add("torch", TorchHashGrid)
ENCODINGS.add("tcnn", TcnnHashGrid, available=tcnn_available)
_AUTO_ORDER = ["tcnn", "triton", "torch"]


@ENCODINGS.register("triton", available=triton_usable)
def _triton_hash_grid(cfg: HashGridConfig, generator: torch.Generator | None = None) -> Encoding:
    from services.scene.field.triton_encoding import TritonHashGrid  # imported only when asked for: triton is big

    return TritonHashGrid(cfg, generator=generator)


def register_backend(
    name: str, builder: Callable[..., Encoding], available: Callable[[], bool]
) -> None:
    """Adds (or replaces) a hash-grid backend for `make_encoding` (`ENCODINGS.add`)."""
    ENCODINGS.add(name, builder, available=available)


def available_backends() -> list[str]:
    return ENCODINGS.available_kinds()


def make_encoding(cfg: HashGridConfig, backend: str = "auto", generator: torch.Generator | None = None) -> Encoding:
    """Builds the hash grid on `backend`: "torch", "tcnn", "triton", a registered one, or "auto" (fastest
    available). `generator`: where the initial table is drawn from (passed to the builder as `generator=` when
    given). An unknown backend raises `UnknownKind` (a ValueError); a known one unusable here, RuntimeError."""
    if backend == "auto":
        for name in _AUTO_ORDER:
            if name in ENCODINGS and ENCODINGS.is_available(name):
                return _build(ENCODINGS.find(name), cfg, generator)
        raise RuntimeError("no hash-grid backend is available")  # unreachable: torch always is
    builder = ENCODINGS.find(backend)
    if not ENCODINGS.is_available(backend):
        raise RuntimeError(
            f"hash-grid backend {backend!r} is not available here (available: {available_backends()})"
        )
    return _build(builder, cfg, generator)


def _build(builder: Callable[..., Encoding], cfg: HashGridConfig, generator: torch.Generator | None) -> Encoding:
    # Builders registered without a generator keyword keep working wherever no generator is asked for.
    return builder(cfg) if generator is None else builder(cfg, generator=generator)


class FrequencyEncoding(nn.Module):
    """NeRF positional encoding: [x, sin(2^k pi x), cos(2^k pi x)] for k < n_frequencies."""

    def __init__(self, in_dim: int = 3, n_frequencies: int = 4, include_input: bool = True) -> None:
        super().__init__()
        if n_frequencies < 0:
            raise ValueError(f"n_frequencies must be >= 0, got {n_frequencies}")
        self.in_dim, self.include_input = in_dim, include_input
        bands = math.pi * 2.0 ** torch.arange(n_frequencies, dtype=torch.float32)
        self.register_buffer("bands", bands, persistent=False)

    @property
    def output_dim(self) -> int:
        return self.in_dim * (int(self.include_input) + 2 * self.bands.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = (x[..., None, :] * self.bands[:, None].to(x)).flatten(-2)  # (..., K * D)
        parts = ([x] if self.include_input else []) + [torch.sin(scaled), torch.cos(scaled)]
        return torch.cat(parts, dim=-1)
