"""fp8 linears for the denoiser (services/guidance/priors/fp8.py) on the CPU path, and the fp8 bench's runner."""

from __future__ import annotations

import torch
from torch import nn

from bench import fp8_unet
from services.guidance.priors.fp8 import FP8_MAX, Fp8Linear, quantize, swap_linears_to_fp8


def test_quantize_keeps_the_largest_value_and_about_three_significant_bits():
    x = torch.randn(64, 32) * 7.0
    q, scale = quantize(x)
    assert q.dtype == torch.float8_e4m3fn
    back = q.float() * scale
    assert torch.isclose(back.abs().max(), x.abs().max(), rtol=1e-6)
    assert float(back.abs().max() / scale) == FP8_MAX
    relative = ((back - x).abs() / x.abs().clamp(min=1e-3))[x.abs() > 0.5]  # normal range: 2^-4 relative rounding
    assert float(relative.max()) <= 1 / 16 + 1e-6


def test_an_fp8_linear_agrees_with_its_linear_to_fp8_rounding():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        ours, theirs = Fp8Linear(linear)(x), linear(x)
    assert ours.shape == theirs.shape == (3, 5, 48)
    relative = float((ours - theirs).norm() / theirs.norm())
    assert 1e-4 < relative < 0.06  # really rounded, and only by fp8's few bits
    assert float(nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0)) > 0.998


def test_swapping_replaces_only_aligned_linears_and_switches_back_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Sequential(nn.Linear(64, 30), nn.Linear(30, 16)))
    x = torch.randn(4, 32)
    before = model(x)
    swapped = swap_linears_to_fp8(model)
    assert len(swapped) == 1  # 64 -> 30 and 30 -> 16 are not multiples of 16 on both sides
    assert isinstance(model[0], Fp8Linear) and isinstance(model[2][0], nn.Linear)
    assert not torch.equal(model(x), before)
    swapped.use_fp8(False)
    assert torch.equal(model(x), before)
    swapped.use_fp8(True)
    assert isinstance(model[0], Fp8Linear)


def test_the_fp8_bench_compares_both_tiny_priors_with_their_fp16_runs(tmp_path):
    results = fp8_unet.main(["--smoke", "--out", str(tmp_path), "--repeats", "1"])
    assert [r["prior"] for r in results] == ["latent", "pixel"]
    for result in results:
        assert result["fp8_linears"] > 0
        eps = result["eps_cond_vs_baseline"].values()
        # The UNet's own output survives fp8 linears closely but not exactly (a swap that did nothing gives 1.0).
        assert all(0.97 < a["cosine"] < 1.0 - 1e-6 for a in eps)
        assert set(result["unet_cfg_ms"]) == {"baseline", "fp8"}
    assert (tmp_path / "fp8_unet.md").read_text().count("\n") == 4
