"""Wall-clock timing shared by the benchmarks that time whole calls (prior_speed, guidance_sds)."""

from __future__ import annotations

import time
from typing import Callable

import torch


def wall_ms(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device | None = None) -> list[float]:
    """Wall milliseconds of each of `repeats` calls of fn() after `warmup` untimed calls. With a CUDA `device`, each
    timed call starts and ends with a synchronize, so a call is charged for its own GPU work."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else None
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync is not None:
            sync(device)
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times
