"""Typed stage configuration, validated at the edge (pydantic). Schedules are data (shared.schedules.Schedule).

Torch-free (so are the modules it imports): the orchestrator validates jobs with these classes without torch."""

from __future__ import annotations

from typing import Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


def _default_loss_weights() -> dict[str, Schedule]:
    # threestudio's Magic3D coarse config: orientation ramped 10 -> 1000 over 5k steps, sparsity 1, opaque 0.
    return {
        "sds": Schedule.constant(1.0),
        "orientation": Schedule.linear(0, 10.0, 5000, 1000.0),
        "sparsity": Schedule.constant(1.0),
        "opacity_entropy": Schedule.constant(0.0),
    }


KNOWN_LOSSES = tuple(_default_loss_weights())


class GuidedStageConfig(BaseModel):
    """What every SDS-guided stage configures: prompts, priors, the t range over steps, loss weights, the seed and
    when to give up. Subclasses declare `priors`, `t_max` and `loss_weights` with their own defaults, and name
    their loss terms' defaults in `default_loss_weights` (requests may override any of them, and only them)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    default_loss_weights: ClassVar[Callable[[], dict[str, Schedule]]]

    prompt: str = Field(min_length=1)
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
    level_views: int = Field(default=8, ge=1, le=64)
    level_view_resolution: int = Field(default=64, ge=16, le=512)
    # Inside components smaller than this fraction of the largest one are removed at conversion.
    min_component_fraction: float = Field(default=0.05, ge=0, le=1)


def _default_fine_loss_weights() -> dict[str, Schedule]:
    return {
        "sds": Schedule.constant(1.0),
        "normal_consistency": Schedule.constant(1000.0),
        "laplacian": Schedule.constant(0.0),
    }


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


__all__ = ["GuidedStageConfig", "CoarseConfig", "DMTetConfig", "FineConfig", "RASTERIZER_NAMES", "PriorTerm", "HashGridConfig", "KNOWN_LOSSES", "FINE_LOSSES"]
