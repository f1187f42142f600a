"""The analytic prior: the exact (Bayes-optimal) denoiser of a finite set of reference objects. No weights.

Model. For a camera c, each reference object k renders to an image x_k(c) in [-1, 1] (the camera's shading,
light and background, at `resolution`). The "data distribution" at that view is uniform over {x_k(c)}, so
for x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps the posterior over objects and the optimal denoiser are

    log w_k = -||x_t - sqrt(abar_t) x_k||^2 / (2 (1 - abar_t))      (softmax over the object set)
    x0_hat  = sum_k w_k x_k
    eps_hat = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)

computed in float64 with a log-sum-exp softmax. The conditional branch uses the objects the prompt names; the
unconditional branch uses the objects the negative prompt names (the uncond branch *is* the negative-prompt
branch, per `DiffusionPrior.predict_noise`, so guidance pushes away from them), or the whole set when the
negative prompt is empty or names nothing. With a one-object set the SDS gradient in model space is exactly
w(t) sqrt(abar_t) / sqrt(1 - abar_t) (z0 - x_k): a weighted L2 fit to that object's render.

Built-in objects (`builtin_objects()`, meshes from `shared.meshes`, all inside a radius-0.5 sphere, Z up;
tessellations are modest on purpose, as every SDS call at a new camera renders the whole set):

| name            | aliases                      | mesh                                                    | colour (RGB)        |
|-----------------|------------------------------|---------------------------------------------------------|---------------------|
| red torus       | torus, donut, doughnut, ring | torus(major 0.32, minor 0.12, 32 x 16 segments)         | (0.85, 0.15, 0.12)  |
| blue sphere     | sphere, ball, orb            | uv_sphere(radius 0.4, 32 segments x 16 rings)           | (0.15, 0.30, 0.85)  |
| green cube      | cube, box, block             | box(edge 0.55)                                          | (0.20, 0.70, 0.25)  |
| yellow cone     | cone                         | cone(radius 0.35, height 0.7, 32 segments)              | (0.90, 0.80, 0.15)  |
| purple cylinder | cylinder, tube               | cylinder(radius 0.3, height 0.7, 32 segments)           | (0.55, 0.25, 0.70)  |

The torus is the non-convex one (a hole seen from above). ("can" is deliberately not an alias: it is a common English word.) User meshes join the set with `add_object`
and `load_mesh_object` (service config: `analytic.meshes`).

Image conditioning (Magic123's reference image, `ViewCondition.image`): the conditional branch's object set becomes
the posterior over the objects given that image, p(k | image) = softmax_k(-d_k / IMAGE_TEMPERATURE), where d_k is
the mean squared difference between the image and object k rendered at the reference camera, over premultiplied
RGB and alpha (colour counts on the foreground, the mask everywhere), both recentred first the way the orchestrator
recentres an input (bounding box's longer side 0.8 of the frame, so that the photo's framing does not matter) and
compared at the prior's resolution. Those weights replace the prompt's uniform set: the conditional posterior at
x_t is softmax_k(log p(x_t | k) + log p(k | image)). A prompt given as well restricts the set to the objects it
names (the image weighs them); a prompt (or a view suffix alone) naming nothing leaves the image's weights over the
whole set. An empty prompt is accepted when the image is there (image-only requests).

Prompt matching: lower-case, split into words ([a-z0-9]+); each word of the prompt also stands for the singulars
it may be the plural of (`singular_forms`: "rings" -> "ring", "boxes" -> "box", "cherries" -> "cherry"), so names
and aliases are written in the singular. An object matches if every word of its name, or of one of its aliases,
is a word of the prompt; its matched phrase is the longest such phrase. Objects whose matched phrase is
contained in another object's matched phrase are dropped ("a red torus" prefers "red torus" over a "blue torus"
that only matches by its alias "torus"); objects matched by the same phrase (two objects sharing an alias) form
one conditional set. View suffixes (", front view") simply match nothing.

A positive prompt naming several objects by different phrases ("a red torus and a blue sphere") is refused
(INVALID_ARGUMENT on the prompt, naming the objects): this prior reproduces one object of its set, and
composing several (placing them as the prompt says) is not something it models, so it says so rather than
silently keeping one. Negative prompts may name any number of objects (the unconditional branch is their set).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from services.guidance.cache import LruCache
from services.guidance.priors.base import DiffusionPrior, ViewCondition
from shared import meshes
from shared.cameras import Camera, Shading
from shared.devices import resolve_device
from shared.errors import FailedPrecondition, InvalidArgument
from shared.guidance_api import Conditioning, ImageCondition, PriorInfo, PriorKind, Weighting
from shared.meshes import Mesh
from shared.rasterize import Rasterizer, make_rasterizer
from shared.render import background_images, render_mesh

MAX_PROMPT_WORDS = 77
# Softmax temperature of the image posterior, in units of the mean squared RGBA difference (values in [0, 1]).
# Two different built-in objects differ by about 0.02 or more at 64x64, so a matching render wins by e^10.
IMAGE_TEMPERATURE = 0.002
IMAGE_FOREGROUND_FRACTION = 0.8
_WORD = re.compile(r"[a-z0-9]+")


def singular_forms(word: str) -> set[str]:
    """The word and the singulars it may be the plural of (plain English rules: -s, -es, -ies -> -y), e.g.
    "rings" -> {rings, ring}, "boxes" -> {boxes, boxe, box}, "cherries" -> {..., cherry}. Over-generating is
    harmless: a form only counts where an object's name or alias has that very word."""
    forms = {word}
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        forms.add(word[:-1])
        if word.endswith("es"):
            forms.add(word[:-2])
        if word.endswith("ies"):
            forms.add(word[:-3] + "y")
    return forms


def prompt_words(text: str) -> list[str]:
    """Lower-cased words of a prompt; punctuation separates words."""
    return _WORD.findall(text.lower())


def matchable_words(text: str) -> list[set[str]]:
    """Per word of the prompt, the forms it may stand for (`singular_forms`): what object names are matched against."""
    return [singular_forms(word) for word in prompt_words(text)]


@dataclass(frozen=True, eq=False)
class ReferenceObject:
    """A named object of the analytic prior's set. `color` is its albedo; None uses the mesh's vertex colours."""

    name: str
    mesh: Mesh
    color: tuple[float, float, float] | None = (0.8, 0.8, 0.8)
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not prompt_words(self.name):
            raise ValueError(f"object name {self.name!r} has no words")
        object.__setattr__(self, "aliases", tuple(a for a in self.aliases if prompt_words(a)))

    @property
    def phrases(self) -> tuple[tuple[str, ...], ...]:
        return tuple(tuple(prompt_words(p)) for p in (self.name, *self.aliases))

    def match_score(self, words: list[set[str]]) -> int:
        """Prompt words covered by the longest phrase (name or alias) that matches; 0 if none."""
        return len(self.matched_phrase(words))

    def matched_phrase(self, words: list[set[str]]) -> frozenset[int]:
        """The positions of the prompt words (each given as its `singular_forms`) that the best matching phrase
        covers: a phrase matches when each of its words is a form of some prompt word. Positions, not words, so
        that "ring" (from "rings") counts as inside "fidelity rings". Empty if no phrase matches."""
        best: frozenset[int] = frozenset()
        for phrase in self.phrases:
            covered = [frozenset(i for i, forms in enumerate(words) if word in forms) for word in phrase]
            if all(covered):
                positions = frozenset().union(*covered)
                if len(positions) > len(best):
                    best = positions
        return best


def builtin_objects() -> list[ReferenceObject]:
    """The five built-in objects (see the module docstring for their parameters)."""
    return [
        ReferenceObject(
            "red torus", meshes.torus(0.32, 0.12, segments=32, minor_segments=16), (0.85, 0.15, 0.12),
            ("torus", "donut", "doughnut", "ring"),
        ),
        ReferenceObject(
            "blue sphere", meshes.uv_sphere(0.4, segments=32, rings=16), (0.15, 0.30, 0.85), ("sphere", "ball", "orb")
        ),
        ReferenceObject("green cube", meshes.box(0.55), (0.20, 0.70, 0.25), ("cube", "box", "block")),
        ReferenceObject("yellow cone", meshes.cone(0.35, 0.7, segments=32), (0.90, 0.80, 0.15), ("cone",)),
        ReferenceObject(
            "purple cylinder", meshes.cylinder(0.3, 0.7, segments=32), (0.55, 0.25, 0.70), ("cylinder", "tube")
        ),
    ]


def load_mesh_object(
    name: str,
    path: str | Path,
    color: tuple[float, float, float] | None = None,
    aliases: tuple[str, ...] = (),
    up: str = "auto",
) -> ReferenceObject:
    """A reference object from a mesh file (GLB/OBJ/PLY via `shared.meshes.load_mesh`, normalised to radius 0.5).

    color None uses the file's own colours when it has them (vertex colours, glTF COLOR_0, or its texture sampled
    at the vertices), else light grey (0.8, 0.8, 0.8). `up`: the file's up axis ("auto", "+y", "+z"; see
    `load_mesh`).
    """
    mesh = meshes.load_mesh(path, up_axis=up)
    if color is None and mesh.vertex_colors is None:
        color = (0.8, 0.8, 0.8)
    return ReferenceObject(name, mesh, None if color is None else tuple(float(c) for c in color), tuple(aliases))


def named_groups(prompt: str, objects: list[ReferenceObject]) -> list[list[int]]:
    """The objects a prompt names, grouped by the phrase that names them: one group per distinct phrase that is
    not contained in another matched phrase (see the module docstring). Empty when it names none."""
    words = matchable_words(prompt)
    phrases = [obj.matched_phrase(words) for obj in objects]
    kept = {p for p in phrases if p and not any(p < other for other in phrases)}
    ordered = sorted(kept, key=lambda p: min(i for i, q in enumerate(phrases) if q == p))
    return [[i for i, q in enumerate(phrases) if q == p] for p in ordered]


def match_objects(prompt: str, objects: list[ReferenceObject]) -> list[int]:
    """Indices of every object the prompt names (all groups of `named_groups`; empty when it names none)."""
    return sorted(i for group in named_groups(prompt, objects) for i in group)


def check_one_object(prompt: str, objects: list[ReferenceObject], field: str) -> list[int]:
    """The one object (or set of objects sharing the phrase) a positive prompt names; InvalidArgument on `field`
    when it names none or several different ones."""
    groups = named_groups(prompt, objects)
    if not groups:
        known = "; ".join(obj.name + (f" ({', '.join(obj.aliases)})" if obj.aliases else "") for obj in objects)
        raise InvalidArgument(f"names no object of the analytic prior's set; known: {known}", field)
    if len(groups) > 1:
        named = ", ".join(repr(objects[group[0]].name) for group in groups)
        raise InvalidArgument(
            f"names several objects ({named}); the analytic prior makes one object per job: name one", field
        )
    return groups[0]


def scaled_linear_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """Stable Diffusion's 'scaled_linear' DDPM schedule: betas = linspace(sqrt(b0), sqrt(b1), T)^2.

    Chosen so that a time fraction t means the same noise level here as in the latent (SD) prior.
    """
    betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def posterior_weights(
    noisy: torch.Tensor,
    renders: torch.Tensor,
    alpha_bar: torch.Tensor,
    member: torch.Tensor | None = None,
    log_prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """Posterior over objects, softmax_k(-||x_t - sqrt(abar) x_k||^2 / (2 (1 - abar)) + log_prior_k): (B, K) float64.

    noisy (B, C, H, W) x_t; renders (B, K, C, H, W) the objects' images x_k in model space; alpha_bar (B,);
    member (B, K) bool restricts each row to an object set (None: all K). Every row needs a member.
    log_prior (B, K): log weights of the objects (e.g. given a reference image); None: uniform.
    """
    x_t = noisy.double()[:, None]
    a = alpha_bar.double().reshape(-1, 1)
    sq_dist = (x_t - a.sqrt()[..., None, None, None] * renders.double()).pow(2).flatten(2).sum(-1)  # (B, K)
    log_w = -sq_dist / (2.0 * (1.0 - a))
    if log_prior is not None:
        log_w = log_w + log_prior.double().to(log_w.device)
    if member is not None:
        log_w = log_w.masked_fill(~member.to(log_w.device, torch.bool), float("-inf"))
    weights = (log_w - log_w.amax(dim=1, keepdim=True)).exp()  # log-sum-exp stable softmax
    return weights / weights.sum(dim=1, keepdim=True)


def posterior_mean(
    noisy: torch.Tensor,
    renders: torch.Tensor,
    alpha_bar: torch.Tensor,
    member: torch.Tensor | None = None,
    log_prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """E[x0 | x_t] = sum_k w_k x_k over the object set, (B, C, H, W) float64."""
    weights = posterior_weights(noisy, renders, alpha_bar, member, log_prior)
    return (weights[..., None, None, None] * renders.double()).sum(dim=1)


def posterior_eps(
    noisy: torch.Tensor,
    renders: torch.Tensor,
    alpha_bar: torch.Tensor,
    member: torch.Tensor | None = None,
    log_prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """The optimal denoiser's noise prediction (x_t - sqrt(abar) E[x0 | x_t]) / sqrt(1 - abar), float64."""
    x0_hat = posterior_mean(noisy, renders, alpha_bar, member, log_prior)
    a = alpha_bar.double().reshape(-1, 1, 1, 1)
    return (noisy.double() - a.sqrt() * x0_hat) / (1.0 - a).sqrt()


class AnalyticPrior(DiffusionPrior):
    """Exact diffusion prior over a finite set of reference objects, rendered at each request's camera."""

    def __init__(
        self,
        name: str = "analytic",
        objects: list[ReferenceObject] | None = None,
        resolution: int = 64,
        # Our CFG convention: s = 1 is the purely conditional model, which for this prior is already an exact
        # L2 pull towards the named object. s > 1 adds (s - 1) times a push away from whatever the
        # unconditional posterior currently sees, which gets an image out of another object's basin quickly;
        # once the image looks like the target both branches agree and the push vanishes (it lingers only at
        # the largest t, where the posterior is soft). 7.5, the usual sampling value, does that without the
        # saturation that DreamFusion-style scales (~100) cause here.
        guidance_scale: float = 7.5,
        time_range: tuple[float, float] = (0.02, 0.98),
        weighting: Weighting = Weighting.SDS,
        max_batch_size: int = 8,
        rasterizer: Rasterizer | None = None,
        device: str = "cpu",
        num_train_timesteps: int = 1000,
        max_prompt_tokens: int = MAX_PROMPT_WORDS,
        render_cache_size: int = 256,
    ) -> None:
        self.objects: list[ReferenceObject] = list(builtin_objects() if objects is None else objects)
        if not self.objects:
            raise ValueError("the analytic prior needs at least one object")
        names = [obj.name.lower() for obj in self.objects]
        if len(set(names)) != len(names):
            raise ValueError(f"object names must be unique, got {names}")
        if resolution < 8:
            raise ValueError("resolution must be >= 8")
        self.resolution = int(resolution)
        self._device = resolve_device(device)
        self.rasterizer = rasterizer or default_rasterizer(self._device)
        self._device_meshes: dict[int, Mesh] = {}  # id(obj.mesh) -> its copy on the device (filled on first use)
        self._alphas_cumprod = scaled_linear_alphas_cumprod(num_train_timesteps)
        self.info = PriorInfo(
            name=name,
            kind=PriorKind.ANALYTIC,
            native_resolution=self.resolution,
            max_prompt_tokens=max_prompt_tokens,
            accepted_conditioning=(
                Conditioning.TEXT, Conditioning.NEGATIVE_TEXT, Conditioning.CAMERA, Conditioning.IMAGE,
            ),
            default_guidance_scale=guidance_scale,
            default_time_range=tuple(time_range),
            default_weighting=weighting,
            checkpoint_ids=("default",),
            max_batch_size=max_batch_size,
            requires_cameras=True,
        )
        self._lock = threading.Lock()
        # Both filled outside the lock (a render is slow; concurrent misses of one key compute it twice, harmlessly).
        self._renders: LruCache[tuple, torch.Tensor] = LruCache(render_cache_size)  # (object, R, camera) -> (3, R, R)
        self._image_posteriors: LruCache[tuple, torch.Tensor] = LruCache(16)  # (digest, camera, objects) -> (K,)

    # ------------------------------------------------------------------ schedule / objects
    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    @property
    def device(self) -> torch.device:
        return self._device

    def _mesh_on_device(self, mesh: Mesh) -> Mesh:
        """`mesh` on this prior's device (a copy made once per mesh; the mesh itself on the CPU)."""
        if self._device.type == "cpu":
            return mesh
        with self._lock:
            copy = self._device_meshes.get(id(mesh))
        if copy is None:
            colors = None if mesh.vertex_colors is None else mesh.vertex_colors.to(self._device)
            copy = Mesh(mesh.vertices.to(self._device), mesh.faces.to(self._device), colors)
            with self._lock:
                self._device_meshes[id(mesh)] = copy
        return copy

    @property
    def object_names(self) -> list[str]:
        return [obj.name for obj in self.objects]

    def add_object(self, obj: ReferenceObject) -> None:
        """Adds an (e.g. uploaded) object to the set; its name must be new (ValueError otherwise)."""
        with self._lock:
            if obj.name.lower() in (o.name.lower() for o in self.objects):
                raise ValueError(f"an object named {obj.name!r} is already in the set")
            self.objects = [*self.objects, obj]

    def named_objects(self, prompt: str) -> list[int]:
        """Indices of the objects the prompt names (`match_objects`); empty if it names none."""
        return match_objects(prompt, self.objects)

    # ------------------------------------------------------------------ validation
    def count_tokens(self, prompt: str) -> int:
        """Words of the prompt (the unit of this prior's limit)."""
        return len(prompt_words(prompt))

    def validate_prompt(self, prompt: str, field: str) -> None:
        """Empty or over-long prompts are rejected; positive prompts must also name an object of the set.

        Fields containing "negative" are negative prompts: checked for length only (they may name nothing).
        """
        if not prompt or not prompt.strip():
            raise InvalidArgument("must not be empty", field)
        count = self.count_tokens(prompt)
        limit = self.info.max_prompt_tokens
        if count > limit:
            raise InvalidArgument(f"{count} words is over the limit of {limit}", field)
        if "negative" in field:
            return
        with self._lock:
            objects = list(self.objects)
        check_one_object(prompt, objects, field)

    # ------------------------------------------------------------------ model
    def encode(self, images: torch.Tensor, conditions: list[ViewCondition]) -> torch.Tensor:
        """[0, 1] images -> [-1, 1] at resolution x resolution (bilinear, no antialias; differentiable)."""
        size = (self.resolution, self.resolution)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=False)
        return images * 2.0 - 1.0

    def render_set(self, cameras: list[Camera], objects: list[ReferenceObject] | None = None) -> torch.Tensor:
        """Every object at every camera (its shading, light, background): (B, K, 3, R, R) float64 in [-1, 1].

        Renders are cached per (object, camera) in an LRU shared across calls; one rasteriser call per object
        covers all uncached cameras of the batch.
        """
        objects = self.objects if objects is None else objects
        keys = [_camera_key(camera) for camera in cameras]
        size = self.resolution
        out = torch.empty(len(cameras), len(objects), 3, size, size, dtype=torch.float64, device=self._device)
        backgrounds: dict[tuple, torch.Tensor] = {}  # per camera, made once for all objects (see render_mesh)
        for column, obj in enumerate(objects):
            missing: dict[tuple, list[int]] = {}
            for b, key in enumerate(keys):
                cached = self._cache_get((obj.name, id(obj.mesh), size, key))
                if cached is None:
                    missing.setdefault(key, []).append(b)
                else:  # cached as rendered (float32 in [0, 1]): converted exactly like a fresh render
                    out[b, column] = cached.double() * 2.0 - 1.0
            if not missing:
                continue
            views = [cameras[rows[0]] for rows in missing.values()]
            for key, view in zip(missing, views):
                if key not in backgrounds:
                    backgrounds[key] = background_images([view], size, size, self._device)[0]
            with torch.no_grad():
                images = render_mesh(
                    self._mesh_on_device(obj.mesh), views, self.rasterizer, albedo=obj.color, resolution=size,
                    backgrounds=torch.stack([backgrounds[key] for key in missing]),
                )
            for image, (key, rows) in zip(images, missing.items()):
                self._cache_put((obj.name, id(obj.mesh), size, key), image)
                out[rows, column] = image.double() * 2.0 - 1.0
        return out

    def predict_noise(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, conditions: list[ViewCondition]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact eps for the prompt's object set (cond) and the negative prompt's set, else all (uncond)."""
        batch = noisy.shape[0]
        if len(conditions) != batch:
            raise ValueError(f"{len(conditions)} conditions for {batch} images")
        if tuple(noisy.shape[1:]) != (3, self.resolution, self.resolution):
            raise ValueError(f"noisy must be (B, 3, {self.resolution}, {self.resolution}), got {list(noisy.shape)}")
        if any(condition.camera is None for condition in conditions):
            raise InvalidArgument(f"prior {self.info.name!r} needs one camera per image", "cameras")
        with self._lock:
            objects = list(self.objects)
        cond = torch.zeros(batch, len(objects), dtype=torch.bool)
        uncond = torch.zeros(batch, len(objects), dtype=torch.bool)
        log_prior = torch.zeros(batch, len(objects), dtype=torch.float64)  # built on the CPU, moved once below
        for b, condition in enumerate(conditions):
            if condition.image is not None:  # the image weighs the objects; a prompt naming some restricts them
                log_prior[b] = self.image_posterior(condition.image, objects).log()
                named = match_objects(condition.prompt, objects) or list(range(len(objects)))
            else:
                named = check_one_object(condition.prompt, objects, "prompt")
            cond[b, named] = True
            negative = match_objects(condition.negative_prompt, objects) if condition.negative_prompt else []
            uncond[b, negative or list(range(len(objects)))] = True
        renders = self.render_set([condition.camera for condition in conditions], objects)
        alpha_bar = self.alphas_cumprod.double()[timesteps.detach().cpu().long()].to(self._device)
        x_t = noisy.detach().to(self._device)
        cond, uncond, log_prior = (t.to(self._device) for t in (cond, uncond, log_prior))
        eps_cond = posterior_eps(x_t, renders, alpha_bar, cond, log_prior)
        eps_uncond = posterior_eps(x_t, renders, alpha_bar, uncond)
        return eps_cond.to(noisy), eps_uncond.to(noisy)

    def posterior_weights(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, renders: torch.Tensor, member: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, K) float64 posterior over objects for x_t at integer timesteps (see `posterior_weights`)."""
        alpha_bar = self.alphas_cumprod.double()[timesteps.detach().cpu().long()].to(renders.device)
        return posterior_weights(noisy.to(renders.device), renders, alpha_bar, member)

    # ------------------------------------------------------------------ image conditioning
    def image_posterior(self, condition: ImageCondition, objects: list[ReferenceObject] | None = None) -> torch.Tensor:
        """p(k | reference image) over `objects` (default: the set), (K,) float64; cached per image and camera."""
        objects = self.objects if objects is None else objects
        if condition.image is None:  # the engine resolves digest-only requests before a prior sees them
            raise FailedPrecondition("the reference image is not held here: send it", "image_condition.image")
        key = (condition.image_sha256, _camera_key(condition.reference_camera), tuple(id(o) for o in objects))
        with self._lock:
            cached = self._image_posteriors.get(key)
        if cached is not None:
            return cached
        image = condition.image.detach().double().cpu()
        if not torch.isfinite(image).all():
            raise InvalidArgument("contains NaN or Inf", "image_condition.image")
        straight = image[0].clamp(0.0, 1.0)
        target = _recentred(torch.cat([straight[:3] * straight[3:], straight[3:]]), self.resolution)
        renders = torch.stack([_recentred(self._render_rgba(obj, condition.reference_camera), self.resolution)
                               for obj in objects])
        distance = (renders - target).pow(2).flatten(1).mean(dim=1)
        posterior = torch.softmax(-distance / IMAGE_TEMPERATURE, dim=0)
        with self._lock:
            self._image_posteriors.put(key, posterior)
        return posterior

    def _render_rgba(self, obj: ReferenceObject, camera: Camera) -> torch.Tensor:
        """`obj` at `camera` (its shading), (4, R, R) float64: colour over black (premultiplied) and coverage."""
        black = dataclasses.replace(camera, background_color=(0.0, 0.0, 0.0), background_image=None)
        mask_camera = dataclasses.replace(black, shading=Shading.ALBEDO)
        mesh = self._mesh_on_device(obj.mesh)
        with torch.no_grad():
            color = render_mesh(mesh, [black], self.rasterizer, albedo=obj.color, resolution=self.resolution)
            mask = render_mesh(mesh, [mask_camera], self.rasterizer, albedo=(1.0, 1.0, 1.0),
                               resolution=self.resolution)
        return torch.cat([color[0], mask[0, :1]]).double().cpu()  # the image posterior is small: CPU work

    # ------------------------------------------------------------------ render cache
    def _cache_get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            return self._renders.get(key)

    def _cache_put(self, key: tuple, value: torch.Tensor) -> None:
        with self._lock:
            self._renders.put(key, value)


def default_rasterizer(device: torch.device) -> Rasterizer:
    """nvdiffrast on CUDA (the PyTorch rasteriser is slow at 512 pixels), falling back to PyTorch without it."""
    if device.type == "cuda":
        try:
            return make_rasterizer("nvdiffrast")
        except ImportError:
            pass
    return make_rasterizer("torch")


def _recentred(rgba: torch.Tensor, size: int, fraction: float = IMAGE_FOREGROUND_FRACTION) -> torch.Tensor:
    """(4, H, W) premultiplied RGBA -> (4, size, size), its foreground's bounding box scaled to `fraction` of the
    frame and centred (the orchestrator's preprocessing, shared.image_input)."""
    alpha = rgba[3]
    rows, cols = torch.nonzero(alpha > 0.5, as_tuple=True)
    out = torch.zeros(4, size, size, dtype=rgba.dtype)
    if rows.numel() == 0:
        return out
    top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    scale = fraction * size / max(bottom - top, right - left)
    new_h, new_w = max(1, round((bottom - top) * scale)), max(1, round((right - left) * scale))
    crop = rgba[:, top:bottom, left:right][None]
    resized = F.interpolate(crop, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)[0]
    y0, x0 = (size - new_h) // 2, (size - new_w) // 2
    out[:, y0:y0 + new_h, x0:x0 + new_w] = resized
    return out


def _camera_key(camera: Camera) -> tuple:
    """Everything about a camera that changes a render, as a hashable tuple."""
    background = None
    if camera.background_image is not None:
        data = camera.background_image.detach().cpu().contiguous()  # hashed as sent (float16 from a GPU scene)
        background = (tuple(data.shape), str(data.dtype), hashlib.sha1(data.view(torch.uint8).numpy()).hexdigest())
    return (
        tuple(round(v, 6) for v in camera.camera_to_world.detach().reshape(-1).tolist()),
        round(float(camera.fovy_deg), 6),
        round(camera.width / camera.height, 6),
        camera.shading.value,
        camera.light,
        tuple(float(c) for c in camera.background_color),
        background,
    )
