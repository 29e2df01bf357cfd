"""What one finished request adds to the metrics, read from its ``Exchange`` (``observe``).

Nothing is recorded piecemeal along the way: the pipeline calls ``observe`` once, at the end of
each request, and it only reads the exchange (its derived facts, such as ``final_status`` and
``decision_label``, are the exchange's own properties).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from gateway.dialects.base import Usage

if TYPE_CHECKING:
    from gateway.exchange import Exchange
    from gateway.telemetry.metrics import Metrics


def observe(metrics: Metrics, ex: Exchange, route: str, trace_id: str | None) -> None:
    """Everything one request adds to the metrics, read from its exchange at its end. With a
    trace id, latency observations carry it as an exemplar (OpenMetrics exposition only)."""
    end = time.perf_counter()
    provider = ex.upstream.provider
    identity, facts, usage = ex.identity, ex.facts, ex.response_facts
    agent = metrics.agent(identity.agent if identity else None)
    source = _source(ex)
    status = ex.final_status
    # A model the provider (or the policy) refused may be made up: it takes no label of its own.
    model = metrics.model(facts.model if facts else None, status < 400)
    status_class = f"{status // 100}xx"
    decision = ex.decision_label
    metrics.requests.inc((route, provider, model, agent, status_class, source, decision))
    metrics.request_duration.observe((route, provider), end - ex.started, trace_id)
    if ex.upstream_at is not None:
        after = end - ex.upstream_done_at if ex.upstream_done_at is not None else 0.0
        own = ex.upstream_at - ex.started - ex.summary_seconds + after
        metrics.overhead.observe((route,), max(0.0, own), trace_id)
    if source == "upstream" and status >= 400:
        reason = "http_429" if status == 429 else f"http_{status // 100}xx"
        metrics.upstream_errors.inc((provider, reason))
    elif ex.outcome in _UPSTREAM_FAILURES:
        metrics.upstream_errors.inc((provider, _UPSTREAM_FAILURES[ex.outcome]))
    if ex.retry_reasons or ex.shed or ex.budget_spent or ex.fallback_from or ex.queued_seconds:
        _observe_resilience(metrics, ex)
    if ex.dialect is None or facts is None:
        return
    genai = (ex.dialect.operation, provider, model)
    if ex.upstream_at is not None:
        error = ""
        if ex.outcome != "ok":
            error = ex.outcome
        elif status >= 400:
            error = str(status)  # the upstream's own error: its status is the type
        duration = end - ex.upstream_at
        metrics.operation_duration.observe((*genai, error), duration, trace_id)
        if ex.first_byte_at is not None and facts.stream:
            metrics.time_to_first_chunk.observe(genai, ex.first_byte_at - ex.upstream_at)
    if identity is not None:
        metrics.agent_seen(agent)
        metrics.active_sessions.touch(identity.session_id, agent)
        if ex.turn == 1:
            metrics.sessions_started.inc((agent,))
    if ex.turn is not None:
        metrics.session_turn.observe((agent,), ex.turn)
    _observe_policy(metrics, ex, agent)
    if usage is not None and usage.usage is not None:
        _observe_usage(metrics, ex, genai, model, agent, usage.usage)


def _observe_resilience(metrics: Metrics, ex: Exchange) -> None:
    """Retries, a spent retry budget, a call shed or sent to a fallback, a wait for a slot."""
    upstream = ex.upstream
    for reason in ex.retry_reasons:
        metrics.upstream_retries.inc((upstream.provider, upstream.name, reason))
    if ex.budget_spent:
        metrics.retry_budget_exhausted.inc((upstream.name,))
    if ex.shed is not None:
        metrics.shed.inc((upstream.name, ex.shed))
    if ex.fallback_from is not None:
        metrics.fallbacks.inc((ex.fallback_from, upstream.name))
    if ex.queued_seconds is not None:
        metrics.queue_wait.observe((upstream.name,), ex.queued_seconds)


def _observe_usage(
    metrics: Metrics,
    ex: Exchange,
    genai: tuple[str, str, str],
    model: str,
    agent: str,
    usage: Usage,
) -> None:
    response_model = metrics.model(ex.response_facts.model if ex.response_facts else None)
    team = metrics.team(ex.team)
    for kind, value in (
        ("input", usage.input_tokens),
        ("output", usage.output_tokens),
        ("cache_read", usage.cache_read_tokens),
        ("cache_creation", usage.cache_creation_tokens),
        ("reasoning", usage.reasoning_tokens),
    ):
        if value:
            metrics.tokens.inc((kind, model, agent, team), value)
    metrics.token_usage.observe((*genai, response_model, "input"), usage.input_tokens)
    metrics.token_usage.observe((*genai, response_model, "output"), usage.output_tokens)
    if ex.cost:
        metrics.cost.inc((model, agent, team), ex.cost)
    elif ex.unpriced:
        metrics.unpriced.inc((model,))
    if ex.window:
        metrics.context_fill.observe((ex.upstream.provider,), usage.input_tokens / ex.window)


def _observe_policy(metrics: Metrics, ex: Exchange, agent: str) -> None:
    decision = ex.decision
    if ex.rejection is not None:
        limit, rule = ex.rejection
        metrics.decisions.inc(("rejected", limit, rule))
        metrics.rejections.inc((limit, rule, agent))
    elif decision is not None:
        metrics.decisions.inc(("allowed", "", ""))
    if decision is not None:
        for detection in decision.detections:
            metrics.loop_detections.inc((agent, detection.detector))
    outcome = ex.compaction
    if outcome is not None:
        for strategy in outcome.strategies or ["none"]:
            state = "reused" if outcome.reused else "applied" if outcome.items else "failed"
            metrics.compactions.inc((strategy, state))
            metrics.compaction_duration.observe((strategy, state), ex.compaction_seconds)
            share = outcome.saved / len(outcome.strategies or [1])
            metrics.tokens_saved.inc((strategy,), share)
        for failure in outcome.failures:
            # "summarize: skipped: ..." (degraded mode): the next strategy stood in for it.
            strategy, _, why = failure.partition(":")
            failed = (strategy, "skipped" if why.startswith(" skipped") else "failed")
            metrics.compactions.inc(failed)
            metrics.compaction_duration.observe(failed, ex.compaction_seconds)


def _source(ex: Exchange) -> str:
    """Who made the answer: the upstream, the policy, or the gateway itself (its errors)."""
    if ex.rejection is not None:
        return "policy"
    if ex.status and (ex.outcome == "ok" or ex.cut):
        return "upstream"
    return "gateway"


_UPSTREAM_FAILURES = {
    "upstream_unavailable": "unreachable",
    "upstream_timeout": "timeout",
    "upstream_cut": "cut",
}
