"""``RedactingExporter``: a span exporter that hands on spans with their text redacted
(``gateway.redact``, sink ``span``).

It wraps every exporter the gateway builds (``otel_env.provider_from_env``) and runs where the
exporter runs, on the batch processor's thread, never on the event loop. Spans are read-only
(``ReadableSpan``, immutable ``BoundedAttributes``) and may be shared with other processors,
so a span with something to redact is copied, and the copy is exported; a span without is
handed on as it is. Redacted: the span's name, its string attributes (and strings inside
sequence attributes), its status description, its events' names and attributes, its links'
attributes, and its resource's attributes. The counts of dropped attributes, events and links
are kept.

A ``TracerProvider`` given to ``create_app`` is its owner's: the gateway cannot reach the
exporters inside it through the SDK's API, and a span processor added after the owner's
would run after them, on a span they have already exported. Its owner wraps them:
``SimpleSpanProcessor(RedactingExporter(exporter))``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import Link, Status

from gateway.redact import REDACTOR, Redactor

log = logging.getLogger("gateway.telemetry.tracing")
SINK = "span"
_RESOURCES = 8
"""Resources remembered redacted (one per provider: a process has one or two)."""


class RedactingExporter(SpanExporter):
    """Exports through ``exporter`` what ``redact_span`` makes of each span."""

    def __init__(self, exporter: SpanExporter, redactor: Redactor = REDACTOR) -> None:
        self.exporter = exporter
        self.redactor = redactor
        self._resources: dict[int, tuple[Resource, Resource]] = {}

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            redacted = [self.redact_span(span) for span in spans]
        except Exception:
            # Never export what could not be redacted: the batch is lost, not leaked.
            log.exception("tracing: a batch of spans could not be redacted; not exported")
            return SpanExportResult.FAILURE
        return self.exporter.export(redacted)

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)

    def redact_span(self, span: ReadableSpan) -> ReadableSpan:
        """``span`` itself when it holds nothing to redact, else a redacted copy."""
        name = self._text(span.name)
        attributes = self._attributes(span.attributes, span.dropped_attributes)
        events = [self._event(event) for event in span.events]
        links = [self._link(link) for link in span.links]
        status = span.status
        if status.description:
            description = self._text(status.description)
            if description != status.description:
                status = Status(status.status_code, description)
        resource = self._resource(span.resource)
        unchanged = (
            name == span.name
            and attributes is None
            and all(e is o for e, o in zip(events, span.events, strict=True))
            and all(k is o for k, o in zip(links, span.links, strict=True))
            and status is span.status
            and resource is span.resource
        )
        if unchanged:
            return span
        if attributes is None:
            attributes = _copy(span.attributes or {}, span.dropped_attributes)
        return ReadableSpan(
            name=name,
            context=span.context,
            parent=span.parent,
            resource=resource,
            attributes=attributes,
            events=_bounded(events, span.dropped_events),
            links=_bounded(links, span.dropped_links),
            kind=span.kind,
            status=status,
            start_time=span.start_time,
            end_time=span.end_time,
            instrumentation_scope=span.instrumentation_scope,
        )

    # -- the parts ---------------------------------------------------------------------------
    def _text(self, text: str) -> str:
        return self.redactor.redact(text, SINK)

    def _attributes(
        self, attributes: Mapping[str, Any] | None, dropped: int
    ) -> BoundedAttributes | None:
        """A redacted copy of ``attributes`` (with the count the SDK dropped), or None when
        nothing in them needed redacting."""
        if not attributes:
            return None
        changed = False
        copied: dict[str, Any] = {}
        for key, value in attributes.items():
            new: Any = value
            if isinstance(value, str):
                new = self._text(value)
                changed = changed or new != value
            elif isinstance(value, Sequence) and any(isinstance(v, str) for v in value):
                redacted = tuple(self._text(v) if isinstance(v, str) else v for v in value)
                if redacted != tuple(value):
                    new, changed = redacted, True
            copied[key] = new
        return _copy(copied, dropped) if changed else None

    def _event(self, event: Event) -> Event:
        name = self._text(event.name)
        attributes = self._attributes(event.attributes, event.dropped_attributes)
        if name == event.name and attributes is None:
            return event
        # An event's attributes are immutable: shared with the original when unchanged.
        kept = attributes if attributes is not None else event.attributes
        return Event(name, kept, event.timestamp)

    def _link(self, link: Link) -> Link:
        attributes = self._attributes(link.attributes, link.dropped_attributes)
        return link if attributes is None else Link(link.context, attributes)

    def _resource(self, resource: Resource) -> Resource:
        """Resources are few and never change: each is redacted once."""
        known = self._resources.get(id(resource))
        if known is not None and known[0] is resource:
            return known[1]
        attributes = self._attributes(resource.attributes, 0)
        redacted = (
            resource if attributes is None else Resource(dict(attributes), resource.schema_url)
        )
        if len(self._resources) >= _RESOURCES:
            self._resources.clear()
        self._resources[id(resource)] = (resource, redacted)  # the original kept: ids stay unique
        return redacted


def _bounded(items: list[Any], dropped: int) -> BoundedList[Any]:
    """A span's events or links as the SDK holds them, with the count it dropped."""
    bounded: BoundedList[Any] = BoundedList(None)
    bounded.extend(items)
    bounded.dropped = dropped
    return bounded


def _copy(attributes: Mapping[str, Any], dropped: int) -> BoundedAttributes:
    """Attributes as the SDK holds them (immutable), with the count it dropped."""
    copied = BoundedAttributes(maxlen=None, attributes=dict(attributes), immutable=True)
    copied.dropped = dropped
    return copied
