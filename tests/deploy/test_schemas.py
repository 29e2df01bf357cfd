"""The deploy files against their schemas, offline, with nothing a fresh machine lacks (no
kubectl, no Docker): the stand-in for `kubectl apply -k` and `docker compose up`.

- Kubernetes core kinds: ``kubernetes-validate``'s vendored OpenAPI schemas, strict (an unknown
  field is an error, as `kubectl apply` reports it), for the oldest and newest Kubernetes it
  knows.
- Prometheus Operator kinds (``ServiceMonitor``, ``PrometheusRule``): their CRDs are not
  vendored anywhere offline, so the fields these manifests use are checked against the CRD's
  shape below; that the rules are ``dashboards/alerts.yaml`` is
  ``tests/dashboards/test_static.py``'s test.
- The compose file: the Compose Specification schema vendored in ``check-jsonschema``.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from kubernetes_validate import utils as k8s_schemas

from tests.deploy.kustomize import (
    DEPLOY,
    KUBERNETES,
    build,
    documents,
    kustomization_files,
    load,
    resource_files,
)

OPERATOR_GROUP = "monitoring.coreos.com/v1"
KUBERNETES_VERSIONS = sorted({k8s_schemas.all_versions()[0], kubernetes_validate.latest_version()})
"""The oldest and the newest Kubernetes whose schemas ``kubernetes-validate`` ships."""

_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
    r"(([0-9]+)ms)?)$",
}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": _STRINGS,
        "annotations": _STRINGS,
    },
    "additionalProperties": False,
}
_SECRET_KEY = {
    "type": "object",
    "required": ["key"],
    "properties": {"name": {"type": "string"}, "key": {"type": "string"}, "optional": {}},
    "additionalProperties": False,
}
_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": _STRINGS, "matchExpressions": {"type": "array"}},
    "additionalProperties": False,
}


def _kind(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": OPERATOR_GROUP},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
        "additionalProperties": False,
    }


OPERATOR_KINDS: dict[str, dict[str, Any]] = {
    # The fields of monitoring.coreos.com/v1 these manifests may use (a subset of the CRDs';
    # add one here, from the CRD, before using it).
    "ServiceMonitor": _kind(
        "ServiceMonitor",
        {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": _SELECTOR,
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                            "authorization": {
                                "type": "object",
                                "properties": {
                                    "type": {"type": "string"},
                                    "credentials": _SECRET_KEY,
                                },
                                "additionalProperties": False,
                            },
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                        },
                        "additionalProperties": False,
                    },
                },
            },
            "additionalProperties": False,
        },
    ),
    "PrometheusRule": _kind(
        "PrometheusRule",
        {
            "type": "object",
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _DURATION,
                            "limit": {"type": "integer"},
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "record": {"type": "string"},
                                        "expr": {"type": ["string", "integer"]},
                                        "for": _DURATION,
                                        "keep_firing_for": _DURATION,
                                        "labels": _STRINGS,
                                        "annotations": _STRINGS,
                                    },
                                    "additionalProperties": False,
                                },
                            },
                        },
                        "additionalProperties": False,
                    },
                },
            },
            "additionalProperties": False,
        },
    ),
}


def manifest_errors(doc: dict[str, Any]) -> list[str]:
    """Why ``kubectl apply`` would refuse ``doc`` (as far as the schemas tell), or nothing."""
    if doc.get("apiVersion") == OPERATOR_GROUP:
        schema = OPERATOR_KINDS[doc["kind"]]
        validator = jsonschema.Draft202012Validator(schema)
        return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"Kubernetes {version}: {list(e.absolute_path)}: {e.message}")
    return errors


def compose_errors(compose: dict[str, Any]) -> list[str]:
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(vendored.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]


@pytest.mark.parametrize("path", resource_files(), ids=lambda p: str(p.relative_to(KUBERNETES)))
def test_every_manifest_matches_its_schema(path: Path) -> None:
    docs = documents(path)
    assert docs, path
    for doc in docs:
        assert doc["kind"] != "Secret", f"{path}: Secrets are made by hand, never committed"
        assert manifest_errors(doc) == [], path


@pytest.mark.parametrize("path", kustomization_files(), ids=lambda p: p.parent.name)
def test_every_object_a_kustomization_applies_matches_its_schema(path: Path) -> None:
    """As patched: a patch is no manifest of its own, the object it makes must be valid."""
    for obj in build(path.parent).objects:
        assert obj["kind"] != "Secret", f"{path}: Secrets are made by hand, never committed"
        assert manifest_errors(obj) == [], (obj["kind"], obj["metadata"]["name"])


def test_compose_file_matches_the_compose_specification() -> None:
    assert compose_errors(load(DEPLOY / "compose.yaml")) == []


def _misspell(doc: dict[str, Any], path: tuple[str | int, ...], wrong: str) -> dict[str, Any]:
    bad = copy.deepcopy(doc)
    target: Any = bad
    for part in path[:-1]:
        target = target[part]
    target[wrong] = target.pop(path[-1])
    return bad


@pytest.mark.parametrize(
    ("file", "path", "wrong"),
    [
        (
            "base/deployment.yaml",
            (
                "spec",
                "template",
                "spec",
                "containers",
                0,
                "securityContext",
                "readOnlyRootFilesystem",
            ),
            "readOnlyRootFileSystem",
        ),
        ("base/persistentvolumeclaim.yaml", ("spec", "accessModes"), "accessMode"),
        ("replicas/poddisruptionbudget.yaml", ("spec", "maxUnavailable"), "maxUnavailble"),
        ("replicas/horizontalpodautoscaler.yaml", ("spec", "minReplicas"), "minReplica"),
        ("monitoring/servicemonitor.yaml", ("spec", "endpoints", 0, "authorization"), "auth"),
        ("monitoring/prometheusrule.yaml", ("spec", "groups", 0, "rules", 0, "for"), "for_"),
    ],
)
def test_the_schema_checks_catch_a_misspelled_field(
    file: str, path: tuple[str | int, ...], wrong: str
) -> None:
    [doc] = documents(KUBERNETES / file)
    assert manifest_errors(doc) == []
    assert manifest_errors(_misspell(doc, path, wrong)) != []


def test_the_compose_check_catches_a_misspelled_field() -> None:
    compose = load(DEPLOY / "compose.yaml")
    assert compose_errors(_misspell(compose, ("services", "gateway-1", "read_only"), "readonly"))
    assert compose_errors(_misspell(compose, ("services", "lb", "ports"), "port"))
