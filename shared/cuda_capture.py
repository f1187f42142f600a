"""One process-wide lock between CUDA-graph captures and the one-off GPU work that cannot run beside one.

While a stream captures a CUDA graph, work in another thread of the same process that synchronises the device or
compiles kernels (torch.compile's first call and its warm-up backward) fails with "operation not permitted when
stream is capturing" and invalidates the capture. Seen on an H100 (2026-12-07, BENCHMARKS.md): in the local stack
the scene service compiled its VAE encoder at start-up while the in-process guidance captured the pixel prior's
graph; both fell back to eager, and the fine step took 120.7 ms (96.6 ms compiled in an earlier H200 run). In a deployment the two tiers are
separate processes, but two priors of one guidance process, or a scene and its in-process guidance, still share one.

Captures and compilations happen once per shape, so serialising them costs nothing in steady state. A capture does
not wait for the lock (`blocking=False`): its caller runs that call eagerly and captures on a later one, so a
minute-long compilation never stalls guidance. The lock is module state because what it guards is: a CUDA context
belongs to the process, not to any object in it.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

_LOCK = threading.Lock()


@contextmanager
def exclusive_capture_window(blocking: bool = True) -> Iterator[bool]:
    """Holds the process's capture lock for the block; yields whether it was acquired (always, when blocking)."""
    acquired = _LOCK.acquire(blocking=blocking)
    try:
        yield acquired
    finally:
        if acquired:
            _LOCK.release()


def capture_window_taken() -> bool:
    """Whether some thread holds the window now (a snapshot: for logs and tests, not for deciding to capture)."""
    return _LOCK.locked()
