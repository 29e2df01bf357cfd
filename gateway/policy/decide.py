"""The policy step: the effective settings of one request, and allow, warn or reject.

Checks that need no state run first (body size, model, input size, identical tool calls);
then the store's atomic ``begin_turn`` enforces the counted limits (turns, session tokens,
budgets) against what is recorded plus what calls in flight hold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from multidict import CIMultiDictProxy

from gateway.credentials import peer_trusted
from gateway.dialects import Dialect, RequestFacts, prompt_parts
from gateway.identity import Identity
from gateway.loops import COUNT_BOUND, Detection, identical_run, rate_detection, tool_name
from gateway.policy.compiled import Caller, CompiledPolicy, Effective
from gateway.policy.model import Budget
from gateway.policy.prices import ModelPrice, hold
from gateway.store import BudgetLimit, Limits, SessionRecord, TurnTicket
from gateway.tokens import TokenCounter

DEFAULT_OUTPUT_RESERVE = 4096
"""Output tokens held for a call that sets no cap of its own."""
BYTES_PER_TOKEN = 3
"""English runs about four bytes a token and code about three; JSON keys only add bytes."""
_HEADLESS_HINTS = ("codex_exec/", "(external, sdk-cli)", "(external, sdk-py)", "(external, sdk-ts)")


@dataclass(slots=True)
class Verdict:
    """A stop: which limit, which rule set it, and what the operator can do about it."""

    limit: str
    rule: str
    message: str
    retry_after: float | None = None
    """Set for window budgets, which reset: answered 429 instead of 400."""


class PolicyStop(Exception):
    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.message)
        self.verdict = verdict


@dataclass(slots=True)
class Decision:
    effective: Effective
    limits: Limits
    reserve_tokens: int = 0
    reserve_cost: float = 0.0
    input_estimate: int | None = None
    detections: list[Detection] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    price: ModelPrice | None = None
    """The model's price; None: unpriced (its cost cannot be counted)."""


def mode_of(headers: CIMultiDictProxy[str]) -> str | None:
    """``X-Gateway-Mode``, else what the client's own User-Agent says (``codex exec``,
    ``claude -p`` and the Agent SDKs run headless)."""
    explicit = headers.get("x-gateway-mode", "").strip().lower()
    if explicit in ("interactive", "headless"):
        return explicit
    return _mode_of_agent(headers.get("user-agent", ""))


@lru_cache(maxsize=1024)
def _mode_of_agent(user_agent: str) -> str | None:
    return "headless" if any(hint in user_agent for hint in _HEADLESS_HINTS) else None


def caller(
    policy: CompiledPolicy,
    identity: Identity,
    model: str | None,
    headers: CIMultiDictProxy[str],
    peer: str | None = None,
    trusted_proxies: Sequence[str] = (),
) -> Caller:
    """What rules match on. The team header counts only from a trusted proxy (``peer`` in
    ``trusted_proxies``): from anyone else it is a claim, and the team comes from ``keys``."""
    trusted = policy.file.team_header is not None and peer_trusted(peer, tuple(trusted_proxies))
    return Caller(
        agent=identity.agent,
        model=model,
        key_hash=identity.key_hash,
        team=policy.team_of(identity.key_hash, headers, trusted),
        session_name=identity.name,
        mode=mode_of(headers),
        headers=tuple((name, headers[name]) for name in policy.header_names if name in headers),
    )


def decide(
    policy: CompiledPolicy,
    who: Caller,
    identity: Identity,
    dialect: Dialect,
    facts: RequestFacts,
    body_size: int,
    record: SessionRecord | None,
    tokens: TokenCounter,
    helper_call: bool,
    now: float,
    body_hash: int | None = None,
) -> Decision:
    """Everything but the counted limits; raises ``PolicyStop`` on a hard stop."""
    effective = policy.resolve(who)
    settings = effective.settings
    limits = settings.limits
    # The policy's version, never its path: a file path on disk is no business of a client.
    lift = f"Change it in the policy (version {policy.version})."

    if limits.max_body_bytes is not None and body_size > limits.max_body_bytes:
        raise PolicyStop(
            Verdict(
                "max_body_bytes",
                effective.source("limits.max_body_bytes"),
                f"The request body has {body_size} bytes, over limits.max_body_bytes "
                f"({limits.max_body_bytes}) {_by(effective, 'limits.max_body_bytes')}. {lift}",
            )
        )

    model = facts.model or ""
    if not effective.model_allowed(model):
        raise PolicyStop(
            Verdict(
                "models",
                effective.source("limits.models"),
                f"Model '{model}' is not allowed for agent {who.agent} "
                f"{_by(effective, 'limits.models')} (allow: {', '.join(limits.models.allow)}; "
                f"deny: {', '.join(limits.models.deny) or 'none'}). {lift}",
            )
        )

    decision = Decision(effective, Limits(), price=policy.price(facts.model, now))
    if decision.price is None and any(b.max_cost is not None for b in settings.budgets):
        raise PolicyStop(_unpriced(effective, model, policy.version))
    if (
        limits.max_request_input_tokens is not None
        or limits.max_session_tokens is not None
        or settings.budgets
    ):
        _hold_tokens(decision, facts, body_size, record, tokens)
    cap = limits.max_request_input_tokens
    if cap is not None and decision.input_estimate is not None and decision.input_estimate > cap:
        raise PolicyStop(
            Verdict(
                "max_request_input_tokens",
                effective.source("limits.max_request_input_tokens"),
                f"The request has about {decision.input_estimate} input tokens, over "
                f"limits.max_request_input_tokens ({cap}) "
                f"{_by(effective, 'limits.max_request_input_tokens')}. {lift}",
            )
        )

    if not helper_call:
        _detect_loops(decision, dialect, facts, record, body_hash)

    decision.limits = Limits(
        max_turns=limits.max_turns,
        max_session_tokens=limits.max_session_tokens,
        budgets=tuple(budget_limit(b, who, effective, now) for b in settings.budgets),
        idle_timeout=limits.idle_timeout,
    )
    return decision


def _hold_tokens(
    decision: Decision,
    facts: RequestFacts,
    body_size: int,
    record: SessionRecord | None,
    tokens: TokenCounter,
) -> None:
    """What a call holds against token limits while in flight: its input and its output cap.

    Holding needs a bound, not a count: the body's size over ``BYTES_PER_TOKEN`` bounds its
    tokens from above for ordinary text and code, and costs nothing. Near a limit, where the
    difference decides, the prompt is counted properly (per-message cached).
    """
    limits = decision.effective.settings.limits
    rough = body_size // BYTES_PER_TOKEN
    near = (
        limits.max_request_input_tokens is not None and rough > limits.max_request_input_tokens // 2
    )
    if not near and record is not None and limits.max_session_tokens is not None:
        allowed = limits.max_session_tokens + record.granted_tokens
        held = record.tokens.total_tokens + record.reserved_tokens
        near = held + rough > 0.9 * allowed
    if near:
        decision.input_estimate = tokens.count_items(prompt_parts(facts), facts.model)
    input_hold = decision.input_estimate if decision.input_estimate is not None else rough
    output_cap = facts.max_output_tokens or DEFAULT_OUTPUT_RESERVE
    decision.reserve_tokens = input_hold + output_cap
    if decision.price is not None:
        decision.reserve_cost = hold(decision.price, input_hold, output_cap)


def _detect_loops(
    decision: Decision,
    dialect: Dialect,
    facts: RequestFacts,
    record: SessionRecord | None,
    body_hash: int | None,
) -> None:
    loops = decision.effective.settings.loops
    # Counted to the threshold, which decides; a call that will be stopped counts on (up to
    # COUNT_BOUND) so that its message names the real run. A flagged loop's every call is
    # past the threshold, and counting on costs about 4 us a turn: it says "at least".
    bound = loops.identical_tool_calls
    if _stops_loops(loops.action, record):
        bound = max(COUNT_BOUND, bound)
    count, signature, more = identical_run(dialect.tool_call_turns(facts), bound)
    if signature and count >= loops.identical_tool_calls:
        decision.detections.append(
            Detection(
                "identical_tool_calls",
                count,
                loops.identical_tool_calls,
                tool_name(signature),
                at_least=more,
            )
        )
    if record is not None:
        # This body again, after a row of identical successful requests.
        repeat = body_hash is not None and body_hash == record.last_body_hash
        if repeat and record.body_repeats + 1 >= loops.repeated_requests:
            decision.detections.append(
                Detection("repeated_requests", record.body_repeats + 1, loops.repeated_requests)
            )
        rate = rate_detection(
            record.rate_fast,
            record.rate_slow,
            record.turns,
            loops.turn_rate_factor,
            loops.min_turns_per_minute,
        )
        if rate is not None:
            decision.detections.append(rate)


def _stops_loops(action: str, record: SessionRecord | None) -> bool:
    """Whether a loop detected now stops the call: not when the policy only flags loops, nor
    while a grant lifts loop stops."""
    if action == "flag":
        return False
    return record is None or record.turns >= record.loops_allowed_until


def loop_verdict(decision: Decision, session: str, record: SessionRecord | None) -> Verdict | None:
    """The stop a detected loop calls for, unless the policy only flags it or a grant lifts it."""
    loops = decision.effective.settings.loops
    if not decision.detections or not _stops_loops(loops.action, record):
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


def limit_verdict(
    limit: str,
    allowed: float,
    used: float,
    session: str,
    effective: Effective,
    retry_after: float | None,
    budget: BudgetLimit | None,
    reason: str = "",
) -> Verdict:
    """The words for a stop by the store's counted limits."""
    grant = f"gateway sessions grant {session}"
    if limit == "max_turns":
        return Verdict(
            limit,
            effective.source("limits.max_turns"),
            f"Session {session} has used all {int(allowed)} turns allowed "
            f"(limits.max_turns {_by(effective, 'limits.max_turns')}). "
            f"To allow more: {grant} --turns 50.",
        )
    if limit == "max_session_tokens":
        return Verdict(
            limit,
            effective.source("limits.max_session_tokens"),
            f"Session {session} would go over its token limit: {int(used)} of {int(allowed)} "
            f"tokens used or held (limits.max_session_tokens "
            f"{_by(effective, 'limits.max_session_tokens')}). "
            f"To allow more: {grant} --tokens 1000000.",
        )
    if budget is not None:
        what = "tokens" if limit == "budget_tokens" else "cost"
        resets = datetime.fromtimestamp(budget.window_end, UTC).strftime("%Y-%m-%d %H:%M UTC")
        return Verdict(
            limit,
            budget.rule,
            f"The {budget.key.split(':')[0]} budget {budget.key} is spent: {used} of "
            f"{allowed} {what} (budgets, rule '{budget.rule}'). It resets at {resets}: "
            f"try again in {max(1, round(retry_after or 0))}s, or raise the budget in the "
            f"policy file.",
            retry_after=retry_after,
        )
    if limit == "session_paused":
        return Verdict(
            limit,
            "operator",
            f"Session {session} was {_status_change('paused', reason)}. Its calls are refused "
            f"until an operator lets it go on: {grant} --turns 20.",
        )
    return Verdict(
        limit,
        "operator",
        f"Session {session} was {_status_change('ended', reason)}. Start a new session to go on.",
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


def budget_limit(budget: Budget, who: Caller, effective: Effective, now: float) -> BudgetLimit:
    owner = (who.team or "unassigned") if budget.per == "team" else (who.key_hash or "no-key")
    period, end = window(budget.window, now)
    return BudgetLimit(
        key=f"{budget.per}:{owner}:{budget.window}:{period}",
        window_end=end,
        max_tokens=budget.max_tokens,
        max_cost=budget.max_cost,
        rule=effective.source("budgets"),
    )


def window(kind: str, now: float) -> tuple[str, float]:
    """The calendar period (UTC) ``now`` falls in, and when it ends."""
    at = datetime.fromtimestamp(now, UTC)
    if kind == "hour":
        start = at.replace(minute=0, second=0, microsecond=0)
        return start.strftime("%Y-%m-%dT%H"), (start + timedelta(hours=1)).timestamp()
    if kind == "day":
        start = at.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y-%m-%d"), (start + timedelta(days=1)).timestamp()
    start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    following = (start + timedelta(days=32)).replace(day=1)
    return start.strftime("%Y-%m"), following.timestamp()


def _unpriced(effective: Effective, model: str, version: str) -> Verdict:
    """A cost budget cannot count a call it has no price for: refused, not let through free."""
    return Verdict(
        "unpriced_model",
        effective.source("budgets"),
        f"Model '{model}' has no price, and a cost budget applies to this call "
        f"(budgets {_by(effective, 'budgets')}), so its cost could not be counted. Give it a "
        f"price in the policy's prices (per million tokens, e.g. prices: {{'{model}': "
        f"{{input: 3, output: 15}}}}), or a default price for every unpriced model with the "
        f"glob '*' (policy version {version}).",
    )


def _by(effective: Effective, path: str) -> str:
    source = effective.source(path)
    return "from the defaults" if source == "defaults" else f"set by rule '{source}'"


def _setting_of(detection: Detection) -> str:
    return "turn_rate_factor" if detection.detector == "turn_rate" else detection.detector
