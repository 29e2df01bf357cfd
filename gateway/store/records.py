"""What the store keeps about a session, and the values passed in and out of it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from gateway.dialects.base import Usage
from gateway.identity import Identity


@dataclass(slots=True)
class TokenTotals:
    turns: int = 0
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
class SessionRecord:
    id: str
    source: str
    agent: str
    first_seen: float
    last_seen: float
    name: str | None = None
    key_hash: str | None = None
    status: str = "active"
    turns: int = 0
    user_turns: int = 0
    aux_requests: int = 0
    """Calls that are not turns (token counting): attributed, not counted as LLM calls."""
    upstream_errors: int = 0
    estimated_turns: int = 0
    """Turns whose usage the gateway estimated (no usage from upstream, or a cut stream)."""
    tokens: TokenTotals = field(default_factory=TokenTotals)
    models: dict[str, TokenTotals] = field(default_factory=dict)
    in_flight: int = 0
    reserved_tokens: int = 0
    """Tokens held by calls in flight, so concurrent calls cannot overshoot a budget."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tokens"]["total_tokens"] = self.tokens.total_tokens
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SessionRecord:
        data = dict(data)
        tokens = dict(data.pop("tokens", {}))
        tokens.pop("total_tokens", None)
        models = {name: TokenTotals(**counts) for name, counts in data.pop("models", {}).items()}
        # In-flight figures belong to a process that is gone.
        data.pop("in_flight", None)
        data.pop("reserved_tokens", None)
        return cls(**data, tokens=TokenTotals(**tokens), models=models)


@dataclass(slots=True, frozen=True)
class Limits:
    """Hard limits checked atomically when a turn begins; None means no limit."""

    max_turns: int | None = None
    max_session_tokens: int | None = None


@dataclass(slots=True, frozen=True)
class TurnStart:
    identity: Identity
    model: str | None
    user_turn: bool
    at: float
    reserve_tokens: int = 0
    """Tokens the call is expected to use (its input estimate), held until it ends."""


@dataclass(slots=True, frozen=True)
class TurnTicket:
    session_id: str
    turn: int
    """This call's number in its session, 1-based."""
    reserved_tokens: int


@dataclass(slots=True, frozen=True)
class TurnEnd:
    model: str | None
    usage: Usage | None
    status: int
    at: float


@dataclass(slots=True, frozen=True)
class SessionQuery:
    agent: str | None = None
    status: str | None = None
    since: float | None = None
    limit: int = 50
    before: float | None = None
    """Cursor: only sessions last seen before this time (the previous page's last entry)."""
