"""The orchestrator never touches pixels: importing it (and everything it imports) loads no torch, so its image
needs none; it still plans and validates jobs (the stage configs are torch-free) and stores previews (numpy)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from magic3d.v1 import common_pb2

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "gen"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_importing_the_orchestrator_does_not_import_torch():
    done = _python("import sys, services.orchestrator.server; assert 'torch' not in sys.modules")
    assert done.returncode == 0, done.stderr[-2000:]


# Torch made unimportable: what the orchestrator does per job still works.
_WITHOUT_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed in the orchestrator's image")
sys.meta_path.insert(0, _NoTorch())

from magic3d.v1 import common_pb2, orchestrator_pb2, scene_pb2
from services.orchestrator import previews, validation
from services.orchestrator.presets import PresetBook, plan_job
from services.scene.config import CoarseConfig
from shared.errors import InvalidArgument
from shared.stage_limits import SceneLimits

book = PresetBook.load("deploy/config/presets.yaml")
override = orchestrator_pb2.StageOverride(config=scene_pb2.StageConfig(stage=scene_pb2.STAGE_COARSE, resolution=32))
plan = plan_job(book, "", [override], "a red torus", "", 3)
for stage in plan.stages:
    validation.check_stage(stage.name, stage.config, SceneLimits(), [override])
bad = orchestrator_pb2.StageOverride(config=scene_pb2.StageConfig(stage=scene_pb2.STAGE_COARSE, batch_size=1000))
try:
    plan_job(book, "", [bad], "a red torus", "", 3)
    raise SystemExit("an override over the config's bounds was accepted")
except InvalidArgument as error:
    assert error.field == "spec.overrides[0].config.batch_size", error.field
assert CoarseConfig(prompt="x").hash_table_bytes() > 0
pixels = bytes(range(256)) * (2 * 8 * 8 * 3 // 256 + 1)
images = common_pb2.Tensor(dtype=common_pb2.SCALAR_TYPE_UINT8, shape=[2, 8, 8, 3], data=pixels[: 2 * 8 * 8 * 3])
assert previews.strip_png(images).startswith(b"\\x89PNG")
assert len(previews.preview_cameras()) == 4
assert "torch" not in sys.modules
"""


def test_the_orchestrator_plans_validates_and_stores_previews_without_torch():
    done = _python(_WITHOUT_TORCH)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


def test_preview_cameras_are_shared_cameras_orbit_views():
    from services.orchestrator.previews import preview_cameras
    from shared import cameras

    expected = [
        cameras.to_proto(cameras.orbit_camera(azimuth, 20.0, 2.2, fovy_deg=45.0, size=128))
        for azimuth in (0.0, 90.0, 180.0, 270.0)
    ]
    assert preview_cameras() == expected


def test_preview_strip_is_the_views_side_by_side():
    import io

    from PIL import Image

    from services.orchestrator.previews import strip_png

    views = np.random.default_rng(0).integers(0, 256, size=(4, 6, 5, 3), dtype=np.uint8)
    message = common_pb2.Tensor(dtype=common_pb2.SCALAR_TYPE_UINT8, shape=list(views.shape), data=views.tobytes())
    strip = np.asarray(Image.open(io.BytesIO(strip_png(message))))
    assert strip.shape == (6, 20, 3)
    for index in range(4):
        np.testing.assert_array_equal(strip[:, index * 5 : (index + 1) * 5], views[index])
