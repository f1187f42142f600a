"""`magic3d`: run the services, generate a mesh, manage jobs.

    magic3d serve                               # every service on 127.0.0.1 (guidance under Ray Serve), until Ctrl-C;
                                                # the web page on http://127.0.0.1:8080/ (--http-port)
    magic3d serve --guidance-config my-guidance.yaml    # ... with your own guidance YAML (e.g. analytic meshes)
    magic3d serve --service scene --config deploy/config/scene.yaml --host 0.0.0.0     # one service
    magic3d generate "a red torus"              # starts the local stack, runs the job, writes ./out/<job>/, stops
    magic3d generate "a prompt" --preset magic3d --address orchestrator:50071           # against a deployment
    magic3d generate --image photo.png ["a prompt"] [--elevation 10 --distance 1.8 --fovy 40 --depth d.npy]
    magic3d jobs list | get JOB | cancel JOB | delete JOB  [--address HOST:PORT]

`generate` shows a progress bar (stage, step, ETA) and downloads every artifact (model.glb, model.obj + .mtl +
texture.png, preview.png, turntable.gif, checkpoints, provenance.json) into ./out/<job>/.

Authentication: the bearer token comes from --token, else $MAGIC3D_TOKEN, else the local stack's generated token
(<state-dir>/client-token), so `make run` and `magic3d jobs` against `magic3d serve` need no set-up. Whatever the
orchestrator answers, files are written only inside ./out/<job>/ (job ids and artifact names are checked).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import grpc
from magic3d.v1 import orchestrator_pb2, orchestrator_pb2_grpc, scene_pb2

from shared.auth import CLIENT_TOKEN_ENV, LOCAL_CLIENT_TOKEN_FILE, ClientTlsConfig, is_loopback
from shared.errors import error_from_rpc
from shared.grpcio import insecure_channel

DEFAULT_ADDRESS = "127.0.0.1:50071"
STAGES = {scene_pb2.STAGE_COARSE: "coarse", scene_pb2.STAGE_FINE: "fine"}


# -- generate ---------------------------------------------------------------------------------------------------

def generate(args: argparse.Namespace) -> int:
    from shared import logging as project_logging

    project_logging.configure("INFO" if args.verbose else "WARNING")  # JSON logs on stderr; the bar stays readable
    stack = None
    address = args.address
    if address is None:
        from services.local_stack import start_local_stack

        print(f"starting the local stack (guidance: {args.guidance}) ...", file=sys.stderr)
        stack = start_local_stack(local_stack_settings(args, orchestrator_port=0))
        address = stack.orchestrator_address
    try:
        return _generate(args, address, client_token(args, address))
    finally:
        if stack is not None:
            stack.stop()


def local_stack_settings(args: argparse.Namespace, **overrides):
    """The local stack's settings from the command line (--guidance, --state-dir, --guidance-config, --scene-device,
    --guidance-gpus)."""
    from services.local_stack import LocalStackSettings

    settings = {"guidance": args.guidance, "state_dir": Path(args.state_dir), "scene_device": args.scene_device,
                "guidance_gpus": args.guidance_gpus, **overrides}
    if getattr(args, "guidance_config", None):
        path = Path(args.guidance_config)
        if not path.is_file():
            raise SystemExit(f"error: --guidance-config {path}: no such file")
        settings["guidance_config"] = path
    return LocalStackSettings(**settings)


def build_spec(args: argparse.Namespace) -> orchestrator_pb2.JobSpec:
    """The JobSpec of `magic3d generate` (no network)."""
    spec = orchestrator_pb2.JobSpec(preset=args.preset, seed=args.seed)
    if args.image:
        image = spec.image
        image.encoded = Path(args.image).read_bytes()  # PNG or JPEG: decoded and checked by the orchestrator
        image.prompt = args.prompt or ""
        image.negative_prompt = args.negative_prompt
        image.segmenter = args.segmenter
        for name, value in (("elevation_deg", args.elevation), ("distance", args.distance), ("fovy_deg", args.fovy)):
            if value is not None:
                setattr(image, name, value)
        if args.depth:
            image.depth.CopyFrom(depth_tensor(args.depth))
    elif args.mesh:
        path = Path(args.mesh)
        spec.mesh.mesh = path.read_bytes()
        spec.mesh.format = path.suffix.lstrip(".").lower()
        spec.mesh.prompt = args.prompt
    elif args.edit:
        spec.edit.source_job_id = args.edit
        spec.edit.prompt = args.prompt
    else:
        spec.text.prompt = args.prompt
        spec.text.negative_prompt = args.negative_prompt
    for item in args.steps or []:
        stage, _, steps = item.partition("=")
        override = spec.overrides.add(steps=int(steps))
        override.config.stage = {"coarse": scene_pb2.STAGE_COARSE, "fine": scene_pb2.STAGE_FINE}[stage]
    return spec


def depth_tensor(path: str):
    """A (H, W) depth map from a .npy file as a float32 Tensor (numpy only; no pickles)."""
    import numpy as np

    from shared.image_input import array_to_proto

    depth = np.load(path, allow_pickle=False)
    if depth.ndim != 2:
        raise SystemExit(f"error: --depth {path}: expected a (H, W) array, got shape {depth.shape}")
    return array_to_proto(np.asarray(depth, dtype=np.float32))


def _generate(args: argparse.Namespace, address: str, token: str | None) -> int:
    spec = build_spec(args)
    request = orchestrator_pb2.GenerateRequest(spec=spec, request_id=args.request_id or uuid.uuid4().hex)
    channel = insecure_channel(address, token=token, tls=client_tls(args))
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    bar = ProgressBar()
    job_name = ""
    try:
        for response in stub.Generate(request, timeout=args.timeout):
            event = response.event
            job_name = event.job_name or job_name
            kind = event.WhichOneof("event")
            if kind == "queued":
                print(f"{job_name}: queued (position {event.queued.position})", file=sys.stderr)
            elif kind == "stage_started":
                bar.start(STAGES.get(event.stage_started.stage, "?"), event.stage_started.total_steps)
            elif kind == "progress":
                bar.update(event.progress)
            elif kind == "stage_finished":
                bar.finish()
            elif kind == "done":
                bar.finish()
                try:
                    folder = job_folder(Path(args.out), job_name)
                except UnsafeName as error:
                    print(f"error: {error}", file=sys.stderr)
                    return 2
                written = download(event.done.artifacts, folder, local_files=is_loopback(address.rpartition(":")[0]))
                print(f"{job_name}: done -> {folder}/", file=sys.stderr)
                for kind, path in written:
                    print(f"  {kind}: {path}")
                return 0
            elif kind == "failed":
                bar.finish()
                print(f"{job_name}: failed: {event.failed.reason}", file=sys.stderr)
                return 1
    except grpc.RpcError as error:
        bar.finish()
        problem = error_from_rpc(error)
        print(f"error: {error.code().name}: {problem}", file=sys.stderr)
        return 2
    finally:
        channel.close()
    print("error: the stream ended without a result", file=sys.stderr)
    return 1


class ProgressBar:
    """One line on stderr: stage, step / total, a bar, the latest loss and the ETA."""

    def __init__(self, width: int = 30) -> None:
        self.width = width
        self.stage = ""
        self.total = 0
        self.active = False
        self.interactive = sys.stderr.isatty()
        self.last_print = 0.0

    def start(self, stage: str, total: int) -> None:
        self.finish()
        self.stage, self.total, self.active = stage, total, True
        print(f"stage {stage}: {total} steps", file=sys.stderr)

    def update(self, progress) -> None:
        if progress.total_steps:
            self.total = progress.total_steps
        if progress.preview_uri and not self.interactive:
            print(f"  preview at step {progress.step}: {progress.preview_uri}", file=sys.stderr)
        fraction = min(1.0, progress.step / self.total) if self.total else 0.0
        filled = int(round(fraction * self.width))
        eta = f"ETA {format_seconds(progress.eta_seconds)}" if progress.eta_seconds else ""
        loss = f"sds {progress.losses['sds']:.3g}" if "sds" in progress.losses else ""
        line = f"[{self.stage}] {progress.step}/{self.total} |{'#' * filled}{'.' * (self.width - filled)}| {fraction:4.0%} {loss} {eta}"
        if self.interactive:
            print("\r" + line.ljust(100), end="", file=sys.stderr, flush=True)
        elif time.monotonic() - self.last_print > 5 or progress.step == self.total:
            print(line, file=sys.stderr, flush=True)
            self.last_print = time.monotonic()

    def finish(self) -> None:
        if self.active and self.interactive:
            print(file=sys.stderr)
        self.active = False


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


class UnsafeName(ValueError):
    pass


def safe_name(name: str, what: str) -> str:
    """`name` if it is one plain file name (no separators, no '..', not hidden, not absolute); else UnsafeName.
    Names come from the orchestrator, which must not be able to choose where this machine writes."""
    if not _SAFE_NAME.match(name) or ".." in name:
        raise UnsafeName(f"refusing the {what} {name!r} from the server: not a plain file name")
    return name


def job_folder(out: Path, job_name: str) -> Path:
    """./out/<job id>, the job id checked (the server names the job)."""
    return out / safe_name(job_name.removeprefix("jobs/"), "job name")


def download(artifacts, folder: Path, local_files: bool = True) -> list[tuple[str, Path]]:
    """Fetches each artifact link (file:// or a presigned http(s) URL) into `folder`, and nowhere else: an
    artifact whose name is not a plain file name is skipped with a warning. file:// links are copied only with
    `local_files` (an orchestrator on this machine; a remote one has no business naming this machine's files).
    Returns (kind, path) written."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[tuple[str, Path]] = []
    for artifact in artifacts:
        try:
            target = folder / safe_name(artifact.kind, "artifact name")
        except UnsafeName as error:
            print(f"  warning: {error}; skipped", file=sys.stderr)
            continue
        if target.is_symlink():
            target.unlink()  # never write through a link planted in the folder
        parsed = urllib.parse.urlparse(artifact.uri)
        if parsed.scheme == "file" and local_files:
            shutil.copyfile(urllib.request.url2pathname(parsed.path), target)
        elif parsed.scheme in ("http", "https"):
            with urllib.request.urlopen(artifact.uri, timeout=60) as response, open(target, "wb") as out:  # noqa: S310
                shutil.copyfileobj(response, out)
        else:
            print(f"  (not downloaded: {artifact.kind}, a {parsed.scheme or 'schemeless'} link)", file=sys.stderr)
            continue
        written.append((artifact.kind, target))
    return written


# -- jobs -------------------------------------------------------------------------------------------------------

def client_token(args: argparse.Namespace, address: str) -> str | None:
    """--token, else $MAGIC3D_TOKEN, else (for a loopback address only: never sent elsewhere) the local stack's
    generated token file, else none."""
    if getattr(args, "token", None):
        return args.token
    if os.environ.get(CLIENT_TOKEN_ENV):
        return os.environ[CLIENT_TOKEN_ENV].strip()
    if not is_loopback(address.rpartition(":")[0]):
        return None
    path = Path(getattr(args, "state_dir", None) or "out/local") / LOCAL_CLIENT_TOKEN_FILE
    return (path.read_text().strip() or None) if path.is_file() else None


def client_tls(args: argparse.Namespace) -> ClientTlsConfig | None:
    """TLS to the orchestrator when --ca-file names the CA of its certificate."""
    ca_file = getattr(args, "ca_file", None)
    return ClientTlsConfig(ca_file=Path(ca_file)) if ca_file else None


def jobs(args: argparse.Namespace) -> int:
    address = args.address or DEFAULT_ADDRESS
    channel = insecure_channel(address, token=client_token(args, address), tls=client_tls(args))
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    name = f"jobs/{args.job.removeprefix('jobs/')}" if getattr(args, "job", None) else ""
    try:
        if args.action == "list":
            token = ""
            while True:
                page = stub.ListJobs(orchestrator_pb2.ListJobsRequest(page_size=50, page_token=token), timeout=30)
                for job in page.jobs:
                    print(describe(job))
                token = page.next_page_token
                if not token:
                    break
        elif args.action == "get":
            job = stub.GetJob(orchestrator_pb2.GetJobRequest(name=name), timeout=30).job
            print(describe(job))
            for artifact in job.artifacts:
                print(f"  {artifact.kind}: {artifact.uri}")
        elif args.action == "cancel":
            print(describe(stub.CancelJob(orchestrator_pb2.CancelJobRequest(name=name), timeout=30).job))
        elif args.action == "delete":
            stub.DeleteJob(orchestrator_pb2.DeleteJobRequest(name=name), timeout=30)
            print(f"{name} deleted")
    except grpc.RpcError as error:
        print(f"error: {error.code().name}: {error_from_rpc(error)}", file=sys.stderr)
        return 2
    finally:
        channel.close()
    return 0


def describe(job: orchestrator_pb2.Job) -> str:
    state = orchestrator_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
    stage = STAGES.get(job.stage, "")
    where = f" {stage} {job.step}/{job.total_steps}" if stage else ""
    prompt = job.spec.text.prompt or job.spec.edit.prompt or job.spec.mesh.prompt or job.spec.image.prompt
    error = f" ({job.error})" if job.error else ""
    kind = job.spec.WhichOneof("input") or "?"
    return f"{job.name}\t{state}{where}\t{kind}\t{job.spec.preset or 'default'}\t{prompt!r}{error}"


# -- serve ------------------------------------------------------------------------------------------------------

def serve(args: argparse.Namespace) -> int:
    from shared import logging as project_logging

    if args.service != "all":
        module = {"guidance": "services.guidance.standalone", "scene": "services.scene.server",
                  "orchestrator": "services.orchestrator.server"}[args.service]
        forwarded = [a for a in (("--config", args.config), ("--host", args.host), ("--port", args.port)) if a[1]]
        sys.argv = [module] + [str(x) for pair in forwarded for x in pair]
        __import__(module, fromlist=["main"]).main()
        return 0
    import signal
    import threading

    from services.local_stack import start_local_stack

    project_logging.configure()
    stack = start_local_stack(local_stack_settings(
        args, orchestrator_port=args.port or 50071, metrics_port=args.metrics_port,
        http_port=None if args.http_port < 0 else args.http_port,
    ))
    print(f"orchestrator listening on {stack.orchestrator_address} (Ctrl-C stops everything)", file=sys.stderr)
    if stack.web_url:  # the token is the local one (state dir, 0600); the page swaps it for a cookie at once
        print(f"web page: {stack.web_url}?token={stack.client_token}", file=sys.stderr)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    stopped.wait()
    stack.stop()
    return 0


# -- entry point ------------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="magic3d", description="Text to textured 3D mesh (Magic3D) as services.")
    commands = root.add_subparsers(dest="command", required=True)

    run = commands.add_parser("serve", help="run every service locally, or one service")
    run.add_argument("--service", choices=("all", "guidance", "scene", "orchestrator"), default="all")
    run.add_argument("--config", help="the one service's YAML (with --service)")
    run.add_argument("--host")
    run.add_argument("--port", type=int, help="the orchestrator's port (all) or the one service's port")
    run.add_argument("--guidance", choices=("serve", "standalone"), default="serve")
    run.add_argument("--state-dir", default="out/local", help="job database and artifact store (all)")
    run.add_argument("--metrics-port", type=int, default=None)
    run.add_argument("--guidance-config", metavar="FILE", help="the guidance tier's YAML (all; default: "
                                                               "deploy/config/guidance.yaml), e.g. with your meshes")
    run.add_argument("--scene-device", choices=("cpu", "auto", "cuda"), default="cpu",
                     help="the scene service's device (all; auto: CUDA where there is one)")
    run.add_argument("--guidance-gpus", type=int, default=0, choices=(0, 1),
                     help="GPUs of the Ray Serve guidance replica (all)")
    run.add_argument("--http-port", type=int, default=8080,
                     help="the web page on 127.0.0.1 (all; 0: any free port, -1: off)")
    run.set_defaults(handler=serve)

    gen = commands.add_parser("generate", help="turn a prompt (or an image) into a textured mesh under ./out/<job>/")
    gen.add_argument("prompt", nargs="?", default=None, help="required, except with --image (then optional)")
    gen.add_argument("--preset", default="", help="magic3d, fast, cpu-demo; magic123, image-cpu-demo with --image "
                                                  "(default: the orchestrator's default for the input)")
    gen.add_argument("--image", metavar="FILE", help="image to 3D (Magic123): a PNG (alpha = object) or JPEG")
    gen.add_argument("--elevation", type=float, help="--image: the photo's camera elevation in degrees")
    gen.add_argument("--distance", type=float, help="--image: its camera distance (scene box [-1, 1]^3)")
    gen.add_argument("--fovy", type=float, help="--image: its vertical field of view in degrees")
    gen.add_argument("--depth", metavar="FILE.npy", help="--image: a (H, W) depth map of the image")
    gen.add_argument("--segmenter", default="", help="--image without alpha: background matte (default threshold)")
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", action="append", metavar="STAGE=N", help="override a stage's steps, e.g. fine=50")
    gen.add_argument("--edit", metavar="JOB", help="edit an earlier job with this prompt (Magic3D prompt editing)")
    gen.add_argument("--mesh", metavar="FILE", help="refine this GLB/OBJ mesh with the prompt")
    gen.add_argument("--request-id", help="idempotency key (default: a fresh one)")
    gen.add_argument("--address", help="orchestrator HOST:PORT; default: start the local stack for this job")
    gen.add_argument("--guidance", choices=("serve", "standalone"), default="serve", help="local stack only")
    gen.add_argument("--state-dir", default="out/local", help="local stack only")
    gen.add_argument("--guidance-config", metavar="FILE", help="local stack only: the guidance tier's YAML (default: "
                                                               "deploy/config/guidance.yaml), e.g. with your meshes")
    gen.add_argument("--scene-device", choices=("cpu", "auto", "cuda"), default="cpu",
                     help="local stack only: the scene service's device (auto: CUDA where there is one)")
    gen.add_argument("--guidance-gpus", type=int, default=0, choices=(0, 1),
                     help="local stack only: GPUs of the Ray Serve guidance replica")
    gen.add_argument("--out", default="out")
    gen.add_argument("--timeout", type=float, default=24 * 3600)
    gen.add_argument("--verbose", action="store_true", help="the local services' JSON logs at INFO")
    gen.add_argument("--token", help=f"bearer token (default: ${CLIENT_TOKEN_ENV}, else the local stack's)")
    gen.add_argument("--ca-file", help="TLS to the orchestrator, verified against this CA certificate (PEM)")
    gen.set_defaults(handler=generate)

    job = commands.add_parser("jobs", help="list, get, cancel or delete jobs")
    job.add_argument("action", choices=("list", "get", "cancel", "delete"))
    job.add_argument("job", nargs="?")
    job.add_argument("--address", default=None)
    job.add_argument("--token", help=f"bearer token (default: ${CLIENT_TOKEN_ENV}, else the local stack's)")
    job.add_argument("--state-dir", default="out/local", help="where the local stack keeps its token")
    job.add_argument("--ca-file", help="TLS to the orchestrator, verified against this CA certificate (PEM)")
    job.set_defaults(handler=jobs)
    return root


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    if args.command == "jobs" and args.action != "list" and not args.job:
        parser().error(f"jobs {args.action} needs a job name")
    if args.command == "generate":
        if args.address and args.guidance_config:
            parser().error("--guidance-config configures the local stack: it does not go with --address")
        if args.image and (args.mesh or args.edit):
            parser().error("--image cannot be combined with --mesh or --edit")
        if not args.image and args.prompt is None:
            parser().error("generate needs a prompt (optional only with --image)")
        image_only = ("elevation", "distance", "fovy", "depth", "segmenter")
        if not args.image and any(getattr(args, name) not in (None, "") for name in image_only):
            parser().error("--elevation, --distance, --fovy, --depth and --segmenter go with --image")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
