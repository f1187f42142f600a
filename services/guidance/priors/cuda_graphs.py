"""CUDA-graph replay of a prior's denoiser forward.

The SD UNet's forward at batch 4 with CFG (8 rows of 64x64 latents) is about 30 ms of GPU work, but it launches
some 1,500 kernels from Python; on the lent H200 the same call took anywhere from 30 to 57 ms, because the host
could not always launch them as fast as the GPU ran them (bench/prior_speed.py, medians against minima). A CUDA
graph records the launches once per input shape and replays them with one call, so the time is the GPU's.

Each distinct input shape (the number of rows varies with dynamic batching) is captured on its first call; all
graphs share one memory pool. A shape whose capture fails runs eagerly from then on, with one warning. While
another thread of the process holds the capture window (shared/cuda_capture.py: a compilation, another capture) a
new shape runs eagerly and is captured on a later call.
"""

from __future__ import annotations

import threading
from typing import Callable

import structlog
import torch

from shared.cuda_capture import exclusive_capture_window

log = structlog.get_logger(__name__)

_ShapeKey = tuple[tuple[tuple[int, ...], torch.dtype], ...]
CUDA_GRAPH_MODES = ("auto", "on", "off")


def resolve_cuda_graphs(mode: str, device: torch.device) -> bool:
    """"auto" and "on" capture on CUDA; there is nothing to capture elsewhere."""
    if mode not in CUDA_GRAPH_MODES:
        raise ValueError(f"cuda_graphs must be one of {CUDA_GRAPH_MODES}, got {mode!r}")
    return mode != "off" and device.type == "cuda"


class _Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor], output: torch.Tensor) -> None:
        self.graph, self.inputs, self.output = graph, inputs, output


class GraphedForward:
    """Calls `forward(*tensors) -> tensor` (no autograd) through a CUDA graph per input shape and dtype.

    The forward is passed on every call rather than kept: a prior that holds its GraphedForward and a bound method of
    itself inside it would form a reference cycle, and its GPU memory would wait for Python's cycle collector after
    the pool drops it (seen in the GPU suite: an evicted IF-I-XL's 20 GB lingered into the next section).
    """

    def __init__(self, warmup_calls: int = 2) -> None:
        self.warmup_calls = warmup_calls
        self._graphs: dict[_ShapeKey, _Captured | None] = {}  # None: capture failed, run eagerly
        self._pool = None
        self._lock = threading.Lock()

    @property
    def captured_shapes(self) -> int:
        return sum(entry is not None for entry in self._graphs.values())

    def __call__(self, forward: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        """forward(*inputs), replayed from the graph captured for these shapes (captured now if new)."""
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        with self._lock:
            if key not in self._graphs:
                with exclusive_capture_window(blocking=False) as free:
                    if free:
                        self._graphs[key] = self._capture(forward, inputs)
            captured = self._graphs.get(key)
            if captured is None:  # capture failed, or another thread compiles or captures now: eager this time
                with torch.no_grad():
                    return forward(*inputs)
            for static, value in zip(captured.inputs, inputs):
                static.copy_(value)
            captured.graph.replay()
            # The output buffer is overwritten by the next replay (of any graph in the shared pool): hand out a copy.
            return captured.output.clone()

    def _capture(self, forward: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> _Captured | None:
        static = [t.detach().clone() for t in inputs]
        try:
            side = torch.cuda.Stream(device=static[0].device)  # warm-up (cuDNN/cuBLAS choices) off the main stream
            side.wait_stream(torch.cuda.current_stream(static[0].device))
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(self.warmup_calls):
                    forward(*static)
            torch.cuda.current_stream(static[0].device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (another prior, an in-process scene) may use the GPU meanwhile.
            with torch.no_grad(), torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                output = forward(*static)
        except Exception as error:  # noqa: BLE001 -- any capture failure means: run this shape eagerly
            log.warning("cuda_graph_capture_failed", shapes=[list(t.shape) for t in static], error=repr(error))
            _reset_capture_state(static[0].device)
            return None
        if self._pool is None:
            self._pool = graph.pool()
        log.info("cuda_graph_captured", shapes=[list(t.shape) for t in static])
        return _Captured(graph, static, output)


def _reset_capture_state(device: torch.device) -> None:
    """Leaves the device usable after a failed capture.

    A capture that fails inside the forward ends without closing the CUDA random generator's capture bookkeeping,
    and every later CUDA random draw in the process then fails with "Offset increment outside graph capture"
    (seen on the H200 in this project's GPU tests). One capture that succeeds closes it again.
    """
    torch.cuda.synchronize(device)
    with torch.cuda.device(device):
        with torch.cuda.graph(torch.cuda.CUDAGraph(), capture_error_mode="thread_local"):
            torch.zeros(1, device=device).add_(1)
    torch.cuda.synchronize(device)
