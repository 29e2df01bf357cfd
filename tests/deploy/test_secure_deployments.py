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
import stat
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from gateway.admin import serving_problem
from gateway.app import create_app
from gateway.auth.hosts import HostCheck
from gateway.auth.pepper import PEPPER_VARIABLE, load_pepper
from gateway.cli import _parser, main
from gateway.fake_provider import RECEIVED
from gateway.redact import Redactor
from gateway.settings import Settings, load_settings
from gateway.state import PEPPER_FILE, state_dir
from tests.conftest import ANTHROPIC_MODEL
from tests.deploy.kustomize import DEPLOY, KUBERNETES, load
from tests.deploy.pods import (
    COMPOSE,
    CONFIGMAP,
    DEPLOYMENT,
    NAMESPACE,
    REPO,
    SECRET_NAME,
    Pod,
    compose_mounts,
    compose_pod,
    compose_settings,
    compose_shell,
    documented_secrets,
    gateway_container,
    image_env,
    kubernetes_pod,
    kubernetes_secrets,
    kubernetes_settings,
    secret_value,
)

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
    """``${NAME:?message}`` (required) or ``${NAME:-}`` (optional, empty): never a value."""
    for name, service in load(COMPOSE)["services"].items():
        for variable, value in service.get("environment", {}).items():
            if SECRET_NAME.search(variable):
                pattern = rf"\$\{{{variable}(:\?[^}}]*|:-)\}}"
                assert re.fullmatch(pattern, str(value)), f"{name}: {variable}: {value}"


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


def test_compose_reads_the_provider_keys_from_variables_the_shell_must_set() -> None:
    settings = compose_settings()
    environment = load(COMPOSE)["services"]["gateway"]["environment"]
    for reference in credential_references(settings):
        assert reference.startswith("env:"), reference
        variable = reference.removeprefix("env:")
        assert str(environment[variable]).startswith(f"${{{variable}:?"), variable
    assert settings.auth.pepper_file is None
    assert str(environment[PEPPER_VARIABLE]) == f"${{{PEPPER_VARIABLE}:-}}"


def test_every_secret_the_pod_uses_is_documented_where_an_operator_reads() -> None:
    """The Secrets are made by hand (never committed: ``test_schemas`` refuses a Secret
    manifest): the kustomization, the Deployment and the README say how, with the same keys."""
    used: dict[str, set[str]] = {}
    for item in gateway_container()["env"]:
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            used.setdefault(ref["name"], set()).add(ref["key"])
    settings = kubernetes_settings()
    files = [ref.removeprefix("file:") for ref in credential_references(settings)]
    for file in [*files, str(settings.auth.pepper_file)]:
        name, key = in_a_secret(file)
        used.setdefault(name, set()).add(key)
    assert set(secret_mounts().values()) <= set(used)
    for path in (KUSTOMIZATION, DEPLOYMENT, REPO / "README.md"):
        assert documented_secrets(path.read_text()) == used, path


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

    settings = compose_settings()
    check = HostCheck(settings.allowed_hosts, settings.host)
    [job] = load(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]
    [target] = job["static_configs"][0]["targets"]
    for host in (target, "localhost:8787", "127.0.0.1:8787"):
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
    assert "docker compose -f deploy/compose.yaml exec gateway gateway keys create" in text
    assert "gateway" in load(COMPOSE)["services"]


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


async def test_the_compose_gateway_starts_in_keys_mode_its_pepper_kept_on_its_volume(
    aiohttp_client: Any,
    fake_provider: TestServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    shell = compose_shell()
    pod: Pod = await asyncio.to_thread(compose_pod, tmp_path, shell, fake_upstreams(fake_provider))
    for name, value in pod.read_from_environment().items():
        monkeypatch.setenv(name, value)
    assert os.environ[PEPPER_VARIABLE] == ""  # not exported: generated on first start
    client = await aiohttp_client(create_app(pod.settings))

    # Prometheus scrapes by the service's name, with the token compose hands it.
    [job] = load(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]
    [target] = job["static_configs"][0]["targets"]
    metrics = {"Host": target, "Authorization": f"Bearer {shell['GATEWAY_ADMIN_TOKEN']}"}
    async with client.get("/metrics", headers=metrics) as answer:
        assert answer.status == 200
    async with client.post(
        "/v1/chat/completions", json=CHAT, headers={"Host": "evil.example:8787"}
    ) as answer:
        assert answer.status == 400

    argv = documented_argv(COMPOSE, "exec gateway")
    url = str(client.make_url(""))
    key = await bootstrap_key(argv, url, shell["GATEWAY_ADMIN_TOKEN"], monkeypatch, capsys)
    headers = {"Authorization": f"Bearer {key}", "Host": "localhost:8787"}
    async with client.post("/v1/chat/completions", json=CHAT, headers=headers) as answer:
        assert answer.status == 200, await answer.text()
    upstream = {k.lower(): v for k, v in fake_provider.app[RECEIVED][-1].headers.items()}
    assert upstream["authorization"] == f"Bearer {shell['OPENAI_API_KEY']}"

    # The generated pepper: in the state directory on the gateway-data volume, private.
    settings = await asyncio.to_thread(compose_settings, shell)
    place = pod.here(state_dir(settings.state_dir, settings.store))
    service = load(COMPOSE)["services"]["gateway"]
    [volume] = [t for s, t, _ in compose_mounts(service) if s in load(COMPOSE)["volumes"]]
    assert place.is_relative_to(pod.here(volume))
    modes = await asyncio.to_thread(lambda: (place.stat().st_mode, (place / PEPPER_FILE).stat()))
    assert stat.S_IMODE(modes[0]) == 0o700
    assert stat.S_IMODE(modes[1].st_mode) == 0o600


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
