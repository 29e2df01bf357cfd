"""Degraded mode: by hand (admin API and CLI, audited), by itself (event-loop lag, a full span
queue, the summarizer's breaker), what it pauses (summaries, content capture, DEBUG records),
and the liveness and readiness answers."""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.app import create_app
from gateway.appkeys import DEGRADED, DRAINING, SETTINGS, SUMMARIZERS, UPSTREAMS
from gateway.audit import token_actor
from gateway.fake_provider import CONFIG
from gateway.fake_provider.faults import FAULTS, Fault
from gateway.resilience.degraded import Change, Degradation
from gateway.settings import BreakerSettings, RetrySettings, Settings
from gateway.telemetry import logs, otel_env
from gateway.telemetry.loop_lag import ENTER_SAMPLES, LEAVE_SAMPLES, LagWatch, watch_loop_lag
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.tracing import ExportWatch, Tracing, export_watch
from tests.compaction.test_overflow import send
from tests.compaction.test_sessions import POLICY, WINDOW, summary_calls
from tests.conftest import GatewayTestServer
from tests.harness import ADMIN, ADMIN_TOKEN, Gateway, MakeGateway, session_headers
from tests.telemetry.test_metrics import samples, value
from tests.test_cli import run_cli

FALLBACK = POLICY.format(window=WINDOW, strategies="summarize, truncate")
ACTOR = token_actor(ADMIN_TOKEN)
"""How the audit log and the reasons name whoever shows the tests' admin token."""
TOKEN = "op-Vb8Kq3Rw6Tz1Yx4Nm7Pd2Lc9Hf5Gs0Ja"


async def degrade(gw: Gateway, body: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(gw.url("/gateway/degrade"), json=body, headers=ADMIN) as r,
    ):
        return r.status, await r.json()


async def get(gw: Gateway | TestServer, path: str) -> tuple[int, Any]:
    """A GET with the admin token (the probes take it, and need none)."""
    url = gw.url(path) if isinstance(gw, Gateway) else gw.make_url(path)
    async with aiohttp.ClientSession() as http, http.get(url, headers=ADMIN) as r:
        return r.status, await r.json()


# -- by hand -----------------------------------------------------------------------------------
async def test_degraded_by_hand_shows_in_health_the_gauge_and_the_audit_log(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(None)
    status, answer = await degrade(gw, {"on": True, "reason": "store maintenance"})
    assert status == 200 and answer["changed"] is True
    assert answer["status"] == "degraded"
    [reason] = answer["reasons"]
    assert reason["reason"] == "manual" and reason["detail"] == "store maintenance"
    assert reason["actor"] == ACTOR and reason["since"] > 0

    status, health = await get(gw, "/gateway/health")
    assert status == 200 and health["status"] == "degraded"
    assert health["reasons"] == answer["reasons"]
    assert (await get(gw, "/gateway/ready")) == (200, {"status": "ready"})  # degraded serves
    assert value(await samples(gw), "gateway_degraded", reason="manual") == 1
    assert value(await samples(gw), "gateway_degraded", reason="loop_lag") == 0
    # Calls go on as before.
    answered = await gw.openai.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
    )
    assert answered.choices[0].message.content

    [entry] = await gw.audit_events("degraded", lambda e: e["on"] is True)
    assert entry["reason"] == "manual" and entry["detail"] == "store maintenance"
    assert entry["actor"] == ACTOR and entry["peer"] == "127.0.0.1"
    assert entry["auth"] == "token"

    assert (await degrade(gw, {"on": True, "reason": "again"}))[1]["changed"] is False
    status, answer = await degrade(gw, {"on": False, "reason": "done"})
    assert status == 200 and answer == {"status": "ok", "reasons": [], "changed": True}
    assert (await get(gw, "/gateway/health"))[1]["status"] == "ok"
    assert (await get(gw, "/gateway/degrade")) == (200, {"status": "ok", "reasons": []})
    [off] = await gw.audit_events("degraded", lambda e: e["on"] is False)
    assert off["detail"] == "done" and off["actor"] == ACTOR
    assert len(await gw.audit_events("degraded")) == 2  # the one that changed nothing: no line
    assert value(await samples(gw), "gateway_degraded", reason="manual") == 0


async def test_with_a_token_the_actor_is_its_hash(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(None, admin_token=TOKEN)
    async with aiohttp.ClientSession() as http:
        body = {"on": True, "reason": "drill"}
        for refused in ({}, ADMIN):  # none, and another token than the configured one
            async with http.post(gw.url("/gateway/degrade"), json=body, headers=refused) as r:
                assert r.status == 401
            async with http.get(gw.url("/gateway/degrade"), headers=refused) as r:
                assert r.status == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with http.post(gw.url("/gateway/degrade"), json=body, headers=auth) as r:
            assert r.status == 200
            [reason] = (await r.json())["reasons"]
    assert reason["actor"] == token_actor(TOKEN)
    [entry] = await gw.audit_events("degraded")
    assert entry["actor"] == token_actor(TOKEN)
    assert TOKEN not in gw.audit_path.read_text()
    # Health and ready stay open to the probes.
    assert (await get(gw, "/gateway/health"))[0] == 200
    assert (await get(gw, "/gateway/ready"))[0] == 200


async def test_the_cli_degrades_and_restores(
    make_gateway: MakeGateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    gw = await make_gateway(None)
    url = gw.url("").rstrip("/")
    assert await run_cli("degrade", "status", "--url", url) == 0
    assert capsys.readouterr().out == "not degraded\n"
    assert await run_cli("degrade", "on", "--reason", "db failover", "--url", url) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("degraded:\n  manual since ") and f"by {ACTOR}: db failover" in shown
    assert await run_cli("degrade", "--json", "status", "--url", url) == 0
    assert orjson.loads(capsys.readouterr().out)["reasons"][0]["detail"] == "db failover"
    assert await run_cli("degrade", "on", "--reason", "again", "--url", url) == 0
    assert capsys.readouterr().out.startswith("degraded mode by hand was already on\n")
    assert await run_cli("degrade", "off", "--reason", "failover done", "--url", url) == 0
    assert capsys.readouterr().out == "not degraded\n"
    with pytest.raises(SystemExit) as no_reason:
        await run_cli("degrade", "on", "--url", url)
    assert no_reason.value.code == 2
    entries = await gw.audit_events("degraded", lambda e: e["on"] is False)
    assert [e["detail"] for e in entries] == ["failover done"]
    assert [e["detail"] for e in await gw.audit_events("degraded")] == [
        "db failover",
        "failover done",
    ]


async def test_leaving_by_hand_keeps_what_the_gateway_detected(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(None)
    degraded = gw.server.app[DEGRADED]
    degraded.set("store", True, "writes failing for 6s")
    await degrade(gw, {"on": True, "reason": "look"})
    status, answer = await degrade(gw, {"on": False})
    assert status == 200 and answer["status"] == "degraded"
    assert [r["reason"] for r in answer["reasons"]] == ["store"]
    assert answer["reasons"][0]["actor"] == "system"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({}, "on must be true or false"),
        ({"on": "yes", "reason": "x"}, "on must be true or false"),
        ({"on": 1, "reason": "x"}, "on must be true or false"),
        ({"on": True}, "say why"),
        ({"on": True, "reason": " \n\t "}, "say why"),
        ({"on": True, "reason": 5}, "reason must be a string"),
        ({"on": True, "reason": "x", "actor": "root"}, "unknown field(s): actor"),
        ([True], "must be a JSON object"),
    ],
)
async def test_bad_degrade_bodies_are_refused(
    make_gateway: MakeGateway, body: Any, error: str
) -> None:
    gw = await make_gateway(None)
    status, answer = await degrade(gw, body)
    assert status == 400 and error in answer["error"]
    assert not gw.server.app[DEGRADED].active


async def test_the_reason_is_one_bounded_line(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(None)
    forged = 'x\n{"level":"info","message":"forged"}\r\x1b[2J' + "y" * 5000
    status, answer = await degrade(gw, {"on": True, "reason": forged})
    assert status == 200
    detail = answer["reasons"][0]["detail"]
    assert len(detail) == 500 and detail.isprintable()
    assert detail.startswith('x {"level":"info","message":"forged"} [2J')


async def test_writes_from_another_origin_or_without_json_are_refused(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(None)
    async with aiohttp.ClientSession() as http:
        page = {**ADMIN, "Origin": "http://evil.example"}
        body = {"on": True, "reason": "x"}
        async with http.post(gw.url("/gateway/degrade"), json=body, headers=page) as r:
            assert r.status == 403
        form = {**ADMIN, "Content-Type": "text/plain"}
        async with http.post(gw.url("/gateway/degrade"), data=b"{}", headers=form) as r:
            assert r.status == 415
    assert not gw.server.app[DEGRADED].active


# -- health and readiness ----------------------------------------------------------------------
async def test_health_names_each_upstream_and_its_guards(gateway: TestServer) -> None:
    status, health = await get(gateway, "/gateway/health")
    assert status == 200
    assert health["status"] == "ok" and health["reasons"] == []
    assert health["version"] and health["uptime_seconds"] >= 0
    assert health["upstreams"].keys() == {"openai", "anthropic"}
    assert health["upstreams"]["openai"] == {
        "breaker": "closed",
        "limit": 256,
        "in_flight": 0,
        "queued": 0,
        "summarizer_breaker": "closed",
    }
    gateway.app[SUMMARIZERS].by_name["anthropic"].breaker.force("open", "test")
    _, health = await get(gateway, "/gateway/health")
    assert health["upstreams"]["anthropic"]["summarizer_breaker"] == "open"
    assert health["status"] == "degraded"
    assert [r["reason"] for r in health["reasons"]] == ["summarizer"]


async def test_ready_turns_503_while_draining_and_health_stays_200(gateway: TestServer) -> None:
    assert await get(gateway, "/gateway/ready") == (200, {"status": "ready"})
    gateway.app[DRAINING].set()
    assert await get(gateway, "/gateway/ready") == (503, {"status": "draining"})
    status, health = await get(gateway, "/gateway/health")
    assert status == 200 and health["status"] == "ok"
    async with aiohttp.ClientSession() as http, http.get(gateway.make_url("/metrics")) as r:
        assert "gateway_ready 0.0" in await r.text()


# -- by itself: event-loop lag -----------------------------------------------------------------
def changes() -> tuple[Degradation, list[Change]]:
    heard: list[Change] = []
    return Degradation(heard.append), heard


def test_loop_lag_enters_after_samples_in_a_row_and_leaves_with_hysteresis() -> None:
    degraded, heard = changes()
    watch = LagWatch(degraded, bound=1.0)
    watch.sample(3.0)
    watch.sample(0.01)  # one long pause is not a loop falling behind
    for _ in range(ENTER_SAMPLES - 1):
        watch.sample(1.5)
    assert not degraded.active
    watch.sample(1.2)
    assert degraded.holds("loop_lag") and heard[-1].actor == "system"
    assert "1.20s late" in heard[-1].detail
    for _ in range(LEAVE_SAMPLES - 1):
        watch.sample(0.1)
    watch.sample(0.7)  # between half the bound and the bound: the count starts again
    for _ in range(LEAVE_SAMPLES - 1):
        watch.sample(0.1)
    assert degraded.active
    watch.sample(0.1)
    assert not degraded.active
    assert [(c.reason, c.on) for c in heard] == [("loop_lag", True), ("loop_lag", False)]


async def test_the_lag_task_feeds_its_samples_to_the_watch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gateway.telemetry import loop_lag

    monkeypatch.setattr(loop_lag, "LAG_INTERVAL", 0.001)
    seen: list[float] = []
    three = asyncio.Event()

    class Recorder(LagWatch):
        def sample(self, lag: float) -> None:
            seen.append(lag)
            if len(seen) == 3:
                three.set()

    task = asyncio.get_running_loop().create_task(
        watch_loop_lag(Metrics(), Recorder(Degradation(), 1.0))
    )
    await asyncio.wait_for(three.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all(lag >= 0 for lag in seen)


async def test_loop_lag_in_the_app_is_logged_audited_and_shown(
    make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await make_gateway(None, degraded={"loop_lag": 0.5})
    degraded = gw.server.app[DEGRADED]
    watch = LagWatch(degraded, gw.server.app[SETTINGS].degraded.loop_lag)
    with caplog.at_level(logging.INFO, logger="gateway.app"):
        for _ in range(ENTER_SAMPLES):
            watch.sample(0.8)  # injected: the loop is not held for real
        _, health = await get(gw, "/gateway/health")
        assert health["status"] == "degraded"
        assert health["reasons"][0]["reason"] == "loop_lag"
        assert health["reasons"][0]["actor"] == "system"
        for _ in range(LEAVE_SAMPLES):
            watch.sample(0.0)
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert "degraded (loop_lag)" in warning.getMessage()
    assert any(
        r.levelno == logging.INFO and "no longer degraded for loop_lag" in r.getMessage()
        for r in caplog.records
    )
    entries = await gw.audit_events("degraded", lambda e: e["on"] is False)
    assert entries and entries[0]["reason"] == "loop_lag" and entries[0]["actor"] == "system"
    [on] = await gw.audit_events("degraded", lambda e: e["on"] is True)
    assert "0.80s late" in on["detail"]


# -- by itself: the span exporter --------------------------------------------------------------
class Stuck(SpanExporter):
    """Holds the batch processor's worker in ``export`` until released (as a collector that
    does not answer would)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait(10)
        self.exported += len(spans)
        return SpanExportResult.SUCCESS


def test_a_full_span_queue_degrades_until_it_drains() -> None:
    exporter = Stuck()
    processor = BatchSpanProcessor(exporter, max_queue_size=8, max_export_batch_size=8)
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(processor)
    degraded, heard = changes()
    try:
        watch = export_watch(Tracing(provider), degraded)
        assert isinstance(watch, ExportWatch) and len(watch.queues) == 1
        tracer = provider.get_tracer("test")
        for _ in range(8):  # a first batch the worker takes, then stays in export with
            tracer.start_span("s").end()
        assert exporter.entered.wait(10)
        watch.check()
        assert not degraded.active
        for _ in range(12):  # the queue fills: the rest are dropped
            tracer.start_span("s").end()
        watch.check()
        assert degraded.holds("span_exporter")
        assert "spans are being dropped" in heard[-1].detail
        exporter.release.set()
        assert processor.force_flush(10_000)
        watch.check()
        assert not degraded.active
    finally:
        exporter.release.set()
        provider.shutdown()
    assert [(c.reason, c.on) for c in heard] == [("span_exporter", True), ("span_exporter", False)]


def test_without_a_batch_processor_there_is_nothing_to_watch() -> None:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    assert export_watch(Tracing(provider), Degradation()) is None
    assert export_watch(Tracing(), Degradation()) is None
    assert otel_env.span_queues(object()) == []
    provider.shutdown()


# -- what it pauses: summaries -----------------------------------------------------------------
async def test_an_open_summarizer_breaker_skips_summaries_and_degrades(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(FALLBACK)
    gw.fake.app[CONFIG].context_window = WINDOW
    gw.server.app[SUMMARIZERS].by_name["openai"].breaker.force("open", "drill")
    assert gw.server.app[DEGRADED].holds("summarizer")

    status, headers, body = await send(gw, "chat", "skipped")
    assert status == 200, body
    compacted = headers["X-Gateway-Compacted"]
    assert compacted.startswith("truncate;")
    assert "failed=summarize: skipped: the summarizer's breaker for openai is open" in compacted
    assert summary_calls(gw) == []
    record = await gw.record("skipped")
    assert record.compactions[-1]["failures"][0].startswith("summarize: skipped:")
    found = await samples(gw)
    assert value(found, "gateway_compactions_total", strategy="summarize", outcome="skipped") == 1
    assert value(found, "gateway_compactions_total", strategy="truncate", outcome="applied") == 1
    assert value(found, "gateway_degraded", reason="summarizer") == 1
    [entry] = await gw.audit_events("degraded")
    assert entry["reason"] == "summarizer" and entry["on"] is True
    assert "openai" in entry["detail"] and entry["actor"] == "system"

    # The other upstream's summaries go on: the reason alone skips only the open breaker's.
    status, headers, _ = await send(gw, "messages", "other")
    assert status == 200 and headers["X-Gateway-Compacted"].startswith("summarize;")


async def test_degraded_for_any_other_reason_skips_summaries(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(FALLBACK)
    gw.fake.app[CONFIG].context_window = WINDOW
    await degrade(gw, {"on": True, "reason": "drill"})
    status, headers, body = await send(gw, "responses", "paused")
    assert status == 200, body
    compacted = headers["X-Gateway-Compacted"]
    assert compacted.startswith("truncate;")
    assert "failed=summarize: skipped: the gateway runs degraded (manual)" in compacted
    assert summary_calls(gw) == []

    await degrade(gw, {"on": False})
    status, headers, _ = await send(gw, "responses", "resumed")
    assert status == 200 and headers["X-Gateway-Compacted"].startswith("summarize;")


async def test_failing_summaries_open_the_breaker_and_a_probe_closes_it(
    make_gateway: MakeGateway, settings: Settings
) -> None:
    """The summary call's own breaker: two 500s open it (the agents' upstream breaker stays
    closed), summaries are skipped while it is open, and after its open period one probe
    closes it and the gateway leaves degraded mode."""
    openai = settings.upstreams["openai"].model_copy(
        update={
            "breaker": BreakerSettings(failures=2, open=0.2),
            "retry": RetrySettings(attempts=1),
        }
    )
    gw = await make_gateway(FALLBACK, upstreams={**settings.upstreams, "openai": openai})
    gw.fake.app[CONFIG].context_window = WINDOW
    app = gw.server.app
    for n in range(2):  # each turn's first request upstream is its summary call
        gw.fake.app[FAULTS].add(Fault("status", status=500, count=1))
        status, headers, body = await send(gw, "chat", f"failing-{n}")
        assert status == 200, body
        assert "failed=summarize: upstream answered 500" in headers["X-Gateway-Compacted"]
    assert app[SUMMARIZERS].by_name["openai"].breaker.state == "open"
    assert app[DEGRADED].holds("summarizer")
    assert app[UPSTREAMS].by_name["openai"].breaker.state == "closed"

    tried = len(summary_calls(gw))  # the two that failed reached the provider
    status, headers, _ = await send(gw, "chat", "while-open")
    assert "failed=summarize: skipped:" in headers["X-Gateway-Compacted"]
    assert len(summary_calls(gw)) == tried

    await asyncio.sleep(0.25)
    status, headers, _ = await send(gw, "chat", "probe")
    assert status == 200 and headers["X-Gateway-Compacted"].startswith("summarize;")
    assert app[SUMMARIZERS].by_name["openai"].breaker.state == "closed"
    assert not app[DEGRADED].active
    assert [e["on"] for e in await gw.audit_events("degraded")] == [True, False]


# -- what it pauses: content capture and DEBUG records -----------------------------------------
async def test_content_capture_pauses_while_degraded(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(otel_env.CAPTURE_ENV, "true")
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    gw = await make_gateway(None, tracer_provider=provider)

    async def captured(session: str) -> set[str]:
        exporter.clear()
        await gw.openai.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "the violet heron"}],
            extra_headers=session_headers(session),
        )
        return {k for s in exporter.get_finished_spans() for k in (s.attributes or {})}

    assert "gen_ai.input.messages" in await captured("open")
    await degrade(gw, {"on": True, "reason": "exporter slow"})
    paused = await captured("paused")
    assert "gen_ai.input.messages" not in paused and "gen_ai.output.messages" not in paused
    assert "gen_ai.request.model" in paused  # the span itself is still made
    await degrade(gw, {"on": False})
    assert "gen_ai.output.messages" in await captured("again")
    provider.shutdown()


def test_debug_records_pause_while_degraded() -> None:
    degraded = Degradation()
    records: logs.Queue = queue.SimpleQueue()
    handler = logs._Enqueue(records)
    root = logging.getLogger()
    root.addHandler(handler)
    request_log = logs.RequestLog()
    request_log.degraded = degraded
    try:
        request_log.attach()
        assert request_log.lines is records
        probe = logging.getLogger("gateway.test_degraded")
        probe.setLevel(logging.DEBUG)
        probe.debug("first")
        degraded.set("manual", True, "drill")
        probe.debug("dropped")
        probe.info("kept")
        degraded.set("manual", False)
        probe.debug("last")
        request_log.detach()
        assert handler.filters == []
    finally:
        root.removeHandler(handler)
    seen: list[str] = []
    while not records.empty():
        item = records.get()
        if isinstance(item, logging.LogRecord) and item.name == "gateway.test_degraded":
            seen.append(item.getMessage())
    assert seen == ["first", "kept", "last"]


# -- hostile bodies ----------------------------------------------------------------------------
class AdminOnly:
    """A gateway on an event loop of its own (hypothesis drives examples from a plain
    function), for admin calls only."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.http = self.run(self._start())

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    async def _start(self) -> tuple[TestServer, aiohttp.ClientSession]:
        configured = Settings(store="memory://", admin_token=ADMIN_TOKEN)
        server = GatewayTestServer(create_app(configured))
        await server.start_server()
        return server, aiohttp.ClientSession()

    async def _post(self, body: bytes) -> tuple[int, bytes]:
        headers = {**ADMIN, "Content-Type": "application/json"}
        url = self.server.make_url("/gateway/degrade")
        async with self.http.post(url, data=body, headers=headers) as r:
            return r.status, await r.read()

    def post(self, body: bytes) -> tuple[int, Any]:
        status, raw = self.run(asyncio.wait_for(self._post(body), 20))
        return status, orjson.loads(raw)

    def close(self) -> None:
        async def stop() -> None:
            await self.http.close()
            await self.server.close()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def admin_only() -> Iterator[AdminOnly]:
    running = AdminOnly()
    yield running
    running.close()


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()  # any integer; infinities as the invalid JSON they are


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
BODIES = st.one_of(
    st.binary(max_size=300),
    JSON.map(dumps),
    st.fixed_dictionaries({"on": JSON, "reason": JSON}, optional={"x": JSON, "by": JSON}).map(
        dumps
    ),
    st.fixed_dictionaries({"on": st.booleans(), "reason": st.text(max_size=2000)}).map(dumps),
    st.integers(1, 2000).map(lambda n: b'{"on": true, "reason": ' + b"[" * n + b"]" * n + b"}"),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=BODIES)
def test_hostile_degrade_bodies_get_a_400_never_a_500(admin_only: AdminOnly, body: bytes) -> None:
    status, answer = admin_only.post(body)
    assert status in (200, 400), (status, answer, body[:200])
    if status == 400:
        assert isinstance(answer["error"], str) and len(answer["error"]) < 400
    else:
        for reason in answer["reasons"]:
            assert len(reason["detail"]) <= 500 and reason["detail"].isprintable()


def test_the_readme_names_the_cli() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "### Degraded mode" in readme
    for command in ("gateway degrade on", "gateway degrade off", "gateway degrade status"):
        assert command in readme
