"""The coarse stage's field, renderer and occupancy-grid settings as plain, torch-free dataclasses: the stage configs
(services/scene/config.py) and the orchestrator, which validates jobs without torch, use them; the torch modules
in services/scene/field re-export them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field as dc_field

DENSITY_ACTIVATIONS = ("softplus", "exp")
NORMAL_MODES = ("analytic", "finite_difference", "predicted")
BACKGROUND_MODES = ("learned", "camera", "white")


@dataclass(frozen=True)
class HashGridConfig:
    """Hash-grid hyperparameters; the defaults are threestudio's Magic3D ones (finest level 16 * 256 = 4096)."""

    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    per_level_scale: float = 1.447269237440378

    def __post_init__(self) -> None:
        def _int(name: str, low: int, high: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"HashGridConfig.{name} must be an int, got {value!r}")
            if not low <= value <= high:
                raise ValueError(f"HashGridConfig.{name} must be in [{low}, {high}], got {value}")

        _int("n_levels", 1, 32)
        _int("n_features_per_level", 1, 8)
        _int("log2_hashmap_size", 4, 30)
        _int("base_resolution", 1, 1 << 16)
        scale = self.per_level_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"HashGridConfig.per_level_scale must be a finite number, got {scale!r}")
        if not 1.0 <= scale <= 4.0:
            raise ValueError(f"HashGridConfig.per_level_scale must be in [1, 4], got {scale}")
        finest = self.resolutions()[-1]
        if finest > (1 << 20):
            raise ValueError(
                f"HashGridConfig: finest level has {finest} cells per axis (over 2^20); "
                "lower n_levels, base_resolution or per_level_scale"
            )

    @property
    def table_size(self) -> int:
        """Rows of one hashed level's table (2^log2_hashmap_size)."""
        return 1 << self.log2_hashmap_size

    @property
    def output_dim(self) -> int:
        return self.n_levels * self.n_features_per_level

    def resolutions(self) -> list[int]:
        """Cells per axis of each level: floor(base * scale^l) (a tiny epsilon absorbs rounding of exact powers)."""
        return [
            max(1, int(math.floor(self.base_resolution * self.per_level_scale**level + 1e-6)))
            for level in range(self.n_levels)
        ]

    def level_is_dense(self) -> list[bool]:
        """True for levels whose (N_l + 1)^3 vertices fit in the table (indexed densely, no hashing)."""
        return [(res + 1) ** 3 <= self.table_size for res in self.resolutions()]

    def level_sizes(self) -> list[int]:
        """Table rows of each level: (N_l + 1)^3 for dense levels, 2^log2_hashmap_size for hashed ones."""
        return [min((res + 1) ** 3, self.table_size) for res in self.resolutions()]

    def level_offsets(self) -> list[int]:
        """First table row of each level when the levels' tables are laid end to end."""
        sizes, out, total = self.level_sizes(), [], 0
        for size in sizes:
            out.append(total)
            total += size
        return out

    @property
    def n_params(self) -> int:
        return sum(self.level_sizes()) * self.n_features_per_level

    def memory_bytes(self, dtype=None) -> int:
        """Bytes of the parameter table alone (no gradients or optimiser state: Adam adds about 3x more), in
        `dtype` (a torch.dtype; float32 by default)."""
        return self.n_params * (4 if dtype is None else dtype.itemsize)


@dataclass(frozen=True)
class FieldConfig:
    encoding: HashGridConfig = dc_field(default_factory=HashGridConfig)
    backend: str = "auto"  # hash-grid backend for make_encoding: "auto", "torch", "tcnn"
    hidden_width: int = 64
    n_hidden_layers: int = 1
    density_activation: str = "softplus"
    blob_density: float = 10.0
    blob_radius: float = 0.5
    bound_radius: float = 1.0  # the scene box [-r, r]^3, mapped to the hash grid's [0, 1]^3
    normals: str = "analytic"
    finite_difference_eps: float = 0.01

    def __post_init__(self) -> None:
        if not isinstance(self.encoding, HashGridConfig):
            raise ValueError(f"FieldConfig.encoding must be a HashGridConfig, got {type(self.encoding).__name__}")
        if self.hidden_width < 1:
            raise ValueError(f"FieldConfig.hidden_width must be >= 1, got {self.hidden_width}")
        if self.n_hidden_layers < 0:
            raise ValueError(f"FieldConfig.n_hidden_layers must be >= 0, got {self.n_hidden_layers}")
        if self.density_activation not in DENSITY_ACTIVATIONS:
            raise ValueError(
                f"FieldConfig.density_activation must be one of {DENSITY_ACTIVATIONS}, got {self.density_activation!r}"
            )
        if self.normals not in NORMAL_MODES:
            raise ValueError(f"FieldConfig.normals must be one of {NORMAL_MODES}, got {self.normals!r}")
        for name in ("blob_radius", "bound_radius", "finite_difference_eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"FieldConfig.{name} must be a positive number, got {value!r}")
        if not (isinstance(self.blob_density, (int, float)) and math.isfinite(self.blob_density)):
            raise ValueError(f"FieldConfig.blob_density must be a finite number, got {self.blob_density!r}")


@dataclass(frozen=True)
class OccupancyConfig:
    resolution: int = 32  # 32 on CPU; 128-256 on GPU (Magic3D used 256)
    bound_radius: float = 1.0  # must match the field's box
    decay: float = 0.95
    alpha_threshold: float = 0.01
    step_size: float = 2.0 / 64  # the renderer's sample spacing: 2 * radius / num_samples_per_ray
    update_every: int = 16  # K (nerfacc 16; the Magic3D paper refreshes every 10)
    warmup_steps: int = 256
    full_update_max_cells: int = 32**3
    chunk_size: int = 1 << 16  # points per field evaluation during an update

    def __post_init__(self) -> None:
        if not isinstance(self.resolution, int) or not 1 <= self.resolution <= 1024:
            raise ValueError(f"OccupancyConfig.resolution must be an int in [1, 1024], got {self.resolution!r}")
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"OccupancyConfig.decay must be in [0, 1], got {self.decay}")
        for name in ("bound_radius", "alpha_threshold", "step_size"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"OccupancyConfig.{name} must be positive, got {value}")
        for name in ("update_every", "chunk_size", "full_update_max_cells"):
            if getattr(self, name) < 1:
                raise ValueError(f"OccupancyConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"OccupancyConfig.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass(frozen=True)
class RendererConfig:
    num_samples_per_ray: int = 64
    radius: float = 1.0  # bounding sphere for near/far (the field's box [-r, r]^3 contains it)
    min_near: float = 0.01  # cameras inside the sphere start marching here
    stratified: bool = True  # jitter samples within their bins (training); False: bin centres
    use_occupancy: bool = True  # skip samples in empty cells when render() gets an OccupancyGrid
    background: str = "learned"  # "learned": the background module (camera colour when none is given);
    # "camera": each camera's background colour/image; "white"

    def __post_init__(self) -> None:
        if self.num_samples_per_ray < 1:
            raise ValueError(f"RendererConfig.num_samples_per_ray must be >= 1, got {self.num_samples_per_ray}")
        if not (math.isfinite(self.radius) and self.radius > 0):
            raise ValueError(f"RendererConfig.radius must be positive, got {self.radius}")
        if self.min_near < 0:
            raise ValueError(f"RendererConfig.min_near must be >= 0, got {self.min_near}")
        if self.background not in BACKGROUND_MODES:
            raise ValueError(f"RendererConfig.background must be one of {BACKGROUND_MODES}, got {self.background!r}")

    @property
    def step_size(self) -> float:
        """The largest sample spacing (a ray through the centre): 2 r / num_samples. Feed it to OccupancyConfig."""
        return 2.0 * self.radius / self.num_samples_per_ray


__all__ = ["BACKGROUND_MODES", "DENSITY_ACTIVATIONS", "NORMAL_MODES", "FieldConfig", "HashGridConfig", "OccupancyConfig", "RendererConfig"]
