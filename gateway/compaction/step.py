"""The compaction step of the pipeline: from an exchange to a compaction ``Call`` and back.

Everything web-shaped about compaction is here (the app's store, policy and upstream, the
exchange's body and headers); the package's other modules only see values.
"""

from __future__ import annotations

import time

import msgspec

from gateway.appkeys import COMPACTOR, DEGRADED, HTTP, POLICY, SETTINGS, STORE, SUMMARIZERS
from gateway.compaction import summary
from gateway.compaction.compactor import Call, Outcome, Overflow
from gateway.compaction.conversation import Rewrite
from gateway.compaction.job import Summarizer, Summary
from gateway.compaction.windows import window_of
from gateway.dialects.base import raw_elements
from gateway.dialects.envelope import Items, replace_array
from gateway.exchange import Exchange
from gateway.policy import prices
from gateway.policy.step import reject
from gateway.policy.verdicts import Verdict
from gateway.store import CompactionNote
from gateway.telemetry import tracing


async def compact(ex: Exchange) -> None:
    """Near the model's window, the policy's compaction strategies rewrite the conversation."""
    assert ex.identity is not None and ex.decision is not None and ex.dialect is not None
    assert ex.facts is not None and ex.body is not None
    history = ex.dialect.history
    items = ex.body.get(history.field)
    settings = ex.decision.effective.settings.context
    if not isinstance(items, Items) or "x-openai-subagent" in ex.request.headers:
        return  # no history to rewrite, or an agent's own compaction call
    if ex.body.get("previous_response_id"):
        return  # the history is on the provider's side: what is here is only the newest part
    if not settings.strategies:
        return  # compaction off: the provider says whether it fits
    app, facts = ex.app, ex.facts
    policy = app[POLICY].policy
    window = settings.window
    if window == "auto":
        window = window_of(facts.model, policy.windows, settings.default_window)
    ex.window = window
    saved = ex.record is not None and bool(ex.record.context_rewrites)
    if not saved and not app[COMPACTOR].may_reach(facts.model, len(ex.raw), window, settings):
        return
    identity = ex.identity
    session = identity.session_id
    summary_model = settings.summary_model or facts.model or ""
    summary_window = window
    if summary_model != facts.model:
        summary_window = window_of(summary_model, policy.windows, settings.default_window)
    # The summary call must fit its own window: a quarter for the answer at most, and the
    # transcript in what is left with room (three characters a token is a low estimate).
    summary_tokens = min(settings.summary_max_tokens, summary_window // 4)
    summary_chars = (summary_window * 3 // 4 - summary_tokens) * 3

    async def rewrites() -> list[Rewrite]:
        record = await app[STORE].get(session)
        return [Rewrite.from_json(r) for r in record.context_rewrites] if record else []

    async def keep(outcome: Outcome) -> None:
        await app[STORE].record_compaction(identity, time.time(), compaction_note(ex, outcome))

    call = Call(
        session_id=session,
        model=facts.model,
        history=history,
        originals=list(items.raw()),
        fixed=[*facts.preamble, *raw_elements(facts.tools)],
        body_size=len(ex.raw),
        settings=settings,
        window=window,
        summarize=summarizer(ex, summary_model, summary_tokens, settings.summary_timeout),
        rewrites=rewrites,
        keep=keep,
        summary_chars=summary_chars,
        skip_summary=skip_summary(ex),
        helper=ex.helper_call,
    )
    started = time.perf_counter()
    try:
        outcome = await app[COMPACTOR].compact(call)
    except Overflow as overflow:
        await reject(ex, overflow_verdict(ex, overflow))
    ex.compaction_seconds = time.perf_counter() - started
    if outcome is None:
        return
    ex.input_estimate = outcome.estimate
    if outcome.failures:
        ex.compaction = outcome
    if outcome.items is None:
        return
    ex.compaction = outcome
    ex.upstream_body = replace_array(ex.upstream_body, history.field, outcome.items)
    ex.facts.items = Items([msgspec.Raw(item) for item in outcome.items])
    if outcome.reused and not outcome.failures:  # (a failure was kept by the compactor)
        await app[STORE].record_compaction(identity, time.time(), compaction_note(ex, outcome))


def skip_summary(ex: Exchange) -> str | None:
    """Why no summary is made for this call, if the gateway runs degraded: summarize falls
    back to the policy's next strategy, which needs no model. The ``summarizer`` reason alone
    is left to the summarizers' breakers: each skips only its own upstream's summaries, and
    the open one's probe is how it closes again."""
    degraded = ex.app[DEGRADED]
    if not degraded.active:  # the common case: one attribute read
        return None
    reasons = [r.reason for r in degraded.reasons() if r.reason != "summarizer"]
    return f"the gateway runs degraded ({', '.join(reasons)})" if reasons else None


def summarizer(ex: Exchange, model: str, max_tokens: int, time_limit: float) -> Summarizer:
    app = ex.app
    assert ex.dialect is not None
    dialect = ex.dialect
    url = ex.upstream.url(ex.path, "")
    upstream = app[SUMMARIZERS].of(ex.upstream)

    async def summarize(transcript: str) -> Summary:
        drop = ex.identity.drop_header if ex.identity is not None else None
        headers = summary.carried_headers(ex.request.headers, drop)
        tracing.inject(headers)
        started = time.perf_counter()
        try:
            return await summary.summarize(
                app[HTTP],
                url,
                headers,
                dialect,
                model,
                transcript,
                max_tokens,
                time_limit,
                app[SETTINGS],
                upstream,
            )
        finally:
            ex.summary_seconds += time.perf_counter() - started

    return tracing.summarizer(ex, url, model, max_tokens, summarize)


def compaction_note(ex: Exchange, outcome: Outcome) -> CompactionNote:
    if outcome.reused and not outcome.failures:
        return CompactionNote(outcome.saved)
    summary = outcome.summary
    cost = 0.0
    if summary is not None and summary.usage is not None:
        price = ex.app[POLICY].policy.price(summary.model)
        cost = prices.cost(price, summary.usage) if price is not None else 0.0
    event = {
        "key": None,
        "at": time.time(),
        "strategies": outcome.strategies,
        "tokens_before": outcome.before,
        "tokens_after": outcome.after,
        "saved_tokens": outcome.saved,
        "failures": outcome.failures,
        "summary_model": summary.model if summary else None,
        "summary_input_tokens": summary.usage.input_tokens if summary and summary.usage else None,
        "summary_output_tokens": summary.usage.output_tokens if summary and summary.usage else None,
        "summary_cost": cost,
    }
    rewrite = outcome.rewrite.to_json() if outcome.rewrite else None
    return CompactionNote(outcome.saved, event, rewrite, summary.usage if summary else None, cost)


def overflow_verdict(ex: Exchange, overflow: Overflow) -> Verdict:
    """Still over the window (or ``prompt``): refused as the provider's own overflow error, in
    its words, with the gateway's reason and what lifts it (refused by ``policy.step.reject``,
    as every refusal is)."""
    assert ex.dialect is not None and ex.decision is not None
    policy = ex.app[POLICY].policy
    rule = ex.decision.effective.source("context.strategies")
    message = (
        f"{ex.dialect.history.overflow(overflow.tokens, overflow.maximum)} "
        f"[gateway: {overflow.reason}; context policy from {rule}. To lift it, change "
        f"context.strategies or context.compact_at in the policy file ({policy.source}).]"
    )
    return Verdict("context_window", rule, message, overflow=True)
