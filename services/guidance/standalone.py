"""The guidance servicer under plain grpcio ("standalone"): for development and GPU hosts without Ray.

    python -m services.guidance.standalone --config deploy/config/guidance.yaml [--port 50051]

Answers grpc.health.v1 and server reflection; accepts 64 MiB messages; refuses work beyond
`max_concurrent_rpcs` with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations


from magic3d.v1 import guidance_pb2, guidance_pb2_grpc

from services.guidance.config import DEFAULT_CONFIG, GuidanceConfig
from services.guidance.engine import GuidanceEngine
from services.guidance.pool import PriorPool
from services.guidance.servicer import GuidanceServicer
from shared import logging as project_logging
from services.guidance.metrics import start_metrics
from shared.auth import server_tokens
from shared.grpcio import RunningServer, config_from_command_line, serve_until_signalled, start_server

SERVICE_NAME = guidance_pb2.DESCRIPTOR.services_by_name["GuidanceService"].full_name


def start(
    config: GuidanceConfig, port: int | None = None, warm: bool = True, pool: PriorPool | None = None
) -> RunningServer:
    """Starts serving on `config.host` (port 0: any free port) and returns at once."""
    host = config.host
    tokens = server_tokens(config.auth.service_tokens(), host, config.auth.allow_unauthenticated, "guidance")
    engine = GuidanceEngine(config, pool)
    if warm:
        engine.warm_up()
    metrics = start_metrics(engine, config.host, config.metrics_port) if config.metrics_port is not None else None

    return start_server(
        GuidanceServicer(engine),
        guidance_pb2_grpc.add_GuidanceServiceServicer_to_server,
        SERVICE_NAME,
        f"{config.host}:{config.port if port is None else port}",
        max_workers=config.max_concurrent_rpcs,
        max_message_bytes=config.max_message_bytes,
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        enable_reflection=True,
        on_stop=engine.close,
        tokens=tokens,
        tls=config.tls,
        metrics=metrics,
    )


def main() -> None:
    # Without a file: the analytic prior only.
    config = config_from_command_line(__doc__.splitlines()[0], GuidanceConfig.load, lambda: DEFAULT_CONFIG, "guidance")
    running = start(config)
    log = project_logging.get_logger(__name__)
    log.info("guidance_serving", address=f"{config.host}:{running.port}", priors=[p.name for p in config.priors])
    serve_until_signalled(running)


if __name__ == "__main__":
    main()
