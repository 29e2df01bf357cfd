"""SQLite store (the default): sessions survive restarts; the event loop never touches disk.

Sessions being served live in memory, where ``begin_turn`` checks and reserves atomically (one
event loop, no await in between). Disk work runs on one dedicated thread: a session unknown in
memory is loaded from there once, and changed sessions are written behind in batches every
``flush_interval`` seconds and at shutdown. A crash loses at most that interval of counts.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from gateway.store.base import check_and_reserve, new_record, settle, touch
from gateway.store.records import (
    Limits,
    SessionQuery,
    SessionRecord,
    TurnEnd,
    TurnStart,
    TurnTicket,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    status TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_last_seen ON sessions (last_seen DESC);
"""
_UPSERT = (
    "INSERT INTO sessions (id, agent, status, first_seen, last_seen, data)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET agent=excluded.agent,"
    " status=excluded.status, last_seen=excluded.last_seen, data=excluded.data"
)
Row = tuple[str, str, str, float, float, bytes]


class SqliteStore:
    def __init__(
        self, path: str | Path, flush_interval: float = 0.25, max_cached: int = 50_000
    ) -> None:
        self.path = Path(path)
        self.flush_interval = flush_interval
        self.max_cached = max_cached
        self._cached: dict[str, SessionRecord] = {}
        self._dirty: set[str] = set()
        self._loading: dict[str, asyncio.Future[SessionRecord | None]] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-sqlite")
        self._db: sqlite3.Connection | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self.errors = 0

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- lifecycle -------------------------------------------------------------------------
    async def open(self) -> None:
        await self._run(self._connect)
        self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self.flush()
        await self._run(self._disconnect)
        self._executor.shutdown(wait=False)  # idle: its last job has been awaited

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        self._db = db

    def _disconnect(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- the hot path: memory first ----------------------------------------------------------
    async def _record(self, start: TurnStart) -> SessionRecord:
        session_id = start.identity.session_id
        record = self._cached.get(session_id)
        if record is None:
            record = await self._load(session_id)
            # Another call may have created it while this one waited for the disk.
            record = self._cached.get(session_id) or record or new_record(start)
            self._cached[session_id] = record
            self._evict()
        return record

    async def begin_turn(self, start: TurnStart, limits: Limits) -> TurnTicket:
        record = await self._record(start)
        ticket = check_and_reserve(record, start, limits)
        self._dirty.add(record.id)
        return ticket

    async def end_turn(self, ticket: TurnTicket, end: TurnEnd) -> None:
        record = self._cached.get(ticket.session_id)
        if record is None:  # evicted meanwhile: never happens with calls in flight
            record = await self._load(ticket.session_id)
            if record is None:
                return
            self._cached[record.id] = record
        settle(record, ticket, end)
        self._dirty.add(record.id)

    async def record_aux(self, start: TurnStart) -> None:
        record = await self._record(start)
        touch(record, start)
        record.aux_requests += 1
        self._dirty.add(record.id)

    async def get(self, session_id: str) -> SessionRecord | None:
        return self._cached.get(session_id) or await self._load(session_id)

    async def find(self, query: SessionQuery) -> list[SessionRecord]:
        await self.flush()
        rows: list[bytes] = await self._run(self._select, query)
        return [SessionRecord.from_json(orjson.loads(data)) for data in rows]

    # -- disk ----------------------------------------------------------------------------------
    async def _load(self, session_id: str) -> SessionRecord | None:
        pending = self._loading.get(session_id)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._loading[session_id] = pending
            try:
                data: bytes | None = await self._run(self._select_one, session_id)
                record = SessionRecord.from_json(orjson.loads(data)) if data else None
                pending.set_result(record)
            except Exception as exc:
                self.errors += 1
                pending.set_exception(exc)
                raise
            finally:
                del self._loading[session_id]
            return record
        return await asyncio.shield(pending)

    def _select_one(self, session_id: str) -> bytes | None:
        assert self._db is not None
        row = self._db.execute("SELECT data FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return row[0] if row else None

    def _select(self, query: SessionQuery) -> list[bytes]:
        assert self._db is not None
        sql, args = "SELECT data FROM sessions WHERE 1=1", []
        for clause, value in (
            (" AND agent = ?", query.agent),
            (" AND status = ?", query.status),
            (" AND last_seen >= ?", query.since),
            (" AND last_seen < ?", query.before),
        ):
            if value is not None:
                sql += clause
                args.append(value)
        sql += " ORDER BY last_seen DESC LIMIT ?"
        args.append(query.limit)
        return [row[0] for row in self._db.execute(sql, args)]

    def _write(self, rows: list[Row]) -> None:
        assert self._db is not None
        with self._db:
            self._db.executemany(_UPSERT, rows)

    async def flush(self) -> None:
        async with self._flush_lock:
            if not self._dirty:
                return
            dirty, self._dirty = self._dirty, set()
            rows: list[Row] = []
            for session_id in dirty:
                r = self._cached.get(session_id)
                if r is not None:
                    row = (r.id, r.agent, r.status, r.first_seen, r.last_seen, _dump(r))
                    rows.append(row)
            try:
                await self._run(self._write, rows)
            except Exception:
                self.errors += 1
                self._dirty |= dirty  # try again next time
                raise

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                await self.flush()
            except sqlite3.Error:
                await asyncio.sleep(self.flush_interval)

    def _evict(self) -> None:
        """Forget the least recently seen sessions that are idle and written to disk."""
        excess = len(self._cached) - self.max_cached
        if excess <= 0:
            return
        idle = sorted(
            (r for r in self._cached.values() if r.in_flight == 0 and r.id not in self._dirty),
            key=lambda r: r.last_seen,
        )
        for record in idle[: max(excess, self.max_cached // 10)]:
            del self._cached[record.id]


def _dump(record: SessionRecord) -> bytes:
    return orjson.dumps(record.to_json())
