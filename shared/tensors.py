"""magic3d.v1.Tensor <-> torch.Tensor: raw little-endian bytes with dtype and shape, never pickles."""

from __future__ import annotations

import math

import numpy as np
import torch
from magic3d.v1 import common_pb2

from shared.devices import to_host
from shared.errors import InvalidArgument

_PROTO_BY_TORCH = {
    torch.float32: common_pb2.SCALAR_TYPE_FLOAT32,
    torch.float16: common_pb2.SCALAR_TYPE_FLOAT16,
    torch.bfloat16: common_pb2.SCALAR_TYPE_BFLOAT16,
    torch.uint8: common_pb2.SCALAR_TYPE_UINT8,
    torch.int32: common_pb2.SCALAR_TYPE_INT32,
    torch.int64: common_pb2.SCALAR_TYPE_INT64,
}
# Keyed by plain int: a decoded message's dtype field may hold a value this side does not know.
_TORCH_BY_PROTO: dict[int, torch.dtype] = {k: v for v, k in _PROTO_BY_TORCH.items()}
# numpy has no bfloat16: those bytes travel as int16 words and are reinterpreted by torch.
_NUMPY_CARRIER = {
    torch.float32: "<f4",
    torch.float16: "<f2",
    torch.bfloat16: "<i2",
    torch.uint8: "u1",
    torch.int32: "<i4",
    torch.int64: "<i8",
}


def proto_scalar_type(dtype: torch.dtype) -> common_pb2.ScalarType:
    if dtype not in _PROTO_BY_TORCH:
        raise ValueError(f"dtype {dtype} has no wire form")
    return _PROTO_BY_TORCH[dtype]


def torch_dtype(scalar_type: int, field: str = "dtype") -> torch.dtype:
    if scalar_type not in _TORCH_BY_PROTO:
        name = common_pb2.ScalarType.Name(scalar_type) if scalar_type in common_pb2.ScalarType.values() else scalar_type
        raise InvalidArgument(f"unsupported dtype {name}", field=field)
    return _TORCH_BY_PROTO[scalar_type]


def to_proto(tensor: torch.Tensor) -> common_pb2.Tensor:
    tensor = to_host(tensor.detach()).contiguous()
    carrier = _NUMPY_CARRIER[tensor.dtype]
    words = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    data = words.numpy().astype(carrier, copy=False).tobytes()
    return common_pb2.Tensor(dtype=proto_scalar_type(tensor.dtype), shape=list(tensor.shape), data=data)


def from_proto(message: common_pb2.Tensor, field: str = "tensor") -> torch.Tensor:
    """Decodes and checks a tensor; errors name `field` (e.g. `images.data`)."""
    dtype = torch_dtype(message.dtype, field=f"{field}.dtype")
    shape = tuple(int(d) for d in message.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"negative dimension in shape {list(shape)}", field=f"{field}.shape")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if len(message.data) != expected:
        raise InvalidArgument(
            f"{len(message.data)} bytes do not match dtype x shape {list(shape)} ({expected} bytes)",
            field=f"{field}.data",
        )
    array = np.frombuffer(message.data, dtype=_NUMPY_CARRIER[dtype]).reshape(shape)
    tensor = torch.from_numpy(array.copy())
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor
