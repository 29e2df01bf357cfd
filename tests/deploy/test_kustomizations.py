"""The kustomizations: what `kubectl apply -k deploy/kubernetes/base` and
`kubectl apply -k deploy/kubernetes/monitoring` would apply, read without kubectl (see
``tests/deploy/kustomize.py``), and whether the objects they apply refer to each other
correctly."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.kustomize import (
    KUBERNETES,
    build,
    entries,
    kustomization_files,
    resource_files,
)

BASE = KUBERNETES / "base"
MONITORING = KUBERNETES / "monitoring"
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}


def test_there_is_a_base_and_a_monitoring_overlay() -> None:
    assert [path.parent for path in kustomization_files()] == [BASE, MONITORING]


@pytest.mark.parametrize("path", kustomization_files(), ids=lambda p: p.parent.name)
def test_every_resource_a_kustomization_lists_exists(path: Path) -> None:
    for entry in entries(path.parent):
        if entry.is_dir():
            assert (entry / "kustomization.yaml").is_file(), entry
            # kustomize refuses a base that contains the kustomization including it
            # ("cycle detected: candidate root ... contains visited root ...").
            assert not path.parent.is_relative_to(entry), f"{path}: {entry} is its ancestor"
        else:
            assert entry.is_file(), f"{path}: {entry} does not exist"
            assert entry.is_relative_to(path.parent), f"{path}: {entry} is outside its root"


def test_every_manifest_is_listed_by_exactly_one_kustomization() -> None:
    listed = [entry for path in kustomization_files() for entry in entries(path.parent)]
    files = [entry for entry in listed if not entry.is_dir()]
    assert sorted(files) == resource_files(), "a manifest no kustomization applies, or two"


def test_the_base_applies_without_the_prometheus_operator() -> None:
    base = build(BASE)
    assert base.kinds() == {
        ("Namespace", "agent-gateway"),
        ("ConfigMap", "agent-gateway-config"),
        ("PersistentVolumeClaim", "agent-gateway-data"),
        ("Deployment", "agent-gateway"),
        ("Service", "agent-gateway"),
    }
    assert all(not obj["apiVersion"].startswith("monitoring.coreos.com/") for obj in base.objects)


def test_the_monitoring_overlay_is_the_base_plus_the_operator_resources() -> None:
    base, monitoring = build(BASE), build(MONITORING)
    assert BASE in [entry for entry in entries(MONITORING) if entry.is_dir()]
    added = monitoring.kinds() - base.kinds()
    assert added == {("ServiceMonitor", "agent-gateway"), ("PrometheusRule", "agent-gateway")}
    assert monitoring.kinds() >= base.kinds()


def test_every_namespaced_object_lands_in_the_namespace_the_base_creates() -> None:
    monitoring = build(MONITORING)
    namespace = monitoring.named("Namespace", "agent-gateway")["metadata"]["name"]
    for obj in monitoring.objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, obj["kind"]


def test_the_objects_refer_to_each_other_by_names_that_exist() -> None:
    applied = build(MONITORING)
    deployment = applied.named("Deployment", "agent-gateway")
    pod = deployment["spec"]["template"]
    assert (
        deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    )
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    applied.named("ConfigMap", volumes["config"]["configMap"]["name"])
    applied.named("PersistentVolumeClaim", volumes["data"]["persistentVolumeClaim"]["claimName"])
    # The Secrets are not applied (made by hand, never committed: test_secure_deployments.py
    # checks that the comments say how); every other volume is one of the applied objects.
    assert {name for name, v in volumes.items() if "secret" in v} == {"pepper", "providers"}
    [container] = pod["spec"]["containers"]
    assert {mount["name"] for mount in container["volumeMounts"]} == set(volumes)

    service = applied.named("Service", "agent-gateway")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container_ports = {port["name"] for port in container["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= container_ports

    monitor = applied.named("ServiceMonitor", "agent-gateway")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    service_ports = {port["name"] for port in service["spec"]["ports"]}
    assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} <= service_ports
