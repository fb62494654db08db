"""cluster.yaml passes Ray's own autoscaler validation and keeps the promised properties."""

from __future__ import annotations

from pathlib import Path

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
    ports = config["provider"]["security_group"]["IpPermissions"]
    assert [(p["FromPort"], p["ToPort"]) for p in ports] == [(22, 22)]
    assert all(r["CidrIp"] != "0.0.0.0/0" for p in ports for r in p["IpRanges"])


def test_no_credentials_in_the_file():
    text = CLUSTER.read_text()
    assert "aws_access_key_id" not in text.lower() and "AKIA" not in text
    for node in load()["available_node_types"].values():
        assert "IamInstanceProfile" in node["node_config"]


def test_kuberay_manifests_are_valid_yaml_with_a_serve_config():
    root = Path(__file__).parents[1] / "deploy" / "kuberay"
    job = yaml.safe_load((root / "rayjob-train.yaml").read_text())
    assert job["kind"] == "RayJob" and "ray_rec.cli train" in job["spec"]["entrypoint"]
    service = yaml.safe_load((root / "rayservice.yaml").read_text())
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config["applications"][0]["import_path"] == "ray_rec.serve.app:build_app"
    for manifest in (job["spec"]["rayClusterSpec"], service["spec"]["rayClusterConfig"]):
        assert manifest["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
