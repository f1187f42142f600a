"""Job events in memory: a publish/subscribe hub that Generate and WatchJob streams read from.

Events are not persisted (the job table is): a watcher that connects late, or after a restart, first gets a
snapshot of the job's current state from the servicer, then the live events. Each job keeps a short history so a
watcher subscribing right after submit sees the `queued` event.
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict, deque

from magic3d.v1 import orchestrator_pb2

HISTORY = 64


class Subscription:
    def __init__(self, hub: "EventHub", job_id: str) -> None:
        self.hub = hub
        self.job_id = job_id
        self.queue: queue.Queue[orchestrator_pb2.JobEvent] = queue.Queue()

    def get(self, timeout_s: float) -> orchestrator_pb2.JobEvent | None:
        try:
            return self.queue.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.hub._unsubscribe(self)

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EventHub:
    def __init__(self) -> None:
        self._subscribers: dict[str, list[Subscription]] = defaultdict(list)
        self._history: dict[str, deque] = defaultdict(lambda: deque(maxlen=HISTORY))
        self._lock = threading.Lock()

    def publish(self, job_id: str, event: orchestrator_pb2.JobEvent) -> None:
        event.job_name = f"jobs/{job_id}"
        with self._lock:
            self._history[job_id].append(event)
            subscribers = list(self._subscribers.get(job_id, ()))
        for subscription in subscribers:
            subscription.queue.put(event)

    def subscribe(self, job_id: str, replay: bool = False) -> Subscription:
        """Live events of a job; with `replay`, the events kept in history first."""
        subscription = Subscription(self, job_id)
        with self._lock:
            if replay:
                for event in self._history.get(job_id, ()):
                    subscription.queue.put(event)
            self._subscribers[job_id].append(subscription)
        return subscription

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._history.pop(job_id, None)

    def _unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            subscribers = self._subscribers.get(subscription.job_id, [])
            if subscription in subscribers:
                subscribers.remove(subscription)
            if not subscribers:
                self._subscribers.pop(subscription.job_id, None)
