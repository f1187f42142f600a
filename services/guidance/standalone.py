"""The guidance servicer under plain grpcio ("standalone"): for development and GPU hosts without Ray.

    python -m services.guidance.standalone --config deploy/config/guidance.yaml [--port 50051]

Answers grpc.health.v1 and server reflection; accepts 64 MiB messages; refuses work beyond
`max_concurrent_rpcs` with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from magic3d.v1 import guidance_pb2, guidance_pb2_grpc

from services.guidance.config import DEFAULT_CONFIG, GuidanceConfig
from services.guidance.engine import GuidanceEngine
from services.guidance.pool import PriorPool
from services.guidance.servicer import GuidanceServicer
from shared import logging as project_logging
from shared.grpcio import message_size_options

SERVICE_NAME = guidance_pb2.DESCRIPTOR.services_by_name["GuidanceService"].full_name


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    engine: GuidanceEngine
    health: health.HealthServicer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float | None = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.engine.close()


def start(
    config: GuidanceConfig, port: int | None = None, warm: bool = True, pool: PriorPool | None = None
) -> RunningServer:
    """Starts serving on `config.host` (port 0: any free port) and returns at once."""
    engine = GuidanceEngine(config, pool)
    if warm:
        engine.pool.warm()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_concurrent_rpcs, thread_name_prefix="grpc"),
        options=message_size_options(config.max_message_bytes),
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    guidance_pb2_grpc.add_GuidanceServiceServicer_to_server(GuidanceServicer(engine), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{config.host}:{config.port if port is None else port}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, bound, engine, health_servicer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="guidance YAML; default: the analytic prior only")
    parser.add_argument("--host", default=None, help="listen address (default: the config's, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args()
    project_logging.configure()
    config = GuidanceConfig.load(args.config) if args.config else DEFAULT_CONFIG
    if args.host:
        config = config.model_copy(update={"host": args.host})
    running = start(config, args.port)
    log = project_logging.get_logger(__name__)
    log.info("guidance_serving", address=f"{config.host}:{running.port}", priors=[p.name for p in config.priors])
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    stopped.wait()
    running.stop(grace=5.0)


if __name__ == "__main__":
    main()
