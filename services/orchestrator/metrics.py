"""Prometheus metrics of the orchestrator, read from the job table and the runner when scraped (no hidden
global registry: each server has its own, so tests and several servers in one process do not clash).

* magic3d_jobs{state}: jobs by state; magic3d_queue_depth: queued jobs;
* magic3d_scene_slots_in_use / magic3d_scene_slots: admission (jobs running on scene replicas / capacity);
* magic3d_step_seconds: mean wall time of the recent optimisation steps reported by the scenes.

Guidance batch fill is the guidance tier's own metric (services/guidance/metrics.py; under Ray Serve, Serve's
own batch metrics).
"""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily

from services.orchestrator.jobs import JobState
from shared.metrics import MetricsServer, serve_metrics


class _RunnerCollector:
    def __init__(self, runner) -> None:
        self.runner = runner

    def collect(self):
        counts = self.runner.jobs.counts()
        jobs = GaugeMetricFamily("magic3d_jobs", "Jobs by state", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], counts.get(state, 0))
        yield jobs
        yield GaugeMetricFamily("magic3d_queue_depth", "Queued jobs", value=counts.get(JobState.QUEUED, 0))
        yield GaugeMetricFamily("magic3d_scene_slots_in_use", "Jobs running on scene replicas", value=self.runner.replicas.in_use())
        yield GaugeMetricFamily("magic3d_scene_slots", "Scene replica job slots", value=self.runner.replicas.capacity)
        recent = list(self.runner.step_seconds)
        yield GaugeMetricFamily(
            "magic3d_step_seconds", "Mean wall time of recent optimisation steps", value=sum(recent) / len(recent) if recent else 0.0
        )


def start_metrics(runner, host: str, port: int) -> MetricsServer:
    return serve_metrics(_RunnerCollector(runner), host, port)
