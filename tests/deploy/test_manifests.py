"""The deployment files: valid YAML, pointing at files that exist, a policy that loads, the
admin token from a secret, and a gateway that runs as a non-root user on a read-only root
filesystem, writing only where its settings say it writes. (Schemas: ``test_schemas.py``; what
each kustomization applies: ``test_kustomizations.py``.)"""

from __future__ import annotations

import re
import shlex
from pathlib import PurePosixPath
from typing import Any

from gateway.admin import serving_problem
from gateway.app import create_app
from gateway.policy.loader import parse_policy, read_policy
from gateway.settings import Settings, load_settings
from gateway.store import SqliteStore, open_store
from tests.deploy.kustomize import DEPLOY, KUBERNETES, load

REPO = DEPLOY.parent
DEPLOYMENT = KUBERNETES / "base" / "deployment.yaml"
SERVICE_MONITOR = KUBERNETES / "monitoring" / "servicemonitor.yaml"


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


_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


def compose_environment(service: dict[str, Any], shell: dict[str, str]) -> dict[str, str]:
    """A service's environment as compose hands it over when the shell sets only ``shell``:
    ``${NAME:-default}`` is the default, ``${NAME:?message}`` must be set."""

    def value(match: re.Match[str]) -> str:
        name, operator, argument = match.groups()
        if name in shell:
            return shell[name]
        assert operator != "?", f"compose refuses to start without {name}"
        return argument if operator == "-" else ""

    return {name: _INTERPOLATION.sub(value, str(v)) for name, v in service["environment"].items()}


def test_prometheus_scrapes_the_gateway_under_the_job_the_alerts_use() -> None:
    config = load(DEPLOY / "prometheus" / "prometheus.yml")
    [job] = config["scrape_configs"]
    assert job["job_name"] == "agent-gateway" and job["metrics_path"] == "/metrics"
    monitor = load(SERVICE_MONITOR)
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "agent-gateway"


def test_the_configmap_policy_loads() -> None:
    configmap = load(KUBERNETES / "base" / "configmap-policy.yaml")
    policy = parse_policy(configmap["data"]["policy.yaml"], "configmap-policy.yaml")
    assert policy.file.defaults.limits.max_turns == 1000


# -- probes and the stop: the paths are the app's, the grace period covers the drain -----------
STOP_MARGIN = 5
"""Seconds the grace period keeps beyond the drain (and the preStop sleep): the cut calls'
unwinding (``server.CUT_GRACE``, 1 s) and the flush of the store, spans and audit log."""


def gateway_container() -> dict[str, Any]:
    [container] = load(DEPLOYMENT)["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def deployment_settings() -> Settings:
    """The settings the Deployment's pod runs with (the image's environment, then its own)."""
    values = {item["name"]: item["value"] for item in gateway_container()["env"] if "value" in item}
    return load_settings(env={**image_env(), **values, "GATEWAY_ADMIN_TOKEN": "t"})


async def probe(aiohttp_client: Any, path: str) -> int:
    """The status a probe gets on ``path`` from a gateway as the pod runs it (an admin token
    set; probes send none), on a store in memory and the packaged policy."""
    settings = deployment_settings().model_copy(update={"store": "memory://", "policy": None})
    client = await aiohttp_client(create_app(settings))
    async with client.get(path) as answer:
        return int(answer.status)


async def test_readiness_asks_ready_and_liveness_health_both_routes_of_the_app(
    aiohttp_client: Any,
) -> None:
    container = gateway_container()
    ready = container["readinessProbe"]["httpGet"]
    alive = container["livenessProbe"]["httpGet"]
    # Readiness turns 503 while a stop drains (the pod takes no new calls); liveness stays 200
    # while degraded (a restart would not mend a slow dependency).
    assert ready["path"] == "/gateway/ready" and alive["path"] == "/gateway/health"
    port = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port[ready["port"]] == port[alive["port"]] == deployment_settings().port
    assert await probe(aiohttp_client, ready["path"]) == 200
    assert await probe(aiohttp_client, alive["path"]) == 200
    assert deployment_settings().host == "0.0.0.0"


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


async def test_compose_waits_out_the_drain_and_checks_readiness(aiohttp_client: Any) -> None:
    gateway = load(DEPLOY / "compose.yaml")["services"]["gateway"]
    env = compose_environment(gateway, {"GATEWAY_ADMIN_TOKEN": "t"})
    settings = load_settings(env={**image_env(), **env})
    # `docker compose stop` sends SIGKILL after stop_grace_period (10 s unless set).
    assert seconds(gateway["stop_grace_period"]) >= settings.drain_timeout + STOP_MARGIN
    check = gateway["healthcheck"]["test"]
    assert check[:3] == ["CMD", "python", "-c"]
    [url] = re.findall(r"http://[^'\"]+", check[3])
    assert url == f"http://127.0.0.1:{settings.port}/gateway/ready"
    assert await probe(aiohttp_client, "/gateway/ready") == 200


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
    shell = {"GATEWAY_ADMIN_TOKEN": "t"}
    env = compose_environment(compose["services"]["gateway"], shell)
    settings = load_settings(env={**env, "GATEWAY_HOST": "0.0.0.0"})
    assert settings.metrics_auth and serving_problem(settings) is None


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
        text = path.read_text()
        assert f"create secret generic {ref['name']}" in text
        assert f"--from-literal={ref['key']}=" in text
    values = {name: item.get("value") for name, item in env.items() if "value" in item}
    settings = load_settings(env={**values, "GATEWAY_ADMIN_TOKEN": "from-the-secret"})
    assert settings.host == "0.0.0.0" and serving_problem(settings) is None
    assert serving_problem(load_settings(env=values)) is not None


# -- the image, its user, and where the gateway writes -----------------------------------------
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|CREDENTIAL", re.IGNORECASE)


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
    -wal and -shm files), the audit log's, and /tmp for SQLite's temporary files."""
    store = open_store(settings.store)
    assert isinstance(store, SqliteStore), "a container's sessions belong on a volume"
    places = {PurePosixPath(store.path).parent, PurePosixPath("/tmp")}
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
    settings = load_settings(env={**image_env(), "GATEWAY_ADMIN_TOKEN": "t"})
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
    # Without a token given at run time the gateway refuses to serve on 0.0.0.0.
    assert serving_problem(settings) is not None
    assert serving_problem(load_settings(env={**env, "GATEWAY_ADMIN_TOKEN": "t"})) is None
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
    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    settings = load_settings(env={**image_env(), **env, "GATEWAY_ADMIN_TOKEN": "t"})
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
    configmap = load(KUBERNETES / "base" / "configmap-policy.yaml")
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


def compose_mounts(service: dict[str, Any]) -> list[tuple[str, PurePosixPath, bool]]:
    """(source, target, read-only) of each short-syntax volume."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        mounts.append((source, PurePosixPath(target), mode == ["ro"]))
    return mounts


def test_compose_runs_the_gateway_as_the_images_user_on_a_read_only_root_filesystem() -> None:
    uid, gid = image_user()
    compose = load(DEPLOY / "compose.yaml")
    gateway = compose["services"]["gateway"]
    assert gateway["user"] == f"{uid}:{gid}"
    assert gateway["read_only"] is True
    assert gateway["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in gateway["security_opt"]
    env = {**image_env(), **compose_environment(gateway, {"GATEWAY_ADMIN_TOKEN": "t"})}
    settings = load_settings(env=env)
    mounts = compose_mounts(gateway)
    named = {target for source, target, _ in mounts if source in compose["volumes"]}
    tmpfs = {PurePosixPath(path) for path in gateway["tmpfs"]}
    assert named | tmpfs == writes(settings)
    binds = [(source, ro) for source, _, ro in mounts if source not in compose["volumes"]]
    assert binds and all(ro for _, ro in binds), "bind mounts are read-only"


def test_compose_mounts_the_policies_folder_so_an_edit_reloads() -> None:
    gateway = load(DEPLOY / "compose.yaml")["services"]["gateway"]
    settings = load_settings(env=compose_environment(gateway, {"GATEWAY_ADMIN_TOKEN": "t"}))
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
