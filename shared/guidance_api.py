"""The guidance tier's contract: the plain request/result types of ComputeSds, ListPriors and CheckPrompt, and
their magic3d.v1 translation (translation and field checks only).

Shared by both sides of the wire: the guidance servers (standalone and Ray Serve) decode with it, the scene service
and the benchmarks encode with it (through `shared.guidance_client`). Nothing here knows how gradients are made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum

import torch
from magic3d.v1 import common_pb2, guidance_pb2

from shared import cameras, tensors
from shared.cameras import Camera
from shared.tensor_digest import tensor_sha256
from shared.errors import InvalidArgument
# The torch-free part of the contract (the orchestrator's share) lives in shared/guidance_types.py; one class each.
from shared.guidance_types import WEIGHTING_FROM_PROTO as _WEIGHTING_FROM_PROTO
from shared.guidance_types import WEIGHTING_TO_PROTO as _WEIGHTING_TO_PROTO
from shared.guidance_types import (  # noqa: F401 - re-exported as part of the contract
    PromptCheck,
    Weighting,
    prompt_check_from_proto,
    weighting_from_proto,
)


class PriorKind(str, Enum):
    PIXEL = "pixel"
    LATENT = "latent"
    ANALYTIC = "analytic"
    VIEW_CONDITIONED = "view_conditioned"


class Conditioning(str, Enum):
    TEXT = "text"
    NEGATIVE_TEXT = "negative_text"
    IMAGE = "image"
    RELATIVE_POSE = "relative_pose"
    CAMERA = "camera"


@dataclass(frozen=True)
class LatentEncoderInfo:
    """A latent prior's image encoder, as a caller needs it to send latents (mirrors magic3d.v1.LatentEncoder)."""

    source: str  # a diffusers checkpoint (directory or hub id) or "random:<size>"
    subfolder: str
    image_resolution: int
    latent_channels: int
    latent_resolution: int
    digest: str  # SHA-256 of the weights; latents made with other weights are refused

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_resolution, self.latent_resolution)


@dataclass(frozen=True)
class PriorInfo:
    """What a caller needs to know about a served prior (mirrors magic3d.v1.PriorInfo)."""

    name: str
    kind: PriorKind
    native_resolution: int
    max_prompt_tokens: int
    accepted_conditioning: tuple[Conditioning, ...]
    default_guidance_scale: float
    default_time_range: tuple[float, float]
    default_weighting: Weighting = Weighting.SDS
    checkpoint_ids: tuple[str, ...] = ("default",)
    max_batch_size: int = 8
    # True where the prior cannot work without one camera per image (the analytic prior re-renders them).
    requires_cameras: bool = False
    # Set where a caller may encode images itself and send latents (SdsRequest.latents) instead.
    latent_encoder: LatentEncoderInfo | None = None
    # Textual-inversion embeddings the server can load into this prior's text encoder, by name.
    learned_embeddings: tuple[str, ...] = ()


@dataclass
class ImageCondition:
    """A job's reference image and camera (Magic123), for priors that accept Conditioning.IMAGE.

    `image` is (1, 4, H, W) RGBA float32 in [0, 1] (alpha = foreground), or None when the caller sends only the
    digest of an image it sent before: the server then looks it up in its cache by `image_sha256` (the digest of
    the image's proto Tensor, shared.tensor_digest) and, where it does not hold it, refuses the request with
    FAILED_PRECONDITION on field `image_condition.image` so that the caller resends it."""

    reference_camera: Camera
    image_sha256: str
    image: torch.Tensor | None = None
    # (delta elevation deg, delta azimuth deg, delta distance) per image; empty: derived from the request's cameras.
    relative_poses: list[tuple[float, float, float]] = field(default_factory=list)


@dataclass
class SdsRequest:
    """One ComputeSds call, validated and decoded, on any device. Exactly one input: `images` (B, 3, H, W) float in
    [0, 1], or `latents` (B, C, h, w) made by the prior's published encoder (PriorInfo.latent_encoder), whose digest
    the request then carries. The result's gradient is w.r.t. that input."""

    job_id: str
    prior: str
    images: torch.Tensor | None
    prompt: str
    negative_prompt: str = ""
    cameras: list[Camera] = field(default_factory=list)
    checkpoint_id: str = ""
    view_dependent_prompt: bool = False
    time_range: tuple[float, float] | None = None
    explicit_t: list[float] | None = None
    guidance_scale: float | None = None
    weighting: Weighting | None = None
    seed: int = 0
    grad_dtype: torch.dtype = torch.float32
    latents: torch.Tensor | None = None
    latent_encoder_digest: str = ""
    image_condition: ImageCondition | None = None
    # Names of textual-inversion embeddings the server knows for this (text) prior.
    learned_embeddings: tuple[str, ...] = ()

    @property
    def inputs(self) -> torch.Tensor:
        """What the gradient is taken w.r.t.: the latents where sent, else the images."""
        if self.latents is not None:
            return self.latents
        if self.images is None:
            raise ValueError("an SdsRequest carries images or latents; this one has neither")
        return self.images

    @property
    def batch_size(self) -> int:
        return int(self.inputs.shape[0])


@dataclass
class SdsResult:
    grad: torch.Tensor  # the shape of the request's input (images or latents), in its grad_dtype, on the prior's device
    t: list[float]
    loss: list[float]
    finite: list[bool]
    prompts: list[str]
    server_time_s: float = 0.0


# -- magic3d.v1 translation ----------------------------------------------------------------------------------------

_KIND_TO_PROTO = {
    PriorKind.PIXEL: guidance_pb2.PRIOR_KIND_PIXEL,
    PriorKind.LATENT: guidance_pb2.PRIOR_KIND_LATENT,
    PriorKind.ANALYTIC: guidance_pb2.PRIOR_KIND_ANALYTIC,
    PriorKind.VIEW_CONDITIONED: guidance_pb2.PRIOR_KIND_VIEW_CONDITIONED,
}
_CONDITIONING_TO_PROTO = {
    Conditioning.TEXT: guidance_pb2.CONDITIONING_TEXT,
    Conditioning.NEGATIVE_TEXT: guidance_pb2.CONDITIONING_NEGATIVE_TEXT,
    Conditioning.IMAGE: guidance_pb2.CONDITIONING_IMAGE,
    Conditioning.RELATIVE_POSE: guidance_pb2.CONDITIONING_RELATIVE_POSE,
    Conditioning.CAMERA: guidance_pb2.CONDITIONING_CAMERA,
}
_GRAD_DTYPES = {
    common_pb2.SCALAR_TYPE_UNSPECIFIED: torch.float32,
    common_pb2.SCALAR_TYPE_FLOAT32: torch.float32,
    common_pb2.SCALAR_TYPE_FLOAT16: torch.float16,
    common_pb2.SCALAR_TYPE_BFLOAT16: torch.bfloat16,
}


def prior_info_to_proto(info: PriorInfo) -> guidance_pb2.PriorInfo:
    return guidance_pb2.PriorInfo(
        name=info.name,
        kind=_KIND_TO_PROTO[info.kind],
        native_resolution=info.native_resolution,
        max_prompt_tokens=info.max_prompt_tokens,
        accepted_conditioning=[_CONDITIONING_TO_PROTO[c] for c in info.accepted_conditioning],
        default_guidance_scale=info.default_guidance_scale,
        default_time_range=guidance_pb2.TimeRange(min=info.default_time_range[0], max=info.default_time_range[1]),
        default_weighting=_WEIGHTING_TO_PROTO[info.default_weighting],
        checkpoint_ids=list(info.checkpoint_ids),
        max_batch_size=info.max_batch_size,
        latent_encoder=_latent_encoder_to_proto(info.latent_encoder),
        learned_embeddings=list(info.learned_embeddings),
    )


def _latent_encoder_to_proto(encoder: LatentEncoderInfo | None) -> guidance_pb2.LatentEncoder | None:
    # LatentEncoderInfo's fields are the message's, by name.
    return None if encoder is None else guidance_pb2.LatentEncoder(**dataclasses.asdict(encoder))


def _latent_encoder_from_proto(message: guidance_pb2.PriorInfo) -> LatentEncoderInfo | None:
    if not message.HasField("latent_encoder"):
        return None
    names = [f.name for f in dataclasses.fields(LatentEncoderInfo)]
    return LatentEncoderInfo(**{name: getattr(message.latent_encoder, name) for name in names})


_KIND_FROM_PROTO = {v: k for k, v in _KIND_TO_PROTO.items()}
_CONDITIONING_FROM_PROTO = {v: k for k, v in _CONDITIONING_TO_PROTO.items()}


def prior_info_from_proto(message: guidance_pb2.PriorInfo) -> PriorInfo:
    """The inverse of prior_info_to_proto. `requires_cameras` is not on the wire: it follows CAMERA conditioning."""
    conditioning = tuple(
        _CONDITIONING_FROM_PROTO[c] for c in message.accepted_conditioning if c in _CONDITIONING_FROM_PROTO
    )
    return PriorInfo(
        name=message.name,
        kind=_KIND_FROM_PROTO.get(message.kind, PriorKind.PIXEL),
        native_resolution=message.native_resolution,
        max_prompt_tokens=message.max_prompt_tokens,
        accepted_conditioning=conditioning,
        default_guidance_scale=message.default_guidance_scale,
        default_time_range=(message.default_time_range.min, message.default_time_range.max),
        default_weighting=_WEIGHTING_FROM_PROTO.get(message.default_weighting, Weighting.SDS),
        checkpoint_ids=tuple(message.checkpoint_ids) or ("default",),
        max_batch_size=message.max_batch_size,
        requires_cameras=Conditioning.CAMERA in conditioning,
        latent_encoder=_latent_encoder_from_proto(message),
        learned_embeddings=tuple(message.learned_embeddings),
    )


def sds_request_from_proto(message: guidance_pb2.ComputeSdsRequest) -> SdsRequest:
    """Decodes a request. Checks that need the prior (shape limits, prompt) happen in sds.validate_request."""
    if not message.prior:
        raise InvalidArgument("name the prior to use", "prior")
    if message.HasField("images") == message.HasField("latents"):
        raise InvalidArgument("send exactly one of images and latents", "images")
    images = tensors.from_proto(message.images, field="images") if message.HasField("images") else None
    latents = tensors.from_proto(message.latents, field="latents") if message.HasField("latents") else None
    if message.weighting not in _WEIGHTING_FROM_PROTO and message.weighting != guidance_pb2.WEIGHTING_UNSPECIFIED:
        raise InvalidArgument(f"unknown weighting {message.weighting}", "weighting")
    if message.grad_dtype not in _GRAD_DTYPES:
        raise InvalidArgument("gradients are returned as float32, float16 or bfloat16", "grad_dtype")
    timestep = message.WhichOneof("timestep")
    return SdsRequest(
        job_id=message.job_id,
        prior=message.prior,
        checkpoint_id=message.checkpoint_id,
        images=images,
        cameras=[cameras.from_proto(c, field=f"cameras[{i}]") for i, c in enumerate(message.cameras)],
        prompt=message.prompt,
        negative_prompt=message.negative_prompt,
        view_dependent_prompt=message.view_dependent_prompt,
        time_range=(message.time_range.min, message.time_range.max) if timestep == "time_range" else None,
        explicit_t=list(message.explicit_times.t) if timestep == "explicit_times" else None,
        guidance_scale=message.guidance_scale if message.HasField("guidance_scale") else None,
        weighting=_WEIGHTING_FROM_PROTO.get(message.weighting),
        seed=message.seed,
        grad_dtype=_GRAD_DTYPES[message.grad_dtype],
        latents=latents,
        latent_encoder_digest=message.latent_encoder_digest,
        image_condition=_image_condition_from_proto(message),
        learned_embeddings=tuple(message.learned_embeddings),
    )


def _image_condition_from_proto(message: guidance_pb2.ComputeSdsRequest) -> ImageCondition | None:
    if not message.HasField("image_condition"):
        return None
    condition = message.image_condition
    if not condition.image_sha256:
        raise InvalidArgument("give the reference image's SHA-256", "image_condition.image_sha256")
    if not condition.HasField("reference_camera"):
        raise InvalidArgument("give the camera the reference image was taken from", "image_condition.reference_camera")
    image = None
    if condition.HasField("image"):
        if tensor_sha256(condition.image) != condition.image_sha256:
            raise InvalidArgument("the image does not match image_sha256", "image_condition.image_sha256")
        image = tensors.from_proto(condition.image, field="image_condition.image")
        if image.ndim != 4 or tuple(image.shape[:2]) != (1, 4):
            raise InvalidArgument(
                f"the reference image must be (1, 4, H, W) RGBA, got {list(image.shape)}", "image_condition.image"
            )
    return ImageCondition(
        reference_camera=cameras.from_proto(condition.reference_camera, field="image_condition.reference_camera"),
        image_sha256=condition.image_sha256,
        image=image,
        relative_poses=[
            (p.delta_elevation_deg, p.delta_azimuth_deg, p.delta_distance) for p in condition.relative_poses
        ],
    )


def image_condition_to_proto(condition: ImageCondition, with_image: bool) -> guidance_pb2.ImageCondition:
    """`with_image` False sends the digest alone (the server's cache holds the image after its first request)."""
    message = guidance_pb2.ImageCondition(
        reference_camera=cameras.to_proto(condition.reference_camera),
        image_sha256=condition.image_sha256,
        relative_poses=[
            guidance_pb2.RelativePose(delta_elevation_deg=e, delta_azimuth_deg=a, delta_distance=d)
            for e, a, d in condition.relative_poses
        ],
    )
    if with_image and condition.image is not None:
        message.image.CopyFrom(tensors.to_proto(condition.image))
    return message


def sds_request_to_proto(request: SdsRequest, with_image: bool = True) -> guidance_pb2.ComputeSdsRequest:
    """The client side of the same translation (used by the scene service and the benchmarks). `with_image`: see
    image_condition_to_proto."""
    # The input goes in at construction: CopyFrom would copy its (up to 12 MiB of) bytes once more.
    inputs = {"images": request.images} if request.images is not None else {}
    if request.latents is not None:
        inputs["latents"] = request.latents
    message = guidance_pb2.ComputeSdsRequest(
        **{name: tensors.to_proto(tensor) for name, tensor in inputs.items()},
        job_id=request.job_id,
        prior=request.prior,
        checkpoint_id=request.checkpoint_id,
        cameras=[cameras.to_proto(c) for c in request.cameras],
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        view_dependent_prompt=request.view_dependent_prompt,
        seed=request.seed,
        grad_dtype=tensors.proto_scalar_type(request.grad_dtype),
        latent_encoder_digest=request.latent_encoder_digest,
        learned_embeddings=list(request.learned_embeddings),
    )
    if request.image_condition is not None:
        message.image_condition.CopyFrom(image_condition_to_proto(request.image_condition, with_image))
    if request.time_range is not None:
        message.time_range.CopyFrom(guidance_pb2.TimeRange(min=request.time_range[0], max=request.time_range[1]))
    if request.explicit_t is not None:
        message.explicit_times.CopyFrom(guidance_pb2.ExplicitTimes(t=request.explicit_t))
    if request.guidance_scale is not None:
        message.guidance_scale = request.guidance_scale
    if request.weighting is not None:
        message.weighting = _WEIGHTING_TO_PROTO[request.weighting]
    return message


def sds_response_to_proto(result: SdsResult, prior: str, checkpoint_id: str) -> guidance_pb2.ComputeSdsResponse:
    return guidance_pb2.ComputeSdsResponse(
        grad=tensors.to_proto(result.grad),
        t=result.t,
        loss=result.loss,
        finite=result.finite,
        prompts=result.prompts,
        server_time_s=result.server_time_s,
        prior=prior,
        checkpoint_id=checkpoint_id or "default",
    )


def sds_result_from_proto(message: guidance_pb2.ComputeSdsResponse) -> SdsResult:
    return SdsResult(
        grad=tensors.from_proto(message.grad, field="grad"),
        t=list(message.t),
        loss=list(message.loss),
        finite=list(message.finite),
        prompts=list(message.prompts),
        server_time_s=message.server_time_s,
    )


def check_prompt_request_fields(message: guidance_pb2.CheckPromptRequest) -> None:
    """What CheckPrompt can check without the prior (the rest is `engine.check_prompt`)."""
    if not message.prior:
        raise InvalidArgument("name the prior to use", "prior")


def prompt_check_to_proto(check: PromptCheck) -> guidance_pb2.CheckPromptResponse:
    return guidance_pb2.CheckPromptResponse(
        prompt_tokens=check.token_count,
        negative_prompt_tokens=check.negative_token_count,
        max_tokens=check.max_tokens,
    )
