"""The deployment files: valid YAML, pointing at files that exist, a policy that loads, the
admin token from a secret, and a gateway that runs as a non-root user on a read-only root
filesystem, writing only where its settings say it writes. (Schemas: ``test_schemas.py``; what
each kustomization applies: ``test_kustomizations.py``; who may call each deployment and where
its secrets come from: ``test_secure_deployments.py``.)"""

from __future__ import annotations

import asyncio
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from gateway.admin import serving_problem
from gateway.app import create_app
from gateway.policy.loader import parse_policy, read_policy
from gateway.settings import Settings, load_settings
from gateway.state import state_dir
from gateway.store import SHARED_SCHEMES, SqliteStore, open_store
from tests.deploy.kustomize import DEPLOY, KUBERNETES, load
from tests.deploy.pods import (
    COMPOSE,
    CONFIGMAP,
    DEPLOYMENT,
    REPO,
    SECRET_NAME,
    compose_mounts,
    compose_pod,
    compose_settings,
    compose_shell,
    config_argument,
    dockerfile,
    documented_secrets,
    gateway_container,
    gateway_services,
    image_env,
    kubernetes_pod,
    kubernetes_settings,
    redis_store_url,
    secret_value,
)
from tests.redis_server import SharedRedis

SERVICE_MONITOR = KUBERNETES / "monitoring" / "servicemonitor.yaml"
STRONG_TOKEN = secret_value()
"""An admin token as an operator makes one (``openssl rand -hex 32``)."""


def test_every_yaml_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 10
    for path in files:
        assert load(path) is not None, path


def test_compose_mounts_files_that_exist() -> None:
    compose = load(COMPOSE)
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
    for name in gateway_services():
        environment = compose["services"][name]["environment"]
        assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://otel-collector:")


def test_the_gateways_config_files_are_the_mounted_ones_and_load(tmp_path: Path) -> None:
    """``gateway serve --config FILE``: the file is on a read-only mount of the config (the
    compose folder, the ConfigMap) and loads as the gateway reads it."""
    for name in gateway_services():
        compose = compose_pod(tmp_path / "compose" / name, compose_shell(), service=name)
        service = load(COMPOSE)["services"][name]
        config = config_argument(service["command"])
        [(source, target)] = [(s, t) for s, t, ro in compose_mounts(service) if config.parent == t]
        assert ro_mount(service, target) and (DEPLOY / source / config.name).is_file()
        assert compose.settings.auth.mode == "keys"
    pod = kubernetes_pod(tmp_path / "kubernetes")
    container = gateway_container()
    config = config_argument(container["command"])
    mounts = {PurePosixPath(m["mountPath"]): m for m in container["volumeMounts"]}
    assert mounts[config.parent]["readOnly"] is True
    assert config.name in load(CONFIGMAP)["data"]
    assert pod.settings.auth.mode == "keys"


def ro_mount(service: dict[str, Any], target: PurePosixPath) -> bool:
    return any(ro for _, t, ro in compose_mounts(service) if t == target)


def test_prometheus_scrapes_the_gateway_under_the_job_the_alerts_use() -> None:
    config = load(DEPLOY / "prometheus" / "prometheus.yml")
    [job] = config["scrape_configs"]
    assert job["job_name"] == "agent-gateway" and job["metrics_path"] == "/metrics"
    monitor = load(SERVICE_MONITOR)
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "agent-gateway"


def test_the_configmap_policy_loads() -> None:
    configmap = load(CONFIGMAP)
    policy = parse_policy(configmap["data"]["policy.yaml"], "configmap.yaml")
    assert policy.file.defaults.limits.max_turns == 1000


# -- probes and the stop: the paths are the app's, the grace period covers the drain -----------
STOP_MARGIN = 5
"""Seconds the grace period keeps beyond the drain (and the preStop sleep): the cut calls'
unwinding (``server.CUT_GRACE``, 1 s) and the flush of the store, spans and audit log."""


def deployment_settings() -> Settings:
    """The settings the Deployment's pod runs with (the image's environment, then its own,
    and its config file), as the container sees them."""
    return kubernetes_settings()


async def probe(aiohttp_client: Any, settings: Settings, path: str) -> int:
    """The status a probe gets on ``path`` from a gateway started with ``settings`` (its
    files where they are), asked by the pod's address as the kubelet asks."""
    client = await aiohttp_client(create_app(settings))
    async with client.get(path, headers={"Host": "10.1.2.3:8787"}) as answer:
        return int(answer.status)


async def test_readiness_asks_ready_and_liveness_health_both_routes_of_the_app(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    container = gateway_container()
    ready = container["readinessProbe"]["httpGet"]
    alive = container["livenessProbe"]["httpGet"]
    # Readiness turns 503 while a stop drains (the pod takes no new calls); liveness stays 200
    # while degraded (a restart would not mend a slow dependency).
    assert ready["path"] == "/gateway/ready" and alive["path"] == "/gateway/health"
    port = {p["name"]: p["containerPort"] for p in container["ports"]}
    # Files read and written: off the event loop.
    expected = await asyncio.to_thread(deployment_settings)
    assert port[ready["port"]] == port[alive["port"]] == expected.port
    assert expected.host == "0.0.0.0"
    settings = (await asyncio.to_thread(kubernetes_pod, tmp_path)).settings
    assert await probe(aiohttp_client, settings, ready["path"]) == 200
    assert await probe(aiohttp_client, settings, alive["path"]) == 200


def pre_stop_seconds(container: dict[str, Any]) -> float:
    """The preStop hook's sleep (0 without one)."""
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0.0
    command = hook["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


def test_the_grace_period_covers_the_pre_stop_sleep_the_drain_and_a_margin() -> None:
    """Past ``terminationGracePeriodSeconds`` the kubelet sends SIGKILL: the drain would be cut
    short and the store's last writes lost. It counts from the start of preStop."""
    pod = load(DEPLOYMENT)["spec"]["template"]["spec"]
    container = gateway_container()
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert "GATEWAY_DRAIN_TIMEOUT" in env, "the drain the grace period is counted from"
    drain = deployment_settings().drain_timeout
    pre_stop = pre_stop_seconds(container)
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + drain + STOP_MARGIN, (grace, pre_stop, drain)
    # Not a padding that keeps a stuck pod for minutes.
    assert grace <= pre_stop + drain + 4 * STOP_MARGIN
    if pre_stop:
        # `sleep` must be in the image: a Debian-based Python image has coreutils.
        [base] = [args for name, args in dockerfile() if name == "FROM"]
        assert base.startswith("python:") and base.endswith("-slim"), base


def seconds(duration: str) -> float:
    """A compose duration such as ``35s``, ``1m30s``."""
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match and duration, duration
    minutes, secs = match.groups()
    return int(minutes or 0) * 60 + int(secs or 0)


@pytest.mark.parametrize("service", gateway_services())
async def test_compose_waits_out_the_drain_and_checks_readiness(
    aiohttp_client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    shared_redis: SharedRedis,
    service: str,
) -> None:
    gateway = load(COMPOSE)["services"][service]
    shell = {**compose_shell(), "GATEWAY_REDIS_PASSWORD": shared_redis.password}
    store = {"GATEWAY_STORE": redis_store_url(shared_redis.port)}
    pod = await asyncio.to_thread(compose_pod, tmp_path, shell, store, service=service)
    settings = pod.settings
    # `docker compose stop` sends SIGKILL after stop_grace_period (10 s unless set).
    assert seconds(gateway["stop_grace_period"]) >= settings.drain_timeout + STOP_MARGIN
    check = gateway["healthcheck"]["test"]
    assert check[:3] == ["CMD", "python", "-c"]
    [url] = re.findall(r"http://[^'\"]+", check[3])
    assert url == f"http://127.0.0.1:{settings.port}/gateway/ready"
    for name, value in pod.read_from_environment().items():
        monkeypatch.setenv(name, value)
    assert await probe(aiohttp_client, settings, "/gateway/ready") == 200


def test_compose_sets_the_admin_token_from_the_environment_and_prometheus_scrapes_with_it() -> None:
    compose = load(COMPOSE)
    for name in gateway_services():
        env = compose["services"][name]["environment"]
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
    settings = compose_settings({**compose_shell(), "GATEWAY_ADMIN_TOKEN": STRONG_TOKEN})
    assert settings.admin_token is not None and settings.admin_token.reveal() == STRONG_TOKEN
    assert settings.host == "0.0.0.0" and settings.metrics_auth
    assert serving_problem(settings) is None


def test_kubernetes_takes_the_admin_token_from_a_secret_the_monitor_scrapes_with() -> None:
    deployment = load(DEPLOYMENT)
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item for item in container["env"]}
    ref = env["GATEWAY_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert env["GATEWAY_METRICS_AUTH"]["value"] == "true"
    monitor = load(SERVICE_MONITOR)
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": ref}
    # The Secret is made by hand (never committed); the manifests and the README say how.
    for path in (DEPLOYMENT, KUBERNETES / "base" / "kustomization.yaml", REPO / "README.md"):
        assert ref["key"] in documented_secrets(path.read_text())[ref["name"]], path
    settings = kubernetes_settings({"GATEWAY_ADMIN_TOKEN": STRONG_TOKEN})
    assert settings.host == "0.0.0.0" and serving_problem(settings) is None
    # A weak value in the Secret: the pod refuses to start (and says why) rather than serve.
    assert serving_problem(kubernetes_settings({"GATEWAY_ADMIN_TOKEN": "changeme"})) is not None


# -- the image, its user, and where the gateway writes -----------------------------------------
def image_user() -> tuple[int, int]:
    """The image's run-time user as numbers (the last USER, which must be numeric: the kubelet
    can check ``runAsNonRoot`` only against a numeric uid)."""
    users = [args for name, args in dockerfile() if name == "USER"]
    assert users, "the image runs as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and gid.isdigit(), f"USER {users[-1]}: use numbers, uid:gid"
    return int(uid), int(gid)


def writes(settings: Settings) -> set[PurePosixPath]:
    """The directories the gateway writes with these settings: the SQLite store's (with its
    -wal and -shm files; none with Redis, a server), the audit log's, and /tmp (SQLite's
    temporary files, any library's). (The state directory, where a pepper or admin token is
    generated, is inside the store's: see ``test_the_state_directory_is_on_the_volume``.)"""
    places = {PurePosixPath("/tmp")}
    if settings.store.partition(":")[0] not in SHARED_SCHEMES:
        store = open_store(settings.store)
        assert isinstance(store, SqliteStore), "a container's sessions belong on a volume"
        places.add(PurePosixPath(store.path).parent)
    if settings.audit_log is not None:
        places.add(PurePosixPath(settings.audit_log).parent)
    assert all(place.is_absolute() for place in places), places
    return places


def test_the_image_runs_as_a_non_root_uid_that_owns_only_the_store_directory() -> None:
    uid, gid = image_user()
    assert uid > 0 and gid > 0
    instructions = [name for name, _ in dockerfile()]
    last_user = len(instructions) - 1 - instructions[::-1].index("USER")
    # Everything is built (and so owned) by root: the code is not writable by the gateway.
    assert "RUN" not in instructions[last_user:] and "COPY" not in instructions[last_user:]
    settings = load_settings(env=image_env())
    [store_dir] = writes(settings) - {PurePosixPath("/tmp")}
    volumes = [args for name, args in dockerfile() if name == "VOLUME"]
    assert volumes == [str(store_dir)]
    commands = [
        " ".join(command.split())
        for name, args in dockerfile()
        if name == "RUN"
        for command in args.split("&&")
    ]
    assert f"chown {uid}:{gid} {store_dir}" in commands, "the store's directory is the user's"


def test_the_image_listens_publicly_but_bakes_in_no_secret() -> None:
    env = image_env()
    settings = load_settings(env=env)
    assert settings.host == "0.0.0.0" and settings.metrics_auth
    # Alone, in passthrough mode on 0.0.0.0, it refuses to start and says how to go on: gateway
    # keys (what the compose file and the manifests configure), or the flag, knowingly.
    problem = serving_problem(settings)
    assert problem is not None
    assert "gateway keys create --team" in problem and "--allow-network-passthrough" in problem
    knowingly = load_settings(env=env, allow_network_passthrough=True)
    assert serving_problem(knowingly) is None
    names = [
        word.split("=", 1)[0]
        for name, args in dockerfile()
        if name in ("ENV", "ARG")
        for word in shlex.split(args)
    ]
    assert not [name for name in names if SECRET_NAME.search(name)]
    for name, args in dockerfile():
        if name == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (REPO / source).exists(), source
                assert not SECRET_NAME.search(source) and ".env" not in source, source


def test_the_pod_runs_as_the_images_user_on_a_read_only_root_filesystem() -> None:
    uid, gid = image_user()
    pod = load(DEPLOYMENT)["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": gid,
        "fsGroup": gid,  # the volume is made the user's
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    [container] = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def test_kubernetes_mounts_writable_volumes_exactly_where_the_gateway_writes() -> None:
    pod = load(DEPLOYMENT)["spec"]["template"]["spec"]
    [container] = pod["containers"]
    settings = deployment_settings()
    mounts = {PurePosixPath(m["mountPath"]): m for m in container["volumeMounts"]}
    writable = {path for path, mount in mounts.items() if not mount.get("readOnly")}
    assert writable == writes(settings)
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    [store_dir] = writes(settings) - {PurePosixPath("/tmp")}
    assert "persistentVolumeClaim" in volumes[mounts[store_dir]["name"]]
    # The policy: a read-only mount of the ConfigMap, whose key is the file the gateway reads.
    assert settings.policy is not None
    policy = PurePosixPath(settings.policy)
    mount = mounts[policy.parent]
    assert mount["readOnly"] is True
    configmap = load(CONFIGMAP)
    assert configmap["metadata"]["name"] == volumes[mount["name"]]["configMap"]["name"]
    assert policy.name in configmap["data"]


def test_kubernetes_runs_one_replica_on_a_persistent_volume_from_a_local_image() -> None:
    deployment = load(DEPLOYMENT)
    # SQLite is one process's: never two pods on one file, not even during a rollout.
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    claim = load(KUBERNETES / "base" / "persistentvolumeclaim.yaml")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    # Without it a `:latest` image is always pulled, and one built locally is never found.
    assert container["imagePullPolicy"] == "IfNotPresent"


@pytest.mark.parametrize("service", gateway_services())
def test_compose_runs_the_gateway_as_the_images_user_on_a_read_only_root_filesystem(
    service: str,
) -> None:
    uid, gid = image_user()
    compose = load(COMPOSE)
    gateway = compose["services"][service]
    assert gateway["user"] == f"{uid}:{gid}"
    assert gateway["read_only"] is True
    assert gateway["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in gateway["security_opt"]
    settings = compose_settings(service=service)
    mounts = compose_mounts(gateway)
    named = {target for source, target, _ in mounts if source in compose["volumes"]}
    # No volume: what a replica keeps is in Redis; /tmp is memory.
    assert not named and settings.store.startswith("redis://")
    tmpfs = {PurePosixPath(path) for path in gateway["tmpfs"]}
    assert tmpfs == writes(settings)
    binds = [(source, ro) for source, _, ro in mounts if source not in compose["volumes"]]
    assert binds and all(ro for _, ro in binds), "bind mounts are read-only"


@pytest.mark.parametrize("service", gateway_services())
def test_compose_mounts_the_policies_folder_so_an_edit_reloads(service: str) -> None:
    gateway = load(COMPOSE)["services"][service]
    settings = compose_settings(service=service)
    assert settings.policy is not None
    policy = PurePosixPath(settings.policy)
    [(source, target)] = [
        (source, target) for source, target, _ in compose_mounts(gateway) if target == policy.parent
    ]
    # A folder, not the file: an editor saving by rename would leave a file mount on the old one.
    folder = (DEPLOY / source).resolve()
    assert folder == REPO / "policies" and folder.is_dir()
    on_the_host = folder / policy.relative_to(target)
    assert read_policy(on_the_host).file.version == 1
    # The gateway polls the file, so an edit reloads without a restart.
    assert settings.policy_poll_interval <= 5


def test_the_state_directory_is_on_the_volume() -> None:
    """What the gateway generates on first start (a pepper, an admin token: created 0700,
    files 0600) lands on the volume that keeps the store, never on the read-only root
    filesystem, in the image and the pod. The compose replicas have no volume: they generate
    nothing, both coming from the shell (``test_secure_deployments.py`` starts them)."""
    image = load_settings(env=image_env())
    [volume] = [PurePosixPath(args) for name, args in dockerfile() if name == "VOLUME"]
    assert PurePosixPath(state_dir(image.state_dir, image.store)).is_relative_to(volume)
    compose = load(COMPOSE)
    for name in gateway_services():
        env = compose["services"][name]["environment"]
        for variable in ("GATEWAY_ADMIN_TOKEN", "GATEWAY_KEY_PEPPER"):
            assert env[variable].startswith(f"${{{variable}:?"), (name, variable)
    pod = load(DEPLOYMENT)["spec"]["template"]["spec"]
    claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    settings = deployment_settings()
    place = PurePosixPath(state_dir(settings.state_dir, settings.store))
    [mount] = [
        m
        for m in gateway_container()["volumeMounts"]
        if place.is_relative_to(PurePosixPath(m["mountPath"]))
    ]
    assert mount["name"] in claims and not mount.get("readOnly")
