"""One-step-stale pipelined SDS (`pipelined_guidance`, services/scene/pipeline.py).

The invariant, with theta_n the parameters after n updates: step n is rendered from theta_{n-1} when the previous
call prefetched it, from theta_n when it starts the pipeline (first step of a run, after a resume or a discarded
step); its guidance request carries that render's images; and nothing is in flight after a call without prefetch.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch
from magic3d.v1 import scene_pb2, scene_pb2_grpc
from torch import nn

from services.scene import checkpoint
from services.scene import server as scene_server
from services.scene.coarse import CoarseStage
from services.scene.fine import FineStage
from services.scene.pipeline import ParameterShadows
from services.scene.server import SceneServiceConfig
from services.scene.stage import Stage
from services.scene.steps import step_seed
from shared.errors import Unavailable
from shared.grpcio import insecure_channel

from scenes import analytic_guidance
from test_coarse_stage import tiny_config
from test_fine_stage import TINY_FINE, tiny_coarse
from test_scene_service import TINY_DEFAULTS


class RecordingGuidance:
    """Passes requests to the analytic prior, recording each one's seed and images; the `fail_at`-th request (0-based
    over the guidance's life) raises Unavailable instead."""

    def __init__(self, inner, fail_at: int | None = None) -> None:
        self.inner = inner
        self.fail_at = fail_at
        self.seeds: list[int] = []
        self.images: list[torch.Tensor] = []

    def compute_sds(self, request, timeout_s=None):
        index = len(self.seeds)
        self.seeds.append(request.seed)
        self.images.append(request.images.clone())
        if index == self.fail_at:
            raise Unavailable("guidance replica went away", "guidance")
        return self.inner.compute_sds(request, timeout_s)

    def prior_info(self, name, timeout_s=None):
        return self.inner.prior_info(name, timeout_s)


@pytest.fixture(scope="module")
def analytic16():
    guidance = analytic_guidance(16)
    yield guidance
    guidance.close()


@pytest.fixture(scope="module")
def analytic32():
    guidance = analytic_guidance(32)
    yield guidance
    guidance.close()


def trained(stage: Stage) -> list[nn.Parameter]:
    return [p for group in stage.optimizer.param_groups for p in group["params"]]


def visible(stage: Stage) -> list[torch.Tensor]:
    """The trainable tensors the stage's modules hold right now (shadows during a pipelined render)."""
    modules = stage._state_modules().values()
    return [p for module in modules for p in module.parameters()]


class Recorder:
    """Wraps a stage's `_render` and `_after_update`: what each render saw (values, whether they were the masters),
    its cameras and images, and theta_n after every update n (`thetas[n - start]`, from the step it was made at)."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.start = stage.step_count
        self.thetas = [self.snapshot()]  # theta_{start}
        self.seen: list[list[torch.Tensor]] = []
        self.saw_masters: list[bool] = []
        self.cameras: list[torch.Tensor] = []
        self.images: list[torch.Tensor] = []
        render, after_update = stage._render, stage._after_update

        def recording_render(cameras, timer, generator):
            tensors = visible(stage)
            self.seen.append([t.detach().clone() for t in tensors])
            masters = {id(p) for p in trained(stage)}
            self.saw_masters.append(any(id(t) in masters for t in tensors))
            self.cameras.append(torch.stack([c.camera_to_world for c in cameras]))
            out = render(cameras, timer, generator)
            self.images.append(out["rgb"].detach().clone())
            return out

        def recording_after_update(completed):
            after_update(completed)
            self.thetas.append(self.snapshot())
            assert len(self.thetas) == completed + 1 - self.start

        stage._render = recording_render  # type: ignore[method-assign]
        stage._after_update = recording_after_update  # type: ignore[method-assign]

    def snapshot(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in visible(self.stage)]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def coarse_stage(guidance, **overrides) -> CoarseStage:
    return CoarseStage(tiny_config(pipelined_guidance=True, **overrides), guidance, "pipe")


def fine_stage(guidance) -> FineStage:
    config = TINY_FINE.model_copy(update={"pipelined_guidance": True})
    return FineStage.from_coarse(tiny_coarse(), config, guidance, "pipe")[0]


# -- the shadows on their own ----------------------------------------------------------------------------------------

def test_a_graph_on_shadows_survives_in_place_updates_and_its_gradient_reaches_the_masters():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    shadows = ParameterShadows([model], model.parameters())
    x = torch.randn(5, 3)
    before = [p.detach().clone() for p in model.parameters()]
    index = shadows.acquire()
    with shadows.swapped_in(index):
        stale = model(x).square().sum()
    with torch.no_grad():  # what an optimiser step does before the stale graph's backward
        for p in model.parameters():
            p.add_(1.0)
    stale.backward()  # no "modified by an inplace operation": the graph holds the shadows
    shadows.move_grads(index)
    shadows.release(index)
    reference = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    with torch.no_grad():
        for p, value in zip(reference.parameters(), before):
            p.copy_(value)
    reference(x).square().sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad)  # the gradient at the values the graph was built from
    optimizer.step()
    assert shadows.held == 0 and all(p is q for p, q in zip(model.parameters(), optimizer.param_groups[0]["params"]))
    with pytest.raises(ValueError, match="belong to none"):
        ParameterShadows([model], [nn.Parameter(torch.zeros(2))])


# -- staleness -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["coarse", "fine"])
def test_each_step_is_rendered_from_the_parameters_one_update_back(kind, analytic16, analytic32):
    guidance = RecordingGuidance(analytic16 if kind == "coarse" else analytic32)
    stage = coarse_stage(guidance) if kind == "coarse" else fine_stage(guidance)
    recorder = Recorder(stage)
    steps = 5
    for n in range(steps):
        report = stage.step(prefetch=n + 1 < steps)
        assert report.step == n + 1 and not report.skipped
        assert same(visible(stage), recorder.thetas[-1])  # the masters are back in the modules
        assert stage.step_in_flight == (n + 1 < steps) and stage._shadows.held == int(stage.step_in_flight)
    assert not stage.step_in_flight
    assert len(recorder.seen) == steps and not any(recorder.saw_masters)  # every render read shadows
    assert same(recorder.seen[0], recorder.thetas[0])  # step 0 starts the pipeline: fresh
    for n in range(1, steps):
        assert same(recorder.seen[n], recorder.thetas[n - 1]), f"step {n} was not rendered from theta_{n - 1}"
        assert not same(recorder.seen[n], recorder.thetas[n])  # (the parameters do move each step)
    # Request n carries render n's images, with step n's seed.
    assert guidance.seeds == [step_seed(stage.config.seed, n, 0) for n in range(steps)]
    transfer = guidance.images[0].dtype
    for sent, rendered in zip(guidance.images, recorder.images, strict=True):
        assert torch.equal(sent, rendered.to(transfer))


def test_without_prefetch_every_step_is_fresh(analytic16):
    stage = coarse_stage(analytic16)
    recorder = Recorder(stage)
    for _ in range(3):
        stage.step()
        assert not stage.step_in_flight
    for n in range(3):
        assert same(recorder.seen[n], recorder.thetas[n])


# -- the flag off ----------------------------------------------------------------------------------------------------

def test_flag_off_ignores_prefetch_and_keeps_the_sequential_step(analytic16):
    plain = CoarseStage(tiny_config(), analytic16, "seq")
    asked = CoarseStage(tiny_config(), analytic16, "seq")
    for _ in range(3):
        a, b = plain.step(), asked.step(prefetch=True)
        assert a.losses == b.losses and not asked.step_in_flight
    assert same(visible(plain), visible(asked))
    assert torch.equal(plain.generator.get_state(), asked.generator.get_state())
    assert asked._shadows is None and asked._worker is None  # none of the pipeline's machinery was built


# -- failures, discards, checkpoints --------------------------------------------------------------------------------

def test_a_failed_pending_guidance_drops_the_step_and_a_retry_draws_the_same_cameras(analytic16):
    straight_guidance = RecordingGuidance(analytic16)
    straight = coarse_stage(straight_guidance)
    straight_record = Recorder(straight)
    for n in range(4):
        straight.step(prefetch=n + 1 < 4)

    # Request 2 is step 2's guidance, submitted in call 1 and waited for in call 2 (which has prefetched step 3).
    flaky_guidance = RecordingGuidance(analytic16, fail_at=2)
    flaky = coarse_stage(flaky_guidance)
    flaky_record = Recorder(flaky)
    flaky.step(prefetch=True)
    flaky.step(prefetch=True)
    generator_before = flaky.generator.get_state()
    theta_2 = flaky_record.snapshot()
    with pytest.raises(Unavailable):
        flaky.step(prefetch=True)
    assert flaky.step_count == 2 and not flaky.step_in_flight and not flaky._shadows.held
    assert torch.equal(flaky.generator.get_state(), generator_before)  # nothing of the dropped steps stays drawn
    assert same(flaky_record.snapshot(), theta_2)
    flaky.state_dict()  # nothing in flight: a checkpoint may be taken
    flaky.step(prefetch=True)  # the retry of step 2 restarts the pipeline
    flaky.step(prefetch=False)
    assert flaky.step_count == 4 and not flaky.step_in_flight
    # Renders: steps 0, 1, 2, 3 (dropped), then 2 and 3 again: the same cameras as the uninterrupted run.
    assert len(flaky_record.cameras) == 6
    for index, step in enumerate([0, 1, 2, 3, 2, 3]):
        assert torch.equal(flaky_record.cameras[index], straight_record.cameras[step]), (index, step)
    assert same(flaky_record.seen[4], theta_2)  # the retry renders from the current parameters, not stale ones
    assert flaky_guidance.seeds[3:] == [step_seed(flaky.config.seed, n, 0) for n in (2, 3)]
    assert straight_guidance.seeds == [step_seed(straight.config.seed, n, 0) for n in range(4)]


def test_discard_pending_and_checkpoints_hold_whole_steps_only(analytic16):
    stage = coarse_stage(analytic16)
    stage.step(prefetch=True)
    assert stage.step_in_flight
    with pytest.raises(RuntimeError, match="discard_pending"):
        stage.state_dict()
    generator = stage.generator.get_state()
    stage.discard_pending()
    assert not stage.step_in_flight and not stage._shadows.held and stage.step_count == 1
    assert torch.equal(stage.generator.get_state(), generator)
    stage.discard_pending()  # nothing in flight: nothing to do


def test_a_checkpoint_between_chunks_resumes_as_the_run_continues(analytic16):
    """Chunks of 3 then 2 steps, the last of each without prefetch: a resumed copy continues bit for bit."""
    stage = coarse_stage(analytic16)
    for n in range(3):
        stage.step(prefetch=n + 1 < 3)
    data = checkpoint.dumps(stage.to_checkpoint())
    resumed = CoarseStage.from_checkpoint(checkpoint.loads(data), analytic16, "pipe")
    assert resumed.config.pipelined_guidance and resumed.step_count == 3
    recorders = [Recorder(stage), Recorder(resumed)]
    for n in range(2):
        a, b = stage.step(prefetch=n + 1 < 2), resumed.step(prefetch=n + 1 < 2)
        assert a.losses == b.losses
    assert torch.equal(recorders[0].cameras[0], recorders[1].cameras[0])
    for x, y in zip(stage.state_dict()["field"].values(), resumed.state_dict()["field"].values()):
        assert torch.equal(x, y)
    assert torch.equal(stage.state_dict()["occupancy"]["values"], resumed.state_dict()["occupancy"]["values"])


def test_nonfinite_pending_steps_are_skipped_and_draw_indices_move_on(analytic16, monkeypatch):
    stage = coarse_stage(analytic16)
    recorder = Recorder(stage)
    regularisers = stage._regularisers
    poisoned = {1}  # the second render (step 1, prefetched in call 0) gets a NaN loss

    def maybe_nan(out, step):
        terms = regularisers(out, step)
        if len(recorder.seen) - 1 in poisoned:
            terms["sparsity"] = terms["sparsity"] * float("nan")
        return terms

    monkeypatch.setattr(stage, "_regularisers", maybe_nan)
    reports = [stage.step(prefetch=n + 1 < 3) for n in range(3)]
    assert [r.skipped for r in reports] == [False, True, False]
    assert stage.step_count == 2 and stage.counters.skipped_total == 1 and not stage.step_in_flight
    stage.step()  # a fresh pipeline: its draw index counts the skipped step (2 applied + 1 skipped)
    # Four renders, four different camera draws: a skipped step's draw is not reused.
    assert len({tuple(c.flatten().tolist()) for c in recorder.cameras}) == 4


# -- the scene server ------------------------------------------------------------------------------------------------

@pytest.fixture
def pipelined_server(tmp_path, analytic16):
    defaults = TINY_DEFAULTS | {"pipelined_guidance": True}
    config = SceneServiceConfig(port=0, device="cpu", store_uri=str(tmp_path), coarse_defaults=defaults)
    slow = SlowGuidance(analytic16)
    running = scene_server.start(config, guidance=slow)
    channel = insecure_channel(running.address)
    yield running, scene_pb2_grpc.SceneServiceStub(channel), slow
    channel.close()
    running.stop(grace=None)


class SlowGuidance:
    """The analytic prior, each call taking at least `delay_s` (so that a cancel lands while one is in flight)."""

    def __init__(self, inner, delay_s: float = 0.0) -> None:
        self.inner, self.delay_s = inner, delay_s

    def compute_sds(self, request, timeout_s=None):
        time.sleep(self.delay_s)
        return self.inner.compute_sds(request, timeout_s)

    def prior_info(self, name, timeout_s=None):
        return self.inner.prior_info(name, timeout_s)


def test_run_steps_pipelined_reports_every_step_and_leaves_nothing_in_flight(pipelined_server):
    running, stub, _ = pipelined_server
    created = stub.CreateScene(scene_pb2.CreateSceneRequest(
        job_id="job-pipe", config=scene_pb2.StageConfig(prompt="a red torus")), timeout=30)
    updates = list(stub.RunSteps(scene_pb2.RunStepsRequest(scene_id=created.scene_id, num_steps=4, progress_every=1),
                                 timeout=60))
    assert [u.step for u in updates] == [1, 2, 3, 4]
    entry = running.servicer.scenes.get(created.scene_id)
    assert entry.stage.config.pipelined_guidance and entry.stage.step_count == 4 and not entry.stage.step_in_flight
    saved = stub.SaveCheckpoint(scene_pb2.SaveCheckpointRequest(scene_id=created.scene_id), timeout=30)
    assert saved.step == 4
    more = list(stub.RunSteps(scene_pb2.RunStepsRequest(scene_id=created.scene_id, num_steps=2), timeout=60))
    assert [u.step for u in more] == [5, 6] and not entry.stage.step_in_flight


def test_a_cancelled_pipelined_run_leaves_nothing_in_flight(pipelined_server):
    running, stub, slow = pipelined_server
    slow.delay_s = 0.2
    created = stub.CreateScene(scene_pb2.CreateSceneRequest(
        job_id="job-cancel", config=scene_pb2.StageConfig(prompt="a red torus")), timeout=30)
    call = stub.RunSteps(scene_pb2.RunStepsRequest(scene_id=created.scene_id, num_steps=1000, progress_every=1),
                         timeout=60)
    first = next(call)
    assert first.step == 1
    entry = running.servicer.scenes.get(created.scene_id)
    assert entry.stage.step_in_flight  # the next step was prefetched and its guidance submitted
    call.cancel()
    deadline = time.monotonic() + 10
    while entry.lock.locked() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not entry.lock.locked() and not entry.stage.step_in_flight
    assert 1 <= entry.stage.step_count < 1000
    with pytest.raises(grpc.RpcError):
        next(call)
    assert threading.active_count() < 50  # (no runaway worker threads)


def test_a_stage_config_message_turns_pipelining_on_or_off_and_unset_keeps_the_default():
    from services.orchestrator.presets import PresetBook
    from services.scene.config import CoarseConfig, FineConfig
    from services.scene.messages import coarse_config_from_proto, fine_config_from_proto

    on_by_default = CoarseConfig(prompt="x", pipelined_guidance=True)
    assert coarse_config_from_proto(scene_pb2.StageConfig(), on_by_default).pipelined_guidance
    assert not coarse_config_from_proto(scene_pb2.StageConfig(pipelined_guidance=False), on_by_default).pipelined_guidance
    fine = scene_pb2.StageConfig(stage=scene_pb2.STAGE_FINE, pipelined_guidance=True)
    assert fine_config_from_proto(fine, FineConfig(prompt="x")).pipelined_guidance
    # The paper's schedule runs pipelined in both stages (BENCHMARKS.md, "Pipelined SDS on the GPU").
    magic3d = PresetBook.load("deploy/config/presets.yaml").get("magic3d")
    assert [stage.stage_config().pipelined_guidance for stage in magic3d.stages] == [True, True]
