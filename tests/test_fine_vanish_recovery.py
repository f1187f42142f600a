"""The fine stage's recovery from a vanished mesh (services/scene/fine.py): an update that empties the mesh, or a
render that finds no faces, restores the last healthy geometry (SDF, offsets and their Adam state, kept in memory
every `dmtet.recovery_snapshot_every` steps) and halves the geometry's learning rates (the render's step is retried
with the same cameras), up to `dmtet.vanish_recoveries` times a job; then the job fails as before, saying how many
recoveries were tried.

A vanish is forced by setting every SDF value negative (outside): between steps (`vanish`), or by an update, right
after the optimiser's step (`vanish_at_update`)."""

from __future__ import annotations

import pytest
import torch
from magic3d.v1 import scene_pb2
from pydantic import ValidationError

from services.scene import checkpoint
from services.scene import fine as fine_module
from services.scene.config import DMTetConfig
from services.scene.fine import GEOMETRY_GROUPS, FineStage
from services.scene.messages import fine_config_from_proto
from shared.errors import FailedPrecondition

from scenes import analytic_guidance
from test_fine_stage import TINY_FINE, tiny_coarse
from test_pipelined_steps import RecordingGuidance


@pytest.fixture(scope="module")
def analytic32():
    guidance = analytic_guidance(32)
    yield guidance
    guidance.close()


def fine_stage(guidance, every: int = 2, recoveries: int = 2, pipelined: bool = False) -> FineStage:
    dmtet = TINY_FINE.dmtet.model_copy(update={"recovery_snapshot_every": every, "vanish_recoveries": recoveries})
    config = TINY_FINE.model_copy(update={"dmtet": dmtet, "pipelined_guidance": pipelined})
    return FineStage.from_coarse(tiny_coarse(), config, guidance, "vanish")[0]


def vanish(stage: FineStage) -> None:
    """Every grid vertex outside: marching tetrahedra find no sign change, the next render no faces."""
    with torch.no_grad():
        stage.geometry.sdf.fill_(-1.0)


def vanish_at_update(stage: FineStage, update: int) -> None:
    """The optimiser's `update`-th step from now (1-based) empties the mesh, as a too large SDF step would."""
    updates = 0

    def empty_after_step(optimizer, args, kwargs) -> None:
        nonlocal updates
        updates += 1
        if updates == update:
            vanish(stage)

    stage.optimizer.register_step_post_hook(empty_after_step)


def run_steps(stage: FineStage, count: int) -> None:
    """A RunSteps call's steps (services/scene/server.py): pipelined, each but the last prefetches the next."""
    for index in range(count):
        stage.step(prefetch=index + 1 < count)


class RenderLog:
    """What each training render of `stage` saw: its cameras and the SDF values (shadow copies when pipelined)."""

    def __init__(self, stage: FineStage) -> None:
        self.cameras: list[torch.Tensor] = []
        self.sdf: list[torch.Tensor] = []
        render = stage._render

        def recording_render(cameras, timer, generator):
            self.cameras.append(torch.stack([c.camera_to_world for c in cameras]))
            self.sdf.append(stage.geometry.sdf.detach().clone())
            return render(cameras, timer, generator)

        stage._render = recording_render  # type: ignore[method-assign]


class WarningLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def warning(self, event: str, **fields) -> None:
        self.events.append((event, fields))


@pytest.fixture
def warnings(monkeypatch) -> WarningLog:
    log = WarningLog()
    monkeypatch.setattr(fine_module, "log", log)
    return log


def learning_rates(stage: FineStage) -> dict[str, float]:
    return {group["name"]: group["lr"] for group in stage.optimizer.param_groups}


def assert_geometry_rates_halved(before: dict[str, float], after: dict[str, float], times: int = 1) -> None:
    for name, rate in before.items():
        expected = rate / 2**times if name in GEOMETRY_GROUPS else rate
        assert after[name] == pytest.approx(expected, rel=1e-12), name


def adam_steps(stage: FineStage) -> int:
    return int(stage.optimizer.state[stage.geometry.sdf]["step"])


def test_a_vanished_mesh_is_restored_from_the_snapshot_and_the_same_step_completes(analytic32, warnings):
    stage = fine_stage(analytic32, every=2)
    renders = RenderLog(stage)
    for _ in range(4):
        stage.step()
    # Snapshots were kept by the renders of steps 0 and 2 (every 2 updates), not by step 3's.
    theta_2 = renders.sdf[2]
    assert not torch.equal(theta_2, renders.sdf[3])  # (the SDF does move each step)
    before = learning_rates(stage)
    vanish(stage)
    report = stage.step()
    assert report.step == 5 and not report.skipped and stage.step_count == 5
    assert stage.mesh_recoveries == 1
    # Renders: steps 0 to 3, 4 (vanished), 4 again from the snapshot, with the same cameras.
    assert len(renders.sdf) == 6 and bool((renders.sdf[4] < 0).all())
    assert torch.equal(renders.sdf[5], theta_2)
    assert torch.equal(renders.cameras[5], renders.cameras[4])
    assert not torch.equal(renders.cameras[4], renders.cameras[3])
    assert adam_steps(stage) == 3  # the snapshot's Adam state (2 updates) and the retry's update, not 5
    assert_geometry_rates_halved(before, learning_rates(stage))
    _, faces = stage.extract_mesh()
    assert faces.shape[0] > 0
    assert [event for event, _ in warnings.events] == ["mesh_vanished_recovered"]
    fields = warnings.events[0][1]
    assert fields["step"] == 4 and fields["found_at"] == "render"
    assert fields["recoveries"] == 1 and fields["snapshot_step"] == 2
    assert fields["learning_rates"] == {name: learning_rates(stage)[name] for name in GEOMETRY_GROUPS}


@pytest.mark.parametrize("recoveries", [0, 1])
def test_a_vanish_past_the_allowed_recoveries_fails_saying_how_many_were_tried(analytic32, recoveries, warnings):
    stage = fine_stage(analytic32, every=1, recoveries=recoveries)
    stage.step()
    before = learning_rates(stage)
    for _ in range(recoveries):
        vanish(stage)
        stage.step()  # recovered
    vanish(stage)
    with pytest.raises(FailedPrecondition) as raised:
        stage.step()
    assert raised.value.field == "dmtet.vanish_recoveries"
    assert "the mesh vanished at step" in raised.value.message
    expected = "no recovery tried" if recoveries == 0 else f"recoveries tried: {recoveries}"
    assert expected in raised.value.message
    assert stage.step_count == 1 + recoveries and stage.mesh_recoveries == recoveries
    assert len(warnings.events) == recoveries
    assert_geometry_rates_halved(before, learning_rates(stage), times=recoveries)


def test_a_checkpoint_keeps_the_recoveries_used_but_not_the_snapshot(analytic32, warnings):
    stage = fine_stage(analytic32, every=1, recoveries=2)
    stage.step()
    vanish(stage)
    stage.step()
    state = stage.state_dict()
    assert set(state) == {"geometry", "color_field", "background", "optimizer", "generator", "counters",
                          "mesh_recoveries"}
    resumed = FineStage.from_checkpoint(checkpoint.loads(checkpoint.dumps(stage.to_checkpoint())), analytic32, "vanish")
    assert resumed.mesh_recoveries == 1 and learning_rates(resumed) == learning_rates(stage)
    # A geometry that vanishes before the resumed stage rendered any faces has no snapshot to go back to.
    vanish(resumed)
    with pytest.raises(FailedPrecondition, match="no healthy geometry kept since the start or resume"):
        resumed.step()
    assert resumed.step_count == 2


def test_a_pipelined_stage_drops_the_step_in_flight_and_recovers(analytic32, warnings):
    guidance = RecordingGuidance(analytic32)
    stage = fine_stage(guidance, every=2, pipelined=True)
    renders = RenderLog(stage)
    for _ in range(3):
        stage.step(prefetch=True)
    # Renders: step 0 (theta_0), 1 (theta_0), 2 (theta_1), 3 (theta_2, in flight; it kept the snapshot).
    assert stage.step_in_flight and len(renders.sdf) == 4
    theta_2 = renders.sdf[3]
    before = learning_rates(stage)
    vanish(stage)  # theta_3: the prefetch of step 4 finds no faces while step 3 is in flight
    report = stage.step(prefetch=True)
    assert report.step == 4 and not report.skipped and stage.mesh_recoveries == 1
    assert stage.step_in_flight and stage._shadows.held == 1  # only the new prefetched step holds a shadow set
    # Renders 4: step 4 (vanished); 5, 6: steps 3 and 4 again from the snapshot, with their own cameras.
    assert len(renders.sdf) == 7 and bool((renders.sdf[4] < 0).all())
    assert torch.equal(renders.sdf[5], theta_2) and torch.equal(renders.sdf[6], theta_2)
    assert torch.equal(renders.cameras[5], renders.cameras[3]) and torch.equal(renders.cameras[6], renders.cameras[4])
    # Step 3's guidance was asked again for the retried render (the dropped step's answer was not applied).
    seeds = [seed for seed in guidance.seeds]
    assert len(seeds) == 6 and seeds[4] == seeds[3] and seeds[5] != seeds[4]
    assert adam_steps(stage) == 3
    assert_geometry_rates_halved(before, learning_rates(stage))
    report = stage.step(prefetch=False)
    assert report.step == 5 and not stage.step_in_flight and not stage._shadows.held
    _, faces = stage.extract_mesh()
    assert faces.shape[0] > 0


# Sequential: renders of steps 0-3 from theta_0..theta_3; snapshots by those of steps 0 and 2 (theta_2: render 2).
# Pipelined: step 0 and 1 from theta_0, 2 from theta_1, 3 from theta_2 (it keeps the snapshot at 2: render 3).
@pytest.mark.parametrize(("pipelined", "theta_2_render"), [(False, 2), (True, 3)], ids=["sequential", "pipelined"])
def test_a_run_whose_last_update_empties_the_mesh_ends_with_the_snapshot_restored(
    analytic32, warnings, pipelined, theta_2_render
):
    stage = fine_stage(analytic32, every=2, pipelined=pipelined)
    renders = RenderLog(stage)
    before = learning_rates(stage)
    vanish_at_update(stage, 4)
    run_steps(stage, 4)
    # The run returned normally with its 4 steps done, the geometry back at theta_2, nothing in flight.
    assert stage.step_count == 4 and stage.mesh_recoveries == 1 and not stage.step_in_flight
    assert len(renders.sdf) == 4
    assert torch.equal(stage.geometry.sdf.detach(), renders.sdf[theta_2_render])
    assert adam_steps(stage) == 2
    assert_geometry_rates_halved(before, learning_rates(stage))
    assert [event for event, _ in warnings.events] == ["mesh_vanished_recovered"]
    fields = warnings.events[0][1]
    assert fields["found_at"] == "update" and fields["step"] == 4 and fields["snapshot_step"] == 2
    # What the server does next: export, checkpoint, resume elsewhere; the resumed stage renders faces.
    _, faces = stage.extract_mesh()
    assert faces.shape[0] > 0
    resumed = FineStage.from_checkpoint(checkpoint.loads(checkpoint.dumps(stage.to_checkpoint())), analytic32, "vanish")
    assert resumed.mesh_recoveries == 1 and resumed.extract_mesh()[1].shape[0] == faces.shape[0]
    report = resumed.step()
    assert report.step == 5 and resumed.mesh_recoveries == 1


def test_a_pipelined_update_that_empties_the_mesh_drops_the_step_in_flight(analytic32, warnings):
    guidance = RecordingGuidance(analytic32)
    stage = fine_stage(guidance, every=2, pipelined=True)
    renders = RenderLog(stage)
    vanish_at_update(stage, 2)
    stage.step(prefetch=True)
    report = stage.step(prefetch=True)  # renders step 2 from theta_1, then its own update empties the mesh
    assert report.step == 2 and stage.mesh_recoveries == 1
    assert not stage.step_in_flight and not stage._shadows.held  # step 2's render was of overwritten parameters
    assert torch.equal(stage.geometry.sdf.detach(), renders.sdf[0])  # the snapshot of step 0's render
    stage.step(prefetch=True)
    stage.step(prefetch=False)
    assert stage.step_count == 4 and stage.mesh_recoveries == 1
    # Renders: steps 0, 1, 2 (dropped), then 2 again from the restored geometry with the dropped one's cameras, 3.
    assert len(renders.sdf) == 5
    assert torch.equal(renders.sdf[3], renders.sdf[0]) and torch.equal(renders.cameras[3], renders.cameras[2])
    # The dropped step's guidance was asked again for its retry: its answer was never applied.
    assert len(guidance.seeds) == 5 and guidance.seeds[3] == guidance.seeds[2]
    assert adam_steps(stage) == 2  # the empty state of the snapshot at 0, then updates 3 and 4
    assert [fields["found_at"] for _, fields in warnings.events] == ["update"]
    assert stage.extract_mesh()[1].shape[0] > 0


@pytest.mark.parametrize(
    ("pipelined", "update"), [(False, 2), (True, 2), (True, 1)], ids=["sequential", "pipelined", "pipelined-in-flight"]
)
def test_an_update_that_empties_the_mesh_with_no_recovery_allowed_fails_the_run(
    analytic32, warnings, pipelined, update
):
    stage = fine_stage(analytic32, every=1, recoveries=0, pipelined=pipelined)
    vanish_at_update(stage, update)
    with pytest.raises(FailedPrecondition) as raised:
        run_steps(stage, 2)
    assert raised.value.field == "dmtet.vanish_recoveries"
    assert f"the mesh vanished at step {update - 1}: its update left the SDF" in raised.value.message
    assert "no recovery tried" in raised.value.message
    assert stage.step_count == update and stage.mesh_recoveries == 0 and not warnings.events
    assert not stage.step_in_flight and (stage._shadows is None or not stage._shadows.held)
    assert stage.extract_mesh()[1].shape[0] == 0  # the failure leaves the geometry as the update made it


def test_the_recovery_fields_are_validated_and_kept_under_a_request_that_sets_other_dmtet_fields():
    with pytest.raises(ValidationError, match="recovery_snapshot_every"):
        DMTetConfig(recovery_snapshot_every=0)
    with pytest.raises(ValidationError, match="vanish_recoveries"):
        DMTetConfig(vanish_recoveries=-1)
    defaults = TINY_FINE.model_copy(update={"dmtet": DMTetConfig(recovery_snapshot_every=7, vanish_recoveries=0)})
    message = scene_pb2.StageConfig(stage=scene_pb2.STAGE_FINE, dmtet=scene_pb2.DMTetSettings(grid_cells=24))
    config = fine_config_from_proto(message, defaults)
    assert config.dmtet.grid_cells == 24
    assert (config.dmtet.recovery_snapshot_every, config.dmtet.vanish_recoveries) == (7, 0)
