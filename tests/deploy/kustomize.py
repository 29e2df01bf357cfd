"""What a kustomization applies, read without kustomize or kubectl: the files it lists, the
kustomizations it includes (recursively), and its ``namespace``. Only the features the
manifests in ``deploy/kubernetes`` use; anything else is refused, so a new feature cannot be
skipped silently by the tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
KNOWN_FIELDS = {"apiVersion", "kind", "namespace", "resources"}
CLUSTER_SCOPED = {"Namespace"}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def kustomization_files() -> list[Path]:
    return sorted(KUBERNETES.rglob("kustomization.yaml"))


def resource_files() -> list[Path]:
    """Every manifest under ``deploy/kubernetes`` (each one a resource of some kustomization)."""
    return sorted(path for path in KUBERNETES.rglob("*.yaml") if path.name != "kustomization.yaml")


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@dataclass
class Build:
    """The objects one kustomization applies, and the files they came from."""

    objects: list[dict[str, Any]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def named(self, kind: str, name: str) -> dict[str, Any]:
        [found] = [
            obj for obj in self.objects if obj["kind"] == kind and obj["metadata"]["name"] == name
        ]
        return found

    def kinds(self) -> set[tuple[str, str]]:
        return {(obj["kind"], obj["metadata"]["name"]) for obj in self.objects}


def entries(directory: Path) -> list[Path]:
    """The resources one kustomization lists, as paths (files or kustomization directories)."""
    kustomization = load(directory / "kustomization.yaml")
    unknown = set(kustomization) - KNOWN_FIELDS
    assert not unknown, f"{directory}: teach tests/deploy/kustomize.py about {sorted(unknown)}"
    assert kustomization["kind"] == "Kustomization", directory
    return [(directory / entry).resolve() for entry in kustomization["resources"]]


def build(directory: Path) -> Build:
    """Like ``kustomize build directory`` for the features used here."""
    kustomization = load(directory / "kustomization.yaml")
    result = Build()
    for entry in entries(directory):
        if entry.is_dir():
            included = build(entry)
            result.objects += included.objects
            result.files += included.files
        else:
            result.objects += documents(entry)
            result.files.append(entry)
    namespace = kustomization.get("namespace")
    if namespace:
        for obj in result.objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    return result
