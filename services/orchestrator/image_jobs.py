"""Image-to-3D jobs (Magic123): the request's image becomes each stage's ReferenceView, and the prior terms follow
what the request gives.

* camera: azimuth 0 by definition; elevation, distance and fovy from the request where set (elevation in [-90, 90],
  distance within the preset's `image.distance_range`, fovy in (0, 180)), else the preset's `image:` defaults;
* image: `shared.image_input.prepare_image` at each stage's `reference.resolution` (recentred so that the object's
  bounding box is `image.foreground_fraction` of the frame), RGBA uint8 with the optional depth alike;
* priors: terms with input PRIOR_INPUT_IMAGE (the 3D prior) always run; PRIOR_INPUT_TEXT terms (the 2D prior) run
  only with a prompt, and get the request's learned embeddings. Without a prompt the job runs on its image priors
  and the reference losses; a stage left with no prior is refused (field `spec.image.prompt`).

Planning runs at submit and again when a job starts (the plan is not stored), so the preprocessing is cached for the
last few images: the same bytes give the same reference view.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from magic3d.v1 import orchestrator_pb2, scene_pb2

from services.orchestrator.presets import STAGE_NAME, ImagePreset, JobPlan, PlannedStage
from shared.errors import InvalidArgument
from shared.image_input import PreparedImage, prepare_image, reference_camera

FIELD = "spec.image"
_SET_BY_ORCHESTRATOR = ("image", "camera", "depth")


@dataclasses.dataclass(frozen=True)
class ReferenceCamera:
    elevation_deg: float
    distance: float
    fovy_deg: float


def reference_camera_settings(image: orchestrator_pb2.ImageInput, preset: ImagePreset) -> ReferenceCamera:
    """The request's camera fields, checked, with the preset's defaults where unset."""
    elevation = _field(image, "elevation_deg", preset.elevation_deg)
    if not -90.0 <= elevation <= 90.0:
        raise InvalidArgument(f"must be within [-90, 90] degrees, got {elevation}", f"{FIELD}.elevation_deg")
    distance = _field(image, "distance", preset.distance)
    low, high = preset.distance_range
    if not low <= distance <= high:
        raise InvalidArgument(
            f"must be within the preset's reference distance range [{low}, {high}] (scene box [-1, 1]^3), "
            f"got {distance}", f"{FIELD}.distance",
        )
    fovy = _field(image, "fovy_deg", preset.fovy_deg)
    if not 0.0 < fovy < 180.0:
        raise InvalidArgument(f"must be within (0, 180) degrees, got {fovy}", f"{FIELD}.fovy_deg")
    return ReferenceCamera(elevation, distance, fovy)


def _field(image: orchestrator_pb2.ImageInput, name: str, default: float) -> float:
    if not image.HasField(name):
        return float(default)
    value = float(getattr(image, name))
    if not math.isfinite(value):
        raise InvalidArgument(f"must be a finite number, got {value}", f"{FIELD}.{name}")
    return value


def plan_image_job(plan: JobPlan, image: orchestrator_pb2.ImageInput, overrides) -> JobPlan:
    """`plan` (an image preset's, overrides merged) with each stage's ReferenceView and prior terms for `image`."""
    if plan.image is None:
        raise InvalidArgument(f"preset {plan.preset!r} is for text jobs; an image job needs an image preset "
                              "(one with reference-view settings, e.g. magic123 or image-cpu-demo)", "spec.preset")
    check_reference_overrides(overrides, image_job=True)
    camera = reference_camera_settings(image, plan.image)
    has_prompt = bool(image.prompt.strip())
    stages = []
    for stage in plan.stages:
        config = scene_pb2.StageConfig()
        config.CopyFrom(stage.config)
        size = stage.reference.resolution
        prepared = _prepared(image, size, plan.image.foreground_fraction)
        config.reference.image.CopyFrom(prepared.rgba_proto())
        config.reference.camera.CopyFrom(reference_camera(camera.elevation_deg, camera.distance, camera.fovy_deg, size))
        if prepared.depth is not None:
            config.reference.depth.CopyFrom(prepared.depth_proto())
        _select_priors(stage, config, image, has_prompt, overrides)
        stages.append(dataclasses.replace(stage, config=config))
    return dataclasses.replace(plan, stages=tuple(stages))


def check_text_plan(plan: JobPlan, overrides, kind: str) -> None:
    """A text, edit or mesh job must not use an image preset, set a reference view or an image-input prior."""
    if plan.image is not None:
        raise InvalidArgument(f"preset {plan.preset!r} is an image-to-3D preset: give spec.image", "spec.preset")
    check_reference_overrides(overrides, image_job=False)
    for index, override in enumerate(overrides):
        for term_index, term in enumerate(override.config.priors):
            if term.input == scene_pb2.PRIOR_INPUT_IMAGE:
                raise InvalidArgument(f"an image-input prior needs an image job, not a {kind} job",
                                      f"spec.overrides[{index}].config.priors[{term_index}].input")


def check_reference_overrides(overrides, image_job: bool) -> None:
    """Overrides may tune an image job's reference options (every_steps, mask_erode_px), never its content."""
    for index, override in enumerate(overrides):
        if not override.config.HasField("reference"):
            continue
        field = f"spec.overrides[{index}].config.reference"
        if not image_job:
            raise InvalidArgument("only image jobs have a reference view", field)
        for name in _SET_BY_ORCHESTRATOR:
            if override.config.reference.HasField(name):
                raise InvalidArgument("the reference view's image, camera and depth come from spec.image",
                                      f"{field}.{name}")
        for name in ("every_steps", "mask_erode_px"):
            if getattr(override.config.reference, name) < 0:
                raise InvalidArgument(f"must be >= 0, got {getattr(override.config.reference, name)}",
                                      f"{field}.{name}")


def _select_priors(stage: PlannedStage, config: scene_pb2.StageConfig, image, has_prompt: bool, overrides) -> None:
    kept = []
    for index, term in enumerate(config.priors):
        if term.input == scene_pb2.PRIOR_INPUT_UNSPECIFIED and not has_prompt:
            raise InvalidArgument(
                "state this prior's input (PRIOR_INPUT_TEXT or PRIOR_INPUT_IMAGE): without a prompt the text ones "
                "are dropped", f"{_override_field(stage.name, overrides)}.priors[{index}].input",
            )
        if term.input == scene_pb2.PRIOR_INPUT_TEXT and not has_prompt:
            continue
        if term.input == scene_pb2.PRIOR_INPUT_TEXT and not term.learned_embeddings:
            term.learned_embeddings.extend(image.learned_embeddings)
        kept.append(term)
    if not kept:
        raise InvalidArgument(f"the {stage.name} stage has only text priors: give a prompt, or a preset with an "
                              "image-conditioned prior", f"{FIELD}.prompt")
    del config.priors[:]
    config.priors.extend(kept)


def _override_field(stage: str, overrides) -> str:
    for index, override in enumerate(overrides):
        if STAGE_NAME.get(override.config.stage) == stage and override.config.priors:
            return f"spec.overrides[{index}].config"
    return "spec.preset"


def _prepared(image: orchestrator_pb2.ImageInput, size: int, fraction: float) -> PreparedImage:
    return _prepare_cached(
        image.image.SerializeToString(deterministic=True) if image.HasField("image") else b"",
        image.encoded,
        image.depth.SerializeToString(deterministic=True) if image.HasField("depth") else b"",
        image.segmenter, size, fraction,
    )


@functools.lru_cache(maxsize=4)
def _prepare_cached(tensor: bytes, encoded: bytes, depth: bytes, segmenter: str, size: int, fraction: float) -> PreparedImage:
    message = orchestrator_pb2.ImageInput(encoded=encoded, segmenter=segmenter)
    if tensor:
        message.image.ParseFromString(tensor)
    if depth:
        message.depth.ParseFromString(depth)
    return prepare_image(message, size, fraction)


__all__ = [
    "ReferenceCamera",
    "check_reference_overrides",
    "check_text_plan",
    "plan_image_job",
    "reference_camera_settings",
]
