"""The analytic prior: exact posterior, prompt matching, and SDS that steers images to the named object."""

from __future__ import annotations

import pytest
import torch

from services.guidance import sds
from services.guidance.priors.analytic import (
    AnalyticPrior,
    ReferenceObject,
    builtin_objects,
    load_mesh_object,
    posterior_eps,
    posterior_weights,
)
from services.guidance.priors.base import ViewCondition
from shared.cameras import Shading, orbit_camera
from shared.errors import InvalidArgument
from shared.guidance_api import Conditioning, PriorKind, SdsRequest, Weighting
from shared.rasterize import TorchRasterizer
from shared.render import render_mesh

SIZE = 32


@pytest.fixture(scope="module")
def prior() -> AnalyticPrior:
    return AnalyticPrior(resolution=SIZE)


@pytest.fixture(scope="module")
def cameras():
    return [orbit_camera(a, 30.0, 2.0, fovy_deg=45.0, size=SIZE, shading=Shading.LAMBERTIAN) for a in (20, 200)]


def render(prior: AnalyticPrior, name: str, cameras) -> torch.Tensor:
    obj = next(o for o in prior.objects if o.name == name)
    return render_mesh(obj.mesh, cameras, prior.rasterizer, albedo=obj.color, resolution=SIZE)


def test_posterior_weights_match_brute_force():
    generator = torch.Generator().manual_seed(0)
    renders = torch.rand(2, 5, 3, 8, 8, generator=generator) * 2 - 1
    noisy = torch.randn(2, 3, 8, 8, generator=generator)
    alpha_bar = torch.tensor([0.3, 0.9])
    expected = torch.zeros(2, 5, dtype=torch.float64)
    for b in range(2):
        a = float(alpha_bar[b])
        logits = [
            -float(((noisy[b].double() - a**0.5 * renders[b, k].double()) ** 2).sum()) / (2 * (1 - a)) for k in range(5)
        ]
        top = max(logits)
        unnormalised = [torch.exp(torch.tensor(l - top, dtype=torch.float64)) for l in logits]
        total = sum(unnormalised)
        expected[b] = torch.stack([u / total for u in unnormalised])
    assert torch.allclose(posterior_weights(noisy, renders, alpha_bar), expected, atol=1e-12)


@pytest.mark.parametrize(
    ("prompt", "named"),
    [
        ("a red torus", ["red torus"]),
        ("a DSLR photo of a ball", ["blue sphere"]),
        ("A Yellow Cone, front view", ["yellow cone"]),
        ("a donut on a table", ["red torus"]),
    ],
)
def test_prompts_name_objects(prior, prompt, named):
    assert [prior.objects[i].name for i in prior.named_objects(prompt)] == named
    prior.validate_prompt(prompt, "prompt")


@pytest.mark.parametrize("prompt", ["", "   ", "a photo of a teapot", " ".join(["torus"] * 78)])
def test_unusable_prompts_are_invalid(prior, prompt):
    with pytest.raises(InvalidArgument) as caught:
        prior.validate_prompt(prompt, "prompt")
    assert caught.value.field == "prompt"


def test_negative_prompt_may_name_nothing(prior):
    prior.validate_prompt("blurry, low quality", "negative_prompt")


def test_single_object_set_is_a_weighted_l2_fit(cameras):
    """With one object, SDS = w(t) sqrt(abar / (1 - abar)) (x0 - x_k) in model space, whatever the noise."""
    torus = next(o for o in builtin_objects() if o.name == "red torus")
    single = AnalyticPrior(objects=[torus], resolution=SIZE)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    request = SdsRequest(
        job_id="t", prior="analytic", images=images, cameras=cameras, prompt="a torus",
        explicit_t=[0.3, 0.7], weighting=Weighting.SDS, guidance_scale=7.5, seed=5,
    )
    (result,) = sds.compute_sds(single, [request])
    target = render(single, "red torus", cameras) * 2 - 1
    abar = single.alphas_cumprod[torch.tensor([300, 700])].reshape(-1, 1, 1, 1)
    expected_model_space = (1 - abar) * (abar / (1 - abar)).sqrt() * ((images * 2 - 1) - target)
    assert torch.allclose(result.grad, 2 * expected_model_space, atol=1e-4)


def descend(prior, start, cameras, prompt, guidance_scale, steps=40, lr=0.1):
    images = start.clone()
    for step in range(steps):
        request = SdsRequest(
            job_id="t", prior="analytic", images=images, cameras=cameras, prompt=prompt,
            guidance_scale=guidance_scale, seed=100 + step,
        )
        (result,) = sds.compute_sds(prior, [request])
        assert all(result.finite)
        images = (images - lr * result.grad).clamp(0, 1)
    return images


def test_guided_sds_drives_a_wrong_object_to_the_named_one(prior, cameras):
    sphere, torus = render(prior, "blue sphere", cameras), render(prior, "red torus", cameras)
    start_error = float((sphere - torus).pow(2).mean())
    guided = descend(prior, sphere, cameras, "a red torus", guidance_scale=7.5)
    unguided = descend(prior, sphere, cameras, "a red torus", guidance_scale=0.0)
    guided_error = float((guided - torus).pow(2).mean())
    unguided_error = float((unguided - torus).pow(2).mean())
    assert guided_error < 0.02 * start_error, (guided_error, start_error)
    # The unconditional prior has no reason to prefer the torus: from a sphere render it stays a set member.
    assert unguided_error > 0.5 * start_error, (unguided_error, start_error)
    assert float((unguided - sphere).pow(2).mean()) < 0.1 * start_error


# -- more of the contract: info, encode, sets, negative prompts, cache, robustness ----------------------------


def test_info_and_encode(prior):
    info = prior.info
    assert info.kind == PriorKind.ANALYTIC and info.checkpoint_ids == ("default",)
    assert set(info.accepted_conditioning) == {
        Conditioning.TEXT, Conditioning.NEGATIVE_TEXT, Conditioning.CAMERA, Conditioning.IMAGE
    }
    assert info.max_prompt_tokens == 77 and info.native_resolution == SIZE
    abar = prior.alphas_cumprod
    assert abar.shape == (1000,) and bool((abar[1:] < abar[:-1]).all())
    assert abar[0].item() == pytest.approx(1 - 0.00085) and abar[-1].item() == pytest.approx(0.0047, abs=2e-4)
    images = torch.rand(2, 3, 64, 48, requires_grad=True)
    z = prior.encode(images, [])
    assert z.shape == (2, 3, SIZE, SIZE) and z.min() >= -1 and z.max() <= 1
    (grad,) = torch.autograd.grad(z.sum(), images)
    assert grad.abs().sum() > 0


def test_best_match_prefers_more_words():
    objs = builtin_objects()
    torus = next(o for o in objs if o.name == "red torus")
    blue_torus = ReferenceObject("blue torus", torus.mesh, (0.1, 0.2, 0.9), ("torus",))
    prior = AnalyticPrior(objects=[*objs, blue_torus], resolution=SIZE)
    names = lambda prompt: [prior.objects[i].name for i in prior.named_objects(prompt)]  # noqa: E731
    assert names("a red torus") == ["red torus"]
    assert names("a blue torus, side view") == ["blue torus"]
    assert names("a torus") == ["red torus", "blue torus"]
    with pytest.raises(ValueError):
        prior.add_object(blue_torus)


def test_posterior_weights_respect_the_object_set():
    generator = torch.Generator().manual_seed(3)
    renders = torch.rand(2, 4, 3, 8, 8, generator=generator, dtype=torch.float64) * 2 - 1
    noisy = torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64)
    alpha_bar = torch.tensor([0.02, 0.05], dtype=torch.float64)  # high noise: soft, non-trivial weights
    member = torch.tensor([[True, False, True, True], [False, True, False, False]])
    weights = posterior_weights(noisy, renders, alpha_bar, member)
    for b in range(2):
        ks = [k for k in range(4) if member[b, k]]
        a = float(alpha_bar[b])
        logits = torch.tensor(
            [-float(((noisy[b] - a**0.5 * renders[b, k]) ** 2).sum()) / (2 * (1 - a)) for k in ks], dtype=torch.float64
        )
        expected = torch.zeros(4, dtype=torch.float64)
        expected[ks] = torch.exp(logits - logits.max()) / torch.exp(logits - logits.max()).sum()
        assert torch.allclose(weights[b], expected, atol=1e-12)
    assert 0.01 < float(weights[0].max()) < 0.99  # the first row is genuinely mixed


def test_negative_prompt_is_the_unconditional_set(prior, cameras):
    conditions = [ViewCondition("a red torus", "a blue sphere", cameras[0]), ViewCondition("a red torus", "", cameras[1])]
    timesteps = torch.tensor([900, 900])
    noisy = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    eps_cond, eps_uncond = prior.predict_noise(noisy, timesteps, conditions)
    renders = prior.render_set([c.camera for c in conditions])
    abar = prior.alphas_cumprod.double()[timesteps]
    names = prior.object_names
    only = lambda name: torch.tensor([[n == name for n in names]] * 2)  # noqa: E731
    everything = torch.ones(2, len(names), dtype=torch.bool)
    assert torch.allclose(eps_cond.double(), posterior_eps(noisy, renders, abar, only("red torus")).float().double())
    assert torch.allclose(eps_uncond[0].double(), posterior_eps(noisy, renders, abar, only("blue sphere"))[0].float().double())
    assert torch.allclose(eps_uncond[1].double(), posterior_eps(noisy, renders, abar, everything)[1].float().double())


def test_predict_noise_needs_cameras_and_named_objects(prior, cameras):
    noisy = torch.zeros(1, 3, SIZE, SIZE)
    with pytest.raises(InvalidArgument) as caught:
        prior.predict_noise(noisy, torch.tensor([500]), [ViewCondition("a red torus", "", None)])
    assert caught.value.field == "cameras"
    with pytest.raises(InvalidArgument) as caught:
        prior.predict_noise(noisy, torch.tensor([500]), [ViewCondition("a teapot", "", cameras[0])])
    assert caught.value.field == "prompt"


class CountingRasterizer(TorchRasterizer):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def rasterize(self, pos_clip, tri, resolution):
        self.calls += 1
        return super().rasterize(pos_clip, tri, resolution)


def test_renders_are_cached_per_camera_and_object(cameras):
    rasterizer = CountingRasterizer()
    prior = AnalyticPrior(resolution=SIZE, rasterizer=rasterizer)
    first = prior.render_set(cameras)
    assert rasterizer.calls == len(prior.objects)  # one call per object covers both cameras
    again = prior.render_set(list(reversed(cameras)))
    assert rasterizer.calls == len(prior.objects)
    assert torch.equal(again, first.flip(0))
    moved = orbit_camera(21, 30.0, 2.0, fovy_deg=45.0, size=SIZE, shading=Shading.LAMBERTIAN)
    prior.render_set([moved])
    assert rasterizer.calls == 2 * len(prior.objects)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_background_images_are_made_once_per_call_and_render_as_per_object(cameras, dtype):
    """render_set makes each camera's background once for all objects; every object's render is the one
    render_mesh makes from the camera alone, and a different background is a different cache entry."""
    import dataclasses

    generator = torch.Generator().manual_seed(3)
    with_backgrounds = [
        dataclasses.replace(camera, background_image=torch.rand(SIZE + 8, SIZE + 8, 3, generator=generator).to(dtype))
        for camera in cameras
    ]  # not at the prior's size: resized on the way, as a scene's 64-pixel background reaching a 32-pixel prior
    prior = AnalyticPrior(resolution=SIZE)
    renders = prior.render_set(with_backgrounds)
    for column, obj in enumerate(prior.objects):
        alone = render_mesh(obj.mesh, with_backgrounds, prior.rasterizer, albedo=obj.color, resolution=SIZE)
        assert torch.equal(renders[:, column], alone.double() * 2.0 - 1.0)
    plain = prior.render_set(cameras)
    assert not torch.equal(plain, renders)  # the background shows around every object
    with pytest.raises(ValueError, match="backgrounds must be"):
        render_mesh(prior.objects[0].mesh, cameras, prior.rasterizer, resolution=SIZE,
                    backgrounds=torch.zeros(1, SIZE, SIZE, 3))


def test_uploaded_mesh_objects_join_the_set(tmp_path, cameras):
    import trimesh

    trimesh.creation.capsule(height=1.0, radius=0.3).export(tmp_path / "capsule.ply")
    prior = AnalyticPrior(resolution=SIZE)
    prior.add_object(load_mesh_object("white capsule", tmp_path / "capsule.ply", (1.0, 1.0, 1.0), ("pill",)))
    prior.validate_prompt("a pill", "prompt")
    assert [prior.objects[i].name for i in prior.named_objects("a pill")] == ["white capsule"]
    images = render_mesh(prior.objects[-1].mesh, cameras, prior.rasterizer, albedo=(1.0, 1.0, 1.0), resolution=SIZE)
    assert float(images.mean()) > 0.5


@pytest.mark.parametrize("seed", [11, 29])
def test_guided_sds_is_robust_across_seeds(prior, seed):
    """From a sphere render, the prompt's object wins whatever the noise draws; the unconditional prior drifts
    nowhere in particular (it stays with the sphere it started from)."""
    cams = [orbit_camera(seed * 7.0, 15.0, 2.0, fovy_deg=45.0, size=SIZE)]
    sphere, torus = render(prior, "blue sphere", cams), render(prior, "red torus", cams)
    start_error = float((sphere - torus).pow(2).mean())

    def run(scale):
        images = sphere.clone()
        for step in range(40):
            request = SdsRequest(
                job_id="t", prior="analytic", images=images, cameras=cams, prompt="a red torus",
                guidance_scale=scale, seed=seed * 1000 + step,
            )
            (result,) = sds.compute_sds(prior, [request])
            images = (images - 0.1 * result.grad).clamp(0, 1)
        return float((images - torus).pow(2).mean()), float((images - sphere).pow(2).mean())

    guided_to_torus, guided_to_sphere = run(7.5)
    unguided_to_torus, _ = run(0.0)
    assert guided_to_torus < 0.02 * start_error
    assert guided_to_sphere > 0.5 * start_error
    assert unguided_to_torus > 10 * guided_to_torus and unguided_to_torus > 0.5 * start_error
