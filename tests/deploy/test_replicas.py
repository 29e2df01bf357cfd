"""The Kubernetes overlay for several replicas on Redis (``deploy/kubernetes/replicas``), as
``kubectl apply -k`` would apply it (``tests/deploy/kustomize.py``): three replicas that a
rollout, a drained node or a lost zone never takes all at once, no volume, the operator's
Redis from a ConfigMap and its password from a Secret made by hand (none committed), the
probes of the base, a PodDisruptionBudget, a HorizontalPodAutoscaler and a ServiceMonitor.
Then three pods started as the overlay runs them, on one Redis (the test's), share a key
and a session."""

from __future__ import annotations

import asyncio
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.auth.pepper import load_pepper
from gateway.store import SHARED_SCHEMES
from tests.deploy.kustomize import KUBERNETES, build, kustomization_files
from tests.deploy.pods import (
    REDIS_PASSWORD_VARIABLE,
    REPLICAS,
    SECRET_NAME,
    Pod,
    gateway_container,
    gateway_deployment,
    kubernetes_pod,
    kubernetes_secrets,
    kubernetes_settings,
    redis_store_url,
)
from tests.deploy.test_manifests import writes
from tests.deploy.test_secure_deployments import (
    CHAT,
    POD_ADDRESS,
    bootstrap_key,
    documented_argv,
    fake_upstreams,
)
from tests.redis_server import SharedRedis

KUSTOMIZATION = REPLICAS / "kustomization.yaml"
LABELS = {"app.kubernetes.io/name": "agent-gateway"}


def applied() -> Any:
    return build(REPLICAS)


def test_three_replicas_and_a_rollout_that_keeps_capacity() -> None:
    objects = applied()
    deployment = objects.named("Deployment", "agent-gateway")
    autoscaler = objects.named("HorizontalPodAutoscaler", "agent-gateway")
    assert deployment["spec"]["replicas"] == 3 == autoscaler["spec"]["minReplicas"]
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    rolling = strategy["rollingUpdate"]
    # A new pod ready before an old one goes: never fewer than the replicas asked for.
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1


def test_a_disruption_takes_one_pod_at_a_time() -> None:
    budget = applied().named("PodDisruptionBudget", "agent-gateway")
    assert budget["apiVersion"] == "policy/v1"
    assert budget["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": LABELS}}


def test_the_autoscaler_scales_the_deployment_on_cpu_above_its_three() -> None:
    objects = applied()
    autoscaler = objects.named("HorizontalPodAutoscaler", "agent-gateway")
    assert autoscaler["apiVersion"] == "autoscaling/v2"
    spec = autoscaler["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "agent-gateway",
    }
    assert spec["maxReplicas"] > spec["minReplicas"]
    [metric] = spec["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    # Utilization is of the request: without one the autoscaler has nothing to scale on.
    [container] = gateway_deployment(REPLICAS)["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"]["cpu"]
    # One process per pod: the pod's CPU is one gateway's (no --workers).
    assert "--workers" not in container["command"]


def test_pods_spread_over_zones_and_nodes() -> None:
    pod = gateway_deployment(REPLICAS)["spec"]["template"]
    constraints = {c["topologyKey"]: c for c in pod["spec"]["topologySpreadConstraints"]}
    assert set(constraints) == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in constraints.values():
        assert constraint["maxSkew"] == 1
        assert (
            constraint["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        )


def test_no_volume_the_store_is_redis() -> None:
    objects = applied()
    assert not objects.of_kind("PersistentVolumeClaim")
    pod = gateway_deployment(REPLICAS)["spec"]["template"]["spec"]
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    [container] = pod["containers"]
    settings = kubernetes_settings(overlay=REPLICAS)
    assert urlsplit(settings.store).scheme in SHARED_SCHEMES
    # Writable: /tmp only (an emptyDir, memory of the node's), as the gateway writes nothing else.
    mounts = {PurePosixPath(m["mountPath"]): m for m in container["volumeMounts"]}
    writable = {path for path, mount in mounts.items() if not mount.get("readOnly")}
    assert writable == writes(settings) == {PurePosixPath("/tmp")}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[PurePosixPath("/tmp")]["name"]]
    # Nothing generated on a pod: the pepper from its Secret, the admin token from another.
    assert settings.auth.pepper_file is not None and settings.admin_token is not None


def test_the_store_is_the_operators_redis_named_in_a_configmap_its_password_in_a_secret() -> None:
    objects = applied()
    env = {item["name"]: item for item in gateway_container(REPLICAS)["env"]}
    ref = env["GATEWAY_STORE"]["valueFrom"]["configMapKeyRef"]
    url = objects.named("ConfigMap", ref["name"])["data"][ref["key"]]
    parts = urlsplit(url)
    assert parts.scheme in ("redis", "rediss") and parts.hostname
    assert parts.hostname.endswith(".svc"), "an external Service, not one this overlay runs"
    assert parts.password is None and "@" not in url, "the ConfigMap is not secret"
    assert not objects.of_kind("StatefulSet"), "the operator's own Redis, not ours"
    secret = env[REDIS_PASSWORD_VARIABLE]["valueFrom"]["secretKeyRef"]
    assert secret["key"] in kubernetes_secrets(REPLICAS)[secret["name"]]


def test_the_secrets_are_documented_never_applied() -> None:
    """An applied Secret without values would empty the operator's on the next apply, and
    one with values would put them in git: the comments say how to make each instead."""
    objects = applied()
    assert not objects.of_kind("Secret")
    used: dict[str, set[str]] = {}
    pod = gateway_deployment(REPLICAS)["spec"]["template"]["spec"]
    [container] = pod["containers"]
    for item in container["env"]:
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            used.setdefault(ref["name"], set()).add(ref["key"])
        elif SECRET_NAME.search(item["name"]):
            pytest.fail(f"{item['name']} is not from a Secret")
    for volume in pod["volumes"]:
        if "secret" in volume:
            assert volume["secret"]["secretName"] in kubernetes_secrets(REPLICAS)
    for monitor in objects.of_kind("ServiceMonitor"):
        for endpoint in monitor["spec"]["endpoints"]:
            ref = endpoint["authorization"]["credentials"]
            used.setdefault(ref["name"], set()).add(ref["key"])
    documented = kubernetes_secrets(REPLICAS)
    assert {name: keys for name, keys in used.items()} == {
        name: keys for name, keys in documented.items() if name in used
    }
    assert set(documented) - set(used) == {"agent-gateway-pepper", "agent-gateway-providers"}


@pytest.mark.parametrize("path", kustomization_files(), ids=lambda p: p.parent.name)
def test_every_container_has_a_readiness_and_a_liveness_probe(path: Path) -> None:
    for deployment in build(path.parent).of_kind("Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            assert container["readinessProbe"]["httpGet"]["path"] == "/gateway/ready"
            assert container["livenessProbe"]["httpGet"]["path"] == "/gateway/health"


def test_the_service_monitor_scrapes_every_pod_with_the_admin_token() -> None:
    objects = applied()
    monitor = objects.named("ServiceMonitor", "agent-gateway")
    service = objects.named("Service", "agent-gateway")
    # Endpoints of the Service: one target per pod, each scraped by its own address.
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    env = {item["name"]: item for item in gateway_container(REPLICAS)["env"]}
    token = env["GATEWAY_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": token}
    # The alerts the dashboards expect, a replica down among them.
    rules = objects.named("PrometheusRule", "agent-gateway")
    alerts = {rule.get("alert") for group in rules["spec"]["groups"] for rule in group["rules"]}
    assert "AgentGatewayInstanceDown" in alerts


def test_the_base_is_left_as_it_was() -> None:
    """One replica on SQLite and its volume, replaced with Recreate: the overlay changes
    none of it in ../base."""
    deployment = gateway_deployment(KUBERNETES / "base")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert kubernetes_settings().store.startswith("sqlite:////data/")


async def test_three_pods_on_one_redis_share_a_key_and_a_session(
    aiohttp_client: Any,
    fake_provider: TestServer,
    shared_redis: SharedRedis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The overlay's pods as they run (its ConfigMaps, the Secrets made as documented, one
    set for all), the test's Redis in place of the operator's, its password the Secret's."""
    env = {**fake_upstreams(fake_provider), "GATEWAY_STORE": redis_store_url(shared_redis.port)}
    first: Pod = await asyncio.to_thread(kubernetes_pod, tmp_path / "pod-0", env, overlay=REPLICAS)
    first.secrets["agent-gateway-redis"]["password"] = shared_redis.password
    pods = [first] + [
        await asyncio.to_thread(
            kubernetes_pod, tmp_path / f"pod-{i}", env, overlay=REPLICAS, made=first.secrets
        )
        for i in (1, 2)
    ]
    monkeypatch.setenv(REDIS_PASSWORD_VARIABLE, shared_redis.password)
    monkeypatch.delenv("GATEWAY_KEY_PEPPER", raising=False)
    for pod in pods:
        pepper = await asyncio.to_thread(load_pepper, pod.settings, env={})
        assert pepper.reveal() == first.secrets["agent-gateway-pepper"]["pepper"]
    clients = [await aiohttp_client(create_app(pod.settings)) for pod in pods]
    for client in clients:
        for path in ("/gateway/ready", "/gateway/health"):
            async with client.get(path, headers={"Host": POD_ADDRESS}) as answer:
                assert answer.status == 200, path

    # The bootstrap key, made in one pod as the overlay's kustomization says; used on all.
    token = first.secrets["agent-gateway-admin"]["token"]
    argv = documented_argv(KUSTOMIZATION, "--")
    key = await bootstrap_key(argv, str(clients[0].make_url("")), token, monkeypatch, capsys)
    service = "agent-gateway.agent-gateway.svc.cluster.local:8787"
    headers = {"Authorization": f"Bearer {key}", "Host": service, "X-Gateway-Session": "k8s"}
    for client in clients:
        async with client.post("/v1/chat/completions", json=CHAT, headers=headers) as answer:
            assert answer.status == 200, await answer.text()
    admin = {"Authorization": f"Bearer {token}", "Host": "localhost"}
    async with clients[2].get("/gateway/sessions/k8s", headers=admin) as answer:
        assert answer.status == 200, await answer.text()
        assert (await answer.json())["turns"] == 3
