"""A stop and a restart lose nothing (``gateway.server``): on SIGTERM the gateway is marked
draining first, the calls in flight finish, a call still running at the drain deadline is cut
and accounted as far as it got (``drain_cut``), the store, the spans and the audit log are
flushed, the process exits 0, and a gateway started again on the same SQLite file has every
turn. (The stop's log lines and the second signal: ``test_server.py``.)"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import httpx2
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from gateway.app import create_app
from gateway.appkeys import DRAINING, METRICS
from gateway.fake_provider import CONFIG, FakeProviderConfig
from gateway.server import serve
from gateway.settings import Settings
from gateway.store import MemoryStore
from tests.conftest import ANTHROPIC_MODEL, received
from tests.harness import ADMIN, ADMIN_TOKEN
from tests.test_server import Served, serve_process, stop_lines  # noqa: F401 (a fixture)

SESSION = "drain-session"


def upstreams(fake_provider: TestServer) -> dict[str, str]:
    """The served gateway's upstreams (the fake provider), and its admin token."""
    return {
        "GATEWAY_OPENAI_UPSTREAM": str(fake_provider.make_url("/v1")),
        "GATEWAY_ANTHROPIC_UPSTREAM": str(fake_provider.make_url("")).rstrip("/"),
        "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
    }


async def session_record(served: Served, session: str = SESSION) -> dict[str, Any]:
    """The session as the admin API shows it."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{served.url}/gateway/sessions/{session}", headers=ADMIN) as answer,
    ):
        assert answer.status == 200, await answer.text()
        record: dict[str, Any] = await answer.json()
        return record


def read_lines(path: Path) -> list[dict[str, Any]]:
    """A JSON-lines file (call through ``asyncio.to_thread``: a file read blocks)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def request_lines(served: Served) -> list[dict[str, Any]]:
    return [line for line in served.lines if line["logger"] == "gateway.requests"]


# -- SIGTERM during a stream, then a restart on the same store ---------------------------------
async def test_a_stream_in_flight_at_sigterm_finishes_and_a_restart_has_every_turn(
    serve_process: Callable[..., Any],  # noqa: F811 (the fixture imported above)
    fake_provider: TestServer,
    tmp_path: Path,
) -> None:
    fake_provider.app[CONFIG].chunk_delay = 0.1  # a stream of about 1.5 s
    store = f"sqlite:///{tmp_path / 'gateway.db'}"
    audit = tmp_path / "audit.jsonl"
    env = {**upstreams(fake_provider), "GATEWAY_AUDIT_LOG": str(audit)}
    served = await serve_process("--store", store, **env)
    client = openai.AsyncOpenAI(
        base_url=f"{served.url}/s/{SESSION}/v1", api_key="sk-restart", max_retries=0
    )
    messages: Any = [{"role": "user", "content": "hi"}]
    seen = 0  # the tokens the client was told of, every turn
    for _ in range(2):
        answer = await client.chat.completions.create(model="gpt-4o", messages=messages)
        assert answer.usage is not None
        seen += answer.usage.total_tokens
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    text, stopping = [], None
    async for chunk in stream:
        if stopping is None:  # the answer has begun: SIGTERM with the stream in flight
            stopping = asyncio.ensure_future(served.stop())
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            seen += chunk.usage.total_tokens
    await client.close()
    assert stopping is not None
    _, lines = await stopping  # exit status 0, checked by stop()
    # The whole answer reached the client, as the provider sent it.
    assert "".join(text) == FakeProviderConfig().reply_text
    begin, end = stop_lines(lines)
    assert begin["in_flight"] == 1
    assert (end["in_flight"], end["finished"], end["cut"]) == (1, 1, 0)
    assert [line["outcome"] for line in request_lines(served)] == ["ok", "ok", "ok"]

    again = await serve_process("--store", store, **env)
    record = await session_record(again)
    assert record["turns"] == 3
    assert record["tokens"]["total_tokens"] == seen
    assert record["estimated_turns"] == 0 and record["upstream_errors"] == 0
    assert record["in_flight"] == 0 and record["reserved_tokens"] == 0
    await again.stop()

    entries = await asyncio.to_thread(read_lines, audit)
    events = [entry["event"] for entry in entries]
    assert events.count("policy_loaded") == 2  # one per start
    [first_stop, _] = [entry for entry in entries if entry["event"] == "shutdown"]
    assert first_stop["actor"] == "system" and first_stop["reason"] == "SIGTERM received"
    assert first_stop["in_flight"] == 1 and first_stop["drain_timeout"] == 30.0


class SpanSink:
    """An OTLP/HTTP receiver: the spans a gateway exported, decoded."""

    def __init__(self) -> None:
        self.exports: list[bytes] = []

    async def traces(self, request: web.Request) -> web.Response:
        self.exports.append(await request.read())
        return web.Response(body=b"", content_type="application/x-protobuf")

    def server_spans(self) -> list[dict[str, Any]]:
        """Each SERVER span's attributes (strings, numbers, booleans)."""
        spans = []
        for body in self.exports:
            export = ExportTraceServiceRequest.FromString(body)
            for resource in export.resource_spans:
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        if span.kind != span.SPAN_KIND_SERVER:
                            continue
                        spans.append(
                            {a.key: _value(a.value) for a in span.attributes} | {"": span.name}
                        )
        return spans


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind in ("string_value", "int_value", "bool_value") else None


@pytest.fixture
async def span_sink(aiohttp_server: Any) -> AsyncIterator[tuple[SpanSink, str]]:
    sink = SpanSink()
    app = web.Application()
    app.router.add_post("/v1/traces", sink.traces)
    server: TestServer = await aiohttp_server(app)
    yield sink, str(server.make_url("")).rstrip("/")


async def test_a_stream_past_the_drain_deadline_is_cut_and_accounted_as_far_as_it_got(
    serve_process: Callable[..., Any],  # noqa: F811 (the fixture imported above)
    fake_provider: TestServer,
    span_sink: tuple[SpanSink, str],
    tmp_path: Path,
) -> None:
    fake_provider.app[CONFIG].chunk_delay = 0.4  # a stream of several seconds
    sink, collector = span_sink
    store = f"sqlite:///{tmp_path / 'gateway.db'}"
    audit = tmp_path / "audit.jsonl"
    env = {
        **upstreams(fake_provider),
        "GATEWAY_AUDIT_LOG": str(audit),
        "GATEWAY_DRAIN_TIMEOUT": "0.5",
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        # Only the stop's flush exports: a span seen at the sink was flushed at exit.
        "OTEL_BSP_SCHEDULE_DELAY": "600000",
    }
    served = await serve_process("--store", store, **env)
    client = anthropic.AsyncAnthropic(
        base_url=f"{served.url}/s/{SESSION}", api_key="sk-ant-drain", max_retries=0
    )
    stopping = None
    reported_input = None
    with pytest.raises((httpx2.HTTPError, anthropic.APIError)):  # cut: never a whole answer
        async with client.messages.stream(
            model=ANTHROPIC_MODEL, max_tokens=256, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            async for event in stream:
                if event.type == "message_start":
                    reported_input = event.message.usage.input_tokens
                if event.type == "content_block_delta" and stopping is None:
                    stopping = asyncio.ensure_future(served.stop())
    await client.close()
    assert stopping is not None and reported_input
    took, lines = await stopping  # exit status 0, checked by stop()
    assert took < 4.0
    _, end = stop_lines(lines)
    assert (end["in_flight"], end["finished"], end["cut"]) == (1, 0, 1)
    # Logged, and so accounted, before the stop ended: the stop's cut, not an upstream failure.
    [request] = request_lines(served)
    assert (request["status"], request["outcome"]) == (200, "drain_cut")
    assert request["usage_estimated"] is True
    assert served.lines.index(request) < served.lines.index(end)
    # The spans were flushed on the way out.
    [span] = sink.server_spans()
    assert span["gateway.outcome"] == "drain_cut"

    again = await serve_process("--store", store, **upstreams(fake_provider))
    record = await session_record(again)
    await again.stop()
    assert record["turns"] == 1 and record["estimated_turns"] == 1
    assert record["upstream_errors"] == 0  # the stop cut it, the upstream did nothing wrong
    # The input the provider stated at the start of the stream is kept; the output so far is
    # estimated from the text the client was sent.
    assert record["tokens"]["input_tokens"] == reported_input
    assert record["tokens"]["output_tokens"] > 0
    assert record["in_flight"] == 0 and record["reserved_tokens"] == 0
    events = [entry["event"] for entry in await asyncio.to_thread(read_lines, audit)]
    assert events[0] == "policy_loaded" and events[-1] == "shutdown"


# -- in process: `serve` with its signal handlers captured -------------------------------------
@pytest.fixture
async def signals(monkeypatch: pytest.MonkeyPatch) -> dict[int, Callable[[], None]]:
    """The handlers ``serve`` installs, to call by hand: no real signal reaches the tests."""
    handlers: dict[int, Callable[[], None]] = {}
    loop = asyncio.get_running_loop()

    def add(sig: int, callback: Callable[..., None], *args: Any) -> None:
        handlers[sig] = lambda: callback(*args)

    monkeypatch.setattr(loop, "add_signal_handler", add)
    monkeypatch.setattr(loop, "remove_signal_handler", lambda sig: handlers.pop(sig, 0) != 0)
    return handlers


async def serving(app: web.Application, port: int) -> asyncio.Task[None]:
    task = asyncio.get_running_loop().create_task(serve(app, "127.0.0.1", port))
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            assert not task.done(), task
            try:
                async with http.get(f"http://127.0.0.1:{port}/gateway/health") as health:
                    if health.status == 200:
                        return task
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("serve did not answer /gateway/health")


async def test_the_first_signal_marks_the_gateway_draining_before_the_stream_ends(
    signals: dict[int, Callable[[], None]],
    settings: Settings,
    fake_provider: TestServer,
    unused_tcp_port_factory: Callable[[], int],
) -> None:
    fake_provider.app[CONFIG].chunk_delay = 0.05
    store = MemoryStore()
    app = create_app(settings, store=store)
    port = unused_tcp_port_factory()
    task = await serving(app, port)
    assert not app[DRAINING].is_set()
    ready = app[METRICS].registry.get_sample_value
    assert ready("gateway_ready") == 1.0
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    url = f"http://127.0.0.1:{port}/s/{SESSION}/v1/chat/completions"
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, json=body, headers={"Authorization": "Bearer sk-x"}) as resp,
    ):
        await resp.content.readline()
        signals[signal.SIGTERM]()
        # At once, while the call still runs: /gateway/ready and gateway_ready say not ready.
        assert app[DRAINING].is_set() and not resp.content.at_eof()
        assert ready("gateway_ready") == 0.0
        rest = await resp.content.read()
    assert rest.rstrip().endswith(b"data: [DONE]")
    await asyncio.wait_for(task, 10)
    record = await store.get(SESSION)
    assert record is not None and record.turns == 1 and record.in_flight == 0
    assert record.estimated_turns == 0


async def test_a_call_with_no_answer_yet_at_the_deadline_is_cut_as_the_stops_doing(
    signals: dict[int, Callable[[], None]],
    settings: Settings,
    fake_provider: TestServer,
    unused_tcp_port_factory: Callable[[], int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The upstream has not answered when the drain ends: the client's connection closes
    (the SDKs retry that), the turn is ended and its reservation freed, and the call counts
    as cut by the stop (503, ``drain_cut``), not as an upstream failure (502)."""
    store = MemoryStore()
    app = create_app(settings.model_copy(update={"drain_timeout": 0.2}), store=store)
    port = unused_tcp_port_factory()
    task = await serving(app, port)
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/s/{SESSION}/v1", api_key="sk-x", max_retries=0
    )
    call = asyncio.ensure_future(
        client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-scenario": "slow:30"},
        )
    )
    for _ in range(200):
        if received(fake_provider):
            break
        await asyncio.sleep(0.02)
    assert received(fake_provider), "the call never reached the upstream"
    caplog.set_level("INFO", logger="gateway.requests")
    signals[signal.SIGTERM]()
    with pytest.raises(openai.APIConnectionError):
        await call
    await client.close()
    await asyncio.wait_for(task, 10)
    [line] = [r for r in caplog.records if r.name == "gateway.requests"]
    assert getattr(line, "outcome", None) == "drain_cut"
    record = await store.get(SESSION)
    assert record is not None and record.turns == 1
    assert record.in_flight == 0 and record.reserved_tokens == 0
    answered = [
        (sample.labels["status_class"], sample.labels["source"], sample.value)
        for family in app[METRICS].registry.collect()
        if family.name == "gateway_requests"
        for sample in family.samples
        if sample.name == "gateway_requests_total" and sample.value
    ]
    assert answered == [("5xx", "gateway", 1.0)]
    value = app[METRICS].registry.get_sample_value
    for reason in ("unreachable", "timeout", "cut", "http_5xx"):
        assert not value("gateway_upstream_errors_total", {"provider": "openai", "reason": reason})
