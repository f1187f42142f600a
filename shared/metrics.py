"""Prometheus /metrics over HTTP for one collector, with its own registry (no hidden global: several servers in
one process, as in tests and the local stack, do not clash). Collectors read live state when scraped."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, start_http_server


@dataclass
class MetricsServer:
    port: int
    server: object
    thread: object
    registry: CollectorRegistry

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(collector, host: str, port: int) -> MetricsServer:
    """Serves `collector` (an object with `collect()`) on http://host:port/metrics; port 0 picks a free port."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server.server_address[1], server, thread, registry)
