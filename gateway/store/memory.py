"""In-memory store: one process, nothing survives a restart (``--store memory://``).

Bounded: past ``max_sessions`` the least recently changed sessions are forgotten, never one
with a call in flight (its reservation must be released on the record that holds it). The
table is kept in order of last change (a changed session moves to the end of the dict), so
the oldest are at the front and eviction costs no sort. A forgotten session that calls again
starts a fresh count, as one does after its idle timeout; sessions that stopped calling (ended,
idle) are the ones at the front. Measured: about 1.9 KB of Python objects per session with
three turns on two models (``tests/store/test_memory.py``, tracemalloc over 10,000 sessions),
so the default cap holds about 200 MB at most.
"""

from __future__ import annotations

from gateway.store.base import SessionTable
from gateway.store.keys import KeyTable
from gateway.store.records import SessionRecord

MAX_SESSIONS = 100_000


class MemoryStore(KeyTable, SessionTable):
    """The session table as it is (every rule lives in ``SessionTable``), with a cap; gateway
    keys in a dict (``KeyTable``)."""

    def __init__(self, max_sessions: int = MAX_SESSIONS) -> None:
        super().__init__()
        self.max_sessions = max_sessions
        self.evicted = 0
        """Sessions forgotten to stay under the cap, since start."""

    def _changed(self, record: SessionRecord) -> None:
        # Most recently changed last: re-insertion moves a key to the end of a dict.
        sessions = self.sessions
        if sessions.get(record.id) is record:
            del sessions[record.id]
            sessions[record.id] = record
        if len(sessions) > self.max_sessions:
            self._evict()

    def _evict(self) -> None:
        """Forget the least recently changed sessions with nothing in flight."""
        excess = len(self.sessions) - self.max_sessions
        victims: list[str] = []
        for session_id, record in self.sessions.items():
            if len(victims) >= excess:
                break
            if record.in_flight == 0:
                victims.append(session_id)
        for session_id in victims:
            del self.sessions[session_id]
        self.evicted += len(victims)
