"""Kubernetes manifests: KubeRay CRD schema, placement and security invariants, agreement with the
local Serve config and the engine config, and a linted Dockerfile."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster.config import load_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"


def _docs():
    return [d for path in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def rayservice():
    (service,) = [d for d in _docs() if d.get("kind") == "RayService"]
    return service


@pytest.fixture(scope="module")
def serve_config(rayservice):
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def _containers(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


def _ray_resources(group) -> dict:
    raw = group["rayStartParams"].get("resources", '"{}"')
    return json.loads(json.loads(raw))  # KubeRay's quoting: a JSON string holding a JSON object


def test_every_manifest_parses_and_kustomization_lists_them():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert all("kind" in d and "apiVersion" in d for d in _docs())


def strict(schema):
    """The CRD schema as `kubectl apply` enforces it (strict field validation, the default): an object
    with declared properties takes no others, unless it preserves unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_schema():
    schema = json.loads((K8S / "crd" / "rayservice-v1-schema.json").read_text())
    assert "v1.7.0" in schema["source"]
    return strict(schema["openAPIV3Schema"])


def test_rayservice_matches_the_kuberay_crd_schema(rayservice, crd_schema):
    jsonschema.validate(rayservice, crd_schema)


@pytest.mark.parametrize("break_it", [
    lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].__setitem__("minReplicas", "one"),
    lambda m: m["spec"]["rayClusterConfig"]["headGroupSpec"].__setitem__(
        "rayStartParamz", m["spec"]["rayClusterConfig"]["headGroupSpec"].pop("rayStartParams")),
    lambda m: m["spec"].__setitem__("bogus", 1),
    lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"].__setitem__("nodeSelektor", {}),
    lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].__setitem__(
        "imagePullPolicyy", "Always"),
], ids=["wrong-type", "misspelled-rayStartParams", "unknown-spec-key", "misspelled-nodeSelector",
        "misspelled-container-field"])
def test_the_schema_rejects_what_kubectl_would(rayservice, crd_schema, break_it):
    broken = json.loads(json.dumps(rayservice))
    break_it(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, crd_schema)


def test_draft_and_target_groups_offer_what_the_pools_ask_for(rayservice, serve_config):
    groups = {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == {"draft", "target", "ingress"}
    engine = load_config(ROOT / serve_config["applications"][0]["args"]["config"], check_paths=False)
    draft, target = _ray_resources(groups["draft"]), _ray_resources(groups["target"])
    assert set(engine.cluster.draft_pool.resources) <= set(draft) and not set(engine.cluster.draft_pool.resources) & set(target)
    assert set(engine.cluster.target_pool.resources) <= set(target) and not set(engine.cluster.target_pool.resources) & set(draft)
    ingress = serve_config["applications"][0]["args"]["ray_actor_options"]["resources"]
    # Serve replicas (and their gRPC port) live on CPU ingress pods, apart from both GPU groups
    assert set(ingress) <= set(_ray_resources(groups["ingress"])) and not set(ingress) & (set(draft) | set(target))
    assert "nvidia.com/gpu" not in groups["ingress"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    for name in ("draft", "target"):
        spec = groups[name]["template"]["spec"]
        gpus = spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        assert int(gpus) >= 1 and spec["nodeSelector"] and spec["tolerations"]
    assert groups["draft"]["template"]["spec"]["nodeSelector"] != groups["target"]["template"]["spec"]["nodeSelector"]
    assert engine.cluster.draft_pool.num_gpus > 0 and engine.cluster.target_pool.num_gpus > 0


def test_autoscaling_bounds(rayservice, serve_config):
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    for group in cluster["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    autoscaling = serve_config["applications"][0]["args"]["autoscaling_config"]
    assert 1 <= autoscaling["min_replicas"] <= autoscaling["max_replicas"]
    assert autoscaling["policy"]["policy_function"] == "deployments.autoscaling:ingress_policy"  # counts gRPC too


def test_groups_scale_apart_within_the_pools_bounds(rayservice, serve_config):
    """Each group's bounds are its pool's: the shared draft and target pools scale between replicas and
    max_replicas, Ray's autoscaler adds the pods their actors ask for, and ingress pods follow the Serve
    replicas."""
    groups = {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    args = serve_config["applications"][0]["args"]
    engine = load_config(ROOT / args["config"], check_paths=False)
    assert engine.cluster.shared_pools.enabled
    for name, pool in (("draft", engine.cluster.draft_pool), ("target", engine.cluster.target_pool)):
        assert groups[name]["minReplicas"] >= pool.replicas and groups[name]["maxReplicas"] == pool.max_replicas
        assert pool.max_replicas > pool.replicas  # it can scale
    assert groups["ingress"]["maxReplicas"] == args["autoscaling_config"]["max_replicas"]


def test_ports_probes_limits_and_security(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    ports = {(name, p["name"]): p["containerPort"] for name, c in _containers(rayservice) for p in c.get("ports", [])}
    assert ports[("head", "serve")] == 8000 and ports[("ingress", "grpc")] == 50051
    assert 8265 not in ports.values()  # the dashboard is never published
    for name, container in _containers(rayservice):
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), (name, kind)
        assert container.get("readinessProbe") and container.get("livenessProbe"), name
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    for group in [head] + cluster["workerGroupSpecs"]:
        assert group["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    (grpc_service,) = [d for d in _docs() if d.get("kind") == "Service"]
    assert grpc_service["spec"]["type"] == "ClusterIP" and grpc_service["spec"]["ports"][0]["port"] == 50051
    ingress_labels = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "ingress")["template"]["metadata"]["labels"]
    assert grpc_service["spec"]["selector"].items() <= ingress_labels.items()
    keys = [e for _, c in _containers(rayservice) for e in c.get("env", []) if e["name"] == "SPECDEC_API_KEY"]
    assert keys and all("secretKeyRef" in e["valueFrom"] for e in keys)  # from a Secret, never inline


def test_serve_config_validates_and_agrees_with_the_local_one(serve_config):
    ServeDeploySchema.model_validate(serve_config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(serve_config)
    local = yaml.safe_load((ROOT / "deployments" / "configs" / "serve.yaml").read_text())
    serve_config = json.loads(json.dumps(serve_config))  # a copy: the module's fixture stays intact
    k8s_app, local_app = serve_config["applications"][0], local["applications"][0]
    assert k8s_app["args"].pop("config") == "configs/k8s.yaml"
    local_app["args"].pop("config")
    # Pods listen on every interface (behind Services and the API key); the local config on loopback only.
    assert k8s_app["args"].pop("grpc_host") == "0.0.0.0" and local_app["args"].pop("grpc_host") == "127.0.0.1"
    assert serve_config["http_options"]["host"] == "0.0.0.0" and local["http_options"]["host"] == "127.0.0.1"
    assert k8s_app == local_app  # only the engine config and the bind addresses may differ
    assert serve_config["http_options"]["port"] == local["http_options"]["port"]


def test_versions_agree():
    pyproject = (ROOT / "pyproject.toml").read_text()
    ray_pin = re.search(r'"ray\[serve\]==([\d.]+)"', pyproject).group(1)
    rayservice = next(d for d in _docs() if d.get("kind") == "RayService")
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == ray_pin
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={ray_pin}" in dockerfile and "py311" in dockerfile
    assert "bash tools/setup.sh" in dockerfile  # the image installs with CI's own script


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
