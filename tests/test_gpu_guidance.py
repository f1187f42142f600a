"""GPU-only checks of the guidance priors (run with `make test-gpu` on a CUDA machine; deselected in CI)."""

from __future__ import annotations

import pytest
import torch

from services.guidance import sds
from services.guidance.priors import random_init
from shared.guidance_api import SdsRequest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _request(prior, batch=2, seed=3):
    side = prior.info.native_resolution
    return SdsRequest(
        job_id="gpu",
        prior=prior.info.name,
        images=torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(0)),
        prompt="a red torus",
        guidance_scale=7.5,
        seed=seed,
    )


@pytest.mark.parametrize("builder", [random_init.build_random_pixel_prior, random_init.build_random_latent_prior])
def test_half_precision_matches_float32(builder):
    """The auto dtype on CUDA is fp16; its SDS gradient agrees with the fp32 one of the same weights."""
    half = builder("tiny", device="cuda", dtype="auto", seed=0, resolution=64)
    full = builder("tiny", device="cuda", dtype="float32", seed=0, resolution=64)
    assert next(half.unet.parameters()).dtype == torch.float16
    (g16,) = sds.compute_sds(half, [_request(half)])
    (g32,) = sds.compute_sds(full, [_request(full)])
    assert all(g16.finite) and torch.isfinite(g16.grad).all()
    cosine = torch.nn.functional.cosine_similarity(g16.grad.flatten(), g32.grad.flatten(), dim=0)
    assert cosine > 0.99, f"fp16 vs fp32 SDS gradient cosine {cosine:.4f}"


def test_bfloat16_runs():
    prior = random_init.build_random_pixel_prior("tiny", device="cuda", dtype="bfloat16", seed=0)
    (result,) = sds.compute_sds(prior, [_request(prior)])
    assert all(result.finite) and result.grad.abs().sum() > 0


def test_result_stays_on_the_device_and_reaches_the_host_pinned():
    """The gradient stays on the prior's device (an in-process scene adds it there); the wire copy goes through
    pinned memory and equals it; CPU-side images are accepted too."""
    from shared.devices import to_device, to_host

    prior = random_init.build_random_latent_prior("tiny", device="cuda", seed=0, resolution=64)
    request = _request(prior)
    (from_host,) = sds.compute_sds(prior, [request])
    on_device = SdsRequest(**{**request.__dict__, "images": request.images.cuda()})
    (from_device,) = sds.compute_sds(prior, [on_device])
    assert from_host.grad.device.type == "cuda"
    torch.testing.assert_close(from_host.grad, from_device.grad)
    host = to_host(from_host.grad)
    assert host.device.type == "cpu" and host.is_pinned()
    torch.testing.assert_close(host, from_host.grad.cpu())
    torch.testing.assert_close(to_device(host, torch.device("cuda")), from_host.grad)


def test_vae_math_attention_matches_the_memory_efficient_kernel():
    """The VAE encoder's attention runs as plain matmuls on CUDA (its backward at head width 512 is slow in the
    memory-efficient kernel); latents and image gradients agree with that kernel's within fp16 tolerance."""
    from services.guidance.priors.vae_encoder import ANY_ATTENTION_KERNEL

    prior = random_init.build_random_latent_prior("tiny", device="cuda", seed=0, resolution=64)
    images = torch.rand(2, 3, 64, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def latents_and_grad(backends):
        prior.vae_attention_backends = backends
        x = images.clone().requires_grad_(True)
        z = prior.encode(x, [])
        (grad,) = torch.autograd.grad(z, x, torch.ones_like(z))
        return z.float(), grad.float()

    z_math, g_math = latents_and_grad([torch.nn.attention.SDPBackend.MATH])
    z_any, g_any = latents_and_grad(list(ANY_ATTENTION_KERNEL))
    torch.testing.assert_close(z_math, z_any, rtol=2e-2, atol=2e-2)
    cosine = torch.nn.functional.cosine_similarity(g_math.flatten(), g_any.flatten(), dim=0)
    assert cosine > 0.999, f"image gradient cosine {cosine:.5f}"


@pytest.mark.parametrize("builder", [random_init.build_random_pixel_prior, random_init.build_random_latent_prior])
def test_cuda_graph_replay_matches_the_eager_unet(builder):
    """The UNet replayed from a CUDA graph gives the eager call's noise predictions, for each batch shape it meets
    (one capture per shape), and SDS through it equals SDS without it."""
    graphed = builder("tiny", device="cuda", seed=0, resolution=64)
    eager = builder("tiny", device="cuda", seed=0, resolution=64, cuda_graphs="off")
    assert graphed.denoiser_graph is not None and eager.denoiser_graph is None
    for batch in (2, 3, 2):
        (ours,) = sds.compute_sds(graphed, [_request(graphed, batch=batch)])
        (theirs,) = sds.compute_sds(eager, [_request(eager, batch=batch)])
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-3, atol=1e-3 * float(theirs.grad.abs().max()))
    assert graphed.denoiser_graph.captured_shapes == 2


def test_a_forward_that_cannot_be_captured_runs_eagerly():
    from services.guidance.priors.cuda_graphs import GraphedForward

    def syncs(x):  # a host read inside the forward is illegal during capture
        return x * float(x.sum())

    graphed = GraphedForward()
    x = torch.ones(4, device="cuda")
    torch.testing.assert_close(graphed(syncs, x), x * 4)
    torch.testing.assert_close(graphed(syncs, x), x * 4)
    assert graphed.captured_shapes == 0
    # The failed capture leaves CUDA random draws working (they failed in every later test before the reset).
    assert torch.rand(8, device="cuda").shape == (8,)


def test_a_graphed_prior_is_freed_without_the_cycle_collector():
    """No reference cycle between a prior and its graphs: dropping the last reference frees it (and its GPU memory)
    at once, as the pool expects when it evicts a prior."""
    import gc
    import weakref

    prior = random_init.build_random_latent_prior("tiny", device="cuda", seed=0, resolution=64)
    sds.compute_sds(prior, [_request(prior)])
    assert prior.denoiser_graph.captured_shapes == 1
    alive = weakref.ref(prior)
    gc.disable()
    try:
        del prior
        assert alive() is None
    finally:
        gc.enable()


def test_a_gpu_scene_sends_latents_by_default_and_gets_the_images_gradient():
    """On CUDA, guidance_input "auto" runs the prior's published encoder in the scene (fp16, compiled) and sends
    latents; the image gradient equals the one of sending float32 images, within fp16 tolerance."""
    from services.guidance.config import GuidanceConfig, PriorSpec
    from services.guidance.engine import GuidanceEngine
    from services.scene.config import FineConfig, PriorTerm
    from services.scene.guidance import InProcessGuidance, PriorInfoCache
    from services.scene.latent_encoders import CompiledEncoder
    from services.scene.steps import guidance_gradient
    from shared.cameras import orbit_camera
    from shared.guidance_api import PriorKind

    spec = PriorSpec(name="sd", kind=PriorKind.LATENT, source="random:tiny", device="cuda", resolution=64)
    guidance = InProcessGuidance(GuidanceEngine(GuidanceConfig(priors=[spec], batching={"wait_s": 0})))
    sent = []
    compute = guidance.compute_sds
    guidance.compute_sds = lambda request, timeout_s=None: sent.append(request) or compute(request, timeout_s)
    images = torch.rand(2, 3, 64, 64, device="cuda")
    cameras = [orbit_camera(a, 15.0, 2.0, size=64) for a in (0.0, 90.0)]
    grads = {}
    try:
        for mode, dtype in (("auto", "auto"), ("images", "float32")):
            config = FineConfig(prompt="a red torus", priors=(PriorTerm(prior="sd"),), guidance_input=mode,
                                guidance_transfer_dtype=dtype)
            infos = PriorInfoCache(guidance)
            grads[mode], _ = guidance_gradient(guidance, infos, config, "gpu", images, cameras, images, step=0)
            if mode == "auto":  # compiled on CUDA (latent_encoder_compile: auto), and the compilation worked
                encoder = infos.latent_encoder(guidance.prior_info("sd"), "auto", images.device, "gpu", "auto")
                assert isinstance(encoder, CompiledEncoder) and encoder.compiled
    finally:
        guidance.close()
    assert sent[0].images is None and sent[0].latents.dtype == torch.float16 and sent[0].latents.is_cuda
    assert sent[1].latents is None
    cosine = torch.nn.functional.cosine_similarity(grads["auto"].flatten(), grads["images"].flatten(), dim=0)
    assert cosine > 0.99, f"latents vs images gradient cosine {cosine:.4f}"


def test_the_runner_computes_on_its_own_stream_in_order_with_an_in_process_caller():
    """BatchRunner runs the denoiser on the device's guidance stream (services/guidance/streams.py), not on the
    caller's: the images an in-process caller just made on its stream are waited for, and the gradient it gets back
    equals the one computed on the default stream, even when the caller reads it at once and the next batch reuses
    the allocator's memory."""
    from services.guidance.batching import BatchRunner
    from shared.logging import get_logger

    prior = random_init.build_random_pixel_prior("tiny", device="cuda", seed=0, resolution=64)

    class OnePriorPool:
        def get(self, name, checkpoint_id=""):
            return prior

    streams_seen = []
    predict = prior.predict_noise

    def recording_predict(*args, **kwargs):
        streams_seen.append(torch.cuda.current_stream().cuda_stream)
        return predict(*args, **kwargs)

    prior.predict_noise = recording_predict
    runner = BatchRunner(OnePriorPool(), get_logger(__name__))
    request = _request(prior)
    (expected,) = sds.compute_sds(prior, [request])  # on the default stream
    default_stream = torch.cuda.current_stream().cuda_stream
    for _ in range(3):
        # Made on the caller's stream by a long chain of kernels: the guidance stream must wait for the last one.
        images = request.images.cuda()
        for _ in range(200):
            images = (images * 1.0001).clamp(0, 1)
        images = request.images.cuda().copy_(images).mul_(0).add_(request.images.cuda())
        on_device = SdsRequest(**{**request.__dict__, "images": images})
        (result,) = list(runner.outcomes(prior.info.name, "", [on_device]))
        torch.testing.assert_close(result.grad.clone(), expected.grad)
    assert streams_seen[0] == default_stream and all(s != default_stream for s in streams_seen[1:])


def test_the_start_up_warm_up_captures_each_text_priors_graph_before_the_first_request():
    """On CUDA (warm_up mode auto) a server's warm-up leaves the UNet graph of each configured batch shape captured,
    for a pixel prior (images) and a latent prior (latents, its published encoder's shape)."""
    from services.guidance.config import GuidanceConfig, PriorSpec
    from services.guidance.engine import GuidanceEngine
    from shared.guidance_api import PriorKind

    specs = [PriorSpec(name=kind.value, kind=kind, source="random:tiny", device="cuda", resolution=64,
                       warm_up={"batch_sizes": [2, 4]}) for kind in (PriorKind.PIXEL, PriorKind.LATENT)]
    engine = GuidanceEngine(GuidanceConfig(priors=specs, batching={"wait_s": 0}))
    try:
        assert set(engine.warm_up()) == {"pixel", "latent"}
        for spec in specs:
            assert engine.prior(spec.name).denoiser_graph.captured_shapes == 2
    finally:
        engine.close()
