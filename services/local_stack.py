"""Every service on this machine, on 127.0.0.1, in one process tree: what `magic3d serve` and `make run` start.

    guidance (Ray Serve on a local Ray, or a plain grpcio server) <- scene service <- orchestrator <- clients

Configuration comes from deploy/config (guidance.yaml, scene.yaml, presets.yaml) with loopback addresses and free
ports filled in; the guidance registry is built to point at whichever guidance server was started. `stop()` stops
what was started, in reverse order.

Authentication is on even here, with no set-up: the first start writes a random client token (principal "local",
admin) and a random service token under the state dir (`client-token`, `tokens.yaml`, `service-token`, mode 0600),
and later starts reuse them; `magic3d generate` / `magic3d jobs` read `client-token` by themselves.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from services.guidance.config import GuidanceConfig
from services.orchestrator import server as orchestrator_server
from services.scene import server as scene_server
from shared import logging as project_logging
from shared.auth import LOCAL_CLIENT_TOKEN_FILE, AuthConfig
from shared.guidance_client import GuidanceClient
from shared.registry import Registry

log = project_logging.get_logger(__name__)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "deploy" / "config"
CLIENT_TOKEN_FILE = LOCAL_CLIENT_TOKEN_FILE  # under the state dir; what the CLI sends by default
SERVICE_TOKEN_FILE = "service-token"
TOKENS_FILE = "tokens.yaml"
LOCAL_PRINCIPAL = "local"


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
    http_port: int | None = None  # the orchestrator's web page on 127.0.0.1 (0: any free port); None: off
    scene_device: str = "cpu"  # the scene service's device ("auto": CUDA where there is one)
    guidance_gpus: int = 0  # GPUs Ray Serve gives the guidance replica (the standalone server uses its config's)


@dataclass
class LocalStack:
    settings: LocalStackSettings
    orchestrator_address: str = ""
    guidance_address: str = ""
    client_token: str = ""
    web_url: str = ""  # the web page's address when `http_port` is set
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


def _secret_file(path: Path, make: Callable[[], str]) -> str:
    """The file's content, written first (0600, owner only) with `make()` if the file is missing."""
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(make())
    os.chmod(path, 0o600)
    return path.read_text().strip()


def local_auth(state_dir: Path) -> tuple[str, AuthConfig]:
    """(the client token, the AuthConfig every local service uses): tokens made once per state dir."""
    import yaml

    client = _secret_file(state_dir / CLIENT_TOKEN_FILE, lambda: secrets.token_urlsafe(32))
    _secret_file(state_dir / SERVICE_TOKEN_FILE, lambda: secrets.token_urlsafe(32))
    tokens = state_dir / TOKENS_FILE
    if tokens.is_file() and client not in (yaml.safe_load(tokens.read_text()) or {}):
        tokens.unlink()  # the client token was replaced by hand: follow it
    _secret_file(tokens, lambda: yaml.safe_dump({client: {"principal": LOCAL_PRINCIPAL, "admin": True}}))
    # Absolute: Ray Serve replicas read the service token file from their own working directory.
    return client, AuthConfig(tokens_file=tokens.resolve(), service_token_file=(state_dir / SERVICE_TOKEN_FILE).resolve())


def _start(stack: LocalStack) -> None:
    settings = stack.settings
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    stack.client_token, auth = local_auth(settings.state_dir)
    service_token = auth.service_token()
    guidance_config = GuidanceConfig.load(settings.guidance_config).model_copy(
        update={"host": "127.0.0.1", "port": 0, "auth": AuthConfig(service_token_file=auth.service_token_file)}
    )
    registry = _start_guidance(stack, guidance_config)

    scene_client = GuidanceClient(registry, token=service_token)
    stack._stops.append(scene_client.close)
    scene_config = scene_server.SceneServiceConfig.load(settings.scene_config).model_copy(
        update={"host": "127.0.0.1", "port": 0, "store_uri": str(stack.store_dir), "device": settings.scene_device,
                "auth": AuthConfig(service_token_file=auth.service_token_file)}
    )
    scene = scene_server.start(scene_config, guidance=scene_client)
    stack._stops.append(lambda: scene.stop(grace=None))

    checker = GuidanceClient(registry, token=service_token)
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
        auth=auth,
        http_port=settings.http_port,
    )
    orchestrator = orchestrator_server.start(orchestrator_config, priors=checker)
    stack._stops.append(lambda: orchestrator.stop(grace=None))
    stack.orchestrator_address = orchestrator.address
    stack.web_url = orchestrator.web.url if orchestrator.web is not None else ""
    log.info(
        "local_stack_ready", orchestrator=stack.orchestrator_address, scene=scene.address,
        guidance=stack.guidance_address, guidance_kind=settings.guidance, state_dir=str(settings.state_dir),
        web=stack.web_url,
    )


def _start_guidance(stack: LocalStack, config: GuidanceConfig) -> Registry:
    """Starts the guidance tier; returns a registry whose every logical prior points at it."""
    if stack.settings.guidance == "serve":
        from services.guidance.serve_app import ServeAppSettings, start_local

        gpus = stack.settings.guidance_gpus
        app = ServeAppSettings(name="analytic", route_prefix="/analytic", **({"num_gpus": gpus} if gpus else {}))
        # A model-sized prior's first call may build it: longer than the default request timeout.
        serve = start_local([(config, app)], num_cpus=2, num_gpus=gpus or None,
                            request_timeout_s=600.0 if gpus else 60.0)
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
