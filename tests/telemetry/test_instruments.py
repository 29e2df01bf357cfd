"""The event-loop metric families, read back through the client library's expositions."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.parser import text_string_to_metric_families

from gateway.telemetry.instruments import Counter, Gauge, Histogram


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_value_on_a_bound_counts_in_that_bucket_and_buckets_are_cumulative() -> None:
    registry = CollectorRegistry()
    latency = Histogram("latency_seconds", "Latency.", ["route"], buckets=(0.1, 1.0))
    registry.register(latency)
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        latency.observe(("chat",), value)

    found = samples(registry)
    bucket = "latency_seconds_bucket"
    assert found[(bucket, (("le", "0.1"), ("route", "chat")))] == 2
    assert found[(bucket, (("le", "1.0"), ("route", "chat")))] == 4
    assert found[(bucket, (("le", "+Inf"), ("route", "chat")))] == 5
    assert found[("latency_seconds_count", (("route", "chat"),))] == 5
    assert found[("latency_seconds_sum", (("route", "chat"),))] == pytest.approx(8.65)


def test_each_bucket_keeps_its_latest_trace_id_as_exemplar() -> None:
    registry = CollectorRegistry()
    latency = Histogram("latency_seconds", "Latency.", buckets=(0.1, 1.0))
    registry.register(latency)
    latency.observe((), 0.05, "aaaa")
    latency.observe((), 0.07, "bbbb")
    latency.observe((), 0.5)

    text = openmetrics.generate_latest(registry).decode()  # type: ignore[no-untyped-call]
    [low] = [line for line in text.splitlines() if 'le="0.1"' in line]
    [mid] = [line for line in text.splitlines() if 'le="1.0"' in line]
    assert '# {trace_id="bbbb"} 0.07' in low
    assert "#" not in mid  # no observation with a trace id fell there
    assert "trace_id" not in generate_latest(registry).decode()  # text format: no exemplars


def test_counters_and_gauges_by_label_values() -> None:
    registry = CollectorRegistry()
    calls = Counter("calls", "Calls.", ["agent"])
    busy = Gauge("busy", "Busy.", ["route"])
    registry.register(calls)
    registry.register(busy)
    calls.touch(("codex",))
    calls.inc(("claude-code",))
    calls.inc(("claude-code",), 2.5)
    busy.inc(("chat",))
    busy.inc(("chat",))
    busy.dec(("chat",))
    busy.set(("messages",), 7)

    found = samples(registry)
    assert found[("calls_total", (("agent", "codex"),))] == 0  # exported before its first call
    assert found[("calls_total", (("agent", "claude-code"),))] == 3.5
    assert found[("busy", (("route", "chat"),))] == 1
    assert found[("busy", (("route", "messages"),))] == 7


def test_a_family_without_series_is_still_exported_and_names_are_unique() -> None:
    registry = CollectorRegistry()
    registry.register(Counter("calls", "Calls.", ["agent"]))
    assert "# TYPE calls_total counter" in generate_latest(registry).decode()
    with pytest.raises(ValueError, match="Duplicated"):
        registry.register(Counter("calls", "Calls again."))
