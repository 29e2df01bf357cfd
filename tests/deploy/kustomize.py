"""What a kustomization applies, read without kustomize or kubectl: the files it lists, the
kustomizations it includes (recursively), its strategic merge patches and its ``namespace``.
Only the features the manifests in ``deploy/kubernetes`` use; anything else is refused, so a
new feature cannot be skipped silently by the tests. (``test_kustomizations.py`` compares it
with ``kubectl kustomize`` where kubectl is installed.)"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
KNOWN_FIELDS = {"apiVersion", "kind", "namespace", "resources", "patches"}
CLUSTER_SCOPED = {"Namespace"}
MERGE_KEYS = {
    "containers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "topologySpreadConstraints": "topologyKey",
}
"""The lists a strategic merge patch merges element by element, and the field that names an
element (Kubernetes' ``patchMergeKey``); any other list is replaced whole."""
DIRECTIVE = "$patch"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def kustomization_files() -> list[Path]:
    return sorted(KUBERNETES.rglob("kustomization.yaml"))


def patch_files() -> list[Path]:
    """Every patch a kustomization under ``deploy/kubernetes`` applies."""
    return sorted(
        path for kustomization in kustomization_files() for path in patches(kustomization.parent)
    )


def resource_files() -> list[Path]:
    """Every manifest under ``deploy/kubernetes`` (each one a resource of some kustomization)."""
    skipped = set(patch_files())
    return sorted(
        path
        for path in KUBERNETES.rglob("*.yaml")
        if path.name != "kustomization.yaml" and path not in skipped
    )


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

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def kinds(self) -> set[tuple[str, str]]:
        return {(obj["kind"], obj["metadata"]["name"]) for obj in self.objects}


def _kustomization(directory: Path) -> dict[str, Any]:
    kustomization = load(directory / "kustomization.yaml")
    unknown = set(kustomization) - KNOWN_FIELDS
    assert not unknown, f"{directory}: teach tests/deploy/kustomize.py about {sorted(unknown)}"
    assert kustomization["kind"] == "Kustomization", directory
    assert isinstance(kustomization, dict)
    return kustomization


def entries(directory: Path) -> list[Path]:
    """The resources one kustomization lists, as paths (files or kustomization directories)."""
    return [(directory / entry).resolve() for entry in _kustomization(directory)["resources"]]


def patches(directory: Path) -> list[Path]:
    """The patch files one kustomization applies (``patches: [{path: ...}]``, nothing else)."""
    found = []
    for patch in _kustomization(directory).get("patches", []):
        assert set(patch) == {"path"}, f"{directory}: only `path:` patches are understood"
        found.append((directory / patch["path"]).resolve())
    return found


def build(directory: Path) -> Build:
    """Like ``kustomize build directory`` for the features used here."""
    kustomization = _kustomization(directory)
    result = Build()
    for entry in entries(directory):
        if entry.is_dir():
            included = build(entry)
            result.objects += included.objects
            result.files += included.files
        else:
            result.objects += documents(entry)
            result.files.append(entry)
    for path in patches(directory):
        for patch in documents(path):
            result.objects = apply_patch(result.objects, patch, path)
        result.files.append(path)
    namespace = kustomization.get("namespace")
    if namespace:
        for obj in result.objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    return result


# -- strategic merge patches -------------------------------------------------------------------
def apply_patch(
    objects: list[dict[str, Any]], patch: dict[str, Any], path: Path
) -> list[dict[str, Any]]:
    """``objects`` with ``patch`` merged into the one object of its kind and name (or that
    object removed, for a patch whose ``$patch`` is ``delete``)."""
    kind, name = patch["kind"], patch["metadata"]["name"]
    targets = [
        index
        for index, obj in enumerate(objects)
        if obj["kind"] == kind and obj["metadata"]["name"] == name
    ]
    assert len(targets) == 1, f"{path}: patches no {kind} {name}, or several"
    [index] = targets
    assert objects[index]["apiVersion"] == patch["apiVersion"], path
    if patch.get(DIRECTIVE) == "delete":
        assert set(patch) == {"apiVersion", "kind", "metadata", DIRECTIVE}, path
        return objects[:index] + objects[index + 1 :]
    return [*objects[:index], merge(objects[index], patch), *objects[index + 1 :]]


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``patch`` merged into ``base``: maps key by key (``null`` removes a key), the lists of
    ``MERGE_KEYS`` element by element (``$patch: delete`` removes one), other values replaced."""
    merged = copy.deepcopy(base)
    for key, value in patch.items():
        assert not key.startswith("$"), f"{key}: a directive tests/deploy/kustomize.py lacks"
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        elif isinstance(value, list):
            merged[key] = _merge_list(merged.get(key) or [], value, key)
        else:
            merged[key] = _plain(value)
    return merged


def _merge_list(base: list[Any], patch: list[Any], name: str) -> list[Any]:
    key = MERGE_KEYS.get(name)
    if key is None:
        return [_plain(item) for item in patch]
    by_key = {item[key]: item for item in base}
    named, deleted = [], set()
    for item in patch:
        assert key in item, f"{name}: an element without its merge key {key}"
        if item.get(DIRECTIVE) == "delete":
            assert item[key] in by_key, f"{name}: deletes {item[key]}, which is not there"
            deleted.add(item[key])
        elif item[key] in by_key:
            named.append(merge(by_key[item[key]], item))
        else:
            named.append(_plain(item))
    # As kustomize orders them: the elements the patch names, then the others as they were.
    mentioned = {item[key] for item in patch}
    return named + [copy.deepcopy(item) for item in base if item[key] not in mentioned | deleted]


def _plain(value: Any) -> Any:
    """A value from a patch for a place the base lacks: no directive may be left in it."""
    if isinstance(value, dict):
        assert DIRECTIVE not in value, "a directive where there is nothing to patch"
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value
