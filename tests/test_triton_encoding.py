"""The Triton hash-grid kernels against TorchHashGrid, on CPU through Triton's interpreter (conftest sets
TRITON_INTERPRET=1 where no CUDA device is present; on a GPU the same tests run the compiled kernels)."""

from __future__ import annotations

import pytest
import torch

from services.scene.field.encoding import HashGridConfig, TorchHashGrid

triton_encoding = pytest.importorskip("services.scene.field.triton_encoding")
if not triton_encoding.triton_available():
    pytest.skip("Triton is neither compiled for CUDA here nor running in its interpreter", allow_module_level=True)

# Two dense levels and two hashed ones (16^3 rows hold the 5^3 and 8^3 vertex grids, not the finer ones).
MIXED = HashGridConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=9, base_resolution=4, per_level_scale=1.6)
FOUR_FEATURES = HashGridConfig(n_levels=3, n_features_per_level=4, log2_hashmap_size=8, base_resolution=3, per_level_scale=2.0)


def grids(cfg: HashGridConfig, device: str = "cpu"):
    reference = TorchHashGrid(cfg, init_scale=0.5).to(device)
    triton_grid = triton_encoding.TritonHashGrid(cfg).to(device)
    with torch.no_grad():
        triton_grid.table.copy_(reference.table)
    return reference, triton_grid


def points(n: int, device: str = "cpu") -> torch.Tensor:
    x = torch.rand(n, 3, generator=torch.Generator().manual_seed(1))
    x[:4] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.2, -0.1, 0.5], [0.25, 0.5, 0.75]])  # edges, outside
    return x.to(device)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("cfg", [MIXED, FOUR_FEATURES], ids=["mixed-levels", "four-features"])
def test_forward_and_table_gradient_match_the_torch_grid(cfg):
    reference, triton_grid = grids(cfg, device())
    x = points(300, device())
    assert MIXED.level_is_dense() == [True, True, False, False]
    ours, theirs = triton_grid(x), reference(x)
    assert ours.shape == (300, cfg.output_dim)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(theirs)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    torch.testing.assert_close(triton_grid.table.grad, reference.table.grad, rtol=1e-5, atol=1e-5)


def test_input_gradient_and_its_double_backward_match():
    reference, triton_grid = grids(MIXED, device())
    x = points(200, device())
    v = torch.randn(200, MIXED.output_dim, device=x.device, requires_grad=True)
    v_ref = v.detach().clone().requires_grad_(True)
    ours, vjp = triton_grid.forward_with_input_vjp(x, create_graph=True)
    theirs, vjp_ref = reference.forward_with_input_vjp(x, create_graph=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    dx, dx_ref = vjp(v), vjp_ref(v_ref)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-4)
    assert float(dx[2, 0].detach().abs()) == 0.0 and float(dx[2, 1].detach().abs()) == 0.0  # clamped coordinates: no slope
    u = torch.randn_like(dx)
    (dx * u).sum().backward()
    (dx_ref * u).sum().backward()
    torch.testing.assert_close(triton_grid.table.grad, reference.table.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v.grad, v_ref.grad, rtol=1e-4, atol=1e-4)


def test_autograd_input_gradient_and_validation():
    reference, triton_grid = grids(MIXED, device())
    x = points(64, device()).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    triton_grid(x).sum().backward()
    reference(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    assert triton_grid(torch.empty(0, 3, device=x.device)).shape == (0, MIXED.output_dim)
    with pytest.raises(ValueError, match="power-of-two"):
        triton_encoding.TritonHashGrid(HashGridConfig(n_levels=2, n_features_per_level=3, log2_hashmap_size=8))
    with pytest.raises(ValueError, match="points"):
        triton_grid(torch.zeros(4, 2))
