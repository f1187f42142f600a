"""Textual-inversion embeddings for the text-conditioned priors: diffusers learned-embeddings files (safetensors,
{token: tensor}) named in the guidance config, loaded when a request names them. The prompt states the prior then
computes are checked against diffusers' own `load_textual_inversion` on the same saved model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from services.guidance.config import GuidanceConfig, PriorSpec
from services.guidance.pool import PriorPool
from services.guidance.priors.latent import LatentPrior
from services.guidance.priors.random_init import save_random_latent_prior
from services.guidance.sds import compute_sds, validate_request
from shared import guidance_api
from shared.errors import FailedPrecondition, NotFound
from shared.guidance_api import PriorKind, SdsRequest

WIDTH = 32  # the tiny CLIP text encoder's hidden size


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("learned")
    generator = torch.Generator().manual_seed(0)
    paths = {
        "toy": root / "toy.safetensors",  # one vector
        "style": root / "style.safetensors",  # three vectors: <style>, <style>_1, <style>_2
        "narrow": root / "narrow.safetensors",  # the wrong width
    }
    save_file({"<cat-toy>": torch.randn(WIDTH, generator=generator)}, str(paths["toy"]))
    save_file({"<style>": torch.randn(3, WIDTH, generator=generator)}, str(paths["style"]))
    save_file({"<thin>": torch.randn(WIDTH // 2, generator=generator)}, str(paths["narrow"]))
    paths["gone"] = root / "gone.safetensors"
    return paths


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_random_latent_prior(tmp_path_factory.mktemp("sd") / "sd", "tiny", seed=0)


def make_prior(model_dir, files) -> LatentPrior:
    return LatentPrior.from_pretrained(model_dir, device="cpu", dtype="float32", resolution=64,
                                       learned_embeddings=files)


def sds_request(prompt: str, *names: str) -> SdsRequest:
    return SdsRequest(job_id="ti", prior="sd", images=torch.rand(1, 3, 32, 32), prompt=prompt, seed=3,
                      learned_embeddings=names)


def test_named_embeddings_give_the_states_diffusers_gives(model_dir, files):
    from diffusers import StableDiffusionPipeline

    prior = make_prior(model_dir, files)
    assert set(prior.info.learned_embeddings) == {"toy", "style", "narrow", "gone"}
    assert set(guidance_api.prior_info_to_proto(prior.info).learned_embeddings) == set(prior.info.learned_embeddings)
    prompt = "a photo of <cat-toy> in <style>"
    before = prior.count_tokens(prompt)
    validate_request(sds_request(prompt, "toy", "style"), prior, 8)
    assert prior.count_tokens(prompt) < before  # the placeholders are tokens now, not characters
    assert prior.count_tokens(prompt) == prior.count_tokens("a photo of in") + 1 + 3

    pipeline = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, local_files_only=True)
    pipeline.load_textual_inversion(str(files["toy"]))
    pipeline.load_textual_inversion(str(files["style"]))
    text = pipeline.maybe_convert_prompt(prompt, pipeline.tokenizer)
    ids = pipeline.tokenizer(text, padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = pipeline.text_encoder(ids)[0][0]
    torch.testing.assert_close(prior.prompt_embeddings([prompt])[0], expected)
    (result,) = compute_sds(prior, [sds_request(prompt, "toy", "style")])
    assert all(result.finite)


def test_missing_unknown_and_unusable_embeddings_are_refused_naming_the_field(model_dir, files):
    prior = make_prior(model_dir, files)
    cases = [("gone", NotFound), ("nobody", NotFound), ("narrow", FailedPrecondition)]
    for name, error in cases:
        with pytest.raises(error) as caught:
            validate_request(sds_request("a red torus", name), prior, 8)
        assert caught.value.field == "learned_embeddings"
    embeddings_before = prior.text_encoder.get_input_embeddings().weight.shape[0]
    assert "<thin>" not in prior.tokenizer.get_vocab() and embeddings_before == len(prior.tokenizer)


def test_config_names_safetensors_files_for_text_priors_only(model_dir, files, tmp_path):
    spec = PriorSpec(name="sd", kind=PriorKind.LATENT, source=str(model_dir), device="cpu", dtype="float32",
                     resolution=64, learned_embeddings={"toy": files["toy"]})
    prior = PriorPool(GuidanceConfig(priors=[spec])).get("sd")
    assert prior.info.learned_embeddings == ("toy",)
    validate_request(sds_request("a <cat-toy>", "toy"), prior, 8)
    with pytest.raises(ValueError, match="safetensors"):
        PriorSpec(name="sd", kind=PriorKind.LATENT, source="x", learned_embeddings={"toy": tmp_path / "toy.bin"})
    with pytest.raises(ValueError, match="text-conditioned"):
        PriorSpec(name="a", kind=PriorKind.ANALYTIC, learned_embeddings={"toy": files["toy"]})


def test_a_registry_alias_names_embeddings_for_every_request_through_the_client(model_dir, files):
    from services.guidance import standalone
    from shared.guidance_client import GuidanceClient
    from shared.registry import Registry

    spec = PriorSpec(name="sd", kind=PriorKind.LATENT, source=str(model_dir), device="cpu", dtype="float32",
                     resolution=64, learned_embeddings={"toy": files["toy"], "gone": files["gone"]})
    config = GuidanceConfig(priors=[spec], port=0, batching={"wait_s": 0})
    pool = PriorPool(config)
    running = standalone.start(config, pool=pool)
    registry = Registry.model_validate({
        "client": {"timeout_s": 20, "outage_window_s": 1},
        "priors": {"sd": {"kind": "standalone", "address": running.address},
                   "sd-toy": {"kind": "alias", "target": "sd", "learned_embeddings": ["toy"]},
                   "sd-gone": {"kind": "alias", "target": "sd-toy", "learned_embeddings": ["gone"]}},
    })
    client = GuidanceClient(registry)
    try:
        assert registry.resolve("sd-toy").learned_embeddings == ("toy",)
        assert "toy" not in pool.get("sd")._loaded_embeddings
        result = client.compute_sds(SdsRequest(job_id="ti", prior="sd-toy", images=torch.rand(1, 3, 32, 32),
                                               prompt="a photo of <cat-toy>", seed=3))
        assert all(result.finite) and "toy" in pool.get("sd")._loaded_embeddings
        with pytest.raises(NotFound) as caught:
            client.compute_sds(SdsRequest(job_id="ti", prior="sd-gone", images=torch.rand(1, 3, 32, 32),
                                          prompt="a red torus", seed=3))
        assert caught.value.field == "learned_embeddings"
    finally:
        client.close()
        running.stop(grace=None)
