"""The store interface, and the in-memory session table every backend builds on.

Exceptions::

    LimitExceeded     a turn would break a hard limit; nothing was recorded
    SessionEnded      a grant for a session that has ended; nothing was granted
    SessionTaken      (``gateway.errors``) a session id another key owns, qualified too
    LoadFailed        the backend could not read a session (the store is degraded)
    StoreRefused      the backend holds another version's layout: not started on it

While the backend fails, the table goes on from memory: a session it could not read is begun
afresh in memory (``unloaded``) and folded into its stored record once the backend reads
again (``absorb``); a backend that falls behind says so through ``watch`` (``trouble``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol, TypeVar

from gateway.errors import SessionTaken
from gateway.identity import QUALIFIER, Identity, own_session, qualified
from gateway.store.records import (
    EVENTS_KEPT,
    MODELS_KEPT,
    OTHER_MODELS,
    REWRITES_KEPT,
    Backlog,
    BudgetCounter,
    BudgetLimit,
    CompactionNote,
    Grant,
    LimitHit,
    Limits,
    ModelTotals,
    SessionQuery,
    SessionRecord,
    TokenTotals,
    TurnEnd,
    TurnStart,
    TurnTicket,
)

log = logging.getLogger("gateway.store")

_FAST, _SLOW = 0.3, 0.02
"""Smoothing of the turn rate: over about three turns, and over about fifty."""
RETENTION_SWEEP_EVERY = 60.0
"""Seconds between two looks for sessions past their retention."""


@dataclass(slots=True, frozen=True)
class Retention:
    """How long a session is kept (seconds; None: for ever): once ``ended`` (by an operator,
    or idle past its policy's ``idle_timeout``), and with no call at all (``idle``). A
    session past it is deleted with everything it holds (the saved summaries included); a
    later call with its id starts afresh."""

    ended: float | None = None
    idle: float | None = None

    def expired(self, record: SessionRecord, now: float) -> bool:
        if record.in_flight:
            return False
        quiet = now - record.last_seen
        if self.idle is not None and quiet > self.idle:
            return True
        return self.ended is not None and record.status == "ended" and quiet > self.ended


BUDGET_GRACE = 300.0
"""Seconds a budget counter is kept after its window ends: a call checked just before the
end (then held up by compaction, say) still begins on the counter its limit names, not on a
fresh one. Older counters are dropped, so minute windows do not pile up."""
BUDGET_SWEEP_EVERY = 60.0
"""How often, at most, the ended budget counters are looked for (a pass over all of them)."""


class StoreRefused(Exception):
    """The store cannot be used as it is (a layout another version of the gateway wrote):
    the gateway does not start on it, and says why."""


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


class SessionChanged(Exception):
    """The session changed since the copy the call was decided on (``TurnStart.seen``):
    nothing was counted, and ``record`` is the session as it is now."""

    def __init__(self, record: SessionRecord | None) -> None:
        super().__init__("the session changed since it was read")
        self.record = record


class LoadFailed(Exception):
    """The backend could not read a session: what it has counted is unknown for now. The
    table answers with a record begun in memory (fail open) unless the turn asked it not to
    (``TurnStart.fail_open``), when this reaches ``accounting.begin_turn``."""

    def __init__(self, session_id: str, cause: BaseException) -> None:
        super().__init__(f"session {session_id} could not be read: {type(cause).__name__}")
        self.session_id = session_id


class Store(Protocol):
    """Sessions, budgets and their accounting.

    ``begin_turn`` is the one atomic operation: it checks the limits against what is recorded
    plus what calls in flight hold, and records the turn and its reservations, all at once. A
    backend shared by replicas (Redis) must keep that atomicity across processes.
    """

    errors: dict[str, int]
    """Backend failures by operation (``load``, ``write``): ``gateway_store_errors_total``."""

    retention: Retention
    """How long ended and idle sessions are kept (the app sets it from ``retention``)."""

    trouble: str | None
    """Why the backend is behind or failing now (writes failing, changes waiting past the
    lag bound, reads failing), or None: the store is then degraded, and a policy with
    ``store_outage: closed`` refuses calls."""

    def watch(self, on_trouble: Callable[[str | None], None], lag_bound: float) -> None:
        """Call ``on_trouble(detail)`` when the store falls behind, ``on_trouble(None)`` when
        it has caught up; changes waiting longer than ``lag_bound`` seconds count as behind."""
        ...

    def backlog(self) -> Backlog:
        """What is held in memory and not yet written (health, metrics)."""
        ...

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

    async def current(self, session_id: str) -> SessionRecord | None:
        """The session for a call's decision: ``get``, or a copy kept by this process that may
        lag other processes' changes (``begin_turn`` then raises ``SessionChanged``)."""
        ...

    async def find(self, query: SessionQuery) -> list[SessionRecord]:
        """Newest (last seen) first."""
        ...

    async def budgets(self) -> list[BudgetCounter]: ...

    # Gateway key records by public id (``gateway.store.keys.KeyTable``): stored at once,
    # read from memory; shared by the replicas a shared store serves.
    async def put_key(self, record: dict[str, Any]) -> None: ...

    async def get_key(self, key_id: str) -> dict[str, Any] | None: ...

    @property
    def keys_known(self) -> bool:
        """False while a shared store's keys could not be read yet (``KeyStore``)."""
        ...

    async def list_keys(self) -> list[dict[str, Any]]: ...


class SessionTable:
    """Sessions and budgets in memory, and every rule for changing them.

    A backend with a disk or a server behind it overrides ``_fetch`` (load a session this
    process has not seen; ``LoadFailed`` when it cannot), ``_changed`` (remember what to
    write) and ``backlog``, and reports its health with ``_set_trouble``.
    """

    def __init__(self) -> None:
        self.sessions: dict[str, SessionRecord] = {}
        self.budget_counters: dict[str, BudgetCounter] = {}
        self._budgets_swept_at = 0.0
        self.retention = Retention()
        """Set by the app from its config (``retention``): sessions past it are deleted."""
        self._retention_swept_at = 0.0
        self.expired = 0
        """Sessions deleted past their retention, since start."""
        self.errors = {"load": 0, "write": 0}
        """Failures of the backend behind the table, by operation (metrics read them)."""
        self.unloaded: set[str] = set()
        """Sessions begun in memory because the backend could not read them: never written
        as they are (that would overwrite the stored counts), folded into the stored record
        first (``_absorb_stored``)."""
        self.trouble: str | None = None
        self.lag_bound = 5.0
        self._troubles: dict[str, str] = {}
        self._on_trouble: Callable[[str | None], None] | None = None

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def watch(self, on_trouble: Callable[[str | None], None], lag_bound: float) -> None:
        self._on_trouble, self.lag_bound = on_trouble, lag_bound
        if self.trouble is not None:
            on_trouble(self.trouble)

    def backlog(self) -> Backlog:
        return Backlog()

    def _set_trouble(self, cause: str, detail: str | None) -> None:
        """One cause (``write``, ``lag``, ``load``) set or cleared; the watcher hears only
        when the store as a whole goes from fine to behind or back."""
        if detail is None:
            if self._troubles.pop(cause, None) is None:
                return
        elif cause in self._troubles:
            return
        else:
            self._troubles[cause] = detail
        was = self.trouble
        self.trouble = "; ".join(self._troubles.values()) or None
        if (was is None) != (self.trouble is None):
            if self.trouble is not None:
                log.warning("store degraded: %s", self.trouble)
            else:
                log.warning("store recovered: caught up with its backlog")
            if self._on_trouble is not None:
                self._on_trouble(self.trouble)

    async def _fetch(self, session_id: str) -> SessionRecord | None:
        return None

    def _changed(self, record: SessionRecord) -> None:
        return None

    def _forget(self, session_id: str) -> None:
        """A session left the table before it was written (moved under another id)."""
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

    async def _session_for(
        self, ident: Identity, at: float, fail_open: bool = True
    ) -> tuple[SessionRecord, Identity]:
        """The caller's own record, made if new. Another key may have started the id since
        the pipeline looked (``identity.own_session``): the caller then goes on under its
        qualified id, decided here with no await before the caller's change. A session the
        backend cannot read is begun in memory (``unloaded``) unless not ``fail_open``."""
        record = self.sessions.get(ident.session_id)
        if record is None or record.key_hash != ident.key_hash:  # else the usual: the caller's
            try:
                ident, record = await own_session(ident, self._session)
            except LoadFailed as failed:
                if not fail_open:
                    raise
                if failed.session_id != ident.session_id:  # the id was another key's
                    ident = qualified(ident)
                record = self.sessions.get(ident.session_id)  # begun meanwhile by another call
                if record is None:
                    record = self.sessions[ident.session_id] = new_record(ident, at)
                    self.unloaded.add(ident.session_id)
        if record is None:
            record = self.sessions[ident.session_id] = new_record(ident, at)
        return record, ident

    def _absorb_stored(self, session_id: str, stored: SessionRecord | None) -> None:
        """The backend read a session that was begun in memory: the stored figures are
        folded in, and the session is written as usual from now on. If the stored id turns
        out to be another key's, the caller's figures move to its qualified id (once no call
        of it is in flight: tickets name the id), as ``own_session`` would have placed them."""
        record = self.sessions.get(session_id)
        if record is None or session_id not in self.unloaded:
            self.unloaded.discard(session_id)
            return
        if stored is None or stored.key_hash == record.key_hash:
            if stored is not None:
                absorb(record, stored)
            self.unloaded.discard(session_id)
            self._changed(record)
            return
        if record.in_flight:
            return  # tried again at the next write
        del self.sessions[session_id]
        self.unloaded.discard(session_id)
        self._forget(session_id)
        owner = record.key_hash or "nokey"
        if session_id.endswith(f"{QUALIFIER}{owner}"):
            lost(record, "its id and its qualified id belong to other keys")
            return
        record.id = f"{session_id}{QUALIFIER}{owner}"
        known = self.sessions.get(record.id)
        if known is None:
            self.sessions[record.id] = record
            self.unloaded.add(record.id)  # the qualified id may be stored too
            self._changed(record)
        elif known.key_hash == record.key_hash:
            absorb(known, record)
            self._changed(known)
        else:
            lost(record, "its qualified id belongs to another key")

    # -- the store interface ------------------------------------------------------------------
    async def begin_turn(self, start: TurnStart, limits: Limits) -> TurnTicket:
        record, ident = await self._session_for(start.identity, start.at, start.fail_open)
        if not start.fail_open and record.id in self.unloaded:
            # Begun in memory by an earlier call (or a note): its limits would be checked
            # against part of the figures.
            raise LoadFailed(record.id, RuntimeError("not read yet"))
        if ident is not start.identity:
            start = replace(start, identity=ident)
        self._sweep_budgets(start.at)
        self._sweep_sessions(start.at)
        counters = self._budgets_for(limits.budgets)
        ticket = check_and_reserve(record, start, limits, counters)
        self._changed(record)
        for counter in unique(counters):
            self._budget_changed(counter)
        return ticket

    async def end_turn(self, ticket: TurnTicket, end: TurnEnd) -> None:
        record = self.sessions.get(ticket.session_id)
        if record is None:  # not reached: a session with a call in flight stays in memory
            try:
                record = await self._session(ticket.session_id)
            except LoadFailed:
                log.error("store: turn %d of a session could not be settled", ticket.turn)
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
        """None for a session the backend cannot read now: the request path then goes on
        as for a new one (``begin_turn`` decides, by the policy's ``store_outage``)."""
        # Read on every call: a session in the table costs no second coroutine.
        record = self.sessions.get(session_id)
        if record is not None:
            return record
        try:
            return await self._session(session_id)
        except LoadFailed:
            return None

    current = get  # one process holds the table: what it has is current

    async def find(self, query: SessionQuery) -> list[SessionRecord]:
        found = [r for r in self.sessions.values() if matches(r, query)]
        found.sort(key=lambda r: r.last_seen, reverse=True)
        return found[: query.limit]

    async def budgets(self) -> list[BudgetCounter]:
        now = time.time()
        return [c for c in self.budget_counters.values() if c.window_end > now]

    def _budgets_for(self, limits: Sequence[BudgetLimit]) -> list[BudgetCounter]:
        """The counter of each budget, made if new, in the same order. Budgets with the same
        owner and window share one; its shown limits are the tightest the policy sets now."""
        counters, seen = [], set()
        for limit in limits:
            counter = self.budget_counters.get(limit.key)
            if counter is None:
                counter = BudgetCounter(limit.key, limit.window_end)
                self.budget_counters[limit.key] = counter
            if limit.key not in seen:
                seen.add(limit.key)
                counter.max_tokens, counter.max_cost = limit.max_tokens, limit.max_cost
                counter.max_requests = limit.max_requests
            else:
                counter.max_tokens = _tightest(counter.max_tokens, limit.max_tokens)
                counter.max_cost = _tightest(counter.max_cost, limit.max_cost)
                counter.max_requests = _tightest(counter.max_requests, limit.max_requests)
            counters.append(counter)
        return counters

    def _sweep_sessions(self, now: float) -> None:
        """Delete, from this table, the sessions past their retention (at most once every
        ``RETENTION_SWEEP_EVERY``; a backend deletes its stored ones itself). One pass over
        the table: bounded by its cap, once a minute."""
        retention = self.retention
        if retention.ended is None and retention.idle is None:
            return
        if self._retention_swept_at <= now < self._retention_swept_at + RETENTION_SWEEP_EVERY:
            return
        self._retention_swept_at = now
        gone = [
            session_id
            for session_id, record in self.sessions.items()
            if retention.expired(record, now) and self._may_forget(session_id)
        ]
        for session_id in gone:
            del self.sessions[session_id]
            self._forget(session_id)
        self.expired += len(gone)
        if gone:
            self._expired(gone)

    def _expired(self, session_ids: list[str]) -> None:
        """Sessions deleted past their retention (a backend deletes its stored copies)."""
        return None

    def _may_forget(self, session_id: str) -> bool:
        """Whether the table may drop the session (a backend keeps what it has not written)."""
        return session_id not in self.unloaded

    def _sweep_budgets(self, now: float) -> None:
        """Drop the counters whose window ended over ``BUDGET_GRACE`` ago: a minute window
        makes a counter per owner a minute, which nothing reads once it has ended."""
        if self._budgets_swept_at <= now < self._budgets_swept_at + BUDGET_SWEEP_EVERY:
            return
        self._budgets_swept_at = now
        cutoff = now - BUDGET_GRACE
        for key in [k for k, c in self.budget_counters.items() if c.window_end < cutoff]:
            del self.budget_counters[key]


_N = TypeVar("_N", int, float)


def _tightest(current: _N | None, other: _N | None) -> _N | None:
    return other if current is None else current if other is None else min(current, other)


def unique(counters: Sequence[BudgetCounter]) -> Sequence[BudgetCounter]:
    """Each counter once: budgets that share one (same owner and window) count a call once."""
    if len(counters) < 2:  # the common case (no budget, or one): nothing to build
        return counters
    return list({id(counter): counter for counter in counters}.values())


# -- the rules, on plain records --------------------------------------------------------------
def new_record(ident: Identity, at: float) -> SessionRecord:
    return SessionRecord(
        id=ident.session_id,
        source=ident.source,
        agent=ident.agent,
        name=ident.name,
        key_hash=ident.key_hash,
        team=ident.team,
        principal=ident.principal,
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
    counted = unique(budgets)
    for counter in counted:
        counter.requests += 1  # a request from its start, whatever comes of it
        counter.reserved_tokens += start.reserve_tokens
        counter.reserved_cost += start.reserve_cost
    return TurnTicket(
        record.id,
        record.turns,
        start.reserve_tokens,
        turns_left=turns_left,
        tokens_left=tokens_left,
        tokens_allowed=tokens_allowed,
        budgets=tuple(c.key for c in counted),
        reserved_cost=start.reserve_cost,
    )


def _check_budget(
    limit: BudgetLimit, counter: BudgetCounter, start: TurnStart, session_id: str
) -> None:
    # Whole seconds, rounded up: a client that waits as told finds the window ended.
    retry_after = float(max(1, math.ceil(limit.window_end - start.at)))
    if limit.max_requests is not None and counter.requests >= limit.max_requests:
        raise LimitExceeded(
            LimitHit(
                "budget_requests",
                limit.max_requests,
                counter.requests,
                session_id,
                retry_after=retry_after,
                budget=limit,
            )
        )
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
    record.upstream_retries += end.retries
    if end.status >= 400:
        record.upstream_errors += 1
    elif end.body_hash is not None:
        # Retry storms are repeats of requests that succeeded: a resend after a failure is a
        # client's ordinary retry.
        same = end.body_hash == record.last_body_hash
        record.body_repeats = record.body_repeats + 1 if same else 1
        record.last_body_hash = end.body_hash
    per_model = record.models.setdefault(model_slot(record.models, end.model), ModelTotals())
    per_model.turns += 1
    record.cost += end.cost
    if end.usage is not None:
        record.tokens.add(end.usage)
        per_model.add(end.usage)
        if end.usage.estimated:
            record.estimated_turns += 1


_SUMMED = (
    "turns",
    "user_turns",
    "aux_requests",
    "upstream_errors",
    "upstream_retries",
    "rejected",
    "estimated_turns",
    "cost",
    "granted_turns",
    "granted_tokens",
    "restarts",
    "compacted_calls",
    "tokens_saved",
    "summary_calls",
)
_EVENTS = ("grants", "warnings", "detections", "rejections", "compactions")
_STRICTNESS = {"active": 0, "paused": 1, "ended": 2}


def model_slot(models: dict[str, ModelTotals], model: str | None) -> str:
    """The name a call's figures are kept under: its model's, or past ``MODELS_KEPT`` models,
    ``OTHER_MODELS``."""
    name = model or "unknown"
    if name in models or len(models) < MODELS_KEPT:
        return name
    return OTHER_MODELS


def absorb(record: SessionRecord, stored: SessionRecord) -> None:
    """Fold ``stored`` (what the backend had) into ``record`` (what this process counted
    without it): counts, tokens and cost added, so neither side's are lost; events of both
    kept, stored first, to the usual caps; the stricter status kept (an operator's end or a
    pause stands). ``record`` stays the object calls in flight settle on."""
    for name in _SUMMED:
        setattr(record, name, getattr(stored, name) + getattr(record, name))
    _add_totals(record.tokens, stored.tokens)
    models, record.models = record.models, dict(stored.models)
    for model, totals in models.items():
        slot = model_slot(record.models, model)
        _add_totals(record.models.setdefault(slot, ModelTotals()), totals)
    for kind in _EVENTS:
        setattr(record, kind, [*getattr(stored, kind), *getattr(record, kind)][-EVENTS_KEPT:])
    record.context_rewrites = [*stored.context_rewrites, *record.context_rewrites][-REWRITES_KEPT:]
    # A grant's turn number counted on this process's turns: after the stored ones now.
    shifted = record.loops_allowed_until + stored.turns if record.loops_allowed_until else 0
    record.loops_allowed_until = max(stored.loops_allowed_until, shifted)
    record.first_seen = min(record.first_seen, stored.first_seen)
    record.last_seen = max(record.last_seen, stored.last_seen)
    record.source = stored.source
    record.name = record.name or stored.name
    if record.agent == "unknown":
        record.agent = stored.agent
    if _STRICTNESS.get(stored.status, 0) > _STRICTNESS.get(record.status, 0):
        record.status, record.status_reason = stored.status, stored.status_reason
    if record.last_body_hash is None:
        record.last_body_hash, record.body_repeats = stored.last_body_hash, stored.body_repeats
    record.rate_slow = stored.rate_slow or record.rate_slow  # the longer norm
    record.rate_fast = record.rate_fast or stored.rate_fast


def _add_totals(into: TokenTotals, other: TokenTotals) -> None:
    for f in fields(other):
        setattr(into, f.name, getattr(into, f.name) + getattr(other, f.name))


def lost(record: SessionRecord, why: str) -> None:
    """Figures the store gives up on: logged with their size (never content)."""
    log.error(
        "store: %d turns and %d tokens counted in memory could not be merged: %s",
        record.turns,
        record.tokens.total_tokens,
        why,
    )


def matches(record: SessionRecord, query: SessionQuery) -> bool:
    return (
        (query.agent is None or record.agent == query.agent)
        and (query.status is None or record.status == query.status)
        and (query.since is None or record.last_seen >= query.since)
        and (query.before is None or record.last_seen < query.before)
    )
