"""Typed stage configuration, validated at the edge (pydantic). Schedules are data (shared.schedules.Schedule).

Torch-free (so are the modules it imports): the orchestrator validates jobs with these classes without torch."""

from __future__ import annotations

from typing import Callable, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.scene.field_config import FieldConfig, HashGridConfig, OccupancyConfig, RendererConfig
from shared.camera_ranges import CameraRanges
from shared.schedules import Schedule
from shared.guidance_types import Weighting


class PriorTerm(BaseModel):
    """One prior guiding a step; the step's image gradient is the weighted sum over terms."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prior: str = Field(min_length=1)
    weight: float = 1.0
    checkpoint_id: str = ""
    guidance_scale: float | None = Field(default=None, ge=0)
    weighting: Weighting | None = None
    # This prior's own diffusion-time range (Magic123 gives its 2D and 3D priors different ones); None: the stage's.
    t_min: Schedule | None = None
    t_max: Schedule | None = None
    # What conditions it: the stage's prompt ("text"), its reference image ("image"), or, "unspecified", the
    # prior's kind (image for a prior that accepts an image but no text, text otherwise).
    input: Literal["unspecified", "text", "image"] = "unspecified"
    learned_embeddings: tuple[str, ...] = ()


class ReferenceCamera(BaseModel):
    """The reference view's camera (scene.proto ReferenceView.camera), torch-free; its resolution is the image's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    camera_to_world: tuple[float, ...] = Field(min_length=16, max_length=16)  # 4x4 row-major
    fovy_deg: float = Field(gt=0, lt=180)
    elevation_deg: float = 0.0
    azimuth_deg: float = 0.0
    distance: float = 0.0


class ReferenceConfig(BaseModel):
    """An image-to-3D stage's reference view (Magic123): the input image (square, RGBA uint8, alpha = foreground),
    optionally a depth map, and the camera it is seen from. The pixels live in the config (base64 in JSON) so that a
    checkpoint, which stores its stage's config, resumes with them."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    camera: ReferenceCamera
    resolution: int = Field(ge=16, le=2048)  # side S of the image
    image: bytes  # (S, S, 4) uint8, row 0 = top
    depth: bytes | None = None  # (S, S) float32 little-endian, any affine scale
    # Render the reference view every this many steps (0 or 1: every step).
    every_steps: int = Field(default=0, ge=0)
    # Pixels the mask is eroded by before the losses.
    mask_erode_px: int = Field(default=0, ge=0, le=64)

    @model_validator(mode="after")
    def _sizes(self) -> "ReferenceConfig":
        side = self.resolution
        if len(self.image) != side * side * 4:
            raise ValueError(f"image: needs {side}x{side}x4 bytes, got {len(self.image)}")
        if self.depth is not None and len(self.depth) != side * side * 4:
            raise ValueError(f"depth: needs {side}x{side} float32, got {len(self.depth)} bytes")
        return self

    def rgba(self) -> np.ndarray:
        return np.frombuffer(self.image, dtype=np.uint8).reshape(self.resolution, self.resolution, 4)

    def depth_map(self) -> np.ndarray | None:
        if self.depth is None:
            return None
        return np.frombuffer(self.depth, dtype="<f4").reshape(self.resolution, self.resolution)

    def due(self, step: int) -> bool:
        """Whether step `step` (0-based) renders the reference view: the k-th, 2k-th, ... steps, so that progress
        reported every few steps (after step k * n) carries the reference losses."""
        return self.every_steps <= 1 or (step + 1) % self.every_steps == 0


def _reference_loss_weights() -> dict[str, Schedule]:
    # The reference view's losses (used only when the stage has a reference view): threestudio's Magic123 port,
    # rgb 10000 and mask 1000, kept as they are because the normalisation is the same: there the SDS loss is
    # 0.5 * sum((x - target)^2) / B, gradient w (eps_hat - eps) / B, as the surrogate here (sum(images * grad) / B,
    # through the encoder for latent priors), and the reference losses are means over pixels in both. Depth: 0.
    return {
        "ref_rgb": Schedule.constant(10000.0),
        "ref_mask": Schedule.constant(1000.0),
        "ref_depth": Schedule.constant(0.0),
    }


REFERENCE_LOSSES = tuple(_reference_loss_weights())


def _default_loss_weights() -> dict[str, Schedule]:
    # threestudio's Magic3D coarse config: orientation ramped 10 -> 1000 over 5k steps, sparsity 1, opaque 0.
    return {
        "sds": Schedule.constant(1.0),
        "orientation": Schedule.linear(0, 10.0, 5000, 1000.0),
        "sparsity": Schedule.constant(1.0),
        "opacity_entropy": Schedule.constant(0.0),
        "distortion": Schedule.constant(0.0),  # Mip-NeRF 360's; not in threestudio's Magic3D configs
    } | _reference_loss_weights()


KNOWN_LOSSES = tuple(_default_loss_weights())


# The sides a resolution schedule may name (the stages' own `resolution` bounds; SceneLimits.max_resolution applies
# at the edge as well).
MIN_RENDER_SIDE, MAX_RENDER_SIDE = 16, 2048


class GuidedStageConfig(BaseModel):
    """What every SDS-guided stage configures: prompts, priors, the t range over steps, loss weights, the seed and
    when to give up. Subclasses declare `priors`, `t_max` and `loss_weights` with their own defaults, and name
    their loss terms' defaults in `default_loss_weights` (requests may override any of them, and only them)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    default_loss_weights: ClassVar[Callable[[], dict[str, Schedule]]]

    # May be empty only where nothing needs it: every prior image-conditioned, or a reference view (`_prompt`).
    prompt: str = ""
    negative_prompt: str = ""
    view_dependent_prompt: bool = True
    batch_size: int = Field(default=4, ge=1, le=64)
    cameras: CameraRanges = CameraRanges()
    t_min: Schedule = Schedule.constant(0.02)
    seed: int = Field(default=0, ge=0)
    # Steps in a row with NaN/Inf losses or gradients after which the scene fails (keeping its last checkpoint).
    max_nonfinite_steps: int = Field(default=5, ge=1)
    guidance_timeout_s: float = Field(default=60.0, gt=0)
    # Precision of the images sent to the guidance tier and of the gradients it returns. float16 halves the bytes
    # (a 4 x 512x512 fine-stage batch: 12 MiB each way in float32), which is what the gRPC hop costs; priors compute
    # in their own dtype either way. "auto": float16 when the scene renders on a GPU, float32 on CPU (where runs
    # stay bit-for-bit reproducible and the bytes matter less than the host's float16 conversions).
    guidance_transfer_dtype: Literal["auto", "float32", "float16"] = "auto"
    # What a latent prior that publishes its encoder (PriorInfo.latent_encoder) is sent. "latents": the scene runs
    # that encoder itself (forward and backward) and sends 4 x 4 x 64 x 64 latents instead of 4 x 3 x 512 x 512
    # images, 1/48 of the bytes each way; the encoder's weights must be loadable here from the published source.
    # "images": always images. "auto": latents on a GPU scene, falling back to images (with a warning) where the
    # encoder cannot be loaded; images on CPU, where the encoder costs the same on either side of the wire.
    guidance_input: Literal["auto", "images", "latents"] = "auto"
    # torch.compile of that encoder where the scene runs it. "auto": on CUDA (forward + backward 56 -> 43 ms at
    # 4 x 512x512 on an H200, for about 50 s of compilation at the stage's first step with a cold inductor cache).
    latent_encoder_compile: Literal["auto", "on", "off"] = "auto"
    # One-step-stale SDS (services/scene/pipeline.py): the next step is rendered while this step's guidance runs,
    # and this step's backward and optimiser step run while the next step's guidance does, so the scene's work
    # overlaps the prior's instead of alternating with it. The update at step k uses the gradient taken at the
    # parameters of step k-1 (one update stale; the first step after a start or resume is not stale).
    pipelined_guidance: bool = False
    # The image-to-3D reference view (Magic123); None for text jobs.
    reference: ReferenceConfig | None = None
    # Progressive resolution (Magic3D / threestudio's `resolution_milestones`): the side training views are drawn
    # and rendered at, per step, read piecewise-constant (`Schedule.held`: each knot's side holds until the next
    # knot). None: `resolution` at every step. Previews and the reference view keep their own sizes.
    resolution_schedule: Schedule | None = None

    @field_validator("resolution_schedule")
    @classmethod
    def _resolution_sides(cls, schedule: Schedule | None) -> Schedule | None:
        if schedule is None:
            return None
        for value in schedule.values:
            if value != int(value) or not MIN_RENDER_SIDE <= value <= MAX_RENDER_SIDE:
                raise ValueError(f"values must be whole pixel sides in [{MIN_RENDER_SIDE}, {MAX_RENDER_SIDE}], "
                                 f"got {value}")
        if schedule.steps[0] < 0:
            raise ValueError(f"steps must be >= 0, got {list(schedule.steps)}")
        return schedule

    def render_resolution(self, step: int) -> int:
        """The side training views are rendered at on step `step` (0-based)."""
        if self.resolution_schedule is None:
            return int(getattr(self, "resolution"))
        return int(self.resolution_schedule.held(step))

    @model_validator(mode="after")
    def _prompt(self) -> "GuidedStageConfig":
        if not self.prompt.strip() and self.needs_prompt():
            raise ValueError("a prompt is required unless every prior takes the image (input image) or the stage "
                             "has a reference view")
        return self

    def needs_prompt(self) -> bool:
        """Whether an empty prompt must be refused: some prior reads the prompt and no image stands in for it."""
        priors = getattr(self, "priors", ())
        return self.reference is None and not all(term.input == "image" for term in priors)

    @field_validator("loss_weights", check_fields=False)
    @classmethod
    def _known_losses(cls, weights: dict[str, Schedule]) -> dict[str, Schedule]:
        defaults = cls.default_loss_weights()
        unknown = sorted(set(weights) - set(defaults))
        if unknown:
            raise ValueError(f"unknown loss terms {unknown}; known: {list(defaults)}")
        return {**defaults, **weights}

    @field_validator("priors", check_fields=False)
    @classmethod
    def _some_prior(cls, priors: tuple[PriorTerm, ...]) -> tuple[PriorTerm, ...]:
        if not priors:
            raise ValueError("at least one prior must guide the stage")
        return priors

    def weight(self, loss: str, step: int) -> float:
        return self.loss_weights[loss](step)


class CoarseConfig(GuidedStageConfig):
    """The coarse stage: a hash-grid neural field, volume rendered at low resolution, optimised by SDS."""

    default_loss_weights: ClassVar[Callable[[], dict[str, Schedule]]] = staticmethod(_default_loss_weights)

    priors: tuple[PriorTerm, ...] = (PriorTerm(prior="analytic"),)
    resolution: int = Field(default=64, ge=16, le=1024)
    field: FieldConfig = FieldConfig()
    renderer: RendererConfig = RendererConfig()
    occupancy: OccupancyConfig = OccupancyConfig()
    t_max: Schedule = Schedule.constant(0.98)
    loss_weights: dict[str, Schedule] = Field(default_factory=_default_loss_weights)
    learning_rate: float = Field(default=0.01, gt=0)
    background_learning_rate: float = Field(default=0.001, gt=0)
    # Density level of the extracted surface (the fine stage picks its own level robustly; see issue 4).
    isosurface_level: float = Field(default=10.0, gt=0)

    def hash_table_bytes(self) -> int:
        return self.field.encoding.memory_bytes()


class DMTetConfig(BaseModel):
    """The fine stage's tetrahedral grid and how the coarse field becomes its SDF."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Cells per side of the grid over the scene box (Magic3D / threestudio use 128 on GPU).
    grid_cells: int = Field(default=128, ge=4, le=512)
    # Vertex offsets are bounded to this fraction of a cell (DMTet: 0.5 keeps every tetrahedron valid).
    max_offset_cells: float = Field(default=0.5, ge=0, le=0.5)
    # Density level of the surface; None: chosen from the coarse model's silhouettes (services/scene/mesh/conversion).
    level: float | None = Field(default=None, gt=0)
    level_candidates: int = Field(default=16, ge=2, le=64)
    # More levels tried between the best candidate's neighbours (0: none), and how far below the best silhouette
    # IoU the chosen level may score if it is higher (a thinner surface; see services/scene/mesh/conversion).
    level_refinements: int = Field(default=6, ge=0, le=64)
    level_tolerance: float = Field(default=0.02, ge=0, le=1)
    level_views: int = Field(default=8, ge=1, le=64)
    level_view_resolution: int = Field(default=64, ge=16, le=512)
    # Inside components smaller than this fraction of the largest one are removed at conversion.
    min_component_fraction: float = Field(default=0.05, ge=0, le=1)
    # Recovery from a vanished mesh (the SDF on one side of zero everywhere, so marching tetrahedra give no faces):
    # every `recovery_snapshot_every` steps a step whose mesh has faces keeps a copy of the SDF, the offsets and
    # their Adam state in memory; a vanish (found right after the update that made it, or at a render) restores it
    # and halves the SDF and offset learning rates, at most `vanish_recoveries` times a job (0: a vanish fails the
    # job at once, as before).
    recovery_snapshot_every: int = Field(default=50, ge=1)
    vanish_recoveries: int = Field(default=2, ge=0, le=32)


def _default_fine_loss_weights() -> dict[str, Schedule]:
    return {
        "sds": Schedule.constant(1.0),
        "normal_consistency": Schedule.constant(1000.0),
        "laplacian": Schedule.constant(0.0),
    } | _reference_loss_weights()


FINE_LOSSES = tuple(_default_fine_loss_weights())


# shared.rasterize.RASTERIZERS' kinds and "auto", spelled out because this module stays torch-free (the orchestrator
# validates presets with it); tests/test_components.py keeps the two in step.
RASTERIZER_NAMES = ("auto", "torch", "nvdiffrast")


class FineConfig(GuidedStageConfig):
    """The fine stage: a DMTet mesh from the coarse field, rasterised at high resolution, optimised by SDS from a
    latent prior (Magic3D defaults: 512x512, batch 4, t in [0.02, 0.5], weighting 1 - abar)."""

    default_loss_weights: ClassVar[Callable[[], dict[str, Schedule]]] = staticmethod(_default_fine_loss_weights)

    priors: tuple[PriorTerm, ...] = (PriorTerm(prior="latent", weighting=Weighting.SDS),)
    resolution: int = Field(default=512, ge=16, le=2048)
    dmtet: DMTetConfig = DMTetConfig()
    # "auto": nvdiffrast on CUDA devices, the pure-PyTorch rasteriser elsewhere.
    rasterizer: str = "auto"
    # Blend silhouette edges (nvdiffrast's `antialias`; the pure-PyTorch rasteriser's contour antialiasing): the
    # silhouette (visibility) gradients that move outlines.
    antialias: bool = True
    t_max: Schedule = Schedule.constant(0.5)
    loss_weights: dict[str, Schedule] = Field(default_factory=_default_fine_loss_weights)
    # Adam step sizes: SDF values and bounded offsets in world units per step, the colour field as in the coarse
    # stage (threestudio's Magic3D refine configs use 0.01 for the texture's hash grid).
    sdf_learning_rate: float = Field(default=1e-3, gt=0)
    deformation_learning_rate: float = Field(default=1e-2, gt=0)
    texture_learning_rate: float = Field(default=1e-2, gt=0)
    background_learning_rate: float = Field(default=1e-3, gt=0)
    # The colour field's architecture: copied from the coarse checkpoint at conversion.
    field: FieldConfig = FieldConfig()

    @field_validator("rasterizer")
    @classmethod
    def _known_rasterizer(cls, name: str) -> str:
        if name not in RASTERIZER_NAMES:
            raise ValueError(f"unknown rasterizer {name!r}; known: {', '.join(RASTERIZER_NAMES)}")
        return name


__all__ = ["GuidedStageConfig", "ReferenceConfig", "ReferenceCamera", "REFERENCE_LOSSES", "CoarseConfig", "DMTetConfig", "FineConfig", "RASTERIZER_NAMES", "PriorTerm", "HashGridConfig", "KNOWN_LOSSES", "FINE_LOSSES"]
