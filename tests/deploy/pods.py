"""The gateway as each shipped deployment runs it: the image's environment, the compose
service's, the Kubernetes pod's, the Secrets their comments tell an operator to create, and
each one's filesystem laid out under a directory of the test's (``Pod``), so that a test can
start the very settings a container would start with, its Secrets as files or variables.

Paths the deployment names inside the container (``/etc/agent-gateway/...``,
``/run/secrets/...``, ``/data``) are rewritten to their place under that directory; nothing
else in the settings changes.
"""

from __future__ import annotations

import re
import secrets
import shlex
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

import yaml

from gateway.auth.pepper import PEPPER_VARIABLE
from gateway.settings import Settings, load_settings
from tests.deploy.kustomize import DEPLOY, KUBERNETES, build, load

REPO = DEPLOY.parent
BASE = KUBERNETES / "base"
REPLICAS = KUBERNETES / "replicas"
DEPLOYMENT = BASE / "deployment.yaml"
CONFIGMAP = BASE / "configmap.yaml"
COMPOSE = DEPLOY / "compose.yaml"
REDIS_PASSWORD_VARIABLE = "GATEWAY_REDIS_PASSWORD"
"""The Redis store's password, read from the environment (``gateway.store.open_store``)."""
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|CREDENTIAL|PEPPER", re.IGNORECASE)
"""Variable names that hold a secret: set from a Secret or the shell, never written down."""


# -- the image ---------------------------------------------------------------------------------
def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions in order, as (INSTRUCTION, arguments): continuation
    lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        instruction, _, arguments = (current + line).partition(" ")
        instructions.append((instruction.upper(), arguments.strip()))
        current = ""
    return instructions


def image_env() -> dict[str, str]:
    words = [w for name, args in dockerfile() if name == "ENV" for w in shlex.split(args)]
    return dict(word.split("=", 1) for word in words)


# -- the Secrets an operator is told to create --------------------------------------------------
_CONTINUATION = re.compile(r"\\[ \t]*\n[ \t]*#?[ \t]*")
_CREATE = re.compile(r"kubectl -n ([\w.-]+) create secret generic ([\w.-]+)([^\n]*)")
_LITERAL = re.compile(r"--from-literal=([\w.-]+)=")
NAMESPACE = load(BASE / "kustomization.yaml")["namespace"]


def documented_secrets(text: str, namespace: str = NAMESPACE) -> dict[str, set[str]]:
    """``kubectl -n NAMESPACE create secret generic NAME --from-literal=KEY=...`` commands in
    ``text`` (comments or a README; continuation lines joined): each Secret's name and keys."""
    found: dict[str, set[str]] = {}
    for where, name, rest in _CREATE.findall(_CONTINUATION.sub(" ", text)):
        if where == namespace:
            found.setdefault(name, set()).update(_LITERAL.findall(rest))
    return found


def secret_value() -> str:
    """A value as an operator generates it (``openssl rand -hex 32``)."""
    return secrets.token_hex(32)


def redis_store_url(port: int) -> str:
    """A test's Redis (on loopback, at ``port``) in place of a deployment's: its password
    left to ``GATEWAY_REDIS_PASSWORD``, as the deployments give it; a fresh key prefix, so
    the store starts empty."""
    return f"redis://127.0.0.1:{port}/0?prefix=t{secrets.token_hex(6)}"


# -- a container's filesystem under a directory -------------------------------------------------
@dataclass
class Pod:
    """One deployment's gateway: its settings with every container path under ``root``."""

    root: Path
    settings: Settings
    mounts: dict[PurePosixPath, Path]
    """Container path -> where it is here."""
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)
    """Secret name -> key -> the value written (Kubernetes)."""
    environment: dict[str, str] = field(default_factory=dict)
    """The container's environment (compose): what ``env:`` references and the pepper read."""

    def read_from_environment(self) -> dict[str, str]:
        """The container's variables the gateway reads itself, beside its settings: the
        pepper and each ``env:`` credential reference (for a test to set, and nothing else:
        the rest, such as an OTLP endpoint, would send traffic off this machine)."""
        names = {PEPPER_VARIABLE, REDIS_PASSWORD_VARIABLE} | {
            entry.value.removeprefix("env:")
            for upstream in self.settings.upstreams.values()
            for pool in upstream.credentials.values()
            for entry in pool
            if entry.value.startswith("env:")
        }
        return {name: self.environment[name] for name in sorted(names) if name in self.environment}

    def here(self, path: str | PurePath) -> Path:
        found = remap(str(path), self.mounts)
        assert found != str(path), f"{path} is on no mount of the container"
        return Path(found)


def remap(value: str, mounts: Mapping[PurePosixPath, Path]) -> str:
    """``value`` (a path, ``file:/path`` or ``sqlite:////path``) with its mount's container
    path replaced by where the mount is here; anything else as it is."""
    for prefix in ("file:", "sqlite:///", ""):
        if not value.startswith(prefix):
            continue
        path = value.removeprefix(prefix)
        if not path.startswith("/"):
            continue
        inside = PurePosixPath(path)
        for target in sorted(mounts, key=lambda p: len(p.parts), reverse=True):
            if inside == target or inside.is_relative_to(target):
                return prefix + str(mounts[target] / inside.relative_to(target))
    return value


def _remapped(value: Any, mounts: Mapping[PurePosixPath, Path]) -> Any:
    if isinstance(value, str):
        return remap(value, mounts)
    if isinstance(value, dict):
        return {k: _remapped(v, mounts) for k, v in value.items()}
    if isinstance(value, list):
        return [_remapped(v, mounts) for v in value]
    return value


def config_argument(command: list[str]) -> PurePosixPath:
    """The ``--config`` file of a ``gateway serve`` command line."""
    assert command[:2] == ["gateway", "serve"], command
    assert command.count("--config") == 1, command
    return PurePosixPath(command[command.index("--config") + 1])


def _settings(
    config: PurePosixPath,
    env: Mapping[str, str],
    mounts: Mapping[PurePosixPath, Path],
    *,
    container_view: bool = False,
) -> Settings:
    """The settings from the container's config file and environment: their paths rewritten
    to the mounts here, or as the container sees them (``container_view``)."""
    data = load(Path(remap(str(config), mounts)))
    if not container_view:
        data = _remapped(data, mounts)
        env = {name: remap(value, mounts) for name, value in env.items()}
    with tempfile.TemporaryDirectory() as directory:
        written = Path(directory) / "gateway.yaml"
        written.write_text(yaml.safe_dump(data))
        return load_settings(written, env=env)


# -- Kubernetes --------------------------------------------------------------------------------
def gateway_deployment(overlay: Path = BASE) -> dict[str, Any]:
    """The Deployment a kustomization (the base, or an overlay) applies."""
    return build(overlay).named("Deployment", "agent-gateway")


def gateway_container(overlay: Path = BASE) -> dict[str, Any]:
    [container] = gateway_deployment(overlay)["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def kubernetes_secrets(overlay: Path = BASE) -> dict[str, set[str]]:
    """The Secrets a kustomization tells an operator to create."""
    return documented_secrets((overlay / "kustomization.yaml").read_text())


def kubernetes_pod(
    root: Path,
    env: Mapping[str, str] | None = None,
    *,
    container_view: bool = False,
    overlay: Path = BASE,
    made: Mapping[str, Mapping[str, str]] | None = None,
) -> Pod:
    """The Deployment's pod under ``root``, as ``overlay`` applies it: its ConfigMaps written
    out or read, each Secret it mounts or reads made as documented (fresh values, or those
    of ``made``: another replica's), its volumes as directories; ``env`` is set over the
    container's own environment (upstream URLs to a fake provider, a test's Redis)."""
    applied = build(overlay)
    pod = applied.named("Deployment", "agent-gateway")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    if made is None:
        made = {
            name: {key: secret_value() for key in keys}
            for name, keys in kubernetes_secrets(overlay).items()
        }
    mounts: dict[PurePosixPath, Path] = {}
    for mount in container["volumeMounts"]:
        target = PurePosixPath(mount["mountPath"])
        place = root / target.relative_to("/")
        place.mkdir(parents=True)
        mounts[target] = place
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            configmap = applied.named("ConfigMap", volume["configMap"]["name"])
            for key, text in configmap["data"].items():
                (place / key).write_text(text)
        elif "secret" in volume:
            name = volume["secret"]["secretName"]
            assert name in made, f"the Secret {name} is mounted but nowhere documented"
            for key, value in made[name].items():
                (place / key).write_text(value)
    values: dict[str, str] = {}
    for item in container["env"]:
        if "value" in item:
            values[item["name"]] = item["value"]
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["key"] in made.get(ref["name"], {}), f"{ref} is nowhere documented"
            values[item["name"]] = made[ref["name"]][ref["key"]]
        else:
            ref = item["valueFrom"]["configMapKeyRef"]
            values[item["name"]] = applied.named("ConfigMap", ref["name"])["data"][ref["key"]]
    settings = _settings(
        config_argument(container["command"]),
        {**image_env(), **values, **(env or {})},
        mounts,
        container_view=container_view,
    )
    copied = {name: dict(keys) for name, keys in made.items()}
    return Pod(root, settings, mounts, secrets=copied, environment=values)


def kubernetes_settings(env: Mapping[str, str] | None = None, overlay: Path = BASE) -> Settings:
    """The settings the pod runs with, its paths as the container sees them."""
    with tempfile.TemporaryDirectory() as directory:
        pod = kubernetes_pod(Path(directory), env, container_view=True, overlay=overlay)
        return pod.settings


# -- compose -----------------------------------------------------------------------------------
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


def compose_environment(service: dict[str, Any], shell: Mapping[str, str]) -> dict[str, str]:
    """A service's environment as compose hands it over when the shell sets only ``shell``:
    ``${NAME:-default}`` is the default, ``${NAME:?message}`` must be set."""

    def value(match: re.Match[str]) -> str:
        name, operator, argument = match.groups()
        if name in shell:
            return shell[name]
        assert operator != "?", f"compose refuses to start without {name}"
        return argument if operator == "-" else ""

    return {name: _INTERPOLATION.sub(value, str(v)) for name, v in service["environment"].items()}


def compose_shell() -> dict[str, str]:
    """What the compose file's comments tell an operator to export: every variable it
    requires (``${NAME:?...}``), as generated values."""
    text = COMPOSE.read_text()
    required = {name for name, operator, _ in _INTERPOLATION.findall(text) if operator == "?"}
    return {name: secret_value() for name in sorted(required)}


def compose_mounts(service: dict[str, Any]) -> list[tuple[str, PurePosixPath, bool]]:
    """(source, target, read-only) of each short-syntax volume."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        mounts.append((source, PurePosixPath(target), mode == ["ro"]))
    return mounts


def gateway_services() -> list[str]:
    """The compose services that run the gateway (``gateway serve``): its replicas."""
    services = load(COMPOSE)["services"]
    return [
        name for name, s in services.items() if s.get("command", [])[:2] == ["gateway", "serve"]
    ]


def compose_pod(
    root: Path,
    shell: Mapping[str, str],
    env: Mapping[str, str] | None = None,
    *,
    container_view: bool = False,
    service: str = "gateway-1",
) -> Pod:
    """A gateway replica of the compose stack under ``root``: bind mounts are the
    repository's own folders, named volumes and tmpfs directories under ``root``."""
    compose = load(COMPOSE)
    spec = compose["services"][service]
    mounts: dict[PurePosixPath, Path] = {}
    for source, target, _ in compose_mounts(spec):
        if source in compose.get("volumes", {}):
            mounts[target] = root / target.relative_to("/")
            mounts[target].mkdir(parents=True)
        else:
            mounts[target] = (DEPLOY / source).resolve()
    for path in spec.get("tmpfs", []):
        mounts[PurePosixPath(path)] = root / PurePosixPath(path).relative_to("/")
        mounts[PurePosixPath(path)].mkdir(parents=True)
    environment = compose_environment(spec, shell)
    settings = _settings(
        config_argument(spec["command"]),
        {**image_env(), **environment, **(env or {})},
        mounts,
        container_view=container_view,
    )
    return Pod(root, settings, mounts, environment=environment)


def compose_settings(
    shell: Mapping[str, str] | None = None, service: str = "gateway-1"
) -> Settings:
    """The settings a replica of the compose stack runs with (the shell exporting what the
    compose file requires), its paths as the container sees them."""
    shell = compose_shell() if shell is None else shell
    with tempfile.TemporaryDirectory() as directory:
        return compose_pod(Path(directory), shell, container_view=True, service=service).settings
