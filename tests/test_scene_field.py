"""Hash-grid encoding, neural field and occupancy grid of the coarse stage (services/scene/field)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from services.scene.field import (
    BackgroundMLP,
    Encoding,
    FieldConfig,
    HashGridConfig,
    NeuralField,
    OccupancyConfig,
    OccupancyGrid,
    TcnnHashGrid,
    TorchHashGrid,
    available_backends,
    make_encoding,
    param_groups,
    tcnn_available,
    tcnn_encoding_config,
)

SMALL = HashGridConfig(n_levels=6, n_features_per_level=2, log2_hashmap_size=12, base_resolution=4, per_level_scale=2.0)


# -- slow reference hash grid: loops over levels and the 8 corners, written from the Instant-NGP definition ------
def reference_encoding(table: torch.Tensor, cfg: HashGridConfig, x: torch.Tensor) -> torch.Tensor:
    """Straightforward per-level, per-corner evaluation (vectorised over points only)."""
    primes = (1, 2654435761, 805459861)
    size_limit = 2**cfg.log2_hashmap_size
    features, offset = [], 0
    x = x.clamp(0, 1)
    for level in range(cfg.n_levels):
        res = math.floor(cfg.base_resolution * cfg.per_level_scale**level + 1e-6)
        side = res + 1
        dense = side**3 <= size_limit
        rows_in_level = side**3 if dense else size_limit
        level_table = table[offset : offset + rows_in_level]
        offset += rows_in_level
        scaled = x * res
        base = torch.clamp(torch.floor(scaled), max=res - 1)
        frac = scaled - base
        base = base.long()
        acc = torch.zeros(x.shape[0], cfg.n_features_per_level, dtype=x.dtype)
        for corner in range(8):
            bits = [(corner >> 2) & 1, (corner >> 1) & 1, corner & 1]
            weight = torch.ones(x.shape[0], dtype=x.dtype)
            coords = []
            for axis in range(3):
                weight = weight * (frac[:, axis] if bits[axis] else 1 - frac[:, axis])
                coords.append(base[:, axis] + bits[axis])
            if dense:
                index = coords[0] + coords[1] * side + coords[2] * side * side
            else:
                h = torch.zeros_like(coords[0])
                for axis in range(3):
                    h = h ^ ((coords[axis] * primes[axis]) % (2**32))
                index = h % size_limit
            acc = acc + weight[:, None] * level_table[index]
        features.append(acc)
    return torch.cat(features, dim=1)


def _points(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=g, dtype=dtype)
    edges = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.25, 1.0], [1.0, 0.0, 0.5]], dtype=dtype)
    return torch.cat([x, edges])


# -- HashGridConfig ------------------------------------------------------------------------------------------------
def test_default_config_is_threestudio_magic3d():
    cfg = HashGridConfig()
    assert (cfg.n_levels, cfg.n_features_per_level, cfg.log2_hashmap_size, cfg.base_resolution) == (16, 2, 19, 16)
    assert cfg.resolutions()[0] == 16 and cfg.resolutions()[-1] == 4096
    assert cfg.level_is_dense() == [True] * 5 + [False] * 11  # 71^3 < 2^19 < 102^3
    assert cfg.output_dim == 32


def test_memory_bytes_counts_dense_and_hashed_rows():
    cfg = HashGridConfig()
    rows = sum((r + 1) ** 3 for r in cfg.resolutions()[:5]) + 11 * 2**19
    assert cfg.n_params == rows * 2
    assert cfg.memory_bytes(torch.float32) == rows * 2 * 4
    assert cfg.memory_bytes(torch.float16) == rows * 2 * 2
    assert TorchHashGrid(SMALL).table.numel() == SMALL.n_params


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_levels": 0}, "n_levels"),
        ({"n_features_per_level": 3.0}, "n_features_per_level must be an int"),
        ({"log2_hashmap_size": 2}, "log2_hashmap_size"),
        ({"base_resolution": 0}, "base_resolution"),
        ({"per_level_scale": 0.5}, "per_level_scale"),
        ({"per_level_scale": float("nan")}, "per_level_scale"),
        ({"n_levels": 32, "per_level_scale": 2.0}, "finest level"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HashGridConfig(**kwargs)


def test_tcnn_config_mapping():
    cfg = HashGridConfig(
        n_levels=8, n_features_per_level=4, log2_hashmap_size=15, base_resolution=8, per_level_scale=1.5
    )
    assert tcnn_encoding_config(cfg) == {
        "otype": "HashGrid",
        "n_levels": 8,
        "n_features_per_level": 4,
        "log2_hashmap_size": 15,
        "base_resolution": 8,
        "per_level_scale": 1.5,
    }


def test_backend_registry():
    assert isinstance(make_encoding(SMALL, "torch"), TorchHashGrid)
    assert "torch" in available_backends()
    if not tcnn_available():
        assert isinstance(make_encoding(SMALL, "auto"), TorchHashGrid)
        with pytest.raises(RuntimeError, match="tcnn"):
            make_encoding(SMALL, "tcnn")
        with pytest.raises(RuntimeError, match="tinycudann|CUDA"):
            TcnnHashGrid(SMALL)
    if not torch.cuda.is_available():  # the Triton kernels compile for CUDA only (CPU: the interpreter, in tests)
        with pytest.raises(RuntimeError, match="'triton' is not available"):
            make_encoding(SMALL, "triton")
    with pytest.raises(ValueError, match="unknown hash-grid backend"):
        make_encoding(SMALL, "cuda-magic")


# -- TorchHashGrid against the reference -------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [SMALL, HashGridConfig()], ids=["small", "magic3d"])
def test_torch_hash_grid_matches_reference(cfg):
    torch.manual_seed(0)
    grid = TorchHashGrid(cfg)
    with torch.no_grad():
        grid.table.uniform_(-1.0, 1.0)  # O(1) features so the comparison means something
    x = _points(1000, seed=1)
    ours = grid(x)
    assert ours.shape == (x.shape[0], cfg.output_dim)
    ref = reference_encoding(grid.table.detach(), cfg, x)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)
    # float64: equal to rounding
    grid64 = TorchHashGrid(cfg).double()
    with torch.no_grad():
        grid64.table.copy_(grid.table.double())
    x64 = x.double()
    assert torch.allclose(grid64(x64), reference_encoding(grid64.table.detach(), cfg, x64), atol=1e-12, rtol=0)


def test_init_range_and_clamping():
    grid = TorchHashGrid(SMALL)
    assert grid.table.abs().max() <= 1e-4
    x = torch.tensor([[-0.5, 0.2, 1.7]])
    assert torch.equal(grid(x), grid(torch.tensor([[0.0, 0.2, 1.0]])))


def test_gradient_wrt_x_matches_finite_differences():
    torch.manual_seed(0)
    grid = TorchHashGrid(SMALL).double()
    with torch.no_grad():
        grid.table.uniform_(-1.0, 1.0)
    x = (torch.rand(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: grid(p), (x,), eps=1e-7, atol=1e-5)


def test_gradient_wrt_table_and_double_backward():
    torch.manual_seed(0)
    cfg = HashGridConfig(
        n_levels=3, n_features_per_level=2, log2_hashmap_size=6, base_resolution=2, per_level_scale=2.0
    )
    grid = TorchHashGrid(cfg).double()
    with torch.no_grad():
        grid.table.uniform_(-1.0, 1.0)
    x = (torch.rand(4, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.8 + 0.1)
    x.requires_grad_()

    def fn(table, points):  # the grid as a function of its table and the points
        return functional_call(grid, {"table": table}, (points,))

    t0 = grid.table.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(fn, (t0, x), eps=1e-7, atol=1e-5)
    # second order (analytic normals differentiate d out / d x w.r.t. the table)
    assert torch.autograd.gradgradcheck(fn, (t0, x), eps=1e-7, atol=1e-4)


def test_hash_grid_empty_input():
    grid = TorchHashGrid(SMALL)
    out = grid(torch.zeros(0, 3))
    assert out.shape == (0, SMALL.output_dim)


# -- NeuralField ---------------------------------------------------------------------------------------------------
FIELD_ENC = HashGridConfig(n_levels=8, log2_hashmap_size=14, base_resolution=8, per_level_scale=1.6)


def _field(**kwargs) -> NeuralField:
    torch.manual_seed(0)
    return NeuralField(FieldConfig(encoding=FIELD_ENC, backend="torch", **kwargs))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"density_activation": "relu"}, "density_activation"),
        ({"normals": "magic"}, "normals"),
        ({"blob_radius": 0.0}, "blob_radius"),
        ({"bound_radius": -1.0}, "bound_radius"),
        ({"hidden_width": 0}, "hidden_width"),
        ({"encoding": {"n_levels": 4}}, "HashGridConfig"),
    ],
)
def test_field_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FieldConfig(**kwargs)


def test_blob_initialisation():
    field = _field()
    x = torch.tensor([[0.0, 0.0, 0.0], [0.25, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert torch.allclose(field.blob_bias(x), torch.tensor([10.0, 5.0, 0.0, -10.0]), atol=1e-4)
    with torch.no_grad():
        density = field.density(x)
    # softplus(10 + small MLP output) ~ 10 at the centre, ~0 at the box's face
    assert 9.0 < density[0] < 11.0 and density[1] > 4.0 and density[3] < 1e-3
    assert (density[:-1] > density[1:]).all()


def test_exp_activation_and_its_truncated_gradient():
    field = _field(density_activation="exp")
    raw = torch.tensor([0.0, 1.0, 20.0], requires_grad=True)
    dens = field.activate(raw)
    assert torch.allclose(dens, torch.exp(raw.detach()))
    dens.sum().backward()
    assert torch.allclose(raw.grad, torch.exp(torch.tensor([0.0, 1.0, 15.0])))


def test_unit_mapping_of_the_box():
    field = _field(bound_radius=2.0)
    x = torch.tensor([[-2.0, 0.0, 2.0], [3.0, -3.0, 1.0]])
    assert torch.allclose(field.to_unit(x), torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.0, 0.75]]))


def _radial_points(n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    dirs = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    radii = 0.2 + 0.6 * torch.rand(n, 1, generator=g)
    return dirs * radii


@pytest.mark.parametrize("mode", ["analytic", "finite_difference"])
def test_blob_normals_point_outward(mode):
    field = _field(normals=mode)
    x = _radial_points()
    out = field(x, with_normal=True)
    normal = out["normal"]
    assert torch.allclose(normal.norm(dim=-1), torch.ones(len(x)), atol=1e-5)
    cos = (normal * torch.nn.functional.normalize(x, dim=-1)).sum(-1)
    assert cos.min() > 0.99
    assert set(out) == {"density", "raw_density", "albedo", "normal"}
    assert out["albedo"].shape == (len(x), 3) and ((out["albedo"] > 0) & (out["albedo"] < 1)).all()


def test_analytic_normals_are_differentiable_and_detached_under_no_grad():
    field = _field(normals="analytic")
    x = _radial_points(16)
    out = field(x, with_normal=True)
    assert out["normal"].requires_grad
    out["normal"][:, 0].sum().backward()
    assert field.encoding.table.grad is not None and field.encoding.table.grad.abs().sum() > 0
    assert field.network[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        out = field(x, with_normal=True)
    assert not any(v.requires_grad for v in out.values())


def _autograd_normal(field: NeuralField, x: torch.Tensor) -> torch.Tensor:
    """Reference: -normalize(d raw / dx) by plain double-differentiable autograd through the hash grid."""
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(field.raw_density(x).sum(), x, create_graph=True)
    return -torch.nn.functional.normalize(grad, dim=-1)


def test_analytic_normals_match_autograd_including_parameter_gradients():
    field = _field(normals="analytic").double()
    with torch.no_grad():
        field.encoding.table.uniform_(-0.5, 0.5)  # a field whose normals are not just the blob's
    x = _radial_points(32).double()
    weights = torch.randn(32, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    ours = field(x, with_normal=True)["normal"]
    (ours * weights).sum().backward()
    def grads():
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in field.parameters()]

    ours_grads = grads()
    field.zero_grad(set_to_none=True)
    ref = _autograd_normal(field, x)
    (ref * weights).sum().backward()
    assert torch.allclose(ours, ref, atol=1e-10)
    assert ours_grads[0].abs().sum() > 0  # the table
    for mine, theirs in zip(ours_grads, grads()):
        assert torch.allclose(mine, theirs, atol=1e-9)


def test_generic_encoding_vjp_matches_the_closed_form():
    torch.manual_seed(0)
    grid = TorchHashGrid(SMALL).double()
    with torch.no_grad():
        grid.table.uniform_(-1.0, 1.0)
    x = _points(50, seed=2, dtype=torch.float64)[:50]
    v = torch.randn(50, SMALL.output_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out_fast, vjp_fast = grid.forward_with_input_vjp(x)
    out_generic, vjp_generic = Encoding.forward_with_input_vjp(grid, x)
    assert torch.allclose(out_fast, out_generic)
    assert torch.allclose(vjp_fast(v), vjp_generic(v), atol=1e-10)


def test_predicted_normals_head():
    field = _field(normals="predicted")
    x = _radial_points(16)
    out = field(x, with_normal=True)
    assert torch.allclose(out["normal"].norm(dim=-1), torch.ones(16), atol=1e-5)
    out["normal"].sum().backward()
    assert field.normal_network[0].weight.grad.abs().sum() > 0
    assert "normal" not in field(x)


def test_background_and_param_groups():
    field, background = _field(), BackgroundMLP()
    dirs = torch.nn.functional.normalize(torch.randn(5, 7, 3), dim=-1)
    colors = background(dirs)
    assert colors.shape == (5, 7, 3) and ((colors > 0) & (colors < 1)).all()

    groups = param_groups(field, background, lr=0.01)
    assert [g["name"] for g in groups] == ["field", "background"]
    assert groups[0]["lr"] == 0.01 and groups[1]["lr"] == pytest.approx(0.1)
    assert param_groups(field, background, 0.01, background_lr=0.001)[1]["lr"] == 0.001
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(field.parameters())) + len(list(background.parameters()))
    optim = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15)
    loss = field.density(_radial_points(8)).sum() + background(dirs).sum()
    loss.backward()
    before = field.encoding.table.detach().clone()
    optim.step()
    assert not torch.equal(before, field.encoding.table)
    assert len(param_groups(field, None, 0.01)) == 1


# -- OccupancyGrid -------------------------------------------------------------------------------------------------
class BallDensity(nn.Module):
    """density = value inside |x| < radius, else 0; counts evaluated points."""

    def __init__(self, radius: float = 0.5, value: float = 5.0) -> None:
        super().__init__()
        self.radius, self.value, self.evaluated = radius, value, 0

    def density(self, x: torch.Tensor) -> torch.Tensor:
        self.evaluated += x.shape[0]
        return (x.norm(dim=-1) < self.radius).float() * self.value


def test_occupancy_starts_full_and_updates_every_k_steps():
    grid = OccupancyGrid(OccupancyConfig(resolution=16, update_every=4))
    assert grid.occupied_fraction() == 1.0
    field = BallDensity()
    assert not grid.update(field, step=3) and field.evaluated == 0
    assert grid.update(field, step=4, generator=torch.Generator().manual_seed(0))
    assert field.evaluated == 16**3
    assert 0.0 < grid.occupied_fraction() < 0.2  # ball of radius 0.5 in a box of side 2: ~6.5% + jitter
    inside = torch.tensor([[0.0, 0.0, 0.0], [0.2, -0.1, 0.1]])
    outside = torch.tensor([[0.9, 0.9, 0.9], [0.0, 0.0, 0.95], [1.5, 0.0, 0.0], [0.0, -3.0, 0.0]])
    assert grid.occupied(inside).all() and not grid.occupied(outside).any()
    assert grid.n_updates.item() == 1


def test_occupancy_decaying_max_and_threshold():
    cfg = OccupancyConfig(resolution=8, update_every=1, decay=0.5, step_size=0.1, alpha_threshold=0.01)
    grid = OccupancyGrid(cfg)
    field = BallDensity(radius=10.0, value=4.0)  # every cell full
    grid.update(field, 0)
    assert torch.allclose(grid.values, torch.full((512,), 4.0))
    field.value = 0.0
    grid.update(field, 1)
    assert torch.allclose(grid.values, torch.full((512,), 2.0))  # max(0.5 * 4, 0)
    assert grid.threshold() == pytest.approx(0.01)  # min(mean 2.0 * 0.1, 0.01)
    assert grid.occupied_fraction() == 1.0
    for step in range(2, 12):
        grid.update(field, step)
    # 2 * 0.5^10 * 0.1 ~ 2e-4: below 0.01 but equal to the mean, so nothing is strictly above: all empty
    assert grid.occupied_fraction() == 0.0


def test_occupancy_threshold_uses_mean_when_scene_is_faint():
    cfg = OccupancyConfig(resolution=8, update_every=1, step_size=0.1, alpha_threshold=0.01)
    grid = OccupancyGrid(cfg)
    grid.update(BallDensity(radius=0.5, value=0.05), 0)  # alpha per step 0.005 < 0.01 inside the ball
    assert grid.threshold() < 0.005
    assert 0.0 < grid.occupied_fraction() < 0.5  # the faint ball is kept, the empty rest is not


def test_occupancy_subset_updates_on_large_grids():
    cfg = OccupancyConfig(resolution=32, update_every=1, warmup_steps=2, full_update_max_cells=1000)
    grid = OccupancyGrid(cfg)
    field = BallDensity()
    g = torch.Generator().manual_seed(0)
    grid.update(field, 0, generator=g)  # warm-up: every cell
    assert field.evaluated == 32**3
    field.evaluated = 0
    grid.update(field, 5, generator=g)  # after warm-up: a quarter uniformly + a quarter from occupied cells
    assert 0 < field.evaluated <= 32**3 // 2


def test_occupancy_state_dict_round_trip():
    grid = OccupancyGrid(OccupancyConfig(resolution=16, update_every=1))
    grid.update(BallDensity(), 0, generator=torch.Generator().manual_seed(0))
    restored = OccupancyGrid(OccupancyConfig(resolution=16, update_every=1))
    assert restored.occupied_fraction() == 1.0
    restored.load_state_dict(grid.state_dict())
    assert torch.equal(restored.occupancy, grid.occupancy) and torch.equal(restored.values, grid.values)
    assert restored.n_updates.item() == 1
    with pytest.raises(RuntimeError):
        OccupancyGrid(OccupancyConfig(resolution=8)).load_state_dict(grid.state_dict())


def test_occupancy_grid_on_blob_field():
    field = _field()
    grid = OccupancyGrid(OccupancyConfig(resolution=32, step_size=2 / 64))
    grid.update(field, 0, generator=torch.Generator().manual_seed(0))
    frac = grid.occupied_fraction()
    # density * step > 0.01 where softplus(10 (1 - |x| / 0.5)) > 0.32, i.e. |x| < ~0.55: ~9% of the box
    assert 0.05 < frac < 0.15
    assert grid.occupied(torch.zeros(1, 3)).all()
    assert not grid.occupied(torch.tensor([[0.0, 0.0, 0.8]])).any()


@pytest.mark.parametrize(
    "kwargs", [{"resolution": 0}, {"decay": 1.5}, {"step_size": 0.0}, {"update_every": 0}, {"warmup_steps": -1}]
)
def test_occupancy_config_validation(kwargs):
    with pytest.raises(ValueError):
        OccupancyConfig(**kwargs)
