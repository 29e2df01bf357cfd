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
in the exporter's headers; the CLI is run against it.

A second run writes secrets into what a client claims (session id and name, agent, User-Agent,
the body's session hints, the model): the gateway keeps and shows those, and must not keep or
show a secret in them either. Each run prints its table: canaries by sinks, hits in each cell.

A third run keeps its state in Redis (issue 16, §4): the Redis passwords (one in the store URL,
one from ``GATEWAY_REDIS_PASSWORD``, a wrong one) are canaries too, one Redis is stopped and
started again mid-run (its outage logged, audited and shown), ``gateway serve`` runs on Redis,
and everything Redis holds (every key read back by type, and its append-only file) is one more
sink: ``redis``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import re
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
from urllib.parse import quote

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from multidict import CIMultiDictProxy
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.asyncio import Redis
from yarl import URL

from gateway import appkeys
from gateway.auth.admin_auth import weak_token
from gateway.auth.keys import checksum
from gateway.auth.planes import ROUTE_AUTH
from gateway.fake_provider import FAULTS, RECEIVED, FakeProviderConfig, Fault
from gateway.store import RedisStore, display_url
from gateway.telemetry import logs
from gateway.telemetry.otel_env import CAPTURE_ENV
from gateway.telemetry.redacting import RedactingExporter
from tests.canaries import Canary, Hit, Sinks
from tests.conftest import ANTHROPIC_MODEL
from tests.harness import Gateway, MakeGateway
from tests.redis_server import RedisServer, redis_server

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
REDIS = "redis"
REDIS_SINKS = (*SINKS, REDIS)
"""The Redis run's sinks: ``redis`` is every key of its Redis servers read back (by type, and
``DUMP``) and every file of their directories (the append-only file)."""

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


# -- the canaries ---------------------------------------------------------------------------------
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
            shown = re.match(r"sk-(?:proj|ant-api03|ant-oat01)-", value)
            assert shown is not None
            return Canary(name, value, shown.group(0))

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
                {
                    "type": "function_call",
                    "call_id": "call_1",
                    "name": "read_file",
                    "arguments": '{"path": "notes.txt"}',
                },
                {"type": "function_call_output", "call_id": "call_1", "output": self.tool_result},
            ],
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
                {
                    "role": "assistant",
                    "content": [
                        {
                            "type": "tool_use",
                            "id": "toolu_1",
                            "name": "read_file",
                            "input": {"path": "notes.txt"},
                        }
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_1",
                            "content": self.tool_result,
                        }
                    ],
                },
            ],
            "tools": [
                {
                    "name": "read_file",
                    "description": _TOOL["description"],
                    "input_schema": _TOOL["parameters"],
                }
            ],
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


def cut_short(prompts: Prompts, dialect: str) -> bytes:
    """A body that ends in the middle of the user's message: no JSON, a 400 (whose message
    must not quote the body)."""
    raw = json.dumps(body_of(prompts, dialect)).encode()
    return raw[: raw.index(prompts.user.encode()) + len(prompts.user) // 2]


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
        self.made: list[tuple[str, str, str]] = []
        """(base URL, method, path) of every call."""

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
        self.made.append((base, method, path))
        url = URL(base + path, encoded=True)
        async with self.http.request(method, url, data=data, headers=sent) as response:
            raw = await response.read()
            answer = Answer(response.status, response.headers, raw)
        expected = (expect,) if isinstance(expect, int) else expect
        assert answer.status in expected, f"{method} {path}: {answer.status} {raw[:400]!r}"
        shown = re.sub(r"^/s/[^/]+", "/s/{session}", path.split("?")[0])[:50]
        origin = f"{method} {shown} {answer.status}"
        head = "\n".join(f"{name}: {value}" for name, value in answer.headers.items())
        whole = f"{answer.status}\n{head}\n\n".encode() + raw
        if path.startswith("/metrics"):
            self.sinks.add(METRICS, origin, whole)
        elif path.startswith("/gateway/"):
            self.sinks.add(ADMIN, origin, whole, allows)
        elif answer.status >= 400:
            self.sinks.add(CLIENT, origin, whole)
        else:
            ours = [
                f"{n}: {v}" for n, v in answer.headers.items() if n.lower().startswith("x-gateway")
            ]
            self.sinks.add(CLIENT, origin + " (gateway headers)", "\n".join(ours))
        return answer


def admin_headers(token: str, **more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **more}


def llm_auth(dialect: str, key: str) -> dict[str, str]:
    """A credential as each SDK sends it: OpenAI's ``Authorization``, Anthropic's ``x-api-key``."""
    if dialect == "messages":
        return {"x-api-key": key, "anthropic-version": "2023-06-01"}
    return {"Authorization": f"Bearer {key}"}


# -- the gateway's log, as ``gateway serve`` configures it ----------------------------------------
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


# -- an identity provider for the JWTs ------------------------------------------------------------
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


# -- the gateways' settings -----------------------------------------------------------------------
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
            "credentials": {
                "platform": [{"name": "primary", "value": f"file:{files / 'anthropic'}"}]
            },
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
    """One canary run: its secrets and prompts, the sinks, and what every gateway of the run
    shares (tracing to ``spans``, pool files in ``pool``, the admin token)."""

    secrets: Secrets
    prompts: Prompts
    sinks: Sinks
    driver: Driver
    tmp_path: Path
    spans: InMemorySpanExporter
    tracer: TracerProvider
    fake: TestServer
    """The upstream of every gateway of the run."""
    keys: list[Canary] = field(default_factory=list)
    """Credentials made during the run (gateway keys, JWTs, the Redis servers' passwords):
    canaries too."""

    @property
    def pool(self) -> Path:
        """The directory of the pools' ``file:`` references."""
        return self.tmp_path / "pool"

    @property
    def log_file(self) -> Path:
        return self.tmp_path / "gateway.log"

    def settings(self, name: str, **more: Any) -> dict[str, Any]:
        """``make_gateway`` settings of a gateway of this run, its store its own SQLite file."""
        return {
            "store": sqlite(self.tmp_path / f"{name}.db"),
            "admin_token": self.secrets.admin_token,
            "tracer_provider": self.tracer,
            "upstreams": upstreams(self.fake, self.pool),
            **more,
        }

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

    async def collect(self, capfd: pytest.CaptureFixture[str]) -> None:
        """Every sink's content once the gateways have stopped (stores, audit logs and the
        log written out). Answers were recorded as they came."""
        captured = capfd.readouterr()
        self.sinks.add(STDIO, "pytest process stdout", captured.out)
        self.sinks.add(STDIO, "pytest process stderr", captured.err)
        if self.log_file.exists():
            await read_into(self.sinks, LOG, self.log_file)
        for path in sorted(self.tmp_path.glob("audit-*.jsonl")):
            await read_into(self.sinks, AUDIT, path)
        for path in sorted(self.tmp_path.glob("*.db*")):  # the database, its WAL, its -shm
            await read_into(self.sinks, STORE, path)
        for span in self.spans.get_finished_spans():
            self.sinks.add(SPANS, f"span {span.name}", span.to_json())

    def verify(
        self,
        capfd: pytest.CaptureFixture[str],
        handed_out: set[str],
        may_be_empty: tuple[str, ...] = (),
    ) -> None:
        """Every sink scanned for every canary: none found, but for each key in ``handed_out``
        in the one answer that made it (which the scan must find: it sees what is there)."""
        for sink in self.sinks.names:  # a sink that held nothing would prove nothing
            assert sink in may_be_empty or self.sinks.size(sink) > 0, f"{sink}: nothing to scan"
        canaries, prompts = self.canaries(), self.prompts.canaries()
        found, allowed = self.sinks.scan(canaries)
        content, _ = self.sinks.scan(prompts)
        with capfd.disabled():  # the figures, in the test's output whatever the outcome
            print("\n" + report(self.sinks, "secrets", canaries, found))
            print(report(self.sinks, "prompt and completion text (capture off)", prompts, content))
        assert {hit.canary for hit in allowed} == handed_out
        assert not found, "secrets found:\n" + "\n".join(map(str, found))
        assert not content, "prompt text found:\n" + "\n".join(map(str, content))


def report(sinks: Sinks, title: str, canaries: list[Canary], hits: list[Hit]) -> str:
    table = sinks.table(title, canaries, hits)
    if hits:
        table += "\n" + "\n".join(f"  found: {hit}" for hit in hits[:60])
    return table


async def read_into(sinks: Sinks, sink: str, path: Path) -> None:
    sinks.add(sink, path.name, await asyncio.to_thread(path.read_bytes))


@pytest.fixture
def prompts(fake_config: FakeProviderConfig) -> Prompts:
    made = Prompts()
    fake_config.reply_text = made.completion  # the provider's answer is a canary too
    return made


@pytest.fixture
def sink_names() -> tuple[str, ...]:
    """The sinks of a run (the Redis run parametrizes ``REDIS_SINKS``)."""
    return SINKS


@pytest.fixture
async def run(
    fake_provider: TestServer,
    prompts: Prompts,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sink_names: tuple[str, ...],
) -> AsyncIterator[Run]:
    """A run's secrets in the environment and the pool files, tracing to memory (through the
    redacting exporter, as every exporter the gateway builds), content capture off."""
    s = Secrets()
    monkeypatch.delenv(CAPTURE_ENV, raising=False)
    monkeypatch.setenv(POOL_ENV, s.pool_openai)
    monkeypatch.setenv("GATEWAY_KEY_PEPPER", s.pepper)
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "openai-2").write_text(s.pool_openai_2 + "\n")
    (tmp_path / "pool" / "anthropic").write_text(s.pool_anthropic + "\n")
    spans = InMemorySpanExporter()
    tracer = TracerProvider()
    tracer.add_span_processor(SimpleSpanProcessor(RedactingExporter(spans)))
    sinks = Sinks(sink_names)
    async with aiohttp.ClientSession() as http:
        made = Run(s, prompts, sinks, Driver(http, sinks), tmp_path, spans, tracer, fake_provider)
        yield made
    tracer.shutdown()


async def stop(*gateways: Gateway) -> None:
    """Stopped before the sinks are read: the stores, audit logs and log written out."""
    for gw in gateways:
        await gw.server.close()


async def routes_missed(driver: Driver, gateways: list[Gateway]) -> list[str]:
    """The routes the gateways declare (``auth.planes``) that no call of the run reached: a
    route added later fails the run until the run drives it."""
    declared: dict[web.AbstractRoute, str] = {}
    reached: set[str] = set()
    for gw in gateways:
        app = gw.server.app
        declared |= _routes(app)
        for base, method, path in driver.made:
            if base == gw.url(""):
                request = make_mocked_request(method, path, app=app)
                route = (await app.router.resolve(request)).route
                reached.add(declared.get(route, ""))
    return sorted(set(declared.values()) - reached)


def _routes(app: web.Application) -> dict[web.AbstractRoute, str]:
    """Each declared route of ``app`` and its sub-applications, as ``METHOD /path`` (a
    sub-application's paths carry its prefix already)."""
    named = {route: f"{route.method} {route.resource.canonical}"
             for route in app.get(ROUTE_AUTH, {}) if route.resource is not None}  # fmt: skip
    for resource in app.router.resources():
        sub = getattr(resource, "_app", None)  # a sub-application's (as auth.planes reads it)
        if isinstance(sub, web.Application):
            named |= _routes(sub)
    return named


# -- the runs -------------------------------------------------------------------------------------
async def test_no_secret_and_no_prompt_reaches_any_sink(
    run: Run,
    make_gateway: MakeGateway,
    idp: IdP,
    capfd: pytest.CaptureFixture[str],
    unused_tcp_port_factory: Callable[[], int],
) -> None:
    async with serve_logging(run.log_file):
        keyed = await make_gateway(POLICY, **run.settings("keys", auth={"mode": "keys"}))
        await drive_keys_mode(run, keyed)
        passing = await make_gateway(POLICY, **run.settings("pass"))
        await drive_passthrough(run, passing)
        mixed = await make_gateway(POLICY, **run.settings("mixed", auth=mixed_auth(idp)))
        await drive_mixed(run, mixed, idp)
        assert await routes_missed(run.driver, [keyed, passing, mixed]) == []
        await stop(keyed, passing, mixed)
    await serve_run(run, unused_tcp_port_factory())
    await run.collect(capfd)
    run.verify(capfd, {"keys ci-bot", "keys ci-bot rotated", "mixed byok-bot", "serve ci-bot"})


async def test_secrets_a_client_puts_in_its_claims_reach_no_sink(
    run: Run, make_gateway: MakeGateway, capfd: pytest.CaptureFixture[str]
) -> None:
    """A client's claims (session id and name, agent, User-Agent, the body's session hints,
    the model) are kept, shown and counted: a secret written into one (an agent that names
    its session after its key) is still no sink's."""
    s = run.secrets
    async with serve_logging(run.log_file):
        keyed = await make_gateway(POLICY, **run.settings("keys", auth={"mode": "keys"}))
        key = await run.create_key(keyed.url(""), "claims-bot")
        # In keys mode, secrets the gateway has loaded (a pool credential, the admin token).
        await send_claims(run, keyed, lambda d: llm_auth(d, key), s.pool_openai, s.admin_token)
        passing = await make_gateway(POLICY, **run.settings("pass"))
        # In passthrough, the client's own keys.
        own = {"chat": s.client_openai, "responses": s.client_openai,
               "messages": s.client_anthropic}  # fmt: skip
        await send_claims(
            run, passing, lambda d: llm_auth(d, own[d]), s.client_openai, s.client_anthropic
        )
        await stop(keyed, passing)
    await run.collect(capfd)
    run.verify(capfd, {"claims-bot"}, may_be_empty=(STDIO,))  # nothing runs as a process


# -- the in-process gateways ----------------------------------------------------------------------
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
        await call(base, "POST", path, 400, cut_short(p, dialect), {**auth, **session})
        await call(base, "POST", path, 401, body_of(p, dialect), llm_auth(dialect, wrong))
        refused = llm_auth(dialect, s.refused_provider)
        await call(base, "POST", path, 401, body_of(p, dialect), refused)
        await call(base, "POST", path, 401, body_of(p, dialect), llm_auth(dialect, s.admin_token))
        await call(base, "POST", path, 401, body_of(p, dialect), {})
        await call(base, "GET", path, 405, None, auth)
        await call(base, "POST", path, 400, body_of(p, dialect), {**auth, "Host": "evil.example"})
    auth = llm_auth("chat", key)
    count = {"model": ANTHROPIC_MODEL, "system": p.system,
             "messages": [{"role": "user", "content": p.user}]}  # fmt: skip
    await call(base, "POST", "/v1/messages/count_tokens", 200, count, llm_auth("messages", key))
    await call(base, "GET", "/v1/models", 200, None, auth)
    # The session named in the path (agents that cannot send a header).
    await call(base, "POST", "/s/keys-path/v1/chat/completions", 200, p.chat(), auth)
    # A credential in the query string, never in a header: refused, and never logged.
    query = f"/v1/chat/completions?api_key={s.refused_provider}"
    await call(base, "POST", query, (400, 401), p.chat(), {})
    await call(base, "POST", f"/v1/chat/completions?key={key}", (400, 401), p.chat(), {})
    await call(base, "POST", "/v1/chat%2Fcompletions", 400, p.chat(), auth)
    await call(base, "GET", "/no/such/path", 404, None, auth)
    # The primary pool entry refused once: the call fails over to the secondary.
    gw.fake.app[FAULTS].replace(Fault(kind="status", status=401, count=1))
    await call(base, "POST", "/v1/chat/completions", 200, p.chat(), auth)

    # Admin routes, refused: no token, a wrong one, a gateway key, a provider key, a page's
    # form post, a body that is no JSON, a field no key has, a foreign Host.
    await call(base, "GET", "/gateway/sessions", 401, None, {})
    await call(base, "GET", "/gateway/sessions", 401, None, admin_headers(s.wrong_admin_token))
    await call(base, "GET", "/gateway/sessions", 401, None, admin_headers(key))
    await call(base, "GET", "/gateway/keys", 401, None, {"x-api-key": s.refused_provider})
    page = {**admin, "Origin": "http://evil.example"}
    await call(base, "POST", "/gateway/keys", 403, {"team": "platform", "name": "x"}, page)
    form = {**admin, "Content-Type": "text/plain"}
    await call(base, "POST", "/gateway/keys", 415, b"team=platform", form)
    await call(base, "POST", "/gateway/keys", 400, b'{"team": ', admin)
    extra = {"team": "platform", "name": "x", "digest": s.pepper}
    await call(base, "POST", "/gateway/keys", 400, extra, admin)
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
    grant = {"turns": 5, "reason": "canary run"}
    await call(base, "POST", "/gateway/sessions/keys-chat/grant", 200, grant, admin)
    await call(base, "POST", "/gateway/sessions/keys-chat/end", 200, {"reason": "done"}, admin)
    ended = {**auth, "X-Gateway-Session": "keys-chat"}  # the ended session refuses the next
    await call(base, "POST", "/v1/chat/completions", (400, 403, 409, 410, 429), p.chat(), ended)
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
    await call(base, "GET", "/gateway/openapi.json", 200, None, admin)

    # Rotation: the new secret in its one answer; the previous one works, deprecated; then
    # the key revoked.
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
    """``auth.mode: passthrough``: the client's own keys go upstream; the admin token, two
    keys at once, a key the provider refuses, a credential in the query string refused."""
    call, base, s, p = run.driver.call, gw.url(""), run.secrets, run.prompts
    own = {"chat": s.client_openai, "responses": s.client_openai, "messages": s.client_anthropic}
    for dialect, path in DIALECTS:
        auth = llm_auth(dialect, own[dialect])
        if dialect == "messages":  # Claude Code logged in: its OAuth token as a bearer
            auth = {"Authorization": f"Bearer {s.client_anthropic}", "anthropic-version": "1"}
        session = {"X-Gateway-Session": f"pass-{dialect}"}
        await call(base, "POST", path, 200, body_of(p, dialect), {**auth, **session})
        await call(base, "POST", path, 200, body_of(p, dialect, stream=True), {**auth, **session})
        denied = body_of(p, dialect, model=f"{OPENAI_MODEL}-forbidden")
        await call(base, "POST", path, 400, denied, {**auth, **session})
        await call(base, "POST", path, 400, cut_short(p, dialect), auth)
        await call(base, "POST", path, 401, body_of(p, dialect), llm_auth(dialect, s.admin_token))
        await call(base, "POST", path, 400, body_of(p, dialect), {**auth, "Host": "evil.example"})
        two = {"Authorization": f"Bearer {own[dialect]}", "x-api-key": s.client_second}
        await call(base, "POST", path, 400, body_of(p, dialect), two)
    # A key the provider refuses: its 401, passed on.
    gw.fake.app[FAULTS].replace(Fault(kind="status", status=401, count=1))
    auth = llm_auth("chat", s.client_openai)
    await call(base, "POST", "/v1/chat/completions", 401, p.chat(), auth)
    query = f"/v1/chat/completions?api_key={s.client_second}"
    await call(base, "POST", query, (400, 401), p.chat(), {})
    await call(base, "GET", "/v1/models", 200, None, auth)
    await call(base, "GET", "/elsewhere", 404, None, auth)
    await call(base, "GET", "/gateway/sessions", 401, None, {"x-api-key": s.client_anthropic})
    admin = admin_headers(s.admin_token)
    await call(base, "GET", "/gateway/sessions", 200, None, admin)
    await call(base, "GET", "/gateway/sessions/pass-chat", 200, None, admin)
    await call(base, "GET", "/metrics", 200)
    sent = received_credentials(gw.fake)
    assert s.client_openai in sent and s.client_anthropic in sent
    assert s.admin_token not in sent and s.client_second not in sent


def mixed_auth(idp: IdP) -> dict[str, Any]:
    issuer = {"issuer": idp.url, "audience": [AUDIENCE], "jwks_url": f"{idp.url}/jwks",
              "algorithms": ["RS256"]}  # fmt: skip
    # The identity provider listens on loopback, which the egress guard refuses unless listed.
    return {"mode": "mixed", "jwt_issuers": [issuer], "egress_allow": ["127.0.0.1/32"]}


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
        stranger = {**bearer, "Authorization": f"Bearer {foreign}"}
        await call(base, "POST", path, 401, body_of(p, dialect), stranger)
    byok = {"Authorization": f"Bearer {s.byok}", "X-Gateway-Key": byok_key}
    await call(base, "POST", "/v1/chat/completions", 200, p.chat(), byok)
    alone = {"Authorization": f"Bearer {s.byok}"}  # without the key: a provider key, refused
    await call(base, "POST", "/v1/chat/completions", 401, p.chat(), alone)
    await call(base, "GET", "/gateway/sessions", 401, None, {"Authorization": f"Bearer {token}"})
    await call(base, "GET", "/gateway/keys", 200, None, admin_headers(s.admin_token))
    await call(base, "GET", "/metrics", 200)
    sent = received_credentials(gw.fake)
    assert s.byok in sent and token not in sent and byok_key not in sent


async def send_claims(
    run: Run, gw: Gateway, auth: Callable[[str], dict[str, str]], first: str, second: str
) -> None:
    """Secrets where a client makes claims the gateway logs and keeps: the session id, its
    name, the agent and the User-Agent (headers); the session hints and the model (body)."""
    call, base, p = run.driver.call, gw.url(""), run.prompts
    claims = {
        "X-Gateway-Session": f"sess-{first}",
        "X-Gateway-Session-Name": f"name {second}",
        "X-Gateway-Agent": f"agent-{second}",
        "User-Agent": f"claims/1.0 ({first})",
    }
    hints: dict[str, dict[str, Any]] = {
        "chat": {"user": f"user-{first}"},
        "responses": {"prompt_cache_key": f"cache-{first}", "user": f"user-{second}"},
        "messages": {"metadata": {"user_id": f"user-{first}"}},
    }
    for dialect, path in DIALECTS:
        await call(base, "POST", path, 200, body_of(p, dialect), {**auth(dialect), **claims})
        # No session header: the body's hints name the session; the User-Agent the agent.
        hinted = body_of(p, dialect, **hints[dialect])
        await call(base, "POST", path, 200, hinted, {**auth(dialect), "User-Agent": f"{second}/2"})
        denied = body_of(p, dialect, model=f"{OPENAI_MODEL}-forbidden-{first}")
        await call(base, "POST", path, 400, denied, {**auth(dialect), **claims})
        named = body_of(p, dialect, model=f"{OPENAI_MODEL}-{second}")  # served: a model label
        await call(base, "POST", path, 200, named, auth(dialect))
    # The session named in the path.
    await call(base, "POST", f"/s/path-{first}/v1/chat/completions", 200, p.chat(), auth("chat"))
    admin = admin_headers(run.secrets.admin_token)
    await call(base, "GET", "/gateway/sessions", 200, None, admin)
    await call(base, "GET", "/metrics", 200)


# -- ``gateway serve`` as a process ---------------------------------------------------------------
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


async def serve_run(run: Run, port: int) -> None:
    """``gateway serve`` in keys mode, every secret from the environment or a file, its log at
    debug on stderr, spans to an OTLP collector (a canary in the exporter's headers) and to
    the console; a key made and used, refusals, admin calls, the CLI, SIGTERM. Every output
    of the process scanned."""
    s, sinks, tmp = run.secrets, run.sinks, run.tmp_path
    config = tmp / "serve.yaml"
    settings = {
        "port": port,
        "store": sqlite(tmp / "serve.db"),
        "audit_log": str(tmp / "audit-serve.jsonl"),
        "state_dir": str(tmp / "serve-state"),
        "policy": str(tmp / "serve-policy.yaml"),
        "auth": {"mode": "keys"},
        "upstreams": upstreams(run.fake, run.pool),
    }
    await asyncio.to_thread(config.write_text, json.dumps(settings))  # JSON is YAML
    await asyncio.to_thread((tmp / "serve-policy.yaml").write_text, textwrap.dedent(POLICY))
    base = f"http://127.0.0.1:{port}"
    async with collector_server() as (collector, endpoint):
        env = {
            **clean_environment(),
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
            await healthy(run.driver.http, base, process)
            await drive_served(run, base)
            await run_cli(run, base)
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
        assert b'"trace_id"' in stdout  # and the console exporter's spans
        assert collector.bodies, "gateway serve exported no spans over OTLP"
        for index, body in enumerate(collector.bodies):
            sinks.add(SPANS, f"gateway serve OTLP export {index}", body)
        # The collector is where the exporter was told to send the header: not a sink.
        assert set(collector.authorizations) == {f"Bearer {s.otlp_header}"}


def clean_environment() -> dict[str, str]:
    """This process's environment without the gateway's and OpenTelemetry's variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OTEL_"))}


async def healthy(http: aiohttp.ClientSession, base: str, process: Any) -> None:
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
    wrong = wrong_secret(key)
    run.keys.append(gateway_key("serve wrong key", wrong))
    for dialect, path in DIALECTS:
        auth = {**llm_auth(dialect, key), "X-Gateway-Session": f"serve-{dialect}"}
        body = body_of(p, dialect)
        await call(base, "POST", path, 200, body, auth)
        await call(base, "POST", path, 200, body_of(p, dialect, stream=True), auth)
        await call(base, "POST", path, 400, body_of(p, dialect, model="x-forbidden"), auth)
        await call(base, "POST", path, 400, cut_short(p, dialect), auth)
        await call(base, "POST", path, 401, body, llm_auth(dialect, s.refused_provider))
        await call(base, "POST", path, 401, body, llm_auth(dialect, s.admin_token))
        await call(base, "POST", path, 401, body, llm_auth(dialect, wrong))
    await call(base, "GET", "/no/such/path", 404)
    await call(base, "GET", "/gateway/sessions", 401, None, admin_headers(key))
    await call(base, "GET", "/gateway/sessions", 401, None, admin_headers(s.wrong_admin_token))
    await call(base, "GET", "/gateway/sessions", 200, None, admin)
    await call(base, "GET", "/gateway/sessions/serve-chat", 200, None, admin)
    await call(base, "GET", "/gateway/credentials", 200, None, admin)
    await call(base, "POST", "/gateway/credentials/reload", 200, {"reason": "canary"}, admin)
    await call(base, "GET", "/gateway/keys", 200, None, admin)
    await call(base, "GET", "/metrics", 200)


async def run_cli(run: Run, base: str) -> None:
    """The CLI against the running gateway (its token from the environment), and ``config
    check`` of a file with a provider key written inline: every output scanned."""
    s, tmp = run.secrets, run.tmp_path
    env = {**clean_environment(), "GATEWAY_URL": base, "GATEWAY_ADMIN_TOKEN": s.admin_token}
    for command in (["keys", "list"], ["sessions", "list"], ["credentials", "status"],
                    ["credentials", "reload"], ["degrade", "status"]):  # fmt: skip
        await cli(run, command, env, 0)
    await cli(run, ["sessions", "list"], {**env, "GATEWAY_ADMIN_TOKEN": s.wrong_admin_token}, 1)
    await cli(run, ["config", "check", str(tmp / "serve.yaml")], env, 0)
    inline = tmp / "inline.yaml"
    settings = {"upstreams": {"openai": {"credentials": {
        "platform": [{"name": "primary", "value": s.refused_provider}]}}}}  # fmt: skip
    await asyncio.to_thread(inline.write_text, json.dumps(settings))
    await cli(run, ["config", "check", str(inline)], env, 1)
    await cli(run, ["serve", "--config", str(inline), "--port", "0"], env, 2)


async def cli(run: Run, args: list[str], env: dict[str, str], expect: int) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    shown = " ".join(args[:2])
    assert process.returncode == expect, f"gateway {shown}: {stderr.decode()[-2000:]}"
    run.sinks.add(STDIO, f"gateway {shown} stdout", stdout)
    run.sinks.add(STDIO, f"gateway {shown} stderr", stderr)


# -- the Redis run -------------------------------------------------------------------------------
def redis_password(name: str, password: str) -> Canary:
    """A Redis server's password (``redis_server`` draws ``redis-`` and 32 hex digits)."""
    return Canary(name, password, "redis-")


async def with_url_characters(server: RedisServer) -> str:
    """Gives ``server`` a password of characters a URL must percent-encode (``@ : / % + ? #
    & =``), as an operator's generated one may hold; the store URL with it, encoded."""
    password = "redis-" + "".join(
        secrets.choice(string.ascii_letters + "@:/%+?#&=") for _ in range(32)
    )
    await server.command("CONFIG", "SET", "requirepass", password)
    server.password = password  # what a restart and the test's own connections use
    return f"redis://:{quote(password, safe='')}@127.0.0.1:{server.port}/0"


async def redis_away_and_back(run: Run, gw: Gateway, server: RedisServer) -> None:
    """The replica's Redis stopped mid-run: calls served from memory (fail open), the outage
    in its health, log and audit; started again, the replica catches up and serves on."""
    call, base, s, p = run.driver.call, gw.url(""), run.secrets, run.prompts
    admin = admin_headers(s.admin_token)
    chat = {**llm_auth("chat", s.client_openai), "X-Gateway-Session": "pass-chat"}
    messages = {**llm_auth("messages", s.client_anthropic), "X-Gateway-Session": "pass-away"}
    await server.stop()
    await call(base, "POST", "/v1/chat/completions", 200, p.chat(), chat)
    await call(base, "POST", "/v1/messages", 200, p.messages(stream=True), messages)
    health = await call(base, "GET", "/gateway/health", 200)
    assert health.json()["status"] == "degraded", health.body
    await call(base, "GET", "/gateway/sessions", 200, None, admin)
    await call(base, "GET", "/gateway/sessions/pass-away", 200, None, admin)
    await call(base, "GET", "/metrics", 200)
    await server.start()
    deadline = time.monotonic() + 10
    while gw.server.app[appkeys.DEGRADED].holds("store"):  # reconnected, counts merged
        assert time.monotonic() < deadline, "the replica did not catch up with Redis"
        await asyncio.sleep(0.02)
    await call(base, "POST", "/v1/chat/completions", 200, p.chat(), chat)
    await call(base, "GET", "/gateway/sessions/pass-chat", 200, None, admin)


async def drive_wrong_password(run: Run, gw: Gateway) -> None:
    """A replica given a wrong Redis password: Redis refuses it, so it is degraded from the
    start and serves from its own view."""
    call, base, s, p = run.driver.call, gw.url(""), run.secrets, run.prompts
    auth = {**llm_auth("chat", s.client_openai), "X-Gateway-Session": "wrong-chat"}
    await call(base, "POST", "/v1/chat/completions", 200, p.chat(), auth)
    health = await call(base, "GET", "/gateway/health", 200)
    assert "Redis unreachable" in health.body.decode(), health.body
    await call(base, "GET", "/gateway/sessions/wrong-chat", 200, None, admin_headers(s.admin_token))


async def serve_on_redis(run: Run, port: int, server: RedisServer, url: str) -> None:
    """``gateway serve`` in keys mode on Redis, the password in the store URL of its config
    file, its log at debug on stderr: a key made and used in every dialect, a refusal, admin
    calls; SIGTERM. Its stdout (the start-up line names the store) and stderr scanned."""
    s, tmp, call, p = run.secrets, run.tmp_path, run.driver.call, run.prompts
    config, policy = tmp / "serve-redis.yaml", tmp / "serve-redis-policy.yaml"
    settings = {
        "port": port,
        "store": f"{url}?prefix=served",
        "audit_log": str(tmp / "audit-serve-redis.jsonl"),
        "state_dir": str(tmp / "serve-redis-state"),
        "policy": str(policy),
        "auth": {"mode": "keys"},
        "upstreams": upstreams(run.fake, run.pool),
    }
    await asyncio.to_thread(config.write_text, json.dumps(settings))
    await asyncio.to_thread(policy.write_text, textwrap.dedent(POLICY))
    base = f"http://127.0.0.1:{port}"
    env = {
        **clean_environment(),
        "GATEWAY_ADMIN_TOKEN": s.admin_token,
        "GATEWAY_KEY_PEPPER": s.pepper,
        "GATEWAY_LOG_LEVEL": "debug",
        POOL_ENV: s.pool_openai,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        await healthy(run.driver.http, base, process)
        key = await run.create_key(base, "redis serve-bot")
        for dialect, path in DIALECTS:
            auth = {**llm_auth(dialect, key), "X-Gateway-Session": f"served-{dialect}"}
            await call(base, "POST", path, 200, body_of(p, dialect, stream=True), auth)
        await call(base, "POST", "/v1/chat/completions", 401, p.chat(), llm_auth("chat", s.pepper))
        admin = admin_headers(s.admin_token)
        await call(base, "GET", "/gateway/sessions/served-chat", 200, None, admin)
        await call(base, "GET", "/gateway/keys", 200, None, admin)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode(errors="replace")[-3000:]
    assert f"store redis://:***@127.0.0.1:{server.port}/0".encode() in stdout  # named, masked
    run.sinks.add(STDIO, "gateway serve (redis) stdout", stdout)
    run.sinks.add(STDIO, "gateway serve (redis) stderr", stderr)


async def dump_redis(sinks: Sinks, server: RedisServer, url: str) -> None:
    """Everything ``server`` holds: every key read back by its type and as ``DUMP`` gives it
    (its RDB serialization), then every file of its directory (the append-only file)."""
    client: Any = Redis.from_url(url)  # redis-py's replies are typed loosely
    try:
        async for key in client.scan_iter(count=1000):
            kind = (await client.type(key)).decode()
            value = await read_key(client, key, kind)
            dumped = await client.dump(key) or b""
            origin = f"{kind} {key.decode(errors='replace')[:40]}"
            sinks.add(REDIS, origin, key + b"\n" + value + b"\n" + dumped)
    finally:
        await client.aclose()
    files = await asyncio.to_thread(lambda: sorted(server.directory.rglob("*.aof")))
    assert files, f"no append-only file in {server.directory}"
    for path in files:
        await read_into(sinks, REDIS, path)


async def read_key(client: Any, key: bytes, kind: str) -> bytes:
    if kind == "string":
        return bytes(await client.get(key) or b"")
    if kind == "hash":
        return b"\n".join(k + b"=" + v for k, v in (await client.hgetall(key)).items())
    if kind == "zset":
        scored = await client.zrange(key, 0, -1, withscores=True)
        return b"\n".join(member + b" " + repr(score).encode() for member, score in scored)
    if kind == "list":
        return b"\n".join(await client.lrange(key, 0, -1))
    if kind == "set":
        return b"\n".join(sorted(await client.smembers(key)))
    raise AssertionError(f"{key!r}: a {kind} the dump does not read")


@pytest.mark.parametrize("sink_names", [REDIS_SINKS], ids=["redis"])
async def test_no_secret_and_no_prompt_reaches_redis_or_any_sink(
    run: Run,
    make_gateway: MakeGateway,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    unused_tcp_port_factory: Callable[[], int],
) -> None:
    """Keys mode on a Redis whose password is in the store URL (percent-encoded); passthrough
    on another whose password comes from ``GATEWAY_REDIS_PASSWORD`` (stopped and started again
    mid-run); a replica given a wrong password; ``gateway serve`` on Redis. Then each Redis
    read back."""
    tmp = run.tmp_path
    async with redis_server(tmp / "redis-url") as by_url, redis_server(tmp / "redis-env") as by_env:
        wrong = "redis-" + secrets.token_hex(16)
        url = await with_url_characters(by_url)
        run.keys += [
            redis_password("redis password (URL)", by_url.password),
            redis_password("redis password (env)", by_env.password),
            redis_password("wrong redis password", wrong),
        ]
        monkeypatch.setenv("GATEWAY_REDIS_PASSWORD", by_env.password)
        in_url = f"{url}?prefix=keyed"
        from_env = f"{by_env.bare_url}?prefix=passing"
        refused = f"redis://:{wrong}@127.0.0.1:{by_env.port}/0?prefix=refused"
        async with serve_logging(run.log_file):
            keyed = await make_gateway(
                POLICY, **run.settings("keys", auth={"mode": "keys"}, store=in_url)
            )
            await drive_keys_mode(run, keyed)
            passing = await make_gateway(POLICY, **run.settings("pass", store=from_env))
            await drive_passthrough(run, passing)
            await redis_away_and_back(run, passing, by_env)
            stranger = await make_gateway(POLICY, **run.settings("wrong", store=refused))
            # It never gets into its Redis: at the stop it would wait all of close_timeout
            # (5 s) for it before logging what is lost.
            store = stranger.server.app[appkeys.STORE]
            assert isinstance(store, RedisStore)
            store.close_timeout = 0.3
            await drive_wrong_password(run, stranger)
            await stop(keyed, passing, stranger)
        await serve_on_redis(run, unused_tcp_port_factory(), by_url, url)
        await dump_redis(run.sinks, by_url, url)
        await dump_redis(run.sinks, by_env, by_env.url)
    await run.collect(capfd)
    handed_out = {"keys ci-bot", "keys ci-bot rotated", "redis serve-bot"}
    run.verify(capfd, handed_out, may_be_empty=(STORE,))  # no SQLite in this run


@pytest.mark.parametrize("sink_names", [REDIS_SINKS], ids=["redis"])
async def test_a_redis_password_in_the_urls_query_reaches_no_sink(
    run: Run, make_gateway: MakeGateway, capfd: pytest.CaptureFixture[str]
) -> None:
    async with redis_server(run.tmp_path / "redis-query") as server:
        run.keys.append(redis_password("redis password (query)", server.password))
        store = f"{server.bare_url}?password={server.password}&prefix=query"
        call, s, p = run.driver.call, run.secrets, run.prompts
        auth = {**llm_auth("chat", s.client_openai), "X-Gateway-Session": "query-chat"}
        async with serve_logging(run.log_file):
            gw = await make_gateway(POLICY, **run.settings("query", store=store))
            base = gw.url("")
            await call(base, "POST", "/v1/chat/completions", 200, p.chat(), auth)
            await server.stop()  # the store logs that its Redis is away, naming it
            await call(base, "POST", "/v1/chat/completions", 200, p.chat(), auth)
            await call(base, "GET", "/gateway/health", 200)
            await call(base, "GET", "/metrics", 200)
            await server.start()
            await call(base, "GET", "/gateway/sessions", 200, None, admin_headers(s.admin_token))
            await stop(gw)
        await dump_redis(run.sinks, server, server.url)
    await run.collect(capfd)
    run.verify(capfd, set(), may_be_empty=(STDIO, STORE))
    assert server.password not in display_url(store)  # what ``gateway serve`` prints at start


MALFORMED = ("redis://:{password}@127.0.0.1:notaport/0", "redis://:{password}@127.0.0.1:1/0?db=x")
"""Redis URLs redis-py refuses when the store opens: a port that is no number, a bad db."""


async def serve_malformed(store: str, cwd: Path) -> tuple[int, bytes, bytes]:
    """``gateway serve --store STORE``: its exit status, stdout and stderr."""
    env = {**clean_environment(), "GATEWAY_ADMIN_TOKEN": _admin_token()}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--store", store, "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=cwd,
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None and process.returncode != 0, "it served"
    return process.returncode, stdout, stderr


async def test_a_malformed_redis_url_never_shows_its_password(tmp_path: Path) -> None:
    password = "redis-" + secrets.token_hex(16)
    _, stdout, stderr = await serve_malformed(MALFORMED[1].format(password=password), tmp_path)
    canary = redis_password("redis password (malformed URL)", password)
    assert canary.find(stdout.decode("latin-1") + stderr.decode("latin-1")) == []


async def test_a_malformed_redis_url_is_refused_clearly(tmp_path: Path) -> None:
    password = "redis-" + secrets.token_hex(16)
    status, _, stderr = await serve_malformed(MALFORMED[0].format(password=password), tmp_path)
    assert b"Traceback" not in stderr, stderr.decode(errors="replace")[-600:]
    assert status == 2 and stderr.startswith(b"gateway: "), stderr[-600:]


# -- the scan itself -----------------------------------------------------------------------------
def test_the_scan_finds_a_canary_in_every_form_and_not_its_shown_part() -> None:
    key = "sk-proj-" + _urlsafe(56)
    canary = Canary("key", key, "sk-proj-")
    data = key.encode()
    holding = [
        f"upstream said: {key}.",
        json.dumps({"headers": {"authorization": f"Bearer {key}"}}),
        "https://example.com/?api_key=" + quote(key, safe=""),
        data.hex(),
        data.hex().upper(),
        hashlib.sha256(data).hexdigest(),
        key[:30] + "\u2026",  # cut short
        key.lower()[:40],  # an agent name made of a User-Agent
    ]
    for offset in range(3):  # inside longer base64 texts, at each alignment
        holding.append(base64.b64encode(b"Basic " + b"u" * offset + b":" + data).decode())
        holding.append(base64.urlsafe_b64encode(b"p" * offset + data + b"s").decode())
    for text in holding:
        assert canary.find(text), text
    assert canary.find("nothing here, and sk-proj- is only the shown part") == []
    gw = "gw_" + _alnum(12) + "_" + _alnum(49)
    assert gateway_key("gw", gw).find(f"the gateway key {gw[:16]}\u2026 was refused") == []
    sinks = Sinks((LOG, ADMIN))
    sinks.add(LOG, "a line", f"key={key}")
    sinks.add(ADMIN, "its one answer", f'{{"key": "{key}"}}', allows=("key",))
    found, allowed = sinks.scan([canary])
    assert [(h.sink, h.forms) for h in found] == [(LOG, ("raw",))]
    assert [h.sink for h in allowed] == [ADMIN]


# -- the control: with capture on, the same scan finds the prompt ---------------------------------
async def test_with_capture_on_the_prompt_is_found_on_spans(
    make_gateway: MakeGateway, prompts: Prompts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other side of "0 found while capture is off": the same scan finds the prompt and
    the completion once an operator turns capture on, so the spans above could have shown
    them."""
    monkeypatch.setenv(CAPTURE_ENV, "true")
    spans = InMemorySpanExporter()
    tracer = TracerProvider()
    tracer.add_span_processor(SimpleSpanProcessor(RedactingExporter(spans)))
    gw = await make_gateway(POLICY, tracer_provider=tracer)
    async with aiohttp.ClientSession() as http:
        driver = Driver(http, Sinks((CLIENT,)))
        key = "sk-proj-" + _urlsafe(56)
        await driver.call(gw.url(""), "POST", "/v1/chat/completions", 200, prompts.chat(),
                          llm_auth("chat", key))  # fmt: skip
    sinks = Sinks((SPANS,))
    for span in spans.get_finished_spans():
        sinks.add(SPANS, span.name, span.to_json())
    found, _ = sinks.scan(prompts.canaries())
    assert {hit.canary for hit in found} >= {"system prompt", "user message", "completion"}
