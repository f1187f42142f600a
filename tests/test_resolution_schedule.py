"""Progressive render resolution (`StageConfig.resolution_schedule`): parsed and refused at the edge, read
piecewise-constant, and the side each step's views are drawn and rendered at (plain and pipelined steps, both
stages)."""

from __future__ import annotations

import pytest
import torch
from google.protobuf import json_format
from magic3d.v1 import scene_pb2
from pydantic import ValidationError

from services.scene.coarse import CoarseStage
from services.scene.config import CoarseConfig
from services.scene.fine import FineStage
from services.scene.messages import coarse_config_from_proto, fine_config_from_proto
from shared.cameras import sample_cameras
from shared.errors import InvalidArgument
from shared.schedules import Schedule
from shared.stage_limits import SceneLimits, check_stage_config

from scenes import analytic_guidance
from test_coarse_stage import tiny_config
from test_fine_stage import TINY_FINE, tiny_coarse


class SizeRecorder:
    """Passes requests on, recording the side of each request's images."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.sides: list[int] = []

    def compute_sds(self, request, timeout_s=None):
        self.sides.append(int(request.images.shape[-1]))
        assert request.images.shape[-2] == request.images.shape[-1]
        return self.inner.compute_sds(request, timeout_s)

    def prior_info(self, name, timeout_s=None):
        return self.inner.prior_info(name, timeout_s)


@pytest.fixture(scope="module")
def analytic16():
    guidance = analytic_guidance(16)
    yield guidance
    guidance.close()


def test_held_reads_the_last_knot_at_or_before_the_step():
    schedule = Schedule((10, 20), (32.0, 48.0))
    assert [schedule.held(s) for s in (0, 9, 10, 15, 19, 20, 1000)] == [32, 32, 32, 32, 32, 48, 48]
    assert schedule(15) == 40.0  # the ordinary reading still interpolates


def test_render_resolution_follows_the_schedule_or_the_fixed_side():
    assert [tiny_config().render_resolution(s) for s in (0, 500)] == [16, 16]
    config = tiny_config(resolution_schedule=Schedule((0, 3), (16.0, 24.0)))
    assert [config.render_resolution(s) for s in range(5)] == [16, 16, 16, 24, 24]


@pytest.mark.parametrize(("steps", "values", "reason"), [
    ((0, 3), (16.0, 24.5), "whole pixel sides"),
    ((0,), (8.0,), "whole pixel sides"),
    ((0,), (-32.0,), "whole pixel sides"),
    ((-1, 3), (16.0, 24.0), "steps must be >= 0"),
])
def test_bad_schedules_are_refused_naming_the_field(steps, values, reason):
    with pytest.raises(ValidationError, match=reason) as error:
        tiny_config(resolution_schedule=Schedule(steps, values))
    assert error.value.errors()[0]["loc"] == ("resolution_schedule",)
    message = scene_pb2.StageConfig(resolution_schedule=scene_pb2.Schedule(steps=steps, values=values))
    with pytest.raises(InvalidArgument, match=reason) as refused:
        coarse_config_from_proto(message, tiny_config())
    assert refused.value.field == "config.resolution_schedule"


def test_steps_must_increase_at_the_edge():
    message = scene_pb2.StageConfig(resolution_schedule=scene_pb2.Schedule(steps=[5, 5], values=[16, 24]))
    with pytest.raises(InvalidArgument, match="increase") as refused:
        coarse_config_from_proto(message, tiny_config())
    assert refused.value.field == "config.resolution_schedule"


def test_preset_json_reaches_both_stages_and_the_limit_applies():
    coarse = json_format.ParseDict({"resolutionSchedule": {"steps": [0, 240], "values": [32, 48]}},
                                   scene_pb2.StageConfig())
    config = coarse_config_from_proto(coarse, CoarseConfig(prompt="a cube"))
    assert (config.render_resolution(239), config.render_resolution(240)) == (32, 48)
    fine = json_format.ParseDict({"stage": "STAGE_FINE", "resolutionSchedule": {"steps": [0], "values": [64]}},
                                 scene_pb2.StageConfig())
    assert fine_config_from_proto(fine, TINY_FINE).render_resolution(0) == 64
    check_stage_config(coarse, SceneLimits(max_resolution=48))
    with pytest.raises(InvalidArgument, match="max_resolution") as refused:
        check_stage_config(coarse, SceneLimits(max_resolution=32))
    assert refused.value.field == "config.resolution_schedule"


@pytest.mark.parametrize("pipelined", [False, True])
def test_the_coarse_stage_renders_each_step_at_its_scheduled_side(analytic16, pipelined):
    guidance = SizeRecorder(analytic16)
    config = tiny_config(resolution_schedule=Schedule((0, 2, 4), (16.0, 24.0, 20.0)), pipelined_guidance=pipelined)
    stage = CoarseStage(config, guidance, "progressive")
    steps = 5
    for n in range(steps):
        assert not stage.step(prefetch=n + 1 < steps).skipped
    assert guidance.sides == [16, 16, 24, 24, 20]
    # Previews keep the stage's fixed side.
    preview = sample_cameras(config.cameras, 1, 64, torch.Generator().manual_seed(0))
    assert stage.render_views(preview).shape[-1] == config.resolution


def test_the_fine_stage_renders_each_step_at_its_scheduled_side():
    guidance = analytic_guidance(32)
    try:
        recorder = SizeRecorder(guidance)
        config = TINY_FINE.model_copy(update={"resolution_schedule": Schedule((0, 1), (24.0, 32.0))})
        stage = FineStage.from_coarse(tiny_coarse(), config, recorder, "progressive")[0]
        for _ in range(2):
            stage.step()
        assert recorder.sides == [24, 32]
    finally:
        guidance.close()
