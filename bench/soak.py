"""Soak: tiny jobs through the three services as separate processes on 127.0.0.1, while seeded kill -9s hit them.

    python -m bench.soak --jobs 20 --seed 0 --kill-every 4 9 --json out/bench/soak.json
    python -m bench.soak --jobs 200 --seed 1 --time-limit 3600          # a longer run

The guidance server (analytic prior), one scene replica and the orchestrator run as their own processes with the
project's real entry points and configs written here; a killer thread picks a service at random every
U(kill-every) seconds, sends it SIGKILL and starts it again on the same port. Jobs are submitted with request ids
(a submit that meets a dead orchestrator is retried with the same id) and followed until they end. Counted:

* lost: submitted requests whose job did not succeed (failed, cancelled, missing, or unfinished at the limit);
* duplicated: jobs beyond one per request id in the orchestrator's listing;
* orphans: scenes the scene replica still holds once every job has ended (its own ListScenes).

`tests/test_faults.py` runs it small inside `make test`; results of longer runs go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from magic3d.v1 import orchestrator_pb2, orchestrator_pb2_grpc, scene_pb2, scene_pb2_grpc

from shared.grpcio import free_port, insecure_channel

REPO = Path(__file__).resolve().parent.parent
SERVICES = ("guidance", "scene", "orchestrator")
RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
ENDED = (orchestrator_pb2.JOB_STATE_SUCCEEDED, orchestrator_pb2.JOB_STATE_FAILED, orchestrator_pb2.JOB_STATE_CANCELLED)

# Small enough for 2 CPU cores: a job is a few seconds of steps plus its export.
TINY_PRESETS = {
    "default": "soak",
    "presets": {
        "soak": {
            "checkpoint_every": 3,
            "progress_every": 1,
            "stages": [
                {"stage": "coarse", "steps": 9, "config": {"resolution": 16, "batchSize": 2, "samplesPerRay": 16,
                                                            "priors": [{"prior": "analytic"}]}},
                {"stage": "fine", "steps": 3, "config": {"resolution": 32, "batchSize": 2,
                                                          "priors": [{"prior": "analytic"}], "dmtet": {"gridCells": 16}}},
            ],
            "export": {"texture_size": 64, "formats": ["glb"]},
        }
    },
}
TINY_COARSE = {
    "prompt": "unset",
    "field": {"encoding": {"n_levels": 4, "log2_hashmap_size": 12, "base_resolution": 8, "per_level_scale": 1.5},
              "backend": "torch", "hidden_width": 16},
    "occupancy": {"resolution": 8, "step_size": 0.125, "update_every": 2, "warmup_steps": 2},
}
TINY_FINE = {"prompt": "unset", "dmtet": {"level_candidates": 6, "level_views": 2, "level_view_resolution": 32}}


@dataclass(frozen=True)
class SoakSettings:
    root: Path
    jobs: int = 20
    seed: int = 0
    kill_every_s: tuple[float, float] = (4.0, 9.0)  # uniform range between kills; (0, 0): no kills
    services: tuple[str, ...] = SERVICES  # which services the killer picks from
    time_limit_s: float = 270.0  # the run stops by itself after this, whatever is unfinished counts as lost
    outage_window_s: float = 60.0  # the scene's guidance outage window (longer than a guidance restart)


@dataclass
class SoakReport:
    jobs: int
    succeeded: int = 0
    lost: list[str] = field(default_factory=list)  # "request-id: state / reason"
    duplicated: int = 0
    orphans: int = 0
    kills: dict[str, int] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)  # job -> starts (first run + resumes)
    wall_s: float = 0.0


class ServiceProcess:
    """One service as a child process on a fixed loopback port, so a restarted one is found where it was."""

    def __init__(self, name: str, module: str, config: Path, port: int, log_dir: Path) -> None:
        self.name, self.module, self.config, self.port, self.log_dir = name, module, config, port, log_dir
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, ready_timeout_s: float = 120.0) -> None:
        self.starts += 1
        log = (self.log_dir / f"{self.name}-{self.starts}.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module, "--config", str(self.config), "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        wait_serving(self.address, ready_timeout_s, self.process)

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, as when a node or container dies."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_serving(address: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    with insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the service at {address} exited with {process.returncode} while starting")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"nothing served at {address} within {timeout_s} s")


class SoakStack:
    """Guidance, one scene replica and the orchestrator as processes, configured under `root`."""

    def __init__(self, root: Path, outage_window_s: float = 60.0, max_attempts: int = 20) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        ports = {name: free_port() for name in SERVICES}
        store = str(root / "store")
        write = lambda name, data: _write_yaml(root / f"{name}.yaml", data)  # noqa: E731
        write("guidance", {"priors": [{"name": "analytic", "kind": "analytic", "resolution": 16}],
                           "batching": {"wait_s": 0}})
        write("registry", {"client": {"timeout_s": 30, "initial_backoff_s": 0.1, "max_backoff_s": 1.0,
                                      "outage_window_s": outage_window_s},
                           "priors": {"analytic": {"kind": "standalone", "address": f"127.0.0.1:{ports['guidance']}"}}})
        write("presets", TINY_PRESETS)
        write("scene", {"capacity": 4, "device": "cpu", "store_uri": store, "registry_path": str(root / "registry.yaml"),
                        "coarse_defaults": TINY_COARSE, "fine_defaults": TINY_FINE})
        write("orchestrator", {"database_path": str(root / "jobs.db"), "store_uri": store,
                               "scene_replicas": [f"127.0.0.1:{ports['scene']}"], "queue_size": 1000,
                               "max_attempts": max_attempts, "replica_cooldown_s": 0.5,
                               "registry_path": str(root / "registry.yaml"), "presets_path": str(root / "presets.yaml")})
        modules = {"guidance": "services.guidance.standalone", "scene": "services.scene.server",
                   "orchestrator": "services.orchestrator.server"}
        self.services = {
            name: ServiceProcess(name, modules[name], root / f"{name}.yaml", ports[name], root) for name in SERVICES
        }
        self._channels: dict[str, grpc.Channel] = {}

    def start(self) -> None:
        try:
            for name in SERVICES:  # guidance first: the others check prompts and compute SDS against it
                self.services[name].start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for channel in self._channels.values():
            channel.close()
        for name in reversed(SERVICES):
            self.services[name].stop()

    def kill_and_restart(self, name: str, down_s: float = 0.0) -> None:
        """SIGKILL, `down_s` seconds of outage, then the same service on the same port (ready when this returns)."""
        self.services[name].kill()
        time.sleep(down_s)
        self.services[name].start()

    def orchestrator(self) -> orchestrator_pb2_grpc.OrchestratorServiceStub:
        return orchestrator_pb2_grpc.OrchestratorServiceStub(self._channel("orchestrator"))

    def scene(self) -> scene_pb2_grpc.SceneServiceStub:
        return scene_pb2_grpc.SceneServiceStub(self._channel("scene"))

    def _channel(self, name: str) -> grpc.Channel:
        if name not in self._channels:
            self._channels[name] = insecure_channel(self.services[name].address)
        return self._channels[name]

    def scenes_held(self) -> int:
        return len(retrying(lambda: self.scene().ListScenes(scene_pb2.ListScenesRequest(), timeout=10)).scenes)

    def submit(self, spec: orchestrator_pb2.JobSpec, request_id: str) -> str:
        request = orchestrator_pb2.SubmitJobRequest(spec=spec, request_id=request_id)
        return retrying(lambda: self.orchestrator().SubmitJob(request, timeout=30)).job.name

    def get(self, name: str) -> orchestrator_pb2.Job:
        return retrying(lambda: self.orchestrator().GetJob(orchestrator_pb2.GetJobRequest(name=name), timeout=10)).job

    def wait(self, name: str, timeout_s: float) -> orchestrator_pb2.Job:
        deadline = time.monotonic() + timeout_s
        job = self.get(name)
        while job.state not in ENDED and time.monotonic() < deadline:
            time.sleep(0.25)
            job = self.get(name)
        return job


def retrying(call, timeout_s: float = 120.0):
    """A call to a service that may be restarting: UNAVAILABLE (and a deadline spent meanwhile) is retried."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() not in RETRY_CODES or time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def soak_spec(index: int) -> orchestrator_pb2.JobSpec:
    spec = orchestrator_pb2.JobSpec(preset="soak", seed=index)
    spec.text.prompt = "a red torus"
    return spec


def run_soak(settings: SoakSettings) -> SoakReport:
    started = time.monotonic()
    report = SoakReport(jobs=settings.jobs, kills={name: 0 for name in settings.services})
    stack = SoakStack(settings.root, settings.outage_window_s)
    stack.start()
    done = threading.Event()
    killer = threading.Thread(target=_kill_loop, args=(stack, settings, report, done), name="soak-killer", daemon=True)
    try:
        killer.start()
        names = {f"soak-{i}": stack.submit(soak_spec(i), f"soak-{i}") for i in range(settings.jobs)}
        limit = started + settings.time_limit_s
        for request_id, name in names.items():
            job = stack.wait(name, max(1.0, limit - time.monotonic()))
            if job.state == orchestrator_pb2.JOB_STATE_SUCCEEDED:
                report.succeeded += 1
            else:
                report.lost.append(f"{request_id}: {orchestrator_pb2.JobState.Name(job.state)} {job.error[:200]}")
        done.set()
        killer.join(timeout=180)
        listed = retrying(lambda: stack.orchestrator().ListJobs(orchestrator_pb2.ListJobsRequest(page_size=1000), timeout=30))
        report.duplicated = len(listed.jobs) - len({j.name for j in listed.jobs} & set(names.values()))
        report.orphans = stack.scenes_held()
        report.attempts = attempts_per_job(settings.root / "jobs.db")
    finally:
        done.set()
        stack.stop()
    report.wall_s = round(time.monotonic() - started, 1)
    return report


def _kill_loop(stack: SoakStack, settings: SoakSettings, report: SoakReport, done: threading.Event) -> None:
    low, high = settings.kill_every_s
    if high <= 0:
        return
    rng = random.Random(settings.seed)
    while not done.wait(rng.uniform(low, high)):
        name = rng.choice(settings.services)
        stack.kill_and_restart(name)
        report.kills[name] += 1


def attempts_per_job(database: Path) -> dict[str, int]:
    import sqlite3

    with sqlite3.connect(database) as conn:
        return dict(conn.execute("SELECT job_id, attempts FROM jobs").fetchall())


def _write_yaml(path: Path, data: dict) -> None:
    path.write_text(yaml.safe_dump(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-every", type=float, nargs=2, default=(4.0, 9.0), metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--services", nargs="+", default=list(SERVICES), choices=SERVICES)
    parser.add_argument("--time-limit", type=float, default=1800.0)
    parser.add_argument("--root", type=Path, default=Path("out/soak"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    settings = SoakSettings(
        root=args.root / time.strftime("%Y%m%d-%H%M%S"), jobs=args.jobs, seed=args.seed,
        kill_every_s=tuple(args.kill_every), services=tuple(args.services), time_limit_s=args.time_limit,
    )
    report = run_soak(settings)
    result = {"machine": f"{platform.node()} {os.cpu_count()} CPU cores", "date": time.strftime("%Y-%m-%d"),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
              "report": asdict(report)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    sys.exit(0 if not report.lost and not report.duplicated and not report.orphans else 1)


if __name__ == "__main__":
    main()
