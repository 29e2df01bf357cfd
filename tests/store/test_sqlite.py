"""SqliteStore: counts survive a restart; a burst on a session known only on disk stays exact."""

from __future__ import annotations

import asyncio
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.dialects import Usage
from gateway.store import INTERNAL_FIELDS, Grant, LimitExceeded, Limits, SessionQuery, SqliteStore

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
