"""The pieces of one-step-stale pipelined SDS (`GuidedStageConfig.pipelined_guidance`), used by `Stage.step`.

Sequentially a step is render -> guidance (the prior's UNet, the longest part) -> backward -> optimiser step, so the
scene idles while the prior runs and the prior idles while the scene renders and back-propagates. Pipelined, call k of
`Stage.step(prefetch=True)` is:

    (step k: rendered in call k-1, its guidance already in flight on the worker thread)
    render step k+1 from the current parameters          ||  guidance of step k
    wait for step k's image gradient
    submit step k+1's guidance                           ->  guidance of step k+1
    backward of step k, optimiser step, after-update     ||  guidance of step k+1

With theta_n the parameters after n updates, step n (the update that makes theta_{n+1}) is rendered from theta_{n-1}
when it was prefetched and from theta_n when it starts the pipeline (nothing was in flight: the first step of a run,
after a checkpoint resume, after a discarded step). Its gradient is applied to theta_n: one step stale, never more.

Step n's autograd graph outlives update n-1, which Adam applies in place; the graph must keep seeing the values it
was built from (autograd would otherwise raise "modified by an inplace operation", and the gradient would be wrong).
`ParameterShadows` renders each step from its own copy of the parameters; two copies suffice, since at most two
graphs are alive (the step being applied and the one prefetched).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import dataclasses
from typing import Callable, Iterable, Iterator, TypeVar

import torch
from torch import nn

from shared.cameras import Camera

T = TypeVar("T")


class ParameterShadows:
    """`sets` copies ("shadows") of some parameters of some modules, each swapped into the modules for a render.

    `swapped_in(index)` copies the parameters' current values into shadow set `index` and puts its tensors in the
    modules' `_parameters` for the block, so a graph built there holds the shadows, which later in-place updates of
    the real parameters (the masters, the optimiser's) do not touch. After that graph's backward, `move_grads(index)`
    hands the shadows' gradients to the masters for the optimiser. A set is `acquire`d while a graph holds it and
    `release`d after its backward (or when the graph is dropped). Generic over nn.Module: any parameter the modules
    register (directly or in submodules, shared ones once) is found by identity.
    """

    def __init__(self, modules: Iterable[nn.Module], parameters: Iterable[torch.Tensor], sets: int = 2) -> None:
        wanted = {id(p): p for p in parameters}
        self._slots: list[tuple[nn.Module, str, nn.Parameter]] = []
        for module in modules:
            for owner in module.modules():
                for name, parameter in owner._parameters.items():
                    if parameter is not None and id(parameter) in wanted:
                        self._slots.append((owner, name, parameter))
        found = {id(p) for _, _, p in self._slots}
        if missing := [p.shape for key, p in wanted.items() if key not in found]:
            raise ValueError(f"{len(missing)} parameters (shapes {missing[:3]}) belong to none of the modules")
        self._masters = list({id(p): p for _, _, p in self._slots}.values())
        self._shadows = [
            {id(p): nn.Parameter(torch.empty_like(p), requires_grad=p.requires_grad) for p in self._masters}
            for _ in range(sets)
        ]
        self._free = list(range(sets))[::-1]

    def acquire(self) -> int:
        if not self._free:
            raise RuntimeError("every shadow parameter set is held by a live graph")
        return self._free.pop()

    def release(self, index: int) -> None:
        for shadow in self._shadows[index].values():
            shadow.grad = None
        if index not in self._free:
            self._free.append(index)

    @property
    def held(self) -> int:
        return len(self._shadows) - len(self._free)

    @contextlib.contextmanager
    def swapped_in(self, index: int) -> Iterator[None]:
        shadows = self._shadows[index]
        with torch.no_grad():
            for master in self._masters:
                shadows[id(master)].copy_(master)
        for owner, name, master in self._slots:
            owner._parameters[name] = shadows[id(master)]
        try:
            yield
        finally:
            for owner, name, master in self._slots:
                owner._parameters[name] = master

    def move_grads(self, index: int) -> None:
        for master in self._masters:
            shadow = self._shadows[index][id(master)]
            if shadow.grad is not None:
                master.grad = shadow.grad if master.grad is None else master.grad + shadow.grad
            shadow.grad = None


@dataclasses.dataclass
class PendingStep:
    """A step rendered, its guidance submitted or about to be, not yet applied."""

    step: int  # the step index its guidance request and loss terms were built for
    draw: int  # the index of its camera draws (`draw_seed`)
    cameras: list[Camera]
    out: dict  # the stage's `_render` output (its graph holds shadow set `shadow`)
    terms: dict[str, torch.Tensor]  # its regularisers and reference-view terms (all but "sds")
    shadow: int
    future: concurrent.futures.Future | None = None


def draw_seed(seed: int, draw: int) -> int:
    """The seed of a pipelined step's own generator (its cameras and render jitter), by the stage seed and the
    step's draw index (steps applied or skipped before it), so a discarded step's retry draws the same numbers
    without rewinding the stage's generator. An LCG scramble keeps it apart from the guidance seeds (`step_seed`)."""
    return ((seed * 1_000_003 + draw) * 6364136223846793005 + 1442695040888963407) % (2**63)


class GuidanceWorker:
    """One background thread that runs a stage's guidance calls, one at a time.

    A call runs in a copy of the submitter's context (contextvars: `stop_retrying_when`, the log's bound job id).
    On CUDA it runs on a side stream that first waits for the work the submitter had queued (the render of the images
    it reads), and the result is ready when the future is: `result` then marks the returned tensors as used by the
    caller's stream, so the caching allocator does not hand their memory to the side stream while the caller's
    kernels still read them.
    """

    def __init__(self, device: torch.device) -> None:
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def submit(self, call: Callable[[], T]) -> concurrent.futures.Future[T]:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="guidance")
        context = contextvars.copy_context()
        if self._stream is None:
            return self._executor.submit(context.run, call)
        stream = self._stream
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self._device))

        def on_side_stream() -> T:
            stream.wait_event(ready)
            with torch.cuda.stream(stream):
                result = call()
            stream.synchronize()
            return result

        return self._executor.submit(context.run, on_side_stream)

    def result(self, future: concurrent.futures.Future[T]) -> T:
        value = future.result()
        if self._stream is not None:
            current = torch.cuda.current_stream(self._device)
            for item in value if isinstance(value, tuple) else (value,):
                if isinstance(item, torch.Tensor) and item.is_cuda:
                    item.record_stream(current)
        return value

    @staticmethod
    def settle(future: concurrent.futures.Future) -> None:
        """Waits for a call whose result is not wanted (a discarded step), keeping none of its errors."""
        if not future.cancel():
            concurrent.futures.wait([future])
