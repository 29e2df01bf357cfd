"""The policy's decision: the effective settings of one request, and allow, warn or reject.

Values in, values out: the pipeline's policy step (``policy.step``) hands in a ``Call`` and
records what comes back. Checks that need no state run first (body size, model, input size,
identical tool calls); then the store's atomic ``begin_turn`` enforces the counted limits
(turns, session tokens, budgets) against what is recorded plus what calls in flight hold, and
``limit_verdict`` words the store's ``LimitHit``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from multidict import CIMultiDictProxy

from gateway.credentials import peer_trusted
from gateway.dialects import Dialect, RequestFacts, prompt_parts
from gateway.identity import Identity
from gateway.loops import COUNT_BOUND, Detection, identical_run, rate_detection, tool_name
from gateway.policy import verdicts
from gateway.policy.budgets import budget_limit
from gateway.policy.compiled import Caller, CompiledPolicy, Effective
from gateway.policy.prices import ModelPrice, hold
from gateway.policy.verdicts import Verdict
from gateway.store import Limits, SessionRecord
from gateway.tokens import TokenCounter

DEFAULT_OUTPUT_RESERVE = 4096
"""Output tokens held for a call that sets no cap of its own."""
BYTES_PER_TOKEN = 3
"""English runs about four bytes a token and code about three; JSON keys only add bytes."""
_HEADLESS_HINTS = ("codex_exec/", "(external, sdk-cli)", "(external, sdk-py)", "(external, sdk-ts)")


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


def passthrough_team(
    policy: CompiledPolicy,
    key_hash: str | None,
    headers: CIMultiDictProxy[str],
    peer: str | None = None,
    trusted_proxies: Sequence[str] = (),
) -> str | None:
    """A passthrough caller's team: its provider key's in the policy's ``keys``, else the team
    header when a trusted proxy (``peer`` in ``trusted_proxies``) set it; from anyone else the
    header is a claim. (A gateway key's or a JWT's team is its credential's.)"""
    trusted = policy.file.team_header is not None and peer_trusted(peer, tuple(trusted_proxies))
    return policy.team_of(key_hash, headers, trusted)


def caller(
    policy: CompiledPolicy,
    identity: Identity,
    model: str | None,
    headers: CIMultiDictProxy[str],
    scopes: frozenset[str] = frozenset(),
) -> Caller:
    """What rules match on: the authenticated principal, team and scopes (``identity``, set
    from the credential), and what the request says."""
    return Caller(
        agent=identity.agent,
        model=model,
        key_hash=identity.key_hash,
        team=identity.team,
        session_name=identity.name,
        mode=mode_of(headers),
        headers=tuple((name, headers[name]) for name in policy.header_names if name in headers),
        principal=identity.principal,
        scopes=scopes,
    )


@dataclass(slots=True)
class Call:
    """One request as the policy needs it (``decide``), built by the policy step and never
    changed. Not ``frozen``: a frozen dataclass sets each field through ``object.__setattr__``,
    which on every call cost more than the rest of building it."""

    who: Caller
    """What rules match on."""
    dialect: Dialect
    facts: RequestFacts
    """What the request says."""
    record: SessionRecord | None
    """The session as it was when the call arrived (None for a new session)."""
    now: float
    body_size: int
    body_hash: int | None = None
    """The raw body's hash: the same bytes again feed the repeated-requests detector."""
    helper_call: bool = False
    """An agent's own side call (``Exchange.helper_call``): not a loop turn."""


def decide(policy: CompiledPolicy, call: Call, tokens: TokenCounter) -> Decision:
    """Everything but the counted limits; raises ``PolicyStop`` on a hard stop."""
    who, facts, body_size = call.who, call.facts, call.body_size
    effective = policy.resolve(who)
    settings = effective.settings
    limits = settings.limits
    if limits.max_body_bytes is not None and body_size > limits.max_body_bytes:
        raise PolicyStop(verdicts.body_too_large(effective, body_size, policy.version))

    model = facts.model or ""
    if not effective.model_allowed(model):
        raise PolicyStop(verdicts.model_refused(effective, model, who.agent, policy.version))

    decision = Decision(effective, Limits(), price=policy.price(facts.model, call.now))
    if decision.price is None and any(b.max_cost is not None for b in settings.budgets):
        raise PolicyStop(verdicts.unpriced(effective, model, policy.version))
    if (
        limits.max_request_input_tokens is not None
        or limits.max_session_tokens is not None
        or settings.budgets
    ):
        _hold_tokens(decision, facts, body_size, call.record, tokens)
    cap = limits.max_request_input_tokens
    if cap is not None and decision.input_estimate is not None and decision.input_estimate > cap:
        raise PolicyStop(
            verdicts.input_too_large(effective, decision.input_estimate, policy.version)
        )

    if not call.helper_call:
        _detect_loops(decision, call.dialect, facts, call.record, call.body_hash)

    decision.limits = Limits(
        max_turns=limits.max_turns,
        max_session_tokens=limits.max_session_tokens,
        budgets=tuple(budget_limit(b, who, effective, call.now) for b in settings.budgets),
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
    if verdicts.stops_loops(loops.action, record):
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
