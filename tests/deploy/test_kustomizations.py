"""The kustomizations: what `kubectl apply -k deploy/kubernetes/base`, `.../monitoring` and
`.../replicas` would apply, read without kubectl (see ``tests/deploy/kustomize.py``) and
compared with what kubectl's own kustomize renders, and whether the objects they apply refer
to each other correctly."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.kustomize import (
    KUBERNETES,
    apply_patch,
    build,
    documents,
    entries,
    kustomization_files,
    merge,
    patch_files,
    patches,
    resource_files,
)
from tests.harness import installed

BASE = KUBERNETES / "base"
MONITORING = KUBERNETES / "monitoring"
REPLICAS = KUBERNETES / "replicas"
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}


def test_there_is_a_base_a_monitoring_overlay_and_a_replicas_overlay() -> None:
    assert [path.parent for path in kustomization_files()] == [BASE, MONITORING, REPLICAS]


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
    for patch in patches(path.parent):
        assert patch.is_file() and patch.is_relative_to(path.parent), patch


def test_every_manifest_is_listed_by_exactly_one_kustomization() -> None:
    listed = [entry for path in kustomization_files() for entry in entries(path.parent)]
    files = [entry for entry in listed if not entry.is_dir()]
    assert sorted(files) == resource_files(), "a manifest no kustomization applies, or two"
    applied = [patch for path in kustomization_files() for patch in patches(path.parent)]
    assert sorted(applied) == patch_files() and len(set(applied)) == len(applied)


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


def test_the_replicas_overlay_is_the_monitored_base_without_its_volume_plus_scaling() -> None:
    monitoring, replicas = build(MONITORING), build(REPLICAS)
    assert MONITORING in [entry for entry in entries(REPLICAS) if entry.is_dir()]
    assert monitoring.kinds() - replicas.kinds() == {
        ("PersistentVolumeClaim", "agent-gateway-data")
    }
    assert replicas.kinds() - monitoring.kinds() == {
        ("ConfigMap", "agent-gateway-store"),
        ("PodDisruptionBudget", "agent-gateway"),
        ("HorizontalPodAutoscaler", "agent-gateway"),
    }


@pytest.mark.parametrize("overlay", [BASE, MONITORING, REPLICAS], ids=lambda p: p.name)
def test_every_namespaced_object_lands_in_the_namespace_the_base_creates(overlay: Path) -> None:
    applied = build(overlay)
    namespace = applied.named("Namespace", "agent-gateway")["metadata"]["name"]
    for obj in applied.objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, obj["kind"]


@pytest.mark.parametrize("overlay", [MONITORING, REPLICAS], ids=lambda p: p.name)
def test_the_objects_refer_to_each_other_by_names_that_exist(overlay: Path) -> None:
    applied = build(overlay)
    deployment = applied.named("Deployment", "agent-gateway")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    for volume in volumes.values():
        if "configMap" in volume:
            applied.named("ConfigMap", volume["configMap"]["name"])
        if "persistentVolumeClaim" in volume:
            applied.named("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    # The Secrets are not applied (made by hand, never committed: test_secure_deployments.py
    # checks that the comments say how); every other volume is one of the applied objects.
    assert {name for name, v in volumes.items() if "secret" in v} == {"pepper", "providers"}
    [container] = pod["spec"]["containers"]
    assert {mount["name"] for mount in container["volumeMounts"]} == set(volumes)
    for item in container["env"]:
        ref = item.get("valueFrom", {}).get("configMapKeyRef")
        if ref:
            assert ref["key"] in applied.named("ConfigMap", ref["name"])["data"], ref

    service = applied.named("Service", "agent-gateway")
    assert service["spec"]["selector"].items() <= labels
    container_ports = {port["name"] for port in container["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= container_ports

    monitor = applied.named("ServiceMonitor", "agent-gateway")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    service_ports = {port["name"] for port in service["spec"]["ports"]}
    assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} <= service_ports

    for kind in ("PodDisruptionBudget", "HorizontalPodAutoscaler"):
        for obj in applied.of_kind(kind):
            if kind == "PodDisruptionBudget":
                assert obj["spec"]["selector"]["matchLabels"].items() <= labels
            else:
                target = obj["spec"]["scaleTargetRef"]
                assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
                applied.named("Deployment", target["name"])


# -- the renderer, against kubectl's kustomize ---------------------------------------------------
async def kubectl_kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = installed("kubectl", "kubectl")
    process = await asyncio.create_subprocess_exec(
        kubectl,
        "kustomize",
        str(directory),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return [doc for doc in yaml.safe_load_all(out.decode()) if doc is not None]


@pytest.mark.parametrize("overlay", [BASE, MONITORING, REPLICAS], ids=lambda p: p.name)
async def test_the_renderer_renders_what_kubectl_renders(overlay: Path) -> None:
    """Object for object, field for field, list order included (kustomize lists the
    elements a patch names first)."""
    rendered = await kubectl_kustomize(overlay)
    ours = await asyncio.to_thread(build, overlay)
    by_name = {(obj["kind"], obj["metadata"]["name"]): obj for obj in rendered}
    assert len(by_name) == len(rendered) == len(ours.objects)
    for obj in ours.objects:
        assert obj == by_name[(obj["kind"], obj["metadata"]["name"])], obj["kind"]


def test_the_renderer_refuses_what_it_does_not_understand() -> None:
    """A patch feature the renderer lacks fails the tests rather than being skipped."""
    [deployment] = documents(BASE / "deployment.yaml")
    with pytest.raises(AssertionError, match="directive"):
        merge(deployment, {"spec": {"$retainKeys": ["replicas"]}})
    with pytest.raises(AssertionError, match="patches no"):
        apply_patch([deployment], {"apiVersion": "apps/v1", "kind": "Deployment",
                                   "metadata": {"name": "other"}}, Path("p.yaml"))  # fmt: skip
    gone = {"spec": {"template": {"spec": {"volumes": [{"name": "nope", "$patch": "delete"}]}}}}
    with pytest.raises(AssertionError, match="not there"):
        merge(deployment, gone)
    # A merged list keeps what the patch does not name; a plain list is replaced.
    patch = {"spec": {"template": {"spec": {"containers": [{"name": "gateway", "args": ["x"]}]}}}}
    [container] = merge(deployment, patch)["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["x"] and container["image"] == "agent-gateway:latest"
