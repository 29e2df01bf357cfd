"""The deployment files: valid YAML, pointing at files that exist, and a policy that loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gateway.admin import serving_problem
from gateway.policy.loader import parse_policy
from gateway.settings import load_settings

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
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["GATEWAY_HOST"] == "0.0.0.0"


def test_compose_sets_the_admin_token_from_the_environment_and_prometheus_scrapes_with_it() -> None:
    compose = load(DEPLOY / "compose.yaml")
    env = compose["services"]["gateway"]["environment"]
    # Required: compose refuses to start without it rather than serving an open admin API.
    assert env["GATEWAY_ADMIN_TOKEN"].startswith("${GATEWAY_ADMIN_TOKEN:?")
    assert env["GATEWAY_METRICS_AUTH"] == "true"
    assert compose["secrets"]["gateway_admin_token"] == {"environment": "GATEWAY_ADMIN_TOKEN"}
    assert "gateway_admin_token" in compose["services"]["prometheus"]["secrets"]
    [job] = load(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]
    assert job["authorization"] == {
        "type": "Bearer",
        "credentials_file": "/run/secrets/gateway_admin_token",
    }
    settings = load_settings(env={**env, "GATEWAY_ADMIN_TOKEN": "t", "GATEWAY_HOST": "0.0.0.0"})
    assert settings.metrics_auth and serving_problem(settings) is None


def test_kubernetes_takes_the_admin_token_from_a_secret_the_monitor_scrapes_with() -> None:
    deployment = load(DEPLOY / "kubernetes" / "deployment.yaml")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item for item in container["env"]}
    ref = env["GATEWAY_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert env["GATEWAY_METRICS_AUTH"]["value"] == "true"
    monitor = load(DEPLOY / "kubernetes" / "servicemonitor.yaml")
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": ref}
    # The Secret is made by hand (never committed); the manifests say how.
    for path in ("deployment.yaml", "kustomization.yaml"):
        text = (DEPLOY / "kubernetes" / path).read_text()
        assert f"create secret generic {ref['name']}" in text
        assert f"--from-literal={ref['key']}=" in text
    values = {name: item.get("value") for name, item in env.items() if "value" in item}
    settings = load_settings(env={**values, "GATEWAY_ADMIN_TOKEN": "from-the-secret"})
    assert settings.host == "0.0.0.0" and serving_problem(settings) is None
    assert serving_problem(load_settings(env=values)) is not None


def test_the_image_listens_publicly_but_bakes_in_no_token() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "GATEWAY_HOST=0.0.0.0" in dockerfile and "GATEWAY_METRICS_AUTH=true" in dockerfile
    assert "GATEWAY_ADMIN_TOKEN=" not in dockerfile.replace('GATEWAY_ADMIN_TOKEN="$(', "")
