"""The guidance tier on Ray Serve: one Serve application per prior family, reached through Serve's native gRPC proxy.

Layout
    * One application per family (analytic, pixel/IF, latent/SD), each a single deployment `GuidanceDeployment`
      built from a serialisable `GuidanceConfig` (the family's prior(s)) and `ServeAppSettings` (replicas, GPU
      fraction, batching, admission control). Clients choose the application with gRPC metadata `application`.
    * Checkpoints are multiplexed by id. The multiplexed model id is "<prior>:<checkpoint>" (e.g.
      "analytic:default") because one application may host several priors of a family; a bare "<checkpoint>" or
      no id at all is accepted too and then the request body's `prior` / `checkpoint_id` decide. Serve routes a
      request to a replica that already has that id loaded and splits every batch by it, so priors and
      checkpoints never share a denoiser call; the batch handler also groups by (prior, checkpoint) itself, which
      covers clients that send no id.
    * Dynamic batching is Serve's `@serve.batch` with `batch_size_fn` counting images, so several jobs' images go
      through one `sds.compute_sds` call (the standalone engine's own batcher is not used here).
    * Requests are decoded and validated before they enter a batch, so one bad request never breaks a batch.
    * Errors: a `ServiceError` becomes its gRPC code and message, with the google.rpc.Status (BadRequest field
      violations, RetryInfo) in trailing metadata `grpc-status-details-bin`, exactly as the standalone server
      sends it, so `shared.errors.field_violations` works the same on both. Overload is Serve's admission control:
      past `max_ongoing_requests` per replica plus `max_queued_requests` waiting, Serve answers RESOURCE_EXHAUSTED
      at once instead of queueing without bound.

Entry points
    * `build_app(args)`: the application builder for a Serve config file / KubeRay serveConfigV2
      (`import_path: services.guidance.serve_app:build_app`, `args: {guidance: {...} | guidance_path: ...,
      settings: {...}}`).
    * `start_local(apps, ...)`: Ray + Serve on 127.0.0.1 for tests, benchmarks and development; `LocalServe.shutdown()`.
      Every Ray process advertises, dials and listens on 127.0.0.1 only: Serve's gRPC proxy and the replicas'
      inter-deployment servers, which Ray 2.60 binds to the wildcard address, are rebound by a worker setup hook
      (services/guidance/serve_loopback.py). Ports 0 pick free ones.
    * Authentication: with a service token configured (`GuidanceConfig.auth`), every RPC that comes through the
      gRPC proxy must carry it (`authorization: Bearer <token>`, read from the invocation metadata Serve hands to
      the ingress) or gets UNAUTHENTICATED; calls through a DeploymentHandle come from inside the Ray cluster.
    * `python -m services.guidance.serve_app [--config ...]`: the same for development.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from magic3d.v1 import guidance_pb2
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from services.guidance import sds, serve_loopback
from services.guidance.batching import BatchRunner
from services.guidance.config import DEFAULT_CONFIG, GuidanceConfig
from services.guidance.engine import check_prompt
from services.guidance.image_cache import ReferenceImageCache
from services.guidance.pool import PRIORS, PriorPool
from services.guidance.priors.base import DiffusionPrior
from services.guidance.warm_up import warm_up_priors
from services.guidance.rpc_errors import internal_error, log_rejected
from shared import guidance_api
from shared.auth import bearer_token
from shared.errors import InvalidArgument, ServiceError, Unauthenticated
from shared.grpcio import DEFAULT_MAX_MESSAGE_BYTES, INTERNAL_ERROR_MESSAGE, free_port
from shared.guidance_api import PriorKind, SdsRequest, SdsResult
from shared.logging import get_logger

log = get_logger(__name__)

GRPC_SERVICER_FUNCTION = "magic3d.v1.guidance_pb2_grpc.add_GuidanceServiceServicer_to_server"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
DEFAULT_CHECKPOINT = "default"
# Environment every Ray process of the guidance tier should see (set before Ray starts; also in deploy/k8s).
SERVE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # The proxy's own gRPC server (default 2 GiB) and the proxy->replica hop when RAY_SERVE_USE_GRPC_BY_DEFAULT=1
    # (default 4 MiB): both 64 MiB, the limit used by every other server and channel of the project.
    "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(DEFAULT_MAX_MESSAGE_BYTES),
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(DEFAULT_MAX_MESSAGE_BYTES),
}


# -- configuration ----------------------------------------------------------------------------------------------


class ServeAppSettings(BaseModel):
    """How one family's application is served. Unset batching/admission values come from `GuidanceConfig.batching`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="guidance", min_length=1)
    route_prefix: str = Field(default="/guidance", pattern=r"^/")
    # Fraction of a GPU (and CPUs) each replica reserves; 0 GPUs on CPU-only clusters.
    num_gpus: float = Field(default=0.0, ge=0)
    num_cpus: float = Field(default=1.0, ge=0)
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=8.0, gt=0)
    # Most images in one denoiser call, summed over the requests batched together.
    max_batch_size: int | None = Field(default=None, ge=1)
    batch_wait_timeout_s: float | None = Field(default=None, ge=0, le=1)
    # Requests a replica takes at once; must be >= max_batch_size or batches never fill. Default 2x.
    max_ongoing_requests: int | None = Field(default=None, ge=1)
    # Requests waiting for a replica (per caller, e.g. per proxy) beyond which Serve answers RESOURCE_EXHAUSTED.
    max_queued_requests: int | None = Field(default=None, ge=1)
    # Multiplexed checkpoints kept loaded per replica (least recently used evicted).
    max_models_per_replica: int | None = Field(default=None, ge=1)
    # Extra or replacement prior builders, PriorKind value -> "module:function" (function(spec, checkpoint_id)).
    prior_builders: dict[PriorKind, str] = {}
    # Load every prior's default checkpoint when a replica starts.
    warm: bool = True

    @model_validator(mode="after")
    def _check(self) -> "ServeAppSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        if (
            self.max_batch_size is not None
            and self.max_ongoing_requests is not None
            and self.max_ongoing_requests < self.max_batch_size
        ):
            raise ValueError(
                f"max_ongoing_requests {self.max_ongoing_requests} < max_batch_size {self.max_batch_size}: "
                "batches could never fill"
            )
        return self

    def resolved(self, config: GuidanceConfig) -> "ServeAppSettings":
        """A copy with every None filled in from the guidance config's batching section."""
        batching = config.batching
        max_batch = self.max_batch_size or batching.max_batch_images
        return self.model_copy(
            update={
                "max_batch_size": max_batch,
                "batch_wait_timeout_s": batching.wait_s if self.batch_wait_timeout_s is None else self.batch_wait_timeout_s,
                "max_ongoing_requests": self.max_ongoing_requests or 2 * max_batch,
                "max_queued_requests": self.max_queued_requests or batching.max_queue,
                "max_models_per_replica": self.max_models_per_replica or batching.max_loaded_checkpoints,
            }
        )

    def deployment_options(self, config: GuidanceConfig) -> dict[str, Any]:
        """`Deployment.options(...)` for this app: replicas, resources, admission control."""
        s = self.resolved(config)
        return {
            "name": "GuidanceDeployment",
            "ray_actor_options": {"num_gpus": s.num_gpus, "num_cpus": s.num_cpus},
            "autoscaling_config": {
                "min_replicas": s.min_replicas,
                "initial_replicas": max(s.min_replicas, 1),
                "max_replicas": s.max_replicas,
                "target_ongoing_requests": s.target_ongoing_requests,
            },
            "max_ongoing_requests": s.max_ongoing_requests,
            "max_queued_requests": s.max_queued_requests,
            "health_check_period_s": 10,
            "graceful_shutdown_timeout_s": 20,
        }


class AppArgs(BaseModel):
    """The `args` of one application in a Serve config: the family's priors (inline or a path) and settings."""

    model_config = ConfigDict(extra="forbid")

    guidance: GuidanceConfig | None = None
    guidance_path: str | None = None
    settings: ServeAppSettings = ServeAppSettings()

    @model_validator(mode="after")
    def _one_source(self) -> "AppArgs":
        if self.guidance is not None and self.guidance_path is not None:
            raise ValueError("give `guidance` or `guidance_path`, not both")
        return self

    def guidance_config(self) -> GuidanceConfig:
        if self.guidance is not None:
            return self.guidance
        if self.guidance_path is not None:
            return GuidanceConfig.load(self.guidance_path)
        return DEFAULT_CONFIG


# -- multiplexed ids ---------------------------------------------------------------------------------------------


def model_id(prior: str, checkpoint_id: str = "") -> str:
    """The multiplexed model id of a prior's checkpoint: "<prior>:<checkpoint>"."""
    return f"{prior}:{checkpoint_id or DEFAULT_CHECKPOINT}"


def resolve_model_id(
    request: SdsRequest | guidance_pb2.CheckPromptRequest, multiplexed_id: str
) -> tuple[str, str]:
    """(prior, checkpoint) of a request from its body and the `multiplexed_model_id` metadata, which must agree."""
    prior, checkpoint = request.prior, request.checkpoint_id
    if multiplexed_id:
        id_prior, _, id_checkpoint = multiplexed_id.rpartition(":")
        if id_prior and id_prior != prior:
            raise InvalidArgument(
                f"prior {prior!r} does not match multiplexed_model_id {multiplexed_id!r}", "prior"
            )
        if checkpoint and id_checkpoint and id_checkpoint != checkpoint:
            raise InvalidArgument(
                f"checkpoint {checkpoint!r} does not match multiplexed_model_id {multiplexed_id!r}", "checkpoint_id"
            )
        checkpoint = checkpoint or id_checkpoint
    return prior, checkpoint or DEFAULT_CHECKPOINT


def _images(requests: Sequence[SdsRequest]) -> int:
    """batch_size_fn: a batch's size is the number of images in it, not the number of requests."""
    return sum(r.batch_size for r in requests)


def _import(path: str) -> Any:
    """"package.module:attr" (or "package.module.attr") -> the object."""
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


@dataclass
class _Loaded:
    """What the multiplexer caches per id. The pool holds the prior itself (its own LRU, sized to the same limit)."""

    prior: DiffusionPrior
    name: str
    checkpoint_id: str


# -- the deployment ----------------------------------------------------------------------------------------------


@serve.deployment
class GuidanceDeployment:
    """GuidanceService for one prior family. Methods are named like the RPCs and take/return the protobufs."""

    def __init__(self, config: dict | GuidanceConfig, settings: dict | ServeAppSettings | None = None) -> None:
        self.config = GuidanceConfig.model_validate(config)
        self.settings = ServeAppSettings.model_validate(settings or {}).resolved(self.config)
        priors = PRIORS.with_builders({kind: _import(path) for kind, path in self.settings.prior_builders.items()})
        # The pool keeps at most as many checkpoints per prior as the multiplexer keeps per replica (an application
        # usually hosts one prior, so both bounds agree; with several, the pool's per-prior bound is the looser one).
        pool_config = self.config.model_copy(
            update={
                "batching": self.config.batching.model_copy(
                    update={"max_loaded_checkpoints": self.settings.max_models_per_replica}
                )
            }
        )
        self.pool = PriorPool(pool_config, priors=priors)
        self._tokens = self.config.auth.service_tokens()
        self.reference_images = ReferenceImageCache(
            self.config.reference_image_cache_size, self.config.reference_image_cache_bytes
        )
        self._runner = BatchRunner(self.pool, log)
        self._batches = 0
        self._stats_lock = threading.Lock()

        # Per-instance batcher and multiplexer so their limits come from configuration (Serve supports both
        # decorators applied at init time).
        async def compute_batch(requests: list[SdsRequest]) -> list[SdsResult | ServiceError]:
            return await asyncio.to_thread(self._run_batch, requests)

        async def load(multiplexed_id: str) -> _Loaded:
            name, _, checkpoint = multiplexed_id.rpartition(":")
            prior = await asyncio.to_thread(self.pool.get, name, checkpoint)
            return _Loaded(prior, name, checkpoint)

        self._compute_batch = serve.batch(
            max_batch_size=self.settings.max_batch_size,
            batch_wait_timeout_s=self.settings.batch_wait_timeout_s,
            batch_size_fn=_images,
        )(compute_batch)
        self._load = serve.multiplexed(max_num_models_per_replica=self.settings.max_models_per_replica)(load)
        if self.settings.warm:
            warm_up_priors(self.config.priors, self._runner)

    # -- RPCs -------------------------------------------------------------------------------------------------

    async def ListPriors(self, request: guidance_pb2.ListPriorsRequest, grpc_context=None):
        if not self._authenticated(grpc_context):
            return guidance_pb2.ListPriorsResponse()
        try:
            infos = await asyncio.to_thread(lambda: [self.pool.get(spec.name).info for spec in self.config.priors])
        except Exception as error:  # noqa: BLE001 - Serve would send the traceback to the client
            return _failed(grpc_context, error, guidance_pb2.ListPriorsResponse(), "list_priors_failed")
        return guidance_pb2.ListPriorsResponse(priors=[guidance_api.prior_info_to_proto(info) for info in infos])

    async def ComputeSds(self, request: guidance_pb2.ComputeSdsRequest, grpc_context=None):
        """Decode, validate, then join a batch. Through a DeploymentHandle (no grpc_context) errors are raised."""
        start = time.perf_counter()
        if not self._authenticated(grpc_context):
            return guidance_pb2.ComputeSdsResponse()
        try:
            # Decoding and validation scan the whole tensor: off the replica's event loop.
            sds_request = await asyncio.to_thread(guidance_api.sds_request_from_proto, request)
            name, checkpoint = resolve_model_id(sds_request, serve.get_multiplexed_model_id())
            sds_request.prior, sds_request.checkpoint_id = name, checkpoint
            self._check_known(name, checkpoint)
            loaded = await self._load(model_id(name, checkpoint))
            await asyncio.to_thread(sds.validate_request, sds_request, loaded.prior, self.settings.max_batch_size)
            sds_request = await asyncio.to_thread(self.reference_images.resolve, sds_request)
            result = await self._compute_batch(sds_request)
            if isinstance(result, ServiceError):
                raise result
        except ServiceError as error:
            empty = guidance_pb2.ComputeSdsResponse()
            return _rejected(grpc_context, error, empty, "sds_rejected", job_id=request.job_id)
        except Exception as error:  # noqa: BLE001 - Serve would send the traceback to the client
            return _failed(grpc_context, error, guidance_pb2.ComputeSdsResponse(), "sds_failed", job_id=request.job_id)
        result.server_time_s = time.perf_counter() - start
        return guidance_api.sds_response_to_proto(result, name, checkpoint)

    async def CheckPrompt(self, request: guidance_pb2.CheckPromptRequest, grpc_context=None):
        """The prompt checks of ComputeSds, on this replica's loaded prior. Errors as in ComputeSds."""
        if not self._authenticated(grpc_context):
            return guidance_pb2.CheckPromptResponse()
        try:
            guidance_api.check_prompt_request_fields(request)
            name, checkpoint = resolve_model_id(request, serve.get_multiplexed_model_id())
            self._check_known(name, checkpoint)
            loaded = await self._load(model_id(name, checkpoint))
            check = await asyncio.to_thread(check_prompt, loaded.prior, request.prompt, request.negative_prompt)
        except ServiceError as error:
            empty = guidance_pb2.CheckPromptResponse()
            return _rejected(grpc_context, error, empty, "prompt_rejected", prior=request.prior)
        except Exception as error:  # noqa: BLE001 - Serve would send the traceback to the client
            return _failed(grpc_context, error, guidance_pb2.CheckPromptResponse(), "check_prompt_failed")
        return guidance_api.prompt_check_to_proto(check)

    def _authenticated(self, grpc_context) -> bool:
        """True, or the call's context is set to UNAUTHENTICATED (the token is never echoed)."""
        if grpc_context is None or not len(self._tokens):
            return True
        token = bearer_token(grpc_context.invocation_metadata())
        if token is not None and self._tokens.lookup(token) is not None:
            return True
        set_error(grpc_context, Unauthenticated("guidance: a valid service token (authorization: Bearer) is needed"))
        return False

    def _check_known(self, name: str, checkpoint: str) -> None:
        """NotFound (naming `prior` / `checkpoint_id`) before the multiplexer is asked for an id that cannot load."""
        self.pool.resolve(name, checkpoint)

    # -- for tests, benchmarks and operators ------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counts on this replica since it started: denoiser calls, requests, images, batches formed by Serve."""
        with self._stats_lock:
            batches = self._batches
        return {**self._runner.snapshot(), "batches": batches}

    # -- batching ---------------------------------------------------------------------------------------------

    def _run_batch(self, requests: list[SdsRequest]) -> list[SdsResult | ServiceError]:
        """One Serve batch; it is already split by multiplexed id, and is grouped by (prior, checkpoint) again here."""
        with self._stats_lock:
            self._batches += 1
        groups: dict[tuple[str, str], list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault((request.prior, request.checkpoint_id), []).append(index)
        results: list[SdsResult | ServiceError | None] = [None] * len(requests)
        for (name, checkpoint), indices in groups.items():
            for index, result in zip(indices, self._run_group(name, checkpoint, [requests[i] for i in indices])):
                results[index] = result
        return results  # type: ignore[return-value]

    def _run_group(self, name: str, checkpoint: str, requests: list[SdsRequest]) -> list[SdsResult | ServiceError]:
        return [_for_client(outcome) for outcome in self._runner.outcomes(name, checkpoint, requests)]


def _for_client(outcome: SdsResult | Exception) -> SdsResult | ServiceError:
    """A bug's exception becomes INTERNAL with a generic message (the BatchRunner logged its traceback)."""
    if isinstance(outcome, Exception) and not isinstance(outcome, ServiceError):
        return ServiceError(INTERNAL_ERROR_MESSAGE)
    return outcome


def _rejected(grpc_context, error: ServiceError, empty, event: str, **fields):
    """A refused request: logged, its code and details to the client (through a DeploymentHandle: raised)."""
    log_rejected(log, event, error, **fields)
    if grpc_context is None:
        raise error
    set_error(grpc_context, error)
    return empty


def _failed(grpc_context, error: Exception, empty, event: str, **fields):
    """A bug (not a ServiceError): logged with its traceback here, INTERNAL with a generic message to the client
    (through a DeploymentHandle: raised as that ServiceError)."""
    internal = internal_error(log, event, error, **fields)
    if grpc_context is None:
        raise internal from None
    set_error(grpc_context, internal)
    return empty


def set_error(grpc_context, error: ServiceError) -> None:
    """Code, message and google.rpc.Status details on a RayServegRPCContext (what `abort_with_status` sends)."""
    status = error.to_rpc_status()
    grpc_context.set_code(error.code)
    grpc_context.set_details(status.message)
    grpc_context.set_trailing_metadata([(STATUS_DETAILS_KEY, status.SerializeToString())])


# -- builders ----------------------------------------------------------------------------------------------------


def build_deployment(config: GuidanceConfig, settings: ServeAppSettings | None = None) -> serve.Application:
    settings = settings or ServeAppSettings()
    options = settings.deployment_options(config)
    return GuidanceDeployment.options(**options).bind(config.model_dump(mode="json"), settings.model_dump(mode="json"))


def build_app(args: dict) -> serve.Application:
    """Application builder for Serve config files and KubeRay serveConfigV2 (`import_path` ...:build_app)."""
    parsed = AppArgs.model_validate(args or {})
    return build_deployment(parsed.guidance_config(), parsed.settings)


# -- local Ray + Serve, loopback only ----------------------------------------------------------------------------


@dataclass
class LocalServe:
    grpc_port: int
    http_port: int
    apps: dict[str, ServeAppSettings]
    temp_dir: str
    _restore: Callable[[], None] = field(default=lambda: None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def handle(self, app: str) -> DeploymentHandle:
        return serve.get_app_handle(app)

    def stats(self, app: str, timeout_s: float = 10.0) -> dict[str, int]:
        return self.handle(app).stats.remote().result(timeout_s=timeout_s)

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        import ray

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            self._restore()
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def _pin_ray_to_loopback() -> Callable[[], None]:
    """Makes every Ray process of this node advertise and dial 127.0.0.1, never the machine's other addresses.

    `ray.init(_node_ip_address="127.0.0.1")` alone is turned back into the machine's address by Ray; with
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray keeps the loopback address. Child processes (GCS, raylet, agents)
    read the variable from the environment; this process read it when `ray` was first imported, so the
    already-imported constant is set too (Ray 2.60 reads it at call time as `ray_constants.ENABLE_RAY_CLUSTER`).
    Returns a function that restores what was changed.
    """
    from ray._private import ray_constants

    root = str(Path(__file__).resolve().parents[2])
    python_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    updates = {key: value for key, value in SERVE_ENV.items() if key not in os.environ}
    updates[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    updates[serve_loopback.LOOPBACK_ENV] = "1"  # Serve's own gRPC servers on 127.0.0.1 too (serve_loopback.py)
    # The autoscaler monitor's and dashboard's metrics servers default to fixed ports (44217, 44227) that a second
    # Ray instance on the same machine would collide with.
    updates["AUTOSCALER_METRIC_PORT"] = str(free_port())
    updates["DASHBOARD_METRIC_PORT"] = str(free_port())
    # Replicas import this package (and tests' helpers) by module path from the repository root.
    if root not in python_path:
        updates["PYTHONPATH"] = os.pathsep.join([root, *python_path])
    saved_env = {key: os.environ.get(key) for key in updates}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(updates)
    ray_constants.ENABLE_RAY_CLUSTER = False

    def restore() -> None:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    return restore


def start_local(
    apps: Sequence[GuidanceConfig | tuple[GuidanceConfig, ServeAppSettings]],
    grpc_port: int = 0,
    http_port: int = 0,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    request_timeout_s: float | None = 60.0,
    log_to_driver: bool = False,
) -> LocalServe:
    """Starts Ray (127.0.0.1 only, private temp dir), Serve with gRPC ingress, and one application per entry.

    Ports 0 pick free loopback ports. Returns once every application is running; call `shutdown()` after.
    """
    import ray

    entries = [(a, ServeAppSettings()) if isinstance(a, GuidanceConfig) else a for a in apps]
    names = [s.name for _, s in entries]
    prefixes = [s.route_prefix for _, s in entries]
    if len(set(names)) != len(names) or len(set(prefixes)) != len(prefixes):
        raise ValueError(f"application names and route prefixes must be unique: {names}, {prefixes}")
    restore = _pin_ray_to_loopback()
    grpc_port = grpc_port or free_port()
    http_port = http_port or free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-g-", dir="/tmp")
    try:
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            _temp_dir=temp_dir,
            num_cpus=num_cpus if num_cpus is not None else max(4, len(entries) * 2),
            num_gpus=num_gpus,
            include_dashboard=False,
            log_to_driver=log_to_driver,
            configure_logging=False,
            runtime_env={"worker_process_setup_hook": "services.guidance.serve_loopback.patch"},
        )
    except BaseException:
        restore()
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    local = LocalServe(grpc_port, http_port, {s.name: s for _, s in entries}, temp_dir, restore)
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": http_port},
            grpc_options=serve.config.gRPCOptions(
                port=grpc_port,
                grpc_servicer_functions=[GRPC_SERVICER_FUNCTION],
                request_timeout_s=request_timeout_s,
            ),
        )
        for config, settings in entries:
            serve.run(build_deployment(config, settings), name=settings.name, route_prefix=settings.route_prefix)
    except BaseException:
        local.shutdown()
        raise
    return local


def main() -> None:
    """Development: `python -m services.guidance.serve_app [--config guidance.yaml] [--grpc-port 9000]`, loopback only."""
    import argparse
    import signal

    from shared import logging as project_logging

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--config", help="guidance YAML; default: the analytic prior only")
    parser.add_argument("--name", default="guidance", help="application name (gRPC metadata `application`)")
    parser.add_argument("--grpc-port", type=int, default=9000)
    parser.add_argument("--http-port", type=int, default=0)
    args = parser.parse_args()
    project_logging.configure()
    config = GuidanceConfig.load(args.config) if args.config else DEFAULT_CONFIG
    settings = ServeAppSettings(name=args.name, route_prefix=f"/{args.name}")
    local = start_local([(config, settings)], grpc_port=args.grpc_port, http_port=args.http_port)
    log.info("guidance_serve_ready", address=local.grpc_address, application=args.name,
             priors=[p.name for p in config.priors])
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    try:
        stopped.wait()
    finally:
        local.shutdown()


if __name__ == "__main__":
    main()
