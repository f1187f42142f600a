"""Previews on their own schedule (presets' `first_preview_step` and `preview_every`): rendered without a checkpoint,
at the scheduled steps of each stage, the first one in the job's stream before any checkpoint is recorded; bad
schedule values are INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import copy

import pytest
import yaml
from magic3d.v1 import orchestrator_pb2, scene_pb2
from test_orchestrator import TINY_PRESETS, Stack, guidance, text_spec  # noqa: F401 - guidance is a fixture

from services.orchestrator import execution
from services.orchestrator.presets import PresetBook, PreviewSchedule
from shared.errors import InvalidArgument
from shared.store import LocalStore

PREVIEW_PRESETS = {
    "default": "previews",
    "presets": {
        "previews": {  # one checkpoint per stage (at its end); previews at 2, 5, 10, 12 (coarse) and 2 (fine)
            "checkpoint_every": 1000,
            "preview_every": 5,
            "first_preview_step": 2,
            "progress_every": 1,
            "stages": copy.deepcopy(TINY_PRESETS["presets"]["tiny"]["stages"]),
            "export": {"texture_size": 64},
        },
    },
}
PREVIEW_PRESETS["presets"]["previews"]["stages"][0]["steps"] = 12


def test_schedule_steps_first_then_cadence_then_stage_end():
    schedule = PreviewSchedule(every=5, first_step=2)
    assert [s for s in range(13) if schedule.due(s, 12)] == [2, 5, 10, 12]
    walked, step = [], 0
    while step < 12:
        step = schedule.next_after(step, 12)
        walked.append(step)
    assert walked == [2, 5, 10, 12]
    assert PreviewSchedule(every=500).next_after(0, 3000) == 500 and not PreviewSchedule(every=500).due(0, 3000)
    assert PreviewSchedule(every=500, first_step=50).next_after(520, 600) == 600  # a resumed stage: no early one


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"first_preview_step": 0}, "presets.previews.first_preview_step"),
        ({"preview_every": -5}, "presets.previews.preview_every"),
        ({"first_preview_step": 13}, "presets.previews.first_preview_step"),  # over the fine stage's 2 steps too
        ({"first_preview_step": 3}, "presets.previews.first_preview_step"),  # over the fine stage's 2 steps
        ({"first_preview_step": 2, "preview_every": 1}, "presets.previews.first_preview_step"),  # after the cadence's
        ({"first_preview_step": "soon"}, "presets.previews.first_preview_step"),
    ],
)
def test_bad_preview_settings_are_invalid_argument_naming_the_field(tmp_path, change, field):
    book = copy.deepcopy(PREVIEW_PRESETS)
    book["presets"]["previews"].update(change)
    path = tmp_path / "presets.yaml"
    path.write_text(yaml.safe_dump(book))
    with pytest.raises(InvalidArgument) as caught:
        PresetBook.load(path)
    assert caught.value.field == field, caught.value.message


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"samples_per_ray": 48, "samplesPerRay": 96}, "samples_per_ray"),
        ({"samplesPerRay": 96, "samples_per_ray": 48}, "samples_per_ray"),
        ({"hashGrid": {"n_levels": 8, "nLevels": 4}}, "hash_grid.n_levels"),
        ({"lossWeights": {"sparsity": {"steps": [0], "values": [0.1], "value": [1]}}}, None),  # unknown, not doubled
        ({"priors": [{"prior": "a"}, {"prior": "b", "input": "PRIOR_INPUT_TEXT"}]}, None),  # a list of messages is fine
    ],
)
def test_a_stage_field_set_under_both_its_names_is_refused_naming_it(tmp_path, config, field):
    # protobuf's ParseDict keeps whichever spelling comes last; a preset that says 48 and 96 at once is a mistake.
    book = copy.deepcopy(PREVIEW_PRESETS)
    book["presets"]["previews"]["stages"][0]["config"].update(config)
    path = tmp_path / "presets.yaml"
    path.write_text(yaml.safe_dump(book))
    if field is None:
        try:
            PresetBook.load(path)
        except InvalidArgument as error:
            assert "set twice" not in error.message and error.field == "presets.previews.stages.0.config"
        return
    with pytest.raises(InvalidArgument) as caught:
        PresetBook.load(path)
    assert caught.value.field == f"presets.previews.stages.0.config.{field}", caught.value.message
    assert "set twice" in caught.value.message


def test_a_stage_config_that_is_not_proto_json_is_invalid_argument_naming_the_stage(tmp_path):
    book = copy.deepcopy(PREVIEW_PRESETS)
    book["presets"]["previews"]["stages"][1]["config"]["samplesPerRay"] = "many"
    path = tmp_path / "presets.yaml"
    path.write_text(yaml.safe_dump(book))
    with pytest.raises(InvalidArgument) as caught:
        PresetBook.load(path)
    assert caught.value.field == "presets.previews.stages.1.config"
    assert "samplesPerRay" in caught.value.message


def test_the_shipped_presets_preview_early():
    book = PresetBook.load("deploy/config/presets.yaml")
    magic3d = book.get("magic3d").preview_schedule()
    assert 0 < magic3d.first_step <= 100 and magic3d.every <= book.get("magic3d").checkpoint_every
    assert 0 < book.get("cpu-demo").preview_schedule().first_step <= 20


@pytest.fixture(scope="module")
def preview_stack(guidance, tmp_path_factory):  # noqa: F811
    stack = Stack(guidance, tmp_path_factory.mktemp("previews"), presets=PREVIEW_PRESETS)
    yield stack
    stack.close()


def watch_previews(stack: Stack, job_id: str, on_first_preview=lambda: None) -> tuple[dict, orchestrator_pb2.JobEvent]:
    """{stage: [steps of its previews]} from WatchJob, and the stream's last event."""
    previews: dict[int, list[int]] = {scene_pb2.STAGE_COARSE: [], scene_pb2.STAGE_FINE: []}
    last = None
    store = LocalStore(stack.root / "store")
    for response in stack.stub.WatchJob(orchestrator_pb2.WatchJobRequest(name=f"jobs/{job_id}"), timeout=180):
        last = response.event
        if last.WhichOneof("event") == "progress" and last.progress.preview_uri:
            if not any(previews.values()):
                on_first_preview()
            previews[last.progress.stage].append(last.progress.step)
            assert store.get(store.key_from_uri(last.progress.preview_uri)).startswith(b"\x89PNG")
    return previews, last


def submit(stack: Stack) -> str:
    job = stack.stub.SubmitJob(orchestrator_pb2.SubmitJobRequest(spec=text_spec(preset="previews")), timeout=10).job
    return job.name.removeprefix("jobs/")


def test_previews_come_at_their_steps_without_checkpoints_and_before_the_first_one(preview_stack):
    runner = preview_stack.orchestrator.servicer.runner
    job_id = submit(preview_stack)
    checkpoints_at_first_preview = []
    previews, last = watch_previews(
        preview_stack, job_id, lambda: checkpoints_at_first_preview.append(list(runner.jobs.get(job_id).checkpoints))
    )
    assert last.WhichOneof("event") == "done", last
    assert checkpoints_at_first_preview == [[]]
    assert previews == {scene_pb2.STAGE_COARSE: [2, 5, 10, 12], scene_pb2.STAGE_FINE: [2]}
    recorded = runner.jobs.get(job_id).checkpoints
    assert sorted((c.stage, c.step) for c in recorded) == [("coarse", 12), ("fine", 2)]  # at the stages' ends only


def test_a_failing_preview_is_skipped_and_the_job_goes_on(preview_stack, monkeypatch):
    real, calls = execution.previews.strip_png, []

    def strip_png_failing_first(images):
        calls.append(1)
        if len(calls) == 1:
            raise InvalidArgument("preview images must be uint8", "tensor.dtype")
        return real(images)

    monkeypatch.setattr(execution.previews, "strip_png", strip_png_failing_first)
    previews, last = watch_previews(preview_stack, submit(preview_stack))
    assert last.WhichOneof("event") == "done", last
    assert previews == {scene_pb2.STAGE_COARSE: [5, 10, 12], scene_pb2.STAGE_FINE: [2]}
