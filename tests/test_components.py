"""The registry of swappable parts (shared/components.py) and every registry built on it: priors, hash-grid
encodings, rasterisers, artifact stores. Each registry lists its kinds, and every kind that runs on a CPU builds."""

from __future__ import annotations

from enum import Enum

import grpc
import pytest
import torch
from magic3d.v1 import scene_pb2
from pydantic import TypeAdapter, ValidationError

from services.guidance.config import GuidanceConfig, PriorSpec
from services.guidance.pool import PRIORS, PriorPool
from services.guidance.priors.base import DiffusionPrior
from services.scene.field.encoding import ENCODINGS, Encoding, make_encoding
from services.scene.config import RASTERIZER_NAMES
from services.scene.field_config import HashGridConfig
from shared.components import Registry, UnknownKind
from shared.errors import InvalidArgument
from shared.guidance_api import PriorKind
from shared.rasterize import RASTERIZERS, Rasterizer, make_rasterizer
from shared.store import (
    STORES,
    ArtifactStore,
    LocalStore,
    LocalStoreConfig,
    S3Settings,
    S3Store,
    S3StoreConfig,
    StoreConfig,
    open_store,
    store_config,
)

SMALL_GRID = HashGridConfig(n_levels=2, n_features_per_level=2, log2_hashmap_size=8, base_resolution=4)


class Colour(str, Enum):
    RED = "red"


# -- the registry itself -----------------------------------------------------------------------------------------


def test_register_returns_the_builder_and_find_returns_it():
    shapes: Registry[str] = Registry("shape")

    @shapes.register("square")
    def square(side: int) -> str:
        return "#" * side

    assert square(2) == "##"  # the decorator leaves the function as it was
    assert shapes.find("square") is square
    assert shapes.kinds() == ["square"]
    assert "square" in shapes and "circle" not in shapes and 3 not in shapes


def test_unknown_kind_names_the_family_and_lists_known_kinds():
    shapes: Registry[str] = Registry("shape")
    shapes.add("triangle", str)
    shapes.add("square", str)
    with pytest.raises(UnknownKind) as info:
        shapes.find("circle")
    assert isinstance(info.value, ValueError)  # callers that caught ValueError before still do
    assert str(info.value) == "unknown shape 'circle'; known: square, triangle"
    assert info.value.known == ("square", "triangle")
    error = info.value.invalid_argument("config.shape")
    assert isinstance(error, InvalidArgument) and error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.field == "config.shape" and "circle" in error.message and "square" in error.message
    with pytest.raises(UnknownKind, match=r"known: \(none\)"):
        Registry("empty").find("anything")


def test_enum_kinds_are_their_values():
    colours: Registry[str] = Registry("colour")
    colours.add(Colour.RED, lambda: "r")
    assert colours.kinds() == ["red"]
    assert colours.find("red") is colours.find(Colour.RED)
    assert Colour.RED in colours


def test_build_passes_the_config_whose_kind_it_reads():
    class Config:
        def __init__(self, kind: str, size: int) -> None:
            self.kind, self.size = kind, size

    parts: Registry[tuple] = Registry("part")
    parts.add("pair", lambda config, extra: (config.size, extra))
    assert parts.build(Config("pair", 3), "x") == (3, "x")
    with pytest.raises(UnknownKind, match="unknown part 'triple'"):
        parts.build(Config("triple", 3), "x")


def test_availability_is_checked_only_when_asked():
    calls = []
    parts: Registry[str] = Registry("part")
    parts.add("here", str)
    parts.register("elsewhere", available=lambda: calls.append(1) or False)(str)
    assert calls == []  # registering never probes the machine
    assert parts.available_kinds() == ["here"] and parts.is_available("here") and not parts.is_available("elsewhere")
    with pytest.raises(UnknownKind):
        parts.is_available("nowhere")


def test_with_builders_overrides_a_copy_only():
    parts: Registry[str] = Registry("part")
    parts.add("a", lambda: "original")
    copy = parts.with_builders({"a": lambda: "override", Colour.RED: lambda: "new"})
    assert copy.find("a")() == "override" and copy.kinds() == ["a", "red"]
    assert parts.find("a")() == "original" and parts.kinds() == ["a"]


# -- every registry ----------------------------------------------------------------------------------------------


def test_priors_registry_lists_kinds_and_builds_each_on_cpu():
    assert {"analytic", "latent", "pixel"} <= set(PRIORS.kinds())
    prior = PRIORS.build(PriorSpec(name="a", kind=PriorKind.ANALYTIC, resolution=32), "default")
    assert isinstance(prior, DiffusionPrior) and prior.info.name == "a" and prior.info.kind == PriorKind.ANALYTIC
    for kind in (PriorKind.LATENT, PriorKind.PIXEL):  # the tiny architectures on random weights
        spec = PriorSpec(name=kind.value, kind=kind, source="random:tiny", device="cpu", dtype="float32")
        prior = PRIORS.build(spec, "default")
        assert isinstance(prior, DiffusionPrior) and prior.info.kind == kind and prior.info.name == kind.value


def test_prior_pool_refuses_a_kind_without_a_builder_naming_the_config_field():
    config = GuidanceConfig(priors=[PriorSpec(name="a", kind=PriorKind.ANALYTIC)])
    only_pixel: Registry[DiffusionPrior] = Registry("prior kind")
    only_pixel.add(PriorKind.PIXEL, lambda spec, checkpoint_id: None)
    with pytest.raises(InvalidArgument) as info:
        PriorPool(config, priors=only_pixel)
    assert info.value.field == "priors[0].kind" and "'analytic'" in info.value.message and "pixel" in info.value.message


def test_encodings_registry_lists_backends_and_builds_each_usable_one():
    assert {"torch", "tcnn", "triton"} <= set(ENCODINGS.kinds())
    assert "torch" in ENCODINGS.available_kinds()
    points = torch.rand(16, 3, generator=torch.Generator().manual_seed(0))
    for backend in ENCODINGS.available_kinds():
        grid = make_encoding(SMALL_GRID, backend, generator=torch.Generator().manual_seed(0))
        assert isinstance(grid, Encoding) and grid(points).shape == (16, SMALL_GRID.output_dim)
    with pytest.raises(UnknownKind, match="unknown hash-grid backend 'bogus'; known: .*torch"):
        make_encoding(SMALL_GRID, "bogus")


def test_rasterizers_registry_lists_backends_and_builds_each_usable_one():
    assert set(RASTERIZERS.kinds()) >= {"torch", "nvdiffrast"}
    for name in RASTERIZERS.available_kinds():
        assert isinstance(make_rasterizer(name), Rasterizer)
    assert isinstance(make_rasterizer(" Torch "), Rasterizer)
    with pytest.raises(UnknownKind, match="unknown rasteriser 'opengl'; known: nvdiffrast, torch"):
        make_rasterizer("opengl")
    # The fine stage's torch-free config names the same rasterisers (and "auto").
    assert set(RASTERIZER_NAMES) == {"auto", *RASTERIZERS.kinds()}


def test_stores_registry_builds_each_kind_from_its_typed_config(tmp_path):
    assert STORES.kinds() == ["local", "s3"]
    local = STORES.build(LocalStoreConfig(root=str(tmp_path / "local")))
    assert isinstance(local, LocalStore) and isinstance(local, ArtifactStore)
    local.put("jobs/j/a.txt", b"a")
    assert local.get("jobs/j/a.txt") == b"a"
    settings = S3Settings(endpoint="127.0.0.1:9", access_key="k", secret_key="s", secure=False)
    s3 = STORES.build(S3StoreConfig(bucket="artifacts", prefix="p", settings=settings))  # opening makes no request
    assert isinstance(s3, S3Store) and s3.settings == settings


def test_store_configs_are_a_discriminated_union(tmp_path):
    adapter = TypeAdapter(StoreConfig)
    assert adapter.validate_python({"kind": "local", "root": "x"}) == LocalStoreConfig(root="x")
    assert adapter.validate_python({"kind": "s3", "bucket": "b"}) == S3StoreConfig(bucket="b")
    with pytest.raises(ValidationError, match="kind"):
        adapter.validate_python({"kind": "ftp", "root": "x"})
    with pytest.raises(ValidationError):
        adapter.validate_python({"kind": "local", "bucket": "b"})  # fields of the other kind are refused


def test_store_uris_map_to_typed_configs(tmp_path):
    assert store_config("s3://bucket/some/prefix") == S3StoreConfig(bucket="bucket", prefix="some/prefix")
    assert store_config(f"file://{tmp_path}") == LocalStoreConfig(root=str(tmp_path))
    assert store_config("relative/dir") == LocalStoreConfig(root="relative/dir")
    with pytest.raises(ValueError, match="unsupported artifact store"):
        store_config("ftp://host/x")
    assert isinstance(open_store(str(tmp_path / "opened")), LocalStore)


def test_scene_service_refuses_an_unknown_encoding_backend_naming_the_field(tmp_path):
    from services.scene.server import SceneServiceConfig, SceneServicer

    servicer = SceneServicer(
        SceneServiceConfig(port=0, device="cpu", store_uri=str(tmp_path)), guidance=None, store=LocalStore(tmp_path)
    )
    with pytest.raises(InvalidArgument) as info:
        servicer._coarse_config(scene_pb2.StageConfig(prompt="a red torus", encoding_backend="cuda-magic"))
    assert info.value.field == "config.encoding_backend" and "torch" in info.value.message
    config = servicer._coarse_config(scene_pb2.StageConfig(prompt="a red torus", encoding_backend="torch"))
    assert config.field.backend == "torch"
