"""The checks a stage config and an uploaded mesh must pass before any work: one module (no torch) so that the
scene service's CreateScene and the orchestrator's submit apply the same rules.

* every number finite (any float anywhere in the StageConfig: schedules, prior terms, cameras, learning rate);
* non-empty prior names;
* t ranges within (0, 1) at every knot, and t_min <= t_max over the whole schedule (both are piecewise linear,
  so checking the union of their knots covers every step);
* sizes within the scene service's published limits (`SceneLimits`, magic3d.v1.SceneLimits);
* uploaded meshes: readable, within a face count, finite vertices, enclosing some volume.

Every violation is an InvalidArgument naming the request field; size violations say the limit and which one.
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from google.protobuf.message import Message
from magic3d.v1 import common_pb2, scene_pb2

from shared.errors import InvalidArgument, shorten
from shared.schedules import Schedule

# |signed volume| below this fraction of the bounding box's volume: a flat or degenerate mesh (a plane, a triangle).
MIN_RELATIVE_VOLUME = 1e-6


@dataclass(frozen=True)
class SceneLimits:
    """Largest sizes one scene may ask for (inclusive); the defaults are those a scene service declares unless
    configured otherwise (and what the orchestrator assumes when no replica answers)."""

    max_resolution: int = 1024
    max_batch_size: int = 16
    max_samples_per_ray: int = 512
    max_grid_cells: int = 256
    max_hash_table_bytes: int = 256 * 2**20
    max_mesh_faces: int = 200_000
    max_message_bytes: int = 64 * 2**20

    def to_proto(self) -> scene_pb2.SceneLimits:
        return scene_pb2.SceneLimits(**dataclasses.asdict(self))

    @classmethod
    def from_proto(cls, message: scene_pb2.SceneLimits) -> "SceneLimits":
        """Unpublished (0) fields keep the defaults."""
        defaults = cls()
        return cls(**{f.name: getattr(message, f.name) or getattr(defaults, f.name) for f in dataclasses.fields(cls)})

    def strictest(self, other: "SceneLimits") -> "SceneLimits":
        """The smaller of each limit: what every replica accepts (a job may run on any of them)."""
        return SceneLimits(**{f.name: min(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)})


def over_limit(value: int | float, limit: int, name: str) -> str:
    return f"{value} is over the scene service's limit of {limit} (SceneLimits.{name})"


# -- stage configs -------------------------------------------------------------------------------------------------

_SIZES = (  # (StageConfig path, SceneLimits field)
    (("resolution",), "max_resolution"),
    (("batch_size",), "max_batch_size"),
    (("samples_per_ray",), "max_samples_per_ray"),
    (("dmtet", "grid_cells"), "max_grid_cells"),
)


def check_stage_config(
    message: scene_pb2.StageConfig,
    limits: SceneLimits,
    prefix: str = "config",
    default_t: tuple[Schedule, Schedule] | None = None,
) -> None:
    """Raises InvalidArgument (field `prefix.<path>`) for the first rule `message` breaks. `default_t`: the
    (t_min, t_max) the service uses where the message sets none, for the min <= max check."""
    for path, value in _floats(message, prefix):
        if not math.isfinite(value):
            raise InvalidArgument(f"must be a finite number, got {value}", path)
    for index, term in enumerate(message.priors):
        if not term.prior.strip():
            raise InvalidArgument("a prior name is required", f"{prefix}.priors[{index}].prior")
        if term.HasField("guidance_scale") and term.guidance_scale < 0:
            raise InvalidArgument(f"must be >= 0, got {term.guidance_scale}", f"{prefix}.priors[{index}].guidance_scale")
    for names, limit_name in _SIZES:
        value = message
        for name in names:
            value = getattr(value, name)
        field = f"{prefix}.{'.'.join(names)}"
        if value < 0:
            raise InvalidArgument(f"must be >= 0 (0: the service's default), got {value}", field)
        if value > getattr(limits, limit_name):
            raise InvalidArgument(over_limit(value, getattr(limits, limit_name), limit_name), field)
    if message.HasField("resolution_schedule"):
        largest = max(message.resolution_schedule.values, default=0)
        if largest > limits.max_resolution:
            raise InvalidArgument(over_limit(largest, limits.max_resolution, "max_resolution"),
                                  f"{prefix}.resolution_schedule")
    if message.learning_rate < 0:
        raise InvalidArgument(f"must be > 0 (0: the service's default), got {message.learning_rate}", f"{prefix}.learning_rate")
    _check_t_ranges(message, prefix, default_t)
    for index, term in enumerate(message.priors):
        if term.HasField("t_min") or term.HasField("t_max"):
            _check_t_ranges(term, f"{prefix}.priors[{index}]", _stage_t(message, prefix, default_t))


def _stage_t(message: scene_pb2.StageConfig, prefix: str, default_t) -> tuple[Schedule, Schedule] | None:
    """The stage's (t_min, t_max), explicit or default: what a prior term's unset bound falls back to."""
    bounds = []
    for index, name in enumerate(("t_min", "t_max")):
        if message.HasField(name):
            bounds.append(_schedule(getattr(message, name), f"{prefix}.{name}"))
        elif default_t is not None:
            bounds.append(default_t[index])
        else:
            return None
    return bounds[0], bounds[1]


def check_reference(message: scene_pb2.ReferenceView, limits: SceneLimits, prefix: str = "config.reference") -> None:
    """(The scene's CreateScene applies it; the orchestrator builds the view itself and checks what it builds.)
    The reference view's image: square (S, S, 4) uint8 with 16 <= S <= SceneLimits.max_resolution (the scene
    renders the view at S); a depth map, where given, (S, S)."""
    field = f"{prefix}.image"
    if not message.HasField("image"):
        raise InvalidArgument("a reference view needs its image", field)
    shape = [int(d) for d in message.image.shape]
    if message.image.dtype != common_pb2.SCALAR_TYPE_UINT8:
        raise InvalidArgument("must be uint8 RGBA", f"{field}.dtype")
    if len(shape) != 3 or shape[2] != 4 or shape[0] != shape[1]:
        raise InvalidArgument(f"must be (S, S, 4) RGBA (square), got {shape}", f"{field}.shape")
    if shape[0] < 16:
        raise InvalidArgument(f"side must be at least 16, got {shape[0]}", f"{field}.shape")
    if shape[0] > limits.max_resolution:
        raise InvalidArgument(over_limit(shape[0], limits.max_resolution, "max_resolution"), f"{field}.shape")
    if message.HasField("depth") and [int(d) for d in message.depth.shape] != shape[:2]:
        raise InvalidArgument(f"must be {shape[:2]} like the image, got {list(message.depth.shape)}",
                              f"{prefix}.depth.shape")


def check_hash_table(table_bytes: int, limits: SceneLimits, field: str = "config.hash_grid") -> None:
    """The coarse field's hash table (as computed by the scene's own config) against the per-scene limit."""
    if table_bytes > limits.max_hash_table_bytes:
        raise InvalidArgument(
            f"the hash table needs {table_bytes} bytes ({table_bytes / 2**20:.1f} MiB), over the scene service's "
            f"limit of {limits.max_hash_table_bytes} ({limits.max_hash_table_bytes / 2**20:.1f} MiB, "
            "SceneLimits.max_hash_table_bytes)",
            field,
        )


def _floats(message: Message, prefix: str) -> Iterator[tuple[str, float]]:
    """(field path, value) of every float/double anywhere in `message`, maps and lists included."""
    for descriptor, value in message.ListFields():
        path = f"{prefix}.{descriptor.name}"
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            value_field = descriptor.message_type.fields_by_name["value"]
            for key, item in value.items():
                if value_field.message_type is not None:
                    yield from _floats(item, f"{path}[{shorten(key, 40)}]")
                elif value_field.cpp_type in _FLOAT_TYPES:
                    yield f"{path}[{shorten(key, 40)}]", item
        elif descriptor.message_type is not None:
            items = value if descriptor.is_repeated else [value]
            for index, item in enumerate(items):
                yield from _floats(item, f"{path}[{index}]" if descriptor.is_repeated else path)
        elif descriptor.cpp_type in _FLOAT_TYPES:
            items = value if descriptor.is_repeated else [value]
            for index, item in enumerate(items):
                yield (f"{path}[{index}]" if descriptor.is_repeated else path), item


_FLOAT_TYPES = (6, 5)  # FieldDescriptor.CPPTYPE_DOUBLE, CPPTYPE_FLOAT


def _schedule(message: scene_pb2.Schedule, field: str) -> Schedule:
    try:
        return Schedule(tuple(int(s) for s in message.steps), tuple(float(v) for v in message.values))
    except ValueError as error:
        raise InvalidArgument(str(error), field) from None


def _check_t_ranges(message: scene_pb2.StageConfig, prefix: str, default_t: tuple[Schedule, Schedule] | None) -> None:
    schedules: dict[str, Schedule | None] = {}
    for index, name in enumerate(("t_min", "t_max")):
        field = f"{prefix}.{name}"
        if message.HasField(name):
            schedule = _schedule(getattr(message, name), field)
            bad = [v for v in schedule.values if not 0.0 < v < 1.0]
            if bad:
                raise InvalidArgument(f"every value must lie in (0, 1), got {bad[0]}", f"{field}.values")
            schedules[name] = schedule
        else:
            schedules[name] = default_t[index] if default_t is not None else None
    low, high = schedules["t_min"], schedules["t_max"]
    if low is None or high is None:
        return
    for step in sorted(set(low.steps) | set(high.steps)):
        if low(step) > high(step):
            field = f"{prefix}.t_min" if message.HasField("t_min") else f"{prefix}.t_max"
            raise InvalidArgument(f"t_min {low(step):.4g} > t_max {high(step):.4g} at step {step}", field)


# -- uploaded meshes -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeshSummary:
    vertices: int
    faces: int
    relative_volume: float


def check_mesh_bytes(data: bytes, file_format: str, max_faces: int, field: str, format_field: str) -> MeshSummary:
    """Reads an uploaded GLB/OBJ and refuses, naming `field`: an empty or unreadable file, more than `max_faces`
    faces (not decimated: the client decides how to simplify its mesh), NaN/Inf vertices, face indices out of
    range, and meshes that enclose no volume (a single triangle, a flat plane)."""
    summary = read_mesh_summary(data, file_format, field, format_field)
    check_mesh_faces(summary, max_faces, field)
    return summary


def check_mesh_faces(summary: MeshSummary, max_faces: int, field: str) -> None:
    if summary.faces > max_faces:
        raise InvalidArgument(
            f"{summary.faces} faces is over the limit of {max_faces} (SceneLimits.max_mesh_faces); decimate it first",
            field,
        )


def read_mesh_summary(data: bytes, file_format: str, field: str, format_field: str) -> MeshSummary:
    """Every check of `check_mesh_bytes` but the face limit."""
    if not data:
        raise InvalidArgument("the mesh is empty", field)
    fmt = (file_format or "glb").lower()
    if fmt not in ("glb", "obj"):
        raise InvalidArgument(f"unknown mesh format {shorten(file_format)!r}; known: glb, obj", format_field)
    vertices, faces = _read(data, fmt, field)
    if faces.shape[0] == 0:
        raise InvalidArgument("the mesh has no faces", field)
    if not np.isfinite(vertices).all():
        raise InvalidArgument("vertices must be finite numbers (found NaN or Inf)", field)
    if faces.min() < 0 or faces.max() >= vertices.shape[0]:
        raise InvalidArgument("face indices must refer to the mesh's vertices", field)
    relative = _relative_volume(vertices, faces)
    if relative < MIN_RELATIVE_VOLUME:
        raise InvalidArgument("the mesh encloses no volume (flat or degenerate): give a closed surface", field)
    return MeshSummary(int(vertices.shape[0]), int(faces.shape[0]), relative)


def _read(data: bytes, fmt: str, field: str) -> tuple[np.ndarray, np.ndarray]:
    import trimesh

    try:
        loaded = trimesh.load(io.BytesIO(data), file_type=fmt, force="mesh", process=False)
        if not isinstance(loaded, trimesh.Trimesh):  # force="mesh" concatenates a scene; anything else is unreadable
            raise TypeError(f"loaded a {type(loaded).__name__}, not a triangle mesh")
        vertices = np.asarray(loaded.vertices, dtype=np.float64).reshape(-1, 3)
        faces = np.asarray(loaded.faces, dtype=np.int64).reshape(-1, 3)
    except Exception as error:  # noqa: BLE001 - any parse failure means an unreadable upload; its text stays here
        raise InvalidArgument(f"unreadable {fmt} mesh ({type(error).__name__})", field) from None
    return vertices, faces


def _relative_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    """|signed volume| (divergence theorem over the triangles) over the bounding box's volume (its longest side
    cubed, so that a flat box does not make a flat mesh look voluminous)."""
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    volume = abs(float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum()) / 6.0)
    side = float((vertices.max(axis=0) - vertices.min(axis=0)).max())
    return volume / side**3 if side > 0 else 0.0


__all__ = [
    "SceneLimits", "MeshSummary", "check_stage_config", "check_reference", "check_hash_table", "check_mesh_bytes", "check_mesh_faces",
    "read_mesh_summary", "over_limit",
]
