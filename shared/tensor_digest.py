"""SHA-256 of a proto Tensor: the key under which a guidance server caches a job's reference image.

Torch-free, so that the orchestrator and the scene compute the same digest. The digest covers the dtype and the
shape as well as the bytes, so that the same bytes read as another shape are another image.
"""

from __future__ import annotations

import hashlib

from magic3d.v1 import common_pb2


def tensor_sha256(message: common_pb2.Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(common_pb2.ScalarType.Name(message.dtype).encode())
    digest.update(b"|" + ",".join(str(int(size)) for size in message.shape).encode() + b"|")
    digest.update(message.data)
    return digest.hexdigest()
