"""User meshes of the analytic prior: their own colours, their up axis, one list shared by every analytic prior of a
guidance config, and the CLI's --guidance-config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from services import cli
from services.guidance.config import GuidanceConfig
from services.guidance.pool import build_analytic
from shared.cameras import Shading, orbit_camera

SIZE = 32


def two_coloured_box(path, height: float = 2.0):
    """A box long along its file's +Z axis: top half red, bottom half blue (vertex colours)."""
    import trimesh

    box = trimesh.creation.box(extents=(1.0, 1.0, height))
    colors = np.where(box.vertices[:, 2:3] > 0, [255, 0, 0, 255], [0, 0, 255, 255]).astype(np.uint8)
    box.visual = trimesh.visual.ColorVisuals(box, vertex_colors=colors)
    box.export(path)
    return path


def config(tmp_path, meshes: list[dict], per_prior: list[dict] | None = None) -> GuidanceConfig:
    return GuidanceConfig.model_validate({
        "analytic": {"meshes": meshes},
        "priors": [
            {"name": "analytic", "kind": "analytic", "resolution": SIZE,
             "analytic": {"meshes": per_prior or []}},
            {"name": "analytic-lowres", "kind": "analytic", "resolution": 16},
        ],
    })


def side_view(prior, name: str) -> torch.Tensor:
    """The object seen from the side, albedo only: (3, R, R) in [0, 1]."""
    camera = orbit_camera(0.0, 0.0, 2.0, fovy_deg=45.0, size=SIZE, shading=Shading.ALBEDO)
    index = prior.object_names.index(name)
    return (prior.render_set([camera], [prior.objects[index]])[0, 0] + 1) / 2


@pytest.mark.parametrize("suffix", ["glb", "ply", "obj"])
def test_color_null_uses_the_files_vertex_colours(tmp_path, suffix):
    path = two_coloured_box(tmp_path / f"box.{suffix}")
    spec = config(tmp_path, [{"name": "flag", "path": str(path), "color": None, "up": "+z"}]).prior("analytic")
    prior = build_analytic(spec, "default")
    image = side_view(prior, "flag")
    top, bottom = image[:, SIZE // 4, SIZE // 2], image[:, 3 * SIZE // 4, SIZE // 2]
    assert top[0] > 0.8 and top[2] < 0.2, top  # red above
    assert bottom[2] > 0.8 and bottom[0] < 0.2, bottom  # blue below
    grey = build_analytic(
        config(tmp_path, [{"name": "flag", "path": str(path), "up": "+z"}]).prior("analytic"), "default"
    )
    assert torch.allclose(side_view(grey, "flag")[:, SIZE // 4, SIZE // 2], torch.full((3,), 0.8, dtype=torch.float64), atol=0.05)


def test_textured_glb_is_sampled_to_vertex_colours(tmp_path):
    import trimesh
    from PIL import Image

    from shared import meshes

    texture = np.concatenate([np.full((8, 16, 3), (255, 0, 0)), np.full((8, 16, 3), (0, 255, 0))]).astype(np.uint8)
    box = trimesh.creation.box()
    box.visual = trimesh.visual.TextureVisuals(
        uv=np.stack([box.vertices[:, 0] + 0.5, box.vertices[:, 2] + 0.5], 1), image=Image.fromarray(texture)
    )
    box.export(tmp_path / "textured.glb")
    colors = meshes.load_mesh(tmp_path / "textured.glb").vertex_colors
    assert colors is not None
    assert {tuple(c) for c in colors.round().int().tolist()} == {(1, 0, 0), (0, 1, 0)}


def test_up_axis_option(tmp_path):
    """A GLB made in a Z-up tool (its long axis is the file's +Z) stands upright only with up: +z."""
    path = two_coloured_box(tmp_path / "tall.glb", height=3.0)
    spec = config(tmp_path, [
        {"name": "lying", "path": str(path)},
        {"name": "standing", "path": str(path), "up": "+z"},
    ]).prior("analytic")
    prior = build_analytic(spec, "default")
    extents = {obj.name: obj.mesh.vertices.amax(0) - obj.mesh.vertices.amin(0) for obj in prior.objects}
    assert extents["standing"][2] > 2 * extents["standing"][1]
    assert extents["lying"][1] > 2 * extents["lying"][2]
    with pytest.raises(ValidationError, match="up"):
        config(tmp_path, [{"name": "x", "path": str(path), "up": "-x"}])


def test_top_level_meshes_are_shared_by_every_analytic_prior(tmp_path):
    path = two_coloured_box(tmp_path / "box.ply")
    cfg = config(tmp_path, [{"name": "flag", "path": str(path), "aliases": ["banner"]}],
                 per_prior=[{"name": "brick", "path": str(path)}])
    assert [m.name for m in cfg.prior("analytic").analytic.meshes] == ["flag", "brick"]
    assert [m.name for m in cfg.prior("analytic-lowres").analytic.meshes] == ["flag"]
    for name in ("analytic", "analytic-lowres"):
        prior = build_analytic(cfg.prior(name), "default")
        assert "flag" in prior.object_names
        prior.validate_prompt("a banner", "prompt")
    again = GuidanceConfig.model_validate(cfg.model_dump(mode="json"))  # re-validating does not duplicate them
    assert [m.name for m in again.prior("analytic").analytic.meshes] == ["flag", "brick"]
    with pytest.raises(ValidationError, match="also listed"):
        config(tmp_path, [{"name": "flag", "path": str(path)}], per_prior=[{"name": "Flag", "path": str(path)}])
    with pytest.raises(ValidationError, match="unique"):
        config(tmp_path, [{"name": "flag", "path": str(path)}, {"name": "flag", "path": str(path)}])
    with pytest.raises(ValidationError, match="color"):
        config(tmp_path, [{"name": "flag", "path": str(path), "color": [2.0, 0.0, 0.0]}])


def test_cli_guidance_config_reaches_the_local_stack(tmp_path):
    path = tmp_path / "guidance.yaml"
    path.write_text("priors: [{name: analytic, kind: analytic}]\n")
    for argv in (["generate", "a torus", "--guidance-config", str(path)], ["serve", "--guidance-config", str(path)]):
        settings = cli.local_stack_settings(cli.parse_args(argv))
        assert settings.guidance_config == path
    default = cli.local_stack_settings(cli.parse_args(["generate", "a torus"]))
    assert default.guidance_config.name == "guidance.yaml" and default.guidance_config != path
    with pytest.raises(SystemExit):
        cli.local_stack_settings(cli.parse_args(["generate", "a torus", "--guidance-config", str(tmp_path / "no")]))
    with pytest.raises(SystemExit):
        cli.parse_args(["generate", "a torus", "--guidance-config", str(path), "--address", "127.0.0.1:1"])
