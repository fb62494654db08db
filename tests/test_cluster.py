"""cluster.yaml passes Ray's own autoscaler validation and keeps the promised properties."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).parents[1] / "cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_ray_validates_the_cluster_config():
    """The same steps `ray up` takes before it launches anything: fill defaults, validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load()))


def test_gpu_workers_scale_from_zero_and_idle_nodes_go_away():
    config = load()
    assert config["available_node_types"]["gpu_worker"]["min_workers"] == 0
    assert config["idle_timeout_minutes"] > 0
    assert "InstanceType" in config["available_node_types"]["gpu_worker"]["node_config"]


def test_dashboard_is_not_open_and_token_auth_is_on():
    config = load()
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "RAY_AUTH_MODE=token" in start
    # Every node uses a security group the user made: Ray then creates none (the group it creates
    # admits SSH from 0.0.0.0/0 whatever the config says).
    assert "security_group" not in config["provider"]
    assert all(node["node_config"]["SecurityGroupIds"] for node in config["available_node_types"].values())


def test_the_auth_token_reaches_every_node_without_being_printed():
    """The token file is mounted on every node (the launcher syncs file_mounts to workers too) and
    no command prints it (`ray get-auth-token` writes the token to stdout, into `ray up`'s output)."""
    config = load()
    assert config["file_mounts"]["~/.ray/auth_token"]
    commands = [c for key, cs in config.items() if key.endswith("_commands") for c in cs]
    assert not any("get-auth-token" in c for c in commands)
    assert all("RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"] if "ray start" in c)
    install = " ".join(config["setup_commands"])
    assert "ray-rec @ git+" in install and re.search(r"@[0-9a-f]{40}\"", install)  # pinned, not from the index


def test_no_credentials_in_the_file():
    text = CLUSTER.read_text()
    assert "aws_access_key_id" not in text.lower() and "AKIA" not in text
    for node in load()["available_node_types"].values():
        assert "IamInstanceProfile" in node["node_config"]


KUBERAY = Path(__file__).parents[1] / "deploy" / "kuberay"
CRDS = Path(__file__).parents[2] / "shared" / "kuberay-crds"


def _manifests() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(KUBERAY.glob("*.yaml"))}


def _ray_clusters() -> list[dict]:
    m = _manifests()
    return [m["rayjob-train.yaml"]["spec"]["rayClusterSpec"], m["rayservice.yaml"]["spec"]["rayClusterConfig"]]


def _unknown_fields(value: object, schema: dict, where: str = "") -> list[str]:
    """Fields the CRD's structural schema does not declare: Kubernetes would silently drop them."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{where}.{key}")
            else:
                found += _unknown_fields(item, schema["properties"][key], f"{where}.{key}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            found += _unknown_fields(item, schema["additionalProperties"], f"{where}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += _unknown_fields(item, schema["items"], f"{where}[{i}]")
    return found


def test_kuberay_manifests_satisfy_kuberays_own_schemas():
    """Each manifest against KubeRay 1.7.0's CRD schema: types, enums, required fields, and no
    field the operator does not know (a typo would otherwise be dropped without a word)."""
    import jsonschema

    if not CRDS.is_dir():
        pytest.skip(f"{CRDS} is absent (it comes with ../shared)")
    schemas = {}
    for path in CRDS.glob("*.yaml"):
        for crd in yaml.safe_load_all(path.read_text()):
            if crd:
                schemas[crd["spec"]["names"]["kind"]] = {v["name"]: v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"]}
    for name, manifest in _manifests().items():
        schema = schemas[manifest["kind"]][manifest["apiVersion"].split("/")[1]]
        errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(manifest)]
        assert not errors, (name, errors[:3])
        assert not _unknown_fields(manifest, schema), (name, _unknown_fields(manifest, schema))
    broken = _manifests()["rayservice.yaml"]
    broken["spec"]["rayClusterConfig"]["authOptionz"] = {"mode": "token"}  # the check can fail
    assert _unknown_fields(broken, schemas["RayService"]["v1"]) == [".spec.rayClusterConfig.authOptionz"]


def test_kuberay_clusters_use_token_auth_a_network_policy_and_locked_down_pods():
    for cluster in _ray_clusters():
        assert cluster["authOptions"]["mode"] == "token"
        assert cluster["networkPolicy"]["mode"].startswith("DenyAll")
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for group in groups:
            pod = group["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            for container in pod["containers"]:
                sc = container["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
                assert sc["capabilities"]["drop"] == ["ALL"]
                assert not [e for e in container.get("env", []) if "value" in e and "KEY" in e["name"].upper()]


def test_the_rayservice_runs_the_serve_app_with_the_key_and_redis_from_secrets():
    from ray_rec.config import ServeConfig

    service = _manifests()["rayservice.yaml"]
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "ray_rec.serve.app:build_app"
    args = ServeConfig(**app["args"])  # the application's arguments as the replicas will check them
    assert args.state.backend == "redis"
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    for env in (args.api_key_env, args.state.url_env, args.state.password_env):
        sources = [e["valueFrom"]["secretKeyRef"] for g in workers for c in g["template"]["spec"]["containers"]
                   for e in c.get("env", []) if e["name"] == env]
        assert sources and all(s["name"] for s in sources), env
    assert "ray_rec.cli train" in _manifests()["rayjob-train.yaml"]["spec"]["entrypoint"]


DOCKERFILE = Path(__file__).parents[1] / "Dockerfile"


def _docker_args() -> dict[str, str]:
    """The Dockerfile's ARG defaults (the last one of each name wins, as in a build)."""
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M))


def test_the_image_is_the_official_ray_image_of_the_tested_ray_version_with_this_package():
    """The manifests' rayVersion, the Dockerfile's base image and the Ray the tests run agree, and
    the image installs ray_rec from this checkout (never by name from the package index)."""
    import ray

    text, args = DOCKERFILE.read_text(), _docker_args()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON\}-\$\{VARIANT\}$", text, flags=re.M)
    assert args["RAY_VERSION"] == ray.__version__
    assert {c["rayVersion"] for c in _ray_clusters()} == {ray.__version__}
    assert "COPY --chown=ray:users ray_rec " in text and re.search(r"pip install --no-cache-dir /home/ray/ray_rec\b", text)
    assert not re.search(r"pip install[^\n]*\bray-rec\b", text)


def test_gpu_pods_run_the_gpu_image_and_cpu_pods_the_cpu_image():
    for cluster in _ray_clusters():
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            for container in group["template"]["spec"]["containers"]:
                gpu = "nvidia.com/gpu" in container.get("resources", {}).get("limits", {})
                assert container["image"].endswith("-gpu") == gpu, container["image"]
