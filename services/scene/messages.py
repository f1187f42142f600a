"""magic3d.v1 scene messages -> typed stage configs. Unset proto fields keep the service's defaults. Torch-free: the
orchestrator parses stage configs with it."""

from __future__ import annotations

import dataclasses

import numpy as np
from magic3d.v1 import common_pb2, scene_pb2
from pydantic import ValidationError

from services.scene.config import CoarseConfig, FineConfig, PriorTerm, ReferenceCamera, ReferenceConfig
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
    if message.HasField("reference"):
        updates["reference"] = reference_from_proto(message.reference, "config.reference")
    if message.HasField("resolution_schedule"):
        updates["resolution_schedule"] = schedule_from_proto(message.resolution_schedule, "config.resolution_schedule")
    if message.HasField("pipelined_guidance"):
        updates["pipelined_guidance"] = message.pipelined_guidance
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
                t_min=schedule_from_proto(term.t_min, f"config.priors[{index}].t_min") if term.HasField("t_min") else None,
                t_max=schedule_from_proto(term.t_max, f"config.priors[{index}].t_max") if term.HasField("t_max") else None,
                input=_PRIOR_INPUTS.get(term.input, "unspecified"),
                learned_embeddings=tuple(term.learned_embeddings),
            ))
        except ValidationError as error:  # its text is pydantic's: name the field, keep the reason short
            first = error.errors()[0]
            location = ".".join(str(part) for part in first["loc"])
            raise InvalidArgument(first["msg"], f"config.priors[{index}].{location}") from None
    return tuple(terms)


_PRIOR_INPUTS = {
    scene_pb2.PRIOR_INPUT_UNSPECIFIED: "unspecified",
    scene_pb2.PRIOR_INPUT_TEXT: "text",
    scene_pb2.PRIOR_INPUT_IMAGE: "image",
}


def reference_from_proto(message: scene_pb2.ReferenceView, field: str = "config.reference") -> ReferenceConfig:
    """The reference view, checked (shared.stage_limits.check_reference applies the size limit at the edge):
    a square (S, S, 4) uint8 image, a camera, a (S, S) float32 depth where given."""
    if not message.HasField("image"):
        raise InvalidArgument("a reference view needs its image", f"{field}.image")
    image = message.image
    shape = tuple(int(d) for d in image.shape)
    if image.dtype != common_pb2.SCALAR_TYPE_UINT8:
        raise InvalidArgument("must be uint8 RGBA", f"{field}.image.dtype")
    if len(shape) != 3 or shape[2] != 4 or shape[0] != shape[1]:
        raise InvalidArgument(f"must be (S, S, 4) RGBA (square), got {list(shape)}", f"{field}.image.shape")
    side = shape[0]
    if not 16 <= side <= 2048:
        raise InvalidArgument(f"side must be within [16, 2048], got {side}", f"{field}.image.shape")
    if len(image.data) != side * side * 4:
        raise InvalidArgument(f"needs {side * side * 4} bytes for shape {list(shape)}, got {len(image.data)}",
                              f"{field}.image.data")
    depth = None
    if message.HasField("depth"):
        depth_shape = tuple(int(d) for d in message.depth.shape)
        if message.depth.dtype != common_pb2.SCALAR_TYPE_FLOAT32 or depth_shape != (side, side):
            raise InvalidArgument(f"must be ({side}, {side}) float32 like the image, got {list(depth_shape)} "
                                  f"{common_pb2.ScalarType.Name(message.depth.dtype)}", f"{field}.depth")
        if len(message.depth.data) != side * side * 4:
            raise InvalidArgument("data does not match its shape", f"{field}.depth.data")
        values = np.frombuffer(message.depth.data, dtype="<f4")
        if not np.isfinite(values).all():
            raise InvalidArgument("contains NaN or Inf", f"{field}.depth")
        depth = bytes(message.depth.data)
    camera = _reference_camera(message, field)
    for name in ("every_steps", "mask_erode_px"):
        if getattr(message, name) < 0:
            raise InvalidArgument(f"must be >= 0, got {getattr(message, name)}", f"{field}.{name}")
    try:
        return ReferenceConfig(camera=camera, resolution=side, image=bytes(image.data), depth=depth,
                               every_steps=message.every_steps, mask_erode_px=message.mask_erode_px)
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in first["loc"]) or "image"
        raise InvalidArgument(first["msg"], f"{field}.{location}") from None


def _reference_camera(message: scene_pb2.ReferenceView, field: str) -> ReferenceCamera:
    if not message.HasField("camera"):
        raise InvalidArgument("a reference view needs its camera", f"{field}.camera")
    camera = message.camera
    matrix = tuple(float(v) for v in camera.pose.camera_to_world)
    if len(matrix) != 16 or not np.isfinite(matrix).all():
        raise InvalidArgument("needs 16 finite values (4x4 row-major)", f"{field}.camera.pose.camera_to_world")
    if not 0.0 < camera.intrinsics.fovy_deg < 180.0:
        raise InvalidArgument(f"must be in (0, 180), got {camera.intrinsics.fovy_deg}",
                              f"{field}.camera.intrinsics.fovy_deg")
    side = int(message.image.shape[0])
    if (camera.intrinsics.width, camera.intrinsics.height) not in ((0, 0), (side, side)):
        raise InvalidArgument(f"must match the image ({side}x{side}) or be unset", f"{field}.camera.intrinsics")
    return ReferenceCamera(camera_to_world=matrix, fovy_deg=camera.intrinsics.fovy_deg,
                           elevation_deg=camera.pose.elevation_deg, azimuth_deg=camera.pose.azimuth_deg,
                           distance=camera.pose.distance)


def _validated(model, defaults, updates: dict):
    try:
        return model.model_validate({**defaults.model_dump(), **updates})
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in first["loc"])
        raise InvalidArgument(first["msg"], f"config.{location or 'prompt'}") from None  # model-level: the prompt


def _set_fields(message) -> dict:
    return {descriptor.name: value for descriptor, value in message.ListFields()}


def _replace(instance, changes: dict, field: str):
    try:
        return dataclasses.replace(instance, **changes)
    except (ValueError, TypeError) as error:
        raise InvalidArgument(str(error), field) from None
