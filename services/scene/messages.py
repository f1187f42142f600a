"""magic3d.v1 scene messages -> typed stage configs. Unset proto fields keep the service's defaults. Torch-free: the
orchestrator parses stage configs with it."""

from __future__ import annotations

import dataclasses

from magic3d.v1 import scene_pb2
from pydantic import ValidationError

from services.scene.config import CoarseConfig, FineConfig, PriorTerm
from shared.errors import InvalidArgument
from shared.schedules import Schedule
from shared.guidance_types import weighting_from_proto


def schedule_from_proto(message: scene_pb2.Schedule, field: str) -> Schedule:
    try:
        return Schedule(tuple(int(s) for s in message.steps), tuple(float(v) for v in message.values))
    except ValueError as error:
        raise InvalidArgument(str(error), field) from None


def coarse_config_from_proto(message: scene_pb2.StageConfig, defaults: CoarseConfig) -> CoarseConfig:
    """Overlays the request's set fields on `defaults`; every violation names its proto field."""
    if message.stage not in (scene_pb2.STAGE_UNSPECIFIED, scene_pb2.STAGE_COARSE):
        raise InvalidArgument("not a coarse-stage config", "config.stage")
    if message.HasField("dmtet") or message.rasterizer_backend:
        raise InvalidArgument("dmtet and rasterizer_backend configure the fine stage only", "config.dmtet")
    updates = _common_updates(message, defaults.cameras)
    if message.learning_rate:
        updates["learning_rate"] = message.learning_rate
    field_updates = {}
    if message.encoding_backend:
        field_updates["backend"] = message.encoding_backend
    if message.HasField("hash_grid"):
        grid = {k: v for k, v in _set_fields(message.hash_grid).items()}
        field_updates["encoding"] = _replace(defaults.field.encoding, grid, "config.hash_grid")
    if message.scene_radius:
        if not 0.1 <= message.scene_radius <= 10.0:  # also refuses NaN
            raise InvalidArgument(f"must be in [0.1, 10], got {message.scene_radius}", "config.scene_radius")
        field_updates["bound_radius"] = message.scene_radius
    if field_updates:
        updates["field"] = _replace(defaults.field, field_updates, "config")
    renderer = {"num_samples_per_ray": message.samples_per_ray} if message.samples_per_ray else {}
    if message.scene_radius:  # the renderer's sphere and the occupancy grid cover the field's box
        renderer["radius"] = message.scene_radius
    if renderer:
        field = "config.samples_per_ray" if message.samples_per_ray else "config.scene_radius"
        updates["renderer"] = _replace(defaults.renderer, renderer, field)
        occupancy = {"step_size": updates["renderer"].step_size}
        if message.scene_radius:
            occupancy["bound_radius"] = message.scene_radius
        updates["occupancy"] = _replace(defaults.occupancy, occupancy, field)
    return _validated(CoarseConfig, defaults, updates)


def fine_config_from_proto(message: scene_pb2.StageConfig, defaults: FineConfig) -> FineConfig:
    """The fine stage's config; `learning_rate` sets the colour field's (texture's) learning rate. The colour
    field's architecture always comes from the coarse checkpoint, so hash-grid settings are refused here."""
    if message.stage != scene_pb2.STAGE_FINE:
        raise InvalidArgument("not a fine-stage config", "config.stage")
    for name in ("hash_grid", "encoding_backend", "samples_per_ray", "scene_radius"):
        set_here = message.HasField(name) if name == "hash_grid" else bool(getattr(message, name))
        if set_here:
            raise InvalidArgument("the fine stage takes its colour field from the coarse checkpoint", f"config.{name}")
    updates = _common_updates(message, defaults.cameras)
    if message.learning_rate:
        updates["texture_learning_rate"] = message.learning_rate
    if message.rasterizer_backend:
        updates["rasterizer"] = message.rasterizer_backend
    if message.HasField("dmtet"):
        dmtet = {}
        if message.dmtet.grid_cells:
            dmtet["grid_cells"] = message.dmtet.grid_cells
        if message.dmtet.HasField("level"):
            dmtet["level"] = message.dmtet.level
        updates["dmtet"] = {**defaults.dmtet.model_dump(), **dmtet}
    return _validated(FineConfig, defaults, updates)


def _common_updates(message: scene_pb2.StageConfig, default_cameras) -> dict:
    updates: dict = {}
    for name in ("prompt", "negative_prompt", "resolution", "batch_size", "seed"):
        value = getattr(message, name)
        if value:
            updates[name] = value
    if message.priors:
        updates["priors"] = _prior_terms(message)
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
        updates["cameras"] = _replace(default_cameras, ranges, "config.cameras")
    return updates


def _prior_terms(message: scene_pb2.StageConfig) -> tuple[PriorTerm, ...]:
    terms = []
    for index, term in enumerate(message.priors):
        try:
            terms.append(PriorTerm(
                prior=term.prior,
                weight=term.weight or 1.0,
                checkpoint_id=term.checkpoint_id,
                guidance_scale=term.guidance_scale if term.HasField("guidance_scale") else None,
                weighting=weighting_from_proto(term.weighting),
            ))
        except ValidationError as error:  # its text is pydantic's: name the field, keep the reason short
            first = error.errors()[0]
            location = ".".join(str(part) for part in first["loc"])
            raise InvalidArgument(first["msg"], f"config.priors[{index}].{location}") from None
    return tuple(terms)


def _validated(model, defaults, updates: dict):
    try:
        return model.model_validate({**defaults.model_dump(), **updates})
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
