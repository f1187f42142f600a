"""deploy/: the RayService's serveConfigV2 is a valid Serve config whose import paths import and whose apps build,
built-in Kubernetes objects validate against their schemas (kubernetes-validate, where installed), every
guidance/registry YAML loads, and the manifests agree with one another and with the services' configs (StatefulSets
and their governing Services, probe and Service ports, Secret and ConfigMap references, the scene and orchestrator
configs, the kustomization and its images, the Dockerfiles). Nothing is started; kubectl (for `kubectl kustomize`)
is used where installed."""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.guidance.config import GuidanceConfig
from services.guidance.serve_app import GRPC_SERVICER_FUNCTION, SERVE_ENV, AppArgs, build_app
from shared.errors import NotFound
from shared.guidance_api import PriorKind
from shared.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
CONFIG = ROOT / "deploy" / "config"
DOCKERFILE = ROOT / "deploy" / "docker" / "guidance.Dockerfile"
KUBERNETES_VERSION = "1.30.0"


@functools.cache
def _documents() -> tuple[dict, ...]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return tuple(docs)


def documents() -> list[dict]:
    return copy.deepcopy(list(_documents()))


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
    assert {
        "Namespace", "ConfigMap", "Deployment", "Service", "PersistentVolumeClaim", "StatefulSet", "Secret",
        "PodDisruptionBudget", "Job",
    } <= checked


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
    assert [(p.name, p.kind, p.resolution) for p in guidance.priors] == [
        ("analytic", PriorKind.ANALYTIC, 64), ("analytic-lowres", PriorKind.ANALYTIC, 32)
    ]
    assert guidance.host == "127.0.0.1" and guidance.port == 50051
    registry = Registry.load(CONFIG / "registry.yaml")
    endpoint = registry.resolve("analytic")
    assert (endpoint.kind, endpoint.address, endpoint.prior) == ("standalone", "127.0.0.1:50051", "analytic")
    assert registry.resolve("default") == dataclasses.replace(endpoint, logical_name="default")
    # Every prior the local presets name resolves (the cpu-demo preset runs on this registry).
    from services.orchestrator.presets import PresetBook, plan_job, prior_names

    book = PresetBook.load(CONFIG / "presets.yaml")
    demo = plan_job(book, "cpu-demo", [], "a red torus", "", 0)
    for _, prior, _ in prior_names(demo):
        assert registry.resolve(prior).address == "127.0.0.1:50051"


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


# -- The whole system: MinIO, scene optimisers, orchestrator ---------------------------------------------------------

NAMESPACE = "magic3d"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
PROJECT_DOCKERFILES = {
    "scene": ROOT / "deploy" / "docker" / "scene.Dockerfile",
    "orchestrator": ROOT / "deploy" / "docker" / "orchestrator.Dockerfile",
}


def named(kind: str, name: str) -> dict:
    (doc,) = [d for d in of_kind(kind) if d["metadata"]["name"] == name]
    return doc


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def pod_templates() -> list[tuple[str, dict]]:
    """(owner, pod template) of every workload, the Ray pods included."""
    templates = [(f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]) for k in WORKLOAD_KINDS for d in of_kind(k)]
    return templates + [(f"RayService/{i}", t) for i, t in enumerate(ray_pod_templates())]


def containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def container_of(kind: str, name: str) -> dict:
    (container,) = named(kind, name)["spec"]["template"]["spec"]["containers"]
    return container


def secrets() -> dict[str, set[str]]:
    return {s["metadata"]["name"]: set(s.get("stringData", {})) | set(s.get("data", {})) for s in of_kind("Secret")}


def configmaps() -> dict[str, dict]:
    return {c["metadata"]["name"]: c.get("data", {}) for c in of_kind("ConfigMap")}


def projected_files(template: dict, mount_path: str) -> dict[str, tuple[str, str]]:
    """File name -> (ConfigMap, key) of the configMap/projected volume mounted at `mount_path` in the first container."""
    (mount,) = [m for m in template["spec"]["containers"][0]["volumeMounts"] if m["mountPath"] == mount_path]
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == mount["name"]]
    sources = [s["configMap"] for s in volume["projected"]["sources"]] if "projected" in volume else [volume["configMap"]]
    files = {}
    for source in sources:
        for item in source.get("items") or [{"key": k, "path": k} for k in configmaps()[source["name"]]]:
            files[item["path"]] = (source["name"], item["key"])
    return files


def resolved_env(container: dict) -> dict[str, str]:
    """The container's environment with secretKeyRefs replaced by the (placeholder) values of the Secrets."""
    values = {s["metadata"]["name"]: s.get("stringData", {}) for s in of_kind("Secret")}
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = values[ref["name"]][ref["key"]]
    return env


def port_numbers(container: dict) -> dict:
    """Port name and number -> number, for matching probes and Services' targetPorts."""
    ports = {}
    for port in container.get("ports", []):
        ports[port["containerPort"]] = port["containerPort"]
        if "name" in port:
            ports[port["name"]] = port["containerPort"]
    return ports


def test_every_manifest_lives_in_the_namespace_and_carries_the_part_of_label():
    for doc in documents():
        if doc["kind"] == "Kustomization":
            continue
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == NAMESPACE
            continue
        assert doc["metadata"].get("namespace") == NAMESPACE, (doc["kind"], doc["metadata"]["name"])
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == NAMESPACE, doc["metadata"]["name"]
    assert kustomization()["namespace"] == NAMESPACE


def test_kustomization_sets_the_tag_of_every_image():
    images = {entry["name"]: entry for entry in kustomization()["images"]}
    used = {c["image"] for _, t in pod_templates() for c in containers(t)}
    for image in used:
        repository, _, tag = image.rpartition(":")
        assert repository in images, f"{image}: not retaggable through kustomization images"
        assert images[repository].get("newTag") == tag, image  # one place states each version
    assert set(images) == {image.rpartition(":")[0] for image in used}


def test_kustomize_builds_every_object_into_the_namespace():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    built = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True)
    objects = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    assert len(objects) == len([d for d in documents() if d["kind"] != "Kustomization"])
    for doc in objects:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
    workloads = [doc for doc in objects if doc["kind"] in WORKLOAD_KINDS]
    images = {c["image"] for doc in workloads for c in doc["spec"]["template"]["spec"]["containers"]}
    assert {"ghcr.io/magic3d/scene:0.1.0", "ghcr.io/magic3d/orchestrator:0.1.0"} <= images


def test_statefulsets_are_governed_by_services_that_select_their_pods():
    services = {s["metadata"]["name"]: s for s in of_kind("Service")}
    for statefulset in of_kind("StatefulSet"):
        name = statefulset["metadata"]["name"]
        service = services[statefulset["spec"]["serviceName"]]
        labels = statefulset["spec"]["template"]["metadata"]["labels"]
        assert statefulset["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        assert service["spec"]["selector"].items() <= labels.items(), name
    # The scene replicas' stable DNS names (scene-N.scene) need a headless governing Service.
    scene = named("StatefulSet", "scene")
    headless = services[scene["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    assert [(p["name"], p["port"]) for p in headless["spec"]["ports"]] == [("grpc", 50061)]


def test_every_probe_and_service_port_is_a_container_port():
    probes = 0
    for owner, template in pod_templates():
        for container in containers(template):
            ports = port_numbers(container)
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                if probe is None:
                    continue
                probes += 1
                for handler in ("grpc", "httpGet", "tcpSocket"):
                    if handler in probe:
                        assert probe[handler]["port"] in ports, (owner, container["name"], kind)
                if "grpc" in probe:
                    assert "--port" not in container.get("command", []) or (
                        str(probe["grpc"]["port"]) == container["command"][container["command"].index("--port") + 1]
                    ), (owner, kind)
    assert probes >= 9
    templates = [t for _, t in pod_templates()]
    for service in of_kind("Service"):
        # KubeRay adds ray.io/* labels to the pods it creates; match on the rest.
        selector = {k: v for k, v in service["spec"]["selector"].items() if not k.startswith("ray.io/")}
        selected = [t for t in templates if selector.items() <= t["metadata"]["labels"].items()]
        assert selected, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for template in selected:
                assert any(target in port_numbers(c) for c in template["spec"]["containers"]), (
                    service["metadata"]["name"], target,
                )


def test_every_secret_and_configmap_reference_exists():
    known_secrets, known_maps = secrets(), configmaps()
    references = 0
    for owner, template in pod_templates():
        for container in containers(template):
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef") or var.get("valueFrom", {}).get("configMapKeyRef")
                if ref is None or ref.get("optional"):
                    continue  # optional references (the Hugging Face token) may be absent
                references += 1
                known = known_secrets if "secretKeyRef" in var["valueFrom"] else known_maps
                assert ref["name"] in known, (owner, var["name"], ref["name"])
                assert ref["key"] in known[ref["name"]], (owner, var["name"], ref["key"])
        for volume in template["spec"].get("volumes", []):
            sources = [s["configMap"] for s in volume.get("projected", {}).get("sources", []) if "configMap" in s]
            sources += [volume["configMap"]] if "configMap" in volume else []
            for source in sources:
                references += 1
                assert source["name"] in known_maps, (owner, source["name"])
                for item in source.get("items", []):
                    assert item["key"] in known_maps[source["name"]], (owner, source["name"], item["key"])
            if "secret" in volume:
                assert volume["secret"]["secretName"] in known_secrets, owner
    assert references >= 15


def test_scene_statefulset_one_gpu_per_replica_graceful_and_disruption_budget():
    statefulset = named("StatefulSet", "scene")
    spec = statefulset["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 120  # room to checkpoint on SIGTERM
    container = container_of("StatefulSet", "scene")
    assert container["command"] == [
        "python", "-m", "services.scene.server", "--config", "/etc/magic3d/scene.yaml",
        "--host", "0.0.0.0", "--port", "50061",
    ]
    assert container["resources"]["limits"]["nvidia.com/gpu"] in ("1", 1)
    assert {"grpc"} == {kind for p in ("startupProbe", "readinessProbe", "livenessProbe") for kind in container[p]} - {
        "periodSeconds", "timeoutSeconds", "failureThreshold", "initialDelaySeconds",
    }
    budget = named("PodDisruptionBudget", "scene")
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert projected_files(spec["template"], "/etc/magic3d") == {
        "scene.yaml": ("scene-config", "scene.yaml"),
        "registry.yaml": ("guidance-config", "registry.yaml"),
    }


def test_scene_configmap_is_the_local_scene_config_with_cluster_values():
    from services.scene.server import SceneServiceConfig

    text = configmaps()["scene-config"]["scene.yaml"]
    cluster = SceneServiceConfig.model_validate(yaml.safe_load(text))
    assert cluster.host == "0.0.0.0" and cluster.port == 50061
    assert cluster.store_uri == "s3://magic3d-artifacts"
    assert str(cluster.registry_path) == "/etc/magic3d/registry.yaml"
    local = yaml.safe_load((CONFIG / "scene.yaml").read_text())
    deployed = yaml.safe_load(text)
    assert cluster.metrics_port == port_numbers(container_of("StatefulSet", "scene"))["metrics"]
    cluster_only = {"host", "device", "store_uri", "registry_path", "metrics_port"}
    assert {k: v for k, v in deployed.items() if k not in cluster_only} == {
        k: v for k, v in local.items() if k not in cluster_only
    }
    ports = port_numbers(container_of("StatefulSet", "scene"))
    assert ports["grpc"] == cluster.port


def orchestrator_config() -> dict:
    return yaml.safe_load((CONFIG / "orchestrator.yaml").read_text())


def test_orchestrator_config_parses_and_matches_the_scene_statefulset():
    config = orchestrator_config()
    assert set(config) >= {
        "host", "port", "metrics_port", "database_path", "store_uri", "scene_replicas", "jobs_per_replica",
        "queue_size", "checkpoint_every", "registry_path", "presets_path",
    }
    assert (config["port"], config["metrics_port"]) == (50051, 9090)
    assert (config["jobs_per_replica"], config["queue_size"], config["checkpoint_every"]) == (1, 16, 500)
    # The server's own typed config accepts it (extra fields are refused there).
    from services.orchestrator.server import OrchestratorConfig

    assert OrchestratorConfig.model_validate(config).scene_replicas == config["scene_replicas"]
    # The ConfigMap holds the same configuration as the file.
    assert yaml.safe_load(configmaps()["orchestrator-config"]["orchestrator.yaml"]) == config
    # One address per scene replica: <statefulset>-<ordinal>.<headless service>:<grpc port>.
    scene = named("StatefulSet", "scene")
    service = named("Service", scene["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    (port,) = [p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"]
    pod, governing = scene["metadata"]["name"], service["metadata"]["name"]
    expected = [f"{pod}-{i}.{governing}:{port}" for i in range(scene["spec"]["replicas"])]
    assert config["scene_replicas"] == expected
    # The store is the one the scene replicas write to.
    assert config["store_uri"] == yaml.safe_load(configmaps()["scene-config"]["scene.yaml"])["store_uri"]


def test_orchestrator_statefulset_database_volume_config_mounts_and_ports():
    config = orchestrator_config()
    statefulset = named("StatefulSet", "orchestrator")
    assert statefulset["spec"]["replicas"] == 1  # SQLite: one writer
    template = statefulset["spec"]["template"]
    container = container_of("StatefulSet", "orchestrator")
    assert container["command"] == [
        "python", "-m", "services.orchestrator.server", "--config", "/etc/magic3d/orchestrator.yaml",
        "--host", "0.0.0.0",
    ]
    ports = port_numbers(container)
    assert (ports["grpc"], ports["metrics"], ports["http"]) == (config["port"], config["metrics_port"], config["http_port"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == config["port"]
    # The database lies on the claim template's volume.
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert Path(config["database_path"]).parent == Path(mounts[claim["metadata"]["name"]])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert template["spec"]["securityContext"]["fsGroup"] == template["spec"]["securityContext"]["runAsUser"]
    # Config, presets and registry side by side at the paths the config names.
    files = projected_files(template, "/etc/magic3d")
    assert files["orchestrator.yaml"] == ("orchestrator-config", "orchestrator.yaml")
    assert Path(config["presets_path"]) == Path("/etc/magic3d") / "presets.yaml"
    assert files["presets.yaml"] == ("magic3d-presets", "presets.yaml")
    assert Path(config["registry_path"]) == Path("/etc/magic3d") / "registry.yaml"
    assert files["registry.yaml"] == ("guidance-config", "registry.yaml")
    # Prometheus finds the metrics port through the usual annotations.
    service = named("Service", statefulset["spec"]["serviceName"])
    for notes in (service["metadata"]["annotations"], template["metadata"]["annotations"]):
        assert notes["prometheus.io/scrape"] == "true"
        assert notes["prometheus.io/port"] == str(config["metrics_port"])
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": 50051, "metrics": 9090, "http": 8080}


def preset_names(data) -> set[str]:
    presets = data.get("presets", data) if isinstance(data, dict) else data
    if isinstance(presets, list):
        return {p["name"] for p in presets}
    return set(presets)


def test_presets_configmap_is_the_shipped_presets_file_and_loads(tmp_path):
    from services.orchestrator.presets import PresetBook

    presets = configmaps()["magic3d-presets"]
    assert set(presets) == {"presets.yaml"}
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "k8s_presets.py"), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert yaml.safe_load(presets["presets.yaml"]) == yaml.safe_load((CONFIG / "presets.yaml").read_text())
    mounted = tmp_path / "presets.yaml"  # what the pod reads at /etc/magic3d/presets.yaml
    mounted.write_text(presets["presets.yaml"])
    book = PresetBook.load(mounted)
    for name in ("magic3d", "fast", "cpu-demo", "magic123", "image-cpu-demo"):
        assert book.get(name).stages


def test_services_reach_minio_with_valid_s3_settings():
    from shared.store.s3 import ENV_PREFIX, S3Settings, parse_s3_uri

    minio = named("Service", "minio")
    minio_ports = {p["name"]: p["port"] for p in minio["spec"]["ports"]}
    assert minio_ports == {"api": 9000, "console": 9001}
    setup = named("Job", "minio-setup")
    script = setup["spec"]["template"]["spec"]["containers"][0]["args"][0]
    for name in ("scene", "orchestrator"):
        env = resolved_env(container_of("StatefulSet", name))
        known = {ENV_PREFIX + f.upper() for f in S3Settings.model_fields}
        unknown = {k for k in env if k.startswith(ENV_PREFIX)} - known
        assert not unknown, (name, unknown)
        settings = S3Settings.from_env(env)
        assert settings.endpoint == f"minio.{NAMESPACE}.svc.cluster.local:{minio_ports['api']}" and not settings.secure
        assert settings.access_key and settings.secret_key is not None
        # The services' user is the one the setup Job creates (same Secret keys).
        assert settings.access_key == resolved_env(setup["spec"]["template"]["spec"]["containers"][0])["S3_ACCESS_KEY"]
    bucket, _ = parse_s3_uri(orchestrator_config()["store_uri"])
    assert f"mb --ignore-existing magic3d/{bucket}" in script
    policy = json.loads(re.search(r"<<'POLICY'\n(.*?)\nPOLICY\n", script, re.S).group(1))
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}  # that bucket only
    # MinIO's region is the one the services sign with.
    minio_env = resolved_env(container_of("StatefulSet", "minio"))
    assert minio_env["MINIO_SITE_REGION"] == resolved_env(container_of("StatefulSet", "scene"))["MAGIC3D_S3_REGION"]
    if shutil.which("sh"):
        subprocess.run(["sh", "-n", "-c", script], check=True, timeout=10)


def test_minio_statefulset_storage_and_image():
    statefulset = named("StatefulSet", "minio")
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    container = container_of("StatefulSet", "minio")
    assert container["image"].startswith("quay.io/minio/minio:")
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]}[claim["metadata"]["name"]] == "/data"
    assert container["command"][:3] == ["minio", "server", "/data"]
    assert set(port_numbers(container)) >= {"api", "console", 9000, 9001}
    assert {"root-user", "root-password"} <= secrets()["minio-root"]
    assert len(named("Secret", "minio-root")["stringData"]["root-password"]) >= 8  # MinIO's minimum


def test_rayservice_autoscales_and_requests_gpus():
    cluster = rayservice()["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    for app in serve_config()["applications"]:
        settings = AppArgs.model_validate(app["args"]).settings
        assert settings.min_replicas < settings.max_replicas, app["name"]
    gpu_apps = [a for a in serve_config()["applications"] if AppArgs.model_validate(a["args"]).settings.num_gpus > 0]
    assert {a["name"] for a in gpu_apps} == {"pixel", "latent"}
    (gpu_group,) = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu"]
    resources = gpu_group["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
    assert gpu_group["minReplicas"] < gpu_group["maxReplicas"]


@pytest.mark.parametrize("service", sorted(PROJECT_DOCKERFILES))
def test_project_dockerfiles_install_generate_protos_and_run_as_non_root(service):
    text = PROJECT_DOCKERFILES[service].read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert re.search(r"^RUN .*pip install", text, re.M) and "scripts/gen_protos.sh" in text
    assert "cannot pull base images" in text  # says why it has not been built here
    (user,) = re.findall(r"^USER (\S+)$", text, re.M)
    assert user not in ("0", "root")
    for path in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (ROOT / path).exists(), path
    command = json.loads(re.search(r"^CMD (\[.+\])$", text, re.M).group(1))
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert (ROOT / command[command.index("--config") + 1]).is_file()
    # The image runs what the StatefulSet runs, and is tagged as the manifest pulls it.
    container = container_of("StatefulSet", service)
    assert command[:3] == container["command"][:3]
    assert f"-t {container['image']} ." in text
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    assert set(p["containerPort"] for p in container["ports"]) <= exposed


def test_every_grpc_server_gets_the_service_token_and_the_orchestrator_its_client_tokens(tmp_path, monkeypatch):
    """Servers listening on 0.0.0.0 refuse to start without tokens: every pod must be given them."""
    from shared.auth import AuthConfig, TokenTable, server_tokens

    (auth,) = [s for s in of_kind("Secret") if s["metadata"]["name"] == "magic3d-auth"]
    containers = [
        container_of("StatefulSet", "orchestrator"), container_of("StatefulSet", "scene"),
        container_of("Deployment", "guidance-standalone"),
    ]
    (ray,) = of_kind("RayService")
    cluster = ray["spec"]["rayClusterConfig"]
    containers += [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]]
    containers += [group["template"]["spec"]["containers"][0] for group in cluster["workerGroupSpecs"]]
    for container in containers:
        (var,) = [v for v in container.get("env", []) if v["name"] == "MAGIC3D_SERVICE_TOKEN"]
        assert var["valueFrom"]["secretKeyRef"] == {"name": "magic3d-auth", "key": "service-token"}, container["name"]
    orchestrator = named("StatefulSet", "orchestrator")["spec"]["template"]["spec"]
    (var,) = [v for v in orchestrator["containers"][0]["env"] if v["name"] == "MAGIC3D_TOKENS_FILE"]
    path = Path(var["value"])
    (mount,) = [m for m in orchestrator["containers"][0]["volumeMounts"] if m["mountPath"] == str(path.parent)]
    (volume,) = [v for v in orchestrator["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "magic3d-auth"
    assert [i["path"] for i in volume["secret"]["items"] if i["key"] == "client-tokens.yaml"] == [path.name]
    local = tmp_path / path.name
    local.write_text(auth["stringData"]["client-tokens.yaml"])
    monkeypatch.setenv("MAGIC3D_TOKENS_FILE", str(local))
    assert len(TokenTable.load(local)) == 2
    assert server_tokens(AuthConfig().client_tokens(), "0.0.0.0", False, "orchestrator") is not None
