"""What the store keeps about a session, and the values passed in and out of it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from gateway.dialects.base import Usage
from gateway.identity import Identity

EVENTS_KEPT = 20
"""Warnings, detections and grants kept per session (the newest)."""
MODELS_KEPT = 32
"""Models a session's figures are kept apart for; the calls of any more are added up under
``OTHER_MODELS`` (a client naming a new model each call does not grow its session)."""
OTHER_MODELS = "(other models)"
SESSION_STATUSES = ("active", "paused", "ended")
"""A session's ``status`` (``SessionRecord.status``)."""


@dataclass(slots=True)
class TokenTotals:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0

    def add(self, usage: Usage) -> None:
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens
        self.cache_read_tokens += usage.cache_read_tokens
        self.cache_creation_tokens += usage.cache_creation_tokens
        self.reasoning_tokens += usage.reasoning_tokens

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(slots=True)
class ModelTotals(TokenTotals):
    turns: int = 0


@dataclass(slots=True)
class SessionRecord:
    id: str
    source: str
    agent: str
    first_seen: float
    last_seen: float
    name: str | None = None
    key_hash: str | None = None
    """Whose session it is: the principal's owner tag (a gateway key's public id, a JWT
    subject's tag, or in passthrough mode the provider key's hash)."""
    team: str | None = None
    """The team of the principal that started it (team-bound admin roles see only theirs)."""
    principal: str | None = None
    """The public id of the principal that started it."""
    status: str = "active"
    """active; paused (a loop, waiting for a grant); ended (by an operator or idleness)."""
    status_reason: str | None = None
    turns: int = 0
    user_turns: int = 0
    aux_requests: int = 0
    """Calls that are not turns (token counting): attributed, not counted as LLM calls."""
    upstream_errors: int = 0
    upstream_retries: int = 0
    """Attempts the gateway made again after an upstream failure (not turns)."""
    rejected: int = 0
    """Calls the policy stopped before they reached the upstream (not turns)."""
    estimated_turns: int = 0
    """Turns whose usage the gateway estimated (no usage from upstream, or a cut stream)."""
    tokens: TokenTotals = field(default_factory=TokenTotals)
    models: dict[str, ModelTotals] = field(default_factory=dict)
    cost: float = 0.0
    granted_turns: int = 0
    granted_tokens: int = 0
    loops_allowed_until: int = 0
    """A grant lets a stopped loop go on: loop stops are lifted until this turn."""
    restarts: int = 0
    """Times the session was idle past its policy's idle_timeout and began afresh."""
    grants: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    detections: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    compactions: list[dict[str, Any]] = field(default_factory=list)
    """What each compaction did: strategies, tokens before and after, the summary call."""
    compacted_calls: int = 0
    """Calls sent compacted, saved rewrites reused included."""
    tokens_saved: int = 0
    """Input tokens compaction took off the calls sent (calibrated estimates)."""
    summary_calls: int = 0
    context_rewrites: list[dict[str, Any]] = field(default_factory=list)
    """The newest compaction recipes (``compaction.Rewrite``), applied to later requests whose
    history starts with what they stand for."""
    last_body_hash: int | None = None
    body_repeats: int = 0
    """Byte-identical successful requests in a row (1 = no repeat)."""
    rate_fast: float = 0.0
    rate_slow: float = 0.0
    """Turns per minute, smoothed over a few turns and over many: the session's own norm."""
    in_flight: int = 0
    reserved_tokens: int = 0
    """Tokens held by calls in flight, so concurrent calls cannot overshoot a limit."""
    rev: int = 0
    """Changes a call's decision reads (Redis: a replica's kept copy is checked against it
    when the turn begins, ``TurnStart.seen``); 0 in the stores one process holds."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tokens"]["total_tokens"] = self.tokens.total_tokens
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SessionRecord:
        data = dict(data)
        tokens = dict(data.pop("tokens", {}))
        tokens.pop("total_tokens", None)
        models = {name: ModelTotals(**counts) for name, counts in data.pop("models", {}).items()}
        # In-flight figures belong to a process that is gone.
        data.pop("in_flight", None)
        data.pop("reserved_tokens", None)
        return cls(**data, tokens=TokenTotals(**tokens), models=models)

    def note(self, kind: str, event: dict[str, Any]) -> None:
        """Keep an event (a warning, a detection, a rejection, a grant), newest last.

        The same event again (same ``key``) is counted on the last entry, not appended, so a
        loop stopped a hundred times is one entry with ``times: 100``.
        """
        events: list[dict[str, Any]] = getattr(self, kind)
        key = event.get("key")
        if key is not None and events and events[-1].get("key") == key:
            last = events[-1]
            last.update(
                event, times=last.get("times", 1) + 1, first_at=last.get("first_at", last.get("at"))
            )
            return
        events.append(event)
        del events[:-EVENTS_KEPT]


INTERNAL_FIELDS = frozenset(
    {
        "last_body_hash",
        "body_repeats",
        "rate_fast",
        "rate_slow",
        "loops_allowed_until",
        "context_rewrites",
        "rev",
    }
)
"""What the gateway keeps about a session for itself: loop detectors' state, the turn up to
which a grant lifts loop stops, and the compaction recipes (they hold summaries: prompt
content). Stored (``to_json``), never shown to operators (``admin.operator_view``); every other
field is."""


@dataclass(slots=True, frozen=True)
class BudgetLimit:
    key: str
    """``team:platform:day:2026-11-25``: whose, which window, which period."""
    window_end: float
    max_tokens: int | None = None
    max_cost: float | None = None
    max_requests: int | None = None
    rule: str = "defaults"


_PERIODIC = frozenset({"hour", "day", "month"})


def budget_key_parts(key: str) -> tuple[str, str, str]:
    """``per``, owner and window of a budget's key (``per:owner:window:period``), read from
    the right: an owner (a team's name, a JWT subject's tag) may hold a colon, and a minute's
    period holds one (``2026-11-25T10:04``); no period is a window's name."""
    per, _, rest = key.partition(":")
    parts = rest.split(":")
    if len(parts) >= 3 and parts[-2] not in _PERIODIC:
        return per, ":".join(parts[:-3]), parts[-3]
    return per, ":".join(parts[:-2]), parts[-2] if len(parts) >= 2 else ""


@dataclass(slots=True)
class BudgetCounter:
    """One owner's figures in one window. Budgets with the same ``per`` and ``window`` (one
    for tokens, one for requests, say) count the same spending: they share the counter."""

    key: str
    window_end: float
    tokens: int = 0
    cost: float = 0.0
    requests: int = 0
    """LLM calls begun in the window (counted at the start, whatever their outcome)."""
    reserved_tokens: int = 0
    reserved_cost: float = 0.0
    max_tokens: int | None = None
    max_cost: float | None = None
    max_requests: int | None = None
    """The budget's limits as the policy set them at the latest call (not kept on disk)."""


@dataclass(slots=True, frozen=True)
class Limits:
    """Hard limits checked atomically when a turn begins; None means no limit."""

    max_turns: int | None = None
    max_session_tokens: int | None = None
    budgets: tuple[BudgetLimit, ...] = ()
    idle_timeout: float | None = None


@dataclass(slots=True, frozen=True)
class TurnStart:
    identity: Identity
    model: str | None
    user_turn: bool
    at: float
    reserve_tokens: int = 0
    """Tokens the call may use (input estimate plus its output cap), held until it ends."""
    reserve_cost: float = 0.0
    body_hash: int | None = None
    fail_open: bool = True
    """The policy's ``store_outage``: while the backend cannot read the session, go on from a
    record begun in memory (``open``, merged into the stored one later) or raise
    ``LoadFailed`` (``closed``: no limit is ever checked against half the figures)."""
    seen: int | None = None
    """The session's ``rev`` the call was decided on (0: no session): a store whose copy may
    lag (Redis) raises ``SessionChanged`` rather than begin a turn decided on an older one.
    None: not checked."""


@dataclass(slots=True, frozen=True)
class Backlog:
    """What a backend holds in memory that is not yet on its disk (``Store.backlog``)."""

    sessions: int = 0
    """Sessions changed since their last write (those begun in memory included)."""
    budgets: int = 0
    """Budget counters changed since their last write."""
    age: float = 0.0
    """Seconds the oldest unwritten change has waited (0 with nothing waiting)."""
    unloaded: int = 0
    """Sessions begun in memory because the backend could not read them: merged into their
    stored records once it can."""


@dataclass(slots=True, frozen=True)
class LimitHit:
    """A counted limit that stops a turn, as the store found it: everything the policy needs
    to word the refusal (``policy.verdicts.limit_verdict``), and nothing it would have to ask
    the store again."""

    limit: str
    """max_turns, max_session_tokens, budget_tokens, budget_cost, budget_requests,
    session_paused, ..."""
    allowed: float
    used: float
    session_id: str
    retry_after: float | None = None
    """Set for window budgets, which reset."""
    budget: BudgetLimit | None = None
    reason: str = ""
    """Who paused or ended the session, and why (``status_reason``)."""


@dataclass(slots=True, frozen=True)
class TurnTicket:
    session_id: str
    turn: int
    """This call's number in its session, 1-based."""
    reserved_tokens: int
    turns_left: int | None = None
    """Under max_turns plus grants, after this call."""
    tokens_left: int | None = None
    """Under max_session_tokens plus grants, less the tokens used and those calls in flight
    hold, this call's reservation included: what later calls may use if this one uses all
    it may (its own usage is not known when the answer's headers go out)."""
    tokens_allowed: int | None = None
    """max_session_tokens plus grants."""
    budgets: tuple[str, ...] = ()
    reserved_cost: float = 0.0
    lease: str | None = None
    """The Redis store's lease on this call's reservations (None: held in this process)."""


@dataclass(slots=True, frozen=True)
class TurnEnd:
    model: str | None
    usage: Usage | None
    status: int
    at: float
    cost: float = 0.0
    body_hash: int | None = None
    retries: int = 0
    """Upstream attempts after the first (``gateway.upstream.send``)."""


@dataclass(slots=True, frozen=True)
class CompactionNote:
    """What one call's compaction did, for the session's record."""

    saved_tokens: int
    event: dict[str, Any] | None = None
    """Set when something new was done (not for a saved rewrite reused)."""
    rewrite: dict[str, Any] | None = None
    summary_usage: Usage | None = None
    summary_cost: float = 0.0


REWRITES_KEPT = 3
"""Saved rewrites per session: the newest, and a couple for requests still in flight."""


@dataclass(slots=True, frozen=True)
class Grant:
    turns: int = 0
    tokens: int = 0
    by: str = "operator"
    reason: str = ""
    at: float = 0.0


@dataclass(slots=True, frozen=True)
class SessionQuery:
    agent: str | None = None
    status: str | None = None
    since: float | None = None
    limit: int = 50
    before: float | None = None
    """Cursor: only sessions last seen before this time (the previous page's last entry)."""
