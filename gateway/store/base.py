"""The store interface, and the session table logic every backend shares.

Exceptions::

    LimitExceeded     a turn would break a hard limit; nothing was recorded
"""

from __future__ import annotations

from typing import Protocol

from gateway.store.records import (
    Limits,
    SessionQuery,
    SessionRecord,
    TokenTotals,
    TurnEnd,
    TurnStart,
    TurnTicket,
)


class LimitExceeded(Exception):
    def __init__(self, limit: str, allowed: int, used: int, session_id: str) -> None:
        super().__init__(f"session {session_id}: {limit} {used} of {allowed}")
        self.limit = limit
        self.allowed = allowed
        self.used = used
        self.session_id = session_id


class Store(Protocol):
    """Sessions and their accounting.

    ``begin_turn`` is the one atomic operation: it checks the limits against what is recorded
    plus what calls in flight hold, and records the turn and its reservation, all at once. A
    backend shared by replicas (Redis) must keep that atomicity across processes.
    """

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def begin_turn(self, start: TurnStart, limits: Limits) -> TurnTicket:
        """Record a new turn; raise ``LimitExceeded`` (recording nothing) if it may not start."""
        ...

    async def end_turn(self, ticket: TurnTicket, end: TurnEnd) -> None:
        """Release the reservation and add the call's real usage. Must not be skipped."""
        ...

    async def record_aux(self, start: TurnStart) -> None:
        """A call that belongs to a session but is not a turn (token counting)."""
        ...

    async def get(self, session_id: str) -> SessionRecord | None: ...

    async def find(self, query: SessionQuery) -> list[SessionRecord]:
        """Newest (last seen) first."""
        ...


def new_record(start: TurnStart) -> SessionRecord:
    ident = start.identity
    return SessionRecord(
        id=ident.session_id,
        source=ident.source,
        agent=ident.agent,
        name=ident.name,
        key_hash=ident.key_hash,
        first_seen=start.at,
        last_seen=start.at,
    )


def touch(record: SessionRecord, start: TurnStart) -> None:
    ident = start.identity
    record.last_seen = max(record.last_seen, start.at)
    if ident.name:
        record.name = ident.name
    if record.agent == "unknown":
        record.agent = ident.agent


def check_and_reserve(record: SessionRecord, start: TurnStart, limits: Limits) -> TurnTicket:
    """The atomic core of ``begin_turn``: runs with no await inside."""
    if limits.max_turns is not None and record.turns >= limits.max_turns:
        raise LimitExceeded("max_turns", limits.max_turns, record.turns, record.id)
    if limits.max_session_tokens is not None:
        used = record.tokens.total_tokens + record.reserved_tokens
        if used + start.reserve_tokens > limits.max_session_tokens:
            raise LimitExceeded("max_session_tokens", limits.max_session_tokens, used, record.id)
    touch(record, start)
    record.turns += 1
    if start.user_turn:
        record.user_turns += 1
    record.in_flight += 1
    record.reserved_tokens += start.reserve_tokens
    return TurnTicket(record.id, record.turns, start.reserve_tokens)


def settle(record: SessionRecord, ticket: TurnTicket, end: TurnEnd) -> None:
    record.in_flight = max(0, record.in_flight - 1)
    record.reserved_tokens = max(0, record.reserved_tokens - ticket.reserved_tokens)
    record.last_seen = max(record.last_seen, end.at)
    if end.status >= 400:
        record.upstream_errors += 1
    model = end.model or "unknown"
    per_model = record.models.get(model)
    if per_model is None:
        per_model = record.models[model] = TokenTotals()
    per_model.turns += 1
    if end.usage is not None:
        record.tokens.add(end.usage)
        per_model.add(end.usage)
        if end.usage.estimated:
            record.estimated_turns += 1


def matches(record: SessionRecord, query: SessionQuery) -> bool:
    return (
        (query.agent is None or record.agent == query.agent)
        and (query.status is None or record.status == query.status)
        and (query.since is None or record.last_seen >= query.since)
        and (query.before is None or record.last_seen < query.before)
    )
