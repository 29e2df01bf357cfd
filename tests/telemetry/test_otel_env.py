"""Tracing from the ``OTEL_*`` variables: nothing exported unless asked, the OTLP protocol."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from gateway.telemetry import otel_env
from gateway.telemetry.redacting import RedactingExporter


def test_nothing_is_exported_unless_the_environment_asks() -> None:
    assert otel_env.exporters_wanted({}) == []
    assert otel_env.exporters_wanted({"OTEL_SERVICE_NAME": "gw"}) == []
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert otel_env.exporters_wanted(endpoint) == ["otlp"]
    assert otel_env.exporters_wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "x"}) == ["otlp"]
    assert otel_env.exporters_wanted({"OTEL_TRACES_EXPORTER": "console"}) == ["console"]
    assert otel_env.exporters_wanted({**endpoint, "OTEL_TRACES_EXPORTER": "none"}) == []
    assert otel_env.exporters_wanted({**endpoint, "OTEL_SDK_DISABLED": "true"}) == []
    assert otel_env.provider_from_env({}) is None


@pytest.mark.parametrize(
    ("protocol", "module"),
    [
        (None, "opentelemetry.exporter.otlp.proto.http.trace_exporter"),
        ("http/protobuf", "opentelemetry.exporter.otlp.proto.http.trace_exporter"),
        ("grpc", "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"),
    ],
)
def test_the_otlp_protocol_picks_the_exporter(protocol: str | None, module: str) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_SERVICE_NAME": "gw-test"}
    if protocol is not None:
        env["OTEL_EXPORTER_OTLP_PROTOCOL"] = protocol
    provider = otel_env.provider_from_env(env)
    assert provider is not None
    try:
        processors = provider._active_span_processor._span_processors
        (processor,) = processors
        assert isinstance(processor, BatchSpanProcessor)
        exporter = processor._batch_processor._exporter
        assert isinstance(exporter, RedactingExporter)  # every span leaves redacted
        assert type(exporter.exporter).__module__ == module
    finally:
        provider.shutdown()
