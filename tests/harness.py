"""A gateway started on a policy file written into tmp_path (the ``make_gateway`` fixture),
the official SDKs pointed at it, and the admin API and audit log read back."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sqlite3
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp.test_utils import TestServer
from opentelemetry.trace import TracerProvider

from gateway.app import create_app
from gateway.appkeys import STORE
from gateway.fake_provider import RECEIVED
from gateway.settings import Settings
from gateway.store import SessionRecord

ADMIN_TOKEN = "adm-7Qx2Lr9vKp4Wm8Zt3Nc6Hy1Bd5Fg0Js2Ue"
"""The tests' admin token (the ``settings`` fixture sets it): 36 random-looking characters."""
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
"""Headers of an admin API call with it."""
OPENAI_KEY = "sk-test-openai"
ANTHROPIC_KEY = "sk-ant-test"
REPO = Path(__file__).resolve().parents[1]
POLICIES = REPO / "policies"


def key_hash(key: str) -> str:
    """The gateway's tag for a key, as policies name it in ``keys:``."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def write_text(path: Path, text: str, *, bump_mtime: float | None = None) -> None:
    """A synchronous write (call it through ``asyncio.to_thread`` from async tests), whole at
    once as editors save (a new file renamed over the old): a policy poller must never read a
    file half written, which would make the refusal a test looks for a race."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(textwrap.dedent(text))
    os.replace(partial, path)
    if bump_mtime is not None:
        stat = path.stat()
        os.utime(path, (stat.st_atime + bump_mtime, stat.st_mtime + bump_mtime))


def disk_error(*args: object) -> None:
    """Stands in for a store's disk call: the disk fails."""
    raise sqlite3.OperationalError("disk I/O error")


async def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def read_audit(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Gateway:
    """A gateway running one policy file, with SDK clients and admin helpers."""

    server: TestServer
    fake: TestServer
    policy_path: Path | None
    audit_path: Path
    openai: openai.AsyncOpenAI
    anthropic: anthropic.AsyncAnthropic
    _http: aiohttp.ClientSession = field(repr=False)

    def url(self, path: str = "") -> str:
        return str(self.server.make_url(path))

    def upstream_calls(self) -> int:
        return len(self.fake.app[RECEIVED])

    async def record(self, session: str) -> SessionRecord:
        record = await self.server.app[STORE].get(session)
        assert record is not None, f"no session {session}"
        return record

    async def admin_get(self, path: str) -> Any:
        async with self._http.get(self.url(path), headers=ADMIN) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async def admin_post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        async with self._http.post(self.url(path), json=body or {}, headers=ADMIN) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async def grant(self, session: str, **body: Any) -> Any:
        return await self.admin_post(f"/gateway/sessions/{session}/grant", body)

    async def session(self, session: str) -> Any:
        return await self.admin_get(f"/gateway/sessions/{session}")

    async def post(
        self, path: str, body: dict[str, Any] | bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], Any]:
        """A raw call (for headers an SDK would not send); returns status, headers, JSON."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json", **headers}
        async with self._http.post(self.url(path), data=data, headers=all_headers) as resp:
            raw = await resp.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = raw
            return resp.status, dict(resp.headers), payload

    async def audit_events(
        self, event: str, predicate: Callable[[dict[str, Any]], bool] = lambda e: True
    ) -> list[dict[str, Any]]:
        """Audit lines are written by a background thread: wait (bounded) for a match."""
        deadline = time.monotonic() + 2.0
        while True:
            lines = await asyncio.to_thread(read_audit, self.audit_path)
            found = [e for e in lines if e.get("event") == event and predicate(e)]
            if found or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.02)


MakeGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(
    aiohttp_server: Any, settings: Settings, fake_provider: TestServer, tmp_path: Path
) -> AsyncIterator[MakeGateway]:
    """``await make_gateway(POLICY_YAML, **settings_updates)``; ``None`` runs the packaged one;
    ``tracer_provider=`` traces the gateway's calls."""
    opened: list[Gateway] = []
    http = aiohttp.ClientSession()

    async def make(
        policy: str | None, *, tracer_provider: TracerProvider | None = None, **updates: Any
    ) -> Gateway:
        index = len(opened)
        policy_path = None
        if policy is not None:
            policy_path = tmp_path / f"policy-{index}.yaml"
            await asyncio.to_thread(write_text, policy_path, policy)
        audit_path = tmp_path / f"audit-{index}.jsonl"
        # Validated again (not model_copy): plain upstream URLs become their mappings.
        configured = Settings.model_validate(
            {**settings.model_dump(), "policy": policy_path, "audit_log": audit_path, **updates}
        )
        server: TestServer = await aiohttp_server(
            create_app(configured, tracer_provider=tracer_provider)
        )
        gateway = Gateway(
            server=server,
            fake=fake_provider,
            policy_path=policy_path,
            audit_path=audit_path,
            openai=openai.AsyncOpenAI(
                base_url=str(server.make_url("/v1")), api_key=OPENAI_KEY, max_retries=0
            ),
            anthropic=anthropic.AsyncAnthropic(
                base_url=str(server.make_url("")).rstrip("/"), api_key=ANTHROPIC_KEY, max_retries=0
            ),
            _http=http,
        )
        opened.append(gateway)
        return gateway

    yield make
    for gateway in opened:
        await gateway.openai.close()
        await gateway.anthropic.close()
    await http.close()


def installed(program: str, package: str) -> str:
    """The path of a program a test needs: skipped without it locally, failed under CI."""
    found = shutil.which(program)
    if found is None:
        message = f"{program} is not installed: apt-get install {package}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def session_headers(session: str, **extra: str) -> dict[str, str]:
    return {"X-Gateway-Session": session, **extra}


# -- keys mode ---------------------------------------------------------------------------------
POOL_OPENAI = "sk-pool-openai-primary-0001"
POOL_OPENAI_2 = "sk-pool-openai-secondary-0002"
POOL_ANTHROPIC = "sk-ant-pool-primary-0001"


def keys_mode(fake: TestServer, tmp_path: Path, mode: str = "keys", **auth: Any) -> dict[str, Any]:
    """Settings for a gateway in ``mode`` whose pools hold file references in ``tmp_path``."""
    for name, value in (("oa1", POOL_OPENAI), ("oa2", POOL_OPENAI_2), ("an1", POOL_ANTHROPIC)):
        (tmp_path / name).write_text(value + "\n")
    return {
        "auth": {"mode": mode, **auth},
        "upstreams": {
            "openai": {
                "url": str(fake.make_url("/v1")),
                "credentials": {
                    "platform": [
                        {"name": "primary", "value": f"file:{tmp_path / 'oa1'}"},
                        {"name": "secondary", "value": f"file:{tmp_path / 'oa2'}"},
                    ]
                },
            },
            "anthropic": {
                "url": str(fake.make_url("")).rstrip("/"),
                "credentials": {
                    "platform": [{"name": "primary", "value": f"file:{tmp_path / 'an1'}"}]
                },
            },
        },
    }


async def create_key(gw: Gateway, **spec: Any) -> dict[str, Any]:
    body = {"team": "platform", "name": "ci-bot", **spec}
    status, _headers, answer = await gw.post("/gateway/keys", body, ADMIN)
    assert status == 201, answer
    assert isinstance(answer, dict)
    return answer
