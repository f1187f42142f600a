"""magic3d.v1 scene messages -> typed stage configs. Unset proto fields keep the service's defaults."""

from __future__ import annotations

import dataclasses

from magic3d.v1 import scene_pb2
from pydantic import ValidationError

from services.guidance.messages import _WEIGHTING_FROM_PROTO
from services.scene.config import CoarseConfig, PriorTerm
from shared.errors import InvalidArgument, Unimplemented
from shared.schedules import Schedule


def schedule_from_proto(message: scene_pb2.Schedule, field: str) -> Schedule:
    try:
        return Schedule(tuple(int(s) for s in message.steps), tuple(float(v) for v in message.values))
    except ValueError as error:
        raise InvalidArgument(str(error), field) from None


def coarse_config_from_proto(message: scene_pb2.StageConfig, defaults: CoarseConfig) -> CoarseConfig:
    """Overlays the request's set fields on `defaults`; every violation names its proto field."""
    if message.stage not in (scene_pb2.STAGE_UNSPECIFIED, scene_pb2.STAGE_COARSE):
        raise Unimplemented("only the coarse stage is served yet", "config.stage")
    updates: dict = {}
    for name in ("prompt", "negative_prompt", "resolution", "batch_size", "learning_rate", "seed"):
        value = getattr(message, name)
        if value:
            updates[name] = value
    if message.priors:
        updates["priors"] = tuple(
            PriorTerm(
                prior=term.prior,
                weight=term.weight or 1.0,
                checkpoint_id=term.checkpoint_id,
                guidance_scale=term.guidance_scale if term.HasField("guidance_scale") else None,
                weighting=_WEIGHTING_FROM_PROTO.get(term.weighting),
            )
            for term in message.priors
        )
    for name in ("t_min", "t_max"):
        if message.HasField(name):
            updates[name] = schedule_from_proto(getattr(message, name), f"config.{name}")
    if message.loss_weights:
        updates["loss_weights"] = {
            k: schedule_from_proto(v, f"config.loss_weights[{k}]") for k, v in message.loss_weights.items()
        }
    if message.HasField("cameras"):
        ranges = {
            name: (getattr(message.cameras, name).min, getattr(message.cameras, name).max)
            for name in ("distance", "fovy_deg", "elevation_deg", "azimuth_deg")
            if message.cameras.HasField(name)
        }
        updates["cameras"] = _replace(defaults.cameras, ranges, "config.cameras")
    field_updates = {}
    if message.encoding_backend:
        field_updates["backend"] = message.encoding_backend
    if message.HasField("hash_grid"):
        grid = {k: v for k, v in _set_fields(message.hash_grid).items()}
        field_updates["encoding"] = _replace(defaults.field.encoding, grid, "config.hash_grid")
    if field_updates:
        updates["field"] = _replace(defaults.field, field_updates, "config")
    if message.samples_per_ray:
        updates["renderer"] = _replace(
            defaults.renderer, {"num_samples_per_ray": message.samples_per_ray}, "config.samples_per_ray"
        )
        updates["occupancy"] = _replace(
            defaults.occupancy, {"step_size": updates["renderer"].step_size}, "config.samples_per_ray"
        )
    try:
        return CoarseConfig.model_validate({**defaults.model_dump(), **updates})
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in first["loc"])
        raise InvalidArgument(first["msg"], f"config.{location}") from None


def _set_fields(message) -> dict:
    return {descriptor.name: value for descriptor, value in message.ListFields()}


def _replace(instance, changes: dict, field: str):
    try:
        return dataclasses.replace(instance, **changes)
    except (ValueError, TypeError) as error:
        raise InvalidArgument(str(error), field) from None
