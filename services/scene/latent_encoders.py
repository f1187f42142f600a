"""The latent priors' published encoders as a scene runs them, to send latents instead of images.

Built once per weights digest and per scene service (SceneServicer keeps one LatentEncoders that all its stages
share), from the source the prior publishes (PriorInfo.latent_encoder), and on CUDA compiled with torch.compile:
inductor fuses the encoder's GroupNorm + SiLU passes, forward + backward 56.5 -> 43.1 ms for 4 images at 512x512 on
an H200 (bench/encoder_speed.py, BENCHMARKS.md), for about 50 s of compilation on the first call in a process with a
cold inductor cache. Sharing them across stages means only a service's first fine stage per encoder (and per image
batch shape) pays that, not every job.

Concurrency: scenes step on their own threads. Building an encoder and compiling it for a new input shape (forward
and, with a warm-up backward, the backward graph) happen under a lock, so two stages never compile the same module
at once; compiled calls for shapes already seen run unlocked.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

from services.guidance.priors.vae_encoder import VaeImageEncoder, build_encoder
from shared import logging as project_logging
from shared.cuda_capture import exclusive_capture_window
from shared.devices import resolve_dtype
from shared.errors import FailedPrecondition
from shared.guidance_api import PriorInfo

log = project_logging.get_logger(__name__)

Encoder = Callable[[torch.Tensor], torch.Tensor]


def resolve_compile(mode: str, device: torch.device) -> bool:
    """"auto" compiles on CUDA only: on the CPU the encoder costs the same on either side of the wire."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"latent_encoder_compile must be auto, on or off, got {mode!r}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


class CompiledEncoder:
    """A compiled encoder that falls back to the eager one if compiling it fails.

    The first call for each input shape (and strides, dtype, device, grad mode) compiles, under a lock, with a
    warm-up forward (and backward where the caller's autograd will need one) on a detached copy of the input, so that
    both graphs exist before callers on other threads run them. Only that warm-up is guarded: later errors (out of
    memory, bad input) are the caller's, as in eager mode.
    """

    def __init__(
        self, eager: VaeImageEncoder, backend: str | Callable, on_fallback: Callable[[Exception], None]
    ) -> None:
        self.eager = eager
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = torch.compile(eager, backend=backend)
        self._on_fallback = on_fallback
        self._compiled_for: set[tuple] = set()  # the guard keys compiled so far
        self._lock = threading.Lock()

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        key = self._guard_key(images)
        if key not in self._compiled_for:
            with self._lock:
                if key not in self._compiled_for and self._compiled is not None:
                    self._compile_for(images, key)
        compiled = self._compiled
        return self.eager(images) if compiled is None else compiled(images)

    @staticmethod
    def _guard_key(images: torch.Tensor) -> tuple:
        """What torch.compile's guards tell calls apart by here: a new key would recompile (outside the lock). The
        strides too: a fine stage's renders are (B, H, W, 3) images viewed as (B, 3, H, W), and a contiguous batch of
        the same shape recompiles."""
        grad = torch.is_grad_enabled() and images.requires_grad
        return tuple(images.shape), images.stride(), images.dtype, images.device.type, grad

    def _compile_for(self, images: torch.Tensor, key: tuple) -> None:
        assert self._compiled is not None
        try:
            # Not beside a CUDA-graph capture in another thread: compiling synchronises the device, which breaks both.
            with exclusive_capture_window():
                probe = images.detach().clone().requires_grad_(images.requires_grad)
                latents = self._compiled(probe)
                if key[-1]:  # the caller's autograd will run the backward graph: compile it here too
                    latents.float().sum().backward()
        except Exception as error:  # noqa: BLE001 - any compiler failure: the eager encoder gives the same latents
            self._compiled = None
            self._on_fallback(error)
            return
        self._compiled_for.add(key)


class LatentEncoders:
    """The encoders a scene runs, by weights digest; None where one could not be built (send images)."""

    def __init__(self, compile_backend: str | Callable = "inductor") -> None:
        self.compile_backend = compile_backend
        self._built: dict[tuple[str, str, bool], Encoder | None] = {}  # by (weights digest, device, compiled)
        self._lock = threading.Lock()  # one build per key, even when two stages ask at once

    def get(
        self, info: PriorInfo, mode: str, compile_mode: str, device: torch.device, job_id: str = ""
    ) -> Encoder | None:
        """The encoder to run here for `info`'s prior, or None to send images (GuidedStageConfig.guidance_input).

        Raises FailedPrecondition where mode is "latents" and the prior publishes no encoder or it cannot be built.
        """
        published = info.latent_encoder
        if mode == "images" or (mode == "auto" and device.type != "cuda"):
            return None
        if published is None:
            if mode == "latents":
                raise FailedPrecondition(f"prior {info.name!r} publishes no latent encoder", "guidance_input")
            return None
        compile_ = resolve_compile(compile_mode, device)
        key = (published.digest, str(device), compile_)
        with self._lock:
            if key not in self._built:
                self._built[key] = self._build(info, mode, compile_, device, job_id)
            return self._built[key]

    def _build(self, info: PriorInfo, mode: str, compile_: bool, device: torch.device, job_id: str) -> Encoder | None:
        published = info.latent_encoder
        context = dict(job_id=job_id, prior=info.name, source=published.source)
        try:
            encoder = build_encoder(published, device, resolve_dtype("auto", device))
        except Exception as error:  # a missing checkpoint, other weights, no diffusers: images still work
            if mode == "latents":
                raise FailedPrecondition(
                    f"cannot build prior {info.name!r}'s encoder from {published.source!r}: {error}", "guidance_input"
                ) from error
            log.warning("sending images: the prior's encoder cannot be built here", error=str(error), **context)
            return None
        log.info("sending latents: the prior's encoder runs here", digest=published.digest[:12], compiled=compile_,
                 **context)
        if not compile_:
            return encoder

        def fallback(error: Exception) -> None:
            log.warning("the encoder runs eagerly: compiling it failed", error=str(error), **context)

        return CompiledEncoder(encoder, self.compile_backend, fallback)
