"""SQLite store (the default): sessions survive restarts; the event loop never touches disk.

Sessions being served live in memory (``SessionTable``), where ``begin_turn`` checks and
reserves atomically: one event loop, no await in between. Disk work runs on one dedicated
thread: a session unknown in memory is loaded from there once, and changed sessions and
budgets are written behind in batches every ``flush_interval`` seconds and at shutdown. A
crash loses at most that interval of counts.

When the disk fails, nothing waits for it: a failed write keeps its changes to write again
(they are never evicted), a session that cannot be read is begun in memory and merged into
its stored record later (``SessionTable.unloaded``), and the store reports itself behind
(``trouble``: writes failing, changes waiting past ``lag_bound``, reads failing) until it
has written its backlog. At shutdown a failing write is tried again for ``close_timeout``
seconds; what still could not be written is logged by count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import Any

import orjson

from gateway.private import FILE_MODE, create_private_file
from gateway.store.base import (
    BUDGET_GRACE,
    BUDGET_SWEEP_EVERY,
    RETENTION_SWEEP_EVERY,
    LoadFailed,
    SessionTable,
    StoreRefused,
)
from gateway.store.keys import KeyTable
from gateway.store.records import Backlog, BudgetCounter, SessionQuery, SessionRecord

log = logging.getLogger("gateway.store")

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
    cost REAL NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS budgets_window_end ON budgets (window_end);
"""
_UPSERT_SESSION = (
    "INSERT INTO sessions (id, agent, status, first_seen, last_seen, data)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET agent=excluded.agent,"
    " status=excluded.status, last_seen=excluded.last_seen, data=excluded.data"
)
_UPSERT_BUDGET = (
    "INSERT INTO budgets (key, window_end, tokens, cost, requests) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT(key) DO UPDATE SET tokens=excluded.tokens, cost=excluded.cost,"
    " requests=excluded.requests"
)
SessionRow = tuple[str, str, str, float, float, bytes]
BudgetRow = tuple[str, float, int, float, int]


class SqliteStore(KeyTable, SessionTable):
    def __init__(
        self,
        path: str | Path,
        flush_interval: float = 0.25,
        max_cached: int = 50_000,
        close_timeout: float = 5.0,
        load_timeout: float = 1.0,
        store_summaries: bool = False,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.store_summaries = store_summaries
        """Whether compaction's saved rewrites (summaries: prompt content) are written to the
        file; off, they live in memory while the session does."""
        self.flush_interval = flush_interval
        self.max_cached = max_cached
        self.close_timeout = close_timeout
        """At shutdown, how long a failing write is tried again before what it held is
        given up (and logged)."""
        self.load_timeout = load_timeout
        """How long a call waits to read its session (behind a write that hangs, say)
        before it goes on without it, as when the read fails."""
        # Changed since written, with when (time.monotonic) each first changed.
        self._dirty: dict[str, float] = {}
        self._dirty_budgets: dict[str, float] = {}
        self._writing: dict[str, float] = {}
        """The sessions of the write on its way: neither evicted nor counted as written."""
        self._writing_budgets: dict[str, float] = {}
        self._oldest: float | None = None
        """When the oldest change not yet written was made (None: all written)."""
        self._loading: dict[str, asyncio.Future[SessionRecord | None]] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-sqlite")
        self._db: sqlite3.Connection | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._budgets_deleted_at = float("-inf")
        self._sessions_deleted_at = float("-inf")
        self._expiring: set[str] = set()
        """Sessions the table expired, not yet deleted from disk."""
        """When (time.monotonic) ended budget rows were last deleted."""

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- lifecycle -------------------------------------------------------------------------
    async def open(self) -> None:
        await self._run(self._connect)
        self._loaded_keys(await self._run(self._keys_ready))
        rows: list[BudgetRow] = await self._run(self._select_budgets, time.time())
        for key, window_end, tokens, cost, requests in rows:
            self.budget_counters[key] = BudgetCounter(key, window_end, tokens, cost, requests)
        await self._delete_ended_budgets()
        self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self._final_flush()
        # Behind a write that hangs on a disk that will not answer, this waits in the queue:
        # given up after a while, the connection goes with the process.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._run(self._disconnect), 1.0)
        self._executor.shutdown(wait=False)  # idle, or stuck on that disk

    async def _final_flush(self) -> None:
        """Write what is left, trying a failing disk again until ``close_timeout``; what
        could not be written is logged by count (sessions, budgets, turns), never dropped
        in silence."""
        deadline = time.monotonic() + self.close_timeout
        while True:
            try:
                left = max(deadline - time.monotonic(), self.flush_interval)
                await asyncio.wait_for(self.flush(), left)
                return
            except Exception as exc:  # a timeout too
                failure = exc
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.sleep(min(self.flush_interval, left))
        pending = set(self._dirty) | self.unloaded
        turns = sum(r.turns for i in pending if (r := self.sessions.get(i)) is not None)
        log.error(
            "store: %d sessions (%d turns in all, %d of them begun in memory) and %d budgets"
            " could not be written before shutdown (%s): their changes since the last write"
            " are lost",
            len(pending),
            turns,
            len(self.unloaded),
            len(self._dirty_budgets),
            _describe(failure),
        )

    def _connect(self) -> None:
        # The store keeps summaries of conversations: created 0600 before SQLite opens it
        # (SQLite gives its -wal and -shm the database's mode; they are set again below).
        created = create_private_file(self.path)
        db = sqlite3.connect(self.path, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        _migrate(db, self.path)
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
        if session_id in self._expiring:  # expired here, its row not deleted yet
            return None
        pending = self._loading.get(session_id)
        if pending is not None:
            return await asyncio.shield(pending)
        pending = asyncio.get_running_loop().create_future()
        self._loading[session_id] = pending
        try:
            read = self._run(self._select_one, session_id)
            data: bytes | None = await asyncio.wait_for(read, self.load_timeout)
            record = SessionRecord.from_json(orjson.loads(data)) if data else None
        except Exception as exc:
            failed = LoadFailed(session_id, exc)
            self._load_failed(exc)
            pending.set_exception(failed)
            pending.exception()  # retrieved: waiters re-raise it, nobody else must log it
            raise failed from exc
        finally:
            del self._loading[session_id]
        pending.set_result(record)
        self._set_trouble("load", None)
        self._evict()
        return record

    def _load_failed(self, exc: BaseException) -> None:
        self.errors["load"] += 1
        self._set_trouble("load", f"session reads failing ({_describe(exc)})")

    def _changed(self, record: SessionRecord) -> None:
        self._expiring.discard(record.id)  # begun again: the new record is the one to keep
        if record.id not in self._dirty:
            self._dirty[record.id] = self._noted()

    def _forget(self, session_id: str) -> None:
        self._dirty.pop(session_id, None)

    def _budget_changed(self, counter: BudgetCounter) -> None:
        if counter.key not in self._dirty_budgets:
            self._dirty_budgets[counter.key] = self._noted()

    def _noted(self) -> float:
        """The time of a change now waiting to be written; a backlog waiting too long puts
        the store behind (checked here, so a write that hangs is noticed too)."""
        now = time.monotonic()
        if self._oldest is None:
            self._oldest = now
        elif now - self._oldest > self.lag_bound:
            self._check_lag(now)
        return now

    def _check_lag(self, now: float) -> None:
        age = 0.0 if self._oldest is None else now - self._oldest
        if age > self.lag_bound:
            self._set_trouble("lag", f"changes waiting {age:.0f}s to be written")
        else:
            self._set_trouble("lag", None)

    def backlog(self) -> Backlog:
        now = time.monotonic()
        return Backlog(
            sessions=len(self._dirty.keys() | self._writing.keys() | self.unloaded),
            budgets=len(self._dirty_budgets.keys() | self._writing_budgets.keys()),
            age=0.0 if self._oldest is None else now - self._oldest,
            unloaded=len(self.unloaded),
        )

    async def find(self, query: SessionQuery) -> list[SessionRecord]:
        try:
            await self.flush()
            rows: list[bytes] = await self._run(self._select, query)
        except (sqlite3.Error, LoadFailed):
            # The disk is failing: what this process holds is what can be shown.
            return await super().find(query)
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
        sql = "SELECT key, window_end, tokens, cost, requests FROM budgets WHERE window_end > ?"
        return list(self._db.execute(sql, (now,)))

    def _may_forget(self, session_id: str) -> bool:
        return (
            session_id not in self._dirty
            and session_id not in self._writing
            and session_id not in self.unloaded
        )

    def _expired(self, session_ids: list[str]) -> None:
        # Deleted from disk by the next flush; until then a read does not bring them back.
        self._expiring.update(session_ids)

    async def _delete_expired_sessions(self) -> None:
        """Delete the stored sessions past their retention, at most once every
        ``RETENTION_SWEEP_EVERY`` (one indexed statement on the writer thread). A session
        still changing in memory is written back by the next flush."""
        if self._expiring:
            gone, self._expiring = list(self._expiring), set()
            await self._run(self._delete_each, gone)
        retention = self.retention
        if retention.ended is None and retention.idle is None:
            return
        now = time.monotonic()
        if now < self._sessions_deleted_at + RETENTION_SWEEP_EVERY:
            return
        self._sessions_deleted_at = now
        wall = time.time()
        idle_before = wall - retention.idle if retention.idle is not None else None
        ended_before = wall - retention.ended if retention.ended is not None else None
        await self._run(self._delete_sessions, idle_before, ended_before)

    def _delete_each(self, session_ids: list[str]) -> None:
        assert self._db is not None
        with self._db:
            self._db.executemany("DELETE FROM sessions WHERE id = ?", [(s,) for s in session_ids])

    def _delete_sessions(self, idle_before: float | None, ended_before: float | None) -> None:
        assert self._db is not None
        with self._db:
            if idle_before is not None:
                self._db.execute("DELETE FROM sessions WHERE last_seen < ?", (idle_before,))
            if ended_before is not None:
                self._db.execute(
                    "DELETE FROM sessions WHERE status = 'ended' AND last_seen < ?",
                    (ended_before,),
                )

    def _delete_budgets(self, ended_before: float) -> None:
        assert self._db is not None
        with self._db:
            self._db.execute("DELETE FROM budgets WHERE window_end < ?", (ended_before,))

    def _select_each(self, session_ids: list[str]) -> list[bytes | None]:
        return [self._select_one(session_id) for session_id in session_ids]

    def _write(self, sessions: list[SessionRow], budgets: list[BudgetRow]) -> None:
        assert self._db is not None
        with self._db:
            self._db.executemany(_UPSERT_SESSION, sessions)
            self._db.executemany(_UPSERT_BUDGET, budgets)

    async def flush(self) -> None:
        """Write what changed; raises what the disk raised (the changes stay to write)."""
        async with self._flush_lock:
            failure: BaseException | None = None
            if self.unloaded:
                try:
                    await self._merge_unloaded()
                except LoadFailed as exc:
                    failure = exc  # the others are written all the same
            if self._dirty or self._dirty_budgets:
                await self._write_dirty()
            elif self._oldest is not None:  # what waited left the table unwritten (moved)
                self._oldest = None
                self._check_lag(time.monotonic())
            if failure is not None:
                raise failure

    async def _merge_unloaded(self) -> None:
        """Read the sessions begun in memory while the disk could not be read, and fold
        their stored figures in (``SessionTable._absorb_stored``) before they are written."""
        ids = sorted(self.unloaded)
        try:
            rows: list[bytes | None] = await self._run(self._select_each, ids)
            stored = [SessionRecord.from_json(orjson.loads(row)) if row else None for row in rows]
        except Exception as exc:
            self._load_failed(exc)
            raise LoadFailed(ids[0], exc) from exc
        self._set_trouble("load", None)
        for session_id, record in zip(ids, stored, strict=True):
            self._absorb_stored(session_id, record)

    async def _write_dirty(self) -> None:
        held = self.unloaded  # not written until merged: they would overwrite stored counts
        if held:
            dirty = {k: t for k, t in self._dirty.items() if k not in held}
            self._dirty = {k: t for k, t in self._dirty.items() if k in held}
        else:
            dirty, self._dirty = self._dirty, {}
        dirty_budgets, self._dirty_budgets = self._dirty_budgets, {}
        self._writing, self._writing_budgets = dirty, dirty_budgets
        sessions: list[SessionRow] = [
            (r.id, r.agent, r.status, r.first_seen, r.last_seen, self._row_data(r))
            for session_id in dirty
            if (r := self.sessions.get(session_id)) is not None
        ]
        budgets: list[BudgetRow] = [
            (c.key, c.window_end, c.tokens, c.cost, c.requests)
            for key in dirty_budgets
            if (c := self.budget_counters.get(key)) is not None
        ]
        try:
            await self._run(self._write, sessions, budgets)
        except BaseException as exc:  # cancelled too (a close that gave up): kept to write
            for key, at in dirty.items():
                self._dirty.setdefault(key, at)
            for key, at in dirty_budgets.items():
                self._dirty_budgets.setdefault(key, at)
            if isinstance(exc, Exception):
                self.errors["write"] += 1
                self._set_trouble("write", f"writes failing ({_describe(exc)})")
            raise
        finally:
            self._writing, self._writing_budgets = {}, {}
        self._set_trouble("write", None)
        self._oldest = min(chain(self._dirty.values(), self._dirty_budgets.values()), default=None)
        self._check_lag(time.monotonic())

    def _row_data(self, record: SessionRecord) -> bytes:
        data = record.to_json()
        if not self.store_summaries:
            data["context_rewrites"] = []
        return orjson.dumps(data)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                # Expired rows first: a session begun again since is written after them.
                await self._delete_expired_sessions()
                await self.flush()
                await self._delete_ended_budgets()
                if "load" in self._troubles and not self.unloaded:
                    await self._probe()
            except Exception as exc:
                if not isinstance(exc, sqlite3.Error | LoadFailed):
                    log.error("store: write failed: %s", _describe(exc))
                self._check_lag(time.monotonic())
                await asyncio.sleep(self.flush_interval)

    async def _delete_ended_budgets(self) -> None:
        """Delete the rows of budget windows that ended over ``BUDGET_GRACE`` ago, at most
        once every ``BUDGET_SWEEP_EVERY``: nothing reads them (``open`` loads the windows not
        ended), and minute windows would add a row per owner a minute for ever."""
        now = time.monotonic()
        if now < self._budgets_deleted_at + BUDGET_SWEEP_EVERY:
            return
        self._budgets_deleted_at = now
        await self._run(self._delete_budgets, time.time() - BUDGET_GRACE)

    async def _probe(self) -> None:
        """Reads failed and nothing since read: a read of no session says when they work."""
        try:
            await self._run(self._select_one, "")
        except Exception as exc:
            self._load_failed(exc)
            raise LoadFailed("", exc) from exc
        self._set_trouble("load", None)

    def _evict(self) -> None:
        """Forget the least recently seen sessions that are idle and written to disk (never
        one waiting to be written, or begun in memory: its figures exist nowhere else)."""
        excess = len(self.sessions) - self.max_cached
        if excess <= 0:
            return
        keep = self._dirty.keys() | self._writing.keys() | self.unloaded
        idle = sorted(
            (r for r in self.sessions.values() if r.in_flight == 0 and r.id not in keep),
            key=lambda r: r.last_seen,
        )
        for record in idle[: max(excess, self.max_cached // 10)]:
            del self.sessions[record.id]

    # -- gateway keys (``KeyTable``): each change written at once, all read at open ----------
    async def _persist_key(self, key_id: str, data: bytes) -> None:
        await self._run(self._write_key, key_id, data)

    def _keys_ready(self) -> list[tuple[str, bytes]]:
        assert self._db is not None
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS keys (id TEXT PRIMARY KEY, data BLOB NOT NULL)"
        )
        return list(self._db.execute("SELECT id, data FROM keys"))

    def _write_key(self, key_id: str, data: bytes) -> None:
        assert self._db is not None
        with self._db:
            self._db.execute(
                "INSERT INTO keys (id, data) VALUES (?, ?)"
                " ON CONFLICT(id) DO UPDATE SET data=excluded.data",
                (key_id, data),
            )


LAYOUT = 1
"""The file's layout version (``PRAGMA user_version``). Files of an older layout are migrated
when opened; a file of a newer one (a gateway rolled back) is refused, not misread."""


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the file to ``LAYOUT``, in one transaction: version 0 is every file from before
    the layout was numbered (its ``budgets`` may lack ``requests``)."""
    found = db.execute("PRAGMA user_version").fetchone()[0]
    if found > LAYOUT:
        raise StoreRefused(
            f"{path} was written by a newer gateway (layout {found}); this one reads layout"
            f" {LAYOUT}: run the newer version, or start this one on another file"
        )
    with db:
        db.executescript(_SCHEMA)
        if found < 1:
            _add_budget_requests(db)
        if found != LAYOUT:
            db.execute(f"PRAGMA user_version = {LAYOUT}")
            if found:
                log.warning("store: %s migrated from layout %d to %d", path, found, LAYOUT)


def _add_budget_requests(db: sqlite3.Connection) -> None:
    """A file from before request budgets has a ``budgets`` table without ``requests``: the
    column is added (0 for the windows counted so far)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(budgets)")}
    if "requests" not in columns:
        db.execute("ALTER TABLE budgets ADD COLUMN requests INTEGER NOT NULL DEFAULT 0")


def _describe(exc: BaseException) -> str:
    """An error for the log and the degraded detail: its type and SQLite's few words (they
    name no session and no content), capped."""
    cause = exc.__cause__ if isinstance(exc, LoadFailed) and exc.__cause__ else exc
    text = str(cause)
    return (f"{type(cause).__name__}: {text}" if text else type(cause).__name__)[:200]
