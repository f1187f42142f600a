"""Device and dtype choice in one place: fp16/bf16 on GPU, fp32 on CPU unless configured otherwise."""

from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is float16 on CUDA and float32 elsewhere (half precision on CPU is slow and lossy)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of `tensor` through pinned memory (the tensor itself when it is on the CPU already).

    A pageable device-to-host copy stages through a driver buffer: on the H200 host a 6 MiB SDS gradient took about
    7 ms that way (bench/prior_speed.py --profile), against well under a millisecond from pinned memory. PyTorch
    pins the destination of a non-blocking copy to the CPU and caches such buffers, so repeated calls allocate little.
    """
    if tensor.device.type != "cuda":
        return tensor
    host = tensor.to("cpu", non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()  # the copy was asynchronous: wait before reading
    return host


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; a CPU tensor going to a GPU goes through pinned memory (see `to_host`)."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
