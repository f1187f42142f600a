"""The input image of an image-to-3D job (Magic123), turned into the reference view the scene fits: decoded, checked
against stated limits, matted, recentred and resized. numpy + PIL only (the orchestrator's image has no torch).

Steps (`prepare_image`):

1. decode `ImageInput`: exactly one of `image` (a (H, W, 3|4) uint8 Tensor) and `encoded` (PNG or JPEG bytes);
2. limits (`ImageLimits`): a side over `max_side` is refused (INVALID_ARGUMENT naming the limit), a side under
   `min_side` too; an image whose longer side is over `work_side` is resized down to it before matting;
3. the foreground: the alpha channel where it has one that is not opaque everywhere, else the named `Segmenter`
   (built in: "threshold", the border's colour); nothing found, or everything, is INVALID_ARGUMENT naming the
   image field (a recentred view needs an object and a background);
4. Magic123's preprocessing (threestudio's `preprocess_image.py`): the foreground's bounding box is cut out, scaled
   so that its longer side is `fraction` of the output side (default 0.8, i.e. border ratio 0.2), and pasted
   centred into a transparent `size` x `size` frame. Output: RGBA uint8 (size, size, 4), alpha = foreground.
5. an optional (H, W) float32 depth map of the same image goes through the same crop, scale and paste (0 outside).

Errors are shared.errors classes naming the proto fields (`spec.image.image`, `spec.image.encoded`, ...).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from magic3d.v1 import common_pb2, orchestrator_pb2
from PIL import Image, ImageOps
from scipy import ndimage

from shared.errors import InvalidArgument

FIELD = "spec.image"
DEFAULT_FRACTION = 0.8  # threestudio / Magic123: border ratio 0.2
_FORMATS = ("PNG", "JPEG")


@dataclass(frozen=True)
class ImageLimits:
    """What an input image may be. Over `max_side` is refused (not resized: it is most likely a mistake, and decoding
    it would cost the orchestrator memory); over `work_side` is resized down before matting."""

    max_side: int = 4096
    work_side: int = 1024
    min_side: int = 16
    max_encoded_bytes: int = 32 * 2**20


# -- segmenters ------------------------------------------------------------------------------------------------------

class Segmenter(Protocol):
    """Foreground of an RGB image: (H, W, 3) uint8 -> (H, W) float alpha in [0, 1]."""

    def __call__(self, rgb: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class ThresholdSegmenter:
    """A plain background: its colour is the median of the image's border, the foreground the pixels farther than
    `threshold` (RGB distance, 0-255 scale) from it, reduced to the largest connected component with holes filled
    (JPEG noise and stray specks on the background are not the object; a hole inside it is not background)."""

    threshold: float = 30.0
    border_px: int = 2

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        pixels = rgb.astype(np.float32)
        b = max(1, min(self.border_px, min(rgb.shape[:2]) // 4))
        border = np.concatenate([
            pixels[:b].reshape(-1, 3), pixels[-b:].reshape(-1, 3),
            pixels[:, :b].reshape(-1, 3), pixels[:, -b:].reshape(-1, 3),
        ])
        background = np.median(border, axis=0)
        mask = np.linalg.norm(pixels - background, axis=-1) > self.threshold
        labels, count = ndimage.label(mask)
        if count == 0:
            return mask.astype(np.float32)
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
        largest = labels == (int(np.argmax(sizes)) + 1)
        return ndimage.binary_fill_holes(largest).astype(np.float32)


BUILTIN_SEGMENTERS: dict[str, Segmenter] = {"threshold": ThresholdSegmenter()}


# -- the result ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PreparedImage:
    rgba: np.ndarray  # (size, size, 4) uint8, alpha = foreground
    depth: np.ndarray | None  # (size, size) float32, 0 outside the foreground
    source_shape: tuple[int, ...]  # (H, W, C) as decoded
    matte: str  # "alpha" or the segmenter's name

    def rgba_proto(self) -> common_pb2.Tensor:
        return array_to_proto(self.rgba)

    def depth_proto(self) -> common_pb2.Tensor | None:
        return None if self.depth is None else array_to_proto(self.depth)


def prepare_image(
    message: orchestrator_pb2.ImageInput,
    size: int,
    fraction: float = DEFAULT_FRACTION,
    limits: ImageLimits = ImageLimits(),
    segmenters: Mapping[str, Segmenter] = BUILTIN_SEGMENTERS,
) -> PreparedImage:
    """The reference RGBA (and depth) of `message` at `size` x `size` (see the module docstring)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    image, field = decode_image(message, limits)
    depth = decode_depth(message, image.shape[:2])
    image, depth = fit_work_side(image, depth, limits.work_side)
    alpha, matte = foreground(image, message.segmenter, segmenters, field)
    rgba, depth = recenter(image[..., :3], alpha, depth, size, fraction)
    return PreparedImage(rgba, depth, tuple(int(s) for s in image.shape), matte)


# -- decoding --------------------------------------------------------------------------------------------------------

def decode_image(message: orchestrator_pb2.ImageInput, limits: ImageLimits = ImageLimits()) -> tuple[np.ndarray, str]:
    """(H, W, 3|4) uint8 and the field it came from. Sides are checked against `limits` before pixels are decoded."""
    has_tensor, has_bytes = message.HasField("image"), bool(message.encoded)
    if has_tensor and has_bytes:
        raise InvalidArgument("give exactly one of image and encoded, not both", f"{FIELD}.encoded")
    if not has_tensor and not has_bytes:
        raise InvalidArgument("give the image: a (H, W, 3|4) uint8 tensor or PNG/JPEG bytes", f"{FIELD}.image")
    if has_bytes:
        return _decode_bytes(message.encoded, limits), f"{FIELD}.encoded"
    return _decode_tensor(message.image, limits), f"{FIELD}.image"


def _decode_tensor(tensor: common_pb2.Tensor, limits: ImageLimits) -> np.ndarray:
    field = f"{FIELD}.image"
    if tensor.dtype != common_pb2.SCALAR_TYPE_UINT8:
        raise InvalidArgument(f"must be uint8, got {common_pb2.ScalarType.Name(tensor.dtype)}", f"{field}.dtype")
    shape = tuple(int(s) for s in tensor.shape)
    if len(shape) != 3 or shape[2] not in (3, 4):
        raise InvalidArgument(f"must be (H, W, 3) or (H, W, 4), got {list(shape)}", f"{field}.shape")
    _check_sides(shape[0], shape[1], limits, f"{field}.shape")
    if len(tensor.data) != math.prod(shape):
        raise InvalidArgument(f"{len(tensor.data)} bytes for shape {list(shape)}", f"{field}.data")
    return np.frombuffer(tensor.data, dtype=np.uint8).reshape(shape)


def _decode_bytes(data: bytes, limits: ImageLimits) -> np.ndarray:
    field = f"{FIELD}.encoded"
    if len(data) > limits.max_encoded_bytes:
        raise InvalidArgument(f"{len(data)} bytes is over the limit of {limits.max_encoded_bytes}", field)
    try:
        picture: Image.Image = Image.open(io.BytesIO(data))
        if picture.format not in _FORMATS:
            raise InvalidArgument(f"must be PNG or JPEG, got {picture.format}", field)
        _check_sides(picture.height, picture.width, limits, field)  # before the pixels are decoded
        picture = ImageOps.exif_transpose(picture)  # phones store JPEGs rotated, with the rotation in EXIF
        has_alpha = picture.mode in ("RGBA", "LA", "PA") or "transparency" in picture.info
        picture = picture.convert("RGBA" if has_alpha else "RGB")
        return np.asarray(picture, dtype=np.uint8)
    except InvalidArgument:
        raise
    except Image.DecompressionBombError:  # a header claiming far more pixels than any limit here
        raise InvalidArgument(f"over the limit of {limits.max_side} pixels a side (ImageLimits.max_side)", field) from None
    except (OSError, ValueError, SyntaxError) as error:
        raise InvalidArgument(f"not a readable PNG or JPEG image ({type(error).__name__})", field) from None


def _check_sides(height: int, width: int, limits: ImageLimits, field: str) -> None:
    if max(height, width) > limits.max_side:
        raise InvalidArgument(
            f"{width}x{height} is over the limit of {limits.max_side} pixels a side (ImageLimits.max_side)", field
        )
    if min(height, width) < limits.min_side:
        raise InvalidArgument(
            f"{width}x{height} is under the minimum of {limits.min_side} pixels a side (ImageLimits.min_side)", field
        )


def decode_depth(message: orchestrator_pb2.ImageInput, image_hw: tuple[int, int]) -> np.ndarray | None:
    """The optional depth map: (H, W) float32, finite, the image's size."""
    if not message.HasField("depth"):
        return None
    tensor, field = message.depth, f"{FIELD}.depth"
    if tensor.dtype != common_pb2.SCALAR_TYPE_FLOAT32:
        raise InvalidArgument(f"must be float32, got {common_pb2.ScalarType.Name(tensor.dtype)}", f"{field}.dtype")
    shape = tuple(int(s) for s in tensor.shape)
    if shape != tuple(image_hw):
        raise InvalidArgument(f"must be the image's (H, W) = {list(image_hw)}, got {list(shape)}", f"{field}.shape")
    if len(tensor.data) != 4 * math.prod(shape):
        raise InvalidArgument(f"{len(tensor.data)} bytes for shape {list(shape)} float32", f"{field}.data")
    depth = np.frombuffer(tensor.data, dtype="<f4").reshape(shape).astype(np.float32)
    if not np.isfinite(depth).all():
        raise InvalidArgument("contains NaN or Inf", field)
    return depth


def fit_work_side(image: np.ndarray, depth: np.ndarray | None, work_side: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Resized (area-averaged) so that its longer side is at most `work_side`; the depth map alike."""
    height, width = image.shape[:2]
    scale = work_side / max(height, width)
    if scale >= 1.0:
        return image, depth
    shape = (max(1, round(width * scale)), max(1, round(height * scale)))  # PIL sizes are (W, H)
    if image.shape[2] == 4:
        resized = _resize_rgba(image, shape)
    else:
        resized = np.asarray(Image.fromarray(image, "RGB").resize(shape, Image.Resampling.BOX))
    if depth is not None:
        depth = np.asarray(Image.fromarray(depth, "F").resize(shape, Image.Resampling.BILINEAR), dtype=np.float32)
    return resized, depth


def _resize_rgba(rgba: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Resized with premultiplied alpha, so that background colours do not bleed into the object's edge."""
    premultiplied = Image.fromarray(rgba, "RGBA").convert("RGBa")
    return np.asarray(premultiplied.resize(size_wh, Image.Resampling.BOX).convert("RGBA"))


# -- foreground ------------------------------------------------------------------------------------------------------

def foreground(
    image: np.ndarray, segmenter: str, segmenters: Mapping[str, Segmenter], field: str
) -> tuple[np.ndarray, str]:
    """(H, W) float alpha in [0, 1] and how it was found. An alpha channel that is opaque everywhere says nothing
    about the object, so such an image is matted like an RGB one."""
    if image.shape[2] == 4 and image[..., 3].min() < 255:
        alpha, matte = image[..., 3].astype(np.float32) / 255.0, "alpha"
    else:
        name = segmenter or "threshold"
        if name not in segmenters:
            raise InvalidArgument(
                f"unknown or unconfigured segmenter {name!r}; configured: {sorted(segmenters)}", f"{FIELD}.segmenter"
            )
        alpha = np.clip(np.asarray(segmenters[name](np.ascontiguousarray(image[..., :3])), np.float32), 0.0, 1.0)
        if alpha.shape != image.shape[:2]:
            raise ValueError(f"segmenter {name!r} returned shape {alpha.shape} for an image of {image.shape[:2]}")
        matte = name
    covered = alpha > 0.5
    if covered.sum() == 0:
        raise InvalidArgument(f"no foreground found ({matte}): the image shows no object to reconstruct", field)
    if covered.mean() > 0.98:
        raise InvalidArgument(
            f"the foreground ({matte}) covers the whole frame: no background to separate the object from", field
        )
    return alpha, matte


# -- recentring ------------------------------------------------------------------------------------------------------

def recenter(
    rgb: np.ndarray, alpha: np.ndarray, depth: np.ndarray | None, size: int, fraction: float = DEFAULT_FRACTION
) -> tuple[np.ndarray, np.ndarray | None]:
    """The foreground's bounding box scaled so that its longer side is `fraction * size`, centred in a transparent
    `size` x `size` frame: RGBA uint8 and the depth map alike (0 outside)."""
    rows, cols = np.nonzero(alpha > 0.5)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    height, width = bottom - top, right - left
    scale = fraction * size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    y0, x0 = (size - new_h) // 2, (size - new_w) // 2
    crop = np.concatenate([rgb[top:bottom, left:right], _to_uint8(alpha[top:bottom, left:right])[..., None]], -1)
    out = np.zeros((size, size, 4), np.uint8)
    out[y0:y0 + new_h, x0:x0 + new_w] = _resize_rgba(np.ascontiguousarray(crop), (new_w, new_h))
    out_depth = None
    if depth is not None:
        patch = Image.fromarray(np.ascontiguousarray(depth[top:bottom, left:right]), "F")
        out_depth = np.zeros((size, size), np.float32)
        out_depth[y0:y0 + new_h, x0:x0 + new_w] = np.asarray(
            patch.resize((new_w, new_h), Image.Resampling.BILINEAR), np.float32
        )
        out_depth[out[..., 3] == 0] = 0.0
    return out, out_depth


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.round(values * 255.0), 0, 255).astype(np.uint8)


# -- protos ----------------------------------------------------------------------------------------------------------

_PROTO_DTYPES = {np.dtype(np.uint8): common_pb2.SCALAR_TYPE_UINT8, np.dtype(np.float32): common_pb2.SCALAR_TYPE_FLOAT32}


def array_to_proto(array: np.ndarray) -> common_pb2.Tensor:
    array = np.ascontiguousarray(array)
    data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    return common_pb2.Tensor(dtype=_PROTO_DTYPES[array.dtype], shape=list(array.shape), data=data)


def look_at(eye: np.ndarray) -> np.ndarray:
    """Camera-to-world (4, 4) looking at the origin, +Z up, OpenGL axes (shared.cameras.look_at without torch)."""
    back = eye / np.linalg.norm(eye)
    right = np.cross(np.array([0.0, 0.0, 1.0]), back)
    if np.linalg.norm(right) < 1e-6:  # straight down or up: any right vector will do
        right = np.array([0.0, 1.0, 0.0])
    right = right / np.linalg.norm(right)
    up = np.cross(back, right)
    matrix = np.eye(4)
    matrix[:3, 0], matrix[:3, 1], matrix[:3, 2], matrix[:3, 3] = right, up, back, eye
    return matrix


def reference_camera(elevation_deg: float, distance: float, fovy_deg: float, size: int) -> common_pb2.Camera:
    """The reference view: azimuth 0 (the front, looking from +X), albedo shading, white background."""
    e = math.radians(elevation_deg)
    eye = distance * np.array([math.cos(e), 0.0, math.sin(e)])
    return common_pb2.Camera(
        intrinsics=common_pb2.Intrinsics(fovy_deg=fovy_deg, width=size, height=size),
        pose=common_pb2.Pose(
            camera_to_world=look_at(eye).reshape(-1).tolist(), azimuth_deg=0.0, elevation_deg=elevation_deg,
            distance=distance,
        ),
        shading=common_pb2.SHADING_MODE_ALBEDO,
        background=common_pb2.Background(color=common_pb2.Vec3(x=1.0, y=1.0, z=1.0)),
    )


def encode_png(array: np.ndarray) -> bytes:
    """(H, W, 3|4) uint8 -> PNG bytes (the stored input and reference images)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


__all__ = [
    "BUILTIN_SEGMENTERS",
    "DEFAULT_FRACTION",
    "ImageLimits",
    "PreparedImage",
    "Segmenter",
    "ThresholdSegmenter",
    "array_to_proto",
    "decode_depth",
    "decode_image",
    "encode_png",
    "fit_work_side",
    "foreground",
    "look_at",
    "prepare_image",
    "recenter",
    "reference_camera",
]
