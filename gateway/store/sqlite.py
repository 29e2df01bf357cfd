"""SQLite store (the default): sessions survive restarts; the event loop never touches disk.

Sessions being served live in memory (``SessionTable``), where ``begin_turn`` checks and
reserves atomically: one event loop, no await in between. Disk work runs on one dedicated
thread: a session unknown in memory is loaded from there once, and changed sessions and
budgets are written behind in batches every ``flush_interval`` seconds and at shutdown. A
crash loses at most that interval of counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from gateway.private import FILE_MODE, create_private_file
from gateway.store.base import SessionTable
from gateway.store.records import BudgetCounter, SessionQuery, SessionRecord

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
CREATE TABLE IF NOT EXISTS budgets (
    key TEXT PRIMARY KEY,
    window_end REAL NOT NULL,
    tokens INTEGER NOT NULL,
    cost REAL NOT NULL
);
"""
_UPSERT_SESSION = (
    "INSERT INTO sessions (id, agent, status, first_seen, last_seen, data)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET agent=excluded.agent,"
    " status=excluded.status, last_seen=excluded.last_seen, data=excluded.data"
)
_UPSERT_BUDGET = (
    "INSERT INTO budgets (key, window_end, tokens, cost) VALUES (?, ?, ?, ?)"
    " ON CONFLICT(key) DO UPDATE SET tokens=excluded.tokens, cost=excluded.cost"
)
SessionRow = tuple[str, str, str, float, float, bytes]
BudgetRow = tuple[str, float, int, float]


class SqliteStore(SessionTable):
    def __init__(
        self, path: str | Path, flush_interval: float = 0.25, max_cached: int = 50_000
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.flush_interval = flush_interval
        self.max_cached = max_cached
        self._dirty: set[str] = set()
        self._dirty_budgets: set[str] = set()
        self._loading: dict[str, asyncio.Future[SessionRecord | None]] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-sqlite")
        self._db: sqlite3.Connection | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- lifecycle -------------------------------------------------------------------------
    async def open(self) -> None:
        await self._run(self._connect)
        rows: list[BudgetRow] = await self._run(self._select_budgets, time.time())
        for key, window_end, tokens, cost in rows:
            self.budget_counters[key] = BudgetCounter(key, window_end, tokens, cost)
        self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self.flush()
        await self._run(self._disconnect)
        self._executor.shutdown(wait=False)  # idle: its last job has been awaited

    def _connect(self) -> None:
        # The store keeps summaries of conversations: created 0600 before SQLite opens it
        # (SQLite gives its -wal and -shm the database's mode; they are set again below).
        created = create_private_file(self.path)
        db = sqlite3.connect(self.path, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        if created:
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(f"{self.path}{suffix}", FILE_MODE)
        self._db = db

    def _disconnect(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- what the session table asks of a backend ------------------------------------------------
    async def _fetch(self, session_id: str) -> SessionRecord | None:
        pending = self._loading.get(session_id)
        if pending is not None:
            return await asyncio.shield(pending)
        pending = asyncio.get_running_loop().create_future()
        self._loading[session_id] = pending
        try:
            data: bytes | None = await self._run(self._select_one, session_id)
            record = SessionRecord.from_json(orjson.loads(data)) if data else None
        except Exception as exc:
            self.errors["load"] += 1
            pending.set_exception(exc)
            pending.exception()  # retrieved: waiters re-raise it, nobody else must log it
            raise
        finally:
            del self._loading[session_id]
        pending.set_result(record)
        self._evict()
        return record

    def _changed(self, record: SessionRecord) -> None:
        self._dirty.add(record.id)

    def _budget_changed(self, counter: BudgetCounter) -> None:
        self._dirty_budgets.add(counter.key)

    async def find(self, query: SessionQuery) -> list[SessionRecord]:
        await self.flush()
        rows: list[bytes] = await self._run(self._select, query)
        return [SessionRecord.from_json(orjson.loads(data)) for data in rows]

    # -- disk ------------------------------------------------------------------------------------
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

    def _select_budgets(self, now: float) -> list[BudgetRow]:
        assert self._db is not None
        sql = "SELECT key, window_end, tokens, cost FROM budgets WHERE window_end > ?"
        return list(self._db.execute(sql, (now,)))

    def _write(self, sessions: list[SessionRow], budgets: list[BudgetRow]) -> None:
        assert self._db is not None
        with self._db:
            self._db.executemany(_UPSERT_SESSION, sessions)
            self._db.executemany(_UPSERT_BUDGET, budgets)

    async def flush(self) -> None:
        async with self._flush_lock:
            if not self._dirty and not self._dirty_budgets:
                return
            dirty, self._dirty = self._dirty, set()
            dirty_budgets, self._dirty_budgets = self._dirty_budgets, set()
            sessions: list[SessionRow] = [
                (r.id, r.agent, r.status, r.first_seen, r.last_seen, orjson.dumps(r.to_json()))
                for session_id in dirty
                if (r := self.sessions.get(session_id)) is not None
            ]
            budgets: list[BudgetRow] = [
                (c.key, c.window_end, c.tokens, c.cost)
                for key in dirty_budgets
                if (c := self.budget_counters.get(key)) is not None
            ]
            try:
                await self._run(self._write, sessions, budgets)
            except Exception:
                self.errors["write"] += 1
                self._dirty |= dirty  # try again next time
                self._dirty_budgets |= dirty_budgets
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
        excess = len(self.sessions) - self.max_cached
        if excess <= 0:
            return
        idle = sorted(
            (r for r in self.sessions.values() if r.in_flight == 0 and r.id not in self._dirty),
            key=lambda r: r.last_seen,
        )
        for record in idle[: max(excess, self.max_cached // 10)]:
            del self.sessions[record.id]
