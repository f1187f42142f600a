"""The scene replicas the orchestrator drives: a fixed list of addresses (a StatefulSet's stable names in
Kubernetes), each with a number of job slots. A stage is pinned to the replica it started on; a replica that
answers UNAVAILABLE is set aside for a cool-down and its jobs resume elsewhere from their last checkpoint.

The replicas' limits (SceneService.GetLimits) are fetched lazily and cached: a job is checked against the strictest
of them, as it may run on any replica. A replica that does not answer (quickly) counts with the declared defaults;
the next submit asks it again."""

from __future__ import annotations

import dataclasses
import threading
import time

import grpc
from magic3d.v1 import scene_pb2, scene_pb2_grpc

from shared import logging as project_logging
from shared.auth import ClientTlsConfig
from shared.grpcio import insecure_channel
from shared.stage_limits import SceneLimits

log = project_logging.get_logger(__name__)


class SceneReplicas:
    def __init__(
        self,
        addresses: list[str],
        slots_per_replica: int = 1,
        cooldown_s: float = 30.0,
        default_limits: SceneLimits = SceneLimits(),
        limits_timeout_s: float = 2.0,
        max_mesh_faces: int = SceneLimits().max_mesh_faces,
        token: str | None = None,
        tls: ClientTlsConfig | None = None,
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
        self.default_limits = default_limits
        self.limits_timeout_s = limits_timeout_s
        self.max_mesh_faces = max_mesh_faces  # this orchestrator's own bound on uploads, under the replicas'
        self._limits: dict[str, SceneLimits] = {}  # replicas that answered GetLimits
        self._limits_retry_at: dict[str, float] = {}  # replicas that did not: ask again after a cool-down
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

    def limits(self) -> SceneLimits:
        """The strictest limits across replicas; replicas not heard from yet are asked (each for at most
        `limits_timeout_s`); those that do not answer count with `default_limits` and are asked again after
        `cooldown_s`."""
        result: SceneLimits | None = None
        for address in self.addresses:
            with self._lock:
                known = self._limits.get(address)
                waiting = self._limits_retry_at.get(address, 0.0) > time.monotonic()
            if known is None:
                known = self.default_limits if waiting else self._fetch_limits(address)
            result = known if result is None else result.strictest(known)
        return dataclasses.replace(result, max_mesh_faces=min(result.max_mesh_faces, self.max_mesh_faces))

    def _fetch_limits(self, address: str) -> SceneLimits:
        try:
            reply = self.stub(address).GetLimits(scene_pb2.GetLimitsRequest(), timeout=self.limits_timeout_s)
        except grpc.RpcError as error:
            log.warning("scene_limits_unavailable", replica=address, code=error.code().name, using="declared defaults")
            with self._lock:
                self._limits_retry_at[address] = time.monotonic() + self.cooldown_s
            return self.default_limits
        limits = SceneLimits.from_proto(reply.limits)
        with self._lock:
            self._limits[address] = limits
        log.info("scene_limits", replica=address, **vars(limits))
        return limits

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
