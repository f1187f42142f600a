"""The GPU benchmark runners run end to end at CPU sizes (--smoke) so they cannot rot between GPU sessions; their
figures mean nothing here. Checked: every section's rows (concurrent jobs included), the standalone guidance service
in its own process, and a schedule resumed from its checkpoint, and one stopped by its time budget."""

from __future__ import annotations

import json
import os

from bench import gpu_suite, prior_speed, schedule


def test_suite_smoke_rows_and_files(tmp_path):
    results = gpu_suite.main(["--smoke", "--pipelined", "--out", str(tmp_path)])
    assert [r["points"] for r in results["hash_grid"]] == [1024]
    paths = {(r["stage"], r["batch"], r["path"]) for r in results["steps"]}
    both = {(stage, 2, path + mode) for stage in ("coarse", "fine") for path in ("in-process", "standalone gRPC")
            for mode in ("", ", pipelined")}
    variants = {("fine", 2, "standalone gRPC, images sent"), ("fine", 2, "standalone gRPC, encoder eager")}
    assert paths == both | variants
    for row in results["steps"]:
        assert row["step_ms"] > 0 and row["phases_ms"]["guidance"] > 0 and row["encoding_ms"]["forward"] > 0
    assert [r["jobs"] for r in results["concurrent"]] == [1, 2]
    assert all(r["steps_per_s"] > 0 and r["images_per_denoiser_call"] >= 2 for r in results["concurrent"])
    assert json.loads((tmp_path / "gpu_suite.json").read_text())["steps"] == json.loads(json.dumps(results["steps"]))
    table = (tmp_path / "gpu_suite.md").read_text()
    assert "| coarse | 2 | standalone gRPC |" in table and "standalone / in-process" in table
    assert "| fine | 2 | standalone gRPC | " in table.split("pipelined / sequential")[1]
    for row in results["steps"]:  # the floor: UNet with CFG, plus the VAE encoder's forward + backward when fine
        floor = row["floor"]
        parts = floor["unet_cfg_ms"] + floor.get("vae_forward_backward_ms", 0.0)
        assert floor["unet_cfg_ms"] > 0 and floor["floor_ms"] == parts
        assert ("vae_forward_backward_ms" in floor) == (row["stage"] == "fine")
    assert "step / floor" in table


def test_pipelined_steps_bench_times_both_modes(tmp_path):
    """bench/pipelined_steps.py at tiny sizes: both modes of both stages, split and written (no timing asserted)."""
    from bench import pipelined_steps

    rows = pipelined_steps.main(["--smoke", "--steps", "3", "--warmup", "1", "--rounds", "1", "--guidance-ms", "20",
                                 "--out", str(tmp_path)])
    assert [(r["stage"], r["mode"]) for r in rows] == [
        (stage, mode) for stage in ("coarse", "fine") for mode in ("sequential", "pipelined")
    ]
    for row in rows:
        assert row["step_ms"] > 0 and row["scene_work_ms"] > 0 and row["floor_ms"] >= 20
        assert "guidance" in row["phases_ms"] and ("render" in row["phases_ms"]) == (row["stage"] == "coarse")
        assert row["phases_ms"]["guidance"] >= 19 or row["mode"] == "pipelined"  # sequential waits it all out
    assert json.loads((tmp_path / "pipelined_steps.json").read_text()) == rows


def test_schedule_stops_within_budget_and_resumes(tmp_path):
    def run(state, *args):
        return schedule.main(["--stage", "coarse", "--state", str(tmp_path / state), "--smoke", *args])

    assert run("a", "--steps", "2")["steps_done"] == 2
    resumed = run("a", "--steps", "4", "--log-every", "1")  # the same job, more steps: continues from step 2
    assert resumed["done"] and resumed["segments"] == 2 and resumed["steps_done"] == 4
    assert resumed["last"]["step_start"] == 2 and resumed["stepping_s"] > 0
    stopped = run("b", "--steps", "4", "--budget-s", "0", "--guidance-gpu", "0")  # out of time before the first step: checkpoint, not done
    assert not stopped["done"] and stopped["steps_done"] == 0 and (tmp_path / "b" / "coarse.ckpt").exists()


def test_prior_speed_smoke_times_every_variant(tmp_path):
    """bench/prior_speed.py at CPU sizes: each prior's variants are timed and restored to the service default."""
    rows = prior_speed.main(["--smoke", "--repeats", "1", "--out", str(tmp_path)])
    variants = {(row["prior"], row["variant"]) for row in rows}
    assert variants == {
        ("latent", "service default"), ("latent", "channels-last"), ("latent", "VAE attention: PyTorch's pick"),
        ("pixel", "service default"), ("pixel", "channels-last"),
    }  # no CUDA graph variant on the CPU, where there is nothing to capture
    for row in rows:
        assert row["compute_sds_ms"] > 0 and row["unet_cfg_min_ms"] <= row["unet_cfg_ms"]
        assert ("vae_forward_backward_ms" in row) == (row["prior"] == "latent")
    assert json.loads((tmp_path / "prior_speed.json").read_text()) == rows
    assert (tmp_path / "prior_speed.md").read_text().count("\n") == len(rows) + 2


def test_encoder_speed_smoke_times_both_layouts(tmp_path):
    from bench import encoder_speed

    rows = encoder_speed.main(["--smoke", "--no-compile", "--repeats", "1", "--batch", "1", "--out", str(tmp_path)])
    assert [r["variant"] for r in rows] == ["eager, contiguous", "eager, channels_last"]
    assert all(r["median_ms"] > 0 and r["grad_cosine"] > 0.999 for r in rows)
    assert json.loads((tmp_path / "encoder_speed.json").read_text()) == json.loads(json.dumps(rows))


def test_detached_runs_outlive_their_command_and_a_failed_one_ends_the_wait(tmp_path):
    """bench/gpu/detached.sh: a run keeps going after `start` returns; `wait` returns once every run has ended
    (a failed one at once, not at the time limit) and packs each run's folder into $OUT/NAME.tgz."""
    import subprocess
    import tarfile
    import time

    env = {**os.environ, "MAGIC3D_DETACHED_DIR": str(tmp_path / "runs"), "OUT": str(tmp_path / "back")}

    def detached(*args: str) -> str:
        return subprocess.run(["bash", "bench/gpu/detached.sh", *args], env=env, capture_output=True, text=True,
                              check=True, timeout=60).stdout

    started = detached("start", "slow", "--wait", "0", "--", "bash", "-c", 'sleep 3; echo ok > "$OUT/result.txt"')
    assert "slow: running" in started
    detached("start", "broken", "--wait", "0", "--", "bash", "-c", "echo no GPU; exit 3")
    began = time.monotonic()
    report = detached("wait", "--wait", "50", "slow", "broken")
    assert time.monotonic() - began < 30  # both ended long before the limit
    assert "slow: exited 0" in report and "broken: exited 3" in report and "no GPU" in report
    with tarfile.open(tmp_path / "back/slow.tgz") as packed:
        assert packed.extractfile("./out/result.txt").read() == b"ok\n"
    with tarfile.open(tmp_path / "back/broken.tgz") as packed:
        assert packed.extractfile("./rc").read() == b"3\n"


def test_guidance_sds_profile_covers_renders_of_views_the_timed_calls_had_not_seen(tmp_path):
    """bench.guidance_sds --profile: the ops table of in-process calls whose cameras are new to the render cache
    (a profile of cache hits would show no rendering at all)."""
    from bench import guidance_sds
    from services.guidance.priors.analytic import AnalyticPrior

    prior = AnalyticPrior(resolution=32)
    guidance_sds.bench_inproc(prior, batch=1, repeats=1, backgrounds=True)
    cached = len(prior._renders)
    table = guidance_sds.profile_inproc(prior, 1, 1, True, "cpu", tmp_path / "p.txt").read_text()
    assert table.startswith("1 calls, batch 1") and "aten::" in table and "Self CPU time total" in table
    assert len(prior._renders) == cached + 2 * len(prior.objects)  # warm-up and profiled call: new views each


def test_guidance_sds_splits_a_grpc_call_into_server_time_and_hop_and_times_the_codec_steps():
    """bench.guidance_sds: a gRPC row carries the responses' server time (at most the call's own), requests travel in
    the chosen wire dtype (float16 halves the request and the response), and the codec table has every step."""
    import torch

    from bench import guidance_sds

    prior, spec = guidance_sds.build_prior("analytic", "tiny", "cpu", None, analytic_resolution=32)
    request = guidance_sds.make_request(prior, 2, seed=3, backgrounds=True, dtype=torch.float16)
    assert request.images.dtype == torch.float16 and request.grad_dtype == torch.float16
    assert all(camera.background_image.dtype == torch.float16 for camera in request.cameras)
    (median, best, server), = guidance_sds.run_standalone(prior, spec, [2], 2, True, torch.float16).values()
    assert 0 < server <= median and best <= median

    sizes = {}
    for dtype in (torch.float32, torch.float16):
        rows = guidance_sds.codec_rows(prior, "analytic", 2, 1, True, dtype)
        assert [r.step.split(":")[0] for r in rows] == ["request"] * 4 + ["response"] * 4
        assert all(r.median_ms > 0 for r in rows)
        sizes[dtype] = (rows[0].mib, rows[-1].mib)
    (request32, response32), (request16, response16) = sizes[torch.float32], sizes[torch.float16]
    # Images and backgrounds (2 x 3 x 32 x 32 each) dominate the request, the gradient the response.
    assert abs(request32 / request16 - 2) < 0.05 and abs(response32 / response16 - 2) < 0.05
