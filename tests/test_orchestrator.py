"""The orchestrator over real gRPC on 127.0.0.1: a standalone analytic guidance server, real scene services and a
tiny preset. Jobs run end to end, survive an orchestrator restart, move to another scene replica when theirs dies,
and bad requests are refused before any work with the field named."""

from __future__ import annotations

import io
import time
from pathlib import Path

import grpc
import pytest
import trimesh
import yaml
from magic3d.v1 import orchestrator_pb2, orchestrator_pb2_grpc, scene_pb2, scene_pb2_grpc

from services.guidance import standalone
from services.guidance.config import GuidanceConfig, PriorSpec
from services.orchestrator import server as orchestrator_server
from services.orchestrator.jobs import JobStore
from services.orchestrator.presets import PresetBook, merge_stage_config, plan_job
from services.scene import server as scene_server
from shared.errors import InvalidArgument, field_violations
from shared.grpcio import insecure_channel
from shared.guidance_api import PriorKind
from shared.guidance_client import GuidanceClient
from shared.meshes import torus
from shared.registry import Registry
from shared.store import LocalStore

TINY_PRESETS = {
    "default": "tiny",
    "presets": {
        "tiny": {
            "checkpoint_every": 2,
            "progress_every": 1,
            "stages": [
                {"stage": "coarse", "steps": 4, "config": {"resolution": 16, "batchSize": 2, "samplesPerRay": 16,
                                                            "priors": [{"prior": "analytic"}]}},
                {"stage": "fine", "steps": 2, "config": {"resolution": 32, "batchSize": 2, "priors": [{"prior": "analytic"}],
                                                          "dmtet": {"gridCells": 16}}},
            ],
            "export": {"texture_size": 64},
        },
        "long": {  # one chunk of many steps: only a per-step check stops it early
            "checkpoint_every": 1000,
            "progress_every": 1,
            "stages": [
                {"stage": "coarse", "steps": 400, "config": {"resolution": 16, "batchSize": 2, "samplesPerRay": 16,
                                                              "priors": [{"prior": "analytic"}]}},
            ],
            "export": {"texture_size": 64},
        },
        "slow": {  # long enough to be interrupted
            "checkpoint_every": 3,
            "progress_every": 1,
            "stages": [
                {"stage": "coarse", "steps": 30, "config": {"resolution": 16, "batchSize": 2, "samplesPerRay": 16,
                                                             "priors": [{"prior": "analytic"}]}},
                {"stage": "fine", "steps": 2, "config": {"resolution": 32, "batchSize": 2, "priors": [{"prior": "analytic"}],
                                                          "dmtet": {"gridCells": 16}}},
            ],
            "export": {"texture_size": 64},
        },
    },
}
TINY_COARSE = {
    "prompt": "unset",
    "field": {"encoding": {"n_levels": 4, "log2_hashmap_size": 12, "base_resolution": 8, "per_level_scale": 1.5},
              "backend": "torch", "hidden_width": 16},
    "occupancy": {"resolution": 8, "step_size": 0.125, "update_every": 2, "warmup_steps": 2},
}
TINY_FINE = {"prompt": "unset", "dmtet": {"level_candidates": 6, "level_views": 2, "level_view_resolution": 32}}


@pytest.fixture(scope="module")
def guidance():
    config = GuidanceConfig(
        priors=[PriorSpec(name="analytic", kind=PriorKind.ANALYTIC, resolution=16)], port=0, batching={"wait_s": 0}
    )
    running = standalone.start(config)
    registry = Registry.model_validate({"priors": {"analytic": {"kind": "standalone", "address": running.address}}})
    yield registry
    running.stop(grace=None)


class Stack:
    """Scene replicas and an orchestrator over one store and database; the orchestrator can be restarted."""

    def __init__(self, registry: Registry, root: Path, replicas: int = 1, presets: dict | None = None) -> None:
        self.registry = registry
        self.root = root
        (root / "presets.yaml").write_text(yaml.safe_dump(presets or TINY_PRESETS))
        self.clients = [GuidanceClient(registry) for _ in range(replicas + 1)]
        self.scenes = [
            scene_server.start(
                scene_server.SceneServiceConfig(port=0, device="cpu", store_uri=str(root / "store"),
                                                coarse_defaults=TINY_COARSE, fine_defaults=TINY_FINE),
                guidance=client,
            )
            for client in self.clients[1:]
        ]
        self.orchestrator = None
        self.start_orchestrator()

    def start_orchestrator(self, **settings) -> None:
        config = orchestrator_server.OrchestratorConfig(
            port=0, database_path=self.root / "jobs.db", store_uri=str(self.root / "store"),
            scene_replicas=[scene.address for scene in self.scenes], presets_path=self.root / "presets.yaml",
            queue_size=3, metrics_port=0, **settings,
        )
        self.orchestrator = orchestrator_server.start(config, priors=self.clients[0])
        self.channel = insecure_channel(self.orchestrator.address)
        self.stub = orchestrator_pb2_grpc.OrchestratorServiceStub(self.channel)

    def stop_orchestrator(self) -> None:
        self.channel.close()
        self.orchestrator.stop(grace=None)

    def close(self) -> None:
        self.stop_orchestrator()
        for scene in self.scenes:
            scene.stop(grace=None)
        for client in self.clients:
            client.close()


@pytest.fixture(scope="module")
def stack(guidance, tmp_path_factory):
    stack = Stack(guidance, tmp_path_factory.mktemp("orchestrator"))
    yield stack
    stack.close()


def text_spec(prompt: str = "a red torus", preset: str = "tiny", seed: int = 1, **steps) -> orchestrator_pb2.JobSpec:
    spec = orchestrator_pb2.JobSpec(preset=preset, seed=seed)
    spec.text.prompt = prompt
    for stage, count in steps.items():
        override = spec.overrides.add(steps=count)
        override.config.stage = {"coarse": scene_pb2.STAGE_COARSE, "fine": scene_pb2.STAGE_FINE}[stage]
    return spec


def wait_for(stub, name: str, states, timeout_s: float = 120.0) -> orchestrator_pb2.Job:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = stub.GetJob(orchestrator_pb2.GetJobRequest(name=name), timeout=10).job
        if job.state in states:
            return job
        time.sleep(0.1)
    raise AssertionError(f"{name} did not reach {states}; it is {job.state} at {job.stage}/{job.step}: {job.error}")


FINISHED = (orchestrator_pb2.JOB_STATE_SUCCEEDED, orchestrator_pb2.JOB_STATE_FAILED, orchestrator_pb2.JOB_STATE_CANCELLED)


def test_generate_streams_the_job_to_a_textured_glb(stack):
    request = orchestrator_pb2.GenerateRequest(spec=text_spec(), request_id="e2e-1")
    events = [r.event for r in stack.stub.Generate(request, timeout=180)]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "done", kinds
    started = [e.stage_started.stage for e in events if e.WhichOneof("event") == "stage_started"]
    assert started == [scene_pb2.STAGE_COARSE, scene_pb2.STAGE_FINE]
    progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
    assert any(p.preview_uri for p in progress) and any("sds" in p.losses for p in progress)
    assert len({e.job_name for e in events}) == 1
    artifacts = {a.kind: a.uri for a in events[-1].done.artifacts}
    assert {"model.glb", "model.obj", "texture.png", "preview.png", "coarse.ckpt", "fine.ckpt", "provenance.json"} <= set(artifacts)
    store = LocalStore(stack.root / "store")
    glb = store.get(store.key_from_uri(artifacts["model.glb"]))
    mesh = trimesh.load(io.BytesIO(glb), file_type="glb", force="mesh")
    assert len(mesh.faces) > 0 and mesh.visual.material.baseColorTexture is not None
    provenance = yaml.safe_load(store.get(store.key_from_uri(artifacts["provenance.json"])))
    assert provenance["prompt"] == "a red torus" and provenance["preset"] == "tiny" and provenance["seed"] == 1
    assert [p["prior"] for p in provenance["priors"]] == ["analytic", "analytic"] and provenance["code_version"]
    job = stack.stub.GetJob(orchestrator_pb2.GetJobRequest(name=events[0].job_name), timeout=10).job
    assert job.state == orchestrator_pb2.JOB_STATE_SUCCEEDED and job.stage == scene_pb2.STAGE_FINE

    # The same request id again: the same job, no second one.
    again = stack.stub.SubmitJob(orchestrator_pb2.SubmitJobRequest(spec=text_spec(), request_id="e2e-1"), timeout=10)
    assert again.job.name == job.name
    names = [j.name for j in stack.stub.ListJobs(orchestrator_pb2.ListJobsRequest(page_size=100), timeout=10).jobs]
    assert names.count(job.name) == 1
    # ... unless it is a different request: refused, naming the field.
    with pytest.raises(grpc.RpcError) as caught:
        stack.stub.SubmitJob(orchestrator_pb2.SubmitJobRequest(spec=text_spec("a blue sphere"), request_id="e2e-1"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in field_violations(caught.value)

    # Prompt-based editing: the finished job's coarse model fine-tuned with a new prompt, then refined.
    edit = orchestrator_pb2.JobSpec(preset="tiny", seed=2)
    edit.edit.source_job_id = job.name
    edit.edit.prompt = "a blue sphere"
    edited = [r.event for r in stack.stub.Generate(orchestrator_pb2.GenerateRequest(spec=edit), timeout=180)]
    assert edited[-1].WhichOneof("event") == "done"

    # Metrics: jobs by state, queue depth.
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{stack.orchestrator.metrics_port}/metrics", timeout=10).read().decode()
    assert 'magic3d_jobs{state="succeeded"}' in text and "magic3d_queue_depth" in text


@pytest.mark.parametrize(
    ("mutate", "code", "field"),
    [
        (lambda s: s.text.__setattr__("prompt", "   "), grpc.StatusCode.INVALID_ARGUMENT, "spec.text.prompt"),
        (lambda s: s.__setattr__("preset", "nope"), grpc.StatusCode.INVALID_ARGUMENT, "spec.preset"),
        (lambda s: s.text.__setattr__("prompt", "a purple teapot"), grpc.StatusCode.INVALID_ARGUMENT, "spec.text.prompt"),
        (lambda s: s.text.__setattr__("prompt", "a red torus and a blue sphere"), grpc.StatusCode.INVALID_ARGUMENT,
         "spec.text.prompt"),
        (lambda s: s.overrides.add().config.CopyFrom(scene_pb2.StageConfig(stage=scene_pb2.STAGE_FINE, resolution=4)),
         grpc.StatusCode.INVALID_ARGUMENT, "spec.overrides[0].config.resolution"),
        (lambda s: s.overrides.add().config.CopyFrom(scene_pb2.StageConfig(
            stage=scene_pb2.STAGE_COARSE, priors=[scene_pb2.PriorTerm(prior="no-such-prior")])),
         grpc.StatusCode.INVALID_ARGUMENT, "coarse.priors[0].prior"),
        (lambda s: (s.ClearField("text"), s.mesh.__setattr__("mesh", b"not a mesh"), s.mesh.__setattr__("prompt", "a red torus")),
         grpc.StatusCode.INVALID_ARGUMENT, "spec.mesh.mesh"),
        (lambda s: (s.ClearField("text"), s.edit.__setattr__("source_job_id", "jobs/job-missing"), s.edit.__setattr__("prompt", "a red torus")),
         grpc.StatusCode.NOT_FOUND, "spec.edit.source_job_id"),
        # Image jobs are served now (Magic123): one without an image preset is refused naming the preset.
        (lambda s: (s.ClearField("text"), s.image.__setattr__("prompt", "a red torus")), grpc.StatusCode.INVALID_ARGUMENT, "spec.preset"),
        (lambda s: s.ClearField("text"), grpc.StatusCode.INVALID_ARGUMENT, "spec.input"),
    ],
)
def test_bad_submissions_are_refused_before_any_work(stack, mutate, code, field):
    spec = text_spec()
    mutate(spec)
    before = len(stack.stub.ListJobs(orchestrator_pb2.ListJobsRequest(page_size=1000), timeout=10).jobs)
    with pytest.raises(grpc.RpcError) as caught:
        stack.stub.SubmitJob(orchestrator_pb2.SubmitJobRequest(spec=spec), timeout=30)
    assert caught.value.code() == code, caught.value.details()
    assert field in field_violations(caught.value), (field_violations(caught.value), caught.value.details())
    assert len(stack.stub.ListJobs(orchestrator_pb2.ListJobsRequest(page_size=1000), timeout=10).jobs) == before


def test_cancel_is_idempotent_frees_the_scene_and_unknown_jobs_are_not_found(stack):
    for call in (
        lambda: stack.stub.CancelJob(orchestrator_pb2.CancelJobRequest(name="jobs/job-nope"), timeout=10),
        lambda: stack.stub.GetJob(orchestrator_pb2.GetJobRequest(name="jobs/job-nope"), timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        stack.stub.GetJob(orchestrator_pb2.GetJobRequest(name="job-without-prefix"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "name" in field_violations(caught.value)

    job = stack.stub.SubmitJob(orchestrator_pb2.SubmitJobRequest(spec=text_spec(preset="slow")), timeout=10).job
    wait_for(stack.stub, job.name, (orchestrator_pb2.JOB_STATE_RUNNING,))
    watch = stack.stub.WatchJob(orchestrator_pb2.WatchJobRequest(name=job.name), timeout=60)
    first = next(watch).event
    assert first.job_name == job.name and first.WhichOneof("event") in ("progress", "queued")
    time.sleep(0.5)
    for _ in range(2):  # idempotent
        stack.stub.CancelJob(orchestrator_pb2.CancelJobRequest(name=job.name), timeout=10)
    cancelled = wait_for(stack.stub, job.name, FINISHED, timeout_s=60)
    assert cancelled.state == orchestrator_pb2.JOB_STATE_CANCELLED
    last = [r.event for r in watch][-1]  # the watch stream ends with the job
    assert last.WhichOneof("event") == "failed" and "cancel" in last.failed.reason
    deadline = time.monotonic() + 10
    while len(stack.scenes[0].servicer.scenes) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(stack.scenes[0].servicer.scenes) == 0  # the scene's state was freed
    stack.stub.CancelJob(orchestrator_pb2.CancelJobRequest(name=job.name), timeout=10)  # still fine when finished
    stack.stub.DeleteJob(orchestrator_pb2.DeleteJobRequest(name=job.name), timeout=10)
    with pytest.raises(grpc.RpcError) as caught:
        stack.stub.GetJob(orchestrator_pb2.GetJobRequest(name=job.name), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_full_queue_is_resource_exhausted_with_a_retry_hint(stack):
    names = []
    try:
        with pytest.raises(grpc.RpcError) as caught:
            for index in range(8):  # queue_size 3, one replica slot
                names.append(stack.stub.SubmitJob(orchestrator_pb2.SubmitJobRequest(spec=text_spec(preset="slow", seed=10 + index)), timeout=10).job.name)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert 3 <= len(names) <= 5
    finally:
        for name in names:
            stack.stub.CancelJob(orchestrator_pb2.CancelJobRequest(name=name), timeout=10)
        for name in names:
            wait_for(stack.stub, name, FINISHED, timeout_s=60)


def test_jobs_survive_an_orchestrator_restart_and_resume(guidance, tmp_path):
    stack = Stack(guidance, tmp_path)
    try:
        done = stack.stub.SubmitJob(orchestrator_pb2.SubmitJobRequest(spec=text_spec(), request_id="before"), timeout=10).job
        done = wait_for(stack.stub, done.name, FINISHED)
        assert done.state == orchestrator_pb2.JOB_STATE_SUCCEEDED
        running = stack.stub.SubmitJob(orchestrator_pb2.SubmitJobRequest(spec=text_spec(preset="slow")), timeout=10).job
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # interrupt it after its first checkpoint
            job = stack.stub.GetJob(orchestrator_pb2.GetJobRequest(name=running.name), timeout=10).job
            if job.step >= 3:
                break
            time.sleep(0.05)
        stack.stop_orchestrator()
        stack.start_orchestrator()
        listed = {j.name: j for j in stack.stub.ListJobs(orchestrator_pb2.ListJobsRequest(), timeout=10).jobs}
        assert listed[done.name].state == orchestrator_pb2.JOB_STATE_SUCCEEDED
        assert {a.kind for a in listed[done.name].artifacts} >= {"model.glb", "coarse.ckpt"}
        again = stack.stub.SubmitJob(orchestrator_pb2.SubmitJobRequest(spec=text_spec(), request_id="before"), timeout=10)
        assert again.job.name == done.name  # idempotency survives the restart too
        resumed = wait_for(stack.stub, running.name, FINISHED)
        assert resumed.state == orchestrator_pb2.JOB_STATE_SUCCEEDED, resumed.error
        record = stack.orchestrator.servicer.runner.jobs.get(running.name.removeprefix("jobs/"))
        assert record.attempts == 2  # resumed, not restarted from scratch by a new job
    finally:
        stack.close()


def test_a_job_whose_scene_replica_dies_resumes_on_another(guidance, tmp_path):
    stack = Stack(guidance, tmp_path, replicas=2)
    try:
        job = stack.stub.SubmitJob(orchestrator_pb2.SubmitJobRequest(spec=text_spec(preset="slow")), timeout=10).job
        deadline = time.monotonic() + 60
        record = None
        while time.monotonic() < deadline:
            record = stack.orchestrator.servicer.runner.jobs.get(job.name.removeprefix("jobs/"))
            if record.checkpoint_uri:
                break
            time.sleep(0.05)
        first = record.scene_replica
        victim = next(s for s in stack.scenes if s.address == first)
        victim.stop(grace=None)
        finished = wait_for(stack.stub, job.name, FINISHED)
        assert finished.state == orchestrator_pb2.JOB_STATE_SUCCEEDED, finished.error
        record = stack.orchestrator.servicer.runner.jobs.get(job.name.removeprefix("jobs/"))
        assert record.scene_replica != first and record.attempts == 2
    finally:
        stack.close()


def test_presets_merge_overrides_field_by_field():
    book = PresetBook.model_validate(TINY_PRESETS)
    base = scene_pb2.StageConfig(resolution=16, loss_weights={"a": scene_pb2.Schedule(steps=[0], values=[1.0])},
                                 priors=[scene_pb2.PriorTerm(prior="x"), scene_pb2.PriorTerm(prior="y")])
    merged = merge_stage_config(base, scene_pb2.StageConfig(
        batch_size=3, loss_weights={"b": scene_pb2.Schedule(steps=[0], values=[2.0])}, priors=[scene_pb2.PriorTerm(prior="z")]
    ))
    assert merged.resolution == 16 and merged.batch_size == 3
    assert set(merged.loss_weights) == {"a", "b"} and [p.prior for p in merged.priors] == ["z"]
    plan = plan_job(book, "", text_spec(coarse=7).overrides, "a red torus", "", 5)
    assert plan.preset == "tiny" and [s.steps for s in plan.stages] == [7, 2] and plan.total_steps == 9
    assert all(s.config.prompt == "a red torus" and s.config.seed == 5 for s in plan.stages)
    with pytest.raises(InvalidArgument) as raised:
        plan_job(book, "tiny", text_spec(fine=-1).overrides, "p", "", 0)
    assert raised.value.field == "spec.overrides[0].steps"
    for name in ("magic3d", "fast", "cpu-demo"):  # the shipped presets validate
        shipped = PresetBook.load(Path(__file__).resolve().parent.parent / "deploy/config/presets.yaml")
        assert plan_job(shipped, name, [], "a red torus", "", 0).total_steps > 0


def test_mesh_input_refines_an_uploaded_mesh(stack):
    mesh = torus(0.32, 0.12, segments=24, minor_segments=12)
    exported = trimesh.Trimesh(mesh.vertices.numpy(), mesh.faces.numpy()).export(file_type="glb")
    spec = orchestrator_pb2.JobSpec(preset="tiny", seed=3)
    spec.mesh.mesh = exported
    spec.mesh.format = "glb"
    spec.mesh.prompt = "a red torus"
    events = [r.event for r in stack.stub.Generate(orchestrator_pb2.GenerateRequest(spec=spec), timeout=180)]
    assert events[-1].WhichOneof("event") == "done", events[-1]
    started = [e.stage_started.stage for e in events if e.WhichOneof("event") == "stage_started"]
    assert started == [scene_pb2.STAGE_FINE]


def test_jobs_command_lists_gets_and_cancels(stack, capsys):
    from services.cli import main

    job = stack.stub.SubmitJob(orchestrator_pb2.SubmitJobRequest(spec=text_spec(), request_id="cli-1"), timeout=10).job
    wait_for(stack.stub, job.name, FINISHED)
    address = stack.orchestrator.address
    assert main(["jobs", "list", "--address", address]) == 0
    assert job.name in capsys.readouterr().out
    assert main(["jobs", "get", job.name, "--address", address]) == 0
    out = capsys.readouterr().out
    assert "succeeded" in out and "model.glb" in out
    assert main(["jobs", "cancel", "jobs/job-unknown", "--address", address]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err


def test_a_job_cancelled_while_being_dispatched_gives_its_slot_back(tmp_path):
    from services.orchestrator.jobs import JobState, JobStore
    from services.orchestrator.runner import JobRunner
    from services.orchestrator.scenes import SceneReplicas

    replicas = SceneReplicas(["127.0.0.1:1"], slots_per_replica=1)
    runner = JobRunner(JobStore(":memory:"), LocalStore(tmp_path), replicas, PresetBook.model_validate(TINY_PRESETS), None)
    record, _ = runner.submit(text_spec())
    stale = runner.jobs.unfinished()  # the dispatcher's listing, taken just before the client cancels
    runner.cancel(record.job_id)
    runner.jobs.unfinished = lambda: stale
    runner._dispatch_once()
    assert runner.jobs.get(record.job_id).state == JobState.CANCELLED
    assert replicas.in_use() == 0 and not runner._running


def test_deadlines_are_checked_at_submit_and_while_running(stack):
    past = text_spec()
    past.deadline.FromSeconds(int(time.time()) - 60)
    with pytest.raises(grpc.RpcError) as caught:
        stack.stub.SubmitJob(orchestrator_pb2.SubmitJobRequest(spec=past), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "spec.deadline" in field_violations(caught.value)
    soon = text_spec(preset="slow", seed=40)
    soon.deadline.FromNanoseconds(int((time.time() + 0.5) * 1e9))  # the job needs several seconds
    job = stack.stub.SubmitJob(orchestrator_pb2.SubmitJobRequest(spec=soon), timeout=10).job
    failed = wait_for(stack.stub, job.name, FINISHED, timeout_s=60)
    assert failed.state == orchestrator_pb2.JOB_STATE_FAILED and "DEADLINE_EXCEEDED" in failed.error


def test_a_restarted_orchestrator_deletes_the_scenes_it_left_and_only_those(guidance, tmp_path):
    stack = Stack(guidance, tmp_path)
    try:
        runner = stack.orchestrator.servicer.runner
        owner = runner.settings.instance_id
        scene_stub = scene_pb2_grpc.SceneServiceStub(insecure_channel(stack.scenes[0].address))
        config = scene_pb2.StageConfig(prompt="a red torus", resolution=16, batch_size=2, samples_per_ray=16)
        # What a crashed earlier process of this orchestrator left behind, and a scene of another orchestrator.
        for job_id, scene_owner in (("job-ghost-1", owner), ("job-ghost-2", owner), ("job-other", "someone-else")):
            scene_stub.CreateScene(scene_pb2.CreateSceneRequest(job_id=job_id, config=config, owner=scene_owner), timeout=30)
        assert len(stack.scenes[0].servicer.scenes) == 3
        stack.stop_orchestrator()
        stack.start_orchestrator()
        left = scene_stub.ListScenes(scene_pb2.ListScenesRequest(), timeout=10).scenes
        assert [(s.job_id, s.owner) for s in left] == [("job-other", "someone-else")]
        # Jobs still run, and their scenes carry this orchestrator as owner while they do.
        job = stack.stub.SubmitJob(orchestrator_pb2.SubmitJobRequest(spec=text_spec(preset="slow")), timeout=10).job
        wait_for(stack.stub, job.name, (orchestrator_pb2.JOB_STATE_RUNNING,))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            owners = {s.owner for s in scene_stub.ListScenes(scene_pb2.ListScenesRequest(), timeout=10).scenes}
            if owner in owners:
                break
            time.sleep(0.05)
        assert owner in owners
        assert wait_for(stack.stub, job.name, FINISHED).state == orchestrator_pb2.JOB_STATE_SUCCEEDED
    finally:
        stack.close()


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_readable_one(guidance, tmp_path):
    stack = Stack(guidance, tmp_path)
    try:
        stack.stop_orchestrator()
        stack.start_orchestrator(keep_checkpoints=2)
        runner = stack.orchestrator.servicer.runner
        job = stack.stub.SubmitJob(orchestrator_pb2.SubmitJobRequest(spec=text_spec(preset="slow")), timeout=10).job
        job_id = job.name.removeprefix("jobs/")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(runner.jobs.get(job_id).checkpoints) < 2:
            time.sleep(0.02)
        stack.stop_orchestrator()  # pauses the job; it stays RUNNING with its checkpoints
        record = JobStore(tmp_path / "jobs.db").get(job_id)
        refs = record.stage_checkpoints("coarse")
        assert 2 <= len(refs) <= 3
        store = LocalStore(tmp_path / "store")
        newest, older = refs[0], refs[1]
        path = tmp_path / "store" / store.key_from_uri(newest.uri)
        path.write_bytes(path.read_bytes()[:100])  # truncated
        if len(refs) > 2:  # a flipped bit in the next one is caught by its digest too
            flipped = bytearray((tmp_path / "store" / store.key_from_uri(older.uri)).read_bytes())
            flipped[len(flipped) // 2] ^= 1
            (tmp_path / "store" / store.key_from_uri(older.uri)).write_bytes(bytes(flipped))
            older = refs[2]
        stack.start_orchestrator(keep_checkpoints=2)
        finished = wait_for(stack.stub, job.name, FINISHED)
        assert finished.state == orchestrator_pb2.JOB_STATE_SUCCEEDED, finished.error
        record = stack.orchestrator.servicer.runner.jobs.get(job_id)
        coarse = record.stage_checkpoints("coarse")
        assert newest not in coarse  # dropped from the record (and the resume started from an older one)
        # Retention: the newest 2 of each stage plus the stage's final one, in the record and in the store.
        assert sum(c.final for c in coarse) == 1 and len(coarse) <= 3
        kept = sorted(k for k in store.list(f"jobs/{job_id}/coarse") if k.endswith(".ckpt"))
        assert kept == sorted(store.key_from_uri(c.uri) for c in coarse)
    finally:
        stack.close()


def test_a_job_past_its_deadline_stops_within_a_step_not_at_its_next_checkpoint(stack):
    spec = text_spec(preset="long", seed=41)
    deadline = time.time() + 2.0
    spec.deadline.FromNanoseconds(int(deadline * 1e9))
    job = stack.stub.SubmitJob(orchestrator_pb2.SubmitJobRequest(spec=spec), timeout=10).job
    failed = wait_for(stack.stub, job.name, FINISHED, timeout_s=60)
    assert failed.state == orchestrator_pb2.JOB_STATE_FAILED and "DEADLINE_EXCEEDED" in failed.error
    assert 0 < failed.step < 400  # stopped mid-chunk (the chunk is the whole stage)
    assert failed.update_time.ToNanoseconds() / 1e9 - deadline < 1.5


def test_guidance_down_past_the_outage_window_fails_the_job_saying_so_and_spares_the_replica(tmp_path):
    config = GuidanceConfig(
        priors=[PriorSpec(name="analytic", kind=PriorKind.ANALYTIC, resolution=16)], port=0, batching={"wait_s": 0}
    )
    guidance_server = standalone.start(config)
    registry = Registry.model_validate({
        "client": {"timeout_s": 10, "outage_window_s": 1.0, "initial_backoff_s": 0.05, "max_backoff_s": 0.2},
        "priors": {"analytic": {"kind": "standalone", "address": guidance_server.address}},
    })
    stack = Stack(registry, tmp_path)
    try:
        job = stack.stub.SubmitJob(orchestrator_pb2.SubmitJobRequest(spec=text_spec(preset="slow")), timeout=10).job
        wait_for(stack.stub, job.name, (orchestrator_pb2.JOB_STATE_RUNNING,))
        guidance_server.stop(grace=None)
        failed = wait_for(stack.stub, job.name, FINISHED, timeout_s=60)
        assert failed.state == orchestrator_pb2.JOB_STATE_FAILED
        assert "guidance tier was down" in failed.error and "unreachable for 1 s" in failed.error, failed.error
        runner = stack.orchestrator.servicer.runner
        assert runner.jobs.get(job.name.removeprefix("jobs/")).attempts == 1
        replica = runner.replicas.acquire()  # not set aside: it was not the replica's fault
        assert replica == stack.scenes[0].address
        runner.replicas.release(replica)
    finally:
        stack.close()
        guidance_server.stop(grace=None)
