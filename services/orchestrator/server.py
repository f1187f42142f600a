"""The orchestrator service: what clients call (Generate, and the job operations).

    python -m services.orchestrator.server --config deploy/config/orchestrator.yaml [--host H] [--port P]

It keeps jobs in SQLite (a persistent volume in Kubernetes), drives scene replicas over gRPC, checks priors and
prompts against the guidance tier (through the same registry the scene services use) before accepting a job,
reads and links artifacts in the shared store, and exports Prometheus metrics. Answers grpc.health.v1.
Clients authenticate with bearer tokens (`auth.tokens_file`, token -> principal); it calls the scene and guidance
tiers with the service token; `tls` makes its port TLS (see README "Authentication").
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
from pathlib import Path

import yaml
from magic3d.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from pydantic import BaseModel, ConfigDict, Field

from services.orchestrator.jobs import JobStore
from services.orchestrator.metrics import start_metrics
from services.orchestrator.presets import PresetBook
from services.orchestrator.runner import JobRunner, PriorChecker, RunnerSettings
from services.orchestrator.scenes import SceneReplicas
from services.orchestrator.servicer import OrchestratorServicer
from shared import logging as project_logging
from shared.auth import AuthConfig, ClientTlsConfig, TlsConfig, TokenTable, server_tokens
from shared.grpcio import RunningServer, config_from_command_line, serve_until_signalled, start_server
from shared.guidance_client import GuidanceClient
from shared.registry import Registry
from shared.store import ArtifactStore, open_store

log = project_logging.get_logger(__name__)
SERVICE_NAME = orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name


class OrchestratorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=50071, ge=0, le=65535)
    # The web page (submit, watch, orbit results; services/orchestrator/web) on this port; None: off. Same client
    # tokens as gRPC; TLS with `tls` when set. `http_host` None: the gRPC `host`.
    http_host: str | None = None
    http_port: int | None = Field(default=None, ge=0, le=65535)
    # Prometheus /metrics on this port (same host); None: off.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    database_path: Path = Path("out/orchestrator/jobs.db")
    store_uri: str = "out/store"
    scene_replicas: list[str] = Field(default_factory=lambda: ["127.0.0.1:50061"], min_length=1)
    # Jobs one scene replica runs at once (admission control); more wait in the queue.
    jobs_per_replica: int = Field(default=1, ge=1)
    # Queued jobs beyond which submits get RESOURCE_EXHAUSTED with a retry hint.
    queue_size: int = Field(default=16, ge=1)
    max_attempts: int = Field(default=3, ge=1)
    # Owner name of the scenes this orchestrator creates; a restarted orchestrator with the same id deletes the
    # scenes it left behind. Default: derived from the host name and the database path (a StatefulSet pod's are
    # stable). Two orchestrators sharing scene replicas must have different ids.
    instance_id: str = ""
    # Lease asked for each scene (a scene idle this long is deleted by its replica); 0: the replica's default.
    scene_lease_s: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    # A replica that answered UNAVAILABLE gets no new job for this long.
    replica_cooldown_s: float = Field(default=30.0, ge=0, allow_inf_nan=False)
    # How long a submit's prompt check waits for a guidance tier that is down before answering UNAVAILABLE.
    guidance_check_window_s: float = Field(default=5.0, ge=0, allow_inf_nan=False)
    # Newest checkpoints kept per stage of a job (each stage's final one is always kept).
    keep_checkpoints: int = Field(default=3, ge=1)
    checkpoint_every: int | None = Field(default=None, gt=0)  # overrides every preset's, when set
    registry_path: Path = Path("deploy/config/registry.yaml")
    presets_path: Path = Path("deploy/config/presets.yaml")
    max_workers: int = Field(default=32, ge=4)
    # Faces of an uploaded mesh (JobSpec.mesh) beyond which a submit is refused (INVALID_ARGUMENT, not decimated);
    # the scene replicas' own limit (GetLimits) applies too, whichever is smaller.
    max_mesh_faces: int = Field(default=200_000, ge=4)
    # Client bearer tokens and the service token it sends to scene/guidance; none on loopback: auth off (warned).
    auth: AuthConfig = AuthConfig()
    tls: TlsConfig | None = None  # this server's certificate (clients then connect with TLS)
    scene_tls: ClientTlsConfig | None = None  # the CA of the scene replicas' certificates, when they use TLS

    @classmethod
    def load(cls, path: str | Path) -> "OrchestratorConfig":
        return cls.model_validate(yaml.safe_load(Path(path).read_text()))


def code_version() -> str:
    """The package version and, in a checkout, the git commit (for provenance records)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("magic3d-service")
    except PackageNotFoundError:
        text = "unknown"
    commit = os.environ.get("MAGIC3D_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
    return f"{text}+{commit}" if commit else text


def instance_id(config: OrchestratorConfig) -> str:
    if config.instance_id:
        return config.instance_id
    digest = hashlib.sha256(str(config.database_path.resolve()).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}-{digest}"


def start(
    config: OrchestratorConfig, priors: PriorChecker | None = None, store: ArtifactStore | None = None
) -> RunningServer:
    """Starts the runner (resuming unfinished jobs) and the gRPC server; `stop()` stops both."""
    presets = PresetBook.load(config.presets_path)
    if config.checkpoint_every:
        for preset in presets.presets.values():
            preset.checkpoint_every = config.checkpoint_every
    tokens = server_tokens(config.auth.client_tokens(), config.host, config.auth.allow_unauthenticated, "orchestrator")
    web_tokens = None
    if config.http_port is not None:  # checked before anything starts: a page beyond loopback needs tokens too
        web_tokens = server_tokens(config.auth.client_tokens(), config.http_host or config.host,
                                   config.auth.allow_unauthenticated, "web")
    service_token = config.auth.service_token()
    guidance = None
    if priors is None:
        # Checks at submit wait out a guidance outage only briefly: the client gets UNAVAILABLE (field "guidance") and
        # retries, rather than a submit that hangs for the scenes' whole outage window.
        registry = Registry.load(config.registry_path)
        client = registry.client.model_copy(update={"outage_window_s": config.guidance_check_window_s})
        guidance = GuidanceClient(registry.model_copy(update={"client": client}), token=service_token)
        priors = guidance
    config.database_path.parent.mkdir(parents=True, exist_ok=True)
    jobs = JobStore(config.database_path)
    replicas = SceneReplicas(
        config.scene_replicas, config.jobs_per_replica, cooldown_s=config.replica_cooldown_s,
        max_mesh_faces=config.max_mesh_faces, token=service_token, tls=config.scene_tls,
    )
    settings = RunnerSettings(
        queue_size=config.queue_size, max_attempts=config.max_attempts, code_version=code_version(),
        instance_id=instance_id(config), scene_lease_s=config.scene_lease_s, keep_checkpoints=config.keep_checkpoints,
    )
    runner = JobRunner(jobs, store or open_store(config.store_uri), replicas, presets, priors, settings)
    runner.start()
    metrics = start_metrics(runner, config.host, config.metrics_port) if config.metrics_port is not None else None

    def on_stop() -> None:
        runner.stop()
        replicas.close()
        jobs.close()
        if guidance is not None:
            guidance.close()

    running = start_server(
        OrchestratorServicer(runner),
        orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server,
        SERVICE_NAME,
        f"{config.host}:{config.port}",
        max_workers=config.max_workers,
        on_stop=on_stop,
        tokens=tokens,
        tls=config.tls,
        metrics=metrics,
    )
    running.web = None
    if config.http_port is not None:
        running.web = _start_web(config, running, web_tokens)
    return running


def _start_web(config: OrchestratorConfig, running: RunningServer, tokens: TokenTable | None):
    """The page server beside the gRPC server, stopped before the runner (its streams read the runner's events)."""
    from services.orchestrator.web.server import start_web

    try:
        web = start_web(running.servicer, config.http_host or config.host, config.http_port, tokens, config.tls)
    except BaseException:  # e.g. the port is taken: stop what started
        running.stop(grace=None)
        raise
    stop_rest = running.on_stop

    def on_stop() -> None:
        web.stop()
        if stop_rest is not None:
            stop_rest()

    running.on_stop = on_stop
    return web


def main() -> None:
    config = config_from_command_line(__doc__.splitlines()[0], OrchestratorConfig.load, OrchestratorConfig, "orchestrator")
    running = start(config)
    log.info("orchestrator_serving", address=f"{config.host}:{running.port}", replicas=config.scene_replicas)
    serve_until_signalled(running)


if __name__ == "__main__":
    main()
