"""The analytic prior's image conditioning (Magic123's reference image): the posterior over its objects given an
image rendered from one of them is concentrated on that object; image-only SDS requests work; refusals stay clear."""

from __future__ import annotations

import pytest
import torch

from services.guidance import sds
from services.guidance.priors.analytic import AnalyticPrior
from services.guidance.priors.base import ViewCondition
from shared import cameras
from shared.errors import FailedPrecondition, InvalidArgument
from shared.guidance_api import Conditioning, ImageCondition, SdsRequest

REFERENCE = cameras.orbit_camera(0.0, 20.0, 1.8, fovy_deg=40.0, size=64)


@pytest.fixture(scope="module")
def prior() -> AnalyticPrior:
    return AnalyticPrior(resolution=32)


def photo(prior: AnalyticPrior, name: str, camera: cameras.Camera, size: int = 48) -> torch.Tensor:
    """(1, 4, size, size) straight RGBA in [0, 1]: the named object rendered at `camera` as a user would send it."""
    obj = next(o for o in prior.objects if o.name == name)
    black = cameras.orbit_camera(camera.azimuth_deg, camera.elevation_deg, camera.distance, camera.fovy_deg,
                                 size=size, background_color=(0.0, 0.0, 0.0))
    from shared.render import render_mesh

    color = render_mesh(obj.mesh, [black], prior.rasterizer, albedo=obj.color, resolution=size)[0]
    mask = render_mesh(obj.mesh, [black], prior.rasterizer, albedo=(1.0, 1.0, 1.0), resolution=size)[0, :1]
    straight = torch.where(mask > 0, color / mask.clamp(min=1e-6), torch.zeros_like(color)).clamp(0, 1)
    return torch.cat([straight, mask])[None]


def condition(image: torch.Tensor, digest: str, camera: cameras.Camera = REFERENCE) -> ImageCondition:
    return ImageCondition(reference_camera=camera, image_sha256=digest, image=image)


@pytest.mark.parametrize("name", ["red torus", "green cube", "yellow cone"])
def test_the_posterior_given_an_image_of_an_object_is_that_object(prior, name):
    camera = cameras.orbit_camera(0.0, 30.0, 1.8, fovy_deg=40.0, size=64)
    posterior = prior.image_posterior(condition(photo(prior, name, camera), f"photo-{name}", camera))
    assert posterior.shape == (len(prior.objects),)
    assert posterior[prior.object_names.index(name)] > 0.99, dict(zip(prior.object_names, posterior.tolist()))


def test_prompt_free_sds_with_an_image_pulls_towards_the_pictured_object(prior):
    assert Conditioning.IMAGE in prior.info.accepted_conditioning
    image = photo(prior, "blue sphere", REFERENCE)
    views = [cameras.orbit_camera(az, 20.0, 1.8, fovy_deg=40.0, size=32) for az in (0.0, 90.0)]
    request = SdsRequest(job_id="t", prior="analytic", images=torch.rand(2, 3, 32, 32), prompt="", seed=1,
                         cameras=views, image_condition=condition(image, "sphere"), explicit_t=[0.5, 0.5])
    sds.validate_request(request, prior, max_batch_size=8)  # no prompt: accepted with the image
    conditions = sds.conditions_for(request)  # view suffixes alone name no object: the image decides
    timesteps = torch.tensor([500, 500])
    sphere = prior.render_set(views)[:, prior.object_names.index("blue sphere")]
    noisy = (prior.alphas_cumprod[500].sqrt() * sphere).float()  # x_t with no noise at the sphere's renders
    eps_cond, _ = prior.predict_noise(noisy, timesteps, conditions)
    assert eps_cond.abs().max() < 1e-3  # the conditional model already sees the sphere: nothing to denoise
    # With a prompt naming another object the set is restricted to it: the sphere is then far from the model.
    restricted = [ViewCondition("a red torus", "", c.camera, c.image) for c in conditions]
    eps_torus, _ = prior.predict_noise(noisy, timesteps, restricted)
    assert eps_torus.abs().max() > 0.1


def test_refusals_stay_clear(prior):
    views = [cameras.orbit_camera(0.0, 20.0, 1.8, size=32)]
    request = SdsRequest(job_id="t", prior="analytic", images=torch.rand(1, 3, 32, 32), prompt="", seed=1, cameras=views)
    with pytest.raises(InvalidArgument) as caught:  # no prompt and no image
        sds.validate_request(request, prior, max_batch_size=8)
    assert caught.value.field == "prompt"
    with pytest.raises(InvalidArgument) as caught:  # a prompt naming nothing, even with an image
        request.prompt, request.image_condition = "a teapot", condition(photo(prior, "red torus", REFERENCE), "t")
        sds.validate_request(request, prior, max_batch_size=8)
    assert caught.value.field == "prompt"
    with pytest.raises(FailedPrecondition) as caught:  # a digest the engine did not resolve
        prior.image_posterior(ImageCondition(reference_camera=REFERENCE, image_sha256="nope"))
    assert caught.value.field == "image_condition.image"
    bad = photo(prior, "red torus", REFERENCE)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidArgument) as caught:
        prior.image_posterior(condition(bad, "nan"))
    assert caught.value.field == "image_condition.image"
