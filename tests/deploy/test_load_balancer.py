"""The compose stack's load balancer (``deploy/haproxy/haproxy.cfg``): HAProxy accepts the
file; its timeouts outlast the gateway's; and, run for real in front of the two compose
replicas on one Redis (only the addresses rewritten: no Docker here), it passes a stream
through event by event, carries the traffic generator's agents to both replicas (the loop
rule and the turn limit holding across them), and takes a draining replica out of rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import shlex
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.appkeys import DRAINING
from gateway.cli import main
from gateway.fake_provider import FakeProviderConfig
from tests.deploy.kustomize import DEPLOY, load
from tests.deploy.pods import (
    COMPOSE,
    REDIS_PASSWORD_VARIABLE,
    compose_pod,
    compose_settings,
    compose_shell,
    gateway_services,
    redis_store_url,
)
from tests.deploy.traffic_script import traffic
from tests.harness import installed
from tests.redis_server import SharedRedis

CONFIG = DEPLOY / "haproxy" / "haproxy.cfg"
POLICY = """
version: 1
defaults:
  limits: {max_turns: 30}
"""
"""The stack's policy with a turn limit the runaway agent reaches within the test."""


def haproxy() -> str:
    return installed("haproxy", "haproxy")


def directives(section: str) -> list[list[str]]:
    """The lines of one section (``backend replicas``, ``defaults``) as words, comments out."""
    found: list[list[str]] = []
    inside = False
    for raw in CONFIG.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line:
            continue
        if not raw[0].isspace():
            inside = line.strip() == section
            continue
        if inside:
            found.append(shlex.split(line))
    assert found, f"no section {section!r}"
    return found


def value(section: str, *words: str) -> list[str]:
    [found] = [
        line[len(words) :] for line in directives(section) if line[: len(words)] == list(words)
    ]
    return found


def seconds(text: str) -> float:
    """An HAProxy time: ``30s``, ``11m``, ``200ms``, bare milliseconds."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h)?", text)
    assert match, text
    number, unit = match.groups()
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 0.001}[unit]


async def run(*argv: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode()


# -- the file ----------------------------------------------------------------------------------
async def test_haproxy_accepts_the_config() -> None:
    """``haproxy -c``; outside Docker the replicas' names do not resolve, which the file
    allows (``init-addr ... none``: they are found once Docker's DNS knows them)."""
    code, out = await run(haproxy(), "-c", "-f", str(CONFIG))
    assert code == 0 and "Configuration file is valid" in out, out
    warnings = [line for line in out.splitlines() if "WARNING" in line or "ALERT" in line]
    assert all("could not resolve address" in line for line in warnings), warnings


def test_the_backends_are_the_compose_replicas_checked_on_readiness() -> None:
    compose = load(COMPOSE)
    servers = [line[1:] for line in directives("backend replicas") if line[0] == "server"]
    assert servers == [[name, f"{name}:8787"] for name in gateway_services()]
    for name in gateway_services():
        assert compose_settings(service=name).port == 8787
        assert "ports" not in compose["services"][name], "a replica is reached through lb only"
    # The path compose's health check asks: 503 from the moment a stop begins.
    healthcheck = compose["services"]["gateway-1"]["healthcheck"]["test"][-1]
    assert "/gateway/ready" in healthcheck
    assert value("backend replicas", "http-check", "send")[:4] == [
        "meth",
        "GET",
        "uri",
        "/gateway/ready",
    ]
    assert value("backend replicas", "http-check", "expect") == ["status", "200"]
    assert "check" in value("backend replicas", "default-server")
    # Calls in flight on a replica that goes out of rotation finish there.
    assert not any("on-marked-down" in line for line in directives("backend replicas"))
    [lb] = [
        s for s in compose["services"].values() if str(s.get("image", "")).startswith("haproxy")
    ]
    assert lb["ports"] == ["8787:8787"] and value("frontend gateway", "bind") == [":8787"]
    assert lb["volumes"] == ["./haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro"]


def test_streams_pass_unbuffered_and_outlast_the_gateways_timeouts() -> None:
    settings = compose_settings()
    longest = max(settings.timeouts.first_byte, settings.timeouts.idle)
    for side in ("client", "server"):
        # The gateway answers a slow upstream itself, in the provider's shape, first.
        assert seconds(value("defaults", "timeout", side)[0]) > longest, side
    text = CONFIG.read_text()
    for buffering in ("http-buffer-request", "compression", "filter cache"):
        assert not re.search(rf"^\s*(option\s+)?{buffering}", text, re.MULTILINE), buffering
    assert ["option", "http-no-delay"] in directives("defaults")
    # A stop of the load balancer lets streams finish, within compose's grace period, and
    # at least as long as a replica's own drain.
    [hard_stop] = [line[1] for line in directives("global") if line[0] == "hard-stop-after"]
    lb = load(COMPOSE)["services"]["lb"]
    assert settings.drain_timeout <= seconds(hard_stop) < seconds(lb["stop_grace_period"])
    # No path in the log lines: a path can carry a session id.
    [log_format] = [line[1] for line in directives("defaults") if line[0] == "log-format"]
    fields = set(re.findall(r"%([A-Za-z]+)", log_format))
    assert fields and not fields & {"r", "HU", "HP", "HPO", "HQ", "hr", "hrl", "CC"}, fields


# -- run for real ------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def load_balancer(tmp_path: Path, port: int, replicas: dict[str, int]) -> AsyncIterator[str]:
    """HAProxy on the shipped file, listening on ``port`` of loopback and sending to the
    replicas at their test ports: the only lines rewritten. Yields its URL."""
    text = CONFIG.read_text()
    text, bound = re.subn(r"^(\s*)bind :8787$", rf"\1bind 127.0.0.1:{port}", text, flags=re.M)
    assert bound == 1
    for name, replica in replicas.items():
        line = rf"^(\s*server {name}) {name}:8787$"
        text, found = re.subn(line, rf"\1 127.0.0.1:{replica}", text, flags=re.M)
        assert found == 1, name
    config = tmp_path / "haproxy.cfg"
    await asyncio.to_thread(config.write_text, text)
    log = await asyncio.to_thread(open, tmp_path / "haproxy.log", "wb")
    process = await asyncio.create_subprocess_exec(
        haproxy(), "-db", "-f", str(config), stdout=log, stderr=log
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        await process.wait()
        await asyncio.to_thread(log.close)


async def until(condition: Callable[[], Any], seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not await condition():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.1)


async def requests_served(http: aiohttp.ClientSession, server: TestServer, token: str) -> int:
    """The LLM calls a replica answered, from its own /metrics."""
    headers = {"Authorization": f"Bearer {token}"}
    async with http.get(server.make_url("/metrics"), headers=headers) as answer:
        text = await answer.text()
    counts = re.findall(r"^gateway_requests_total\{[^}]*\} (\S+)$", text, re.MULTILINE)
    return int(sum(float(count) for count in counts))


def traffic_key_argv() -> list[str]:
    """The ``gateway keys create`` the compose stack's traffic service runs."""
    command = " ".join(load(COMPOSE)["services"]["traffic"]["command"])
    found = re.search(r"gateway keys create ([^)]*)\)", command)
    assert found, command
    return ["keys", "create", *shlex.split(found.group(1))]


async def test_the_stack_through_the_load_balancer(
    aiohttp_server: Any,
    fake_provider: TestServer,
    fake_config: FakeProviderConfig,
    shared_redis: SharedRedis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    unused_tcp_port_factory: Callable[[], int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    shell = {**compose_shell(), REDIS_PASSWORD_VARIABLE: shared_redis.password}
    env = {
        "GATEWAY_OPENAI_UPSTREAM": str(fake_provider.make_url("/v1")),
        "GATEWAY_ANTHROPIC_UPSTREAM": str(fake_provider.make_url("")).rstrip("/"),
        "GATEWAY_STORE": redis_store_url(shared_redis.port),
        "GATEWAY_POLICY": "/tmp/policy.yaml",  # written on each replica's /tmp below
    }
    servers: dict[str, TestServer] = {}
    for name in gateway_services():
        pod = await asyncio.to_thread(compose_pod, tmp_path / name, shell, env, service=name)
        await asyncio.to_thread(pod.here("/tmp/policy.yaml").write_text, POLICY)
        for variable, setting in pod.read_from_environment().items():
            monkeypatch.setenv(variable, setting)
        servers[name] = await aiohttp_server(create_app(pod.settings))
    token = shell["GATEWAY_ADMIN_TOKEN"]
    ports = {name: int(server.port or 0) for name, server in servers.items()}
    lb_dir = tmp_path / "lb"
    await asyncio.to_thread(lb_dir.mkdir)
    async with (
        load_balancer(lb_dir, unused_tcp_port_factory(), ports) as url,
        aiohttp.ClientSession() as http,
    ):

        async def ready() -> bool:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{url}/gateway/ready") as answer:
                    return answer.status == 200
            return False

        await until(ready)

        # The traffic service's own key, made through the load balancer as it makes it.
        monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", token)
        monkeypatch.setenv("GATEWAY_URL", url)
        capsys.readouterr()
        assert await asyncio.to_thread(main, traffic_key_argv()) == 0
        key = capsys.readouterr().out.strip()
        assert key.startswith("gw_")

        # A stream: each event through as it comes, not when the answer is whole.
        fake_config.chunk_delay = 0.15
        body = {
            "model": "gpt-4o-mini",
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        }
        started = time.monotonic()
        async with http.post(
            f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as answer:
            assert answer.status == 200, await answer.text()
            arrivals = [
                time.monotonic() - started
                async for line in answer.content
                if line.startswith(b"data:")
            ]
        fake_config.chunk_delay = 0.0
        assert len(arrivals) > 5
        assert arrivals[0] < arrivals[-1] - 0.5, arrivals  # the first long before the last

        # The agents, through the load balancer to both replicas, on one Redis.
        before = {
            name: await requests_served(http, server, token) for name, server in servers.items()
        }
        tallies = await traffic.run(url, key, seconds=5, pace=0.02)
        for name, tally in tallies.items():
            assert tally.turns > 0 and not tally.failed, (name, tally)
        assert tallies["demo-looper"].refused["gateway_policy_loop_identical_tool_calls"] >= 1
        assert tallies["demo-runaway"].refused["gateway_policy_max_turns"] >= 1
        for name, server in servers.items():
            assert await requests_served(http, server, token) > before[name] + 10, name

        # gateway-2 begins its stop: readiness 503, out of rotation; the calls go to gateway-1.
        servers["gateway-2"].app[DRAINING].set()

        async def out_of_rotation() -> bool:
            served = await requests_served(http, servers["gateway-2"], token)
            for _ in range(4):
                async with http.post(
                    f"{url}/v1/chat/completions",
                    json={**body, "stream": False},
                    headers={
                        "Authorization": f"Bearer {key}",
                        "X-Gateway-Session": f"drain-{secrets.token_hex(4)}",
                    },
                ) as answer:
                    assert answer.status == 200, await answer.text()
            return await requests_served(http, servers["gateway-2"], token) == served

        await until(out_of_rotation)
        assert await out_of_rotation()  # and stays out
