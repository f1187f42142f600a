"""Start-up warm-up of the fine stage's latent encoder (SceneServiceConfig.warm_latent_encoder).

A GPU scene service builds its latent prior's VAE encoder once and compiles it once per input shape
(services/scene/latent_encoders.py): about 70 s on an H200 with a cold inductor cache, which without a warm-up the
service's first fine stage pays inside a user's job. `warm_up_latent_encoder` does that work at start-up instead, in
a background thread (`SceneServicer.start_encoder_warm_up`): it asks the guidance tier for the configured fine
stage's priors' PriorInfo (retrying with backoff while the tier is not up yet, for at most `wait_for_guidance_s`),
gets their encoders from the service's LatentEncoders as a fine step does, and runs each on image batches of the
shape and memory layout the fine stage will render, forward and backward, through the same call as a step
(`steps.encode_images`), so that the compiled encoder's guard keys are the first job's. A stage that steps meanwhile
waits on LatentEncoders' and CompiledEncoder's locks, as it would for another stage's compile; serving is never
blocked. The warm-up never
raises: where it cannot run it logs why (`encoder_warm_up_skipped`) and the first fine stage builds the encoder.

Warm the shape production jobs use: a compiled encoder called later with another batch shape compiles again (and
torch.compile then makes the changed sizes dynamic), so a warm-up at the wrong size costs more than it saves.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.scene.config import FineConfig
from services.scene.guidance import Guidance
from services.scene.latent_encoders import LatentEncoders
from services.scene.steps import encode_images
from shared import logging as project_logging
from shared.errors import Cancelled, DeadlineExceeded, ResourceExhausted, ServiceError, Unavailable
from shared.guidance_api import PriorInfo
from shared.guidance_client import stop_retrying_when

log = project_logging.get_logger(__name__)

# What a prior_info call raises while the guidance tier is down, starting or busy: tried again until the bound.
RETRYABLE = (Unavailable, DeadlineExceeded, ResourceExhausted, ConnectionError)
WARM_UP_JOB_ID = "encoder-warm-up"  # the job id of the warm-up's log lines


class EncoderWarmUpConfig(BaseModel):
    """SceneServiceConfig.warm_latent_encoder. A bare mode (`warm_latent_encoder: "off"`) is accepted too."""

    model_config = ConfigDict(extra="forbid")

    # "auto": on a CUDA service only (where the encoder is compiled and a fine stage sends latents); "on": on any
    # device, doing what the fine stage would do there (tests); "off": the service's first fine stage does it.
    mode: Literal["auto", "on", "off"] = "auto"
    # The fine-stage image batch to warm for (batch_size x 3 x resolution x resolution): None takes fine_defaults'
    # (its batch_size, and its resolution or every side of its resolution_schedule). Set them to what the jobs'
    # presets send: fine_defaults are only what a request leaves unset.
    batch_size: int | None = Field(default=None, ge=1, le=64)
    resolution: int | None = Field(default=None, ge=16, le=2048)
    # How long to wait for the guidance tier (retried with backoff) before giving up with a warning.
    wait_for_guidance_s: float = Field(default=600.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _bare_mode(cls, value):
        return {"mode": value} if isinstance(value, (str, bool)) else value

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_booleans(cls, value):
        # YAML 1.1 (PyYAML) reads a bare off / on as a boolean.
        return ("on" if value else "off") if isinstance(value, bool) else value

    def fine_config(self, fine_defaults: FineConfig) -> FineConfig:
        """The fine stage to warm for: the service's fine defaults with this config's batch and resolution."""
        update: dict = {}
        if self.batch_size is not None:
            update["batch_size"] = self.batch_size
        if self.resolution is not None:
            update |= {"resolution": self.resolution, "resolution_schedule": None}
        return fine_defaults.model_copy(update=update)


@dataclass(frozen=True)
class WarmUpResult:
    status: Literal["done", "skipped"]
    reason: str = ""
    seconds: float = 0.0
    shapes: tuple[tuple[int, ...], ...] = ()  # the image batches the encoders ran on
    priors: tuple[str, ...] = ()  # the priors whose encoders were warmed


def resolve_warm_up(mode: str, device: torch.device) -> bool:
    """"auto" warms on CUDA only: elsewhere the encoder is not compiled and a fine stage sends images."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"warm_latent_encoder.mode must be auto, on or off, got {mode!r}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def warm_up_shapes(config: FineConfig) -> list[tuple[int, int, int, int]]:
    """The image batches (B, 3, S, S) a fine stage with `config` runs the encoder on, in the order its steps first
    render them (every side of its resolution schedule, read piecewise-constant)."""
    schedule = config.resolution_schedule
    sides = [config.render_resolution(0)] if schedule is None else [int(value) for value in schedule.values]
    return [(config.batch_size, 3, side, side) for side in dict.fromkeys(sides)]


class _GiveUp(Exception):
    pass


def warm_up_latent_encoder(
    encoders: LatentEncoders,
    guidance: Guidance,
    config: FineConfig,
    device: str | torch.device,
    mode: str = "auto",
    wait_for_guidance_s: float = 600.0,
    stop: threading.Event | None = None,
    initial_backoff_s: float = 0.5,
    max_backoff_s: float = 15.0,
) -> WarmUpResult:
    """Builds (and compiles, per `config.latent_encoder_compile`) `config`'s priors' encoders in `encoders` and runs
    them, forward and backward, on the image batches `config` renders on `device`. Never raises; `stop` (the
    service stopping) ends a wait for the guidance tier."""
    if not resolve_warm_up(mode, torch.device(device)):
        reason = "off" if mode == "off" else f"{mode}: not a CUDA service ({torch.device(device).type})"
        log.info("encoder_warm_up_skipped", reason=reason)
        return WarmUpResult("skipped", reason)
    stop = stop or threading.Event()
    began = time.monotonic()
    shapes = warm_up_shapes(config)
    names = list(dict.fromkeys(term.prior for term in config.priors))
    log.info("encoder_warm_up_started", priors=names, shapes=[list(shape) for shape in shapes], device=str(device))
    try:
        # As a rendered batch names its device ("cuda:0", not "cuda"): LatentEncoders keys its encoders by it.
        target = torch.empty(0, device=device).device
        warmed: list[str] = []
        for name in names:
            info = _prior_info(guidance, name, config.guidance_timeout_s, began + wait_for_guidance_s, stop,
                               initial_backoff_s, max_backoff_s)
            encoder = encoders.get(info, config.guidance_input, config.latent_encoder_compile, target, WARM_UP_JOB_ID)
            if encoder is None:  # images sent: guidance_input, no published encoder, or it cannot be built here
                continue
            generator = torch.Generator().manual_seed(0)  # never torch's global RNG, which scenes draw from
            for batch, channels, height, width in shapes:
                # Laid out as the fine stage's renders are (MeshRenderer: (B, H, W, 3) viewed as (B, 3, H, W)): the
                # strides are part of the compiled encoder's guards.
                rendered = torch.rand((batch, height, width, channels), generator=generator).to(target)
                images = rendered.permute(0, 3, 1, 2)
                leaf, latents = encode_images(encoder, images)
                torch.autograd.grad(latents.float().sum(), leaf)  # the step's backward through the encoder
            warmed.append(name)
        if target.type == "cuda":  # this thread's stream: a device-wide wait would break another thread's capture
            torch.cuda.current_stream(target).synchronize()
    except _GiveUp as gave_up:
        log.warning("encoder_warm_up_skipped", reason=str(gave_up), seconds=round(time.monotonic() - began, 1))
        return WarmUpResult("skipped", str(gave_up), time.monotonic() - began)
    except Exception as error:  # noqa: BLE001 - a failed warm-up leaves the work to the first fine stage
        reason = f"failed: {type(error).__name__}: {error}"
        log.warning("encoder_warm_up_skipped", reason=reason, seconds=round(time.monotonic() - began, 1),
                    exc_info=True)
        return WarmUpResult("skipped", reason, time.monotonic() - began)
    seconds = time.monotonic() - began
    if not warmed:
        reason = f"the fine stage sends images to {names} here (guidance_input {config.guidance_input!r})"
        log.info("encoder_warm_up_skipped", reason=reason, seconds=round(seconds, 1))
        return WarmUpResult("skipped", reason, seconds)
    log.info("encoder_warm_up_done", seconds=round(seconds, 1), priors=warmed)
    return WarmUpResult("done", "", seconds, tuple(shapes), tuple(warmed))


def _prior_info(
    guidance: Guidance, name: str, timeout_s: float, deadline: float, stop: threading.Event,
    initial_backoff_s: float, max_backoff_s: float,
) -> PriorInfo:
    """`name`'s PriorInfo, retried with doubling backoff while the tier is unavailable, until `deadline` or `stop`
    (raising _GiveUp). A GuidanceClient's own outage retries stop there too (`stop_retrying_when`)."""
    backoff, attempts = initial_backoff_s, 0

    def ended() -> bool:
        return stop.is_set() or time.monotonic() >= deadline

    while True:
        attempts += 1
        left = deadline - time.monotonic()
        try:
            with stop_retrying_when(ended):
                return guidance.prior_info(name, min(timeout_s, max(left, 1.0)))
        except Cancelled as error:  # the client stopped retrying its outage because ended()
            last = error.message
        except RETRYABLE as error:
            last = error.message if isinstance(error, ServiceError) else str(error)
        except ServiceError as error:  # an unknown prior, a refused token: waiting will not help
            raise _GiveUp(f"prior {name!r}: {type(error).__name__}: {error.message}") from None
        if stop.is_set():
            raise _GiveUp("the service is stopping")
        left = deadline - time.monotonic()
        if left <= 0:
            raise _GiveUp(f"prior {name!r}: the guidance tier was still unavailable after {attempts} attempts "
                          f"(warm_latent_encoder.wait_for_guidance_s): {last}")
        log.info("encoder_warm_up_waiting", prior=name, attempt=attempts, retry_in_s=round(min(backoff, left), 2),
                 error=last)
        stop.wait(min(backoff, left))
        backoff = min(backoff * 2, max_backoff_s)
