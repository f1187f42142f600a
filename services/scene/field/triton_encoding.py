"""The multiresolution hash encoding as Triton kernels (forward, backward, and the closed-form input vjp that
analytic normals use, with its own backward), registered as the hash-grid backend "triton".

Same table layout and indexing as `TorchHashGrid` (one flat table, dense coarse levels, the Instant-NGP spatial hash
on finer ones, identical vertex placement and float32 arithmetic), so a table trained with one backend works in the
other, and the two are checked against each other (tests/test_triton_encoding.py, on CPU through Triton's
interpreter; tests/test_gpu_triton.py compiled on a GPU).

One program handles BLOCK points of one level: it computes the cell and trilinear weights once, then visits the 8
corners, each a gather of F features (F = features per level, a power of two). Backward passes scatter with atomic
adds into the table's gradient. Kernels:

* `_encode_fwd`:      out[n, l F + f] = sum_c w_c T[row_c, f]
* `_encode_bwd`:      dT[row_c, f] += w_c g[n, l F + f]
* `_input_vjp_fwd`:   dx[n, a] = sum_l N_l sum_c (d w_c / d frac_a) <T[row_c], v[n, l]>   (x inside the cube)
* `_input_vjp_bwd`:   with u = d loss / d dx, k_c = N_l sum_a u_a d w_c / d frac_a:
                      dT[row_c] += k_c v[n, l],   dv[n, l] += k_c T[row_c]
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from services.scene.field.encoding import HASH_PRIMES, Encoding, HashGridConfig

try:  # Triton is optional: CUDA hosts have it with torch; CPU hosts run it through its interpreter in tests.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

BLOCK = 128  # points per program
NUM_WARPS = 4


def triton_available() -> bool:
    """True where the kernels can run: Triton imports and either a CUDA device is up or its interpreter is on
    (TRITON_INTERPRET=1, set before triton is imported: how CI runs them on CPU)."""
    if triton is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _level(res_ptr, side_ptr, offset_ptr, dense_ptr, level):
        """A level's constants: cells per axis (float), vertices per axis, first table row, dense (1) or hashed (0)."""
        res = tl.load(res_ptr + level)
        return res, tl.load(side_ptr + level), tl.load(offset_ptr + level), tl.load(dense_ptr + level)

    @triton.jit
    def _cell(x_ptr, offs, mask, res):
        """Per axis: integer low corner (int64) and fractional position, as TorchHashGrid computes them."""
        x = tl.load(x_ptr + offs * 3 + 0, mask=mask, other=0.0)
        y = tl.load(x_ptr + offs * 3 + 1, mask=mask, other=0.0)
        z = tl.load(x_ptr + offs * 3 + 2, mask=mask, other=0.0)
        x = tl.minimum(tl.maximum(x, 0.0), 1.0) * res
        y = tl.minimum(tl.maximum(y, 0.0), 1.0) * res
        z = tl.minimum(tl.maximum(z, 0.0), 1.0) * res
        lx = tl.minimum(tl.floor(x), res - 1.0)
        ly = tl.minimum(tl.floor(y), res - 1.0)
        lz = tl.minimum(tl.floor(z), res - 1.0)
        return lx.to(tl.int64), ly.to(tl.int64), lz.to(tl.int64), x - lx, y - ly, z - lz

    @triton.jit
    def _row(ix, iy, iz, corner: tl.constexpr, side, dense, offset, mask_bits, prime_y, prime_z):
        """Table row of corner `corner` (bit 0: +x, bit 1: +y, bit 2: +z) of each point's cell."""
        gx = ix + (corner & 1)
        gy = iy + ((corner >> 1) & 1)
        gz = iz + ((corner >> 2) & 1)
        dense_index = gx + gy * side + gz * side * side
        hashed_index = (gx ^ (gy * prime_y) ^ (gz * prime_z)) & mask_bits
        return tl.where(dense != 0, dense_index, hashed_index) + offset

    @triton.jit
    def _weight(fx, fy, fz, corner: tl.constexpr):
        """Per-axis trilinear weights of corner `corner`."""
        wx = fx if (corner & 1) == 1 else 1.0 - fx
        wy = fy if ((corner >> 1) & 1) == 1 else 1.0 - fy
        wz = fz if ((corner >> 2) & 1) == 1 else 1.0 - fz
        return wx, wy, wz

    @triton.jit
    def _encode_fwd(x_ptr, table_ptr, out_ptr, res_ptr, side_ptr, offset_ptr, dense_ptr, n_points, mask_bits,
                    prime_y, prime_z, F: tl.constexpr, OUT_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
        level = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = offs < n_points
        res, side, offset, dense = _level(res_ptr, side_ptr, offset_ptr, dense_ptr, level)
        ix, iy, iz, fx, fy, fz = _cell(x_ptr, offs, mask, res)
        features = tl.arange(0, F)
        acc = tl.zeros((BLOCK_N, F), dtype=tl.float32)
        for corner in tl.static_range(8):
            row = _row(ix, iy, iz, corner, side, dense, offset, mask_bits, prime_y, prime_z)
            wx, wy, wz = _weight(fx, fy, fz, corner)
            values = tl.load(table_ptr + row[:, None] * F + features[None, :], mask=mask[:, None], other=0.0)
            acc += (wx * wy * wz)[:, None] * values.to(tl.float32)
        tl.store(out_ptr + offs[:, None] * OUT_DIM + level * F + features[None, :], acc, mask=mask[:, None])

    @triton.jit
    def _encode_bwd(x_ptr, grad_out_ptr, grad_table_ptr, res_ptr, side_ptr, offset_ptr, dense_ptr, n_points,
                    mask_bits, prime_y, prime_z, F: tl.constexpr, OUT_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
        level = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = offs < n_points
        res, side, offset, dense = _level(res_ptr, side_ptr, offset_ptr, dense_ptr, level)
        ix, iy, iz, fx, fy, fz = _cell(x_ptr, offs, mask, res)
        features = tl.arange(0, F)
        grad = tl.load(grad_out_ptr + offs[:, None] * OUT_DIM + level * F + features[None, :], mask=mask[:, None],
                       other=0.0)
        for corner in tl.static_range(8):
            row = _row(ix, iy, iz, corner, side, dense, offset, mask_bits, prime_y, prime_z)
            wx, wy, wz = _weight(fx, fy, fz, corner)
            tl.atomic_add(grad_table_ptr + row[:, None] * F + features[None, :], (wx * wy * wz)[:, None] * grad,
                          mask=mask[:, None], sem="relaxed")

    @triton.jit
    def _corner_slopes(fx, fy, fz, corner: tl.constexpr):
        """d w_c / d frac along x, y, z for corner c."""
        wx, wy, wz = _weight(fx, fy, fz, corner)
        sx = 1.0 if (corner & 1) == 1 else -1.0
        sy = 1.0 if ((corner >> 1) & 1) == 1 else -1.0
        sz = 1.0 if ((corner >> 2) & 1) == 1 else -1.0
        return sx * wy * wz, sy * wx * wz, sz * wx * wy

    @triton.jit
    def _inside(x_ptr, offs, mask):
        x = tl.load(x_ptr + offs * 3 + 0, mask=mask, other=0.0)
        y = tl.load(x_ptr + offs * 3 + 1, mask=mask, other=0.0)
        z = tl.load(x_ptr + offs * 3 + 2, mask=mask, other=0.0)
        return (x >= 0.0) & (x <= 1.0), (y >= 0.0) & (y <= 1.0), (z >= 0.0) & (z <= 1.0)

    @triton.jit
    def _input_vjp_fwd(x_ptr, table_ptr, v_ptr, dx_ptr, res_ptr, side_ptr, offset_ptr, dense_ptr, n_points,
                       mask_bits, prime_y, prime_z, N_LEVELS: tl.constexpr, F: tl.constexpr, OUT_DIM: tl.constexpr,
                       BLOCK_N: tl.constexpr):
        offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = offs < n_points
        features = tl.arange(0, F)
        gx = tl.zeros((BLOCK_N,), dtype=tl.float32)
        gy = tl.zeros((BLOCK_N,), dtype=tl.float32)
        gz = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for level in range(N_LEVELS):
            res, side, offset, dense = _level(res_ptr, side_ptr, offset_ptr, dense_ptr, level)
            ix, iy, iz, fx, fy, fz = _cell(x_ptr, offs, mask, res)
            v = tl.load(v_ptr + offs[:, None] * OUT_DIM + level * F + features[None, :], mask=mask[:, None], other=0.0)
            for corner in tl.static_range(8):
                row = _row(ix, iy, iz, corner, side, dense, offset, mask_bits, prime_y, prime_z)
                values = tl.load(table_ptr + row[:, None] * F + features[None, :], mask=mask[:, None], other=0.0)
                s = tl.sum(values.to(tl.float32) * v, axis=1) * res
                dx, dy, dz = _corner_slopes(fx, fy, fz, corner)
                gx += dx * s
                gy += dy * s
                gz += dz * s
        in_x, in_y, in_z = _inside(x_ptr, offs, mask)
        tl.store(dx_ptr + offs * 3 + 0, tl.where(in_x, gx, 0.0), mask=mask)
        tl.store(dx_ptr + offs * 3 + 1, tl.where(in_y, gy, 0.0), mask=mask)
        tl.store(dx_ptr + offs * 3 + 2, tl.where(in_z, gz, 0.0), mask=mask)

    @triton.jit
    def _input_vjp_bwd(x_ptr, table_ptr, v_ptr, u_ptr, grad_table_ptr, grad_v_ptr, res_ptr, side_ptr, offset_ptr,
                       dense_ptr, n_points, mask_bits, prime_y, prime_z, F: tl.constexpr, OUT_DIM: tl.constexpr,
                       BLOCK_N: tl.constexpr):
        level = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = offs < n_points
        res, side, offset, dense = _level(res_ptr, side_ptr, offset_ptr, dense_ptr, level)
        ix, iy, iz, fx, fy, fz = _cell(x_ptr, offs, mask, res)
        in_x, in_y, in_z = _inside(x_ptr, offs, mask)
        ux = tl.where(in_x, tl.load(u_ptr + offs * 3 + 0, mask=mask, other=0.0), 0.0)
        uy = tl.where(in_y, tl.load(u_ptr + offs * 3 + 1, mask=mask, other=0.0), 0.0)
        uz = tl.where(in_z, tl.load(u_ptr + offs * 3 + 2, mask=mask, other=0.0), 0.0)
        features = tl.arange(0, F)
        v = tl.load(v_ptr + offs[:, None] * OUT_DIM + level * F + features[None, :], mask=mask[:, None], other=0.0)
        grad_v = tl.zeros((BLOCK_N, F), dtype=tl.float32)
        for corner in tl.static_range(8):
            row = _row(ix, iy, iz, corner, side, dense, offset, mask_bits, prime_y, prime_z)
            dx, dy, dz = _corner_slopes(fx, fy, fz, corner)
            k = (ux * dx + uy * dy + uz * dz) * res
            tl.atomic_add(grad_table_ptr + row[:, None] * F + features[None, :], k[:, None] * v, mask=mask[:, None],
                          sem="relaxed")
            values = tl.load(table_ptr + row[:, None] * F + features[None, :], mask=mask[:, None], other=0.0)
            grad_v += k[:, None] * values.to(tl.float32)
        tl.store(grad_v_ptr + offs[:, None] * OUT_DIM + level * F + features[None, :], grad_v, mask=mask[:, None])


class _Levels:
    """Per-level constants as small device tensors, built once per device."""

    def __init__(self, cfg: HashGridConfig, device: torch.device) -> None:
        self.res = torch.tensor([float(r) for r in cfg.resolutions()], dtype=torch.float32, device=device)
        self.side = torch.tensor([r + 1 for r in cfg.resolutions()], dtype=torch.int64, device=device)
        self.offset = torch.tensor(cfg.level_offsets(), dtype=torch.int64, device=device)
        self.dense = torch.tensor([int(d) for d in cfg.level_is_dense()], dtype=torch.int32, device=device)
        self.mask = cfg.table_size - 1

    def args(self) -> tuple:
        return self.res, self.side, self.offset, self.dense


def _launch_shape(n: int, levels: int) -> tuple[int, int]:
    return (triton.cdiv(max(n, 1), BLOCK), levels)


class _Encode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: torch.Tensor, x: torch.Tensor, levels: _Levels, cfg: HashGridConfig) -> torch.Tensor:
        n, features = x.shape[0], cfg.n_features_per_level
        out = torch.empty(n, cfg.output_dim, device=x.device, dtype=torch.float32)
        if n:
            _encode_fwd[_launch_shape(n, cfg.n_levels)](
                x, table, out, *levels.args(), n, levels.mask, HASH_PRIMES[1], HASH_PRIMES[2],
                F=features, OUT_DIM=cfg.output_dim, BLOCK_N=BLOCK, num_warps=NUM_WARPS,
            )
        ctx.save_for_backward(table, x)
        ctx.levels, ctx.cfg = levels, cfg
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        table, x = ctx.saved_tensors
        levels, cfg = ctx.levels, ctx.cfg
        grad_out = grad_out.contiguous().float()
        grad_table = grad_x = None
        n = x.shape[0]
        if ctx.needs_input_grad[0]:
            grad_table = torch.zeros_like(table, dtype=torch.float32)
            if n:
                _encode_bwd[_launch_shape(n, cfg.n_levels)](
                    x, grad_out, grad_table, *levels.args(), n, levels.mask, HASH_PRIMES[1], HASH_PRIMES[2],
                    F=cfg.n_features_per_level, OUT_DIM=cfg.output_dim, BLOCK_N=BLOCK, num_warps=NUM_WARPS,
                )
            grad_table = grad_table.to(table.dtype)
        if ctx.needs_input_grad[1]:
            grad_x = _input_vjp(table, grad_out, x, levels, cfg)
        return grad_table, grad_x, None, None


def _input_vjp(table, v, x, levels: _Levels, cfg: HashGridConfig) -> torch.Tensor:
    n = x.shape[0]
    dx = torch.zeros(n, 3, device=x.device, dtype=torch.float32)
    if n:
        _input_vjp_fwd[(triton.cdiv(n, BLOCK),)](
            x, table, v.contiguous().float(), dx, *levels.args(), n, levels.mask, HASH_PRIMES[1], HASH_PRIMES[2],
            N_LEVELS=cfg.n_levels, F=cfg.n_features_per_level, OUT_DIM=cfg.output_dim, BLOCK_N=BLOCK,
            num_warps=NUM_WARPS,
        )
    return dx


class _InputVjp(torch.autograd.Function):
    """v^T d encode(x) / d x, differentiable w.r.t. the table and v (not x): what analytic normals need."""

    @staticmethod
    def forward(ctx, table, v, x, levels: _Levels, cfg: HashGridConfig):
        ctx.save_for_backward(table, v, x)
        ctx.levels, ctx.cfg = levels, cfg
        return _input_vjp(table, v, x, levels, cfg)

    @staticmethod
    def backward(ctx, u: torch.Tensor):
        table, v, x = ctx.saved_tensors
        levels, cfg = ctx.levels, ctx.cfg
        n = x.shape[0]
        grad_table = torch.zeros_like(table, dtype=torch.float32)
        grad_v = torch.zeros(n, cfg.output_dim, device=x.device, dtype=torch.float32)
        if n:
            _input_vjp_bwd[_launch_shape(n, cfg.n_levels)](
                x, table, v.contiguous().float(), u.contiguous().float(), grad_table, grad_v, *levels.args(), n,
                levels.mask, HASH_PRIMES[1], HASH_PRIMES[2],
                F=cfg.n_features_per_level, OUT_DIM=cfg.output_dim, BLOCK_N=BLOCK, num_warps=NUM_WARPS,
            )
        return grad_table.to(table.dtype), grad_v.to(v.dtype), None, None, None


class TritonHashGrid(Encoding):
    """`TorchHashGrid`'s encoding (same table layout and values) computed by Triton kernels."""

    def __init__(self, cfg: HashGridConfig, init_scale: float = 1e-4, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if triton is None:
            raise RuntimeError("hash-grid backend 'triton' needs the triton package; use backend='torch'")
        features = cfg.n_features_per_level
        if features & (features - 1):
            raise ValueError(f"the triton backend needs a power-of-two n_features_per_level, got {features}")
        self.cfg = cfg
        n_rows = sum(cfg.level_sizes())
        self.table = torch.nn.Parameter(torch.empty(n_rows, features).uniform_(-init_scale, init_scale, generator=generator))
        self._levels: dict[torch.device, _Levels] = {}

    @property
    def output_dim(self) -> int:
        return self.cfg.output_dim

    def _levels_on(self, device: torch.device) -> _Levels:
        if device not in self._levels:
            self._levels[device] = _Levels(self.cfg, device)
        return self._levels[device]

    def _points(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[-1] != 3:
            raise ValueError(f"TritonHashGrid expects points (N, 3), got {tuple(x.shape)}")
        return x.to(self.table.device, torch.float32).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._points(x)
        return _Encode.apply(self.table, x, self._levels_on(x.device), self.cfg)

    def forward_with_input_vjp(
        self, x: torch.Tensor, create_graph: bool = True
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        points = self._points(x.detach())
        levels = self._levels_on(points.device)
        features = _Encode.apply(self.table, points, levels, self.cfg)

        def vjp(v: torch.Tensor) -> torch.Tensor:
            if create_graph:
                return _InputVjp.apply(self.table, v, points, levels, self.cfg)
            with torch.no_grad():
                return _input_vjp(self.table, v, points, levels, self.cfg)

        return features, vjp

