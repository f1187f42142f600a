"""The scene's reference view (Magic123): proto -> config validation, the reference losses, the Pearson depth
loss, mask erosion, the soft silhouette, the optional prompt, and the reference surviving a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from magic3d.v1 import scene_pb2

from services.scene import checkpoint as checkpoint_io
from services.scene.coarse import CoarseStage
from services.scene.config import CoarseConfig, DMTetConfig, FineConfig, PriorTerm
from services.scene.fine import FineStage
from services.scene.field import FieldConfig, HashGridConfig, OccupancyConfig, RendererConfig
from services.scene.mesh.silhouette import soft_silhouette
from services.scene.messages import coarse_config_from_proto, reference_from_proto
from services.scene.reference import ReferenceTarget, erode, pearson_depth_loss
from services.scene.server import own_prompt
from shared.errors import InvalidArgument
from shared.image_input import array_to_proto
from shared.meshes import torus
from shared.schedules import Schedule
from shared.stage_limits import SceneLimits, check_stage_config
from tests.reference_images import analytic_object, reference_view, render_rgba
from tests.scenes import analytic_guidance

SIZE = 16


@pytest.fixture(scope="module")
def torus_rgba() -> np.ndarray:
    return render_rgba(analytic_object(), 20.0, 1.8, 40.0, SIZE)


@pytest.fixture(scope="module")
def guidance():
    engine = analytic_guidance(16)
    yield engine
    engine.close()


def tiny_config(reference, **overrides) -> CoarseConfig:
    fields = dict(
        prompt="",
        resolution=16,
        batch_size=1,
        priors=(PriorTerm(prior="analytic", input="image"),),
        field=FieldConfig(encoding=HashGridConfig(n_levels=4, log2_hashmap_size=12, base_resolution=8,
                                                  per_level_scale=1.5), backend="torch", hidden_width=16),
        renderer=RendererConfig(num_samples_per_ray=16),
        occupancy=OccupancyConfig(resolution=8, step_size=2.0 / 16, update_every=2, warmup_steps=2),
        # The reference losses alone (no SDS, no regularisers): what they do, not what the prior does.
        loss_weights={"sds": Schedule.constant(0.0), "ref_rgb": Schedule.constant(1.0),
                      "ref_mask": Schedule.constant(1.0), "orientation": Schedule.constant(0.0),
                      "sparsity": Schedule.constant(0.0)},
        learning_rate=0.03,
        reference=reference,
        seed=3,
    )
    fields.update(overrides)
    return CoarseConfig(**fields)


def stage_message(reference: scene_pb2.ReferenceView) -> scene_pb2.StageConfig:
    return scene_pb2.StageConfig(stage=scene_pb2.STAGE_COARSE, reference=reference)


def refusal(call) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        call()
    return caught.value


# -- validation ------------------------------------------------------------------------------------------------


def test_a_valid_reference_view_parses_with_its_pixels_and_camera(torus_rgba):
    config = reference_from_proto(reference_view(torus_rgba, every_steps=3, mask_erode_px=1))
    assert config.resolution == SIZE and config.every_steps == 3 and config.mask_erode_px == 1
    assert np.array_equal(config.rgba(), torus_rgba)
    assert config.camera.elevation_deg == pytest.approx(20.0) and config.camera.fovy_deg == pytest.approx(40.0)
    parsed = coarse_config_from_proto(stage_message(reference_view(torus_rgba)), CoarseConfig(prompt="unset"))
    assert parsed.reference is not None and parsed.reference.image == torus_rgba.tobytes()


@pytest.mark.parametrize("mutate, field", [
    (lambda m: m.image.CopyFrom(array_to_proto(np.zeros((16, 20, 4), np.uint8))), "config.reference.image.shape"),
    (lambda m: m.image.CopyFrom(array_to_proto(np.zeros((16, 16, 3), np.uint8))), "config.reference.image.shape"),
    (lambda m: m.image.CopyFrom(array_to_proto(np.zeros((8, 8, 4), np.uint8))), "config.reference.image.shape"),
    (lambda m: m.image.CopyFrom(array_to_proto(np.zeros((16, 16, 4), np.float32))), "config.reference.image.dtype"),
    (lambda m: m.depth.CopyFrom(array_to_proto(np.zeros((8, 8), np.float32))), "config.reference.depth"),
    (lambda m: m.ClearField("image"), "config.reference.image"),
    (lambda m: m.ClearField("camera"), "config.reference.camera"),
    (lambda m: setattr(m, "mask_erode_px", -1), "config.reference.mask_erode_px"),
])
def test_bad_reference_views_are_refused_naming_the_field(torus_rgba, mutate, field):
    message = reference_view(torus_rgba)
    mutate(message)
    error = refusal(lambda: reference_from_proto(message))
    assert error.field.startswith(field), (error.field, error.message)


def test_the_edge_check_applies_the_resolution_limit(torus_rgba):
    message = stage_message(reference_view(torus_rgba))
    check_stage_config(message, SceneLimits())
    error = refusal(lambda: check_stage_config(message, SceneLimits(max_resolution=15)))
    assert error.field == "config.reference.image.shape" and "max_resolution" in error.message
    message.reference.depth.CopyFrom(array_to_proto(np.zeros((4, 4), np.float32)))
    assert refusal(lambda: check_stage_config(message, SceneLimits())).field == "config.reference.depth.shape"


def test_a_prompt_is_optional_only_for_image_only_stages(torus_rgba):
    reference = reference_from_proto(reference_view(torus_rgba))
    assert CoarseConfig(priors=(PriorTerm(prior="zero123", input="image"),)).prompt == ""
    assert tiny_config(reference).prompt == ""
    with pytest.raises(ValueError, match="prompt is required"):
        CoarseConfig(priors=(PriorTerm(prior="analytic", input="text"),))
    text_only = scene_pb2.StageConfig(stage=scene_pb2.STAGE_COARSE, priors=[scene_pb2.PriorTerm(prior="analytic")])
    error = refusal(lambda: own_prompt(coarse_config_from_proto(text_only, CoarseConfig(prompt="unset")), text_only))
    assert error.field == "config.prompt"
    with_image = stage_message(reference_view(torus_rgba))
    assert own_prompt(coarse_config_from_proto(with_image, CoarseConfig(prompt="unset")), with_image).prompt == ""
    image_prior = scene_pb2.StageConfig(stage=scene_pb2.STAGE_COARSE, priors=[
        scene_pb2.PriorTerm(prior="zero123", input=scene_pb2.PRIOR_INPUT_IMAGE)])
    error = refusal(lambda: own_prompt(coarse_config_from_proto(image_prior, CoarseConfig(prompt="unset")), image_prior))
    assert error.field == "config.priors[0].input"  # an image prior with no image to give it


def test_prior_terms_carry_their_t_range_and_input():
    message = scene_pb2.StageConfig(stage=scene_pb2.STAGE_COARSE, prompt="a red torus", priors=[scene_pb2.PriorTerm(
        prior="analytic", input=scene_pb2.PRIOR_INPUT_TEXT, learned_embeddings=["<cat>"],
        t_min=scene_pb2.Schedule(steps=[0], values=[0.2]), t_max=scene_pb2.Schedule(steps=[0], values=[0.6]))])
    term = coarse_config_from_proto(message, CoarseConfig(prompt="unset")).priors[0]
    assert (term.input, term.learned_embeddings) == ("text", ("<cat>",))
    assert (term.t_min(0), term.t_max(0)) == (pytest.approx(0.2), pytest.approx(0.6))
    message.priors[0].t_min.values[0] = 0.7
    assert refusal(lambda: check_stage_config(message, SceneLimits())).field.startswith("config.priors[0].t_")


# -- losses ----------------------------------------------------------------------------------------------------


def test_pearson_depth_loss_matches_numpy():
    generator = torch.Generator().manual_seed(0)
    predicted = torch.rand(1, 1, 12, 12, generator=generator)
    target = 3.0 * predicted + 0.5 * torch.rand(1, 1, 12, 12, generator=generator) - 2.0
    mask = (torch.rand(1, 1, 12, 12, generator=generator) > 0.3).float()
    selected = mask.numpy() > 0.5
    expected = 1.0 - np.corrcoef(predicted.numpy()[selected], target.numpy()[selected])[0, 1]
    assert float(pearson_depth_loss(predicted, target, mask)) == pytest.approx(expected, abs=1e-5)
    assert float(pearson_depth_loss(predicted, 5.0 * predicted + 1.0, mask)) == pytest.approx(0.0, abs=1e-5)


def test_erosion_shrinks_the_mask_by_the_given_pixels():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 3:13, 4:12] = 1.0  # 10 x 8
    eroded = erode(mask, 2)
    assert eroded.sum() == 6 * 4 and eroded[..., 5:11, 6:10].min() == 1.0
    assert torch.equal(erode(mask, 0), mask)
    assert erode(torch.ones(1, 1, 8, 8), 1).sum() == 6 * 6  # the frame's edge counts as background


def test_soft_silhouette_follows_the_rasterised_mask_and_moves_the_vertices(torus_rgba):
    obj = analytic_object()
    target = ReferenceTarget.from_config(reference_from_proto(reference_view(render_rgba(obj, 20.0, 1.8, 40.0, 32))),
                                         torch.device("cpu"))
    vertices = obj.mesh.vertices.clone().float().requires_grad_(True)
    soft = soft_silhouette(vertices, obj.mesh.faces, [target.camera], 32)
    hard = target.image[:, 3:] > 0.5
    iou = ((soft > 0.5) & hard).sum() / ((soft > 0.5) | hard).sum()
    assert iou > 0.9
    (soft.sum()).backward()
    assert vertices.grad.abs().sum() > 0  # growing the silhouette moves vertices outwards


def test_reference_losses_decrease_in_a_few_steps(torus_rgba, guidance):
    reference = reference_from_proto(reference_view(torus_rgba))
    stage = CoarseStage(tiny_config(reference), guidance, "ref-losses")
    reports = [stage.step() for _ in range(15)]
    first, last = reports[0].losses, reports[-1].losses
    assert {"ref_rgb", "ref_mask"} <= set(first) and "ref_depth" not in first  # depth weight 0 by default
    assert last["ref_rgb"] < 0.5 * first["ref_rgb"], (first, last)
    assert last["ref_mask"] < 0.5 * first["ref_mask"], (first, last)


def test_the_reference_view_renders_every_k_steps(torus_rgba, guidance):
    reference = reference_from_proto(reference_view(torus_rgba, every_steps=3))
    stage = CoarseStage(tiny_config(reference), guidance, "ref-every")
    rendered = ["ref_rgb" in stage.step().losses for _ in range(6)]
    assert rendered == [True, False, False, True, False, False]


def test_a_checkpoint_keeps_the_reference(torus_rgba, guidance):
    depth = np.linspace(1.0, 2.0, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    reference = reference_from_proto(reference_view(torus_rgba, depth=depth, mask_erode_px=1))
    stage = CoarseStage(tiny_config(reference), guidance, "ref-ckpt")
    stage.step()
    restored = CoarseStage.from_checkpoint(checkpoint_io.loads(checkpoint_io.dumps(stage.to_checkpoint())),
                                           guidance, "ref-ckpt")
    assert restored.config.reference == reference
    assert torch.equal(restored.reference.image, stage.reference.image)
    assert torch.equal(restored.reference.mask, stage.reference.mask)
    assert np.array_equal(restored.reference.depth.numpy()[0, 0], depth)
    assert restored.reference.condition.image_sha256 == stage.reference.condition.image_sha256
    assert restored.step().losses.keys() == stage.step().losses.keys()


def test_the_fine_stage_moves_its_surface_toward_the_reference_silhouette(guidance):
    obj = analytic_object()
    rgba = render_rgba(obj, 20.0, 1.8, 40.0, 32)
    reference = reference_from_proto(reference_view(rgba, every_steps=1, mask_erode_px=1))
    config = FineConfig(
        prompt="", resolution=32, batch_size=1, priors=(PriorTerm(prior="analytic", input="image"),),
        dmtet=DMTetConfig(grid_cells=16), reference=reference, rasterizer="torch",
        loss_weights={"sds": Schedule.constant(0.0), "normal_consistency": Schedule.constant(0.0),
                      "ref_rgb": Schedule.constant(1.0), "ref_mask": Schedule.constant(1.0)},
    )
    ring = torus(0.45, 0.3)  # a fat ring: its silhouette differs from the target's
    stage, _ = FineStage.from_mesh(ring.vertices, ring.faces, config, guidance, "ref-fine")
    before = stage.geometry.sdf.detach().clone()
    reports = [stage.step() for _ in range(4)]
    assert all({"ref_rgb", "ref_mask"} <= set(r.losses) for r in reports)
    assert not torch.equal(stage.geometry.sdf.detach(), before)  # only the reference losses move the SDF here
    assert reports[-1].losses["ref_mask"] < reports[0].losses["ref_mask"], [r.losses["ref_mask"] for r in reports]
