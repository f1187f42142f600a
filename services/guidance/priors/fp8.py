"""Float8 (e4m3) matmuls for a denoiser's linear layers: an experiment of issue 17 ("fp8 for the UNet where quality
allows; measure the gradient's cosine to fp16"), measured by bench/fp8_unet.py before any prior uses it.

What is quantised: every `nn.Linear` whose in and out features are multiples of 16 (what Hopper's fp8 tensor cores
take): the attention projections, the feed-forward layers, the time and text embeddings. Convolutions stay in the
model's dtype. Scaling is per tensor: the weight's once at swap time, the activation's on every call from its own
absolute maximum (no host sync, so CUDA graphs can capture it). On CUDA the product runs in `torch._scaled_mm`;
elsewhere it is emulated (quantise, dequantise, matmul in float32), which gives the same rounding of the inputs and
lets CPU tests check the numerics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
ALIGNMENT = 16  # fp8 GEMMs on Hopper need K and N (and, in some builds, M) to be multiples of 16


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (x / scale in float8 e4m3, scale as a float32 scalar tensor), scale = amax(|x|) / 448."""
    amax = x.detach().abs().amax().float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


class Fp8Linear(nn.Module):
    """y = x W^T + b with x and W rounded to float8 e4m3 (per-tensor scales); y in x's dtype. Inference only."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize(linear.weight.detach())
        self.register_buffer("weight_fp8", weight.contiguous())  # (out, in) row-major: .t() is column-major
        self.register_buffer("weight_scale", scale)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        q, scale = quantize(rows)
        if q.is_cuda:
            out = _scaled_matmul(q, self.weight_fp8, scale, self.weight_scale, x.dtype)
        else:
            out = ((q.float() * scale) @ (self.weight_fp8.float() * self.weight_scale).t()).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


def _scaled_matmul(
    q: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    rows = q.shape[0]
    padded = -rows % ALIGNMENT  # e.g. 77 text tokens x 8 rows: pad with zero rows, drop them after
    if padded:
        q = torch.cat([q, q.new_zeros(padded, q.shape[1])])
    out = torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=weight_scale, out_dtype=dtype)
    return out[:rows] if padded else out


@dataclass
class Swapped:
    """The linears of a module and their fp8 replacements, to switch between them (`use_fp8`)."""

    replaced: list[tuple[nn.Module, str, nn.Linear, Fp8Linear]]

    def __len__(self) -> int:
        return len(self.replaced)

    def use_fp8(self, on: bool) -> None:
        for parent, name, original, fp8 in self.replaced:
            setattr(parent, name, fp8 if on else original)


def swap_linears_to_fp8(module: nn.Module) -> Swapped:
    """Replaces, in place, each eligible nn.Linear of `module` by an Fp8Linear; `.use_fp8(False)` puts them back."""
    replaced = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and _eligible(child):
                fp8 = Fp8Linear(child)
                setattr(parent, name, fp8)
                replaced.append((parent, name, child, fp8))
    return Swapped(replaced)


def _eligible(linear: nn.Linear) -> bool:
    return linear.in_features % ALIGNMENT == 0 and linear.out_features % ALIGNMENT == 0
