"""deploy/: the RayService's serveConfigV2 is a valid Serve config whose import paths import and whose apps build,
built-in Kubernetes objects validate against their schemas (kubernetes-validate, where installed), and every
guidance/registry YAML loads. Nothing is started."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
from pathlib import Path

import pytest
import yaml

from services.guidance.config import GuidanceConfig
from services.guidance.priors.base import PriorKind
from services.guidance.serve_app import GRPC_SERVICER_FUNCTION, SERVE_ENV, AppArgs, build_app
from shared.errors import NotFound
from shared.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
CONFIG = ROOT / "deploy" / "config"
DOCKERFILE = ROOT / "deploy" / "docker" / "guidance.Dockerfile"
KUBERNETES_VERSION = "1.30.0"


def documents() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def of_kind(kind: str) -> list[dict]:
    return [doc for doc in documents() if doc.get("kind") == kind]


def rayservice() -> dict:
    (service,) = of_kind("RayService")
    return service


def serve_config() -> dict:
    return yaml.safe_load(rayservice()["spec"]["serveConfigV2"])


def import_attr(path: str):
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def test_serve_config_is_a_valid_serve_deploy_schema():
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_config())
    assert {app.name for app in schema.applications} == {"analytic", "pixel", "latent"}
    assert schema.grpc_options.port == 9000
    assert schema.grpc_options.grpc_servicer_functions == [GRPC_SERVICER_FUNCTION]
    assert len({app.route_prefix for app in schema.applications}) == 3


def test_every_import_path_imports_and_every_app_builds():
    from ray.serve import Application

    config = serve_config()
    for function in config["grpc_options"]["grpc_servicer_functions"]:
        assert callable(import_attr(function))
    for app in config["applications"]:
        builder = import_attr(app["import_path"])
        assert isinstance(builder(app["args"]), Application), app["name"]
        args = AppArgs.model_validate(app["args"])
        # The builder's settings must describe the app it is deployed as.
        assert args.settings.name == app["name"] and args.settings.route_prefix == app["route_prefix"]
        resolved = args.settings.resolved(args.guidance_config())
        assert resolved.max_ongoing_requests >= resolved.max_batch_size
        assert resolved.max_queued_requests is not None


def test_app_families_and_gpu_fractions():
    kinds = {}
    for app in serve_config()["applications"]:
        args = AppArgs.model_validate(app["args"])
        kinds[app["name"]] = ({p.kind for p in args.guidance_config().priors}, args.settings.num_gpus)
    assert kinds["analytic"] == ({PriorKind.ANALYTIC}, 0)
    assert kinds["pixel"][0] == {PriorKind.PIXEL} and 0 < kinds["pixel"][1] <= 1
    assert kinds["latent"][0] == {PriorKind.LATENT} and 0 < kinds["latent"][1] <= 1


def test_build_app_defaults_and_config_path():
    from ray.serve import Application

    assert isinstance(build_app({}), Application)
    assert isinstance(build_app({"guidance_path": str(CONFIG / "guidance.yaml")}), Application)
    with pytest.raises(ValueError):
        AppArgs.model_validate({"guidance_path": "x.yaml", "guidance": {"priors": [{"name": "a", "kind": "analytic"}]}})
    with pytest.raises(ValueError):
        AppArgs.model_validate({"settings": {"max_batch_size": 16, "max_ongoing_requests": 4}})


def ray_pod_templates() -> list[dict]:
    cluster = rayservice()["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [group["template"] for group in cluster["workerGroupSpecs"]]


def test_ray_pods_carry_the_serve_environment_and_ports():
    for template in ray_pod_templates():
        (container,) = template["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        for key, value in SERVE_ENV.items():
            assert env.get(key) == value, (container["name"], key)
        assert 9000 in {p["containerPort"] for p in container["ports"]}
        assert template["metadata"]["labels"]["app.kubernetes.io/name"] == "guidance-ray"
    (grpc_service,) = [s for s in of_kind("Service") if s["metadata"]["name"] == "guidance-serve-grpc"]
    assert grpc_service["spec"]["ports"][0]["targetPort"] == serve_config()["grpc_options"]["port"]
    assert grpc_service["spec"]["selector"]["app.kubernetes.io/name"] == "guidance-ray"


def test_rayservice_shape():
    service = rayservice()
    assert service["apiVersion"] == "ray.io/v1"
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == importlib.import_module("ray").__version__
    assert cluster["enableInTreeAutoscaling"] is True
    gpu_groups = [
        g for g in cluster["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    ]
    assert gpu_groups, "pixel and latent apps need a GPU worker group"
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


@pytest.fixture(scope="module")
def kv():
    return pytest.importorskip("kubernetes_validate")


def test_builtin_kinds_validate_against_kubernetes_schemas(kv):
    checked = set()
    for doc in documents():
        if doc["apiVersion"].startswith("ray.io/") or doc["kind"] == "Kustomization":
            continue
        kv.validate(doc, KUBERNETES_VERSION, strict=True)
        checked.add(doc["kind"])
    assert {"Namespace", "ConfigMap", "Deployment", "Service", "PersistentVolumeClaim"} <= checked


def test_ray_pod_templates_validate_as_pod_templates(kv):
    for index, template in enumerate(ray_pod_templates()):
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"ray-{index}"},
            "template": template,
        }
        kv.validate(pod_template, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    (kustomization,) = [d for d in documents() if d.get("kind") == "Kustomization"]
    manifests = {p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


def test_configmap_holds_a_valid_guidance_config_and_registry():
    (configmap,) = [c for c in of_kind("ConfigMap") if c["metadata"]["name"] == "guidance-config"]
    guidance = GuidanceConfig.model_validate(yaml.safe_load(configmap["data"]["guidance.yaml"]))
    assert guidance.host == "0.0.0.0" and [p.name for p in guidance.priors] == ["analytic"]
    registry = Registry.from_yaml(configmap["data"]["registry.yaml"])
    apps = {app["name"]: app for app in serve_config()["applications"]}
    for name in registry.names():
        endpoint = registry.resolve(name)
        if endpoint.kind == "serve":
            assert endpoint.application in apps, name
            served = {p.name for p in AppArgs.model_validate(apps[endpoint.application]["args"]).guidance_config().priors}
            assert endpoint.prior in served, name
            assert endpoint.address.endswith(":9000")
        else:
            assert endpoint.address.endswith(":50051") and endpoint.prior == "analytic"
    (deployment,) = of_kind("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "/etc/magic3d/guidance.yaml" in container["command"]


def test_default_local_configs():
    guidance = GuidanceConfig.load(CONFIG / "guidance.yaml")
    assert [(p.name, p.kind) for p in guidance.priors] == [("analytic", PriorKind.ANALYTIC)]
    assert guidance.host == "127.0.0.1" and guidance.port == 50051
    registry = Registry.load(CONFIG / "registry.yaml")
    endpoint = registry.resolve("analytic")
    assert (endpoint.kind, endpoint.address, endpoint.prior) == ("standalone", "127.0.0.1:50051", "analytic")
    assert registry.resolve("default") == dataclasses.replace(endpoint, logical_name="default")


def test_registry_aliases_metadata_and_errors():
    registry = Registry.model_validate(
        {
            "priors": {
                "sd": {"kind": "serve", "address": "h:9000", "application": "latent", "prior": "sd-2.1-base"},
                "dog": {"kind": "alias", "target": "sd", "checkpoint_id": "dreambooth-dog"},
                "fine": {"kind": "alias", "target": "dog"},
            }
        }
    )
    fine = registry.resolve("fine")
    assert (fine.prior, fine.checkpoint_id, fine.application) == ("sd-2.1-base", "dreambooth-dog", "latent")
    assert dict(fine.metadata) == {"application": "latent", "multiplexed_model_id": "sd-2.1-base:dreambooth-dog"}
    assert dict(registry.resolve("sd").metadata)["multiplexed_model_id"] == "sd-2.1-base:default"
    with pytest.raises(NotFound):
        registry.resolve("nope")
    with pytest.raises(ValueError, match="cycle"):
        Registry.model_validate({"priors": {"a": {"kind": "alias", "target": "b"}, "b": {"kind": "alias", "target": "a"}}})
    with pytest.raises(ValueError, match="unknown prior"):
        Registry.model_validate({"priors": {"a": {"kind": "alias", "target": "missing"}}})
    with pytest.raises(ValueError):
        Registry.model_validate({"priors": {"a": {"kind": "serve", "address": "h:9000"}}})  # no application


def test_dockerfile_builds_from_python_slim_with_bootstrap():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert "scripts/bootstrap.sh" in text
    # The container listens on every interface of the container: --host overrides the config's loopback default.
    command = json.loads(re.search(r"^CMD (\[.+\])$", text, re.M).group(1))
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert (ROOT / command[command.index("--config") + 1]).is_file()
    for path in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (ROOT / path).exists(), path
