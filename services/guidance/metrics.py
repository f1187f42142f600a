"""Prometheus metrics of a standalone guidance server, read from its engine when scraped:

* magic3d_guidance_denoiser_calls_total, _requests_total, _images_total: work done;
* magic3d_guidance_batch_fill: mean images per denoiser call over the configured maximum (1.0 = full batches),
  i.e. how much dynamic batching across jobs is saving;
* magic3d_gpu_memory_{allocated,peak_allocated,reserved}_bytes: this process's CUDA memory (shared/metrics.py).

Under Ray Serve the same figures come from Serve's own metrics and the deployment's `stats()`.
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from shared.metrics import MetricsServer, serve_metrics


class _EngineCollector:
    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        stats = self.engine.stats
        yield CounterMetricFamily("magic3d_guidance_denoiser_calls", "Denoiser calls", value=stats.denoiser_calls)
        yield CounterMetricFamily("magic3d_guidance_requests", "ComputeSds requests served", value=stats.requests)
        yield CounterMetricFamily("magic3d_guidance_images", "Images given SDS gradients", value=stats.images)
        capacity = self.engine.config.batching.max_batch_images
        fill = stats.images / stats.denoiser_calls / capacity if stats.denoiser_calls else 0.0
        yield GaugeMetricFamily("magic3d_guidance_batch_fill", "Mean images per denoiser call / maximum", value=fill)


def start_metrics(engine, host: str, port: int) -> MetricsServer:
    return serve_metrics(_EngineCollector(engine), host, port)
