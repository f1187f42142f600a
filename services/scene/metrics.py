"""Prometheus metrics of a scene replica, read from its scene table when scraped:

* magic3d_scene_scenes / magic3d_scene_capacity: scenes held and the most it may hold;
* magic3d_scene_training_state_bytes / magic3d_scene_memory_budget_bytes: their training state against the budget;
* magic3d_gpu_memory_{allocated,peak_allocated,reserved}_bytes: this process's CUDA memory (shared/metrics.py),
  what a platform team sizes a replica's GPU by.
"""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily

from shared.metrics import MetricsServer, serve_metrics


class _SceneCollector:
    def __init__(self, table) -> None:
        self.table = table

    def collect(self):
        entries = self.table.entries()
        yield GaugeMetricFamily("magic3d_scene_scenes", "Scenes held by this replica", value=len(entries))
        yield GaugeMetricFamily("magic3d_scene_capacity", "Most scenes this replica holds", value=self.table.capacity)
        yield GaugeMetricFamily(
            "magic3d_scene_training_state_bytes", "Training state of the scenes held (budgeted bytes)",
            value=sum(e.memory_bytes for e in entries),
        )
        yield GaugeMetricFamily(
            "magic3d_scene_memory_budget_bytes", "Budget for the scenes' training state",
            value=self.table.memory_budget_bytes,
        )


def start_metrics(table, host: str, port: int) -> MetricsServer:
    return serve_metrics(_SceneCollector(table), host, port)
