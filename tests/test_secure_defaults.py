"""Secure defaults (issue 15 §9), as an operator meets them: ``gateway serve`` run as a
process refuses passthrough mode on a non-loopback address (exit 2, showing how to create a
key) unless told to allow it, refuses a weak admin token and an inline credential (as
``gateway config check`` does), and a running gateway refuses a foreign ``Host`` in the
provider's error shape while its health and readiness answer any.

The processes listen on 0.0.0.0 at most; every request goes to 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from gateway.fake_provider import RECEIVED
from gateway.state import ADMIN_TOKEN_FILE
from tests.conftest import ANTHROPIC_MODEL
from tests.harness import ANTHROPIC_KEY, OPENAI_KEY

GATEWAY = [sys.executable, "-m", "gateway"]
REFUSED = 2
"""``gateway serve``'s exit status for settings it will not serve with."""
START_TIMEOUT = 60.0
CANARY = "sk-ant-api03-INLINEcanary7Hq2Zx9Lm4Wv8Rt3Np6Ks1Jd5Fb0Gc"
"""An inline credential: refused, and never echoed back."""
STRONG_TOKEN = "Zq8vK2mW9xR4tY7pL3nB6cF1hJ5sD0gAe7Uo"


def own_addresses() -> list[str]:
    """Non-loopback addresses to listen on: every address, and this machine's own when it
    has one that is not loopback (Debian maps the hostname to 127.0.1.1)."""
    found = ["0.0.0.0", "::"]
    try:
        mine = socket.gethostbyname(socket.gethostname())
    except OSError:
        return found
    return found if mine.startswith("127.") else [*found, mine]


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The test process's environment without the developer's GATEWAY_* settings, its state
    and home in ``tmp_path`` (nothing generated lands outside it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OTEL_"))}
    return {
        **env,
        "HOME": str(tmp_path),
        "XDG_STATE_HOME": str(tmp_path / "xdg-state"),
        "GATEWAY_STATE_DIR": str(tmp_path / "state"),
        **extra,
    }


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GATEWAY, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("0.0.0.0", 0))
        port: int = probe.getsockname()[1]
        return port


# -- passthrough on the network ----------------------------------------------------------------
@pytest.mark.parametrize("host", own_addresses())
def test_passthrough_on_a_non_loopback_address_exits_2_showing_how_to_make_a_key(
    host: str, tmp_path: Path
) -> None:
    port = str(free_port())
    done = run(["serve", "--host", host, "--port", port, "--store", "memory://"],
               clean_env(tmp_path), tmp_path)  # fmt: skip
    assert done.returncode == REFUSED, done.stderr
    assert "refusing to serve passthrough mode" in done.stderr
    assert "gateway keys create --team T --name N" in done.stderr
    assert "auth: {mode: keys}" in done.stderr
    assert "--allow-network-passthrough" in done.stderr
    assert "gateway on http" not in done.stdout  # it never started listening
    assert not (tmp_path / "state").exists()  # nor generated anything


def test_the_address_from_the_environment_is_refused_the_same(tmp_path: Path) -> None:
    """A container's way (``GATEWAY_HOST=0.0.0.0`` in the image)."""
    env = clean_env(tmp_path, GATEWAY_HOST="0.0.0.0", GATEWAY_PORT=str(free_port()))
    done = run(["serve", "--store", "memory://"], env, tmp_path)
    assert done.returncode == REFUSED, done.stderr
    assert "gateway keys create" in done.stderr


@pytest.fixture
def serving() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Gateways a test starts: stopped (SIGTERM, then SIGKILL) however the test ends."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_healthy(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode} before it was healthy")
        try:
            url = f"http://127.0.0.1:{port}/gateway/health"
            with urllib.request.urlopen(url, timeout=1) as answer:
                assert answer.status == 200
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"no health answer on port {port} within {START_TIMEOUT}s")


@pytest.mark.parametrize(
    ("flag", "variables"),
    [
        (["--allow-network-passthrough"], {}),
        ([], {"GATEWAY_ALLOW_NETWORK_PASSTHROUGH": "1"}),
    ],
    ids=["flag", "environment"],
)
def test_allowed_knowingly_passthrough_serves_on_every_address(
    flag: list[str],
    variables: dict[str, str],
    tmp_path: Path,
    serving: list[subprocess.Popen[bytes]],
) -> None:
    port = free_port()
    args = ["serve", "--host", "0.0.0.0", "--port", str(port), "--store", "memory://", *flag]
    process = subprocess.Popen(
        [*GATEWAY, *args], env=clean_env(tmp_path, **variables), cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    serving.append(process)
    wait_healthy(port, process)
    # No admin token given: one was generated into the state directory, private.
    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / ADMIN_TOKEN_FILE).stat().st_mode) == 0o600
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0


# -- weak admin tokens ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("token", "why"),
    [
        ("changeme", "is 8 characters; use at least 32"),
        ("changeme-changeme-changeme-changeme", "looks like an example"),
        ("a" * 48, "looks like an example"),
    ],
)
def test_a_weak_admin_token_is_refused_with_exit_2(token: str, why: str, tmp_path: Path) -> None:
    env = clean_env(tmp_path, GATEWAY_ADMIN_TOKEN=token)
    done = run(["serve", "--port", str(free_port()), "--store", "memory://"], env, tmp_path)
    assert done.returncode == REFUSED, done.stderr
    assert "admin token" in done.stderr and why in done.stderr
    assert token not in done.stdout + done.stderr
    assert "gateway on http" not in done.stdout


# -- inline credentials --------------------------------------------------------------------------
INLINE = f"""\
auth:
  mode: keys
upstreams:
  anthropic:
    credentials:
      platform:
        - name: primary
          value: "{CANARY}"
"""


def test_an_inline_credential_is_refused_by_config_check_and_by_serve(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(INLINE)
    env = clean_env(tmp_path)
    checked = run(["config", "check", str(config)], env, tmp_path)
    assert checked.returncode == 1
    said = checked.stdout + checked.stderr
    assert "line 8" in said and "upstreams.anthropic.credentials.platform[0].value" in said
    assert "env:VARIABLE or file:/path, never inline" in said
    assert CANARY not in said and CANARY[:20] not in said

    served = run(["serve", "--config", str(config), "--store", "memory://"], env, tmp_path)
    assert served.returncode == REFUSED
    said = served.stdout + served.stderr
    assert "the configuration is refused, not starting" in said
    assert "never inline" in said and f"gateway config check {config}" in said
    assert CANARY not in said and CANARY[:20] not in said


def test_a_reference_is_accepted_where_the_inline_value_is_not(tmp_path: Path) -> None:
    """The fix the message names works: the same config with ``env:VAR``."""
    config = tmp_path / "gateway.yaml"
    config.write_text(INLINE.replace(CANARY, "env:ANTHROPIC_API_KEY"))
    checked = run(["config", "check", str(config)], clean_env(tmp_path), tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- a foreign Host ------------------------------------------------------------------------------
ANTHROPIC_CALL = {"model": ANTHROPIC_MODEL, "max_tokens": 16,
                  "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
OPENAI_CALL = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC_HEADERS = {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"}
OPENAI_HEADERS = {"Authorization": f"Bearer {OPENAI_KEY}"}


async def test_a_foreign_host_is_refused_in_the_providers_shape(
    gateway: TestServer, fake_provider: TestServer, aiohttp_client: Any
) -> None:
    """DNS rebinding: a page on evil.example that resolves to 127.0.0.1 sends its own name."""
    client = await aiohttp_client(gateway)
    foreign = {"Host": "evil.example"}
    async with client.post(
        "/v1/messages", json=ANTHROPIC_CALL, headers={**ANTHROPIC_HEADERS, **foreign}
    ) as answer:
        assert answer.status == 400
        assert answer.headers["X-Gateway-Error"] == "gateway_host_refused"
        assert answer.headers["request-id"] == answer.headers["x-request-id"]
        body = await answer.json()
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        message = body["error"]["message"]
        assert message.startswith("gateway (not Anthropic):")
        assert "evil.example" in message and "allowed_hosts" in message
    async with client.post(
        "/v1/chat/completions", json=OPENAI_CALL, headers={**OPENAI_HEADERS, **foreign}
    ) as answer:
        assert answer.status == 400
        assert answer.headers["X-Gateway-Error"] == "gateway_host_refused"
        error = (await answer.json())["error"]
        assert error["message"].startswith("gateway (not OpenAI):")
        assert error["type"] == "invalid_request_error"
    assert len(fake_provider.app[RECEIVED]) == 0, "nothing reached the provider"
    # Health and readiness answer any Host (probes use the pod's address).
    for path in ("/gateway/health", "/gateway/ready"):
        async with client.get(path, headers=foreign) as answer:
            assert answer.status == 200, path
    # The gateway's own loopback names pass, and the call goes through.
    port = gateway.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        async with client.post(
            "/v1/chat/completions", json=OPENAI_CALL, headers={**OPENAI_HEADERS, "Host": host}
        ) as answer:
            assert answer.status == 200, (host, await answer.text())
