"""The deployment files: valid YAML, pointing at files that exist, and a policy that loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gateway.policy.loader import parse_policy

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_every_yaml_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 10
    for path in files:
        assert load(path) is not None, path


def test_compose_mounts_files_that_exist() -> None:
    compose = load(DEPLOY / "compose.yaml")
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
    gateway = compose["services"]["gateway"]["environment"]
    assert gateway["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://otel-collector:")


def test_prometheus_scrapes_the_gateway_under_the_job_the_alerts_use() -> None:
    config = load(DEPLOY / "prometheus" / "prometheus.yml")
    [job] = config["scrape_configs"]
    assert job["job_name"] == "agent-gateway" and job["metrics_path"] == "/metrics"
    monitor = load(DEPLOY / "kubernetes" / "servicemonitor.yaml")
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "agent-gateway"


def test_kustomization_lists_files_that_exist() -> None:
    kustomization = load(DEPLOY / "kubernetes" / "kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (DEPLOY / "kubernetes" / resource).exists(), resource


def test_the_configmap_policy_loads() -> None:
    configmap = load(DEPLOY / "kubernetes" / "configmap-policy.yaml")
    policy = parse_policy(configmap["data"]["policy.yaml"], "configmap-policy.yaml")
    assert policy.file.defaults.limits.max_turns == 1000


def test_probes_use_the_health_endpoint() -> None:
    deployment = load(DEPLOY / "kubernetes" / "deployment.yaml")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/gateway/health"
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["GATEWAY_HOST"] == "0.0.0.0"
