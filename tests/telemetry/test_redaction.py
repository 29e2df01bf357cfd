"""Redaction in the sinks: a log line (JSON and text, records and request lines) and a span
(name, attributes, events, links, status, resource) carrying a loaded secret's value or a
provider key's shape come out ``[REDACTED]``; each redaction is counted by sink and shown on
``/metrics`` as ``gateway_redactions_total``."""

from __future__ import annotations

import io
import json
import logging
import queue
import sys
import time
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, Status, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from gateway.redact import REDACTOR, REPLACEMENT, SINKS
from gateway.secret import Secret
from gateway.telemetry import otel_env
from gateway.telemetry.logs import JSONFormatter, LogWriter, RequestLine, TextFormatter
from gateway.telemetry.redacting import RedactingExporter
from tests.harness import MakeGateway, session_headers
from tests.policy.apis import call
from tests.telemetry.test_metrics import scrape

CANARY = Secret("canary-sink-5d1e8b7a42c9")
"""A loaded secret: the redactor knows its exact value from here on."""
CANARY_VALUE = CANARY.reveal()
PROVIDER_KEY = "sk-ant-api03-" + "Zq7" * 15
"""Not loaded anywhere: redacted for its shape."""


def counted(sink: str) -> int:
    return REDACTOR.counts[sink]


def leaks(text: str) -> list[str]:
    return [s for s in (CANARY_VALUE, PROVIDER_KEY) if s in text]


def record_with_secrets() -> logging.LogRecord:
    record = logging.LogRecord(
        "gateway.test", logging.ERROR, __file__, 1, "upstream said %s", (PROVIDER_KEY,), None
    )
    record.__dict__.update(
        {
            "credential": CANARY_VALUE,
            "nested": {"headers": [f"Bearer {PROVIDER_KEY}"], "count": 3},
            "odd": ValueError(f"bad key {CANARY_VALUE}"),  # written as its text
        }
    )
    try:
        raise RuntimeError(f"refused {CANARY_VALUE}")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    return record


def test_a_json_log_record_is_redacted_field_by_field() -> None:
    before = counted("log")
    line = JSONFormatter().format(record_with_secrets())
    assert leaks(line) == []
    parsed = json.loads(line)  # still one JSON object
    assert parsed["message"] == f"upstream said {REPLACEMENT}"
    assert parsed["credential"] == REPLACEMENT
    assert parsed["nested"] == {"headers": [REPLACEMENT], "count": 3}
    assert parsed["odd"] == f"bad key {REPLACEMENT}"
    assert f"refused {REPLACEMENT}" in parsed["exception"]
    assert parsed["level"] == "error" and parsed["logger"] == "gateway.test"
    assert counted("log") - before == 5


def test_a_text_log_record_is_redacted() -> None:
    before = counted("log")
    line = TextFormatter().format(record_with_secrets())
    assert leaks(line) == []
    assert f"upstream said {REPLACEMENT}" in line and f"refused {REPLACEMENT}" in line
    assert counted("log") - before == 2  # the message and the traceback: extras are not shown


@pytest.mark.parametrize("formatter", [JSONFormatter(), TextFormatter()], ids=["json", "text"])
def test_request_lines_are_redacted_on_the_writer_thread(
    formatter: JSONFormatter | TextFormatter,
) -> None:
    records: queue.SimpleQueue[logging.LogRecord | RequestLine] = queue.SimpleQueue()
    writer = LogWriter(records, formatter)
    writer.stream = stream = io.StringIO()
    before = counted("log")
    writer.start()
    records.put((time.time(), {"session_id": CANARY_VALUE, "agent": PROVIDER_KEY, "turn": 2}))
    records.put(record_with_secrets())
    writer.stop()  # writes what is left, then joins
    text = stream.getvalue()
    assert leaks(text) == [] and text.count(REPLACEMENT) >= 3
    assert counted("log") - before >= 3
    if isinstance(formatter, JSONFormatter):
        request = json.loads(text.splitlines()[0])
        assert (request["session_id"], request["agent"], request["turn"]) == (
            REPLACEMENT,
            REPLACEMENT,
            2,
        )


@pytest.fixture
def exported() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """A provider whose one exporter sits behind the redacting wrapper, as the gateway's do;
    at most 4 attributes a span, so that some are dropped."""
    exporter = InMemorySpanExporter()
    resource = Resource.create({"service.name": "gw", "deployment.token": CANARY_VALUE})
    provider = TracerProvider(resource=resource, span_limits=SpanLimits(max_span_attributes=4))
    provider.add_span_processor(SimpleSpanProcessor(RedactingExporter(exporter)))
    yield provider, exporter
    provider.shutdown()


def test_a_span_is_exported_redacted(
    exported: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = exported
    tracer = provider.get_tracer("test")
    before = counted("span")
    with tracer.start_as_current_span("linked") as other:
        pass
    link = Link(other.get_span_context(), {"why": f"token {CANARY_VALUE}"})
    span = tracer.start_span(f"chat {PROVIDER_KEY}", links=[link])
    span.set_attribute("dropped.one", "the oldest")  # dropped by the SDK at the fifth
    span.set_attribute("gen_ai.request.model", PROVIDER_KEY)
    span.set_attribute("gen_ai.conversation.id", f"session-{CANARY_VALUE}")
    span.set_attribute("gen_ai.request.stop_sequences", ["stop", CANARY_VALUE])
    span.set_attribute("gen_ai.usage.input_tokens", 12)
    span.add_event("gateway.policy.decision", {"reason": f"key {PROVIDER_KEY}", "turn": 3})
    span.set_status(Status(StatusCode.ERROR, f"upstream refused {CANARY_VALUE}"))
    span.end()
    [_, out] = exporter.get_finished_spans()
    text = repr(out.to_json())
    assert leaks(text) == []
    assert out.name == f"chat {REPLACEMENT}"
    assert dict(out.attributes or {}) == {
        "gen_ai.request.model": REPLACEMENT,
        "gen_ai.conversation.id": f"session-{REPLACEMENT}",
        "gen_ai.request.stop_sequences": ("stop", REPLACEMENT),
        "gen_ai.usage.input_tokens": 12,
    }
    assert out.dropped_attributes == 1  # the SDK's count survives the copy
    [event] = out.events
    assert dict(event.attributes or {}) == {"reason": f"key {REPLACEMENT}", "turn": 3}
    assert dict(out.links[0].attributes or {}) == {"why": f"token {REPLACEMENT}"}
    assert out.status.description == f"upstream refused {REPLACEMENT}"
    assert out.resource.attributes["deployment.token"] == REPLACEMENT
    assert out.context == span.get_span_context() and out.kind == span.kind
    # name, 3 attributes, event, link, status; the resource once per exporter (2 spans)
    assert counted("span") - before == 8


def test_a_span_with_nothing_to_redact_is_handed_on_as_it_is() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("chat gpt-4o") as span:
        span.set_attribute("gen_ai.request.model", "gpt-4o")
        span.add_event("gateway.compaction", {"strategy": "summarize"})
    provider.shutdown()
    [plain] = exporter.get_finished_spans()
    assert RedactingExporter(InMemorySpanExporter()).redact_span(plain) is plain


def test_a_batch_that_cannot_be_redacted_is_not_exported() -> None:
    class Broken:
        def redact(self, text: str, sink: str) -> str:
            raise RuntimeError("no")

    inner = InMemorySpanExporter()
    wrapper = RedactingExporter(inner, redactor=Broken())  # type: ignore[arg-type]
    span = ReadableSpan(name=f"chat {PROVIDER_KEY}", resource=Resource.create({}))
    assert wrapper.export([span]).name == "FAILURE"
    assert inner.get_finished_spans() == ()


def test_spans_from_the_otel_variables_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exporters the gateway builds itself (here the console one, printing to a buffer)
    sit behind the wrapper."""
    from opentelemetry.sdk.trace import export

    printed = io.StringIO()

    class Console(export.ConsoleSpanExporter):
        def __init__(self) -> None:
            super().__init__(out=printed)

    monkeypatch.setattr(export, "ConsoleSpanExporter", Console)
    provider = otel_env.provider_from_env(
        {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "gw-test"}
    )
    assert provider is not None
    try:
        with provider.get_tracer("test").start_as_current_span("call") as span:
            span.set_attribute("gen_ai.request.model", PROVIDER_KEY)
            span.set_attribute("secret.value", CANARY_VALUE)
    finally:
        provider.shutdown()  # the batch processor exports what it holds
    out = printed.getvalue()
    assert '"name": "call"' in out and leaks(out) == []
    assert out.count(REPLACEMENT) == 2


def redactions(text: str) -> dict[str, float]:
    return {
        s.labels["sink"]: s.value
        for family in text_string_to_metric_families(text)
        if family.name == "gateway_redactions"
        for s in family.samples
        if s.name == "gateway_redactions_total"
    }


async def test_a_gateway_redacts_its_spans_and_logs_and_counts_them(
    make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(RedactingExporter(exporter)))
    gw = await make_gateway(None, tracer_provider=provider)
    try:
        _, text = await scrape(gw)
        shown = redactions(text)
        assert set(shown) == set(SINKS)  # every sink exported from the start
        caplog.set_level(logging.INFO, logger="gateway.requests")
        # A client puts a key where a model name goes, and a secret in its agent name: both
        # are redacted where they come in (the claim sink), so spans and logs carry neither.
        headers = session_headers("redacted", **{"X-Gateway-Agent": f"agent {CANARY_VALUE}"})
        await call(gw, "chat", headers, model=PROVIDER_KEY)
        spans = exporter.get_finished_spans()
        assert spans and leaks(repr([s.to_json() for s in spans])) == []
        assert any(REPLACEMENT in (s.attributes or {}).values() for s in spans)
        [record] = [r for r in caplog.records if r.name == "gateway.requests"]
        line = JSONFormatter().format(record)
        assert leaks(line) == [] and REPLACEMENT in line
        _, text = await scrape(gw)
        after = redactions(text)
        assert after["claim"] >= shown["claim"] + 2  # the model and the agent
        for sink in ("span", "log", "claim"):
            assert after[sink] == counted(sink)
    finally:
        provider.shutdown()
