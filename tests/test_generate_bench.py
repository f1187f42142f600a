"""bench/generate_e2e.py: the client-side timing of a job through Generate on the local stack (--smoke: CPU, tiny
random priors), cancelled after --max-seconds with the schedule projected; and its arithmetic on known events."""

from __future__ import annotations

import json

import pytest
from magic3d.v1 import orchestrator_pb2, scene_pb2

from bench import generate_e2e


def _event(**kind) -> orchestrator_pb2.JobEvent:
    return orchestrator_pb2.JobEvent(job_name="jobs/j", **kind)


def _progress(stage, step, preview=""):
    return _event(progress=orchestrator_pb2.JobProgress(stage=stage, step=step, total_steps=100, preview_uri=preview))


def test_projection_adds_each_stages_setup_and_steps_at_its_median_pace():
    coarse, fine = scene_pb2.STAGE_COARSE, scene_pb2.STAGE_FINE
    events = [
        (0.1, _event(queued=orchestrator_pb2.JobQueued())),
        (1.0, _event(stage_started=orchestrator_pb2.StageStarted(stage=coarse, total_steps=100))),
        (3.0, _progress(coarse, 10)),  # 2 s of set-up after submit, then 0.1 s per step
        (3.5, _progress(coarse, 10, "file:///p.png")),  # a preview's render is not a step
        (4.0, _progress(coarse, 20)),
        (5.0, _progress(coarse, 30)),
        (5.5, _event(stage_finished=orchestrator_pb2.StageFinished(stage=coarse))),
        (9.5, _event(stage_started=orchestrator_pb2.StageStarted(stage=fine, total_steps=50))),
        (10.5, _progress(fine, 5)),
        (11.5, _progress(fine, 10)),
        (12.0, _event(failed=orchestrator_pb2.JobFailed(reason="cancelled by the client"))),
    ]
    result = generate_e2e.summarise(events, {"coarse": 100, "fine": 50}, max_seconds=11.0)
    assert result["stages"]["coarse"]["median_step_s"] == pytest.approx(0.1)
    assert result["stages"]["coarse"]["setup_s"] == pytest.approx(2.0)
    assert result["stages"]["fine"]["median_step_s"] == pytest.approx(0.2)
    assert result["stages"]["fine"]["setup_s"] == pytest.approx(4.0)  # the conversion, from coarse's last event
    assert result["projected_total_s"] == pytest.approx(2.0 + 100 * 0.1 + 4.0 + 50 * 0.2)
    assert result["first_preview_s"] == 3.5 and result["first_progress_s"] == 3.0 and result["accepted_s"] == 0.1
    assert "measured_total_s" not in result and result["failure"] == "cancelled by the client"


def test_smoke_run_is_cancelled_after_max_seconds_with_a_preview_and_a_projection(tmp_path):
    result = generate_e2e.main(["--smoke", "--max-seconds", "12", "--steps", "coarse=8", "--out", str(tmp_path),
                                "--warm-up", "coarse=2,fine=2", "--vanish-recoveries", "5"])
    written = json.loads((tmp_path / "generate_e2e.json").read_text())
    # The untimed warm-up job ran to its end on the same stack first; the scene took the recoveries asked for.
    assert written["warm_up"]["final_event"] == "done" and written["warm_up"]["steps"] == {"coarse": 2, "fine": 2}
    assert written["vanish_recoveries"] == 5
    assert written["first_preview_s"] == result["first_preview_s"]
    assert 0 <= written["accepted_s"] <= written["first_progress_s"] <= written["first_preview_s"] < 12
    assert written["previews"] >= 1 and written["schedule_steps"] == {"coarse": 40, "fine": 200}
    assert written["final_event"] == "failed" and "cancel" in written["failure"]
    coarse = written["stages"]["coarse"]
    assert coarse["steps_done"] == 8 and 0 < coarse["median_step_s"] < 5
    if "median_step_s" in written["stages"].get("fine", {}):  # the fine stage began before the cancel
        assert written["projected_total_s"] > 40 * coarse["median_step_s"]
    else:
        assert written["projected_total_s"] is None and "fine" in written["projection_excludes"]
    assert (tmp_path / "generate_e2e.md").read_text().startswith("| bench-smoke (standalone) |")
    assert (tmp_path / "generate_first_preview.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generate_e2e.json", "generate_e2e.md",
                                                          "generate_first_preview.png"]  # no checkpoints in --out


def test_cli_places_the_local_stacks_scene_and_guidance_on_the_gpu_when_asked():
    from services import cli

    for command in (["serve"], ["generate", "a red torus"]):
        default = cli.local_stack_settings(cli.parse_args(command))
        assert (default.scene_device, default.guidance_gpus) == ("cpu", 0)
        gpu = cli.local_stack_settings(cli.parse_args([*command, "--scene-device", "auto", "--guidance-gpus", "1"]))
        assert (gpu.scene_device, gpu.guidance_gpus) == ("auto", 1)


def test_log_level_info_keeps_the_services_events_that_split_a_cold_set_up(tmp_path):
    """--log-level INFO (a fresh process: logging is configured once per process): the scene's creation, the SDS
    calls with their server time and the progress reports reach stderr, timestamped; the default keeps them out."""
    import os
    import subprocess
    import sys

    def run(*extra, seconds="8"):
        command = [sys.executable, "-m", "bench.generate_e2e", "--smoke", "--max-seconds", seconds, "--steps", "coarse=2",
                   "--out", str(tmp_path / (extra[-1] if extra else "default")), *extra]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, env=os.environ | {"PYTHONPATH":
                              os.pathsep.join(sys.path)}).stderr

    events = [json.loads(line) for line in run("--log-level", "INFO").splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert "scene_created" in names and "sds_done" in names and "progress" in names
    assert all("timestamp" in e for e in events)
    assert next(e for e in events if e["event"] == "sds_done")["server_time_s"] >= 0
    assert '"event": "scene_created"' not in run(seconds="3")
    assert json.loads((tmp_path / "default" / "generate_e2e.json").read_text())["first_progress_s"] < 3  # it ran
