"""What a stage sends the guidance tier per step: the transfer dtype, and backgrounds only for priors that use them."""

from __future__ import annotations

import torch

from services.scene.config import FineConfig, PriorTerm
from services.scene.guidance import PriorInfoCache
from services.scene.steps import guidance_gradient
from shared.cameras import orbit_camera
from shared.guidance_api import PriorInfo, PriorKind, SdsResult


class RecordingGuidance:
    """Answers every request with a gradient of ones in the requested dtype; counts prior_info calls."""

    def __init__(self, infos: dict[str, PriorInfo]):
        self.infos, self.requests, self.info_calls = infos, [], 0

    def prior_info(self, name, timeout_s=None):
        self.info_calls += 1
        return self.infos[name]

    def compute_sds(self, request, timeout_s=None):
        self.requests.append(request)
        batch = request.images.shape[0]
        grad = torch.ones(request.images.shape, dtype=request.grad_dtype)
        return SdsResult(grad, [0.5] * batch, [1.0] * batch, [True] * batch, [request.prompt] * batch)


def info(name: str, kind: PriorKind, resolution: int, requires_cameras: bool) -> PriorInfo:
    return PriorInfo(name, kind, resolution, 77, (), 100.0, (0.02, 0.98), requires_cameras=requires_cameras)


def test_transfer_dtype_and_backgrounds_only_where_used():
    guidance = RecordingGuidance({
        "latent": info("latent", PriorKind.LATENT, 512, False),
        "analytic": info("analytic", PriorKind.ANALYTIC, 32, True),
    })
    config = FineConfig(
        prompt="a red torus",
        priors=(PriorTerm(prior="latent"), PriorTerm(prior="analytic", weight=0.5)),
        guidance_transfer_dtype="float16",
    )
    images = torch.rand(2, 3, 128, 128)
    backgrounds = torch.rand(2, 3, 128, 128)
    cameras = [orbit_camera(a, 15.0, 2.0, size=128) for a in (0.0, 90.0)]
    infos = PriorInfoCache(guidance)
    for step in range(2):
        grad, losses = guidance_gradient(guidance, infos, config, "job", images, cameras, backgrounds, step)

    assert grad.dtype == torch.float32 and torch.allclose(grad, torch.full_like(grad, 1.5))
    assert losses == [1.0, 1.0]
    assert guidance.info_calls == 2  # once per prior, not once per step
    latent, analytic = guidance.requests[-2:]
    for request in (latent, analytic):
        assert request.images.dtype == torch.float16 and request.grad_dtype == torch.float16
        torch.testing.assert_close(request.images.float(), images, atol=1e-3, rtol=0)
    assert all(c.background_image is None for c in latent.cameras)
    expected = torch.nn.functional.interpolate(backgrounds, size=(32, 32), mode="bilinear", align_corners=False)
    for i, camera in enumerate(analytic.cameras):  # backgrounds travel in the traffic's dtype too
        assert camera.background_image.shape == (32, 32, 3) and camera.background_image.dtype == torch.float16
        torch.testing.assert_close(camera.background(32, 32), expected[i].permute(1, 2, 0), atol=1e-3, rtol=0)


def test_auto_transfer_dtype_is_half_on_gpus_only():
    from services.scene.steps import transfer_dtype_for

    config = FineConfig(prompt="a red torus")
    assert config.guidance_transfer_dtype == "auto"
    assert transfer_dtype_for(config, torch.device("cpu")) == torch.float32
    assert transfer_dtype_for(config, torch.device("cuda")) == torch.float16
    pinned = FineConfig(prompt="a red torus", guidance_transfer_dtype="float32")
    assert transfer_dtype_for(pinned, torch.device("cuda")) == torch.float32
