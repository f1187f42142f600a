"""The whole stack on loopback, as `make run` starts it: guidance under Ray Serve on a local Ray, a scene service,
the orchestrator and a local store, driven by the `magic3d generate` command. The GLB it writes is scored against
the prompt's reference object."""

from __future__ import annotations

import json

import pytest
import torch
import trimesh

from services.cli import main

from scenes import mesh_scores, red_torus

# The cpu-demo preset (400 + 100), shortened to keep the suite within its budget. Measured on the CPU machine (seed 0):
# 200 + 40 steps give distance 0.0070, IoU 0.978; 100 + 40 give 0.0082, 0.934 (again 0.0082, 0.931); 60 + 40 fail
# (0.0205, 0.663, measured with the occupancy grid's first update before step 0, since reverted); with 96 samples a
# ray (issue 16 round 8) 100 + 40 give 0.0074, 0.958. Thresholds 0.02, 0.85.
COARSE_STEPS, FINE_STEPS = 100, 40


@pytest.mark.slow
@pytest.mark.serve
def test_generate_through_ray_serve_writes_a_glb_that_matches_the_prompt(tmp_path, capsys):
    code = main([
        "generate", "a red torus", "--preset", "cpu-demo", "--seed", "0",
        "--steps", f"coarse={COARSE_STEPS}", "--steps", f"fine={FINE_STEPS}",
        "--state-dir", str(tmp_path / "local"), "--out", str(tmp_path / "out"), "--timeout", "900",
    ])
    assert code == 0, capsys.readouterr().err
    (folder,) = (tmp_path / "out").iterdir()
    assert {"model.glb", "model.obj", "model.mtl", "texture.png", "preview.png", "turntable.gif", "provenance.json"} <= {
        p.name for p in folder.iterdir()
    }
    # The store holds the same GLB (the local stack's artifact store).
    stored = list((tmp_path / "local" / "store" / "jobs" / folder.name / "export").rglob("model.glb"))
    assert stored and stored[0].read_bytes() == (folder / "model.glb").read_bytes()

    loaded = trimesh.load(folder / "model.glb", force="mesh")
    assert loaded.visual.material.baseColorTexture is not None
    file_vertices = torch.tensor(loaded.vertices, dtype=torch.float32)
    world = torch.stack([file_vertices[:, 0], -file_vertices[:, 2], file_vertices[:, 1]], dim=1)  # +Y up -> +Z up
    distance, iou = mesh_scores(world, torch.tensor(loaded.faces, dtype=torch.int64), red_torus().mesh)
    print(f"local stack, {COARSE_STEPS}+{FINE_STEPS} steps: distance {distance:.4f} of the diagonal, IoU {iou:.3f}")
    # The CPU threshold of the fine-stage quality test (2% of the diagonal), on a shortened schedule.
    assert distance <= 0.02 and iou >= 0.85
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["prompt"] == "a red torus" and provenance["preset"] == "cpu-demo"
