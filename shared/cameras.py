"""Cameras: the one description of a view that every service shares, and its proto form.

World frame: right-handed, +Z up. A camera at azimuth a, elevation e, distance d sits at
d * (cos e cos a, cos e sin a, sin e) and looks at the origin. Camera axes follow OpenGL:
+X right, +Y up, looking along -Z. `camera_to_world` maps camera coordinates to world coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import torch
from magic3d.v1 import common_pb2

from shared.errors import InvalidArgument
from shared import tensors
from shared.camera_ranges import CameraRanges


class Shading(str, Enum):
    ALBEDO = "albedo"
    LAMBERTIAN = "lambertian"
    TEXTURELESS = "textureless"
    NORMAL = "normal"


_SHADING_FROM_PROTO = {
    common_pb2.SHADING_MODE_UNSPECIFIED: Shading.ALBEDO,
    common_pb2.SHADING_MODE_ALBEDO: Shading.ALBEDO,
    common_pb2.SHADING_MODE_LAMBERTIAN: Shading.LAMBERTIAN,
    common_pb2.SHADING_MODE_TEXTURELESS: Shading.TEXTURELESS,
    common_pb2.SHADING_MODE_NORMAL: Shading.NORMAL,
}
_PROTO_FROM_SHADING = {v: k for k, v in _SHADING_FROM_PROTO.items() if k != common_pb2.SHADING_MODE_UNSPECIFIED}


@dataclass(frozen=True)
class Light:
    position: tuple[float, float, float] = (0.0, 0.0, 3.0)
    ambient: float = 0.1
    diffuse: float = 0.9


@dataclass(frozen=True)
class Camera:
    camera_to_world: torch.Tensor  # (4, 4) float32
    fovy_deg: float
    width: int
    height: int
    azimuth_deg: float = 0.0
    elevation_deg: float = 0.0
    distance: float = 0.0
    shading: Shading = Shading.ALBEDO
    light: Light = field(default_factory=Light)
    background_color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    background_image: torch.Tensor | None = None  # (H, W, 3) in [0, 1]

    def projection(self, near: float = 0.01, far: float = 100.0) -> torch.Tensor:
        """OpenGL perspective projection (4, 4) for this camera's field of view and aspect."""
        return perspective(self.fovy_deg, self.width / self.height, near, far)

    def world_to_clip(self, near: float = 0.01, far: float = 100.0) -> torch.Tensor:
        return self.projection(near, far) @ torch.linalg.inv(self.camera_to_world)

    def background(self, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """(H, W, 3) background at the requested size (the camera's own by default)."""
        h, w = height or self.height, width or self.width
        if self.background_image is not None:
            image = self.background_image.permute(2, 0, 1)[None].float()
            if image.shape[-2:] != (h, w):
                image = torch.nn.functional.interpolate(image, size=(h, w), mode="bilinear", align_corners=False)
            return image[0].permute(1, 2, 0)
        return torch.tensor(self.background_color, dtype=torch.float32).expand(h, w, 3)


def look_at(eye: torch.Tensor, target: torch.Tensor | None = None, up: torch.Tensor | None = None) -> torch.Tensor:
    """Camera-to-world (4, 4) for a camera at `eye` looking at `target`, +Z up in the world."""
    target = torch.zeros(3) if target is None else target
    up = torch.tensor([0.0, 0.0, 1.0]) if up is None else up
    back = torch.nn.functional.normalize(eye - target, dim=0)
    right = torch.linalg.cross(up, back)
    if right.norm() < 1e-6:  # looking straight down or up: any right vector will do
        right = torch.tensor([0.0, 1.0, 0.0])
    right = torch.nn.functional.normalize(right, dim=0)
    cam_up = torch.linalg.cross(back, right)
    c2w = torch.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, cam_up, back, eye
    return c2w


def perspective(fovy_deg: float, aspect: float, near: float, far: float) -> torch.Tensor:
    f = 1.0 / math.tan(math.radians(fovy_deg) / 2)
    proj = torch.zeros(4, 4)
    proj[0, 0], proj[1, 1] = f / aspect, f
    proj[2, 2], proj[2, 3] = -(far + near) / (far - near), -2 * far * near / (far - near)
    proj[3, 2] = -1.0
    return proj


def orbit_camera(
    azimuth_deg: float,
    elevation_deg: float,
    distance: float,
    fovy_deg: float = 45.0,
    size: int = 64,
    **kwargs,
) -> Camera:
    """A camera on a sphere about the origin, looking at it."""
    a, e = math.radians(azimuth_deg), math.radians(elevation_deg)
    eye = distance * torch.tensor([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])
    return Camera(
        camera_to_world=look_at(eye),
        fovy_deg=fovy_deg,
        width=size,
        height=size,
        azimuth_deg=azimuth_deg,
        elevation_deg=elevation_deg,
        distance=distance,
        **kwargs,
    )


def _vec3(message: common_pb2.Vec3) -> tuple[float, float, float]:
    return (message.x, message.y, message.z)


def from_proto(message: common_pb2.Camera, field: str = "camera") -> Camera:
    c2w = list(message.pose.camera_to_world)
    if len(c2w) != 16:
        raise InvalidArgument(f"needs 16 values (4x4 row-major), got {len(c2w)}", field=f"{field}.pose.camera_to_world")
    matrix = torch.tensor(c2w, dtype=torch.float32).reshape(4, 4)
    if not torch.isfinite(matrix).all():
        raise InvalidArgument("contains NaN or Inf", field=f"{field}.pose.camera_to_world")
    intr = message.intrinsics
    if not 0.0 < intr.fovy_deg < 180.0:
        raise InvalidArgument(f"must be in (0, 180), got {intr.fovy_deg}", field=f"{field}.intrinsics.fovy_deg")
    if intr.width <= 0 or intr.height <= 0:
        raise InvalidArgument("width and height must be positive", field=f"{field}.intrinsics")
    if message.shading not in _SHADING_FROM_PROTO:
        raise InvalidArgument(f"unknown shading mode {message.shading}", field=f"{field}.shading")
    light = Light()
    if message.HasField("light"):
        light = Light(_vec3(message.light.position), message.light.ambient, message.light.diffuse)
    bg_color, bg_image = (1.0, 1.0, 1.0), None
    if message.HasField("background"):
        bg_color = _vec3(message.background.color)
        if message.background.HasField("image"):
            bg_image = tensors.from_proto(message.background.image, field=f"{field}.background.image").float()
            if bg_image.ndim != 3 or bg_image.shape[-1] != 3:
                raise InvalidArgument("must be (H, W, 3)", field=f"{field}.background.image.shape")
    return Camera(
        camera_to_world=matrix,
        fovy_deg=intr.fovy_deg,
        width=intr.width,
        height=intr.height,
        azimuth_deg=message.pose.azimuth_deg,
        elevation_deg=message.pose.elevation_deg,
        distance=message.pose.distance,
        shading=_SHADING_FROM_PROTO[message.shading],
        light=light,
        background_color=bg_color,
        background_image=bg_image,
    )


def to_proto(camera: Camera) -> common_pb2.Camera:
    message = common_pb2.Camera(
        intrinsics=common_pb2.Intrinsics(fovy_deg=camera.fovy_deg, width=camera.width, height=camera.height),
        pose=common_pb2.Pose(
            camera_to_world=camera.camera_to_world.reshape(-1).tolist(),
            azimuth_deg=camera.azimuth_deg,
            elevation_deg=camera.elevation_deg,
            distance=camera.distance,
        ),
        shading=_PROTO_FROM_SHADING[camera.shading],
        light=common_pb2.Light(
            position=common_pb2.Vec3(x=camera.light.position[0], y=camera.light.position[1], z=camera.light.position[2]),
            ambient=camera.light.ambient,
            diffuse=camera.light.diffuse,
        ),
    )
    r, g, b = camera.background_color
    message.background.color.CopyFrom(common_pb2.Vec3(x=r, y=g, z=b))
    if camera.background_image is not None:
        image = camera.background_image
        if image.dtype not in (torch.float16, torch.float32):  # half travels as half: a scene's float16 traffic
            image = image.float()
        message.background.image.CopyFrom(tensors.to_proto(image))
    return message


def sample_cameras(
    ranges: CameraRanges,
    batch: int,
    size: int,
    generator: torch.Generator,
    background_color: tuple[float, float, float] = (1.0, 1.0, 1.0),
    shading: Shading | None = None,
) -> list[Camera]:
    """Draws `batch` orbit cameras with lights and shading modes; deterministic for a given generator state.

    Azimuths are stratified over the batch (one random offset, evenly spaced) so each batch sees the object all
    round, as threestudio's batch_uniform_azimuth does.
    """

    def uniform(low_high: tuple[float, float], n: int) -> torch.Tensor:
        low, high = low_high
        return low + (high - low) * torch.rand(n, generator=generator)

    az_low, az_high = ranges.azimuth_deg
    offsets = (torch.arange(batch) + torch.rand(batch, generator=generator)) / batch
    azimuths = az_low + (az_high - az_low) * offsets
    elevations = uniform(ranges.elevation_deg, batch)
    distances = uniform(ranges.distance, batch)
    fovys = uniform(ranges.fovy_deg, batch)
    light_scales = uniform(ranges.light_distance_scale, batch)
    perturb = torch.randn(batch, 3, generator=generator) * ranges.light_direction_perturb
    shade_draw = torch.rand(batch, generator=generator)
    cameras = []
    for i in range(batch):
        camera = orbit_camera(
            float(azimuths[i]), float(elevations[i]), float(distances[i]), fovy_deg=float(fovys[i]), size=size
        )
        position = camera.camera_to_world[:3, 3]
        direction = torch.nn.functional.normalize(position + perturb[i], dim=0)
        light_position = direction * light_scales[i] * distances[i]
        if shading is not None:
            mode = shading
        elif shade_draw[i] < ranges.albedo_probability:
            mode = Shading.ALBEDO
        elif shade_draw[i] < ranges.albedo_probability + ranges.textureless_probability:
            mode = Shading.TEXTURELESS
        else:
            mode = Shading.LAMBERTIAN
        cameras.append(
            Camera(
                camera_to_world=camera.camera_to_world,
                fovy_deg=camera.fovy_deg,
                width=size,
                height=size,
                azimuth_deg=camera.azimuth_deg,
                elevation_deg=camera.elevation_deg,
                distance=camera.distance,
                shading=mode,
                light=Light(tuple(light_position.tolist()), ranges.ambient, ranges.diffuse),
                background_color=background_color,
            )
        )
    return cameras
