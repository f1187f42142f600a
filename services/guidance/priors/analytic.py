"""The analytic prior: the exact optimal denoiser of a finite set of reference objects. Needs no weights.

For a set S of reference objects, rendered at the request's camera as images x_k in [-1, 1], the data
distribution "one of the x_k, equally likely" has the exact posterior mean
    E[x0 | x_t] = sum_k softmax_k(-||x_t - sqrt(abar) x_k||^2 / (2 (1 - abar))) x_k
and hence the exact noise prediction eps(x_t) = (x_t - sqrt(abar) E[x0 | x_t]) / sqrt(1 - abar).
The *conditional* denoiser uses the objects the prompt names; the *unconditional* one the whole set.
Noise, t, guidance scale and the prompt act as in a learned model; with one object the SDS gradient is the weighted
L2 fit  w(t) sqrt(abar / (1 - abar)) (x0 - x_k).

It is the text-driven prior that runs on any machine ("a red torus" -> a red torus), the embedded default, and the
yardstick of the pipeline: its targets are known, so geometry can be scored exactly.

Built-in objects (shared/meshes.py builders, default parameters; all centred at the origin, +Z up, within radius 0.5):

| name | aliases | shape | colour (RGB) |
|---|---|---|---|
| red torus | torus, donut, doughnut, ring | torus(major 0.32, minor 0.12, 32 x 16 segments): non-convex | (0.85, 0.15, 0.12) |
| blue sphere | sphere, ball, orb | uv_sphere(radius 0.4, 32 x 16 segments) | (0.15, 0.3, 0.85) |
| green cube | cube, box, block | box(edge 0.55) | (0.2, 0.7, 0.25) |
| yellow cone | cone | cone(radius 0.35, height 0.7, 32 segments) | (0.9, 0.8, 0.15) |
| purple cylinder | cylinder, can, tube | cylinder(radius 0.3, height 0.7, 32 segments) | (0.55, 0.25, 0.7) |

User meshes join the set with `add_object` (service config: `analytic.meshes`).
The negative prompt is ignored by this prior: its unconditional branch is always the whole set.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from services.guidance.priors.base import Conditioning, DiffusionPrior, PriorInfo, PriorKind, ViewCondition, Weighting
from shared import meshes
from shared.cameras import Camera
from shared.errors import InvalidArgument
from shared.rasterize import make_rasterizer
from shared.rasterize.base import Rasterizer
from shared.render import render_mesh

MAX_PROMPT_WORDS = 77
_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class ReferenceObject:
    name: str
    mesh: meshes.Mesh
    color: tuple[float, float, float]
    aliases: tuple[str, ...] = ()

    def match_score(self, words: set[str]) -> int:
        """Number of words of the best name/alias wholly contained in the prompt (0: no match)."""
        best = 0
        for phrase in (self.name, *self.aliases):
            phrase_words = _WORD.findall(phrase.lower())
            if phrase_words and all(w in words for w in phrase_words):
                best = max(best, len(phrase_words))
        return best


def builtin_objects() -> list[ReferenceObject]:
    return [
        # Tessellations are modest on purpose: every SDS call renders the whole set at the request's cameras.
        ReferenceObject(
            "red torus", meshes.torus(segments=32, minor_segments=16), (0.85, 0.15, 0.12),
            ("torus", "donut", "doughnut", "ring"),
        ),
        ReferenceObject(
            "blue sphere", meshes.uv_sphere(segments=32, rings=16), (0.15, 0.3, 0.85), ("sphere", "ball", "orb")
        ),
        ReferenceObject("green cube", meshes.box(), (0.2, 0.7, 0.25), ("cube", "box", "block")),
        ReferenceObject("yellow cone", meshes.cone(segments=32), (0.9, 0.8, 0.15), ("cone",)),
        ReferenceObject(
            "purple cylinder", meshes.cylinder(segments=32), (0.55, 0.25, 0.7), ("cylinder", "can", "tube")
        ),
    ]


def load_mesh_object(
    name: str, path: str | Path, color: tuple[float, float, float] = (0.8, 0.8, 0.8), aliases: tuple[str, ...] = ()
) -> ReferenceObject:
    """A user mesh (GLB/OBJ/PLY), normalised into the radius-0.5 sphere like the built-ins."""
    return ReferenceObject(name, meshes.load_mesh(path), tuple(color), tuple(aliases))


def posterior_mean(noisy: torch.Tensor, renders: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t] for each image under a uniform mixture of its K renders.

    noisy (B, C, H, W); renders (B, K, C, H, W); alpha_bar (B,). Computed in float64 with log-sum-exp.
    """
    weights = posterior_weights(noisy, renders, alpha_bar)
    return (weights[:, :, None, None, None] * renders.double()).sum(dim=1).to(noisy.dtype)


def posterior_weights(noisy: torch.Tensor, renders: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """softmax_k(-||x_t - sqrt(abar) x_k||^2 / (2 (1 - abar))), shape (B, K)."""
    a = alpha_bar.double()[:, None]
    distance = (noisy.double()[:, None] - a.sqrt()[..., None, None, None] * renders.double()).pow(2).flatten(2).sum(-1)
    return torch.softmax(-distance / (2 * (1 - a)), dim=1)


class AnalyticPrior(DiffusionPrior):
    def __init__(
        self,
        name: str = "analytic",
        objects: list[ReferenceObject] | None = None,
        resolution: int = 64,
        # s = 7.5 (our convention eps_u + s (eps_c - eps_u)): strong enough that the named object wins over
        # the rest of the set even at high noise, mild enough that the gradient stays close to an L2 fit.
        guidance_scale: float = 7.5,
        time_range: tuple[float, float] = (0.02, 0.98),
        weighting: Weighting = Weighting.SDS,
        max_batch_size: int = 8,
        rasterizer: Rasterizer | None = None,
        num_train_timesteps: int = 1000,
    ) -> None:
        self.objects = list(builtin_objects() if objects is None else objects)
        self.rasterizer = rasterizer or make_rasterizer("torch")
        self.info = PriorInfo(
            name=name,
            kind=PriorKind.ANALYTIC,
            native_resolution=resolution,
            max_prompt_tokens=MAX_PROMPT_WORDS,
            accepted_conditioning=(Conditioning.TEXT, Conditioning.CAMERA),
            default_guidance_scale=guidance_scale,
            default_time_range=tuple(time_range),
            default_weighting=weighting,
            max_batch_size=max_batch_size,
            requires_cameras=True,
        )
        # Stable Diffusion's scaled-linear schedule (beta 0.00085 .. 0.012 over 1000 steps), so t means the same
        # noise level here as in the latent prior.
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        self._alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()
        self._lock = threading.Lock()

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    def add_object(self, obj: ReferenceObject) -> None:
        with self._lock:
            if any(o.name == obj.name for o in self.objects):
                raise ValueError(f"an object named {obj.name!r} is already in the set")
            self.objects.append(obj)

    # -- prompts ------------------------------------------------------------------------------------------------

    def named_objects(self, prompt: str) -> list[int]:
        """Indices of the objects the prompt names best (most words matched); empty if it names none."""
        words = set(_WORD.findall(prompt.lower()))
        scores = [obj.match_score(words) for obj in self.objects]
        best = max(scores, default=0)
        return [i for i, s in enumerate(scores) if s == best] if best > 0 else []

    def validate_prompt(self, prompt: str, field: str) -> None:
        words = _WORD.findall(prompt.lower())
        if not words:
            raise InvalidArgument("prompt is empty", field)
        if len(words) > MAX_PROMPT_WORDS:
            raise InvalidArgument(f"prompt has {len(words)} words, over the limit of {MAX_PROMPT_WORDS}", field)
        if field == "prompt" and not self.named_objects(prompt):
            known = ", ".join(o.name for o in self.objects)
            raise InvalidArgument(f"prompt names no object of the analytic prior's set; known: {known}", field)

    # -- the denoiser -------------------------------------------------------------------------------------------

    def encode(self, images: torch.Tensor, conditions: list[ViewCondition]) -> torch.Tensor:
        size = self.info.native_resolution
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return images * 2 - 1

    def render_set(self, cameras: list[Camera], objects: list[ReferenceObject] | None = None) -> torch.Tensor:
        """Every object of the set at every camera (its shading, light, background): (B, K, 3, R, R) in [-1, 1].

        One rasteriser call per object covers all cameras of the batch.
        """
        size = self.info.native_resolution
        objects = self.objects if objects is None else objects
        renders = [render_mesh(o.mesh, cameras, self.rasterizer, albedo=o.color, resolution=size) for o in objects]
        return torch.stack(renders, dim=1) * 2 - 1

    def predict_noise(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, conditions: list[ViewCondition]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if any(c.camera is None for c in conditions):
            raise InvalidArgument("the analytic prior needs one camera per image", "cameras")
        with self._lock:
            objects = list(self.objects)
        renders = self.render_set([c.camera for c in conditions], objects).to(noisy)  # (B, K, 3, R, R)
        alpha_bar = self.alphas_cumprod[timesteps.cpu()].to(noisy)
        eps_cond, eps_uncond = [], []
        for i, condition in enumerate(conditions):
            named = self.named_objects(condition.prompt) or list(range(len(objects)))
            a = alpha_bar[i : i + 1]
            x_t = noisy[i : i + 1]
            x0_cond = posterior_mean(x_t, renders[i : i + 1, named], a)
            x0_uncond = posterior_mean(x_t, renders[i : i + 1], a)
            scale_x0, scale_eps = a.sqrt().reshape(1, 1, 1, 1), (1 - a).sqrt().reshape(1, 1, 1, 1)
            eps_cond.append((x_t - scale_x0 * x0_cond) / scale_eps)
            eps_uncond.append((x_t - scale_x0 * x0_uncond) / scale_eps)
        return torch.cat(eps_cond), torch.cat(eps_uncond)
