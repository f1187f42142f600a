"""The CUDA stream the denoiser's work runs on: one per device, not the caller's default stream.

Why: in one process (`magic3d serve`'s local stack, the suite's in-process rows) a scene and the guidance engine
share the GPU from different threads. On PyTorch's default stream their kernels run strictly one after another,
so a pipelined scene (`pipelined_guidance`) overlaps only its host work with the prior's; on a stream of its own
the prior's UNet can run beside the scene's render and backward. Across processes (standalone server, Ray Serve)
nothing changes: the inputs arrive from the host, and the results leave through the host.

Ordering, both ways:
- in: where a request's input was made on a CUDA stream of the caller's (an in-process scene), the guidance
  stream first waits for what the caller's stream has queued so far;
- out: the caller's stream waits for the guidance stream before anything it queues later (reading the gradient,
  copying it to the host), and each CUDA result is marked as used by the caller's stream, so that the caching
  allocator does not hand its memory to the next batch while the caller may still read it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

from shared.guidance_api import SdsRequest, SdsResult


class GuidanceStreams:
    """Thread-safe: one stream per CUDA device, made on first use; CPU devices run on the caller's thread as is."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._lock = threading.Lock()

    def stream_for(self, device: torch.device) -> torch.cuda.Stream | None:
        if device.type != "cuda":
            return None
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        with self._lock:
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream(device=device)
            return self._streams[device]

    @contextlib.contextmanager
    def running(self, device: torch.device, requests: list[SdsRequest]) -> Iterator[list[SdsResult]]:
        """Runs the body on `device`'s guidance stream; the body appends its results to the yielded list, which
        are handed back ordered after the caller's stream (module doc)."""
        results: list[SdsResult] = []
        stream = self.stream_for(device)
        if stream is None:
            yield results
            return
        caller = torch.cuda.current_stream(stream.device)
        if any(request.inputs.is_cuda for request in requests):
            stream.wait_stream(caller)
        with torch.cuda.stream(stream):
            yield results
        caller.wait_stream(stream)
        for result in results:
            if result.grad.is_cuda:
                result.grad.record_stream(caller)


__all__ = ["GuidanceStreams"]
