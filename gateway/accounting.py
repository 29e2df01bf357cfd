"""Turns and tokens of a session: begin a turn (atomically, against limits), end it with usage.

``begin_turn`` is the pipeline's step; a counted limit that stops the call is refused, and one
near is warned of, in the policy's words and through its step (``policy.step``). While the
store is failing, the policy's ``store_outage`` decides: ``open`` counts in memory (the
store merges it later), ``closed`` refuses the call (``StoreUnavailable``).

Usage is the provider's own figure. Where it has none (no usage reported, a stream cut), the
gateway estimates with tiktoken and flags the turn as estimated.
"""

from __future__ import annotations

import time
from dataclasses import replace

from gateway.appkeys import STORE
from gateway.caps import cap
from gateway.compaction import Calibration
from gateway.dialects import RequestFacts, Usage, prompt_parts
from gateway.errors import StoreUnavailable
from gateway.exchange import Exchange
from gateway.identity import qualified
from gateway.policy.prices import cost as cost_of
from gateway.policy.step import decide_policy, reject, warn
from gateway.policy.verdicts import limit_verdict, warnings
from gateway.redact import claim
from gateway.store import (
    LimitExceeded,
    LoadFailed,
    SessionChanged,
    Store,
    TurnEnd,
    TurnStart,
)
from gateway.tokens import TokenCounter


def turn_start(ex: Exchange) -> TurnStart:
    """What the store needs to begin a turn: whose, which model, what it holds while in flight
    (the store's other records take only the caller's identity and a time)."""
    assert ex.identity is not None
    facts, decision = ex.facts, ex.decision
    return TurnStart(
        identity=ex.identity,
        model=facts.model if facts else None,
        user_turn=facts.user_turn if facts else False,
        at=time.time(),
        reserve_tokens=decision.reserve_tokens if decision else 0,
        reserve_cost=decision.reserve_cost if decision else 0.0,
        fail_open=decision is None or decision.effective.settings.store_outage == "open",
        seen=ex.record.rev if ex.record is not None else 0,
    )


async def begin_turn(ex: Exchange) -> None:
    """The store's atomic check of the counted limits (turns, session tokens, budgets), and
    the turn recorded: ``ex.ticket`` and ``ex.turn``."""
    assert ex.identity is not None and ex.decision is not None
    decision, store = ex.decision, ex.app[STORE]
    start = turn_start(ex)
    if not start.fail_open and store.trouble is not None:
        raise StoreUnavailable(decision.effective.source("store_outage"))
    try:
        try:
            ticket = await store.begin_turn(start, decision.limits)
        except SessionChanged as changed:
            # Decided on this replica's copy, which another replica's turn, a grant or a pause
            # has overtaken: decided again on the session as it is, and begun without the check.
            ex.record = changed.record
            await decide_policy(ex, noted=decision.detections)
            assert ex.decision is not None
            decision = ex.decision
            start = replace(turn_start(ex), seen=None)
            ticket = await store.begin_turn(start, decision.limits)
    except LimitExceeded as exc:
        await reject(ex, limit_verdict(exc.hit, decision.effective))
    except LoadFailed:  # only when failing closed: the session could not be read
        raise StoreUnavailable(decision.effective.source("store_outage")) from None
    ex.ticket = ticket
    if ticket.session_id != ex.identity.session_id:
        ex.identity = qualified(ex.identity)  # another key started the id since it was looked up
    ex.turn = ticket.turn
    near = warnings(decision, ticket)
    if near:
        await warn(ex, near)


async def end_turn(
    ex: Exchange, store: Store, tokens: TokenCounter, calibration: Calibration
) -> None:
    """Always runs once a turn has begun, whatever happened after: reservations are freed."""
    if ex.ticket is None:
        return
    ticket, ex.ticket = ex.ticket, None
    usage = final_usage(ex, tokens)
    calibrate(ex, usage, tokens, calibration)
    if ex.response_facts is not None:
        ex.response_facts.usage = usage
    answered = ex.response_facts
    if answered is not None and answered.model:  # the upstream's words: stored and a label
        answered.model = claim(cap(answered.model))
    model = answered.model if answered is not None and answered.model else None
    if model is None and ex.facts is not None and ex.facts.model:
        model = claim(cap(ex.facts.model))  # the client's words, kept with its session
    status = ex.final_status
    price = ex.decision.price if ex.decision is not None else None
    if usage is not None and price is not None:
        ex.cost = cost_of(price, usage)
    # Tokens without a price are counted as such (metric, session warning), never as free.
    ex.unpriced = usage is not None and price is None and usage.total_tokens > 0
    end = TurnEnd(
        model, usage, status, time.time(), cost=ex.cost, body_hash=ex.body_hash, retries=ex.retries
    )
    await store.end_turn(ticket, end)
    if ex.unpriced:
        assert ex.identity is not None  # a turn began: the call was identified
        at = time.time()
        await store.note(ex.identity, at, "warnings", unpriced_warning(ex.facts, model, at))


def unpriced_warning(facts: RequestFacts | None, model: str | None, at: float) -> dict[str, object]:
    """The session's note of a call whose cost could not be counted."""
    requested = cap((facts.model if facts else None) or model or "unknown")
    return {
        "key": f"unpriced:{requested}",
        "at": at,
        "model": requested,
        "warnings": [
            f"model {requested} has no price: its calls' cost is not counted (give it one in "
            "the policy's prices, or a default with the glob '*')"
        ],
    }


def calibrate(
    ex: Exchange, usage: Usage | None, tokens: TokenCounter, calibration: Calibration
) -> None:
    """The provider's input count beside the gateway's estimate of what was sent."""
    if usage is None or usage.estimated or ex.status >= 400 or ex.facts is None:
        return
    model = ex.facts.model
    estimate = ex.input_estimate
    if estimate is None:
        if not calibration.wants_sample(model):
            return
        estimate = tokens.count_items(prompt_parts(ex.facts), model)
    calibration.observe(model, estimate, usage.input_tokens)


def final_usage(ex: Exchange, tokens: TokenCounter) -> Usage | None:
    reported = ex.response_facts.usage if ex.response_facts else None
    cut = ex.cut
    if reported is not None and not cut:
        return reported
    if ex.facts is None or (ex.status >= 400 and reported is None):
        # An error answer bills nothing; a call that never got an answer is unknowable.
        return reported
    if not ex.status and not cut:
        return None
    return estimate(ex, tokens, reported)


def estimate(ex: Exchange, tokens: TokenCounter, reported: Usage | None) -> Usage:
    assert ex.facts is not None
    facts = ex.facts
    output = tokens.count_content(ex.response_facts.generated()) if ex.response_facts else 0
    if reported is None:
        prompt = prompt_parts(facts)
        return Usage(
            input_tokens=tokens.count_items(prompt, facts.model),
            output_tokens=output,
            estimated=True,
        )
    # The stream was cut after the provider stated the input: keep it, estimate the rest.
    reported.output_tokens = max(reported.output_tokens, output)
    reported.estimated = True
    return reported
