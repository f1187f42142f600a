"""The shared SDS math and request validation, on a closed-form prior (no networks, no transport)."""

from __future__ import annotations

import math

import pytest
import torch

from services.guidance import sds
from shared.cameras import orbit_camera
from shared.errors import InvalidArgument, NotFound
from shared.guidance_api import SdsRequest, Weighting


def make_request(**overrides) -> SdsRequest:
    fields = dict(job_id="job-1", prior="counting", images=torch.rand(2, 3, 32, 32), prompt="a red torus", seed=7)
    fields.update(overrides)
    return SdsRequest(**fields)


@pytest.mark.parametrize(
    ("azimuth", "elevation", "suffix"),
    [
        (0, 10, ", front view"),
        (44, 0, ", front view"),
        (-44, 0, ", front view"),
        (90, 0, ", side view"),
        (-100, 30, ", side view"),
        (180, 0, ", back view"),
        (-150, 0, ", back view"),
        (200, 0, ", back view"),
        (330, 0, ", front view"),
        (0, 75, ", overhead view"),
    ],
)
def test_view_suffix_by_azimuth_and_elevation(azimuth, elevation, suffix):
    assert sds.view_suffix(azimuth, elevation) == suffix


def test_weightings():
    abar = torch.tensor([0.25, 0.81])
    assert torch.allclose(sds.sds_weight(Weighting.SDS, abar), torch.tensor([0.75, 0.19]))
    assert torch.allclose(sds.sds_weight(Weighting.UNIFORM, abar), torch.ones(2))
    assert torch.allclose(sds.sds_weight(Weighting.FANTASIA3D, abar), torch.tensor([0.5 * 0.75, 0.9 * 0.19]))


def test_cfg_convention_scale_one_is_conditional_scale_zero_unconditional():
    cond, uncond = torch.randn(4), torch.randn(4)
    assert torch.allclose(sds.classifier_free_guidance(cond, uncond, 1.0), cond)
    assert torch.allclose(sds.classifier_free_guidance(cond, uncond, 0.0), uncond)
    assert torch.allclose(sds.classifier_free_guidance(cond, uncond, 3.0), uncond + 3 * (cond - uncond))


def test_gradient_matches_closed_form(counting_prior):
    """With eps_c = 0.5 z_t and eps_u = 0.25 z_t the whole SDS chain has a closed form; check it by hand."""
    request = make_request(guidance_scale=3.0, weighting=Weighting.UNIFORM, explicit_t=[0.3, 0.6])
    (result,) = sds.compute_sds(counting_prior, [request])
    generator = torch.Generator().manual_seed(request.seed)
    torch.rand(2, generator=generator)  # compute_sds draws t first even when explicit t overrides it
    noise = torch.randn(2, 3, 32, 32, generator=generator)
    steps = torch.tensor([300, 600])
    abar = counting_prior.alphas_cumprod[steps].reshape(-1, 1, 1, 1)
    z0 = request.images * 2 - 1
    noisy = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
    eps_hat = 0.25 * noisy + 3.0 * (0.5 - 0.25) * noisy
    expected = 2 * (eps_hat - noise)  # d z0 / d image = 2, and no resize at native resolution
    assert result.t == pytest.approx([0.3, 0.6])
    assert torch.allclose(result.grad, expected, atol=1e-5)
    assert result.loss == pytest.approx((0.5 * (eps_hat - noise).pow(2).sum(dim=(1, 2, 3))).tolist(), rel=1e-5)
    assert result.finite == [True, True]


def test_result_does_not_depend_on_batch_mates(counting_prior):
    images = torch.rand(2, 3, 32, 32)
    alone = sds.compute_sds(counting_prior, [make_request(seed=3, images=images)])[0]
    together = sds.compute_sds(counting_prior, [make_request(seed=11), make_request(seed=3, images=images)])[1]
    assert torch.equal(alone.grad, together.grad)
    assert counting_prior.calls == [2, 4]


def test_t_is_drawn_inside_the_requested_range(counting_prior):
    request = make_request(images=torch.rand(8, 3, 32, 32), time_range=(0.2, 0.3))
    (result,) = sds.compute_sds(counting_prior, [request])
    assert all(0.2 - 1e-3 <= t <= 0.3 + 1e-3 for t in result.t)


def test_view_dependent_prompts_follow_cameras(counting_prior):
    cams = [orbit_camera(0, 0, 2.0, size=32), orbit_camera(180, 0, 2.0, size=32)]
    request = make_request(cameras=cams, view_dependent_prompt=True)
    (result,) = sds.compute_sds(counting_prior, [request])
    assert result.prompts == ["a red torus, front view", "a red torus, back view"]


def test_nonfinite_gradients_are_zeroed_and_flagged(counting_prior):
    class Exploding(type(counting_prior)):
        def predict_noise(self, noisy, timesteps, conditions):
            cond, uncond = super().predict_noise(noisy, timesteps, conditions)
            cond = cond.clone()
            cond[1, 0, 0, 0] = float("inf")
            return cond, uncond

    (result,) = sds.compute_sds(Exploding(), [make_request()])
    assert result.finite == [True, False]
    assert torch.isfinite(result.grad).all()
    assert result.grad[1].abs().sum() == 0 and result.grad[0].abs().sum() > 0
    assert math.isnan(result.loss[1]) and math.isfinite(result.loss[0])


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(images=torch.rand(3, 32, 32)), "images.shape"),
        (dict(images=torch.rand(1, 4, 32, 32)), "images.shape"),
        (dict(images=torch.rand(1, 3, 8, 32)), "images.shape"),
        (dict(images=torch.rand(1, 3, 32, 2048)), "images.shape"),
        (dict(images=torch.rand(9, 3, 32, 32)), "images.shape"),
        (dict(images=torch.full((1, 3, 32, 32), float("nan"))), "images.data"),
        (dict(explicit_t=[0.5]), "explicit_times.t"),
        (dict(explicit_t=[0.0, 0.5]), "explicit_times.t"),
        (dict(explicit_t=[0.5, 1.0]), "explicit_times.t"),
        (dict(time_range=(0.6, 0.4)), "time_range.min"),
        (dict(time_range=(0.0, 0.4)), "time_range"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(prompt=""), "prompt"),
        (dict(prompt="one two three four five six seven eight nine"), "prompt"),
        (dict(cameras=[orbit_camera(0, 0, 2.0)]), "cameras"),
    ],
)
def test_bad_requests_name_the_field(counting_prior, overrides, field):
    with pytest.raises(InvalidArgument) as caught:
        sds.validate_request(make_request(**overrides), counting_prior, max_batch_size=16)
    assert caught.value.field == field


def test_unknown_checkpoint_is_not_found(counting_prior):
    with pytest.raises(NotFound) as caught:
        sds.validate_request(make_request(checkpoint_id="dreambooth-7"), counting_prior, max_batch_size=16)
    assert caught.value.field == "checkpoint_id"
