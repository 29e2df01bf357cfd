"""The shipped deployments start under the gateway's secure defaults (issue 15 §9): gateway
keys (never passthrough on the network without the flag and what it means), no secret written
in any file, the admin token, the pepper and the provider keys from Secrets or the shell, a
strong admin token required, ``allowed_hosts`` naming the names callers use, and a bootstrap
key made as the comments say. The last tests start the compose stack's gateway and the
Kubernetes pod's as they run (their config, environment and Secrets laid out in a temporary
directory, ``tests/deploy/pods.py``) against the fake provider, make the bootstrap key with
the documented command, and call with it."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp.test_utils import TestServer

from gateway.admin import serving_problem
from gateway.app import create_app
from gateway.auth.hosts import HostCheck
from gateway.auth.pepper import PEPPER_VARIABLE, PepperMissing, load_pepper
from gateway.cli import _parser, main
from gateway.fake_provider import RECEIVED
from gateway.redact import Redactor
from gateway.settings import Settings, load_settings
from gateway.state import state_dir
from tests.conftest import ANTHROPIC_MODEL
from tests.deploy.kustomize import DEPLOY, KUBERNETES, load
from tests.deploy.pods import (
    COMPOSE,
    CONFIGMAP,
    DEPLOYMENT,
    NAMESPACE,
    REDIS_PASSWORD_VARIABLE,
    REPLICAS,
    REPO,
    SECRET_NAME,
    Pod,
    compose_pod,
    compose_settings,
    compose_shell,
    documented_secrets,
    gateway_container,
    gateway_services,
    image_env,
    kubernetes_pod,
    kubernetes_secrets,
    kubernetes_settings,
    redis_store_url,
    secret_value,
)
from tests.redis_server import SharedRedis

KUSTOMIZATION = KUBERNETES / "base" / "kustomization.yaml"
COMPOSE_CONFIG = DEPLOY / "config" / "gateway.yaml"
POD_ADDRESS = "10.1.2.3:8787"
"""How the kubelet's probes and Prometheus (through the ServiceMonitor) name the pod."""
MESSAGES = {"model": ANTHROPIC_MODEL, "max_tokens": 16,
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def text_files() -> list[Path]:
    return sorted(path for path in DEPLOY.rglob("*") if path.is_file())


# -- no secret written anywhere ----------------------------------------------------------------
def test_no_deploy_file_holds_a_secret() -> None:
    """No provider key, gateway key, JWT, bearer token or private key in any file under
    deploy/ (the redaction's own patterns, which recognise them in logs)."""
    files = text_files()
    assert len(files) >= 15
    for path in files:
        # Line by line: a credential is written on one line, and across lines the bearer
        # pattern would take `type: Bearer` and the next line's key for one.
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert Redactor().redact(line, "config") == line, f"{path}:{number}"
    # The check sees one when there is one.
    planted = "value: sk-ant-api03-" + secret_value()
    assert Redactor().redact(planted, "config") != planted


def test_kubernetes_takes_every_secret_variable_from_a_secret() -> None:
    for item in gateway_container()["env"]:
        if SECRET_NAME.search(item["name"]):
            assert "value" not in item, item["name"]
            assert set(item["valueFrom"]) == {"secretKeyRef"}, item["name"]
        else:
            assert "value" in item, item["name"]


def test_compose_takes_every_secret_variable_from_the_shell_without_a_default() -> None:
    """``${NAME:?message}`` (required) or ``${NAME:-}`` (optional, empty): never a value. The
    shell's variable is a secret's name too (Redis takes the gateway's Redis password under
    a name of its own), and a secret from the shell is never part of a longer value."""
    whole = re.compile(r"\$\{(\w+)(:\?[^}]*|:-)\}")
    for name, service in load(COMPOSE)["services"].items():
        for variable, value in service.get("environment", {}).items():
            found = whole.fullmatch(str(value))
            if SECRET_NAME.search(variable):
                assert found and SECRET_NAME.search(found.group(1)), f"{name}: {variable}: {value}"
            for source in re.findall(r"\$\{(\w+)", str(value)):
                if SECRET_NAME.search(source):
                    assert found, f"{name}: {variable}: {value}"
        # Nor on a command line (`docker inspect` and ps show it): the containers read theirs
        # from the environment.
        assert "${" not in str(service.get("command", "")), name


def credential_references(settings: Settings) -> list[str]:
    return [
        entry.value
        for upstream in settings.upstreams.values()
        for pool in upstream.credentials.values()
        for entry in pool
    ]


def secret_mounts() -> dict[PurePosixPath, str]:
    """The pod's Secret volumes: mount path -> Secret name."""
    volumes = {v["name"]: v for v in load(DEPLOYMENT)["spec"]["template"]["spec"]["volumes"]}
    mounts = {}
    for mount in gateway_container()["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "secret" in volume:
            assert mount["readOnly"] is True, mount
            assert "subPath" not in mount, "a subPath mount never sees the Secret's updates"
            mounts[PurePosixPath(mount["mountPath"])] = volume["secret"]["secretName"]
    return mounts


def in_a_secret(path: str) -> tuple[str, str]:
    """(Secret name, key) of a file the pod reads, which must be a documented key of a
    mounted Secret."""
    file = PurePosixPath(path)
    [(name, key)] = [
        (name, file.name) for mount, name in secret_mounts().items() if file.parent == mount
    ]
    assert key in kubernetes_secrets()[name], f"{path}: {name} is documented without {key}"
    return name, key


def test_kubernetes_reads_the_provider_keys_and_the_pepper_from_mounted_secrets() -> None:
    settings = kubernetes_settings()
    references = credential_references(settings)
    assert {"anthropic", "openai"} <= {
        name for name, upstream in settings.upstreams.items() if upstream.credentials
    }
    for reference in references:
        assert reference.startswith("file:"), reference
        in_a_secret(reference.removeprefix("file:"))
    assert settings.auth.pepper_file is not None
    assert in_a_secret(str(settings.auth.pepper_file)) == ("agent-gateway-pepper", "pepper")
    env = {item["name"] for item in gateway_container()["env"]}
    assert PEPPER_VARIABLE not in env  # one source: the file
    assert PEPPER_VARIABLE not in image_env()


@pytest.mark.parametrize("service", gateway_services())
def test_compose_reads_the_provider_keys_from_variables_the_shell_must_set(service: str) -> None:
    settings = compose_settings(service=service)
    environment = load(COMPOSE)["services"][service]["environment"]
    for reference in credential_references(settings):
        assert reference.startswith("env:"), reference
        variable = reference.removeprefix("env:")
        assert str(environment[variable]).startswith(f"${{{variable}:?"), variable
    # The pepper and the Redis password too, required: replicas on one store must hash keys
    # with one pepper (a generated one is refused with a shared store).
    assert settings.auth.pepper_file is None
    for variable in (PEPPER_VARIABLE, REDIS_PASSWORD_VARIABLE):
        assert str(environment[variable]).startswith(f"${{{variable}:?"), variable
    assert "@" not in settings.store, "the Redis password is not in the store's URL"


def secrets_used(overlay: Path) -> dict[str, set[str]]:
    """The Secrets (and their keys) the pod of a kustomization reads: its environment's, its
    mounted files' (the pepper, the provider keys)."""
    used: dict[str, set[str]] = {}
    for item in gateway_container(overlay)["env"]:
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            used.setdefault(ref["name"], set()).add(ref["key"])
    settings = kubernetes_settings(overlay=overlay)
    files = [ref.removeprefix("file:") for ref in credential_references(settings)]
    for file in [*files, str(settings.auth.pepper_file)]:
        name, key = in_a_secret(file)
        used.setdefault(name, set()).add(key)
    assert set(secret_mounts().values()) <= set(used)
    return used


def test_every_secret_the_pod_uses_is_documented_where_an_operator_reads() -> None:
    """The Secrets are made by hand (never committed: ``test_schemas`` refuses a Secret
    manifest): each kustomization, the Deployment and the README say how, with the same
    keys."""
    base, replicas = secrets_used(KUBERNETES / "base"), secrets_used(REPLICAS)
    for path in (KUSTOMIZATION, DEPLOYMENT):
        assert documented_secrets(path.read_text()) == base, path
    assert documented_secrets((REPLICAS / "kustomization.yaml").read_text()) == replicas
    assert replicas.items() >= base.items()  # the base's, and the Redis password
    assert documented_secrets((REPO / "README.md").read_text()) == {**base, **replicas}


# -- who may call ------------------------------------------------------------------------------
def test_the_deployments_run_gateway_keys_and_start_with_a_strong_admin_token() -> None:
    strong = secret_value()
    for settings in (
        kubernetes_settings({"GATEWAY_ADMIN_TOKEN": strong}),
        compose_settings({**compose_shell(), "GATEWAY_ADMIN_TOKEN": strong}),
    ):
        assert settings.host == "0.0.0.0" and settings.auth.mode == "keys"
        assert not settings.allow_network_passthrough
        assert serving_problem(settings) is None


@pytest.mark.parametrize("token", ["changeme", "changeme" * 4, "x" * 64, "admin-" + "7" * 30])
def test_a_weak_admin_token_keeps_every_deployment_from_starting(token: str) -> None:
    for settings in (
        kubernetes_settings({"GATEWAY_ADMIN_TOKEN": token}),
        compose_settings({**compose_shell(), "GATEWAY_ADMIN_TOKEN": token}),
    ):
        problem = serving_problem(settings)
        assert problem is not None and "admin token" in problem
        assert token not in problem


_FLAG = re.compile(r"allow[-_]network[-_]passthrough", re.IGNORECASE)
MEANING = "authenticates no one"


def test_passthrough_on_the_network_only_with_the_flag_and_a_comment_saying_what_it_means() -> None:
    """Nothing shipped turns the flag on. Where a file shows it, a comment beside it says
    what it means; the image alone, in passthrough on 0.0.0.0, refuses to start."""
    for path in text_files():
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if not _FLAG.search(line):
                continue
            comment = line.lstrip().startswith("#")
            assert comment, f"{path}:{number + 1}: the flag set outside a comment"
            block = "\n".join(lines[max(0, number - 8) : number + 8])
            assert MEANING in block, f"{path}:{number + 1}: say what the flag means"
    assert "--allow-network-passthrough" in (DEPLOY / "Dockerfile").read_text()
    alone = load_settings(env=image_env())
    assert alone.auth.mode == "passthrough" and serving_problem(alone) is not None


def test_allowed_hosts_name_the_service_and_localhost_and_nothing_else() -> None:
    service = load(KUBERNETES / "base" / "service.yaml")
    name = service["metadata"]["name"]
    [port] = [p["port"] for p in service["spec"]["ports"]]
    settings = kubernetes_settings()
    assert settings.allowed_hosts, "an empty list on 0.0.0.0 lets any Host in"
    check = HostCheck(settings.allowed_hosts, settings.host)
    for host in (
        name,
        f"{name}.{NAMESPACE}",
        f"{name}.{NAMESPACE}.svc",
        f"{name}.{NAMESPACE}.svc.cluster.local",
        "localhost",  # kubectl port-forward
        "127.0.0.1",  # kubectl exec: the CLI's default address
    ):
        assert check.allows(f"{host}:{port}"), host
    for foreign in ("evil.example", f"{name}.evil.example", POD_ADDRESS, "1"):
        assert not check.allows(foreign), foreign

    # Compose: callers reach the replicas through the load balancer, by the published port on
    # this machine or (the traffic generator) by the balancer's service name. Prometheus
    # scrapes each replica by its own name: /metrics answers any Host.
    compose = load(COMPOSE)
    [balancer] = [
        name
        for name, service in compose["services"].items()
        if str(service.get("image", "")).startswith("haproxy:")
    ]
    traffic = urlsplit(compose["services"]["traffic"]["environment"]["GATEWAY_URL"]).netloc
    assert traffic == f"{balancer}:8787"
    for service in gateway_services():
        settings = compose_settings(service=service)
        check = HostCheck(settings.allowed_hosts, settings.host)
        for host in (traffic, "localhost:8787", "127.0.0.1:8787"):
            assert check.allows(host), host
        assert not check.allows("evil.example") and not check.allows("evil.example:8787")


# -- the bootstrap key -------------------------------------------------------------------------
_KEYS_CREATE = re.compile(r"gateway keys create[^\n\"`)]*")
_JOINED = re.compile(r"\\[ \t]*\n[ \t]*#?[ \t]*")


def keys_create_commands(path: Path) -> list[str]:
    """Each ``gateway keys create ...`` a file documents (continuation lines joined)."""
    text = _JOINED.sub(" ", path.read_text())
    return [" ".join(found.split()) for found in _KEYS_CREATE.findall(text)]


def test_the_bootstrap_key_step_is_documented_and_is_a_real_command() -> None:
    deployment = load(DEPLOYMENT)["metadata"]["name"]
    for path in (KUSTOMIZATION, CONFIGMAP, COMPOSE, COMPOSE_CONFIG, REPO / "README.md"):
        commands = keys_create_commands(path)
        assert commands, f"{path}: how to make the first key"
        for command in commands:
            args = _parser().parse_args(shlex.split(command, comments=True)[1:])
            assert args.team and args.name, command
    text = " ".join(_JOINED.sub(" ", KUSTOMIZATION.read_text()).split())
    assert f"kubectl -n {NAMESPACE} exec deploy/{deployment} -- gateway keys create" in text
    text = " ".join(_JOINED.sub(" ", COMPOSE.read_text()).split())
    assert "docker compose -f deploy/compose.yaml exec gateway-1 gateway keys create" in text
    assert "gateway-1" in gateway_services()


# -- started as they run -----------------------------------------------------------------------
def fake_upstreams(fake: TestServer) -> dict[str, str]:
    return {
        "GATEWAY_OPENAI_UPSTREAM": str(fake.make_url("/v1")),
        "GATEWAY_ANTHROPIC_UPSTREAM": str(fake.make_url("")).rstrip("/"),
    }


def documented_argv(path: Path, marker: str) -> list[str]:
    """The documented ``gateway keys create`` command line after ``marker`` (``-- `` of
    kubectl exec, ``exec gateway`` of compose), as the CLI's arguments."""
    text = _JOINED.sub(" ", path.read_text())
    found = re.search(re.escape(marker) + r"\s+(gateway keys create[^\n\")]*)", text)
    assert found, f"{path}: no `{marker} gateway keys create`"
    return shlex.split(found.group(1))[1:]


async def bootstrap_key(
    argv: list[str],
    url: str,
    token: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> str:
    """The documented command run as in the container: the admin token in its environment,
    the gateway at the CLI's default address (here, the test server's)."""
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", token)
    monkeypatch.setenv("GATEWAY_URL", url)
    capsys.readouterr()
    assert await asyncio.to_thread(main, argv) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("gw_") and "\n" not in key, out
    assert "will not show it again" in err
    return key


def files_under(directory: Path) -> list[Path]:
    return sorted(path for path in directory.rglob("*") if path.is_file())


async def test_the_kubernetes_pod_starts_in_keys_mode_from_its_secrets_alone(
    aiohttp_client: Any,
    fake_provider: TestServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv(PEPPER_VARIABLE, raising=False)
    pod: Pod = await asyncio.to_thread(kubernetes_pod, tmp_path, fake_upstreams(fake_provider))
    token = pod.secrets["agent-gateway-admin"]["token"]
    pepper = await asyncio.to_thread(load_pepper, pod.settings, env={})
    assert pepper.reveal() == pod.secrets["agent-gateway-pepper"]["pepper"]
    client = await aiohttp_client(create_app(pod.settings))
    service = f"agent-gateway.{NAMESPACE}.svc.cluster.local:8787"

    # The kubelet's probes ask by the pod's address.
    for path in ("/gateway/ready", "/gateway/health"):
        async with client.get(path, headers={"Host": POD_ADDRESS}) as answer:
            assert answer.status == 200, path

    # A foreign Host, and a provider key: refused, in the provider's shape, nothing sent on.
    sent = len(fake_provider.app[RECEIVED])
    anthropic = {"anthropic-version": "2023-06-01", "x-api-key": "sk-ant-api03-" + "k" * 40}
    async with client.post(
        "/v1/messages", json=MESSAGES, headers={**anthropic, "Host": "evil.example"}
    ) as answer:
        assert answer.status == 400
        assert answer.headers["X-Gateway-Error"] == "gateway_host_refused"
        assert (await answer.json())["type"] == "error"
    async with client.post(
        "/v1/messages", json=MESSAGES, headers={**anthropic, "Host": service}
    ) as answer:
        assert answer.status == 401
        assert (await answer.json())["error"]["message"].startswith("gateway (not Anthropic)")
    assert len(fake_provider.app[RECEIVED]) == sent

    # The bootstrap key, made as kustomization.yaml says (inside the pod), then used.
    argv = documented_argv(KUSTOMIZATION, "--")
    key = await bootstrap_key(argv, str(client.make_url("")), token, monkeypatch, capsys)
    headers = {"anthropic-version": "2023-06-01", "x-api-key": key, "Host": service}
    async with client.post("/v1/messages", json=MESSAGES, headers=headers) as answer:
        assert answer.status == 200, await answer.text()
    upstream = {k.lower(): v for k, v in fake_provider.app[RECEIVED][-1].headers.items()}
    assert upstream["x-api-key"] == pod.secrets["agent-gateway-providers"]["anthropic"]
    assert key not in str(upstream)

    # Everything came from the Secrets: nothing generated into the state directory, and the
    # key itself is nowhere on the volume (only its hash).
    seen = await asyncio.to_thread(kubernetes_settings)
    place = pod.here(state_dir(seen.state_dir, seen.store))
    assert await asyncio.to_thread(files_under, place) == []
    data = await asyncio.to_thread(files_under, pod.here("/data"))
    assert data, "the store is on the volume"
    for file in data:
        assert key.encode() not in await asyncio.to_thread(file.read_bytes), file


async def test_the_compose_replicas_share_one_redis_a_key_made_on_one_works_on_both(
    aiohttp_client: Any,
    fake_provider: TestServer,
    shared_redis: SharedRedis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Both replicas as compose starts them (one shell, one Redis: the test's in place of the
    stack's `redis`, its password from GATEWAY_REDIS_PASSWORD as there)."""
    shell = {**compose_shell(), REDIS_PASSWORD_VARIABLE: shared_redis.password}
    env = {**fake_upstreams(fake_provider), "GATEWAY_STORE": redis_store_url(shared_redis.port)}
    pods: list[Pod] = [
        await asyncio.to_thread(compose_pod, tmp_path / name, shell, env, service=name)
        for name in gateway_services()
    ]
    assert len(pods) == 2
    for name, value in pods[0].read_from_environment().items():
        assert all(pod.read_from_environment()[name] == value for pod in pods), name
        monkeypatch.setenv(name, value)
    assert os.environ[PEPPER_VARIABLE] == shell[PEPPER_VARIABLE]
    clients = [await aiohttp_client(create_app(pod.settings)) for pod in pods]

    # Prometheus scrapes each replica by its service name, with the token compose hands it.
    [job] = load(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]
    targets = job["static_configs"][0]["targets"]
    assert targets == [f"{name}:8787" for name in gateway_services()]
    for client, target in zip(clients, targets, strict=True):
        metrics = {"Host": target, "Authorization": f"Bearer {shell['GATEWAY_ADMIN_TOKEN']}"}
        async with client.get("/metrics", headers=metrics) as answer:
            assert answer.status == 200
        async with client.post(
            "/v1/chat/completions", json=CHAT, headers={"Host": "evil.example:8787"}
        ) as answer:
            assert answer.status == 400

    # The key, made on gateway-1 as compose.yaml says; then one session's calls through the
    # load balancer (its name as Host), one on each replica.
    argv = documented_argv(COMPOSE, "exec gateway-1")
    url = str(clients[0].make_url(""))
    key = await bootstrap_key(argv, url, shell["GATEWAY_ADMIN_TOKEN"], monkeypatch, capsys)
    headers = {"Authorization": f"Bearer {key}", "Host": "lb:8787", "X-Gateway-Session": "s1"}
    for client in clients:
        async with client.post("/v1/chat/completions", json=CHAT, headers=headers) as answer:
            assert answer.status == 200, await answer.text()
        upstream = {k.lower(): v for k, v in fake_provider.app[RECEIVED][-1].headers.items()}
        assert upstream["authorization"] == f"Bearer {shell['OPENAI_API_KEY']}"
    admin = {"Authorization": f"Bearer {shell['GATEWAY_ADMIN_TOKEN']}", "Host": "localhost"}
    for client in clients:
        async with client.get("/gateway/sessions", headers=admin) as answer:
            listed = await answer.json()
        [session] = [s for s in listed["sessions"] if s["id"].startswith("s1")]
        assert session["turns"] == 2, session  # counted in Redis, whichever replica answered

    # Nothing written on the replicas (no volume: /tmp only), no pepper generated.
    assert await asyncio.to_thread(files_under, tmp_path) == []


def test_a_compose_replica_without_the_shells_pepper_refuses_to_make_its_own() -> None:
    """Why compose requires GATEWAY_KEY_PEPPER: a pepper generated by one replica would make
    its keys unknown to the other, so with a shared store none is generated."""
    settings = compose_settings()
    with pytest.raises(PepperMissing, match="shared by replicas"):
        load_pepper(settings, env={})


async def test_the_service_monitor_scrapes_the_pod_by_its_address(
    aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prometheus scrapes each endpoint of the Service by the pod's IP, and a ServiceMonitor
    cannot choose the ``Host`` it sends: ``/metrics``, like the probes, answers any ``Host``.
    The admin token it must carry (``metrics_auth``) is what keeps a web page out: a page
    cannot attach it, whatever name it reached the gateway by."""
    monkeypatch.delenv(PEPPER_VARIABLE, raising=False)
    pod: Pod = await asyncio.to_thread(kubernetes_pod, tmp_path)
    assert pod.settings.metrics_auth
    [endpoint] = load(KUBERNETES / "monitoring" / "servicemonitor.yaml")["spec"]["endpoints"]
    ref = endpoint["authorization"]["credentials"]
    token = pod.secrets[ref["name"]][ref["key"]]
    client = await aiohttp_client(create_app(pod.settings))
    scrape = {"Host": POD_ADDRESS, "Authorization": f"Bearer {token}"}
    async with client.get(endpoint["path"], headers=scrape) as answer:
        assert answer.status == 200, await answer.text()
    async with client.get(endpoint["path"], headers={"Host": POD_ADDRESS}) as answer:
        assert answer.status == 401
