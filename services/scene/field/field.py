"""The coarse stage's neural field (density + albedo [+ normals]) and the background environment-map MLP.

NeuralField, following Magic3D's coarse model and threestudio's "implicit-volume" geometry:
  world point x in [-r, r]^3 -> unit cube -> hash grid -> MLP -> (raw density, albedo logits)
  density = activation(raw + blob bias),  blob bias = blob_density * (1 - |x| / blob_radius)  ("blob_magic3d").
The blob makes the initial scene a soft ball (density 10 -> 0 at |x| = 0.5 before the activation) so that SDS
starts from an object in the middle rather than from empty space or fog.

Density activation: "softplus" by default, as threestudio's Magic3D configs. Unlike exp (Instant-NGP's
trunc_exp), softplus grows linearly, so the blob's pre-activation 10 at the centre is a density of 10, not
exp(10) = 22026, and large SDS gradients cannot blow density up by orders of magnitude in a step. "exp" is
offered (truncated-gradient exp, the Instant-NGP choice) for experiments.

Normals ("normals" in FieldConfig):
* "analytic": -normalize(d raw / dx) (threestudio's Magic3D config), on the pre-activation density for
  stability. Chain rule: autograd through the MLP, the encoding's closed-form input vjp, the box map, the blob's
  own gradient. Differentiable w.r.t. the parameters (so the orientation loss reaches the table and the MLP) but
  not w.r.t. x: sample positions are constants in rendering, and skipping second derivatives in x makes this
  2-3x cheaper than double backward through autograd (identical values and parameter gradients; tested).
* "finite_difference": central differences of the raw density, eps = 0.01 world units (threestudio's eps),
  6 extra density evaluations per point.
* "predicted": a separate small head on the hash features (Magic3D's normal head). It is tied to the geometry only
  through the losses that use it (the orientation regulariser; shading under SDS).
"""

from __future__ import annotations

import math

import torch
from torch.profiler import record_function
from torch import nn
from torch.nn import functional as F

from services.scene.field.encoding import Encoding, FrequencyEncoding, make_encoding
from services.scene.field_config import FieldConfig


class _TruncExp(torch.autograd.Function):
    """exp with its gradient computed at min(x, 15): Instant-NGP's guard against exploding density gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    return _TruncExp.apply(x)


def linear(in_dim: int, out_dim: int, generator: torch.Generator | None = None) -> nn.Linear:
    """nn.Linear with its default initialisation drawn from `generator` (None: torch's global RNG)."""
    if generator is None:
        return nn.Linear(in_dim, out_dim)
    layer = nn.Linear(in_dim, out_dim, device="meta").to_empty(device="cpu")  # built without drawing
    # nn.Linear.reset_parameters, drawing from the generator (the same numbers for the same RNG state).
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    bound = 1.0 / math.sqrt(in_dim) if in_dim > 0 else 0.0
    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer


def mlp(
    in_dim: int, out_dim: int, width: int, n_hidden_layers: int, generator: torch.Generator | None = None
) -> nn.Sequential:
    """Linear-ReLU stack with n_hidden_layers hidden layers of `width` (0: a single linear map)."""
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(n_hidden_layers):
        layers += [linear(dim, width, generator), nn.ReLU(inplace=True)]
        dim = width
    layers.append(linear(dim, out_dim, generator))
    return nn.Sequential(*layers)


class NeuralField(nn.Module):
    """Density + albedo (+ normal) field on a hash grid. Points are world coordinates, (N, 3)."""

    def __init__(
        self,
        cfg: FieldConfig | None = None,
        encoding: Encoding | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """`generator`: where the initial weights are drawn from (None: torch's global RNG)."""
        super().__init__()
        self.cfg = cfg or FieldConfig()
        self.encoding = (
            encoding if encoding is not None else make_encoding(self.cfg.encoding, self.cfg.backend, generator)
        )
        width, layers = self.cfg.hidden_width, self.cfg.n_hidden_layers
        # One MLP for density and albedo (Magic3D's "albedo+density" head); 1 + 3 outputs.
        self.network = mlp(self.encoding.output_dim, 4, width, layers, generator)
        self.normal_network = (
            mlp(self.encoding.output_dim, 3, width, layers, generator)
            if self.cfg.normals == "predicted"
            else None
        )

    # -- coordinates and the blob -------------------------------------------------------------------------------
    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """World [-r, r]^3 -> [0, 1]^3 (clamped: the field is constant outside the box)."""
        return ((x / self.cfg.bound_radius + 1.0) * 0.5).clamp(0.0, 1.0)

    def blob_bias(self, x: torch.Tensor) -> torch.Tensor:
        """threestudio's "blob_magic3d" pre-activation bias: blob_density * (1 - |x| / blob_radius)."""
        radius = torch.sqrt((x * x).sum(dim=-1) + 1e-12)  # eps: finite gradient at the origin
        return self.cfg.blob_density * (1.0 - radius / self.cfg.blob_radius)

    def activate(self, raw: torch.Tensor) -> torch.Tensor:
        return F.softplus(raw) if self.cfg.density_activation == "softplus" else trunc_exp(raw)

    # -- evaluation ---------------------------------------------------------------------------------------------
    def raw_density(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activation density (N,), blob bias included."""
        if x.ndim != 2 or x.shape[-1] != 3:
            raise ValueError(f"NeuralField expects points (N, 3), got {tuple(x.shape)}")
        return self.network(self.encoding(self.to_unit(x)))[:, 0] + self.blob_bias(x)

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """Density sigma >= 0, (N,)."""
        return self.activate(self.raw_density(x))

    def forward(self, x: torch.Tensor, with_normal: bool = False) -> dict[str, torch.Tensor]:
        """x (N, 3) world -> {"density" (N,), "raw_density" (N,), "albedo" (N, 3) in (0, 1), ["normal" (N, 3)]}.

        Normals are unit vectors pointing out of the object (against the density gradient). They are
        differentiable w.r.t. the field's parameters (so the orientation loss trains the field) but not w.r.t. x.
        Under no_grad they are still computed and returned detached.
        """
        if x.ndim != 2 or x.shape[-1] != 3:
            raise ValueError(f"NeuralField expects points (N, 3), got {tuple(x.shape)}")
        outer_grad = torch.is_grad_enabled()
        analytic = with_normal and self.cfg.normals == "analytic"
        with torch.set_grad_enabled(outer_grad or analytic):
            unit = self.to_unit(x)
            vjp = None
            with record_function("field.encoding"):  # profiler labels: bench/coarse_step.py splits time by them
                if analytic:
                    enc, vjp = self.encoding.forward_with_input_vjp(unit, create_graph=outer_grad)
                else:
                    enc = self.encoding(unit)
            if analytic and not enc.requires_grad:  # frozen table: still differentiate the MLP
                enc = enc.detach().requires_grad_(True)
            with record_function("field.mlp"):
                net = self.network(enc)
                raw = net[:, 0] + self.blob_bias(x)
                out = {"raw_density": raw, "density": self.activate(raw), "albedo": torch.sigmoid(net[:, 1:])}
            if with_normal:
                with record_function("field.normals"):
                    if analytic:
                        out["normal"] = self._analytic_normal(x, net[:, 0], enc, vjp, create_graph=outer_grad)
                    else:
                        out["normal"] = self._normal(x, enc)
        if not outer_grad:
            out = {k: v.detach() for k, v in out.items()}
        return out

    def _analytic_normal(self, x, raw_mlp, enc, vjp, create_graph: bool) -> torch.Tensor:
        """-normalize(d raw / dx) by the chain rule: MLP (autograd) -> hash grid (closed-form vjp) -> box map, plus
        the blob's own gradient. Computed on the pre-activation density for stability (as threestudio, multinerf)."""
        (d_enc,) = torch.autograd.grad(raw_mlp.sum(), enc, create_graph=create_graph)
        r = self.cfg.bound_radius
        inside = ((x >= -r) & (x <= r)).to(x.dtype)  # to_unit clamps outside the box
        grad = vjp(d_enc) * inside / (2.0 * r)
        radius = torch.sqrt((x * x).sum(dim=-1, keepdim=True) + 1e-12)
        grad = grad - (self.cfg.blob_density / self.cfg.blob_radius) * x.detach() / radius
        return -F.normalize(grad, dim=-1)

    def _normal(self, x: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        if self.cfg.normals == "finite_difference":
            eps = self.cfg.finite_difference_eps
            offsets = torch.eye(3, dtype=x.dtype, device=x.device) * eps  # (3, 3)
            probes = torch.cat([x[:, None, :] + offsets, x[:, None, :] - offsets], dim=1)  # (N, 6, 3)
            r = self.cfg.bound_radius
            raw_probe = self.raw_density(probes.reshape(-1, 3).clamp(-r, r)).reshape(-1, 6)
            grad = (raw_probe[:, :3] - raw_probe[:, 3:]) / (2.0 * eps)
            return -F.normalize(grad, dim=-1)
        assert self.normal_network is not None
        return F.normalize(self.normal_network(enc), dim=-1)


class BackgroundMLP(nn.Module):
    """Environment map: view direction (unit, world) -> RGB in (0, 1). Deliberately tiny (Magic3D/DreamFusion),
    so that it cannot model the object; train it with its own learning rate (see `param_groups`)."""

    def __init__(self, n_frequencies: int = 4, hidden_width: int = 32, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.encoding = FrequencyEncoding(3, n_frequencies, include_input=True)
        self.network = mlp(self.encoding.output_dim, 3, hidden_width, 1, generator)

    def forward(self, directions: torch.Tensor) -> torch.Tensor:
        """directions (..., 3) -> colours (..., 3)."""
        return torch.sigmoid(self.network(self.encoding(directions)))


def param_groups(
    field: NeuralField,
    background: nn.Module | None,
    lr: float,
    background_lr: float | None = None,
) -> list[dict]:
    """Optimiser parameter groups: the field at `lr`, the background at `background_lr` (default 10 * lr).

    The Magic3D paper trains the environment-map MLP with a 10x learning rate; threestudio's public Magic3D
    configs instead use 0.1x (geometry 0.01, background 0.001). Pass background_lr to pick.
    Use e.g. torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15) as threestudio.
    """
    groups = [{"name": "field", "params": [p for p in field.parameters() if p.requires_grad], "lr": lr}]
    if background is not None:
        params = [p for p in background.parameters() if p.requires_grad]
        if params:
            bg_lr = 10.0 * lr if background_lr is None else background_lr
            groups.append({"name": "background", "params": params, "lr": bg_lr})
    return groups
