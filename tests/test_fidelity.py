"""Fidelity of the final GLB at cpu-demo settings on shapes no other test uses (shared.shape_set): a cone (flat
bottom), a table (thin legs), three rings 0.04 apart (narrow gaps), a two-coloured cylinder, a mug with a handle.
Each is added to the analytic priors as a user mesh (PLY with vertex colours, `color: null`), generated from its
name through the local stack with the cpu-demo preset, and scored on the downloaded model.glb: surface distance
<= 1.5% of the bounding-box diagonal, IoU >= 0.85, and the colours right region by region.

One run per shape, shared by the module (the `fidelity` marker; `make test-fidelity`): minutes on 2 cores, so not
part of the default suite. The shape builders' own checks (closed, outward, inside radius 0.5) are quick and
unmarked.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from bench import fidelity
from shared.shape_set import BLUE, RED, shape_set

SHAPES = {shape.name: shape for shape in shape_set()}


def test_shapes_are_closed_outward_and_fit_the_scene():
    import trimesh

    for shape in SHAPES.values():
        mesh = trimesh.Trimesh(shape.mesh.vertices.numpy(), shape.mesh.faces.numpy(), process=True)
        parts = mesh.split(only_watertight=False)
        assert all(part.is_watertight and part.volume > 0 for part in parts), shape.name
        assert float(shape.mesh.vertices.norm(dim=1).max()) <= 0.5 + 1e-6, shape.name
        assert shape.mesh.vertex_colors is not None
    assert len(trimesh.Trimesh(SHAPES["rings"].mesh.vertices.numpy(), SHAPES["rings"].mesh.faces.numpy()).split()) == 3


def test_the_scores_can_fail():
    """A shape scored against itself passes; against another shape, or painted wrong, it does not."""
    two_tone, rings = SHAPES["two-tone"], SHAPES["rings"]
    right = two_tone.mesh.vertex_colors
    assert fidelity.color_error(two_tone, two_tone.mesh.vertices, right) < 0.02
    swapped = torch.where(right == torch.tensor(RED), torch.tensor(BLUE), torch.tensor(RED))
    assert fidelity.color_error(two_tone, two_tone.mesh.vertices, swapped) > 0.3
    from shared.mesh_metrics import volumetric_iou

    iou = volumetric_iou(rings.mesh.vertices, rings.mesh.faces, two_tone.mesh.vertices, two_tone.mesh.faces, 48)
    assert iou < 0.5


def test_the_gpu_schedule_is_magic3d_with_analytic_priors_and_cpu_demo_framing(tmp_path):
    from services.guidance.config import GuidanceConfig
    from services.orchestrator.presets import PresetBook
    from shared.guidance_api import PriorKind

    presets, guidance = fidelity.gpu_schedule_files(tmp_path)
    book = PresetBook.load(presets)  # refused here if the derived preset were not a valid schedule
    magic3d, derived, demo = book.get("magic3d"), book.get(fidelity.GPU_PRESET), book.get("cpu-demo")
    assert [(s.stage, s.steps) for s in derived.stages] == [(s.stage, s.steps) for s in magic3d.stages]
    config = GuidanceConfig.model_validate(yaml.safe_load(guidance.read_text()))
    served = {prior.name: prior for prior in config.priors}
    for ours, theirs, framing in zip(derived.stages, magic3d.stages, demo.stages):
        mine = ours.stage_config()
        assert mine.resolution == theirs.stage_config().resolution and mine.cameras == framing.stage_config().cameras
        (term,) = mine.priors
        assert served[term.prior].kind == PriorKind.ANALYTIC and served[term.prior].resolution == mine.resolution
    assert fidelity.FidelityRow("cone", 0, 1.2, 0.95, 0.0, 1.0, fidelity.GPU_LIMITS).passed is False  # 1.2% > 1%


def test_generate_reports_stage_and_step_when_asked_and_names_a_failure(tmp_path, monkeypatch, capsys):
    """A long run's log tells how far each job got: progress lines on stderr, throttled; a failed job's reason."""
    from magic3d.v1 import orchestrator_pb2, orchestrator_pb2_grpc, scene_pb2

    def events():
        for step in (10, 20):
            response = orchestrator_pb2.GenerateResponse()
            response.event.progress.stage = scene_pb2.STAGE_FINE
            response.event.progress.step, response.event.progress.total_steps = step, 3000
            yield response
        response = orchestrator_pb2.GenerateResponse()
        response.event.failed.reason = "guidance unavailable"
        yield response

    class FakeStub:
        def __init__(self, channel):
            pass

        def Generate(self, request, timeout):  # noqa: N802 - the RPC's name
            return events()

    monkeypatch.setattr(orchestrator_pb2_grpc, "OrchestratorServiceStub", FakeStub)
    for every, lines in ((1e-9, 2), (0.0, 0), (3600.0, 0)):
        with pytest.raises(RuntimeError, match="guidance unavailable"):
            fidelity.generate("127.0.0.1:1", "token", "a cone", "cpu-demo", 0, tmp_path, report_every_s=every)
        reported = [line for line in capsys.readouterr().err.splitlines() if line.startswith("#")]
        assert len(reported) == lines
    # (3600 s: the first report waits a whole period from the start, so a short job prints none)


def test_run_builds_one_stack_with_the_given_files_and_threads_and_restores_them(tmp_path, monkeypatch):
    """The stack's settings carry the optional files and the whole shape set; the jobs run at the given thread
    count, restored after."""
    import services.local_stack as local_stack

    seen = {}

    class FakeStack:
        orchestrator_address, client_token = "127.0.0.1:1", "token"

        def stop(self):
            seen["stopped_threads"] = torch.get_num_threads()

    def fake_start(settings):
        seen["settings"] = settings
        return FakeStack()

    def fake_generate(address, token, prompt, preset, seed, out, report_every_s=0.0):
        seen.setdefault("job_threads", []).append(torch.get_num_threads())
        seen["report_every_s"] = report_every_s
        return out / "model.glb"

    monkeypatch.setattr(local_stack, "start_local_stack", fake_start)
    monkeypatch.setattr(fidelity, "generate", fake_generate)
    monkeypatch.setattr(fidelity, "score", lambda shape, glb: (1.0, 0.9, 0.01))
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    rows = fidelity.run([SHAPES["cone"], SHAPES["mug"]], seeds=[0], workdir=tmp_path, threads=want,
                        scene_config=tmp_path / "scene.yaml", report_every_s=30.0)
    assert [row.shape for row in rows] == ["cone", "mug"] and all(row.passed for row in rows)
    assert seen["report_every_s"] == 30.0
    assert seen["job_threads"] == [want, want] and torch.get_num_threads() == before
    settings = seen["settings"]
    assert settings.scene_config == tmp_path / "scene.yaml" and settings.guidance == "standalone"
    assert settings.presets == local_stack.LocalStackSettings().presets  # not given: the default file
    # Every shape of the set is registered, in the set's order, whichever run: a job guides as it does in the tier.
    registered = [mesh["name"] for mesh in yaml.safe_load(settings.guidance_config.read_text())["analytic"]["meshes"]]
    assert registered[-len(SHAPES):] == [fidelity.object_name(shape) for shape in SHAPES.values()]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    rows = fidelity.run(list(SHAPES.values()), seeds=[0], workdir=tmp_path_factory.mktemp("fidelity"), threads=1)
    print("\n" + fidelity.HEADER + "\n" + "\n".join(fidelity.format_row(row) for row in rows))
    return {row.shape: row for row in rows}


# Known gaps at cpu-demo settings (BENCHMARKS.md, "Fidelity"): the mug's cavity is filled in its lower half and its
# walls come out about three times too thick (round 7: neither more coarse steps, finer renders nor a loss on unseen
# density opens it). Kept in the set, measured every run, and expected to fail until fixed. (The table, xfail until
# round 8, passes since cpu-demo samples its rays twice as densely.)
KNOWN_GAPS = {
    "mug": pytest.mark.xfail(reason="the cavity is half filled, the walls too thick (issue 16)", strict=False),
}
CASES = [pytest.param(name, marks=KNOWN_GAPS[name]) if name in KNOWN_GAPS else name for name in SHAPES]


# The first case's set-up runs every shape's job (the shared `results`): 5 to 15 min a shape at one torch thread on 2
# cores (about 47 min in all), far beyond the suite's default 600 s per test (pyproject), which stopped
# `make test-fidelity` after two shapes. One thread makes a run reproducible to the digit (bench.fidelity.run).
FIDELITY_TIMEOUT_S = 4200


@pytest.mark.fidelity
@pytest.mark.timeout(FIDELITY_TIMEOUT_S)
@pytest.mark.parametrize("name", CASES)
def test_final_glb_matches_the_shape(results, name):
    row = results[name]
    assert row.distance_percent <= fidelity.DISTANCE_LIMIT_PERCENT, row
    assert row.iou >= fidelity.IOU_LIMIT, row
    assert row.color_error <= 0.15, row


def test_scene_radius_sets_the_coarse_box_and_is_refused_by_the_fine_stage():
    from magic3d.v1 import scene_pb2

    from services.scene.config import CoarseConfig, FineConfig
    from services.scene.messages import coarse_config_from_proto, fine_config_from_proto
    from shared.errors import InvalidArgument

    config = coarse_config_from_proto(scene_pb2.StageConfig(scene_radius=0.6, samples_per_ray=48), CoarseConfig(prompt="x"))
    assert config.field.bound_radius == config.renderer.radius == config.occupancy.bound_radius == pytest.approx(0.6)
    assert config.occupancy.step_size == pytest.approx(1.2 / 48)
    default = coarse_config_from_proto(scene_pb2.StageConfig(), CoarseConfig(prompt="x"))
    assert default.field.bound_radius == 1.0
    with pytest.raises(InvalidArgument) as caught:
        coarse_config_from_proto(scene_pb2.StageConfig(scene_radius=-1.0), CoarseConfig(prompt="x"))
    assert caught.value.field == "config.scene_radius"
    with pytest.raises(InvalidArgument, match="coarse checkpoint"):
        fine_config_from_proto(scene_pb2.StageConfig(stage=scene_pb2.STAGE_FINE, scene_radius=0.6), FineConfig(prompt="x"))
