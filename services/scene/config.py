"""Typed stage configuration, validated at the edge (pydantic). Schedules are data (shared.schedules.Schedule)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.guidance.priors.base import Weighting
from services.scene.field import FieldConfig, HashGridConfig, OccupancyConfig, RendererConfig
from shared.cameras import CameraRanges
from shared.schedules import Schedule


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


KNOWN_LOSSES = ("sds", "orientation", "sparsity", "opacity_entropy")


class CoarseConfig(BaseModel):
    """The coarse stage: a hash-grid neural field, volume rendered at low resolution, optimised by SDS."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    priors: tuple[PriorTerm, ...] = (PriorTerm(prior="analytic"),)
    view_dependent_prompt: bool = True
    resolution: int = Field(default=64, ge=16, le=1024)
    batch_size: int = Field(default=4, ge=1, le=64)
    field: FieldConfig = FieldConfig()
    renderer: RendererConfig = RendererConfig()
    occupancy: OccupancyConfig = OccupancyConfig()
    cameras: CameraRanges = CameraRanges()
    t_min: Schedule = Schedule.constant(0.02)
    t_max: Schedule = Schedule.constant(0.98)
    loss_weights: dict[str, Schedule] = Field(default_factory=_default_loss_weights)
    learning_rate: float = Field(default=0.01, gt=0)
    background_learning_rate: float = Field(default=0.001, gt=0)
    seed: int = Field(default=0, ge=0)
    # Steps in a row with NaN/Inf losses or gradients after which the scene fails (keeping its last checkpoint).
    max_nonfinite_steps: int = Field(default=5, ge=1)
    guidance_timeout_s: float = Field(default=60.0, gt=0)
    # Density level of the extracted surface (the fine stage picks its own level robustly; see issue 4).
    isosurface_level: float = Field(default=10.0, gt=0)

    @field_validator("loss_weights")
    @classmethod
    def _known_losses(cls, weights: dict[str, Schedule]) -> dict[str, Schedule]:
        unknown = sorted(set(weights) - set(KNOWN_LOSSES))
        if unknown:
            raise ValueError(f"unknown loss terms {unknown}; known: {list(KNOWN_LOSSES)}")
        return {**_default_loss_weights(), **weights}

    @field_validator("priors")
    @classmethod
    def _some_prior(cls, priors: tuple[PriorTerm, ...]) -> tuple[PriorTerm, ...]:
        if not priors:
            raise ValueError("at least one prior must guide the stage")
        return priors

    def weight(self, loss: str, step: int) -> float:
        return self.loss_weights[loss](step)

    def hash_table_bytes(self) -> int:
        return self.field.encoding.memory_bytes()


__all__ = ["CoarseConfig", "PriorTerm", "HashGridConfig", "KNOWN_LOSSES"]
