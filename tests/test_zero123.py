"""The zero123 prior (Zero-1-to-3) on a tiny random model saved in the diffusers layout and loaded back through the
real code path, and the reference image sent once per job and cached by digest (standalone server, real client).

The SDS gradient is checked against a computation done here from the UNet, VAE, CLIP image encoder and
cc_projection loaded independently from the saved directory: compositing on white, the CLIP and VAE inputs, the
unscaled conditioning latent, the pose vector, both CFG branches, the seed's draws, the weighting and the chain rule
through the encoder are all re-done by hand.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from magic3d.v1 import guidance_pb2_grpc

from services.guidance import standalone
from services.guidance.config import GuidanceConfig
from services.guidance.image_cache import ReferenceImageCache
from services.guidance.pool import PriorPool
from services.guidance.priors.base import ViewCondition
from services.guidance.priors.random_init import build_zero123_components, save_random_zero123_prior
from services.guidance.priors.zero123 import Zero123Prior, pose_vector
from services.guidance.sds import compute_sds, conditions_for, validate_request
from shared import guidance_api, tensors
from shared.cameras import orbit_camera
from shared.errors import FailedPrecondition, InvalidArgument, NotFound, field_violations
from shared.grpcio import insecure_channel
from shared.guidance_api import ImageCondition, PriorKind, SdsRequest
from shared.guidance_client import GuidanceClient
from shared.registry import Registry
from shared.tensor_digest import tensor_sha256

RESOLUTION = 64  # the tiny model's working resolution (latent 8x8); Zero123's own is 256
SIDE = 32
REFERENCE = orbit_camera(0.0, 15.0, 2.0, size=SIDE)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_random_zero123_prior(tmp_path_factory.mktemp("zero123") / "z", "tiny", seed=0)


@pytest.fixture(scope="module")
def prior(model_dir) -> Zero123Prior:
    return Zero123Prior.from_pretrained(model_dir, device="cpu", dtype="float32", resolution=RESOLUTION)


@pytest.fixture(scope="module")
def raw(model_dir):
    """The components loaded straight from disk, not through the prior."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPVisionModelWithProjection

    path = str(model_dir)
    weights = load_file(str(model_dir / "cc_projection" / "diffusion_pytorch_model.safetensors"))
    projection = torch.nn.Linear(weights["projection.weight"].shape[1], weights["projection.weight"].shape[0])
    projection.load_state_dict({"weight": weights["projection.weight"], "bias": weights["projection.bias"]})
    return {
        "unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval(),
        "vae": AutoencoderKL.from_pretrained(path, subfolder="vae").eval(),
        "clip": CLIPVisionModelWithProjection.from_pretrained(path, subfolder="image_encoder").eval(),
        "projection": projection.eval(),
        "scheduler": DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
    }


def rgba(seed: int, side: int = 48) -> torch.Tensor:
    """A reference image: random colours, a soft round foreground."""
    generator = torch.Generator().manual_seed(seed)
    colour = torch.rand(1, 3, side, side, generator=generator)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    alpha = (1.5 - 2.0 * (xs**2 + ys**2).sqrt()).clamp(0, 1)[None, None]
    return torch.cat([colour, alpha], dim=1)


def condition(image: torch.Tensor, **kwargs) -> ImageCondition:
    return ImageCondition(reference_camera=REFERENCE, image_sha256=tensor_sha256(tensors.to_proto(image)),
                          image=image, **kwargs)


def views(count: int) -> list:
    return [orbit_camera(35.0 * (i + 1), 25.0 - 10.0 * i, 2.0 + 0.25 * i, size=SIDE) for i in range(count)]


def request(image: torch.Tensor, batch: int = 2, seed: int = 7, **kwargs) -> SdsRequest:
    kwargs.setdefault("cameras", views(batch))
    images = torch.rand(batch, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed + 100))
    return SdsRequest(job_id="z", prior="zero123", images=images, prompt="", seed=seed,
                      image_condition=kwargs.pop("image_condition", condition(image)), **kwargs)


# ----------------------------------------------------------------------------------------------- loading
def test_saved_layout_loads_the_same_weights(model_dir, prior):
    index = json.loads((model_dir / "model_index.json").read_text())
    for sub in ("unet", "vae", "image_encoder", "scheduler", "cc_projection"):
        assert sub in index and (model_dir / sub).is_dir()
    assert not list(model_dir.rglob("*.bin")) and list(model_dir.rglob("*.safetensors"))
    built = build_zero123_components("tiny", seed=0)
    assert built["unet"].config.in_channels == prior.unet.config.in_channels == 8
    for name in ("unet", "vae", "image_encoder", "cc_projection"):
        saved = getattr(prior, name).state_dict()
        for key, value in built[name].state_dict().items():
            torch.testing.assert_close(saved[key], value, msg=f"{name}.{key}")
    info = prior.info
    assert info.kind == PriorKind.VIEW_CONDITIONED and info.default_guidance_scale == 5.0
    assert info.default_time_range == (0.2, 0.6) and guidance_api.Conditioning.IMAGE in info.accepted_conditioning


def test_the_pool_builds_kind_zero123_from_yaml_and_random_sizes(model_dir, tmp_path):
    path = tmp_path / "guidance.yaml"
    path.write_text(f"priors:\n  - {{name: z, kind: zero123, source: {model_dir}, device: cpu, dtype: float32,"
                    " resolution: 64}\n  - {name: zr, kind: zero123, source: 'random:tiny', device: cpu}\n"
                    "  - {name: zbad, kind: zero123, source: 'random:huge', device: cpu}\n"
                    "reference_image_cache_size: 3\n")
    config = GuidanceConfig.load(path)
    assert config.prior("z").kind == PriorKind.VIEW_CONDITIONED and config.reference_image_cache_size == 3
    pool = PriorPool(config)
    assert isinstance(pool.get("z"), Zero123Prior) and pool.get("z").info.name == "z"
    assert isinstance(pool.get("zr"), Zero123Prior)
    with pytest.raises(NotFound) as caught:
        pool.get("zbad")
    assert caught.value.field == "source"
    with pytest.raises(ValueError):
        GuidanceConfig.model_validate({"priors": [{"name": "z", "kind": "zero123"}]})  # no source


# ------------------------------------------------------------------------------------------------- poses
def test_pose_vector_is_delta_polar_sin_cos_azimuth_and_distance():
    assert pose_vector(30.0, 90.0, 0.5) == pytest.approx([-math.pi / 6, 1.0, 0.0, 0.5], abs=1e-7)
    assert pose_vector(-10.0, 180.0, 0.0) == pytest.approx([math.radians(10.0), 0.0, -1.0, 0.0], abs=1e-7)
    assert pose_vector(0.0, 0.0, 0.0) == pytest.approx([0.0, 0.0, 1.0, 0.0])


def test_relative_poses_come_from_cameras_or_the_request():
    image = rgba(1)
    target = orbit_camera(120.0, 5.0, 2.5, size=SIDE)
    (derived,) = conditions_for(request(image, batch=1, cameras=[target]))
    assert derived.relative_pose == pytest.approx((5.0 - 15.0, 120.0, 0.5))
    explicit = request(image, batch=1, cameras=[target], image_condition=condition(image, relative_poses=[(1, 2, 3)]))
    assert conditions_for(explicit)[0].relative_pose == (1, 2, 3)


def test_requests_missing_what_zero123_needs_are_refused_naming_the_field(prior):
    image = rgba(1)
    cases = [
        (SdsRequest(job_id="z", prior="zero123", images=torch.rand(1, 3, SIDE, SIDE), prompt="", cameras=views(1)),
         "image_condition"),
        (request(image, batch=2, cameras=[]), "cameras"),
        (request(image, batch=2, image_condition=condition(image, relative_poses=[(0, 0, 0)])),
         "image_condition.relative_poses"),
        (request(image, batch=1, learned_embeddings=("x",)), "learned_embeddings"),
    ]
    for bad, field in cases:
        with pytest.raises((InvalidArgument, NotFound)) as caught:
            validate_request(bad, prior, 8)
        assert caught.value.field == field
    validate_request(request(image, batch=2, cameras=[], image_condition=condition(image, relative_poses=[(0, 1, 0)] * 2)),
                     prior, 8)


# ---------------------------------------------------------------------------------------------------- SDS
def hand_conditioning(raw, image: torch.Tensor, poses: list[tuple[float, float, float]]):
    """(tokens (B, 1, D), unscaled latents (B, C, h, w)) from the raw modules, as Zero123 prepares them."""
    image = F.interpolate(image, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True)
    rgb = image[:, :3] * image[:, 3:] + (1 - image[:, 3:])
    clip_side = raw["clip"].config.image_size
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).reshape(1, 3, 1, 1)
    clip_in = (F.interpolate(rgb, size=(clip_side, clip_side), mode="bicubic", antialias=True) - mean) / std
    vae_in = rgb * 2 - 1
    with torch.no_grad():
        embedding = raw["clip"](pixel_values=clip_in).image_embeds  # (1, D)
        latent = raw["vae"].encode(vae_in).latent_dist.mode()  # not scaled by the scaling factor
        vectors = torch.tensor([[math.radians(-e), math.sin(math.radians(a)), math.cos(math.radians(a)), d]
                                for e, a, d in poses])
        tokens = raw["projection"](torch.cat([embedding.expand(len(poses), -1), vectors], dim=-1))[:, None]
    return tokens, latent.expand(len(poses), -1, -1, -1)


def test_sds_gradient_matches_an_independent_computation(prior, raw):
    image, seed, scale = rgba(3), 21, 5.0
    sds_request = request(image, batch=2, seed=seed)
    validate_request(sds_request, prior, 8)
    (result,) = compute_sds(prior, [sds_request])

    images = sds_request.images.clone().requires_grad_(True)
    vae = raw["vae"]
    x = F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False) * 2 - 1
    z0 = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    generator = torch.Generator().manual_seed(seed)  # as sds.compute_sds draws: t's uniforms, then the noise
    t = 0.2 + 0.4 * torch.rand(2, generator=generator)
    noise = torch.randn(z0.shape, generator=generator)
    alphas = raw["scheduler"].alphas_cumprod.float()
    steps = (t * alphas.shape[0]).round().long()
    abar = alphas[steps].reshape(-1, 1, 1, 1)
    z_t = abar.sqrt() * z0.detach() + (1 - abar).sqrt() * noise
    poses = [(c.elevation_deg - 15.0, c.azimuth_deg, c.distance - 2.0) for c in sds_request.cameras]
    tokens, latents = hand_conditioning(raw, image, poses)
    with torch.no_grad():
        eps_c = raw["unet"](torch.cat([z_t, latents], 1), steps, encoder_hidden_states=tokens).sample
        eps_u = raw["unet"](torch.cat([z_t, torch.zeros_like(latents)], 1), steps,
                            encoder_hidden_states=torch.zeros_like(tokens)).sample
    grad_z = (1 - abar) * (eps_u + scale * (eps_c - eps_u) - noise)
    (expected,) = torch.autograd.grad(z0, images, grad_outputs=grad_z)

    assert result.t == pytest.approx((steps.float() / alphas.shape[0]).tolist())
    assert all(0.2 - 1e-3 <= value <= 0.6 + 1e-3 for value in result.t)
    top = expected.abs().max().item()
    assert top > 0
    torch.testing.assert_close(result.grad, expected, rtol=1e-4, atol=1e-5 * top)


def test_guidance_unconditional_branch_is_the_zero_image_and_token(prior, raw):
    noisy = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    steps = torch.tensor([300, 500])

    def predict(image):
        return prior.predict_noise(noisy, steps, conditions_for(request(image, batch=2)))

    cond_a, uncond_a = predict(rgba(4))
    cond_b, uncond_b = predict(rgba(5))
    torch.testing.assert_close(uncond_a, uncond_b)  # the unconditional branch never sees the image
    assert not torch.allclose(cond_a, cond_b)
    with torch.no_grad():
        zeros = torch.zeros(2, 4, 8, 8)
        hand = raw["unet"](torch.cat([noisy, zeros], 1), steps, encoder_hidden_states=torch.zeros(2, 1, 32)).sample
    torch.testing.assert_close(uncond_a, hand, rtol=1e-4, atol=1e-5)
    # Scale 1 is the conditional model alone.
    image = rgba(4)
    one = compute_sds(prior, [request(image, batch=2, seed=3, guidance_scale=1.0)])[0]
    five = compute_sds(prior, [request(image, batch=2, seed=3)])[0]
    assert not torch.allclose(one.grad, five.grad)


def test_the_reference_is_embedded_once_per_digest(prior):
    image = rgba(6)
    before = prior.reference_cache.misses
    compute_sds(prior, [request(image, seed=1), request(image, seed=2)])
    compute_sds(prior, [request(image, seed=3)])
    assert prior.reference_cache.misses == before + 1


def test_encode_accepts_view_conditions_and_is_differentiable(prior):
    pixels = torch.rand(1, 3, SIDE, SIDE, requires_grad=True)
    encoded = prior.encode(pixels, [ViewCondition(prompt="", negative_prompt="")])
    assert encoded.shape == (1, 4, RESOLUTION // 8, RESOLUTION // 8)
    encoded.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------- reference images
def test_reference_image_cache_bounds_and_digest_check():
    images = [rgba(i, side=16) for i in range(4)]
    digests = [tensor_sha256(tensors.to_proto(image)) for image in images]
    size = images[0].numel() * 4
    cache = ReferenceImageCache(max_images=3, max_bytes=10 * size)
    for digest, image in zip(digests, images):
        cache.put(digest, image)
    assert len(cache) == 3 and cache.get(digests[0]) is None and cache.get(digests[3]) is not None
    by_bytes = ReferenceImageCache(max_images=10, max_bytes=2 * size)
    for digest, image in zip(digests, images):
        by_bytes.put(digest, image)
    assert len(by_bytes) == 2 and by_bytes.bytes == 2 * size
    with pytest.raises(InvalidArgument) as caught:
        cache.put(digests[1], images[2])
    assert caught.value.field == "image_condition.image_sha256"
    missing = request(images[0], image_condition=ImageCondition(reference_camera=REFERENCE, image_sha256=digests[0]))
    with pytest.raises(FailedPrecondition) as caught:
        cache.resolve(missing)
    assert caught.value.field == "image_condition.image"
    torch.testing.assert_close(by_bytes.resolve(
        request(images[3], image_condition=ImageCondition(reference_camera=REFERENCE, image_sha256=digests[3]))
    ).image_condition.image, images[3])


@pytest.fixture(scope="module")
def server(model_dir):
    config = GuidanceConfig.model_validate({
        "priors": [{"name": "zero123", "kind": "zero123", "source": str(model_dir), "device": "cpu",
                    "dtype": "float32", "resolution": RESOLUTION}],
        "port": 0, "batching": {"wait_s": 0}, "reference_image_cache_size": 1,
    })
    running = standalone.start(config)
    yield running
    running.stop(grace=None)


class RecordingClient(GuidanceClient):
    """The real client, noting for each ComputeSds message whether it carried the image bytes."""

    def __init__(self, address: str) -> None:
        super().__init__(Registry.model_validate({
            "client": {"timeout_s": 20, "outage_window_s": 1},
            "priors": {"zero123": {"kind": "standalone", "address": address}},
        }))
        self.sent: list[bool] = []

    def _call(self, endpoint, method, message, timeout_s, outage_window_s):
        if method == "ComputeSds":
            self.sent.append(message.image_condition.HasField("image"))
        return super()._call(endpoint, method, message, timeout_s, outage_window_s)


def test_the_client_sends_the_image_once_and_resends_it_when_the_server_lost_it(server):
    image_a, image_b = rgba(7), rgba(8)
    first, other = RecordingClient(server.address), RecordingClient(server.address)
    try:
        with_image = first.compute_sds(request(image_a, seed=4))
        digest_only = first.compute_sds(request(image_a, seed=4))
        assert first.sent == [True, False]
        torch.testing.assert_close(digest_only.grad, with_image.grad)  # the cached image was used
        other.compute_sds(request(image_b, seed=4))  # the server holds one image: image_a is evicted
        again = first.compute_sds(request(image_a, seed=4))
        assert first.sent == [True, False, False, True]  # refused as not held, then resent once
        torch.testing.assert_close(again.grad, with_image.grad)
    finally:
        first.close()
        other.close()


def test_the_server_refuses_an_unknown_digest_and_a_wrong_one(server):
    channel = insecure_channel(server.address)
    stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
    try:
        image = rgba(9)
        unknown = guidance_api.sds_request_to_proto(request(image), with_image=False)
        wrong = guidance_api.sds_request_to_proto(request(image))
        wrong.image_condition.image_sha256 = "0" * 64
        for message, code, field in ((unknown, "FAILED_PRECONDITION", "image_condition.image"),
                                     (wrong, "INVALID_ARGUMENT", "image_condition.image_sha256")):
            with pytest.raises(Exception) as caught:
                stub.ComputeSds(message, timeout=20)
            assert caught.value.code().name == code
            assert field in field_violations(caught.value)
    finally:
        channel.close()
