"""The canary run (issue 15, §6 and §11): a gateway started with canary values for every
secret (upstream pool credentials by ``env:`` and ``file:`` reference, client provider keys in
passthrough and bring-your-own-key, gateway keys made and rotated through the admin API, the
admin token, the key pepper, JWTs, an OTLP exporter header) at debug log level, driven through
every route and error path, then every sink scanned for every canary in every form
(``tests/canaries.py``): 0 found. The one answer that hands out a new key holds that key, and
the fake provider receives the pool credentials: neither is a sink of the gateway.

Then the same for prompt and completion text with content capture off (the default): none of
it in logs, spans, metrics, the audit log, error answers or the SQLite store (no summary is
made in this run, so the store has none to keep).

The gateways run in this process where a span exporter in memory and a log file can be read
(the log is configured as ``gateway serve`` configures it, at DEBUG), and once as ``gateway
serve`` itself, its stdout and stderr captured and its spans exported over OTLP with a canary
in the exporter's headers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import secrets
import signal
import string
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from multidict import CIMultiDictProxy
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from yarl import URL

from gateway.auth.admin_auth import weak_token
from gateway.auth.keys import checksum
from gateway.fake_provider import FAULTS, RECEIVED, Fault, FakeProviderConfig
from gateway.telemetry import logs
from gateway.telemetry.otel_env import CAPTURE_ENV
from gateway.telemetry.redacting import RedactingExporter
from tests.canaries import Canary, Hit, Sinks
from tests.conftest import ANTHROPIC_MODEL
from tests.harness import Gateway, MakeGateway

STDIO, LOG, AUDIT, STORE, SPANS, METRICS, ADMIN, CLIENT = SINKS = (
    "stdout/stderr",
    "log",
    "audit",
    "sqlite",
    "spans",
    "/metrics",
    "admin answers",
    "client errors",
)
"""The sinks scanned. ``client errors``: every answer of the LLM plane with a status of 400 or
more (status, headers, body), and the gateway's own headers (``X-Gateway-*``) of the others;
``admin answers``: every answer under ``/gateway/`` (``/metrics`` apart)."""

POLICY = """
version: 1
defaults:
  limits:
    models: {allow: ["*"], deny: ["*-forbidden*"]}
  budgets:
    - {per: key, window: minute, max_requests: 100000}
    - {per: team, window: day, max_tokens: 1000000000}
"""
"""Refuses ``*-forbidden*`` models (the policy's refusal), and counts budgets the admin API
and ``/metrics`` show."""
OPENAI_MODEL = "gpt-4o-mini"
POOL_ENV = "CANARY_OPENAI_POOL"
AUDIENCE = "agent-gateway"


# -- the canaries --------------------------------------------------------------------------------
def _alnum(n: int) -> str:
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(n))


def _urlsafe(n: int) -> str:
    return "".join(secrets.choice(string.ascii_letters + string.digits + "-_") for _ in range(n))


def _admin_token() -> str:
    while weak_token(token := secrets.token_urlsafe(32)):
        pass  # a random word-like token is refused by ``gateway serve``: draw again
    return token


def _pepper() -> str:
    # As the docs say to make one (`openssl rand -base64 48`): '+' and '/' are URL-encoded.
    while "+" not in (pepper := base64.b64encode(os.urandom(48)).decode()) or "/" not in pepper:
        pass
    return pepper


@dataclass
class Secrets:
    """This run's canary secrets, as the gateway and its clients hold them."""

    pool_openai: str = field(default_factory=lambda: "sk-proj-" + _urlsafe(56))
    """Pool ``platform``, entry ``primary`` of the OpenAI upstream, by ``env:``."""
    pool_openai_2: str = field(default_factory=lambda: "sk-proj-" + _urlsafe(56))
    """Entry ``secondary``, by ``file:``: used when the primary is refused."""
    pool_anthropic: str = field(default_factory=lambda: "sk-ant-api03-" + _urlsafe(80) + "AA")
    """The Anthropic upstream's pool entry, by ``file:``."""
    pool_anthropic_reloaded: str = field(
        default_factory=lambda: "sk-ant-api03-" + _urlsafe(80) + "AA"
    )
    """The same file's value after ``credentials reload``."""
    client_openai: str = field(default_factory=lambda: "sk-proj-" + _urlsafe(56))
    """A client's own OpenAI key (passthrough)."""
    client_anthropic: str = field(default_factory=lambda: "sk-ant-oat01-" + _urlsafe(80) + "AA")
    """A client's own Anthropic OAuth token (passthrough, as Claude Code logs in)."""
    client_second: str = field(default_factory=lambda: "sk-proj-" + _urlsafe(56))
    """A second, different key beside the first (refused: two credentials)."""
    refused_provider: str = field(default_factory=lambda: "sk-proj-" + _urlsafe(56))
    """A provider key sent where a gateway key belongs (keys mode): refused, never used."""
    byok: str = field(default_factory=lambda: "sk-proj-" + _urlsafe(56))
    """A client's own key brought beside a gateway key with ``upstream:byok`` (mixed mode)."""
    admin_token: str = field(default_factory=_admin_token)
    wrong_admin_token: str = field(default_factory=_admin_token)
    pepper: str = field(default_factory=_pepper)
    otlp_header: str = field(default_factory=lambda: _urlsafe(40))
    """The bearer token in ``OTEL_EXPORTER_OTLP_HEADERS`` (``gateway serve``)."""

    def canaries(self) -> list[Canary]:
        def provider(name: str, value: str) -> Canary:
            return Canary(name, value, value[: value.index("-", 3) + 1])

        return [
            provider("pool key openai (env:)", self.pool_openai),
            provider("pool key openai 2 (file:)", self.pool_openai_2),
            provider("pool key anthropic (file:)", self.pool_anthropic),
            provider("pool key anthropic reloaded", self.pool_anthropic_reloaded),
            provider("client key openai", self.client_openai),
            provider("client token anthropic", self.client_anthropic),
            provider("client second key", self.client_second),
            provider("provider key in keys mode", self.refused_provider),
            provider("byok key", self.byok),
            Canary("admin token", self.admin_token),
            Canary("wrong admin token", self.wrong_admin_token),
            Canary("key pepper", self.pepper),
            Canary("OTLP header token", self.otlp_header),
        ]


def gateway_key(name: str, key: str) -> Canary:
    """A gateway key: its public id may be shown, its secret never."""
    return Canary(name, key, key[: key.index("_", 3) + 1])


def wrong_secret(key: str) -> str:
    """The key's public id with another secret (a right checksum: it reaches the lookup)."""
    body = key[: key.index("_", 3) + 1] + _alnum(43)
    return body + checksum(body)


@dataclass(frozen=True)
class Prompts:
    """Text of the conversation, each piece unique to this run."""

    system: str = field(default_factory=lambda: "You are reviewer PROMPTSYS" + _alnum(24))
    user: str = field(default_factory=lambda: "Please check the PROMPTUSER" + _alnum(24))
    tool_result: str = field(default_factory=lambda: "file contents PROMPTTOOL" + _alnum(24))
    completion: str = field(default_factory=lambda: "The answer is PROMPTDONE" + _alnum(24))

    def canaries(self) -> list[Canary]:
        return [
            Canary("system prompt", self.system, self.system[:20]),
            Canary("user message", self.user, self.user[:20]),
            Canary("tool result", self.tool_result, self.tool_result[:20]),
            Canary("completion", self.completion, self.completion[:20]),
        ]

    # The three dialects' bodies, every piece of text in them a canary.
    def chat(self, model: str = OPENAI_MODEL, stream: bool = False, **extra: Any) -> Any:
        body: dict[str, Any] = {
            "model": model,
            "messages": [
                {"role": "system", "content": self.system},
                {"role": "user", "content": self.user},
                {"role": "assistant", "content": None, "tool_calls": [_CHAT_CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": self.tool_result},
            ],
            "tools": [_CHAT_TOOL],
            "max_tokens": 64,
            **extra,
        }
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return body

    def responses(self, model: str = OPENAI_MODEL, stream: bool = False, **extra: Any) -> Any:
        return {
            "model": model,
            "instructions": self.system,
            "input": [
                {"role": "user", "content": self.user},
                {"type": "function_call", "call_id": "call_1", "name": "read_file",
                 "arguments": '{"path": "notes.txt"}'},
                {"type": "function_call_output", "call_id": "call_1", "output": self.tool_result},
            ],  # fmt: skip
            "tools": [{"type": "function", **_TOOL}],
            "max_output_tokens": 64,
            "stream": stream,
            **extra,
        }

    def messages(self, model: str = ANTHROPIC_MODEL, stream: bool = False, **extra: Any) -> Any:
        return {
            "model": model,
            "max_tokens": 64,
            "system": self.system,
            "messages": [
                {"role": "user", "content": self.user},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "toolu_1", "name": "read_file",
                     "input": {"path": "notes.txt"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1",
                     "content": self.tool_result}]},
            ],  # fmt: skip
            "tools": [{"name": "read_file", "description": _TOOL["description"],
                       "input_schema": _TOOL["parameters"]}],  # fmt: skip
            "stream": stream,
            **extra,
        }


_TOOL: dict[str, Any] = {
    "name": "read_file",
    "description": "Read a file of the project.",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
}
_CHAT_TOOL = {"type": "function", "function": _TOOL}
_CHAT_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "read_file", "arguments": '{"path": "notes.txt"}'},
}
DIALECTS = (("chat", "/v1/chat/completions"), ("responses", "/v1/responses"),
            ("messages", "/v1/messages"))  # fmt: skip


def body_of(prompts: Prompts, dialect: str, **options: Any) -> Any:
    build: Callable[..., Any] = getattr(prompts, dialect)
    return build(**options)


# -- calls, their answers recorded as sinks -------------------------------------------------------
@dataclass
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Driver:
    """Makes every call of the run; each answer goes to the sink it belongs to."""

    def __init__(self, http: aiohttp.ClientSession, sinks: Sinks) -> None:
        self.http, self.sinks = http, sinks

    async def call(
        self,
        base: str,
        method: str,
        path: str,
        expect: int | tuple[int, ...],
        body: Any = None,
        headers: dict[str, str] | None = None,
        allows: tuple[str, ...] = (),
    ) -> Answer:
        """``path`` as sent (already percent-encoded); ``body``: JSON, or bytes as they are."""
        sent = dict(headers or {})
        data: bytes | None = None
        if isinstance(body, bytes):
            data = body
        elif body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        url = URL(base + path, encoded=True)
        async with self.http.request(method, url, data=data, headers=sent) as response:
            raw = await response.read()
            answer = Answer(response.status, response.headers, raw)
        expected = (expect,) if isinstance(expect, int) else expect
        assert answer.status in expected, f"{method} {path}: {answer.status} {raw[:400]!r}"
        origin = f"{method} {path.split('?')[0][:50]} {answer.status}"
        head = "\n".join(f"{name}: {value}" for name, value in answer.headers.items())
        whole = f"{answer.status}\n{head}\n\n".encode() + raw
        if path.startswith("/metrics"):
            self.sinks.add(METRICS, origin, whole)
        elif path.startswith("/gateway/"):
            self.sinks.add(ADMIN, origin, whole, allows)
        elif answer.status >= 400:
            self.sinks.add(CLIENT, origin, whole)
        else:
            ours = [f"{n}: {v}" for n, v in answer.headers.items() if n.lower().startswith("x-gateway")]
            self.sinks.add(CLIENT, origin + " (gateway headers)", "\n".join(ours))
        return answer


def admin_headers(token: str, **more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **more}


def llm_auth(dialect: str, key: str) -> dict[str, str]:
    """A credential as each SDK sends it: OpenAI's ``Authorization``, Anthropic's ``x-api-key``."""
    if dialect == "messages":
        return {"x-api-key": key, "anthropic-version": "2023-06-01"}
    return {"Authorization": f"Bearer {key}"}


# -- the gateway's log, as ``gateway serve`` configures it ------------------------------------------
_NOT_THE_GATEWAYS = ("aiohttp.access", "openai", "anthropic", "httpx", "httpcore")
"""Loggers of this process that a gateway process has not: the test servers' access logs
(``gateway serve`` runs without one) and the SDK clients'."""


class _GatewayRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(_NOT_THE_GATEWAYS)


@contextlib.asynccontextmanager
async def serve_logging(path: Path) -> AsyncIterator[None]:
    """Every record at DEBUG and every request line, JSON, through ``logs.configure`` (the
    writer thread and redacting formatter of ``gateway serve``), into ``path``."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    writer = logs.configure("debug", "json")
    stream = path.open("w", encoding="utf-8")
    writer.stream = stream  # before its first write (it waits an interval first)
    root.handlers[0].addFilter(_GatewayRecords())
    try:
        yield
    finally:
        await asyncio.to_thread(writer.stop)  # it writes what is left: not on the loop
        stream.close()
        root.handlers[:] = saved
        root.setLevel(level)


# -- an identity provider for the JWTs --------------------------------------------------------------
@dataclass
class IdP:
    url: str
    key: rsa.RSAPrivateKey

    def token(self, audience: str = AUDIENCE, **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": self.url, "aud": audience, "sub": "ci-runner", "team": "platform",
                   "iat": now, "exp": now + 600, **claims}  # fmt: skip
        return jwt.encode(payload, self.key, algorithm="RS256", headers={"kid": "canary-1"})


@pytest.fixture
async def idp(aiohttp_server: Any) -> IdP:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "canary-1", "use": "sig"}

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response({"keys": [jwk]})

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    server: TestServer = await aiohttp_server(app)
    return IdP(str(server.make_url("")).rstrip("/"), key)


# -- the gateways' settings --------------------------------------------------------------------------
def sqlite(path: Path) -> str:
    return f"sqlite:///{path}"


def upstreams(fake: TestServer, files: Path) -> dict[str, Any]:
    """Both upstreams with one pool each: OpenAI's entries by ``env:`` and ``file:``,
    Anthropic's by ``file:``."""
    return {
        "openai": {
            "url": str(fake.make_url("/v1")),
            "credentials": {
                "platform": [
                    {"name": "primary", "value": f"env:{POOL_ENV}"},
                    {"name": "secondary", "value": f"file:{files / 'openai-2'}"},
                ]
            },
        },
        "anthropic": {
            "url": str(fake.make_url("")).rstrip("/"),
            "credentials": {"platform": [{"name": "primary", "value": f"file:{files / 'anthropic'}"}]},
        },
    }


def received_credentials(fake: TestServer) -> str:
    """Every credential header the fake provider was sent (it is the upstream, not a sink)."""
    return "\n".join(
        f"{r.headers.get('Authorization', '')} {r.headers.get('x-api-key', '')}"
        for r in fake.app[RECEIVED]
    )


@dataclass
class Run:
    """One canary run: its secrets, prompts, sinks, and the gateway keys it made."""

    secrets: Secrets
    prompts: Prompts
    sinks: Sinks
    driver: Driver
    pool: Path
    """The directory of the pools' ``file:`` references."""
    keys: list[Canary] = field(default_factory=list)

    def canaries(self) -> list[Canary]:
        return [*self.secrets.canaries(), *self.keys]

    async def create_key(self, base: str, name: str, **spec: Any) -> str:
        """A key made through the admin API; its one answer may (and must) hold it."""
        answer = await self.driver.call(
            base, "POST", "/gateway/keys", 201,
            {"team": "platform", "name": name.replace(" ", "-"), **spec},
            admin_headers(self.secrets.admin_token), allows=(name,),
        )  # fmt: skip
        key: str = answer.json()["key"]
        assert answer.headers["Cache-Control"] == "no-store"
        self.keys.append(gateway_key(name, key))
        return key


# -- the in-process gateways ----------------------------------------------------------------------------
async def drive_keys_mode(run: Run, gw: Gateway) -> None:
    """``auth.mode: keys``: a key made, used in every dialect, refused every way, rotated and
    revoked; the pool failing over and reloaded; every admin route."""
    call, base, s, p = run.driver.call, gw.url(""), run.secrets, run.prompts
    admin = admin_headers(s.admin_token)
    key = await run.create_key(base, "keys ci-bot")
    key_id = key.split("_")[1]
    wrong = wrong_secret(key)
    run.keys.append(gateway_key("wrong gateway key", wrong))

    for dialect, path in DIALECTS:
        auth = llm_auth(dialect, key)
        session = {"X-Gateway-Session": f"keys-{dialect}"}
        await call(base, "POST", path, 200, body_of(p, dialect), {**auth, **session})
        await call(base, "POST", path, 200, body_of(p, dialect, stream=True), {**auth, **session})
        denied = body_of(p, dialect, model=f"{OPENAI_MODEL}-forbidden")
        await call(base, "POST", path, 400, denied, {**auth, **session})
        broken = json.dumps(body_of(p, dialect)).encode()[:-40]  # cut inside the prompt
        await call(base, "POST", path, 400, broken, {**auth, **session})
        await call(base, "POST", path, 401, body_of(p, dialect), llm_auth(dialect, wrong))
        refused = llm_auth(dialect, s.refused_provider)
        await call(base, "POST", path, 401, body_of(p, dialect), refused)
        await call(base, "POST", path, 401, body_of(p, dialect), llm_auth(dialect, s.admin_token))
        await call(base, "POST", path, 401, body_of(p, dialect), {})
        await call(base, "GET", path, 405, None, auth)
        await call(base, "POST", path, 400, body_of(p, dialect), {**auth, "Host": "evil.example"})
    auth = llm_auth("chat", key)
    await call(base, "POST", "/v1/messages/count_tokens", 200,
               {"model": ANTHROPIC_MODEL, "system": p.system,
                "messages": [{"role": "user", "content": p.user}]},
               llm_auth("messages", key))  # fmt: skip
    await call(base, "GET", "/v1/models", 200, None, auth)
    # A credential in the query string, never a header: refused, and never logged.
    await call(base, "POST", f"/v1/chat/completions?api_key={s.refused_provider}", (400, 401),
               p.chat(), {})  # fmt: skip
    await call(base, "POST", f"/v1/chat/completions?key={key}", (400, 401), p.chat(), {})
    await call(base, "POST", "/v1/chat%2Fcompletions", 400, p.chat(), auth)
    await call(base, "GET", "/no/such/path", 404, None, auth)
    # The primary pool entry refused once: the call fails over to the secondary.
    gw.fake.app[FAULTS].replace(Fault(kind="status", status=401, count=1))
    await call(base, "POST", "/v1/chat/completions", 200, p.chat(), auth)
    await send_claims(run, base, lambda dialect: llm_auth(dialect, key), s.pool_openai, s.admin_token)

    # Admin routes, refused: no token, a wrong one, a gateway key, a provider key, a page's
    # form post, a body that is no JSON, a field no key has.
    await call(base, "GET", "/gateway/sessions", 401, None, {})
    await call(base, "GET", "/gateway/sessions", 401, None, admin_headers(s.wrong_admin_token))
    await call(base, "GET", "/gateway/sessions", 401, None, admin_headers(key))
    await call(base, "GET", "/gateway/keys", 401, None, {"x-api-key": s.refused_provider})
    await call(base, "POST", "/gateway/keys", 403, {"team": "platform", "name": "x"},
               {**admin, "Origin": "http://evil.example"})  # fmt: skip
    await call(base, "POST", "/gateway/keys", 415, b"team=platform",
               {**admin, "Content-Type": "text/plain"})  # fmt: skip
    await call(base, "POST", "/gateway/keys", 400, b'{"team": ', admin)
    await call(base, "POST", "/gateway/keys", 400,
               {"team": "platform", "name": "x", "digest": s.pepper}, admin)  # fmt: skip
    await call(base, "GET", "/gateway/keys/ZZZZZZZZZZZZ", 404, None, admin)
    await call(base, "GET", "/gateway/sessions/no-such-session", 404, None, admin)
    await call(base, "GET", "/gateway/sessions", 400, None, {**admin, "Host": "evil.example"})

    # Admin routes, served.
    await call(base, "GET", "/gateway/health", 200)
    await call(base, "GET", "/gateway/ready", 200)
    await call(base, "GET", "/gateway/keys", 200, None, admin)
    await call(base, "GET", f"/gateway/keys/{key_id}", 200, None, admin)
    await call(base, "GET", "/gateway/sessions?limit=100", 200, None, admin)
    await call(base, "GET", "/gateway/sessions/keys-chat", 200, None, admin)
    await call(base, "POST", "/gateway/sessions/keys-chat/grant", 200,
               {"turns": 5, "reason": "canary run"}, admin)  # fmt: skip
    await call(base, "POST", "/gateway/sessions/keys-chat/end", 200, {"reason": "done"}, admin)
    # The ended session refuses the next call.
    await call(base, "POST", "/v1/chat/completions", (400, 403, 409, 410, 429), p.chat(),
               {**auth, "X-Gateway-Session": "keys-chat"})  # fmt: skip
    await call(base, "GET", "/gateway/credentials", 200, None, admin)
    await asyncio.to_thread((run.pool / "anthropic").write_text, s.pool_anthropic_reloaded)
    await call(base, "POST", "/gateway/credentials/reload", 200, {"reason": "rotated"}, admin)
    await call(base, "POST", "/v1/messages", 200, p.messages(), llm_auth("messages", key))
    assert s.pool_anthropic_reloaded in received_credentials(gw.fake)
    await call(base, "POST", "/gateway/degrade", 200, {"on": True, "reason": "canary"}, admin)
    await call(base, "GET", "/gateway/degrade", 200, None, admin)
    await call(base, "POST", "/v1/chat/completions", 200, p.chat(), auth)
    await call(base, "POST", "/gateway/degrade", 200, {"on": False}, admin)
    await call(base, "GET", "/gateway/policy", 200, None, admin)
    await call(base, "GET", "/gateway/budgets", 200, None, admin)
    await call(base, "GET", "/gateway/calibration", 200, None, admin)

    # Rotation: the new secret in its one answer; the previous one works, deprecated.
    rotated = await run.driver.call(
        base, "POST", f"/gateway/keys/{key_id}/rotate", 200, {"grace": "1h"}, admin,
        allows=("keys ci-bot rotated",),
    )  # fmt: skip
    new_key = rotated.json()["key"]
    run.keys.append(gateway_key("keys ci-bot rotated", new_key))
    old = await call(base, "POST", "/v1/chat/completions", 200, p.chat(), auth)
    assert "X-Gateway-Key-Deprecated" in old.headers
    await call(base, "POST", "/v1/chat/completions", 200, p.chat(), llm_auth("chat", new_key))
    await call(base, "POST", f"/gateway/keys/{key_id}/revoke", 200, {"now": True}, admin)
    await call(base, "POST", "/v1/chat/completions", 401, p.chat(), llm_auth("chat", new_key))
    await call(base, "GET", "/metrics", 200)
    await call(base, "GET", "/metrics", 200, None, {"Accept": "application/openmetrics-text"})


    sent = received_credentials(gw.fake)
    for value in (s.pool_openai, s.pool_openai_2, s.pool_anthropic):
        assert value in sent  # the pool's credentials went upstream ...
    for value in (key, new_key, wrong, s.refused_provider, s.admin_token):
        assert value not in sent  # ... and no client's


async def drive_passthrough(run: Run, gw: Gateway) -> None:
    """``auth.mode: passthrough``: the client's own keys go upstream; refusals of the admin
    token, of two keys at once, of a key the provider refuses."""
    call, base, s, p = run.driver.call, gw.url(""), run.secrets, run.prompts
    keys = {"chat": s.client_openai, "responses": s.client_openai, "messages": s.client_anthropic}
    for dialect, path in DIALECTS:
        auth = llm_auth(dialect, keys[dialect])
        if dialect == "messages":  # Claude Code logged in: its OAuth token as a bearer
            auth = {"Authorization": f"Bearer {s.client_anthropic}", "anthropic-version": "1"}
        session = {"X-Gateway-Session": f"pass-{dialect}"}
        await call(base, "POST", path, 200, body_of(p, dialect), {**auth, **session})
        await call(base, "POST", path, 200, body_of(p, dialect, stream=True), {**auth, **session})
        denied = body_of(p, dialect, model=f"{OPENAI_MODEL}-forbidden")
        await call(base, "POST", path, 400, denied, {**auth, **session})
        await call(base, "POST", path, 400, json.dumps(body_of(p, dialect)).encode()[:-40], auth)
        await call(base, "POST", path, 401, body_of(p, dialect), llm_auth(dialect, s.admin_token))
        await call(base, "POST", path, 400, body_of(p, dialect), {**auth, "Host": "evil.example"})
        two = {"Authorization": f"Bearer {keys[dialect]}", "x-api-key": s.client_second}
        await call(base, "POST", path, 400, body_of(p, dialect), two)
    # A key the provider refuses: its 401, passed on.
    gw.fake.app[FAULTS].replace(Fault(kind="status", status=401, count=1))
    auth = llm_auth("chat", s.client_openai)
    await call(base, "POST", "/v1/chat/completions", 401, p.chat(), auth)
    await call(base, "POST", f"/v1/chat/completions?api_key={s.client_second}", (400, 401),
               p.chat(), {})  # fmt: skip
    await call(base, "GET", "/v1/models", 200, None, auth)
    await call(base, "GET", "/elsewhere", 404, None, auth)
    await send_claims(
        run, base, lambda dialect: llm_auth(dialect, keys[dialect]), s.client_openai,
        s.client_anthropic,
    )  # fmt: skip
    await call(base, "GET", "/gateway/sessions", 401, None, {"x-api-key": s.client_anthropic})
    await call(base, "GET", "/gateway/sessions", 200, None, admin_headers(s.admin_token))
    await call(base, "GET", "/gateway/sessions/pass-chat", 200, None, admin_headers(s.admin_token))
    await call(base, "GET", "/metrics", 200)
    sent = received_credentials(gw.fake)
    assert s.client_openai in sent and s.client_anthropic in sent
    assert s.admin_token not in sent and s.client_second not in sent


async def drive_mixed(run: Run, gw: Gateway, idp: IdP) -> None:
    """``auth.mode: mixed``: JWTs of an identity provider, and a key with ``upstream:byok``
    bringing its owner's provider key."""
    call, base, s, p = run.driver.call, gw.url(""), run.secrets, run.prompts
    token = idp.token()
    foreign = idp.token(audience="someone-else")
    run.keys += [Canary("JWT", token, token[: token.rindex(".") + 1]),
                 Canary("JWT refused", foreign, foreign[: foreign.rindex(".") + 1])]  # fmt: skip
    byok_key = await run.create_key(base, "mixed byok-bot", scopes=["llm", "upstream:byok"])
    for dialect, path in DIALECTS:
        bearer = {"Authorization": f"Bearer {token}", "anthropic-version": "2023-06-01"}
        await call(base, "POST", path, 200, body_of(p, dialect), bearer)
        await call(base, "POST", path, 200, body_of(p, dialect, stream=True), bearer)
        await call(base, "POST", path, 401, body_of(p, dialect), {"Authorization": f"Bearer {foreign}"})
    byok = {"Authorization": f"Bearer {s.byok}", "X-Gateway-Key": byok_key}
    await call(base, "POST", "/v1/chat/completions", 200, p.chat(), byok)
    await call(base, "POST", "/v1/chat/completions", 401, p.chat(), {"Authorization": f"Bearer {s.byok}"})
    await call(base, "GET", "/gateway/sessions", 401, None, {"Authorization": f"Bearer {token}"})
    await call(base, "GET", "/gateway/keys", 200, None, admin_headers(s.admin_token))
    await call(base, "GET", "/metrics", 200)
    sent = received_credentials(gw.fake)
    assert s.byok in sent and token not in sent and byok_key not in sent


async def send_claims(
    run: Run, base: str, auth: Callable[[str], dict[str, str]], first: str, second: str
) -> None:
    """Secrets where a client makes claims the gateway logs and keeps: the session id, its
    name, the agent, the User-Agent (headers), and the session hints and model (body)."""
    call, p = run.driver.call, run.prompts
    claims = {
        "X-Gateway-Session": f"sess-{first}",
        "X-Gateway-Session-Name": f"name {second}",
        "X-Gateway-Agent": f"agent-{second}",
        "User-Agent": f"claims/1.0 ({first})",
    }
    hints = {
        "chat": {"user": f"user-{first}"},
        "responses": {"prompt_cache_key": f"cache-{first}", "user": f"user-{second}"},
        "messages": {"metadata": {"user_id": f"user-{first}"}},
    }
    for dialect, path in DIALECTS:
        await call(base, "POST", path, 200, body_of(run.prompts, dialect), {**auth(dialect), **claims})
        # No session header: the body's hints name the session.
        await call(base, "POST", path, 200, body_of(p, dialect, **hints[dialect]), auth(dialect))
        denied = body_of(p, dialect, model=f"{OPENAI_MODEL}-forbidden-{first}")
        await call(base, "POST", path, 400, denied, {**auth(dialect), **claims})


async def read_into(sinks: Sinks, sink: str, path: Path, origin: str | None = None) -> None:
    data = await asyncio.to_thread(path.read_bytes)
    sinks.add(sink, origin or path.name, data)


def report(sinks: Sinks, title: str, canaries: list[Canary], hits: list[Hit]) -> str:
    table = sinks.table(title, canaries, hits)
    if hits:
        table += "\n" + "\n".join(f"  found: {hit}" for hit in hits[:60])
    return table


@pytest.fixture
def prompts(fake_config: FakeProviderConfig) -> Prompts:
    made = Prompts()
    fake_config.reply_text = made.completion  # the provider's answer is a canary too
    return made


async def test_no_secret_and_no_prompt_reaches_any_sink(
    make_gateway: MakeGateway,
    fake_provider: TestServer,
    idp: IdP,
    prompts: Prompts,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    unused_tcp_port_factory: Callable[[], int],
) -> None:
    s = Secrets()
    monkeypatch.delenv(CAPTURE_ENV, raising=False)
    monkeypatch.setenv(POOL_ENV, s.pool_openai)
    monkeypatch.setenv("GATEWAY_KEY_PEPPER", s.pepper)
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "openai-2").write_text(s.pool_openai_2 + "\n")
    (pool / "anthropic").write_text(s.pool_anthropic + "\n")
    spans = InMemorySpanExporter()
    tracer = TracerProvider()
    tracer.add_span_processor(SimpleSpanProcessor(RedactingExporter(spans)))
    sinks = Sinks(SINKS)
    log_file = tmp_path / "gateway.log"
    common: dict[str, Any] = {"admin_token": s.admin_token, "tracer_provider": tracer,
                              "upstreams": upstreams(fake_provider, pool)}  # fmt: skip
    async with aiohttp.ClientSession() as http:
        run = Run(s, prompts, sinks, Driver(http, sinks), pool)
        async with serve_logging(log_file):
            keyed = await make_gateway(
                POLICY, store=sqlite(tmp_path / "keys.db"), auth={"mode": "keys"}, **common
            )
            await drive_keys_mode(run, keyed)
            passing = await make_gateway(POLICY, store=sqlite(tmp_path / "pass.db"), **common)
            await drive_passthrough(run, passing)
            mixed = await make_gateway(
                POLICY,
                store=sqlite(tmp_path / "mixed.db"),
                auth={
                    "mode": "mixed",
                    "jwt_issuers": [{"issuer": idp.url, "audience": [AUDIENCE],
                                     "jwks_url": f"{idp.url}/jwks", "algorithms": ["RS256"]}],
                    "egress_allow": ["127.0.0.1/32"],
                },  # fmt: skip
                **common,
            )
            await drive_mixed(run, mixed, idp)
            # Stopped before the sinks are read: the store, audit and log written out.
            for gw in (keyed, passing, mixed):
                await gw.server.close()
        await serve_run(run, fake_provider, pool, tmp_path, unused_tcp_port_factory)

    captured = capfd.readouterr()
    sinks.add(STDIO, "pytest process stdout", captured.out)
    sinks.add(STDIO, "pytest process stderr", captured.err)
    await read_into(sinks, LOG, log_file)
    for path in sorted(tmp_path.glob("audit-*.jsonl")):
        await read_into(sinks, AUDIT, path)
    for path in sorted(tmp_path.glob("*.db*")):  # the database, its WAL and shared memory
        await read_into(sinks, STORE, path)
    for span in spans.get_finished_spans():
        sinks.add(SPANS, f"span {span.name}", span.to_json())

    for sink in SINKS:  # a sink that held nothing would prove nothing
        assert sinks.size(sink) > 0, f"nothing was scanned in {sink}"
    found, allowed = sinks.scan(run.canaries())
    content_found, _ = sinks.scan(prompts.canaries())
    with capfd.disabled():
        print("\n" + report(sinks, "secrets", run.canaries(), found))
        print(report(sinks, "prompt and completion text", prompts.canaries(), content_found))
    # The scan finds what is there: each new key is in the one answer that made it.
    assert {hit.canary for hit in allowed} == {
        "keys ci-bot", "keys ci-bot rotated", "mixed byok-bot", "serve ci-bot"
    }  # fmt: skip
    assert not found, "\n".join(map(str, found))
    assert not content_found, "\n".join(map(str, content_found))


# -- ``gateway serve`` as a process ------------------------------------------------------------------------
@dataclass
class Collector:
    """An OTLP/HTTP receiver: what the gateway's exporter sent, and with which headers."""

    bodies: list[bytes] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)

    async def traces(self, request: web.Request) -> web.Response:
        self.authorizations.append(request.headers.get("Authorization", ""))
        self.bodies.append(await request.read())
        return web.Response(body=b"", content_type="application/x-protobuf")


@contextlib.asynccontextmanager
async def collector_server() -> AsyncIterator[tuple[Collector, str]]:
    collector = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", collector.traces)
    server = TestServer(app)
    await server.start_server()
    try:
        yield collector, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def serve_run(
    run: Run,
    fake: TestServer,
    pool: Path,
    tmp_path: Path,
    ports: Callable[[], int],
) -> None:
    """``gateway serve`` in keys mode, every secret from the environment or a file, the log at
    debug on stderr, spans to an OTLP collector (a canary in the exporter's headers) and the
    console: a key made and used, refusals, admin reads, SIGTERM; every output scanned."""
    s, sinks = run.secrets, run.sinks
    port = ports()
    config = tmp_path / "serve.yaml"
    settings = {
        "port": port,
        "store": sqlite(tmp_path / "serve.db"),
        "audit_log": str(tmp_path / "audit-serve.jsonl"),
        "state_dir": str(tmp_path / "serve-state"),
        "policy": str(tmp_path / "serve-policy.yaml"),
        "auth": {"mode": "keys"},
        "upstreams": upstreams(fake, pool),
    }
    await asyncio.to_thread(config.write_text, json.dumps(settings))  # JSON is YAML
    await asyncio.to_thread((tmp_path / "serve-policy.yaml").write_text, textwrap.dedent(POLICY))
    async with collector_server() as (collector, endpoint):
        inherited = {
            k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OTEL_"))
        }
        env = {
            **inherited,
            "GATEWAY_ADMIN_TOKEN": s.admin_token,
            "GATEWAY_KEY_PEPPER": s.pepper,
            "GATEWAY_LOG_LEVEL": "debug",
            POOL_ENV: s.pool_openai,
            "OTEL_TRACES_EXPORTER": "otlp,console",
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_HEADERS": f"authorization=Bearer%20{s.otlp_header}",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        try:
            base = f"http://127.0.0.1:{port}"
            await _healthy(run.driver.http, base, process)
            await drive_served(run, base)
            process.send_signal(signal.SIGTERM)
            stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode == 0, stderr.decode(errors="replace")[-3000:]
        sinks.add(STDIO, "gateway serve stdout", stdout)
        sinks.add(STDIO, "gateway serve stderr", stderr)
        assert b'"logger":"gateway.requests"' in stderr  # its log is there to be scanned
        assert collector.bodies, "gateway serve exported no spans"
        for index, body in enumerate(collector.bodies):
            sinks.add(SPANS, f"gateway serve OTLP export {index}", body)
        # The collector is the exporter's destination, given the header: not a sink.
        assert set(collector.authorizations) == {f"Bearer {s.otlp_header}"}


async def _healthy(http: aiohttp.ClientSession, base: str, process: Any) -> None:
    for _ in range(300):
        assert process.returncode is None, "gateway serve exited at start"
        with contextlib.suppress(aiohttp.ClientConnectionError):
            async with http.get(f"{base}/gateway/health") as health:
                if health.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise AssertionError("gateway serve did not answer /gateway/health in 30 s")


async def drive_served(run: Run, base: str) -> None:
    call, s, p = run.driver.call, run.secrets, run.prompts
    admin = admin_headers(s.admin_token)
    key = await run.create_key(base, "serve ci-bot")
    for dialect, path in DIALECTS:
        auth = {**llm_auth(dialect, key), "X-Gateway-Session": f"serve-{dialect}"}
        await call(base, "POST", path, 200, body_of(p, dialect), auth)
        await call(base, "POST", path, 200, body_of(p, dialect, stream=True), auth)
        await call(base, "POST", path, 400, body_of(p, dialect, model="x-forbidden"), auth)
        await call(base, "POST", path, 400, json.dumps(body_of(p, dialect)).encode()[:-40], auth)
        await call(base, "POST", path, 401, body_of(p, dialect), llm_auth(dialect, s.refused_provider))
        await call(base, "POST", path, 401, body_of(p, dialect), llm_auth(dialect, s.admin_token))
        await call(base, "POST", path, 401, body_of(p, dialect), llm_auth(dialect, wrong_secret(key)))
    await call(base, "GET", "/no/such/path", 404)
    await call(base, "GET", "/gateway/sessions", 401, None, admin_headers(key))
    await call(base, "GET", "/gateway/sessions", 401, None, admin_headers(s.wrong_admin_token))
    await call(base, "GET", "/gateway/sessions", 200, None, admin)
    await call(base, "GET", "/gateway/sessions/serve-chat", 200, None, admin)
    await call(base, "GET", "/gateway/credentials", 200, None, admin)
    await call(base, "POST", "/gateway/credentials/reload", 200, {"reason": "canary"}, admin)
    await call(base, "GET", "/gateway/keys", 200, None, admin)
    await call(base, "GET", "/metrics", 200)


# -- the control: with capture on, the scan does find the prompt --------------------------------------------
async def test_with_capture_on_the_prompt_is_found_on_spans(
    make_gateway: MakeGateway, prompts: Prompts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other side of "0 found while capture is off": the same scan finds the prompt as
    soon as an operator turns capture on, so the sinks above were able to show it."""
    monkeypatch.setenv(CAPTURE_ENV, "true")
    spans = InMemorySpanExporter()
    tracer = TracerProvider()
    tracer.add_span_processor(SimpleSpanProcessor(RedactingExporter(spans)))
    gw = await make_gateway(POLICY, tracer_provider=tracer)
    sinks = Sinks((SPANS,))
    async with aiohttp.ClientSession() as http:
        driver = Driver(http, Sinks((CLIENT,)))
        key = "sk-proj-" + _urlsafe(56)
        await driver.call(gw.url(""), "POST", "/v1/chat/completions", 200, prompts.chat(),
                          llm_auth("chat", key))  # fmt: skip
    for span in spans.get_finished_spans():
        sinks.add(SPANS, span.name, span.to_json())
    found, _ = sinks.scan(prompts.canaries())
    assert {hit.canary for hit in found} >= {"system prompt", "user message", "completion"}
