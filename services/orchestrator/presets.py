"""Job schedules as data: named presets (deploy/config/presets.yaml) and per-request overrides, validated.

A preset is a list of stages, each with its number of steps and a `magic3d.v1.StageConfig` (proto JSON in the
YAML). A request's `StageOverride`s replace the set fields of the matching stage's config (lists such as the prior terms
whole, never appended to; maps such as loss weights key by key), and may change its steps. The result is validated with the scene
service's own config parsers against the stage classes' defaults, so a bad override is refused at submit time with
the offending field named, before any GPU work.

Image-to-3D presets (Magic123) carry an `image:` block (the reference camera's defaults, the limit on a request's
camera distance, the foreground's share of the frame) and, per stage, a `reference:` block (the reference image's
resolution, how often the fine stage renders the reference view, how far the mask is eroded); their prior terms
state their input (PRIOR_INPUT_TEXT or PRIOR_INPUT_IMAGE). `services.orchestrator.image_jobs` turns the request's
image into each stage's ReferenceView.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from google.protobuf import json_format
from magic3d.v1 import scene_pb2
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.scene.config import REFERENCE_LOSSES as SCENE_REFERENCE_LOSSES
from services.scene.config import CoarseConfig, FineConfig
from services.scene.messages import coarse_config_from_proto, fine_config_from_proto
from shared.errors import InvalidArgument, ServiceError

STAGE_ENUM = {"coarse": scene_pb2.STAGE_COARSE, "fine": scene_pb2.STAGE_FINE}
STAGE_NAME = {value: name for name, value in STAGE_ENUM.items()}


# The reference-view loss terms (scene.proto ReferenceView), known to the scene's stage configs.
REFERENCE_LOSSES = SCENE_REFERENCE_LOSSES


class FieldError(ValueError):
    """A model validator's error about one field of the model (PresetBook.load names it)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class StageReference(BaseModel):
    """An image preset's per-stage reference-view settings."""

    model_config = ConfigDict(extra="forbid")

    resolution: int = Field(gt=0, le=2048)  # side of the reference image (the scene renders the view at it)
    every_steps: int = Field(default=0, ge=0)  # ReferenceView.every_steps (0: every step)
    mask_erode_px: int = Field(default=0, ge=0, le=64)  # ReferenceView.mask_erode_px


class ImagePreset(BaseModel):
    """An image preset's reference camera defaults (a request may set each) and preprocessing."""

    model_config = ConfigDict(extra="forbid")

    elevation_deg: float = Field(default=0.0, ge=-90.0, le=90.0)
    distance: float = Field(default=1.8, gt=0.0)
    fovy_deg: float = Field(default=40.0, gt=0.0, lt=180.0)
    # A request's reference distance must lie within this range (the scene box is [-1, 1]^3).
    distance_range: tuple[float, float] = (1.0, 4.0)
    # The foreground's bounding box's longer side as a fraction of the frame (Magic123: border ratio 0.2).
    foreground_fraction: float = Field(default=0.8, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _distance(self) -> "ImagePreset":
        low, high = self.distance_range
        if not 0.0 < low <= self.distance <= high:
            raise ValueError(f"need 0 < distance_range[0] <= distance <= distance_range[1], got {self.distance} "
                             f"and {self.distance_range}")
        return self


def doubly_spelled_fields(value: object, descriptor, path: str = "") -> str:
    """The path of the first field that `value` (proto JSON) sets under both of its names, or "".

    protobuf's ParseDict accepts `samples_per_ray` beside `samplesPerRay` and silently keeps the later one.
    """
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = doubly_spelled_fields(item, descriptor, f"{path}[{index}]")
            if found:
                return found
        return ""
    if not isinstance(value, dict) or descriptor is None:
        return ""
    seen: dict[str, str] = {}
    for key, item in value.items():
        field = descriptor.fields_by_name.get(key) or descriptor.fields_by_camelcase_name.get(key)
        if field is None:
            continue  # ParseDict names unknown fields itself
        where = f"{path}.{field.name}" if path else field.name
        if field.name in seen:
            return where
        seen[field.name] = key
        nested = field.message_type
        if nested is not None and nested.GetOptions().map_entry:
            nested = nested.fields_by_name["value"].message_type
            item = list(item.values()) if isinstance(item, dict) else item
        found = doubly_spelled_fields(item, nested, where)
        if found:
            return found
    return ""


class StagePreset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: Literal["coarse", "fine"]
    steps: int = Field(gt=0)
    config: dict = {}
    reference: StageReference | None = None

    @model_validator(mode="after")
    def _config_parses(self) -> "StagePreset":
        doubled = doubly_spelled_fields(self.config, scene_pb2.StageConfig.DESCRIPTOR)
        if doubled:
            raise FieldError("set twice, by its proto name and by its JSON name; keep one", f"config.{doubled}")
        try:
            self.stage_config()
        except json_format.ParseError as error:  # not a ValueError: pydantic would let it escape as a traceback
            raise FieldError(str(error).replace("\n", " "), "config") from None
        return self

    def stage_config(self) -> scene_pb2.StageConfig:
        message = json_format.ParseDict(self.config, scene_pb2.StageConfig())
        message.stage = STAGE_ENUM[self.stage]
        if self.reference is not None:
            message.reference.every_steps = self.reference.every_steps
            message.reference.mask_erode_px = self.reference.mask_erode_px
        return message


class ExportPreset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    formats: tuple[str, ...] = ("glb", "obj")
    texture_size: int = Field(default=1024, ge=16, le=8192)


class Preset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = ""
    description: str = ""
    stages: list[StagePreset] = Field(min_length=1)
    checkpoint_every: int = Field(default=500, gt=0)
    progress_every: int = Field(default=10, gt=0)
    # Previews (RenderPreview, no checkpoint) at `first_preview_step` of each stage, at every multiple of
    # `preview_every` (unset: `checkpoint_every`) and at each stage's end.
    preview_every: int | None = Field(default=None, gt=0)
    first_preview_step: int | None = Field(default=None, gt=0)  # unset: no early preview
    export: ExportPreset = ExportPreset()
    image: ImagePreset | None = None  # set: an image-to-3D preset (only image jobs use it)

    @model_validator(mode="after")
    def _stage_order(self) -> "Preset":
        names = [stage.stage for stage in self.stages]
        if names not in (["coarse"], ["coarse", "fine"], ["fine"]):
            raise ValueError(f"stages must be coarse, coarse then fine, or fine; got {names}")
        for stage in self.stages:
            config = stage.stage_config()  # proto JSON errors surface at load time
            if "reference" in stage.config:
                raise ValueError(f"{stage.stage}: the reference view comes from the job's image; "
                                 "set its options in the stage's `reference:` block")
            if (self.image is None) != (stage.reference is None):
                raise ValueError(f"{stage.stage}: an image preset (with `image:`) needs a `reference:` block in "
                                 "every stage, and only an image preset may have one")
            if self.image is not None:
                unstated = [t.prior for t in config.priors if t.input == scene_pb2.PRIOR_INPUT_UNSPECIFIED]
                if unstated:
                    raise ValueError(f"{stage.stage}: state each prior's input (PRIOR_INPUT_TEXT or "
                                     f"PRIOR_INPUT_IMAGE) in an image preset; unstated: {unstated}")
        return self

    @model_validator(mode="after")
    def _preview_schedule(self) -> "Preset":
        first = self.first_preview_step
        if first is None:
            return self
        if self.preview_every is not None and first > self.preview_every:
            raise FieldError(f"must be <= preview_every ({self.preview_every}), got {first}", "first_preview_step")
        shortest = min(stage.steps for stage in self.stages)
        if first > shortest:
            raise FieldError(f"must be <= every stage's steps (the shortest: {shortest}), got {first}",
                             "first_preview_step")
        return self

    def preview_schedule(self) -> "PreviewSchedule":
        return PreviewSchedule(self.preview_every or self.checkpoint_every, self.first_preview_step or 0)


class PresetBook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: str
    default_image: str = ""  # the preset of image jobs that name none; empty: they must name one
    presets: dict[str, Preset]

    @model_validator(mode="after")
    def _names(self) -> "PresetBook":
        for name, preset in self.presets.items():
            preset.name = name
        if self.default not in self.presets:
            raise ValueError(f"default preset {self.default!r} is not defined")
        if self.default_image and (self.default_image not in self.presets or self.presets[self.default_image].image is None):
            raise ValueError(f"default_image {self.default_image!r} is not a defined image preset")
        return self

    @classmethod
    def load(cls, path: str | Path) -> "PresetBook":
        """The book in `path`; a bad value is InvalidArgument naming its field (e.g. presets.x.first_preview_step)."""
        try:
            return cls.model_validate(yaml.safe_load(Path(path).read_text()))
        except ValidationError as error:
            first = error.errors()[0]
            named = getattr(first.get("ctx", {}).get("error"), "field", None)  # a model validator's FieldError
            location = ".".join(str(part) for part in (*first["loc"], *([named] if named else [])))
            raise InvalidArgument(f"{path}: {first['msg']}", location) from None

    def get(self, name: str) -> Preset:
        key = name or self.default
        if key not in self.presets:
            raise InvalidArgument(f"unknown preset {key!r}; known: {sorted(self.presets)}", "spec.preset")
        return self.presets[key]


@dataclass(frozen=True)
class PlannedStage:
    name: str  # "coarse" | "fine"
    steps: int
    config: scene_pb2.StageConfig  # with prompt and seed filled in (and, for image jobs, the reference view)
    reference: StageReference | None = None  # an image preset's settings for this stage


def next_multiple(step: int, every: int) -> int:
    """The first multiple of `every` after `step` (checkpoint and preview cadences)."""
    return (step // every + 1) * every


@dataclass(frozen=True)
class PreviewSchedule:
    """The steps of a stage (counted from 0 at its start) after which a preview is rendered."""

    every: int
    first_step: int = 0  # 0: none before the first multiple of `every`

    def due(self, step: int, stage_steps: int) -> bool:
        return step > 0 and (step == self.first_step or step % self.every == 0 or step == stage_steps)

    def next_after(self, step: int, stage_steps: int) -> int:
        """The first preview step after `step` (a stage's end at the latest)."""
        following = next_multiple(step, self.every)
        if step < self.first_step:
            following = min(following, self.first_step)
        return min(following, stage_steps)


@dataclass(frozen=True)
class JobPlan:
    preset: str
    stages: tuple[PlannedStage, ...]
    checkpoint_every: int
    progress_every: int
    export: ExportPreset
    image: ImagePreset | None = None  # set for image presets
    preview: PreviewSchedule = PreviewSchedule(every=500)

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def stage(self, name: str) -> PlannedStage | None:
        return next((stage for stage in self.stages if stage.name == name), None)


def merge_stage_config(base: scene_pb2.StageConfig, override: scene_pb2.StageConfig) -> scene_pb2.StageConfig:
    """`base` with every field set in `override` replaced (lists whole, maps per key); `stage` is kept."""
    merged = scene_pb2.StageConfig()
    merged.CopyFrom(base)
    for descriptor, value in override.ListFields():
        if descriptor.name == "stage":
            continue
        if descriptor.name == "reference":  # per field: an override may change every_steps alone
            merged.reference.MergeFrom(value)
            continue
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            target = getattr(merged, descriptor.name)
            for key, item in value.items():  # per key; the only map, loss_weights, holds Schedule messages
                target[key].CopyFrom(item)
        elif descriptor.is_repeated:  # lists (the prior terms) are replaced whole
            merged.ClearField(descriptor.name)
            getattr(merged, descriptor.name).extend(value)
        elif descriptor.message_type is not None:
            getattr(merged, descriptor.name).CopyFrom(value)
        else:
            setattr(merged, descriptor.name, value)
    return merged


def plan_job(
    book: PresetBook, preset_name: str, overrides, prompt: str, negative_prompt: str, seed: int
) -> JobPlan:
    """The stages a job runs: preset + overrides + the request's prompt and seed, validated (InvalidArgument)."""
    preset = book.get(preset_name)
    configs = {stage.stage: stage.stage_config() for stage in preset.stages}
    steps = {stage.stage: stage.steps for stage in preset.stages}
    for index, override in enumerate(overrides):
        field = f"spec.overrides[{index}]"
        name = STAGE_NAME.get(override.config.stage)
        if name is None or name not in configs:
            raise InvalidArgument(
                f"config.stage must name a stage of preset {preset.name!r}: {list(configs)}", f"{field}.config.stage"
            )
        if override.steps < 0 or override.steps > 1_000_000:
            raise InvalidArgument(f"must be within [0, 1000000], got {override.steps}", f"{field}.steps")
        configs[name] = merge_stage_config(configs[name], override.config)
        steps[name] = override.steps or steps[name]
    references = {stage.stage: stage.reference for stage in preset.stages}
    stages = []
    for name, config in configs.items():
        if not config.prompt:
            config.prompt = prompt
        if not config.negative_prompt:
            config.negative_prompt = negative_prompt
        config.seed = seed
        _validate(name, config, overrides)
        stages.append(PlannedStage(name, steps[name], config, references[name]))
    return JobPlan(
        preset.name, tuple(stages), preset.checkpoint_every, preset.progress_every, preset.export, preset.image,
        preset.preview_schedule(),
    )


def _validate(name: str, config: scene_pb2.StageConfig, overrides) -> None:
    """Parses the merged config as the scene service will (against the stage class's defaults)."""
    try:
        parsable = config
        if config.HasField("reference"):
            # The reference view is the job's image's (image_jobs.py builds and checks it, and refuses overrides
            # of its content): here only its options are set, before the image fills the view.
            parsable = scene_pb2.StageConfig()
            parsable.CopyFrom(config)
            parsable.ClearField("reference")
        if name == "coarse":
            coarse_config_from_proto(parsable, CoarseConfig(prompt=config.prompt or "unset"))
        else:
            fine_config_from_proto(parsable, FineConfig(prompt=config.prompt or "unset"))
    except ServiceError as error:
        index = next(
            (i for i, o in enumerate(overrides) if STAGE_NAME.get(o.config.stage) == name), None
        )
        where = f"spec.overrides[{index}]." if index is not None else f"preset stage {name}: "
        raise InvalidArgument(error.message, f"{where}{error.field or 'config'}") from None


def prior_names(plan: JobPlan) -> list[tuple[str, str, str]]:
    """(stage, prior name, checkpoint id) for every prior term the job will call."""
    return [
        (stage.name, term.prior, term.checkpoint_id) for stage in plan.stages for term in stage.config.priors
    ]


def plan_to_json(plan: JobPlan) -> dict:
    """A JSON-ready description of the plan (for the provenance record)."""
    return {
        "preset": plan.preset,
        "stages": [
            {"stage": s.name, "steps": s.steps, "config": json_format.MessageToDict(s.config)} for s in plan.stages
        ],
        "checkpoint_every": plan.checkpoint_every,
        "preview": {"every": plan.preview.every, "first_step": plan.preview.first_step},
        "export": plan.export.model_dump(),
    }


__all__ = [
    "REFERENCE_LOSSES",
    "ExportPreset",
    "ImagePreset",
    "StageReference",
    "JobPlan",
    "PlannedStage",
    "Preset",
    "PreviewSchedule",
    "PresetBook",
    "merge_stage_config",
    "next_multiple",
    "plan_job",
    "plan_to_json",
    "prior_names",
]
