"""Tracing configured from the standard ``OTEL_*`` environment variables.

Nothing is exported unless asked (``exporters_wanted``); the exporters, the provider's sampler
and limits and the batch processor read their own variables. Whether message content is
recorded, and how much of it, is read here too.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("gateway.telemetry.tracing")
"""Tracing's logger: its lines keep the name they had before this module split off."""

CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
CONTENT_LIMIT_ENV = "GATEWAY_OTEL_CONTENT_MAX_CHARS"
DEFAULT_CONTENT_LIMIT = 16384
SERVICE_NAME = "agent-gateway"
_CAPTURE_VALUES = frozenset({"true", "span_only", "span_and_event"})


def capture_from_env(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get(CAPTURE_ENV, "").strip().lower() in _CAPTURE_VALUES


def content_limit_from_env(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    try:
        return max(256, int(env.get(CONTENT_LIMIT_ENV, DEFAULT_CONTENT_LIMIT)))
    except ValueError:
        return DEFAULT_CONTENT_LIMIT


def exporters_wanted(env: Mapping[str, str] | None = None) -> list[str]:
    """The exporters the ``OTEL_*`` variables ask for (``otlp``, ``console``), or none.

    Unlike the SDK's own default, nothing is exported unless asked: an OTLP endpoint, or
    ``OTEL_TRACES_EXPORTER``. ``OTEL_SDK_DISABLED=true`` and ``OTEL_TRACES_EXPORTER=none`` turn
    tracing off."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n]
    if not names:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    return [] if "none" in names else names


def provider_from_env(env: Mapping[str, str] | None = None) -> SdkTracerProvider | None:
    """A TracerProvider exporting as the ``OTEL_*`` variables say, or None when they configure
    no exporter. Blocking (it imports exporters and reads resource detectors): run it in a
    thread. The exporters read their own variables (endpoint, headers, timeout, compression),
    the provider its sampler and limits, the batch processor its ``OTEL_BSP_*``. Each exporter
    is wrapped in a ``RedactingExporter``."""
    env = os.environ if env is None else env
    exporters: list[SpanExporter] = []
    for name in exporters_wanted(env):
        if name == "otlp":
            exporters.append(_otlp_exporter(env))
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        else:
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported here; ignored", name)
    if not exporters:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from gateway.telemetry.redacting import RedactingExporter

    named = "OTEL_SERVICE_NAME" in env or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    resource = Resource.create({} if named else {"service.name": SERVICE_NAME})
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        # Redacted at export, on the processor's thread: no secret leaves in a span.
        provider.add_span_processor(BatchSpanProcessor(RedactingExporter(exporter)))
    return provider


def span_queues(provider: Any) -> list[deque[Any]]:
    """The queues of the provider's batch span processors, for the ``span_exporter`` reason
    of degraded mode: a full queue drops every span that ends until the exporter catches up.

    The SDK keeps them private (``BatchSpanProcessor._batch_processor._queue``, a bounded
    ``deque``) and has no public count of drops: they are read defensively here, in the one
    place that knows the SDK's processors. An SDK that moves them yields no queue, and the
    reason is never set (a warning says so), rather than the gateway failing to start."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    active = getattr(provider, "_active_span_processor", None)
    processors = getattr(active, "_span_processors", ())
    found: list[deque[Any]] = []
    for processor in processors if isinstance(processors, tuple | list) else ():
        if not isinstance(processor, BatchSpanProcessor):
            continue
        queue = getattr(getattr(processor, "_batch_processor", None), "_queue", None)
        if isinstance(queue, deque) and queue.maxlen:
            found.append(queue)
        else:
            log.warning("this OpenTelemetry SDK hides its span queue: a full one goes unseen")
    return found


def _otlp_exporter(env: Mapping[str, str]) -> SpanExporter:
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    if protocol != "http/protobuf":
        log.warning("OTLP protocol %r is not supported here; using http/protobuf", protocol)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()
