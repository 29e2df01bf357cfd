"""In-memory store: one process, nothing survives a restart (``--store memory://``)."""

from __future__ import annotations

from gateway.store.base import check_and_reserve, matches, new_record, settle, touch
from gateway.store.records import (
    Limits,
    SessionQuery,
    SessionRecord,
    TurnEnd,
    TurnStart,
    TurnTicket,
)


class MemoryStore:
    def __init__(self) -> None:
        self.sessions: dict[str, SessionRecord] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _record(self, start: TurnStart) -> SessionRecord:
        record = self.sessions.get(start.identity.session_id)
        if record is None:
            record = self.sessions[start.identity.session_id] = new_record(start)
        return record

    async def begin_turn(self, start: TurnStart, limits: Limits) -> TurnTicket:
        return check_and_reserve(self._record(start), start, limits)

    async def end_turn(self, ticket: TurnTicket, end: TurnEnd) -> None:
        record = self.sessions.get(ticket.session_id)
        if record is not None:
            settle(record, ticket, end)

    async def record_aux(self, start: TurnStart) -> None:
        record = self._record(start)
        touch(record, start)
        record.aux_requests += 1

    async def get(self, session_id: str) -> SessionRecord | None:
        return self.sessions.get(session_id)

    async def find(self, query: SessionQuery) -> list[SessionRecord]:
        found = [r for r in self.sessions.values() if matches(r, query)]
        found.sort(key=lambda r: r.last_seen, reverse=True)
        return found[: query.limit]
