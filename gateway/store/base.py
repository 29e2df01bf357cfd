"""The store interface, and the in-memory session table every backend builds on.

Exceptions::

    LimitExceeded     a turn would break a hard limit; nothing was recorded
    SessionEnded      a grant for a session that has ended; nothing was granted
    SessionTaken      (``gateway.errors``) a session id another key owns, qualified too
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any, Protocol

from gateway.errors import SessionTaken
from gateway.identity import Identity, own_session
from gateway.store.records import (
    REWRITES_KEPT,
    BudgetCounter,
    BudgetLimit,
    CompactionNote,
    Grant,
    LimitHit,
    Limits,
    ModelTotals,
    SessionQuery,
    SessionRecord,
    TurnEnd,
    TurnStart,
    TurnTicket,
)

_FAST, _SLOW = 0.3, 0.02
"""Smoothing of the turn rate: over about three turns, and over about fifty."""


class LimitExceeded(Exception):
    """Carries the ``LimitHit`` whole: the policy words the refusal from it."""

    def __init__(self, hit: LimitHit) -> None:
        super().__init__(f"session {hit.session_id}: {hit.limit} {hit.used} of {hit.allowed}")
        self.hit = hit


class SessionEnded(Exception):
    """An ended session takes no grant: ended is final (``restart_if_idle`` keeps it ended),
    so a grant would be recorded and change nothing."""

    def __init__(self, record: SessionRecord) -> None:
        super().__init__(f"session {record.id} is ended")
        self.session_id = record.id
        self.status = record.status
        self.reason = record.status_reason or ""


class Store(Protocol):
    """Sessions, budgets and their accounting.

    ``begin_turn`` is the one atomic operation: it checks the limits against what is recorded
    plus what calls in flight hold, and records the turn and its reservations, all at once. A
    backend shared by replicas (Redis) must keep that atomicity across processes.
    """

    errors: dict[str, int]
    """Backend failures by operation (``load``, ``write``): ``gateway_store_errors_total``."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def begin_turn(self, start: TurnStart, limits: Limits) -> TurnTicket:
        """Record a new turn; raise ``LimitExceeded`` (recording nothing) if it may not start."""
        ...

    async def end_turn(self, ticket: TurnTicket, end: TurnEnd) -> None:
        """Release the reservations and add the call's real usage. Must not be skipped."""
        ...

    # The calls below record something about a session, not a turn: they take only whose
    # call it is and when (the session is made if new, under the caller's own id).
    async def record_aux(self, identity: Identity, at: float) -> None:
        """A call that belongs to a session but is not a turn (token counting)."""
        ...

    async def note(
        self,
        identity: Identity,
        at: float,
        kind: str,
        event: dict[str, Any],
        *,
        rejected: bool = False,
    ) -> None:
        """Keep a warning or detection with the session; count a rejected call."""
        ...

    async def record_compaction(self, identity: Identity, at: float, note: CompactionNote) -> None:
        """A call went compacted: count it, keep its rewrite, bill its summary call."""
        ...

    async def grant(self, session_id: str, grant: Grant) -> SessionRecord | None:
        """More turns or tokens for a session; a paused session goes on. Raises
        ``SessionEnded`` (granting nothing) for an ended one."""
        ...

    async def set_status(
        self, session_id: str, status: str, reason: str
    ) -> SessionRecord | None: ...

    async def get(self, session_id: str) -> SessionRecord | None: ...

    async def find(self, query: SessionQuery) -> list[SessionRecord]:
        """Newest (last seen) first."""
        ...

    async def budgets(self) -> list[BudgetCounter]: ...


class SessionTable:
    """Sessions and budgets in memory, and every rule for changing them.

    A backend with a disk or a server behind it overrides ``_fetch`` (load a session this
    process has not seen) and ``_changed`` (remember what to write).
    """

    def __init__(self) -> None:
        self.sessions: dict[str, SessionRecord] = {}
        self.budget_counters: dict[str, BudgetCounter] = {}
        self.errors = {"load": 0, "write": 0}
        """Failures of the backend behind the table, by operation (metrics read them)."""

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def _fetch(self, session_id: str) -> SessionRecord | None:
        return None

    def _changed(self, record: SessionRecord) -> None:
        return None

    def _budget_changed(self, counter: BudgetCounter) -> None:
        return None

    async def _session(self, session_id: str) -> SessionRecord | None:
        record = self.sessions.get(session_id)
        if record is None:
            record = await self._fetch(session_id)
            # Another call may have created it while this one waited for the disk.
            record = self.sessions.get(session_id) or record
            if record is not None:
                self.sessions[session_id] = record
        return record

    async def _session_for(self, ident: Identity, at: float) -> tuple[SessionRecord, Identity]:
        """The caller's own record, made if new. Another key may have started the id since
        the pipeline looked (``identity.own_session``): the caller then goes on under its
        qualified id, decided here with no await before the caller's change."""
        record = self.sessions.get(ident.session_id)
        if record is None or record.key_hash != ident.key_hash:  # else the usual: the caller's
            ident, record = await own_session(ident, self._session)
        if record is None:
            record = self.sessions[ident.session_id] = new_record(ident, at)
        return record, ident

    # -- the store interface ------------------------------------------------------------------
    async def begin_turn(self, start: TurnStart, limits: Limits) -> TurnTicket:
        record, ident = await self._session_for(start.identity, start.at)
        if ident is not start.identity:
            start = replace(start, identity=ident)
        counters = [self._budget(limit) for limit in limits.budgets]
        ticket = check_and_reserve(record, start, limits, counters)
        self._changed(record)
        for counter in counters:
            self._budget_changed(counter)
        return ticket

    async def end_turn(self, ticket: TurnTicket, end: TurnEnd) -> None:
        record = self.sessions.get(ticket.session_id) or await self._session(ticket.session_id)
        if record is not None:
            settle(record, ticket, end)
            self._changed(record)
        used = end.usage.total_tokens if end.usage else 0
        for key in ticket.budgets:
            counter = self.budget_counters.get(key)
            if counter is not None:
                counter.reserved_tokens = max(0, counter.reserved_tokens - ticket.reserved_tokens)
                counter.reserved_cost = max(0.0, counter.reserved_cost - ticket.reserved_cost)
                counter.tokens += used
                counter.cost += end.cost
                self._budget_changed(counter)

    async def record_aux(self, identity: Identity, at: float) -> None:
        record, identity = await self._session_for(identity, at)
        touch(record, identity, at)
        record.aux_requests += 1
        self._changed(record)

    async def note(
        self,
        identity: Identity,
        at: float,
        kind: str,
        event: dict[str, Any],
        *,
        rejected: bool = False,
    ) -> None:
        record, identity = await self._session_for(identity, at)
        touch(record, identity, at)
        record.note(kind, event)
        if rejected:
            record.rejected += 1
        self._changed(record)

    async def record_compaction(self, identity: Identity, at: float, note: CompactionNote) -> None:
        record, _ = await self._session_for(identity, at)
        record.compacted_calls += 1
        record.tokens_saved += note.saved_tokens
        if note.event is not None:
            record.note("compactions", note.event)
        if note.rewrite is not None:
            record.context_rewrites = [*record.context_rewrites, note.rewrite][-REWRITES_KEPT:]
        if note.summary_usage is not None:
            record.summary_calls += 1
            record.tokens.add(note.summary_usage)
            record.cost += note.summary_cost
        self._changed(record)

    async def grant(self, session_id: str, grant: Grant) -> SessionRecord | None:
        record = await self._session(session_id)
        if record is None:
            return None
        if record.status == "ended":
            raise SessionEnded(record)
        record.granted_turns += grant.turns
        record.granted_tokens += grant.tokens
        record.loops_allowed_until = record.turns + max(grant.turns, 1)
        record.note(
            "grants",
            {
                "turns": grant.turns,
                "tokens": grant.tokens,
                "by": grant.by,
                "reason": grant.reason,
                "at": grant.at,
            },
        )
        if record.status == "paused":
            record.status, record.status_reason = "active", f"granted by {grant.by}"
        self._changed(record)
        return record

    async def set_status(self, session_id: str, status: str, reason: str) -> SessionRecord | None:
        record = await self._session(session_id)
        if record is None:
            return None
        record.status, record.status_reason = status, reason
        self._changed(record)
        return record

    async def get(self, session_id: str) -> SessionRecord | None:
        # Read on every call: a session in the table costs no second coroutine.
        return self.sessions.get(session_id) or await self._session(session_id)

    async def find(self, query: SessionQuery) -> list[SessionRecord]:
        found = [r for r in self.sessions.values() if matches(r, query)]
        found.sort(key=lambda r: r.last_seen, reverse=True)
        return found[: query.limit]

    async def budgets(self) -> list[BudgetCounter]:
        now = time.time()
        return [c for c in self.budget_counters.values() if c.window_end > now]

    def _budget(self, limit: BudgetLimit) -> BudgetCounter:
        counter = self.budget_counters.get(limit.key)
        if counter is None:
            counter = self.budget_counters[limit.key] = BudgetCounter(limit.key, limit.window_end)
        counter.max_tokens, counter.max_cost = limit.max_tokens, limit.max_cost
        return counter


# -- the rules, on plain records --------------------------------------------------------------
def new_record(ident: Identity, at: float) -> SessionRecord:
    return SessionRecord(
        id=ident.session_id,
        source=ident.source,
        agent=ident.agent,
        name=ident.name,
        key_hash=ident.key_hash,
        first_seen=at,
        last_seen=at,
    )


def touch(record: SessionRecord, ident: Identity, at: float) -> None:
    record.last_seen = max(record.last_seen, at)
    if ident.name:
        record.name = ident.name
    if record.agent == "unknown":
        record.agent = ident.agent


def restart_if_idle(record: SessionRecord, start: TurnStart, idle_timeout: float | None) -> None:
    """A session idle past its timeout has ended; the same id now starts a fresh count."""
    if idle_timeout is None or record.in_flight or start.at - record.last_seen <= idle_timeout:
        return
    if record.status == "ended" and record.status_reason != "idle":
        return  # ended by an operator: stays ended
    fresh = new_record(start.identity, start.at)
    fresh.first_seen = record.first_seen
    fresh.restarts = record.restarts + 1
    for f in fields(fresh):
        setattr(record, f.name, getattr(fresh, f.name))


def check_and_reserve(
    record: SessionRecord,
    start: TurnStart,
    limits: Limits,
    budgets: Sequence[BudgetCounter] = (),
) -> TurnTicket:
    """The atomic core of ``begin_turn``: runs with no await inside."""
    if record.key_hash != start.identity.key_hash:
        raise SessionTaken(record.id)  # a session is only ever spent by its own key
    restart_if_idle(record, start, limits.idle_timeout)
    if record.status != "active":
        raise LimitExceeded(
            LimitHit(f"session_{record.status}", 0, 0, record.id, reason=record.status_reason or "")
        )
    turns_left = tokens_left = tokens_allowed = None
    if limits.max_turns is not None:
        allowed = limits.max_turns + record.granted_turns
        if record.turns >= allowed:
            raise LimitExceeded(LimitHit("max_turns", allowed, record.turns, record.id))
        turns_left = allowed - record.turns - 1
    if limits.max_session_tokens is not None:
        allowed = limits.max_session_tokens + record.granted_tokens
        used = record.tokens.total_tokens + record.reserved_tokens
        if used + start.reserve_tokens > allowed:
            raise LimitExceeded(LimitHit("max_session_tokens", allowed, used, record.id))
        tokens_left = allowed - used - start.reserve_tokens
        tokens_allowed = allowed
    for limit, counter in zip(limits.budgets, budgets, strict=True):
        _check_budget(limit, counter, start, record.id)
    _update_rate(record, start.at)
    touch(record, start.identity, start.at)
    record.turns += 1
    if start.user_turn:
        record.user_turns += 1
    record.in_flight += 1
    record.reserved_tokens += start.reserve_tokens
    for counter in budgets:
        counter.reserved_tokens += start.reserve_tokens
        counter.reserved_cost += start.reserve_cost
    return TurnTicket(
        record.id,
        record.turns,
        start.reserve_tokens,
        turns_left=turns_left,
        tokens_left=tokens_left,
        tokens_allowed=tokens_allowed,
        budgets=tuple(c.key for c in budgets),
        reserved_cost=start.reserve_cost,
    )


def _check_budget(
    limit: BudgetLimit, counter: BudgetCounter, start: TurnStart, session_id: str
) -> None:
    retry_after = max(1.0, limit.window_end - start.at)
    if limit.max_tokens is not None:
        used = counter.tokens + counter.reserved_tokens
        if used + start.reserve_tokens > limit.max_tokens:
            raise LimitExceeded(
                LimitHit(
                    "budget_tokens",
                    limit.max_tokens,
                    used,
                    session_id,
                    retry_after=retry_after,
                    budget=limit,
                )
            )
    if limit.max_cost is not None:
        spent = counter.cost + counter.reserved_cost
        if spent + start.reserve_cost > limit.max_cost:
            raise LimitExceeded(
                LimitHit(
                    "budget_cost",
                    limit.max_cost,
                    round(spent, 6),
                    session_id,
                    retry_after=retry_after,
                    budget=limit,
                )
            )


def _update_rate(record: SessionRecord, at: float) -> None:
    if record.turns == 0:
        return
    gap = max(at - record.last_seen, 0.05)
    rate = 60.0 / gap
    if record.turns == 1:
        record.rate_fast = record.rate_slow = rate
        return
    record.rate_fast += _FAST * (rate - record.rate_fast)
    record.rate_slow += _SLOW * (rate - record.rate_slow)


def settle(record: SessionRecord, ticket: TurnTicket, end: TurnEnd) -> None:
    record.in_flight = max(0, record.in_flight - 1)
    record.reserved_tokens = max(0, record.reserved_tokens - ticket.reserved_tokens)
    record.last_seen = max(record.last_seen, end.at)
    if end.status >= 400:
        record.upstream_errors += 1
    elif end.body_hash is not None:
        # Retry storms are repeats of requests that succeeded: a resend after a failure is a
        # client's ordinary retry.
        same = end.body_hash == record.last_body_hash
        record.body_repeats = record.body_repeats + 1 if same else 1
        record.last_body_hash = end.body_hash
    model = end.model or "unknown"
    per_model = record.models.get(model)
    if per_model is None:
        per_model = record.models[model] = ModelTotals()
    per_model.turns += 1
    record.cost += end.cost
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
