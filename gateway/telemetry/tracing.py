"""OpenTelemetry traces of LLM calls, in the GenAI semantic conventions.

One LLM call through the gateway is one SERVER span (``POST /v1/chat/completions``) that
continues the caller's W3C ``traceparent``. The gateway's own work is recorded on it as events:
``gateway.policy.decision``, ``gateway.loop.detection``, ``gateway.compaction`` and
``gateway.policy.rejection``. Each upstream call is a CLIENT span under it, named
``{gen_ai.operation.name} {gen_ai.request.model}`` (``chat gpt-4o``), and the upstream receives
that span's ``traceparent``; compaction's summary call is a CLIENT span of its own.

Tracing is off unless an exporter is configured (the standard ``OTEL_*`` variables, read at
start-up: ``provider_from_env``) or a ``TracerProvider`` is given to ``create_app``. Off, the
pipeline checks one attribute per call and no span object is ever made. Each app has its own
``Tracing`` (``app[TRACING]``): nothing is set globally, so test apps never share spans.

Headers are never recorded (so neither are API keys). Message content is recorded only with
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``, as the conventions'
``gen_ai.input.messages`` / ``gen_ai.output.messages`` JSON, the newest messages first up to
``GATEWAY_OTEL_CONTENT_MAX_CHARS`` (16384 by default); never while the gateway runs degraded.
Every exporter the gateway builds hands on spans redacted (``redacting.RedactingExporter``, on
the exporter's thread); a provider given to ``create_app`` is its owner's to wrap.

A full span queue (the exporter falls behind, spans are dropped) puts the gateway in degraded
mode for ``span_exporter`` (``ExportWatch``), until the queue has drained to half.

This module makes the spans; the names they carry are in ``conventions``, the reading of the
``OTEL_*`` variables in ``otel_env``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web
from opentelemetry import propagate
from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from gateway import __version__
from gateway.caps import cap, cap_optional
from gateway.compaction.job import SummaryFailed
from gateway.dialects.base import Usage
from gateway.errors import GatewayError, UpstreamTimeout
from gateway.telemetry.content import input_messages, output_messages, system_instructions
from gateway.telemetry.conventions import (
    ERROR_TYPE,
    GEN_AI_AGENT_NAME,
    GEN_AI_CONVERSATION_COMPACTED,
    GEN_AI_CONVERSATION_ID,
    GEN_AI_INPUT_MESSAGES,
    GEN_AI_OPERATION_NAME,
    GEN_AI_OUTPUT_MESSAGES,
    GEN_AI_PROVIDER_NAME,
    GEN_AI_REQUEST_CHOICE_COUNT,
    GEN_AI_REQUEST_FREQUENCY_PENALTY,
    GEN_AI_REQUEST_MAX_TOKENS,
    GEN_AI_REQUEST_MODEL,
    GEN_AI_REQUEST_PRESENCE_PENALTY,
    GEN_AI_REQUEST_PREVIOUS_RESPONSE_ID,
    GEN_AI_REQUEST_SEED,
    GEN_AI_REQUEST_STOP_SEQUENCES,
    GEN_AI_REQUEST_STREAM,
    GEN_AI_REQUEST_TEMPERATURE,
    GEN_AI_REQUEST_TOP_K,
    GEN_AI_REQUEST_TOP_P,
    GEN_AI_RESPONSE_FINISH_REASONS,
    GEN_AI_RESPONSE_ID,
    GEN_AI_RESPONSE_MODEL,
    GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK,
    GEN_AI_SYSTEM_INSTRUCTIONS,
    GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS,
    GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
    GEN_AI_USAGE_CACHE_WRITE_INPUT_TOKENS,
    GEN_AI_USAGE_INPUT_TOKENS,
    GEN_AI_USAGE_OUTPUT_TOKENS,
    GEN_AI_USAGE_REASONING_OUTPUT_TOKENS,
    HTTP_REQUEST_METHOD,
    HTTP_RESPONSE_STATUS_CODE,
    HTTP_ROUTE,
    OPENAI_API_TYPE,
    SERVER_ADDRESS,
    SERVER_PORT,
    URL_PATH,
)
from gateway.telemetry.otel_env import (
    capture_from_env,
    content_limit_from_env,
    exporters_wanted,
    provider_from_env,
    span_queues,
)

if TYPE_CHECKING:
    from collections import deque

    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider

    from gateway.compaction.job import Summarizer, Summary
    from gateway.exchange import Exchange
    from gateway.resilience.degraded import Degradation

log = logging.getLogger("gateway.telemetry.tracing")

_API_TYPES = {"openai.chat": "chat_completions", "openai.responses": "responses"}

_CALL: ContextVar[Context | None] = ContextVar("gateway_tracing_call", default=None)
"""The context of the gateway's own call in progress (the summary call), for ``inject``."""

Handler = Callable[["Exchange"], Awaitable[web.StreamResponse]]


# -- one app's tracing -------------------------------------------------------------------------
class Tracing:
    """One app's tracer and what it records; off (no tracer) until given a provider."""

    __slots__ = ("_owned", "capture_content", "capture_teams", "content_limit", "degraded",
                 "provider", "tracer")  # fmt: skip

    def __init__(
        self,
        provider: trace_api.TracerProvider | None = None,
        *,
        capture_content: bool | None = None,
        content_limit: int | None = None,
    ) -> None:
        """``provider``: the caller's (a test's in-memory one); it is never shut down here,
        nor are its exporters wrapped (``RedactingExporter`` is the caller's to use). Without
        one, ``start`` configures tracing from the environment."""
        self.tracer: trace_api.Tracer | None = None
        self.provider: trace_api.TracerProvider | None = None
        self._owned: SdkTracerProvider | None = None
        self.capture_content = capture_from_env() if capture_content is None else capture_content
        self.content_limit = content_limit_from_env() if content_limit is None else content_limit
        self.degraded: Degradation | None = None
        """The app's degraded mode (``create_app`` sets it): content capture pauses in it."""
        self.capture_teams: Callable[[], frozenset[str]] | None = None
        """The teams whose content is captured although capture is off (``create_app`` sets
        it: the policy in force's ``capture_content_teams``)."""
        if provider is not None:
            self.use(provider)

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    @property
    def capturing(self) -> bool:
        """Message content goes on spans now: opted in, and not degraded (content is the
        bulk of a span: a struggling gateway or exporter is spared it first)."""
        return self.capture_content and not (self.degraded is not None and self.degraded.active)

    def captures(self, ex: Exchange) -> bool:
        """Message content of this call goes on its spans: captured for everyone
        (``capturing``), or the policy's ``capture_content_teams`` names the caller's
        authenticated team. No request header can turn it on."""
        if self.capturing:
            return True
        identity = ex.identity
        if identity is None or identity.team is None or self.degraded_now():
            return False
        teams = self.capture_teams
        return teams is not None and identity.team in teams()

    def degraded_now(self) -> bool:
        return self.degraded is not None and self.degraded.active

    def use(self, provider: trace_api.TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("gateway", __version__)

    async def start(self) -> None:
        """From the ``OTEL_*`` variables, unless a provider was given (reading them is cheap;
        building the exporters is done in a thread)."""
        if self.provider is not None or not exporters_wanted():
            return
        provider = await asyncio.to_thread(provider_from_env)
        if provider is not None:
            self._owned = provider
            self.use(provider)
            log.info("tracing on: exporting spans as the OTEL_* variables say")

    async def stop(self) -> None:
        """Flush and shut down the provider ``start`` made (a given one is its owner's)."""
        owned, self._owned = self._owned, None
        if owned is not None:
            self.tracer = None
            await asyncio.to_thread(owned.shutdown)

    def serve(
        self, ex: Exchange, handle: Handler, operation: str | None = None
    ) -> Awaitable[web.StreamResponse]:
        """``handle(ex)`` inside a SERVER span; off, ``handle(ex)`` itself (no extra frame)."""
        if self.tracer is None:
            return handle(ex)
        return self._serve(self.tracer, ex, handle, operation)

    async def _serve(
        self, tracer: trace_api.Tracer, ex: Exchange, handle: Handler, operation: str | None
    ) -> web.StreamResponse:
        request = ex.request
        parent = propagate.extract(request.headers)
        # The checked path the pipeline routed on (an LLM route or count_tokens: a handful of
        # values), not the router's catch-all pattern.
        route = ex.path
        span = tracer.start_span(
            f"{request.method} {route}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                HTTP_REQUEST_METHOD: request.method,
                HTTP_ROUTE: route,
                URL_PATH: request.path,
            },
        )
        if operation is None:
            operation = ex.dialect.operation if ex.dialect is not None else "chat"
        ex.trace = RequestTrace(self, span, trace_api.set_span_in_context(span, parent), operation)
        try:
            return await handle(ex)
        except BaseException as exc:
            span.set_attribute(ERROR_TYPE, _error_type(exc))
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            try:
                _end_server(ex, span)
            except Exception:
                log.exception("tracing: could not record the end of a request")
            span.end()


class ExportWatch:
    """The ``span_exporter`` reason of degraded mode: set when a batch processor's queue is
    full (each span that ends then is dropped), cleared once every queue has drained to half
    (so one slow export does not make it flap). ``check`` reads queue lengths only."""

    INTERVAL = 1.0
    """Seconds between checks (a queue holds 2048 spans by default: seconds of traffic)."""

    __slots__ = ("degraded", "queues")

    def __init__(self, degraded: Degradation, queues: list[deque[Any]]) -> None:
        self.degraded = degraded
        self.queues = queues

    def check(self) -> None:
        fullest = max(self.queues, key=lambda q: len(q) / (q.maxlen or 1), default=None)
        if fullest is None or not fullest.maxlen:
            return
        held = len(fullest)
        if held >= fullest.maxlen:
            detail = f"span export queue full ({held} spans): spans are being dropped"
            self.degraded.set("span_exporter", True, detail)
        elif held <= fullest.maxlen // 2:
            self.degraded.set("span_exporter", False, f"span export queue at {held} spans")

    async def run(self) -> None:
        """Check every ``INTERVAL`` until cancelled (a cleanup context's task)."""
        while True:
            await asyncio.sleep(self.INTERVAL)
            self.check()


def export_watch(tracing: Tracing, degraded: Degradation) -> ExportWatch | None:
    """A watch over the queues of the tracing's provider, or None when nothing batches."""
    if tracing.provider is None:
        return None
    queues = span_queues(tracing.provider)
    return ExportWatch(degraded, queues) if queues else None


@dataclass(slots=True)
class RequestTrace:
    """What one request's tracing carries along (``Exchange.trace``)."""

    tracing: Tracing
    span: Span
    """The SERVER span."""
    context: Context
    """The caller's context with the SERVER span in it: the parent of every CLIENT span."""
    operation: str
    noted: bool = False
    """The gateway's own events (decision, loops, compaction) are on the span."""


def auth_span(ex: Exchange, started_ns: int, method: str, outcome: str) -> None:
    """The ``gateway.auth`` span of a traced call: how its credential was checked, and the
    principal's public id and team (never the credential, nor a hash of it)."""
    trace = ex.trace
    if trace is None or trace.tracing.tracer is None:
        return
    attributes: dict[str, Any] = {"gateway.auth.method": method, "gateway.auth.outcome": outcome}
    principal = ex.principal
    if principal is not None:
        attributes["gateway.principal.id"] = cap(principal.id)
        attributes["gateway.principal.kind"] = principal.kind
        if principal.team is not None:
            attributes["gateway.team"] = cap(principal.team)
    span = trace.tracing.tracer.start_span(
        "gateway.auth", context=trace.context, kind=SpanKind.INTERNAL,
        start_time=started_ns, attributes=attributes,
    )  # fmt: skip
    if outcome not in ("ok", "deprecated"):
        span.set_status(Status(StatusCode.ERROR, outcome))
    span.end()


def trace_id(ex: Exchange) -> str | None:
    """The request's trace id (32 hex digits), for log lines and exemplars; None when off."""
    if ex.trace is None:
        return None
    return format(ex.trace.span.get_span_context().trace_id, "032x")


# -- the upstream call -------------------------------------------------------------------------
class _UpstreamCall:
    __slots__ = ("ex", "span", "started")

    def __init__(self, ex: Exchange, span: Span) -> None:
        self.ex, self.span, self.started = ex, span, time.perf_counter()

    def __enter__(self) -> _UpstreamCall:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        try:
            _end_client(self.ex, self.span, self.started, exc)
        except Exception:
            log.exception("tracing: could not record the end of an upstream call")
        finally:
            self.span.end()


_OFF = contextlib.nullcontext()


def upstream_call(
    ex: Exchange, url: str, headers: MutableMapping[str, str]
) -> contextlib.AbstractContextManager[object]:
    """The CLIENT span around sending a call upstream and relaying its answer; the span's
    ``traceparent`` goes into ``headers``. A shared no-op when the request is not traced."""
    trace = ex.trace
    if trace is None:
        return _OFF
    assert trace.tracing.tracer is not None
    if not trace.noted:
        _note_gateway(ex, trace)
    facts, dialect = ex.facts, ex.dialect
    model = cap_optional(facts.model) if facts is not None else None
    attributes = _common(ex, trace.operation, model, url)
    if facts is not None:
        attributes[GEN_AI_REQUEST_STREAM] = facts.stream
        if facts.max_output_tokens is not None:
            attributes[GEN_AI_REQUEST_MAX_TOKENS] = facts.max_output_tokens
    if ex.body is not None:
        _sampling(ex.body, attributes)
    if dialect is not None and dialect.name in _API_TYPES:
        attributes[OPENAI_API_TYPE] = _API_TYPES[dialect.name]
    if ex.compaction is not None and ex.compaction.items is not None:
        attributes[GEN_AI_CONVERSATION_COMPACTED] = True
    if facts is not None and trace.tracing.captures(ex):
        limit = trace.tracing.content_limit
        attributes[GEN_AI_INPUT_MESSAGES] = input_messages(facts.items, limit)
        if facts.preamble:
            attributes[GEN_AI_SYSTEM_INSTRUCTIONS] = system_instructions(facts.preamble, limit)
    span = trace.tracing.tracer.start_span(
        f"{trace.operation} {model}" if model else trace.operation,
        context=trace.context,
        kind=SpanKind.CLIENT,
        attributes=attributes,
    )
    propagate.inject(headers, context=trace_api.set_span_in_context(span, trace.context))
    return _UpstreamCall(ex, span)


def _common(ex: Exchange, operation: str, model: str | None, url: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        GEN_AI_OPERATION_NAME: operation,
        GEN_AI_PROVIDER_NAME: ex.dialect.provider if ex.dialect else ex.upstream.provider,
    }
    if model:
        attributes[GEN_AI_REQUEST_MODEL] = model
    parts = urlsplit(url)
    if parts.hostname:
        attributes[SERVER_ADDRESS] = parts.hostname
        attributes[SERVER_PORT] = parts.port or (443 if parts.scheme == "https" else 80)
    if ex.identity is not None:
        attributes[GEN_AI_CONVERSATION_ID] = ex.identity.session_id
        attributes[GEN_AI_AGENT_NAME] = ex.identity.agent
    return attributes


# Request fields as the conventions name them: (body field, attribute, type).
_SAMPLING: tuple[tuple[str, str, type], ...] = (
    ("temperature", GEN_AI_REQUEST_TEMPERATURE, float),
    ("top_p", GEN_AI_REQUEST_TOP_P, float),
    ("top_k", GEN_AI_REQUEST_TOP_K, int),
    ("frequency_penalty", GEN_AI_REQUEST_FREQUENCY_PENALTY, float),
    ("presence_penalty", GEN_AI_REQUEST_PRESENCE_PENALTY, float),
    ("seed", GEN_AI_REQUEST_SEED, int),
    ("previous_response_id", GEN_AI_REQUEST_PREVIOUS_RESPONSE_ID, str),
)


_MAX_STOP = 16
"""Stop sequences recorded (the APIs allow 4 to a few thousand)."""


def _sampling(body: Any, attributes: dict[str, Any]) -> None:
    for field, name, kind in _SAMPLING:
        value = body.get(field)
        if isinstance(value, bool) or value is None:
            continue
        if kind is float and isinstance(value, int | float):
            attributes[name] = float(value)
        elif isinstance(value, kind):
            attributes[name] = cap(value) if isinstance(value, str) else value
    stop = body.get("stop_sequences") or body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list) and stop and all(isinstance(s, str) for s in stop):
        attributes[GEN_AI_REQUEST_STOP_SEQUENCES] = [cap(s) for s in stop[:_MAX_STOP]]
    choices = body.get("n")
    if isinstance(choices, int) and not isinstance(choices, bool) and choices != 1:
        attributes[GEN_AI_REQUEST_CHOICE_COUNT] = choices


def _end_client(ex: Exchange, span: Span, started: float, exc: BaseException | None) -> None:
    facts = ex.response_facts
    attributes: dict[str, Any] = {}
    finish_reasons: list[str] = []
    if facts is not None:
        if facts.model:
            attributes[GEN_AI_RESPONSE_MODEL] = cap(facts.model)
        if facts.id:
            attributes[GEN_AI_RESPONSE_ID] = cap(facts.id)
        finish_reasons = list(facts.finish_reasons)
        if facts.usage is not None and not facts.usage.estimated:
            _usage(facts.usage, attributes)
    if ex.status:
        attributes[HTTP_RESPONSE_STATUS_CODE] = ex.status
    streamed = ex.facts is not None and ex.facts.stream
    if streamed and ex.first_byte_at is not None:
        attributes[GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] = ex.first_byte_at - started
    error: str | None = None
    if exc is not None:
        error = _error_type(exc)
    elif ex.status >= 400:
        error = str(ex.status)
    elif ex.cut:
        error = ex.outcome
    elif facts is not None and facts.error:
        error = facts.error
    if error is not None:
        attributes[ERROR_TYPE] = error
        span.set_status(Status(StatusCode.ERROR, error))
        if not finish_reasons and ex.status < 400:
            finish_reasons = ["error"]  # the conventions' word for a generation that broke off
    if finish_reasons:
        attributes[GEN_AI_RESPONSE_FINISH_REASONS] = finish_reasons
    trace = ex.trace
    if trace is not None and ex.status < 400 and trace.tracing.captures(ex):
        output = output_messages(ex, finish_reasons, trace.tracing.content_limit)
        if output is not None:
            attributes[GEN_AI_OUTPUT_MESSAGES] = output
    span.set_attributes(attributes)


def _usage(usage: Usage, attributes: dict[str, Any]) -> None:
    """The provider's own figures (``input_tokens`` includes the cached parts, as the
    conventions want); cache writes under both names the conventions have used."""
    attributes[GEN_AI_USAGE_INPUT_TOKENS] = usage.input_tokens
    attributes[GEN_AI_USAGE_OUTPUT_TOKENS] = usage.output_tokens
    attributes[GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] = usage.cache_read_tokens
    attributes[GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS] = usage.cache_creation_tokens
    attributes[GEN_AI_USAGE_CACHE_WRITE_INPUT_TOKENS] = usage.cache_creation_tokens
    if usage.reasoning_tokens:
        attributes[GEN_AI_USAGE_REASONING_OUTPUT_TOKENS] = usage.reasoning_tokens


def _error_type(exc: BaseException) -> str:
    """Low-cardinality: ``timeout``, ``cancelled``, or the class of what went wrong."""
    if isinstance(exc, UpstreamTimeout | TimeoutError):
        return "timeout"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    cause = exc.__cause__
    if isinstance(exc, GatewayError | SummaryFailed) and cause is not None:
        return "timeout" if isinstance(cause, TimeoutError) else type(cause).__qualname__
    return type(exc).__qualname__


# -- the summary call --------------------------------------------------------------------------
def summarizer(
    ex: Exchange, url: str, model: str, max_tokens: int, summarize: Summarizer
) -> Summarizer:
    """``summarize`` inside a CLIENT span of its own (a child of the request's SERVER span);
    ``inject`` puts the span's ``traceparent`` into the call's headers."""
    trace = ex.trace
    if trace is None:
        return summarize
    tracer = trace.tracing.tracer
    assert tracer is not None

    named = cap(model)

    async def traced(transcript: str) -> Summary:
        attributes = _common(ex, "chat", named, url)
        attributes[GEN_AI_REQUEST_MAX_TOKENS] = max_tokens
        attributes[GEN_AI_REQUEST_STREAM] = False
        attributes["gateway.compaction.summary"] = True
        span = tracer.start_span(
            f"chat {named}", context=trace.context, kind=SpanKind.CLIENT, attributes=attributes
        )
        token = _CALL.set(trace_api.set_span_in_context(span, trace.context))
        try:
            result = await summarize(transcript)
        except BaseException as exc:
            span.set_attribute(ERROR_TYPE, _error_type(exc))
            span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
            raise
        else:
            answered: dict[str, Any] = {GEN_AI_RESPONSE_MODEL: cap(result.model)}
            if result.usage is not None:
                _usage(result.usage, answered)
            span.set_attributes(answered)
            return result
        finally:
            _CALL.reset(token)
            span.end()

    return traced


def inject(headers: MutableMapping[str, str]) -> None:
    """The ``traceparent`` of the gateway's own call in progress (the summary call), if any."""
    context = _CALL.get()
    if context is not None:
        propagate.inject(headers, context=context)


# -- the SERVER span's end, and the gateway's events -----------------------------------------
def _note_gateway(ex: Exchange, trace: RequestTrace) -> None:
    """The policy decision, loop detections and compaction, as events on the SERVER span."""
    trace.noted = True
    span = trace.span
    decision = ex.decision
    if decision is not None:
        effective = decision.effective
        event: dict[str, Any] = {
            "gateway.policy.version": effective.version,
            "gateway.policy.rules": list(effective.rules) or ["defaults"],
        }
        if decision.warnings:
            event["gateway.policy.warnings"] = list(decision.warnings)
        span.add_event("gateway.policy.decision", event)
        for detection in decision.detections:
            event = {
                "gateway.loop.detector": detection.detector,
                "gateway.loop.count": float(detection.count),
                "gateway.loop.threshold": float(detection.threshold),
            }
            if detection.tool:
                event["gateway.loop.tool"] = cap(detection.tool)
            if detection.at_least:  # the count stopped at its bound: the run is longer
                event["gateway.loop.count_at_least"] = True
            span.add_event("gateway.loop.detection", event)
    outcome = ex.compaction
    if outcome is not None:
        event = {
            "gateway.compaction.strategies": list(outcome.strategies),
            "gateway.compaction.tokens_before": outcome.before,
            "gateway.compaction.tokens_after": outcome.after,
            "gateway.compaction.saved_tokens": outcome.saved,
            "gateway.compaction.reused": outcome.reused,
            "gateway.compaction.applied": outcome.items is not None,
        }
        if outcome.failures:
            event["gateway.compaction.failures"] = list(outcome.failures)
        span.add_event("gateway.compaction", event)


def _note_resilience(ex: Exchange, span: Span) -> None:
    """Retries, the breaker moves this call caused, a fallback, a shed call: span events."""
    upstream = ex.upstream.name
    if ex.retries:
        event: dict[str, Any] = {
            "gateway.upstream": upstream,
            "gateway.upstream.retries": ex.retries,
            "gateway.upstream.retry_reasons": list(ex.retry_reasons),
        }
        if ex.budget_spent:
            event["gateway.upstream.retry_budget_spent"] = True
        span.add_event("gateway.upstream.retry", event)
    for move in ex.breaker_moves:
        name, _, states = move.partition(": ")
        old, _, new = states.partition(" -> ")
        span.add_event(
            "gateway.upstream.breaker",
            {"gateway.upstream": name, "gateway.breaker.from": old, "gateway.breaker.to": new},
        )
    if ex.fallback_from is not None:
        span.add_event(
            "gateway.upstream.fallback",
            {"gateway.upstream": upstream, "gateway.upstream.fallback_from": ex.fallback_from},
        )
    if ex.shed is not None:
        span.add_event(
            "gateway.upstream.shed", {"gateway.upstream": upstream, "gateway.shed.reason": ex.shed}
        )


def _end_server(ex: Exchange, span: Span) -> None:
    trace = ex.trace
    if trace is not None and not trace.noted:
        _note_gateway(ex, trace)
    response = ex.response
    status = response.status if response is not None else ex.status
    attributes: dict[str, Any] = {"gateway.outcome": ex.outcome}
    if status:
        attributes[HTTP_RESPONSE_STATUS_CODE] = status
    if ex.identity is not None:
        attributes[GEN_AI_CONVERSATION_ID] = ex.identity.session_id
        attributes[GEN_AI_AGENT_NAME] = ex.identity.agent
        attributes["gateway.session.source"] = ex.identity.source
    if ex.facts is not None and ex.facts.model:
        attributes[GEN_AI_REQUEST_MODEL] = cap(ex.facts.model)
    if ex.turn is not None:
        attributes["gateway.turn"] = ex.turn
    if ex.outcome == "rejected":
        limit, rule = ex.rejection or ("", "")
        span.add_event(
            "gateway.policy.rejection",
            {
                "gateway.policy.limit": limit,
                "gateway.policy.rule": rule,
                HTTP_RESPONSE_STATUS_CODE: status,
            },
        )
    _note_resilience(ex, span)
    if ex.outcome != "ok":
        attributes[ERROR_TYPE] = ex.outcome
    span.set_attributes(attributes)
    # As for HTTP servers: the caller's errors (a rejection, a 4xx) are not the span's.
    if status >= 500 or ex.cut:
        span.set_status(Status(StatusCode.ERROR, ex.outcome))
