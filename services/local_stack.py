"""Every service on this machine, on 127.0.0.1, in one process tree: what `magic3d serve` and `make run` start.

    guidance (Ray Serve on a local Ray, or a plain grpcio server) <- scene service <- orchestrator <- clients

Configuration comes from deploy/config (guidance.yaml, scene.yaml, presets.yaml) with loopback addresses and free
ports filled in; the guidance registry is built to point at whichever guidance server was started. `stop()` stops
what was started, in reverse order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from services.guidance.config import GuidanceConfig
from services.orchestrator import server as orchestrator_server
from services.scene import server as scene_server
from shared import logging as project_logging
from shared.guidance_client import GuidanceClient
from shared.registry import Registry

log = project_logging.get_logger(__name__)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "deploy" / "config"


@dataclass(frozen=True)
class LocalStackSettings:
    guidance: Literal["serve", "standalone"] = "serve"
    state_dir: Path = Path("out/local")  # job database and artifact store
    orchestrator_port: int = 50071  # 0: any free port
    guidance_config: Path = CONFIG_DIR / "guidance.yaml"
    scene_config: Path = CONFIG_DIR / "scene.yaml"
    presets: Path = CONFIG_DIR / "presets.yaml"
    checkpoint_every: int | None = None
    metrics_port: int | None = None


@dataclass
class LocalStack:
    settings: LocalStackSettings
    orchestrator_address: str = ""
    guidance_address: str = ""
    _stops: list[Callable[[], None]] = field(default_factory=list)

    @property
    def store_dir(self) -> Path:
        return self.settings.state_dir / "store"

    def stop(self) -> None:
        while self._stops:
            stop = self._stops.pop()
            try:
                stop()
            except Exception:  # noqa: BLE001 - stop everything else even if one part fails to
                log.exception("stop_failed")


def start_local_stack(settings: LocalStackSettings = LocalStackSettings()) -> LocalStack:
    stack = LocalStack(settings)
    try:
        _start(stack)
    except BaseException:
        stack.stop()
        raise
    return stack


def _start(stack: LocalStack) -> None:
    settings = stack.settings
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    guidance_config = GuidanceConfig.load(settings.guidance_config).model_copy(update={"host": "127.0.0.1", "port": 0})
    registry = _start_guidance(stack, guidance_config)

    scene_client = GuidanceClient(registry)
    stack._stops.append(scene_client.close)
    scene_config = scene_server.SceneServiceConfig.load(settings.scene_config).model_copy(
        update={"host": "127.0.0.1", "port": 0, "store_uri": str(stack.store_dir), "device": "cpu"}
    )
    scene = scene_server.start(scene_config, guidance=scene_client)
    stack._stops.append(lambda: scene.stop(grace=None))

    checker = GuidanceClient(registry)
    stack._stops.append(checker.close)
    orchestrator_config = orchestrator_server.OrchestratorConfig(
        host="127.0.0.1",
        port=settings.orchestrator_port,
        metrics_port=settings.metrics_port,
        database_path=settings.state_dir / "jobs.db",
        store_uri=str(stack.store_dir),
        scene_replicas=[scene.address],
        presets_path=settings.presets,
        checkpoint_every=settings.checkpoint_every,
    )
    orchestrator = orchestrator_server.start(orchestrator_config, priors=checker)
    stack._stops.append(lambda: orchestrator.stop(grace=None))
    stack.orchestrator_address = orchestrator.address
    log.info(
        "local_stack_ready", orchestrator=stack.orchestrator_address, scene=scene.address,
        guidance=stack.guidance_address, guidance_kind=settings.guidance, state_dir=str(settings.state_dir),
    )


def _start_guidance(stack: LocalStack, config: GuidanceConfig) -> Registry:
    """Starts the guidance tier; returns a registry whose every logical prior points at it."""
    if stack.settings.guidance == "serve":
        from services.guidance.serve_app import ServeAppSettings, start_local

        app = ServeAppSettings(name="analytic", route_prefix="/analytic")
        serve = start_local([(config, app)], num_cpus=2)
        stack._stops.append(serve.shutdown)
        stack.guidance_address = serve.grpc_address
        route = {"kind": "serve", "address": serve.grpc_address, "application": "analytic"}
    else:
        from services.guidance import standalone

        running = standalone.start(config, port=0)
        stack._stops.append(lambda: running.stop(grace=None))
        stack.guidance_address = running.address
        route = {"kind": "standalone", "address": running.address}
    priors = {spec.name: dict(route) for spec in config.priors}
    if "analytic" in priors:
        priors["default"] = {"kind": "alias", "target": "analytic"}
    return Registry.model_validate({"client": {"timeout_s": 120}, "priors": priors})


__all__ = ["LocalStack", "LocalStackSettings", "start_local_stack"]
