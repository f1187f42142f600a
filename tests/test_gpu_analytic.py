"""The analytic prior on a CUDA device (marker `gpu`; run on the GPU machine): with the PyTorch rasteriser it gives
the CPU path's noise predictions, with nvdiffrast (its default there) the same up to antialiased edges, and SDS
through the guidance engine returns the same gradient as on the CPU."""

from __future__ import annotations

import pytest
import torch

from services.guidance import sds
from services.guidance.priors.analytic import AnalyticPrior
from services.guidance.priors.base import ViewCondition
from shared.cameras import Shading, orbit_camera
from shared.guidance_api import SdsRequest, Weighting
from shared.rasterize import TorchRasterizer

pytestmark = pytest.mark.gpu

SIZE = 64


@pytest.fixture(scope="module")
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


def noise_predictions(prior: AnalyticPrior, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    cameras = [orbit_camera(a, 25.0, 2.0, fovy_deg=45.0, size=SIZE, shading=Shading.LAMBERTIAN) for a in (10, 130, 250)]
    conditions = [ViewCondition("a red torus", "", camera) for camera in cameras]
    noisy = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)).to(device)
    eps_cond, eps_uncond = prior.predict_noise(noisy, torch.tensor([200, 500, 900], device=device), conditions)
    assert eps_cond.device.type == device.type and eps_uncond.device.type == device.type
    return eps_cond.cpu().double(), eps_uncond.cpu().double()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_the_cuda_prior_with_the_torch_rasteriser_matches_the_cpu_prior(cuda):
    on_cpu = noise_predictions(AnalyticPrior(resolution=SIZE), torch.device("cpu"))
    on_gpu = AnalyticPrior(resolution=SIZE, device="cuda", rasterizer=TorchRasterizer())
    assert on_gpu.device.type == "cuda"
    for cpu, gpu in zip(on_cpu, noise_predictions(on_gpu, cuda)):
        assert torch.allclose(cpu, gpu, atol=1e-4), float((cpu - gpu).abs().max())


def test_the_cuda_prior_defaults_to_nvdiffrast_and_agrees_up_to_edges(cuda):
    pytest.importorskip("nvdiffrast.torch")
    prior = AnalyticPrior(resolution=SIZE, device="cuda")
    assert type(prior.rasterizer).__name__ == "NvdiffrastRasterizer"
    on_cpu = noise_predictions(AnalyticPrior(resolution=SIZE), torch.device("cpu"))
    for cpu, gpu in zip(on_cpu, noise_predictions(prior, cuda)):
        assert cosine(cpu, gpu) > 0.99  # nvdiffrast antialiases silhouettes; the PyTorch rasteriser does not


def test_sds_through_the_cuda_prior_gives_the_cpu_gradient(cuda):
    cameras = [orbit_camera(a, 25.0, 2.0, fovy_deg=45.0, size=SIZE) for a in (0, 180)]
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    request = SdsRequest(job_id="t", prior="analytic", images=images, cameras=cameras, prompt="a red torus",
                         explicit_t=[0.3, 0.7], weighting=Weighting.SDS, guidance_scale=7.5, seed=5)
    (on_cpu,) = sds.compute_sds(AnalyticPrior(resolution=SIZE), [request])
    (on_gpu,) = sds.compute_sds(AnalyticPrior(resolution=SIZE, device="cuda", rasterizer=TorchRasterizer()), [request])
    assert on_gpu.grad.device.type == "cuda" and all(on_gpu.finite)
    assert torch.allclose(on_cpu.grad, on_gpu.grad.cpu(), atol=1e-4)
