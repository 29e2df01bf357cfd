"""The words of the policy's stops and warnings: which limit, which rule set it, and what lifts
it (a grant command, a policy change, a time to retry). ``decide`` and the store's limit check
find that a call must stop; the message it gets is written here, in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from gateway.caps import cap
from gateway.loops import Detection
from gateway.policy.compiled import Effective
from gateway.store import BudgetLimit, LimitHit, SessionRecord, TurnTicket, budget_key_parts

if TYPE_CHECKING:
    from gateway.policy.decide import Decision


@dataclass(slots=True)
class Verdict:
    """A stop: which limit, which rule set it, and what the operator can do about it."""

    limit: str
    rule: str
    message: str
    retry_after: float | None = None
    """Set for window budgets, which reset: answered 429 instead of 400."""
    overflow: bool = False
    """Over the context window: answered as the provider's own overflow error, which agents
    answer by compacting, not as a policy refusal they would only show."""


def body_too_large(effective: Effective, size: int, version: str) -> Verdict:
    limit = effective.settings.limits.max_body_bytes
    return Verdict(
        "max_body_bytes",
        effective.source("limits.max_body_bytes"),
        f"The request body has {size} bytes, over limits.max_body_bytes ({limit}) "
        f"{_by(effective, 'limits.max_body_bytes')}. {_lift(version)}",
    )


def model_refused(effective: Effective, model: str, agent: str, version: str) -> Verdict:
    models, model = effective.settings.limits.models, cap(model)  # the client's, echoed
    return Verdict(
        "models",
        effective.source("limits.models"),
        f"Model '{model}' is not allowed for agent {agent} "
        f"{_by(effective, 'limits.models')} (allow: {', '.join(models.allow)}; "
        f"deny: {', '.join(models.deny) or 'none'}). {_lift(version)}",
    )


def input_too_large(effective: Effective, estimate: int, version: str) -> Verdict:
    cap = effective.settings.limits.max_request_input_tokens
    return Verdict(
        "max_request_input_tokens",
        effective.source("limits.max_request_input_tokens"),
        f"The request has about {estimate} input tokens, over "
        f"limits.max_request_input_tokens ({cap}) "
        f"{_by(effective, 'limits.max_request_input_tokens')}. {_lift(version)}",
    )


def unpriced(effective: Effective, model: str, version: str) -> Verdict:
    """A cost budget cannot count a call it has no price for: refused, not let through free."""
    model = cap(model)  # the client's, echoed
    return Verdict(
        "unpriced_model",
        effective.source("budgets"),
        f"Model '{model}' has no price, and a cost budget applies to this call "
        f"(budgets {_by(effective, 'budgets')}), so its cost could not be counted. Give it a "
        f"price in the policy's prices (per million tokens, e.g. prices: {{'{model}': "
        f"{{input: 3, output: 15}}}}), or a default price for every unpriced model with the "
        f"glob '*' (policy version {version}).",
    )


def stops_loops(action: str, record: SessionRecord | None) -> bool:
    """Whether a loop detected now stops the call: not when the policy only flags loops, nor
    while a grant lifts loop stops."""
    if action == "flag":
        return False
    return record is None or record.turns >= record.loops_allowed_until


def loop_verdict(decision: Decision, session: str, record: SessionRecord | None) -> Verdict | None:
    """The stop a detected loop calls for, unless the policy only flags it or a grant lifts it."""
    loops = decision.effective.settings.loops
    if not decision.detections or not stops_loops(loops.action, record):
        return None
    detection = decision.detections[0]
    paused = (
        " The session is paused until an operator grants more." if loops.action == "pause" else ""
    )
    setting = _setting_of(detection)
    # The setting's own value: a turn_rate detection's threshold is a rate, not the factor.
    value: float = getattr(loops, setting)
    return Verdict(
        f"loop_{detection.detector}",
        decision.effective.source(f"loops.{setting}"),
        f"Session {session} looks like a runaway loop: {detection.describe()} "
        f"(loops.{setting} = {value:g} {_by(decision.effective, 'loops.' + setting)}).{paused} "
        f"To let it go on: gateway sessions grant {session} --turns 20.",
    )


def limit_verdict(hit: LimitHit, effective: Effective) -> Verdict:
    """The words for a stop by the store's counted limits."""
    limit, session, budget = hit.limit, hit.session_id, hit.budget
    grant = f"gateway sessions grant {session}"
    if limit == "max_turns":
        return Verdict(
            limit,
            effective.source("limits.max_turns"),
            f"Session {session} has used all {int(hit.allowed)} turns allowed "
            f"(limits.max_turns {_by(effective, 'limits.max_turns')}). "
            f"To allow more: {grant} --turns 50.",
        )
    if limit == "max_session_tokens":
        return Verdict(
            limit,
            effective.source("limits.max_session_tokens"),
            f"Session {session} would go over its token limit: {int(hit.used)} of "
            f"{int(hit.allowed)} tokens used or held (limits.max_session_tokens "
            f"{_by(effective, 'limits.max_session_tokens')}). "
            f"To allow more: {grant} --tokens 1000000.",
        )
    if budget is not None:
        return _budget_verdict(hit, budget)
    if limit == "session_paused":
        return Verdict(
            limit,
            "operator",
            f"Session {session} was {_status_change('paused', hit.reason)}. Its calls are "
            f"refused until an operator lets it go on: {grant} --turns 20.",
        )
    return Verdict(
        limit,
        "operator",
        f"Session {session} was {_status_change('ended', hit.reason)}. Start a new session "
        "to go on.",
    )


def _budget_verdict(hit: LimitHit, budget: BudgetLimit) -> Verdict:
    """A window budget is spent: whose, how much of what, when it resets, what lifts it."""
    resets = datetime.fromtimestamp(budget.window_end, UTC).strftime("%Y-%m-%d %H:%M UTC")
    wait = f"try again in {max(1, round(hit.retry_after or 0))}s"
    per, _, window = budget_key_parts(budget.key)
    if hit.limit == "budget_requests":
        where = "the defaults" if budget.rule == "defaults" else f"rule '{budget.rule}'"
        return Verdict(
            hit.limit,
            budget.rule,
            f"The {per} budget {budget.key} allows {int(hit.allowed)} requests a {window}: "
            f"{int(hit.used)} of {int(hit.allowed)} made (budgets, per: {per}, window: "
            f"{window}, rule '{budget.rule}'). It resets at {resets}: {wait}, or raise "
            f"max_requests in {where} of the policy file.",
            retry_after=hit.retry_after,
        )
    what = "tokens" if hit.limit == "budget_tokens" else "cost"
    return Verdict(
        hit.limit,
        budget.rule,
        f"The {per} budget {budget.key} is spent: {hit.used} of {hit.allowed} {what} "
        f"(budgets, rule '{budget.rule}'). It resets at {resets}: {wait}, or raise the budget "
        f"in the policy file.",
        retry_after=hit.retry_after,
    )


def _status_change(status: str, reason: str) -> str:
    """The store's ``status_reason`` says who changed the status and why, starting with the
    status (``ended by bob: runaway``, ``paused by the loop rule: ...``): shown as it is. A
    reason in another form (records from older versions: ``by bob``) is put in brackets."""
    if reason.startswith(status):
        return reason
    return f"{status} ({reason})" if reason else status


def warnings(decision: Decision, ticket: TurnTicket) -> list[str]:
    """Past ``warn_at`` of a limit, say so (answer headers, and kept with the session).

    Limits count with their grants, as the stop does. Tokens count what calls in flight
    hold too (this one's reservation included), as the stop does: "used or held"."""
    warn_at = decision.effective.settings.limits.warn_at
    found = []
    if ticket.turns_left is not None:
        allowed = ticket.turn + ticket.turns_left
        if ticket.turn >= math.ceil(warn_at * allowed):
            found.append(f"turns {ticket.turn} of {allowed}")
    if ticket.tokens_left is not None and ticket.tokens_allowed:
        held = ticket.tokens_allowed - ticket.tokens_left
        if held >= warn_at * ticket.tokens_allowed:
            found.append(f"tokens {held} of {ticket.tokens_allowed} used or held")
    return found


def _by(effective: Effective, path: str) -> str:
    source = effective.source(path)
    return "from the defaults" if source == "defaults" else f"set by rule '{source}'"


def _lift(version: str) -> str:
    # The policy's version, never its path: a file path on disk is no business of a client.
    return f"Change it in the policy (version {version})."


def _setting_of(detection: Detection) -> str:
    return "turn_rate_factor" if detection.detector == "turn_rate" else detection.detector
