"""SqliteStore: counts survive a restart; a burst on a session known only on disk stays exact."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import stat
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway.dialects import Usage
from gateway.store import INTERNAL_FIELDS, Grant, LimitExceeded, Limits, SessionQuery, SqliteStore
from gateway.store.base import StoreRefused
from gateway.store.sqlite import LAYOUT
from tests.harness import disk_error, wait_until

from .test_base import end, start


async def _reopen(path: Path) -> SqliteStore:
    store = SqliteStore(path)
    await store.open()
    return store


async def test_counts_resume_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    first = await _reopen(path)
    for i in range(3):
        ticket = await first.begin_turn(start("s1", at=100.0 + i, user_turn=i == 0), Limits())
        usage = Usage(input_tokens=100, output_tokens=10, cache_read_tokens=50)
        await first.end_turn(ticket, end(usage, at=100.5 + i))
    await first.record_aux(start("s1").identity, 110.0)
    await first.close()

    second = await _reopen(path)
    try:
        rec = await second.get("s1")
        assert rec is not None
        assert (rec.turns, rec.user_turns, rec.aux_requests) == (3, 1, 1)
        assert rec.tokens.input_tokens == 300
        assert rec.tokens.cache_read_tokens == 150
        assert rec.models["gpt-5"].turns == 3
        assert (rec.first_seen, rec.last_seen) == (100.0, 110.0)
        assert (rec.in_flight, rec.reserved_tokens) == (0, 0)
        ticket = await second.begin_turn(start("s1", at=200.0), Limits())
        assert ticket.turn == 4
        with pytest.raises(LimitExceeded):
            await second.begin_turn(start("s1", at=201.0), Limits(max_turns=4))
    finally:
        await second.close()


async def test_what_the_gateway_keeps_for_itself_survives_a_restart(tmp_path: Path) -> None:
    """The admin API hides these (``INTERNAL_FIELDS``); the store must not drop them."""
    path = tmp_path / "gateway.db"
    first = await _reopen(path)
    for i in range(3):
        ticket = await first.begin_turn(start("s1", at=100.0 + i), Limits())
        await first.end_turn(ticket, replace(end(None, at=100.5 + i), body_hash=42))
    await first.grant("s1", Grant(turns=2))
    kept = (await first.get("s1")).to_json()  # type: ignore[union-attr]
    await first.close()
    second = await _reopen(path)
    try:
        rec = await second.get("s1")
        assert rec is not None
        assert {name: rec.to_json()[name] for name in INTERNAL_FIELDS} == {
            name: kept[name] for name in INTERNAL_FIELDS
        }
        assert (rec.last_body_hash, rec.body_repeats, rec.loops_allowed_until) == (42, 3, 5)
        assert rec.rate_fast > 0
    finally:
        await second.close()


async def test_reservations_in_flight_at_close_are_not_persisted(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    first = await _reopen(path)
    await first.begin_turn(start("s1", reserve=900), Limits())
    await first.close()
    second = await _reopen(path)
    try:
        # The reservation belonged to a process that is gone; it must not block the budget.
        ticket = await second.begin_turn(start("s1", reserve=900), Limits(max_session_tokens=1000))
        assert ticket.turn == 2
    finally:
        await second.close()


async def test_concurrent_begin_turn_loading_from_disk(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    first = await _reopen(path)
    await first.end_turn(await first.begin_turn(start("s1"), Limits()), end(None))
    await first.close()

    second = await _reopen(path)
    try:
        results = await asyncio.gather(
            *(second.begin_turn(start("s1"), Limits(max_turns=5)) for _ in range(10)),
            return_exceptions=True,
        )
        tickets = [r for r in results if not isinstance(r, BaseException)]
        assert sorted(t.turn for t in tickets) == [2, 3, 4, 5]
        assert all(isinstance(r, LimitExceeded) for r in results if isinstance(r, BaseException))
        rec = await second.get("s1")
        assert rec is not None
        assert rec.turns == 5
    finally:
        await second.close()


async def test_concurrent_begin_turn_on_a_new_session_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    first = await _reopen(path)
    await first.begin_turn(start("other"), Limits())
    await first.close()  # the file exists, but holds no such session
    store = await _reopen(path)
    try:
        results = await asyncio.gather(
            *(store.begin_turn(start("fresh"), Limits(max_turns=5)) for _ in range(9)),
            return_exceptions=True,
        )
        assert sum(1 for r in results if not isinstance(r, BaseException)) == 5
    finally:
        await store.close()


async def test_find_reads_from_disk_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    first = await _reopen(path)
    await first.begin_turn(start("old", at=1.0, agent="codex"), Limits())
    await first.begin_turn(start("new", at=2.0, agent="claude-code"), Limits())
    await first.close()
    second = await _reopen(path)
    try:
        assert [r.id for r in await second.find(SessionQuery())] == ["new", "old"]
        assert [r.id for r in await second.find(SessionQuery(agent="codex"))] == ["old"]
    finally:
        await second.close()


async def test_flush_writes_behind(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    store = SqliteStore(path, flush_interval=0.01)
    await store.open()
    try:
        await store.begin_turn(start("s1"), Limits())
        reader = await _reopen(path)
        try:
            for _ in range(200):
                if await reader.get("s1") is not None:
                    break
                await asyncio.sleep(0.01)
            rec = await reader.get("s1")
            assert rec is not None
            assert rec.turns == 1
        finally:
            await reader.close()
    finally:
        await store.close()
    assert store.errors == {"load": 0, "write": 0}


async def test_idle_sessions_are_evicted_and_reloaded(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "gateway.db", max_cached=2)
    await store.open()
    try:
        for i, session in enumerate(["a", "b", "c", "d"]):
            ticket = await store.begin_turn(start(session, at=float(i)), Limits())
            await store.end_turn(ticket, end(None, at=float(i)))
            await store.flush()
        rec = await store.get("a")
        assert rec is not None
        assert rec.turns == 1
        ticket = await store.begin_turn(start("a", at=10.0), Limits())
        assert ticket.turn == 2
    finally:
        await store.close()


async def test_resumed_session_is_not_evicted_by_its_own_load(tmp_path: Path) -> None:
    """A session idle for long is loaded from disk with an old last_seen; when the cache is
    full, that load must not evict the very record the turn is about to be counted on."""
    path = tmp_path / "gateway.db"
    first = await _reopen(path)
    await first.end_turn(await first.begin_turn(start("old", at=1.0), Limits()), end(None, at=1.0))
    await first.close()

    store = SqliteStore(path, max_cached=2)
    await store.open()
    try:
        for i, session in enumerate(["b", "c"]):
            ticket = await store.begin_turn(start(session, at=10.0 + i), Limits())
            await store.end_turn(ticket, end(None, at=10.0 + i))
        await store.flush()
        ticket = await store.begin_turn(start("old", at=30.0), Limits(max_turns=2))
        assert ticket.turn == 2
        rec = await store.get("old")
        assert rec is not None
        assert rec.turns == 2
        assert rec.in_flight == 1
        await store.end_turn(ticket, end(Usage(input_tokens=5, output_tokens=5), at=31.0))
        with pytest.raises(LimitExceeded):
            await store.begin_turn(start("old", at=32.0), Limits(max_turns=2))
    finally:
        await store.close()

    reopened = await _reopen(path)
    try:
        rec = await reopened.get("old")
        assert rec is not None
        assert (rec.turns, rec.tokens.total_tokens, rec.last_seen) == (2, 10, 31.0)
    finally:
        await reopened.close()


def _modes(*paths: Path) -> dict[str, int]:
    return {path.name: stat.S_IMODE(path.stat().st_mode) for path in paths}


@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask-022", "umask-000"])
async def test_the_database_its_wal_and_new_directories_are_private(
    tmp_path: Path, umask: int
) -> None:
    """Summaries of conversations live here: 0600 files in 0700 directories, whatever the umask."""
    path = tmp_path / "state" / "gateway" / "gateway.db"
    old = os.umask(umask)
    try:
        store = await _reopen(path)
    finally:
        os.umask(old)
    try:
        await store.begin_turn(start("private"), Limits())
        await store.flush()
        files = (path, path.with_name("gateway.db-wal"), path.with_name("gateway.db-shm"))
        modes = await asyncio.to_thread(_modes, *files, path.parent, path.parent.parent)
    finally:
        await store.close()
    assert modes == {
        "gateway.db": 0o600,
        "gateway.db-wal": 0o600,
        "gateway.db-shm": 0o600,
        "gateway": 0o700,
        "state": 0o700,
    }


# -- a failing disk: nothing lost, the store says it is behind ----------------------------------
async def test_failed_writes_are_kept_never_evicted_and_written_on_recovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gateway.db"
    store = SqliteStore(path, flush_interval=0.01, max_cached=2)
    heard: list[str | None] = []
    store.watch(heard.append, 60.0)
    await store.open()
    try:
        monkeypatch.setattr(store, "_write", disk_error)
        for i in range(5):
            await store.end_turn(await store.begin_turn(start(f"s{i}"), Limits()), end(None))
        await wait_until(lambda: store.errors["write"] >= 2)
        assert heard and heard[0] is not None and "disk I/O error" in heard[0]
        assert store.trouble is not None
        await store.get("unknown")  # a load past max_cached evicts: never what is unwritten
        assert {f"s{i}" for i in range(5)} <= set(store.sessions)
        backlog = store.backlog()
        assert (backlog.sessions, backlog.unloaded) == (5, 0)
        assert backlog.age > 0
        monkeypatch.undo()
        await wait_until(lambda: store.trouble is None)
        assert heard[-1] is None and store.backlog().sessions == 0
    finally:
        await store.close()
    reader = await _reopen(path)
    try:
        for i in range(5):
            rec = await reader.get(f"s{i}")
            assert rec is not None and rec.turns == 1
    finally:
        await reader.close()


async def test_a_write_that_hangs_puts_the_store_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqliteStore(tmp_path / "gateway.db", flush_interval=0.01)
    store.watch(lambda detail: None, 0.1)
    await store.open()
    release = threading.Event()
    write = store._write

    def stalled(*args: Any) -> None:
        release.wait(10)
        write(*args)

    monkeypatch.setattr(store, "_write", stalled)
    try:
        await store.begin_turn(start("s1"), Limits())
        await asyncio.sleep(0.2)
        await store.begin_turn(start("s1"), Limits())  # a change checks how long others wait
        assert store.trouble is not None and "waiting" in store.trouble
        assert store.backlog().sessions == 1
        # A session to read waits behind the write, and goes on without it after a while.
        store.load_timeout = 0.05
        ticket = await store.begin_turn(start("s2"), Limits())
        assert ticket.turn == 1 and store.unloaded == {"s2"}
        release.set()
        monkeypatch.undo()
        await wait_until(lambda: store.trouble is None)
    finally:
        release.set()
        await store.close()


async def test_a_session_that_cannot_be_read_is_merged_when_it_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gateway.db"
    first = await _reopen(path)
    for i in range(3):
        ticket = await first.begin_turn(start("s1", at=100.0 + i), Limits())
        await first.end_turn(ticket, end(Usage(input_tokens=100, output_tokens=10), at=101.0 + i))
    await first.close()

    store = SqliteStore(path, flush_interval=0.01)
    await store.open()
    try:
        monkeypatch.setattr(store, "_select_one", disk_error)
        # Fail open: limits from what this process holds (the stored three turns unknown).
        ticket = await store.begin_turn(start("s1", at=200.0), Limits(max_turns=4))
        await store.end_turn(ticket, end(Usage(input_tokens=50, output_tokens=5), at=201.0))
        ticket = await store.begin_turn(start("s1", at=202.0), Limits(max_turns=4))
        await store.end_turn(ticket, end(None, at=203.0))
        assert store.unloaded == {"s1"} and store.trouble is not None
        assert store.errors["load"] >= 1
        await asyncio.sleep(0.05)  # flushes pass: begun in memory, never written as it is
        monkeypatch.undo()
        await wait_until(lambda: not store.unloaded and store.trouble is None)
        rec = await store.get("s1")
        assert rec is not None
        assert (rec.turns, rec.tokens.total_tokens, rec.first_seen) == (5, 385, 100.0)
        with pytest.raises(LimitExceeded):  # the merged figures count from now on
            await store.begin_turn(start("s1", at=300.0), Limits(max_turns=5))
    finally:
        await store.close()
    reader = await _reopen(path)
    try:
        rec = await reader.get("s1")
        assert rec is not None and (rec.turns, rec.tokens.total_tokens) == (5, 385)
    finally:
        await reader.close()


async def test_close_tries_a_failing_disk_again_then_logs_what_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gateway.db"
    store = SqliteStore(path, flush_interval=0.01, close_timeout=0.2)
    await store.open()
    monkeypatch.setattr(store, "_write", disk_error)
    for session in ("a", "b"):
        await store.end_turn(await store.begin_turn(start(session), Limits()), end(None))
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="gateway.store"):
        await store.close()
    assert 0.2 <= time.monotonic() - started < 2.0
    assert store.errors["write"] >= 3  # tried again until close_timeout
    lost = [r.getMessage() for r in caplog.records if "before shutdown" in r.getMessage()]
    assert len(lost) == 1
    assert lost[0].startswith("store: 2 sessions (2 turns in all, 0 of them begun in memory)")
    assert "disk I/O error" in lost[0]


async def test_close_writes_once_the_disk_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gateway.db"
    store = SqliteStore(path, flush_interval=0.01, close_timeout=5.0)
    await store.open()
    monkeypatch.setattr(store, "_write", disk_error)
    await store.end_turn(await store.begin_turn(start("a"), Limits()), end(None))
    loop = asyncio.get_running_loop()
    loop.call_later(0.1, monkeypatch.undo)
    await store.close()
    reader = await _reopen(path)
    try:
        rec = await reader.get("a")
        assert rec is not None and rec.turns == 1
    finally:
        await reader.close()


# -- the file's layout version -----------------------------------------------------------------
_LAYOUT_0 = """
CREATE TABLE sessions (id TEXT PRIMARY KEY, agent TEXT NOT NULL, status TEXT NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, data BLOB NOT NULL);
CREATE TABLE budgets (key TEXT PRIMARY KEY, window_end REAL NOT NULL, tokens INTEGER NOT NULL,
    cost REAL NOT NULL);
"""


def _old_file(path: Path, window_end: float) -> None:
    db = sqlite3.connect(path)
    db.executescript(_LAYOUT_0)
    db.execute("INSERT INTO budgets VALUES ('team:a:day:2026-12-02', ?, 120, 0.5)", (window_end,))
    db.commit()
    db.close()


def _user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


async def test_a_file_of_the_previous_layout_is_migrated_at_start(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    await asyncio.to_thread(_old_file, path, time.time() + 3600)
    store = SqliteStore(path)
    await store.open()
    try:
        [counter] = await store.budgets()
        assert (counter.tokens, counter.cost, counter.requests) == (120, 0.5, 0)
    finally:
        await store.close()
    assert await asyncio.to_thread(_user_version, path) == LAYOUT


async def test_a_file_of_a_newer_layout_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    store = SqliteStore(path)
    await store.open()
    await store.close()

    def bump() -> None:
        db = sqlite3.connect(path)
        db.execute(f"PRAGMA user_version = {LAYOUT + 1}")
        db.commit()
        db.close()

    await asyncio.to_thread(bump)
    newer = SqliteStore(path)
    with pytest.raises(StoreRefused, match=f"newer gateway \\(layout {LAYOUT + 1}\\)"):
        await newer.open()
    await newer.close()


@pytest.mark.parametrize("stored", [False, True])
async def test_summaries_reach_the_file_only_when_opted_in(tmp_path: Path, stored: bool) -> None:
    from gateway.store import CompactionNote

    path = tmp_path / "gateway.db"
    store = SqliteStore(path, store_summaries=stored)
    await store.open()
    rewrite = {"summary": "the plan, in the user's words"}
    await store.record_compaction(start().identity, 1000.0, CompactionNote(10, rewrite=rewrite))
    held = await store.get("s1")
    assert held is not None and held.context_rewrites == [rewrite]  # served from memory
    await store.close()
    data = await asyncio.to_thread(path.read_bytes)
    assert (b"the plan" in data) is stored
    reopened = SqliteStore(path, store_summaries=stored)
    await reopened.open()
    record = await reopened.get("s1")
    await reopened.close()
    assert record is not None and record.context_rewrites == ([rewrite] if stored else [])
