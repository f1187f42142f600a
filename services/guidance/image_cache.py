"""Reference images of image-conditioned jobs (Magic123), held by a guidance server by digest.

A job's reference image is the same for every SDS step, so a caller sends it once (with its SHA-256,
shared.tensor_digest) and afterwards only the digest. A server that does not hold the digest (a new replica,
another replica behind the same Serve application, or an image evicted here) refuses the request with
FAILED_PRECONDITION naming `image_condition.image`, and the caller resends it with the image.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict

import torch

from shared import tensors
from shared.errors import FailedPrecondition, InvalidArgument
from shared.guidance_api import SdsRequest
from shared.tensor_digest import tensor_sha256

IMAGE_FIELD = "image_condition.image"
DIGEST_FIELD = "image_condition.image_sha256"


class ReferenceImageCache:
    """Thread-safe LRU of reference images by digest, bounded in count and in bytes (the newest always kept)."""

    def __init__(self, max_images: int = 64, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_images = int(max_images)
        self.max_bytes = int(max_bytes)
        self._images: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._images)

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def put(self, digest: str, image: torch.Tensor) -> None:
        """Stores an image under its digest; InvalidArgument (naming image_sha256) if the digest is not its own."""
        if tensor_sha256(tensors.to_proto(image)) != digest:
            raise InvalidArgument("the image does not match image_sha256", DIGEST_FIELD)
        image = image.detach().to("cpu")
        size = image.numel() * image.element_size()
        with self._lock:
            previous = self._images.pop(digest, None)
            if previous is not None:
                self._bytes -= previous.numel() * previous.element_size()
            self._images[digest] = image
            self._bytes += size
            while len(self._images) > 1 and (len(self._images) > self.max_images or self._bytes > self.max_bytes):
                _, evicted = self._images.popitem(last=False)
                self._bytes -= evicted.numel() * evicted.element_size()

    def get(self, digest: str) -> torch.Tensor | None:
        with self._lock:
            image = self._images.get(digest)
            if image is None:
                self.misses += 1
                return None
            self.hits += 1
            self._images.move_to_end(digest)
            return image

    def resolve(self, request: SdsRequest) -> SdsRequest:
        """The request with its reference image in place: a sent image is stored, a digest alone is looked up
        (FailedPrecondition naming `image_condition.image` where it is not held). Requests without one: as is."""
        condition = request.image_condition
        if condition is None:
            return request
        if condition.image is not None:
            self.put(condition.image_sha256, condition.image)
            return request
        image = self.get(condition.image_sha256)
        if image is None:
            raise FailedPrecondition(
                f"reference image {condition.image_sha256[:12]} is not held by this server (new or another replica, "
                "or evicted): send the request again with the image",
                IMAGE_FIELD,
            )
        return dataclasses.replace(request, image_condition=dataclasses.replace(condition, image=image))
