"""Prometheus /metrics over HTTP for one collector, with its own registry (no hidden global: several servers in
one process, as in tests and the local stack, do not clash). Collectors read live state when scraped."""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily


@dataclass
class MetricsServer:
    port: int
    server: WSGIServer
    thread: threading.Thread
    registry: CollectorRegistry

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class GpuMemoryCollector:
    """This process's CUDA memory as PyTorch's allocator sees it (nothing where CUDA is absent): what a platform
    team sizes GPU requests by, per service. `peak` is since the process started. A process that never imported
    torch (the orchestrator) holds no CUDA memory: nothing to report, and torch is not imported to say so."""

    def collect(self):
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        for index in range(torch.cuda.device_count()):
            labels = [str(index)]
            for name, value, text in (
                ("allocated", torch.cuda.memory_allocated(index), "Bytes held by live tensors"),
                ("peak_allocated", torch.cuda.max_memory_allocated(index), "Most bytes ever held by live tensors"),
                ("reserved", torch.cuda.memory_reserved(index), "Bytes the caching allocator holds from the driver"),
            ):
                gauge = GaugeMetricFamily(f"magic3d_gpu_memory_{name}_bytes", text, labels=["device"])
                gauge.add_metric(labels, value)
                yield gauge


def serve_metrics(collector, host: str, port: int) -> MetricsServer:
    """Serves `collector` (an object with `collect()`) and this process's GPU memory on http://host:port/metrics;
    port 0 picks a free port."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    registry.register(GpuMemoryCollector())
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server.server_address[1], server, thread, registry)
