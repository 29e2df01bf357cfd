"""The compose stack as a whole (``deploy/compose.yaml``): two gateway replicas alike but
for their names, a load balancer in front, Redis behind them (private, with a password,
durable), Prometheus scraping each replica with the alert rules loaded (``promtool check
config`` on the file as the container sees it), Grafana with the dashboards, the
OpenTelemetry Collector receiving the traces, and the demo profile's fake provider and
traffic generator. No Docker engine here: ``test_load_balancer.py`` runs the replicas, the
load balancer and the traffic outside it."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from tests.deploy.kustomize import DEPLOY, load
from tests.deploy.pods import (
    COMPOSE,
    REDIS_PASSWORD_VARIABLE,
    REPO,
    compose_mounts,
    compose_settings,
    compose_shell,
    gateway_services,
    secret_value,
)
from tests.deploy.traffic_script import SCRIPT
from tests.harness import installed

PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"


def services() -> dict[str, Any]:
    services: dict[str, Any] = load(COMPOSE)["services"]
    return services


def test_two_gateway_replicas_alike_but_for_their_names() -> None:
    names = gateway_services()
    assert names == ["gateway-1", "gateway-2"]
    specs = [dict(services()[name]) for name in names]
    environments = [spec.pop("environment") for spec in specs]
    assert specs[0] == specs[1]
    differ = {k for k in environments[0] if environments[0][k] != environments[1].get(k)}
    assert differ == {"OTEL_RESOURCE_ATTRIBUTES"}  # which replica, in its traces
    assert environments[0].keys() == environments[1].keys()
    for name, spec in zip(names, specs, strict=True):
        assert "ports" not in spec, f"{name}: reached through the load balancer only"
        assert spec["depends_on"]["redis"] == {"condition": "service_healthy"}
    # Settings alike: one store, one policy, the same secrets from the shell.
    shell = compose_shell()
    first, second = (compose_settings(shell, service=name) for name in names)
    assert first == second


def test_no_gateway_volume_only_redis_keeps_data() -> None:
    compose = load(COMPOSE)
    assert set(compose["volumes"]) == {"redis-data"}
    for name in gateway_services():
        named = [s for s, _, _ in compose_mounts(services()[name]) if s in compose["volumes"]]
        assert not named, name


def test_redis_is_private_durable_and_has_the_replicas_password() -> None:
    redis = services()["redis"]
    assert str(redis["image"]).startswith("redis:")
    # Published on no port of this machine (or on its loopback only).
    for port in redis.get("ports", []):
        assert str(port).startswith("127.0.0.1:"), port
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert re.search(r'--requirepass "\$\$(\w+)"', command), command
    [variable] = re.findall(r'--requirepass "\$\$(\w+)"', command)
    # The same shell variable the replicas take their password from.
    source = str(redis["environment"][variable])
    assert source.startswith(f"${{{REDIS_PASSWORD_VARIABLE}:?")
    for name in gateway_services():
        env = services()[name]["environment"]
        assert str(env[REDIS_PASSWORD_VARIABLE]).startswith(f"${{{REDIS_PASSWORD_VARIABLE}:?")
        store = urlsplit(compose_settings(service=name).store)
        assert (store.scheme, store.hostname, store.port or 6379) == ("redis", "redis", 6379)
    [(source, target, _)] = compose_mounts(redis)
    assert source == "redis-data" and target == PurePosixPath("/data")
    # Healthy once it answers with its password: the replicas wait for that.
    assert "redis-cli ping" in redis["healthcheck"]["test"][-1]
    assert f"$${variable}" in redis["healthcheck"]["test"][-1]
    assert redis["read_only"] is True and redis["cap_drop"] == ["ALL"]


def test_the_load_balancer_is_the_only_way_in() -> None:
    published = {name for name, spec in services().items() if spec.get("ports")}
    assert published == {"lb", "prometheus", "grafana", "otel-collector", "jaeger"}
    lb = services()["lb"]
    assert str(lb["image"]).startswith("haproxy:")
    assert set(lb["depends_on"]) == set(gateway_services())
    assert lb["read_only"] is True and lb["cap_drop"] == ["ALL"]


def test_prometheus_scrapes_each_replica_and_loads_the_alert_rules() -> None:
    [job] = load(PROMETHEUS)["scrape_configs"]
    [static] = job["static_configs"]
    port = compose_settings().port
    assert static["targets"] == [f"{name}:{port}" for name in gateway_services()]
    prometheus = services()["prometheus"]
    mounts = {target: source for source, target, _ in compose_mounts(prometheus)}
    [rules] = load(PROMETHEUS)["rule_files"]
    [rule_file] = [t for t in mounts if PurePosixPath(t).match(rules)]
    assert (DEPLOY / mounts[rule_file]).resolve() == REPO / "dashboards" / "alerts.yaml"


async def test_promtool_checks_the_prometheus_config_as_the_container_sees_it(
    tmp_path: Path,
) -> None:
    """Its mounts and the admin token's secret file laid out under ``tmp_path``, the paths in
    the config rewritten to them: the rule files it globs must be found and valid."""
    promtool = installed("promtool", "prometheus")
    root = tmp_path / "container"
    prometheus = services()["prometheus"]
    places = {}
    for source, target, _ in compose_mounts(prometheus):
        place = root / target.relative_to("/")
        await asyncio.to_thread(place.parent.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(shutil.copyfile, DEPLOY / source, place)
        places[str(target)] = place
    for secret in prometheus["secrets"]:
        place = root / "run" / "secrets" / secret
        await asyncio.to_thread(place.parent.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(place.write_text, secret_value())
    config = places["/etc/prometheus/prometheus.yml"]
    text = await asyncio.to_thread(config.read_text)
    text = re.sub(r"(?<=[\s\"'])/(etc|run)/", lambda m: f"{root}/{m.group(1)}/", text)
    await asyncio.to_thread(config.write_text, text)
    process = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, out.decode()
    assert "agent-gateway.yaml" in out.decode() and "SUCCESS" in out.decode()


def test_grafana_provisions_the_dashboards_from_prometheus() -> None:
    grafana = services()["grafana"]
    mounts = {target: source for source, target, _ in compose_mounts(grafana)}
    provisioning = DEPLOY / mounts[PurePosixPath("/etc/grafana/provisioning")]
    [provider] = load(provisioning / "dashboards" / "agent-gateway.yaml")["providers"]
    folder = PurePosixPath(provider["options"]["path"])
    assert (DEPLOY / mounts[folder]).resolve() == REPO / "dashboards"
    assert list((REPO / "dashboards").glob("*.json"))
    [source] = load(provisioning / "datasources" / "prometheus.yaml")["datasources"]
    url = urlsplit(source["url"])
    assert url.hostname == "prometheus" and "prometheus" in services()
    assert f"{url.port}:{url.port}" in services()["prometheus"]["ports"]


def test_the_replicas_send_their_traces_to_the_collector() -> None:
    collector = load(DEPLOY / "otel-collector" / "config.yaml")
    http = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    for name in gateway_services():
        env = services()[name]["environment"]
        endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert endpoint.hostname == "otel-collector" and "otel-collector" in services()
        assert http.endswith(f":{endpoint.port}")
        assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert collector["service"]["pipelines"]["traces"]["receivers"] == ["otlp"]


def test_the_demo_profile_runs_the_fake_provider_and_the_traffic_through_the_balancer() -> None:
    demo = {name for name, spec in services().items() if "demo" in spec.get("profiles", [])}
    assert demo == {"fake-provider", "traffic"}
    # The upstreams the header comment tells a demo to set: the fake provider's port.
    fake = services()["fake-provider"]["command"]
    port = fake[fake.index("--port") + 1]
    header = COMPOSE.read_text()
    assert f"GATEWAY_OPENAI_UPSTREAM=http://fake-provider:{port}/v1" in header
    assert f"GATEWAY_ANTHROPIC_UPSTREAM=http://fake-provider:{port}" in header
    traffic = services()["traffic"]
    [(source, target, read_only)] = compose_mounts(traffic)
    assert read_only and (DEPLOY / source).resolve() == SCRIPT.parent
    command = " ".join(traffic["command"])
    assert f"exec python {target / SCRIPT.name}" in command
    assert urlsplit(traffic["environment"]["GATEWAY_URL"]).hostname == "lb"
    for name in ("gateway-1", "gateway-2", "lb"):
        assert name in traffic["depends_on"]


def test_the_header_says_how_to_bring_it_up_with_every_secret_it_requires() -> None:
    header = COMPOSE.read_text().split("\nservices:")[0]
    assert "docker compose -f deploy/compose.yaml up" in header
    exported = set(re.findall(r"export (\w+)=", header))
    exported |= set(re.findall(r"export \w+=\.\.\. (\w+)=", header))
    assert exported == set(compose_shell())
