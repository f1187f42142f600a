"""Image-to-3D input (Magic123): shared/image_input.py's decoding, limits, matting and recentring; the orchestrator's
planning of an image job (the ReferenceView and prior terms in each StageConfig, provenance and stored inputs); the
image presets; the CLI's --image. No scene or guidance server: everything here is torch-free except the camera check."""

from __future__ import annotations

import json

import numpy as np
import pytest
from magic3d.v1 import orchestrator_pb2, scene_pb2

from services import cli
from services.orchestrator.admission import Admission
from services.orchestrator.jobs import JobRecord
from services.orchestrator.presets import PresetBook
from services.orchestrator.provenance import provenance_record, write_inputs
from shared import artifact_keys
from shared.errors import InvalidArgument
from shared.image_input import (
    ImageLimits,
    array_to_proto,
    encode_png,
    prepare_image,
    recenter,
    reference_camera,
)
from shared.stage_limits import SceneLimits
from shared.tensor_digest import tensor_sha256

PRESETS = "deploy/config/presets.yaml"


def scene(height=60, width=80, box=(10, 40, 20, 50), color=(200, 30, 30), background=(250, 250, 250)):
    """RGB uint8: a plain background with a filled rectangle rows box[0]:box[1], cols box[2]:box[3]."""
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:] = background
    top, bottom, left, right = box
    pixels[top:bottom, left:right] = color
    return pixels


def image_input(pixels, **fields) -> orchestrator_pb2.ImageInput:
    message = orchestrator_pb2.ImageInput(**fields)
    message.image.CopyFrom(array_to_proto(pixels))
    return message


def bbox(alpha: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(alpha > 127)
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


# -- shared/image_input.py -----------------------------------------------------------------------------------------


def test_rgb_on_a_plain_background_is_matted_recentred_and_resized():
    pixels = scene()
    pixels[20:24, 30:34] = (250, 250, 250)  # a hole inside the object: filled
    pixels[55:57, 2:4] = (10, 10, 10)  # a speck on the background: not the largest component
    noisy = np.clip(pixels.astype(int) + np.random.default_rng(0).integers(-6, 7, pixels.shape), 0, 255).astype(np.uint8)
    prepared = prepare_image(image_input(noisy), size=64)
    assert prepared.rgba.shape == (64, 64, 4) and prepared.rgba.dtype == np.uint8 and prepared.matte == "threshold"
    top, bottom, left, right = bbox(prepared.rgba[..., 3])
    # The 30x30 square's bbox becomes 0.8 * 64 = 51 pixels a side, centred.
    assert abs((bottom - top) - 51) <= 1 and abs((right - left) - 51) <= 1
    assert abs((top + bottom) / 2 - 32) <= 1 and abs((left + right) / 2 - 32) <= 1
    inside = prepared.rgba[top + 5:bottom - 5, left + 5:right - 5]
    assert (inside[..., 3] == 255).all()  # the hole was filled
    assert np.abs(np.median(inside[..., :3].reshape(-1, 3), axis=0) - (200, 30, 30)).max() <= 8
    assert (prepared.rgba[:4, :, 3] == 0).all()  # a transparent border


def test_alpha_wins_and_a_wide_object_gets_the_stated_fraction_of_its_longer_side():
    rgba = np.zeros((50, 100, 4), np.uint8)
    rgba[20:30, 10:90] = (0, 0, 255, 255)  # 80 wide, 10 tall
    prepared = prepare_image(image_input(rgba), size=100, fraction=0.5)
    assert prepared.matte == "alpha"
    top, bottom, left, right = bbox(prepared.rgba[..., 3])
    assert abs((right - left) - 50) <= 1 and abs((bottom - top) - 6) <= 1  # aspect kept
    assert abs((left + right) / 2 - 50) <= 1 and abs((top + bottom) / 2 - 50) <= 1


def test_recenter_moves_an_off_centre_object_to_the_centre():
    alpha = np.zeros((40, 40), np.float32)
    alpha[0:10, 25:40] = 1.0  # in a corner
    rgba, _ = recenter(np.full((40, 40, 3), 128, np.uint8), alpha, None, size=40)
    top, bottom, left, right = bbox(rgba[..., 3])
    assert abs((right - left) - 32) <= 1 and abs((top + bottom) / 2 - 20) <= 1 and abs((left + right) / 2 - 20) <= 1


def test_depth_is_cropped_scaled_and_pasted_like_the_image():
    pixels = scene()
    depth = np.zeros((60, 80), np.float32)
    depth[10:40, 20:50] = np.linspace(1.0, 2.0, 30, dtype=np.float32)[None, :]  # a ramp left to right on the object
    message = image_input(pixels)
    message.depth.CopyFrom(array_to_proto(depth))
    prepared = prepare_image(message, size=64)
    assert prepared.depth.shape == (64, 64) and prepared.depth.dtype == np.float32
    assert (prepared.depth[prepared.rgba[..., 3] == 0] == 0).all()
    top, bottom, left, right = bbox(prepared.rgba[..., 3])
    row = prepared.depth[(top + bottom) // 2, left + 1:right - 1]
    assert np.all(np.diff(row) >= -1e-6) and row[0] < 1.1 and row[-1] > 1.9  # the ramp, where the object is
    bad = image_input(pixels)
    bad.depth.CopyFrom(array_to_proto(np.zeros((61, 80), np.float32)))
    with pytest.raises(InvalidArgument) as caught:
        prepare_image(bad, size=64)
    assert caught.value.field == "spec.image.depth.shape"


def test_png_bytes_with_alpha_and_jpeg_bytes_decode():
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[5:35, 10:30] = (10, 200, 10, 255)
    from_png = prepare_image(orchestrator_pb2.ImageInput(encoded=encode_png(rgba)), size=32)
    from_tensor = prepare_image(image_input(rgba), size=32)
    assert from_png.matte == "alpha" and np.array_equal(from_png.rgba, from_tensor.rgba)
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(scene()).save(buffer, format="JPEG", quality=90)
    from_jpeg = prepare_image(orchestrator_pb2.ImageInput(encoded=buffer.getvalue()), size=32)
    assert from_jpeg.matte == "threshold" and from_jpeg.source_shape == (60, 80, 3)


@pytest.mark.parametrize(
    ("pixels", "field", "words"),
    [
        (np.full((40, 40, 3), 200, np.uint8), "spec.image.image", "no foreground"),
        (np.zeros((40, 40, 4), np.uint8), "spec.image.image", "no foreground"),
        (np.dstack([np.zeros((40, 40, 3), np.uint8), np.full((40, 40), 254, np.uint8)]), "spec.image.image", "whole frame"),
        (np.zeros((5000, 20, 3), np.uint8), "spec.image.image.shape", "4096"),
        (np.zeros((8, 8, 3), np.uint8), "spec.image.image.shape", "16"),
    ],
)
def test_odd_images_are_refused_naming_the_field(pixels, field, words):
    with pytest.raises(InvalidArgument) as caught:
        prepare_image(image_input(pixels), size=32)
    assert caught.value.field == field and words in caught.value.message


def test_huge_png_is_refused_before_decoding_and_a_big_one_is_resized():
    huge = encode_png(np.zeros((16, 4100, 3), np.uint8))
    with pytest.raises(InvalidArgument) as caught:
        prepare_image(orchestrator_pb2.ImageInput(encoded=huge), size=32)
    assert caught.value.field == "spec.image.encoded" and "ImageLimits.max_side" in caught.value.message
    big = scene(height=1200, width=1600, box=(300, 900, 400, 1000))
    prepared = prepare_image(image_input(big), size=64, limits=ImageLimits(work_side=400))
    assert prepared.source_shape == (300, 400, 3)  # matted at the work size
    top, bottom, left, right = bbox(prepared.rgba[..., 3])
    assert abs((bottom - top) - 51) <= 1


def test_unknown_segmenter_and_both_inputs_are_refused():
    with pytest.raises(InvalidArgument) as caught:
        prepare_image(image_input(scene(), segmenter="rembg"), size=32)
    assert caught.value.field == "spec.image.segmenter"
    both = image_input(scene(), encoded=b"x")
    with pytest.raises(InvalidArgument) as caught:
        prepare_image(both, size=32)
    assert caught.value.field == "spec.image.encoded"


def test_reference_camera_matches_shared_cameras():
    from shared import cameras

    message = reference_camera(20.0, 1.8, 40.0, 64)
    torch_camera = cameras.orbit_camera(0.0, 20.0, 1.8, fovy_deg=40.0, size=64)
    expected = torch_camera.camera_to_world.reshape(-1).tolist()
    assert np.allclose(list(message.pose.camera_to_world), expected, atol=1e-6)
    parsed = cameras.from_proto(message)
    assert (parsed.width, parsed.height, parsed.fovy_deg) == (64, 64, pytest.approx(40.0))


# -- orchestrator: presets and planning ----------------------------------------------------------------------------


class _Replicas:
    def limits(self) -> SceneLimits:
        return SceneLimits()


class _Priors:
    """CheckPrompt as the analytic prior answers it: an empty prompt is refused on `prompt` (the prior exists)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def check_prompt(self, prior, prompt, negative_prompt="", checkpoint_id="", timeout_s=None):
        self.calls.append((prior, prompt))
        if not prompt:
            raise InvalidArgument("must not be empty", "prompt")


@pytest.fixture(scope="module")
def book() -> PresetBook:
    return PresetBook.load(PRESETS)


def admission(book, priors=None) -> Admission:
    return Admission(None, _Replicas(), book, priors, None, 4, lambda: None)


def image_spec(prompt: str = "", preset: str = "", **fields) -> orchestrator_pb2.JobSpec:
    spec = orchestrator_pb2.JobSpec(preset=preset, seed=3)
    spec.image.CopyFrom(image_input(scene(), prompt=prompt, **fields))
    return spec


def test_presets_load_with_the_image_presets(book):
    assert book.default_image == "image-cpu-demo"
    magic123 = book.get("magic123")
    assert magic123.image is not None and [s.reference.resolution for s in magic123.stages] == [128, 512]
    coarse = magic123.stages[0].stage_config()
    terms = {t.prior: t for t in coarse.priors}
    assert terms["latent"].input == scene_pb2.PRIOR_INPUT_TEXT and terms["latent"].guidance_scale == 100
    assert terms["zero123"].input == scene_pb2.PRIOR_INPUT_IMAGE and terms["zero123"].weight == 40
    assert list(terms["zero123"].t_min.values) == [pytest.approx(0.2)] and list(terms["zero123"].t_max.values) == [pytest.approx(0.6)]
    assert coarse.loss_weights["ref_rgb"].values[0] == 10000 and coarse.loss_weights["ref_mask"].values[0] == 1000
    fine = magic123.stages[1].stage_config()
    assert {t.prior: round(t.weight, 4) for t in fine.priors} == {"latent": 0.001, "zero123": 0.01}
    assert fine.reference.every_steps > 0 and fine.reference.mask_erode_px > 0
    with pytest.raises(ValueError, match="reference"):  # a text preset with a reference block
        PresetBook.model_validate({"default": "a", "presets": {"a": {"stages": [
            {"stage": "coarse", "steps": 1, "reference": {"resolution": 32}}]}}})
    with pytest.raises(ValueError, match="input"):  # an image preset whose prior does not state its input
        PresetBook.model_validate({"default": "a", "presets": {"a": {"image": {}, "stages": [
            {"stage": "coarse", "steps": 1, "reference": {"resolution": 32}, "config": {"priors": [{"prior": "x"}]}}]}}})


def test_an_image_job_without_a_prompt_plans_reference_views_and_image_priors_only(book):
    priors = _Priors()
    plan = admission(book, priors).validate(image_spec())
    assert plan.preset == "image-cpu-demo"
    for stage, side in zip(plan.stages, (32, 64)):
        config = stage.config
        assert config.prompt == "" and config.seed == 3
        assert [(t.prior, t.input) for t in config.priors] == [(config.priors[0].prior, scene_pb2.PRIOR_INPUT_IMAGE)]
        reference = config.reference
        assert list(reference.image.shape) == [side, side, 4] and reference.image.dtype == 4  # uint8
        pose = reference.camera.pose
        assert (pose.azimuth_deg, pose.elevation_deg, pose.distance) == (0.0, 20.0, pytest.approx(1.8))
        assert (reference.camera.intrinsics.width, reference.camera.intrinsics.fovy_deg) == (side, 40.0)
        assert not reference.HasField("depth")
    assert plan.stages[1].config.reference.every_steps == 1 and plan.stages[1].config.reference.mask_erode_px == 0
    assert all(prompt == "" for _, prompt in priors.calls)  # image priors: only checked to exist


def test_an_image_job_with_a_prompt_keeps_the_text_prior_and_the_request_camera(book):
    priors = _Priors()
    spec = image_spec("a red torus", preset="magic123", elevation_deg=10.0, distance=2.5, fovy_deg=30.0,
                      learned_embeddings=["<cat>"])
    depth = np.ones((60, 80), np.float32)
    spec.image.depth.CopyFrom(array_to_proto(depth))
    plan = admission(book, priors).validate(spec)
    coarse = plan.stage("coarse").config
    assert coarse.prompt == "a red torus"
    assert [t.input for t in coarse.priors] == [scene_pb2.PRIOR_INPUT_TEXT, scene_pb2.PRIOR_INPUT_IMAGE]
    assert list(coarse.priors[0].learned_embeddings) == ["<cat>"] and not coarse.priors[1].learned_embeddings
    pose = coarse.reference.camera.pose
    assert (pose.elevation_deg, pose.distance) == (10.0, 2.5) and coarse.reference.camera.intrinsics.fovy_deg == 30.0
    assert list(coarse.reference.depth.shape) == [128, 128]
    assert ("latent", "a red torus") in priors.calls and ("zero123", "") in priors.calls


def test_image_job_refusals_name_the_field(book):
    cases = [
        (image_spec(distance=9.0), "spec.image.distance"),
        (image_spec(elevation_deg=-91.0), "spec.image.elevation_deg"),
        (image_spec(fovy_deg=0.0), "spec.image.fovy_deg"),
        (image_spec(preset="cpu-demo"), "spec.preset"),
    ]
    text = orchestrator_pb2.JobSpec(preset="magic123")
    text.text.prompt = "a red torus"
    cases.append((text, "spec.preset"))
    only_text = image_spec()
    override = only_text.overrides.add()
    override.config.stage = scene_pb2.STAGE_COARSE
    override.config.priors.add(prior="analytic-lowres", input=scene_pb2.PRIOR_INPUT_TEXT)
    cases.append((only_text, "spec.image.prompt"))
    unstated = image_spec()
    override = unstated.overrides.add()
    override.config.stage = scene_pb2.STAGE_COARSE
    override.config.priors.add(prior="analytic-lowres")
    cases.append((unstated, "spec.overrides[0].config.priors[0].input"))
    for spec, field in cases:
        with pytest.raises(InvalidArgument) as caught:
            admission(book).validate(spec)
        assert caught.value.field == field, (field, caught.value.message)


def test_provenance_and_stored_inputs_of_an_image_job(book, tmp_path):
    from shared.store import open_store

    spec = image_spec()
    plan = admission(book).plan(spec)
    record = _record(tmp_path, spec)
    document = provenance_record(record, spec, plan, "test")
    assert document["input"] == "image" and document["image"]["sha256"] == tensor_sha256(spec.image.image)
    assert document["image"]["reference_sha256"]["coarse"] == tensor_sha256(plan.stages[0].config.reference.image)
    text = json.dumps(document)
    assert len(text) < 20_000  # the plan names the reference tensors by digest, not by their bytes
    store = open_store(str(tmp_path / "store"))
    uris = write_inputs(store, record.job_id, spec, plan)
    assert set(uris) == {artifact_keys.INPUT_IMAGE, artifact_keys.REFERENCE_IMAGE}
    from PIL import Image

    import io

    key = artifact_keys.input_key(record.job_id, artifact_keys.REFERENCE_IMAGE)
    reference = np.asarray(Image.open(io.BytesIO(store.get(key))))
    assert reference.shape == (32, 32, 4)


def _record(tmp_path, spec) -> JobRecord:
    from services.orchestrator.jobs import JobStore

    with JobStore(tmp_path / "jobs.db") as jobs:
        record, _ = jobs.create(spec.SerializeToString())
    return record


def test_job_listing_leaves_the_pixels_out_but_shows_an_image_job(tmp_path):
    from services.orchestrator.servicer import job_to_proto

    spec = image_spec("a red torus")
    record = _record(tmp_path, spec)
    brief = job_to_proto(record, brief=True)
    assert brief.spec.WhichOneof("input") == "image" and brief.spec.image.prompt == "a red torus"
    assert not brief.spec.image.image.data and list(brief.spec.image.image.shape) == [60, 80, 3]
    assert job_to_proto(record).spec.image.image.data == spec.image.image.data
    assert "\timage\t" in cli.describe(brief)


# -- CLI -----------------------------------------------------------------------------------------------------------


def test_cli_generate_with_an_image(tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(encode_png(scene()))
    np.save(tmp_path / "depth.npy", np.ones((60, 80), np.float32))
    args = cli.parse_args(["generate", "--image", str(photo), "--elevation", "0", "--distance", "2",
                           "--depth", str(tmp_path / "depth.npy"), "--preset", "magic123"])
    spec = cli.build_spec(args)
    assert spec.WhichOneof("input") == "image" and spec.image.encoded == photo.read_bytes()
    assert spec.image.prompt == "" and spec.image.HasField("elevation_deg") and spec.image.elevation_deg == 0.0
    assert spec.image.distance == 2.0 and not spec.image.HasField("fovy_deg")
    assert list(spec.image.depth.shape) == [60, 80]
    with_prompt = cli.build_spec(cli.parse_args(["generate", "a red torus", "--image", str(photo)]))
    assert with_prompt.image.prompt == "a red torus"
    text = cli.build_spec(cli.parse_args(["generate", "a red torus"]))
    assert text.WhichOneof("input") == "text"
    for argv in (["generate"], ["generate", "x", "--elevation", "5"], ["generate", "--image", "a.png", "--mesh", "m.glb"]):
        with pytest.raises(SystemExit):
            cli.parse_args(argv)
