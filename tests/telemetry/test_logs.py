"""One JSON line per request: ids, figures and outcomes, never content or keys."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.telemetry.logs import JSONFormatter
from tests.harness import MakeGateway, session_headers
from tests.policy.apis import call
from tests.telemetry.test_metrics import scrape


async def test_each_request_is_one_json_line(
    make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    gw = await make_gateway(
        "version: 1\ndefaults: {limits: {max_turns: 1}}\n", tracer_provider=provider
    )
    caplog.set_level(logging.INFO, logger="gateway.requests")
    headers = session_headers("logged")
    assert (await call(gw, "chat", headers, text="the secret plan")).ok
    # The same key again (a session belongs to its key): over max_turns.
    assert not (await call(gw, "chat", headers, text="the secret plan")).ok

    records = [r for r in caplog.records if r.name == "gateway.requests"]
    assert len(records) == 2
    lines = [json.loads(JSONFormatter().format(r)) for r in records]
    ok, refused = lines
    assert ok["session_id"] == "logged" and ok["agent"] == "openai-python"
    assert ok["model"] == "gpt-4o" and ok["status"] == 200 and ok["decision"] == "allowed"
    assert ok["input_tokens"] > 0 and ok["output_tokens"] > 0 and ok["turn"] == 1
    assert ok["duration_ms"] >= ok["upstream_ms"] > 0
    spans = {format(s.context.trace_id, "032x") for s in exporter.get_finished_spans()}
    assert ok["trace_id"] in spans
    assert refused["status"] == 400 and refused["decision"] == "rejected"
    assert (refused["limit"], refused["rule"]) == ("max_turns", "defaults")
    text = "\n".join(JSONFormatter().format(r) for r in records)
    assert "secret plan" not in text and "sk-" not in text
    provider.shutdown()


async def test_latency_exemplars_carry_the_trace_id(make_gateway: MakeGateway) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    gw = await make_gateway(None, tracer_provider=provider)
    assert (await call(gw, "chat", session_headers("exemplar"))).ok
    [server] = [s for s in exporter.get_finished_spans() if s.name.startswith("POST")]
    trace_id = format(server.context.trace_id, "032x")

    _, text = await scrape(gw, "application/openmetrics-text; version=1.0.0")
    duration = [
        line for line in text.splitlines() if "gateway_request_duration_seconds_bucket" in line
    ]
    assert any(f'trace_id="{trace_id}"' in line for line in duration)
    provider.shutdown()


def test_the_writer_thread_writes_every_record_in_batches() -> None:
    import io
    import queue

    from gateway.telemetry.logs import LogWriter, RequestLine

    records: queue.SimpleQueue[logging.LogRecord | RequestLine] = queue.SimpleQueue()
    writer = LogWriter(records, JSONFormatter())
    writer.stream = stream = io.StringIO()
    writer.start()
    records.put((time.time(), {"session_id": "s1"}))
    deadline = time.monotonic() + 5
    while not stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)  # the writer's timer, not the record, makes it write
    assert json.loads(stream.getvalue())["session_id"] == "s1"

    for _ in range(1000):
        records.put(
            logging.LogRecord("gateway.requests", logging.INFO, "", 0, "request", None, None)
        )
    writer.stop()  # writes what is left
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1001
    assert json.loads(lines[-1])["logger"] == "gateway.requests"


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_the_configured_writer_formats_request_lines(
    make_gateway: MakeGateway, fmt: str
) -> None:
    """With the writer running (``gateway serve``), a request line skips ``logging`` and is
    formatted on the writer thread, in the configured format."""
    import io

    from gateway.telemetry import logs

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    writer = logs.configure("info", fmt)
    writer.stream = stream = io.StringIO()
    try:
        gw = await make_gateway(None)
        assert (await call(gw, "chat", session_headers("direct"), text="the secret plan")).ok
    finally:
        await asyncio.to_thread(writer.stop)  # joins the thread: not on the loop
        root.handlers[:] = handlers
        root.setLevel(level)
    text = stream.getvalue()
    assert "secret plan" not in text and "sk-" not in text
    if fmt == "json":
        lines = [json.loads(line) for line in text.splitlines()]
        [line] = [line for line in lines if line["logger"] == "gateway.requests"]
        assert line["message"] == "request" and line["level"] == "info"
        assert line["session_id"] == "direct" and line["status"] == 200
        assert line["time"].endswith("Z") and line["input_tokens"] > 0
    else:
        [line] = [line for line in text.splitlines() if " gateway.requests request " in line]
        assert " INFO " in line and "session_id=direct" in line and "status=200" in line


async def test_a_huge_model_name_makes_a_short_line(
    make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """A 200 KB model name once made a 230 KB log line; a 6 KB agent name rode along."""
    gw = await make_gateway(None)
    caplog.set_level(logging.INFO, logger="gateway.requests")
    headers = session_headers("huge", **{"X-Gateway-Agent": "a" * 6000})
    await call(gw, "chat", headers, model="gpt-" + "x" * 200_000)
    [record] = [r for r in caplog.records if r.name == "gateway.requests"]
    line = JSONFormatter().format(record)
    assert len(line) < 2000
    fields = json.loads(line)
    assert len(fields["model"]) == 128 and fields["model"].endswith("\u2026")
    assert len(fields["agent"]) <= 128


def test_the_request_log_joins_the_configured_writers_queue() -> None:
    """The app's ``RequestLog`` holds the writer's queue (no module-level state): found on the
    root logger at start-up, dropped at cleanup; without a writer, lines go through logging."""
    from gateway.telemetry import logs

    requests = logs.RequestLog()
    requests.attach()
    assert requests.lines is None  # no writer: the gateway.requests logger
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    writer = logs.configure("info", "json")
    try:
        requests.attach()
        assert requests.lines is writer.records
        requests.detach()
        assert requests.lines is None
    finally:
        writer.stop()
        root.handlers[:] = handlers
        root.setLevel(level)
