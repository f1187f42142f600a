"""The scene replicas the orchestrator drives: a fixed list of addresses (a StatefulSet's stable names in
Kubernetes), each with a number of job slots. A stage is pinned to the replica it started on; a replica that
answers UNAVAILABLE is set aside for a cool-down and its jobs resume elsewhere from their last checkpoint."""

from __future__ import annotations

import threading
import time

from magic3d.v1 import scene_pb2_grpc

from shared.auth import ClientTlsConfig
from shared.grpcio import insecure_channel


class SceneReplicas:
    def __init__(
        self, addresses: list[str], slots_per_replica: int = 1, cooldown_s: float = 30.0,
        token: str | None = None, tls: ClientTlsConfig | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("at least one scene replica address is needed")
        self.addresses = list(dict.fromkeys(addresses))
        self.slots_per_replica = slots_per_replica
        self.cooldown_s = cooldown_s
        self._busy = {address: 0 for address in self.addresses}
        self._down_until = {address: 0.0 for address in self.addresses}
        self._channels: dict[str, object] = {}
        self._lock = threading.Lock()
        self._token = token  # the service token scene replicas check
        self._tls = tls

    @property
    def capacity(self) -> int:
        return len(self.addresses) * self.slots_per_replica

    def acquire(self, avoid: str = "") -> str | None:
        """The least busy healthy replica with a free slot (not `avoid` if another has room), or None."""
        with self._lock:
            now = time.monotonic()
            free = [
                a for a in self.addresses if self._busy[a] < self.slots_per_replica and self._down_until[a] <= now
            ]
            if not free:
                return None
            preferred = [a for a in free if a != avoid] or free
            address = min(preferred, key=lambda a: self._busy[a])
            self._busy[address] += 1
            return address

    def release(self, address: str) -> None:
        with self._lock:
            if address in self._busy and self._busy[address] > 0:
                self._busy[address] -= 1

    def mark_down(self, address: str) -> None:
        with self._lock:
            if address in self._down_until:
                self._down_until[address] = time.monotonic() + self.cooldown_s

    def in_use(self) -> int:
        with self._lock:
            return sum(self._busy.values())

    def stub(self, address: str) -> scene_pb2_grpc.SceneServiceStub:
        with self._lock:
            if address not in self._channels:
                self._channels[address] = insecure_channel(address, token=self._token, tls=self._tls)
            return scene_pb2_grpc.SceneServiceStub(self._channels[address])

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
