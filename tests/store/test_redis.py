"""What only the Redis store does (the contract it shares is ``test_base.py``): replicas on one
Redis, leases, the layout version, summaries kept off the server, Redis away and back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway.appkeys import STORE
from gateway.dialects import Usage
from gateway.identity import Identity
from gateway.policy.step import _overtaken
from gateway.store import (
    CompactionNote,
    Grant,
    LimitExceeded,
    Limits,
    LoadFailed,
    RedisStore,
    Retention,
    SessionChanged,
    TurnEnd,
    TurnStart,
    open_store,
)
from gateway.store.records import BudgetLimit
from gateway.store.redis import LayoutMismatch
from tests.redis_server import RedisServer, SharedRedis, redis_server

KEY = "abcdef012345"


def start(session: str = "s1", *, reserve: int = 0, at: float | None = None) -> TurnStart:
    identity = Identity(session, "codex", "codex", None, KEY, team="platform")
    return TurnStart(identity, "gpt-5", True, time.time() if at is None else at, reserve)


def end(tokens: int = 0) -> TurnEnd:
    usage = Usage(input_tokens=tokens, output_tokens=0) if tokens else None
    return TurnEnd("gpt-5", usage, 200, time.time())


Opener = Callable[..., RedisStore]


@pytest.fixture
async def replicas(shared_redis: SharedRedis) -> AsyncIterator[Opener]:
    """``replicas()`` opens another replica on the same Redis and prefix."""
    url = shared_redis.url()
    opened: list[RedisStore] = []

    def open_one(**options: object) -> RedisStore:
        store = open_store(url)
        assert isinstance(store, RedisStore)
        for name, value in options.items():
            setattr(store, name, value)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


async def test_two_replicas_share_one_session(replicas: Opener) -> None:
    a, b = replicas(), replicas()
    await a.open()
    await b.open()
    for store in (a, b, a, b):
        ticket = await store.begin_turn(start(), Limits())
        await store.end_turn(ticket, end(10))
    for store in (a, b):
        record = await store.get("s1")
        assert record is not None
        assert (record.turns, record.tokens.input_tokens, record.in_flight) == (4, 40, 0)
        assert record.models["gpt-5"].turns == 4


async def test_max_turns_is_exact_across_replicas_under_concurrency(replicas: Opener) -> None:
    a, b = replicas(), replicas()
    await a.open()
    await b.open()
    limits = Limits(max_turns=25)

    async def one(store: RedisStore) -> bool:
        try:
            ticket = await store.begin_turn(start(reserve=5), limits)
        except LimitExceeded:
            return False
        await asyncio.sleep(0.01)
        await store.end_turn(ticket, end(5))
        return True

    results = await asyncio.gather(*(one(s) for _ in range(40) for s in (a, b)))
    assert sum(results) == 25
    record = await a.get("s1")
    assert record is not None
    assert (record.turns, record.in_flight, record.reserved_tokens) == (25, 0, 0)


async def test_a_team_budget_is_not_overshot(replicas: Opener) -> None:
    a, b = replicas(), replicas()
    await a.open()
    await b.open()
    budget = BudgetLimit("team:platform:day:2026-12-02", time.time() + 3600, max_tokens=1000)
    limits = Limits(budgets=(budget,))

    async def one(store: RedisStore, n: int) -> bool:
        try:
            ticket = await store.begin_turn(start(f"s{n}", reserve=100), limits)
        except LimitExceeded as exc:
            assert exc.hit.limit == "budget_tokens"
            assert exc.hit.retry_after is not None and exc.hit.retry_after > 3000
            return False
        await asyncio.sleep(0.01)
        await store.end_turn(ticket, end(100))
        return True

    results = await asyncio.gather(*(one(s, n) for n in range(20) for s in (a, b)))
    assert sum(results) == 10  # 10 x 100 reserved, then spent: never more than the 1,000
    await a.budgets()  # each replica's own settles written (a read waits for them)
    [counter] = await b.budgets()
    assert (counter.tokens, counter.requests, counter.reserved_tokens) == (1000, 10, 0)
    assert counter.max_tokens == 1000


async def test_a_dead_replicas_reservation_is_freed_by_its_lease(replicas: Opener) -> None:
    dead, alive = replicas(lease=0.3), replicas()
    await dead.open()
    await alive.open()
    await dead.begin_turn(start(reserve=500), Limits(max_session_tokens=1000))
    for task in dead._tasks:  # it stops renewing, as a killed process does
        task.cancel()
    with pytest.raises(LimitExceeded):
        await alive.begin_turn(start(reserve=600), Limits(max_session_tokens=1000))
    await asyncio.sleep(0.5)
    ticket = await alive.begin_turn(start(reserve=600), Limits(max_session_tokens=1000))
    record = await alive.get("s1")
    assert record is not None
    assert (record.in_flight, record.reserved_tokens) == (1, 600)
    await alive.end_turn(ticket, end(600))


async def test_a_live_lease_is_renewed(replicas: Opener) -> None:
    a = replicas(lease=0.4)
    await a.open()
    ticket = await a.begin_turn(start(reserve=500), Limits())
    await asyncio.sleep(1.0)  # longer than the lease: renewed meanwhile
    await a._script(a._keys_for("", "", []), ["reclaim", *a._common()])
    record = await a.get("s1")
    assert record is not None and record.reserved_tokens == 500
    await a.end_turn(ticket, end(1))


async def test_a_replica_whose_clock_runs_ahead_frees_no_live_lease(
    replicas: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lease deadlines are Redis's clock: a replica an hour ahead reclaims nothing live."""
    holder, ahead = replicas(lease=30.0), replicas()
    await holder.open()
    await ahead.open()
    await holder.begin_turn(start(reserve=500), Limits(max_session_tokens=1000))
    skewed = time.time() + 3600
    monkeypatch.setattr("gateway.store.redis.time.time", lambda: skewed)
    await ahead._script(ahead._keys_for("", "", []), ["reclaim", *ahead._common()])
    monkeypatch.undo()
    record = await ahead.get("s1")
    assert record is not None and (record.in_flight, record.reserved_tokens) == (1, 500)
    deadline = await ahead.client.zscore(ahead.keys.leases, next(iter(holder._leases)))
    [seconds, micros] = await ahead.client.time()
    assert 25 < deadline - (seconds + micros / 1e6) <= 30


async def test_a_settle_sent_twice_counts_once(replicas: Opener) -> None:
    a = replicas()
    await a.open()
    ticket = await a.begin_turn(start(reserve=10), Limits())
    await a.end_turn(ticket, end(10))
    op = a._queue[-1]
    await a._write_queue()
    a._queue.append(op)  # the same batch again, as after a connection lost mid-reply
    await a._write_queue()
    record = await a.get("s1")
    assert record is not None and record.tokens.input_tokens == 10


async def test_every_queued_write_sent_twice_counts_once(replicas: Opener) -> None:
    """Aux calls, notes, compactions and settles: a batch sent again as it was (a connection
    lost before its replies) is skipped where it ran, by each write's number."""
    a = replicas()
    await a.open()
    ident = start().identity
    ticket = await a.begin_turn(start(reserve=10), Limits())
    await a.record_aux(ident, time.time())
    await a.note(ident, time.time(), "warnings", {"key": "w:1", "at": time.time()})
    await a.end_turn(ticket, end(10))
    sent = list(a._queue)
    await a._write_queue()
    a._queue.extend(sent)  # every one of them again
    await a._write_queue()
    assert not a._queue and a.errors["write"] == 0
    record = await a.get("s1")
    assert record is not None
    assert (record.turns, record.aux_requests, record.tokens.input_tokens) == (1, 1, 10)
    assert [w["key"] for w in record.warnings] == ["w:1"]


async def test_writes_sent_after_redis_lost_its_script_land_once(replicas: Opener) -> None:
    a = replicas()
    await a.open()
    ticket = await a.begin_turn(start(reserve=10), Limits())
    await a.client.script_flush()  # as a restarted Redis without persistence of scripts
    await a.record_aux(start().identity, time.time())
    await a.end_turn(ticket, end(10))
    await a._write_queue()
    assert not a._queue
    record = await a.get("s1")
    assert record is not None
    assert (record.aux_requests, record.in_flight, record.tokens.input_tokens) == (1, 0, 10)


async def test_another_layout_is_refused(replicas: Opener, shared_redis: SharedRedis) -> None:
    a = replicas()
    await a.open()
    await a.client.set(a.keys.layout, "2")
    b = replicas()
    with pytest.raises(LayoutMismatch, match="layout 2, this gateway writes layout 1"):
        await b.open()
    # A replica already running stops writing there: it goes on from its own view.
    ticket = await a.begin_turn(start(), Limits())
    assert ticket.lease is None
    assert a.trouble is not None and "layout 2" in a.trouble


async def test_summaries_stay_off_the_server_unless_opted_in(replicas: Opener) -> None:
    private, shared = replicas(), replicas(store_summaries=True)
    await private.open()
    await shared.open()
    rewrite = {"summary": "the user asked about the secret plan", "covers": 12}
    identity = start("kept-here").identity
    await private.record_compaction(identity, time.time(), CompactionNote(100, rewrite=rewrite))
    record = await private.get("kept-here")
    assert record is not None and record.context_rewrites == [rewrite]  # its own replica
    raw = await private.client.hget(private.keys.session("kept-here"), "context_rewrites")
    assert raw is None
    other = await shared.get("kept-here")
    assert other is not None and other.context_rewrites == []

    identity = start("shared").identity
    await shared.record_compaction(identity, time.time(), CompactionNote(100, rewrite=rewrite))
    await shared._write_queue()
    reader = replicas(store_summaries=True)
    await reader.open()
    record = await reader.get("shared")
    assert record is not None and record.context_rewrites == [rewrite]


async def test_a_shared_rewrite_comes_back_as_it_was_sent(replicas: Opener) -> None:
    """A rewrite's replaced items go upstream again: an empty list must stay a list (cjson
    writes ``[]`` back as ``{}``, which a provider refuses) and a number keep its digits."""
    writer, reader = replicas(store_summaries=True), replicas(store_summaries=True)
    await writer.open()
    await reader.open()
    rewrite = {
        "digest": "ab" * 16,
        "count": 4,
        "ops": [0, {"role": "assistant", "content": [], "tool_calls": []}, 3],
        "strategies": [],
        "at": 1796257679.1022844,
        "summary_model": None,
    }
    await writer.record_compaction(
        start().identity, time.time(), CompactionNote(10, rewrite=rewrite)
    )
    await writer._write_queue()
    record = await reader.get("s1")
    assert record is not None and record.context_rewrites == [rewrite]
    # Merged back after an outage: the same, beside what Redis held.
    away = replicas(store_summaries=True)
    await away.open()
    mine = replace(record, context_rewrites=[{**rewrite, "count": 5}], turns=0)
    await away._merge(mine)
    merged = await reader.get("s1")
    assert merged is not None
    assert merged.context_rewrites == [rewrite, {**rewrite, "count": 5}]


async def test_grants_and_status_across_replicas(replicas: Opener) -> None:
    a, b = replicas(), replicas()
    await a.open()
    await b.open()
    ticket = await a.begin_turn(start(), Limits(max_turns=1))
    await a.end_turn(ticket, end(1))
    await a.set_status("s1", "paused", "paused by the loop rule")
    with pytest.raises(LimitExceeded, match="session_paused"):
        await b.begin_turn(start(), Limits(max_turns=1))
    granted = await b.grant("s1", Grant(turns=2, by="alice", at=time.time()))
    assert granted is not None and granted.status == "active"
    for _ in range(2):
        ticket = await a.begin_turn(start(), Limits(max_turns=1))
        await a.end_turn(ticket, end(1))
    with pytest.raises(LimitExceeded, match="max_turns"):
        await b.begin_turn(start(), Limits(max_turns=1))


async def test_keys_are_shared(replicas: Opener) -> None:
    a, b = replicas(), replicas()
    await a.open()
    await b.open()
    await a.put_key({"id": "k1", "digest": "d", "revoked_at": None})
    assert await b.get_key("k1") == {"id": "k1", "digest": "d", "revoked_at": None}
    await b.put_key({"id": "k1", "digest": "d", "revoked_at": 5.0})
    assert (await a.get_key("k1") or {})["revoked_at"] == 5.0
    assert [k["id"] for k in await a.list_keys()] == ["k1"]


async def test_find_pages_across_replicas_and_drops_expired(replicas: Opener) -> None:
    a, b = replicas(), replicas()
    await a.open()
    await b.open()
    now = time.time()
    for n in range(30):
        store = a if n % 2 else b
        ticket = await store.begin_turn(start(f"s{n:02}", at=now - 100 + n), Limits())
        await store.end_turn(ticket, end(1))
    from gateway.store import SessionQuery

    first = await a.find(SessionQuery(limit=10))
    assert [r.id for r in first] == [f"s{n:02}" for n in range(29, 19, -1)]
    rest = await b.find(SessionQuery(limit=50, before=first[-1].last_seen))
    assert len(rest) == 20
    await a.client.delete(a.keys.session("s05"))  # expired by its retention
    assert "s05" not in [r.id for r in await b.find(SessionQuery(limit=50))]
    assert await a.client.zscore(a.keys.session_index, "s05") is None


@contextlib.asynccontextmanager
async def own_redis(
    tmp_path: Path, **options: object
) -> AsyncIterator[tuple[RedisServer, RedisStore]]:
    """A redis-server of the test's own (to stop, fill or reconfigure) and a store open on it,
    its attributes set from ``options`` first; closed after."""
    async with redis_server(tmp_path / "redis") as server:
        store = open_store(server.url)
        assert isinstance(store, RedisStore)
        for name, value in options.items():
            setattr(store, name, value)
        await store.open()
        try:
            yield server, store
        finally:
            await store.close()


async def written(store: RedisStore, seconds: float = 15.0) -> None:
    """Until the store is out of trouble and its queue written (the keeper's reconnect)."""
    deadline = time.monotonic() + seconds
    while store.trouble is not None or store._queue:
        assert time.monotonic() < deadline, f"still {len(store._queue)} writes queued"
        await asyncio.sleep(0.1)


async def test_redis_away_and_back_loses_nothing(tmp_path: Path) -> None:
    async with own_redis(
        tmp_path, retention=Retention(ended=86400.0, idle=86400.0), timeout=0.5
    ) as (server, store):
        for _ in range(3):
            ticket = await store.begin_turn(start(), Limits())
            await store.end_turn(ticket, end(10))
        await store.get("s1")  # written (a read waits for this replica's own writes)
        await server.stop()
        for _ in range(4):  # Redis away: this replica counts on alone
            ticket = await store.begin_turn(start(), Limits())
            await store.end_turn(ticket, end(10))
        assert store.trouble is not None and "Redis unreachable" in store.trouble
        with pytest.raises(LoadFailed):  # store_outage: closed
            await store.begin_turn(
                TurnStart(start("s2").identity, "gpt-5", True, time.time(), fail_open=False),
                Limits(),
            )
        back = asyncio.Event()
        store.watch(lambda trouble: back.set() if trouble is None else None, 5.0)
        await server.start()
        await asyncio.wait_for(back.wait(), 15)
        assert store.trouble is None
        record = await store.get("s1")
        assert record is not None
        assert (record.turns, record.tokens.input_tokens) == (7, 70)
        assert store.merged == 1


async def test_redis_out_of_memory_loses_nothing(tmp_path: Path) -> None:
    """Redis refusing writes (maxmemory, noeviction) is Redis away, not a bad call: the turn
    is counted here, the writes it refused stay queued, and all of it lands once it has room."""
    async with own_redis(tmp_path) as (server, store):
        ticket = await store.begin_turn(start(), Limits())
        await store.end_turn(ticket, end(10))
        await store.get("s1")
        await server.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
        await server.command("CONFIG", "SET", "maxmemory", "1")  # below what it uses
        ticket = await store.begin_turn(start(), Limits())  # refused: counted here
        assert ticket.lease is None
        assert store.trouble is not None and "OutOfMemoryError" in store.trouble
        await store.end_turn(ticket, end(10))
        back = asyncio.Event()
        store.watch(lambda trouble: back.set() if trouble is None else None, 5.0)
        await server.command("CONFIG", "SET", "maxmemory", "0")
        await asyncio.wait_for(back.wait(), 15)
        record = await store.get("s1")
        assert record is not None
        assert (record.turns, record.tokens.input_tokens) == (2, 20)
        assert all(task.done() is False for task in store._tasks)  # nothing ended them


async def test_a_write_refused_for_memory_stays_queued(tmp_path: Path) -> None:
    """In one pipeline, what landed is done with and what Redis refused is kept, in order."""
    async with own_redis(tmp_path) as (server, store):
        ticket = await store.begin_turn(start(), Limits())
        await server.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
        await server.command("CONFIG", "SET", "maxmemory", "1")
        await store.end_turn(ticket, end(10))  # the settle: queued, refused
        await asyncio.sleep(0.3)
        assert len(store._queue) == 1 and store.trouble is not None
        await server.command("CONFIG", "SET", "maxmemory", "0")
        await written(store)
        record = await store.get("s1")
        assert record is not None
        assert (record.turns, record.in_flight, record.tokens.input_tokens) == (1, 0, 10)


async def test_an_evicting_redis_is_said_at_connect(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with redis_server(tmp_path / "redis") as server:
        await server.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
        store = open_store(server.url)
        assert isinstance(store, RedisStore)
        with caplog.at_level("WARNING", logger="gateway.store"):
            await store.open()
        await store.close()
        assert "maxmemory-policy allkeys-lru" in caplog.text
        caplog.clear()
        await server.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
        store = open_store(server.url)
        assert isinstance(store, RedisStore)
        with caplog.at_level("WARNING", logger="gateway.store"):
            await store.open()
        await store.close()
        assert "maxmemory-policy" not in caplog.text


async def test_the_kept_copies_are_bounded_in_count_and_bytes(
    replicas: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = replicas()
    await a.open()
    for n in range(6):
        ticket = await a.begin_turn(start(f"s{n}"), Limits())
        await a.end_turn(ticket, end(1))
    await a._write_queue()
    assert len(a._copies) == 6  # each settle brought its session back
    one = _size_of(a, "s5")
    monkeypatch.setattr("gateway.store.redis.COPIES_BYTES", one * 3 + 100)  # s0 grows a bit
    ticket = await a.begin_turn(start("s0"), Limits())
    await a.end_turn(ticket, end(1))
    await a._write_queue()
    assert list(a._copies) == [a.keys.session(f"s{n}") for n in (4, 5, 0)]
    assert a._copies_size == sum(_size_of(a, f"s{n}") for n in (4, 5, 0))
    record = await a.current("s0")  # from the copy: the settle's figures
    assert record is not None and (record.turns, record.in_flight) == (2, 0)


def _size_of(store: RedisStore, session: str) -> int:
    raw = store._copies[store.keys.session(session)]
    return sum(len(name) + len(value) for name, value in raw.items())


async def test_rev_counts_what_a_decision_reads_and_never_goes_back(replicas: Opener) -> None:
    """A turn's settle, a grant and a pause change ``rev``; its beginning, aux calls and notes
    do not; a session that begins again (idle, or expired and made anew) gets a rev no copy of
    the one before has (revisions come from one counter: no ABA)."""
    a, b = replicas(), replicas()
    await a.open()
    await b.open()
    ident = start().identity

    async def rev() -> int:
        record = await a.get("s1")
        assert record is not None
        return record.rev

    ticket = await a.begin_turn(start(), Limits())
    born = await rev()
    await a.record_aux(ident, time.time())
    await a.note(ident, time.time(), "warnings", {"key": "w", "at": time.time()})
    assert await rev() == born
    await a.end_turn(ticket, end(1))
    settled = await rev()
    assert settled > born
    await a.grant("s1", Grant(turns=1, by="op", reason="more", at=time.time()))
    granted = await rev()
    assert granted > settled
    idle = start(at=time.time() + 3600)
    ticket = await a.begin_turn(idle, Limits(idle_timeout=60))
    record = await a.get("s1")
    assert record is not None and record.restarts == 1 and record.rev > granted
    with pytest.raises(SessionChanged):  # a copy from before the fresh count
        await a.begin_turn(replace(start(), seen=granted), Limits())
    await a.end_turn(ticket, end(1))
    # Expired and made anew by another replica, as many changes on: the old copy still differs.
    old = await a.get("s1")
    assert old is not None
    await a.client.delete(a.keys.session("s1"))
    for _ in range(3):
        ticket = await b.begin_turn(start(), Limits())
        await b.end_turn(ticket, end(1))
    await b._write_queue()
    with pytest.raises(SessionChanged) as changed:
        await a.begin_turn(replace(start(), seen=old.rev), Limits())
    assert changed.value.record is not None and changed.value.record.turns == 3


async def test_a_write_redis_refuses_without_running_is_kept(tmp_path: Path) -> None:
    """NOREPLICAS (min-replicas-to-write unmet), like MISCONF and BUSY, has no exception class
    of its own in redis-py: the settle is kept, not dropped, and lands once Redis writes again."""
    async with own_redis(tmp_path) as (server, store):
        ticket = await store.begin_turn(start(reserve=10), Limits())
        await server.command("CONFIG", "SET", "min-replicas-to-write", "1")
        await store.end_turn(ticket, end(500))  # the writer task is woken for it
        for _ in range(100):
            await asyncio.sleep(0.02)
            if store.trouble is not None:
                break
        assert store.trouble is not None and "NOREPLICAS" in store.trouble
        assert len(store._queue) == 1  # kept, not dropped as refused for good
        await server.command("CONFIG", "SET", "min-replicas-to-write", "0")
        await written(store)  # the keeper finds Redis writing again, and the queue lands
        record = await store.get("s1")
        assert record is not None
        assert (record.tokens.input_tokens, record.in_flight, record.reserved_tokens) == (
            500,
            0,
            0,
        )


async def test_a_stop_decided_on_a_copy_of_a_gone_session_is_decided_again(
    replicas: Opener,
) -> None:
    a = replicas()
    await a.open()
    ticket = await a.begin_turn(start(), Limits())
    await a.end_turn(ticket, end(5))
    await a._write_queue()
    copy = await a.current("s1")
    assert copy is not None
    await a.client.delete(a.keys.session("s1"))  # its retention ran out
    ex = SimpleNamespace(app={STORE: a}, record=copy, identity=start().identity)
    assert await _overtaken(ex)  # type: ignore[arg-type]
    assert ex.record is None  # decided again as a new session
