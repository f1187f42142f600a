"""Where training cameras are drawn from: plain data, torch-free, so that the stage configs and the orchestrator
(which validates them without torch) can hold it; shared.cameras samples from it and re-exports it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CameraRanges:
    """Where training cameras are drawn from (threestudio's Magic3D defaults for the IF prior)."""

    distance: tuple[float, float] = (1.5, 2.0)
    fovy_deg: tuple[float, float] = (40.0, 70.0)
    elevation_deg: tuple[float, float] = (-10.0, 90.0)
    azimuth_deg: tuple[float, float] = (-180.0, 180.0)
    # Light: at distance_scale * camera distance, direction = camera direction + N(0, perturb), as in DreamFusion.
    light_distance_scale: tuple[float, float] = (0.8, 1.5)
    light_direction_perturb: float = 1.0
    # Shading per view (Magic3D / DreamFusion): albedo, textureless, else lambertian.
    albedo_probability: float = 0.2
    textureless_probability: float = 0.2
    ambient: float = 0.1
    diffuse: float = 0.9

    def __post_init__(self) -> None:
        for name in ("distance", "fovy_deg", "elevation_deg", "azimuth_deg", "light_distance_scale"):
            low, high = getattr(self, name)
            if not low <= high:
                raise ValueError(f"{name}: min {low} > max {high}")
        if self.distance[0] <= 0 or not 0 < self.fovy_deg[0] <= self.fovy_deg[1] < 180:
            raise ValueError("distance must be > 0 and fovy_deg within (0, 180)")
        if self.albedo_probability + self.textureless_probability > 1:
            raise ValueError("albedo_probability + textureless_probability must be <= 1")


__all__ = ["CameraRanges"]
