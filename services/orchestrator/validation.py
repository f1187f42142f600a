"""What a job spec must pass before it is accepted, beyond the preset parsing (presets.plan_job) and the prior
checks (Admission._check_priors): a well-formed deadline, finite numbers and t ranges in every stage config, sizes
within the scene service's limits (the strictest across replicas, `SceneReplicas.limits`), and an uploaded mesh
that the fine stage can start from. The stage rules are `shared.stage_limits`', the same the scene service applies
in CreateScene, so a job accepted here is not refused there.

Fields are named as the client sent them: `spec.overrides[i].config.<path>` where an override set the value,
`spec.preset` (with the stage in the message) where the preset did.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from magic3d.v1 import orchestrator_pb2, scene_pb2

from services.orchestrator.presets import STAGE_NAME
from services.scene.config import CoarseConfig, FineConfig
from services.scene.messages import coarse_config_from_proto
from shared.errors import InvalidArgument, ServiceError
from shared.stage_limits import (
    MeshSummary,
    SceneLimits,
    check_hash_table,
    check_mesh_faces,
    check_stage_config,
    over_limit,
    read_mesh_summary,
)

if TYPE_CHECKING:
    from services.orchestrator.admission import Admission

# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_TIMESTAMP_SECONDS = (-62_135_596_800, 253_402_300_799)
_DEFAULT_T = {
    "coarse": (CoarseConfig.model_fields["t_min"].default, CoarseConfig.model_fields["t_max"].default),
    "fine": (FineConfig.model_fields["t_min"].default, FineConfig.model_fields["t_max"].default),
}


def validate_spec(runner: "Admission", spec: orchestrator_pb2.JobSpec) -> None:
    """Raises InvalidArgument naming the field for the first rule `spec` breaks (see the module docstring)."""
    check_deadline(spec)
    if spec.WhichOneof("input") is None:
        return  # the runner names the missing input
    limits = runner.replicas.limits()
    for index, override in enumerate(spec.overrides):
        # The override alone first, so that a bad value is named where the client wrote it.
        check_stage_config(override.config, limits, f"spec.overrides[{index}].config")
    if spec.WhichOneof("input") == "mesh":
        summary = read_mesh(spec.mesh)
        check_mesh_faces(summary, limits.max_mesh_faces, "spec.mesh.mesh")
    plan = runner.plan(spec)
    for stage in plan.stages:
        check_stage(stage.name, stage.config, limits, spec.overrides)


def check_deadline(spec: orchestrator_pb2.JobSpec) -> None:
    """A Timestamp out of its documented range (or with nanos out of [0, 1e9)) cannot be converted: refuse it."""
    if not spec.HasField("deadline"):
        return
    seconds, nanos = spec.deadline.seconds, spec.deadline.nanos
    low, high = _TIMESTAMP_SECONDS
    if not (low <= seconds <= high and 0 <= nanos < 1_000_000_000):
        raise InvalidArgument(
            "not a valid google.protobuf.Timestamp (seconds within years 1 to 9999, nanos in [0, 1e9))",
            "spec.deadline",
        )


def check_stage(name: str, config: scene_pb2.StageConfig, limits: SceneLimits, overrides) -> None:
    """A planned stage (preset merged with overrides) against the scene rules and limits."""
    try:
        check_stage_config(config, limits, "config", _DEFAULT_T[name])
        check_prior_t_ranges(config)
        check_reference(config, limits)
        if config.HasField("hash_grid"):  # else the scene's own default grid, which it checks against its budget
            parsed = coarse_config_from_proto(config, CoarseConfig(prompt=config.prompt or "unset"))
            check_hash_table(parsed.hash_table_bytes(), limits, "config.hash_grid")
    except ServiceError as error:
        raise InvalidArgument(*_stage_error(name, error, overrides)) from None


def check_prior_t_ranges(config: scene_pb2.StageConfig) -> None:
    """A prior term's own t range (PriorTerm.t_min / t_max, Magic123's per-prior ranges): values in (0, 1) and
    t_min <= t_max at every knot, the stage's range standing in for an unset end."""
    for index, term in enumerate(config.priors):
        if not (term.HasField("t_min") or term.HasField("t_max")):
            continue
        ranged = scene_pb2.StageConfig()
        for name in ("t_min", "t_max"):
            source = term if term.HasField(name) else config
            if source.HasField(name):
                getattr(ranged, name).CopyFrom(getattr(source, name))
        default_t = _DEFAULT_T[STAGE_NAME.get(config.stage, "coarse")]
        check_stage_config(ranged, SceneLimits(), f"config.priors[{index}]", default_t)


def check_reference(config: scene_pb2.StageConfig, limits: SceneLimits) -> None:
    """The reference view is rendered at its image's side: within the scene's resolution limit."""
    if not config.HasField("reference") or not config.reference.HasField("image"):
        return
    side = max(config.reference.image.shape[:2], default=0)
    if side > limits.max_resolution:
        raise InvalidArgument(over_limit(side, limits.max_resolution, "max_resolution"), "config.reference.image")


def _stage_error(name: str, error: ServiceError, overrides) -> tuple[str, str]:
    """(message, field) for an error in a planned stage's `config.*` field: the override that set it, if any."""
    field = error.field or "config"
    for index, override in enumerate(overrides):
        if STAGE_NAME.get(override.config.stage) == name and _sets(override.config, field.removeprefix("config.")):
            return error.message, f"spec.overrides[{index}].{field}"
    return f"{error.message} (preset's {name} stage, {field})", "spec.preset"


def _sets(config: scene_pb2.StageConfig, path: str) -> bool:
    """Whether `config` sets the top-level field that `path` ("t_min.values", "priors[0].prior") lies in."""
    top = path.split(".", 1)[0].split("[", 1)[0]
    descriptor = config.DESCRIPTOR.fields_by_name.get(top)
    if descriptor is None:
        return False
    if descriptor.is_repeated:
        return len(getattr(config, top)) > 0
    if descriptor.message_type is not None:
        return config.HasField(top)
    return bool(getattr(config, top))


def read_mesh(mesh: orchestrator_pb2.MeshInput) -> MeshSummary:
    """An uploaded mesh's checks but the face limit (which depends on the replicas): readable, finite, closed
    enough to enclose a volume. Cached for the one upload being validated (Admission.validate reads it again)."""
    return _mesh_summary(mesh.mesh, mesh.format)


@functools.lru_cache(maxsize=1)
def _mesh_summary(data: bytes, file_format: str) -> MeshSummary:
    return read_mesh_summary(data, file_format, "spec.mesh.mesh", "spec.mesh.format")


__all__ = ["validate_spec", "check_deadline", "check_stage", "check_prior_t_ranges", "check_reference", "read_mesh"]
