"""The store contract: the pure limit check, then every backend through the same tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.dialects import Usage
from gateway.identity import Identity
from gateway.store import (
    Backlog,
    Grant,
    LimitExceeded,
    Limits,
    LoadFailed,
    MemoryStore,
    RedisStore,
    Retention,
    SessionEnded,
    SessionQuery,
    SessionRecord,
    SqliteStore,
    Store,
    TurnEnd,
    TurnStart,
    open_store,
)
from gateway.store.base import absorb, check_and_reserve, settle
from gateway.store.records import MODELS_KEPT, OTHER_MODELS, ModelTotals


def start(
    session: str = "s1",
    at: float = 1000.0,
    *,
    agent: str = "codex",
    user_turn: bool = True,
    reserve: int = 0,
    name: str | None = None,
) -> TurnStart:
    identity = Identity(session, "codex", agent, name, "abcdef012345")
    return TurnStart(identity, "gpt-5", user_turn, at, reserve)


def end(
    usage: Usage | None, at: float = 1001.0, status: int = 200, model: str | None = "gpt-5"
) -> TurnEnd:
    return TurnEnd(model, usage, status, at)


def record(session: str = "s1") -> SessionRecord:
    return SessionRecord(
        id=session,
        source="codex",
        agent="codex",
        first_seen=0,
        last_seen=0,
        key_hash="abcdef012345",
    )


# -- check_and_reserve / settle, on a record -----------------------------------------------------


def test_reserve_counts_the_turn() -> None:
    rec = record()
    ticket = check_and_reserve(rec, start(reserve=300, name="task"), Limits())
    assert (ticket.session_id, ticket.turn, ticket.reserved_tokens) == ("s1", 1, 300)
    assert (rec.turns, rec.user_turns, rec.in_flight, rec.reserved_tokens) == (1, 1, 1, 300)
    assert rec.last_seen == 1000.0
    assert rec.name == "task"
    ticket2 = check_and_reserve(rec, start(user_turn=False), Limits())
    assert ticket2.turn == 2
    assert (rec.turns, rec.user_turns, rec.in_flight) == (2, 1, 2)


def test_max_turns_raises_and_records_nothing() -> None:
    rec = record()
    for _ in range(3):
        check_and_reserve(rec, start(), Limits(max_turns=3))
    before = (rec.turns, rec.user_turns, rec.in_flight, rec.reserved_tokens, rec.last_seen)
    with pytest.raises(LimitExceeded) as caught:
        check_and_reserve(rec, start(at=2000.0, reserve=5), Limits(max_turns=3))
    hit = caught.value.hit
    assert (hit.limit, hit.allowed, hit.used) == ("max_turns", 3, 3)
    assert hit.session_id == "s1"
    assert (rec.turns, rec.user_turns, rec.in_flight, rec.reserved_tokens, rec.last_seen) == before


def test_max_session_tokens_counts_reservations() -> None:
    rec = record()
    limits = Limits(max_session_tokens=1000)
    ticket = check_and_reserve(rec, start(reserve=600), limits)
    with pytest.raises(LimitExceeded) as caught:
        check_and_reserve(rec, start(reserve=500), limits)
    assert caught.value.hit.limit == "max_session_tokens"
    assert (caught.value.hit.allowed, caught.value.hit.used) == (1000, 600)
    assert (rec.turns, rec.reserved_tokens, rec.in_flight) == (1, 600, 1)
    # The call ends having used less than it reserved: the reservation goes, usage stays.
    settle(rec, ticket, end(Usage(input_tokens=350, output_tokens=50)))
    assert (rec.reserved_tokens, rec.in_flight) == (0, 0)
    assert rec.tokens.total_tokens == 400
    check_and_reserve(rec, start(reserve=600), limits)  # 400 + 600 == 1000: allowed
    with pytest.raises(LimitExceeded):
        check_and_reserve(rec, start(reserve=1), limits)


def test_the_ticket_says_what_is_left_with_grants_and_reservations() -> None:
    rec = record()
    rec.granted_tokens = 500
    limits = Limits(max_turns=10, max_session_tokens=1000)
    first = check_and_reserve(rec, start(reserve=300), limits)
    settle(rec, first, end(Usage(input_tokens=80, output_tokens=20)))
    check_and_reserve(rec, start(reserve=200), limits)  # still in flight
    ticket = check_and_reserve(rec, start(reserve=100), limits)
    assert ticket.tokens_allowed == 1500  # the limit plus grants
    # Less what is used (100) and what calls in flight hold, this one's 100 included.
    assert ticket.tokens_left == 1500 - 100 - 200 - 100
    assert ticket.turns_left == 10 - 3


def test_settle_adds_usage_per_model() -> None:
    rec = record()
    t1 = check_and_reserve(rec, start(reserve=10), Limits())
    t2 = check_and_reserve(rec, start(reserve=20), Limits())
    t3 = check_and_reserve(rec, start(), Limits())
    settle(rec, t1, end(Usage(input_tokens=100, output_tokens=10, cache_read_tokens=64)))
    settle(rec, t2, end(Usage(input_tokens=50, output_tokens=5, estimated=True), model="gpt-4o"))
    settle(rec, t3, end(None, at=1500.0, status=529, model=None))
    assert (rec.in_flight, rec.reserved_tokens) == (0, 0)
    assert rec.tokens.input_tokens == 150
    assert rec.tokens.output_tokens == 15
    assert rec.tokens.cache_read_tokens == 64
    assert rec.models["gpt-5"].turns == 1
    assert rec.models["gpt-5"].input_tokens == 100
    assert rec.models["gpt-4o"].total_tokens == 55
    assert rec.models["unknown"].turns == 1
    assert rec.models["unknown"].total_tokens == 0
    assert rec.estimated_turns == 1
    assert rec.upstream_errors == 1
    assert rec.last_seen == 1500.0


def test_settle_never_goes_negative() -> None:
    rec = record()
    ticket = check_and_reserve(rec, start(reserve=10), Limits())
    settle(rec, ticket, end(None))
    settle(rec, ticket, end(None))
    assert (rec.in_flight, rec.reserved_tokens) == (0, 0)


# -- every backend -------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    backend: Store
    if request.param == "memory":
        backend = MemoryStore()
    elif request.param == "sqlite":
        backend = SqliteStore(tmp_path / "gateway.db")
    else:
        backend = open_store(request.getfixturevalue("shared_redis").url())
    await backend.open()
    yield backend
    await backend.close()


async def test_begin_and_end_turn(store: Store) -> None:
    assert await store.get("s1") is None
    ticket = await store.begin_turn(start(reserve=100), Limits())
    assert ticket.turn == 1
    rec = await store.get("s1")
    assert rec is not None
    assert (rec.turns, rec.user_turns, rec.in_flight, rec.reserved_tokens) == (1, 1, 1, 100)
    assert (rec.agent, rec.source, rec.key_hash) == ("codex", "codex", "abcdef012345")
    await store.end_turn(ticket, end(Usage(input_tokens=80, output_tokens=20)))
    rec = await store.get("s1")
    assert rec is not None
    assert (rec.in_flight, rec.reserved_tokens) == (0, 0)
    assert rec.tokens.total_tokens == 100
    assert rec.models["gpt-5"].turns == 1
    assert (rec.first_seen, rec.last_seen) == (1000.0, 1001.0)


async def test_a_session_keeps_at_most_models_kept_models_apart(store: Store) -> None:
    """A client naming a new model every call: the first ``MODELS_KEPT`` are kept apart, the
    rest added up under ``OTHER_MODELS``; nothing is lost."""
    for n in range(MODELS_KEPT + 8):
        ticket = await store.begin_turn(start(), Limits())
        await store.end_turn(ticket, end(Usage(input_tokens=1), model=f"model-{n}"))
    rec = await store.get("s1")
    assert rec is not None
    assert len(rec.models) == MODELS_KEPT + 1
    assert rec.models[OTHER_MODELS].turns == 8 and rec.models[OTHER_MODELS].input_tokens == 8
    assert sum(m.turns for m in rec.models.values()) == rec.turns == MODELS_KEPT + 8


def test_absorb_keeps_at_most_models_kept_models_apart() -> None:
    mine, stored = record(), record()
    for n in range(MODELS_KEPT):
        stored.models[f"stored-{n}"] = ModelTotals(turns=1)
        mine.models[f"mine-{n}"] = ModelTotals(turns=2)
    absorb(mine, stored)
    assert len(mine.models) == MODELS_KEPT + 1
    assert mine.models[OTHER_MODELS].turns == 2 * MODELS_KEPT


async def test_events_come_back_as_they_were_kept(store: Store) -> None:
    """An event's empty list stays a list and its times keep every digit (Redis's cjson would
    make ``[]`` an object and cut numbers to 14 digits); the same event again is counted on
    the last entry, the first time kept."""
    ticket = await store.begin_turn(start(), Limits())
    ident = start().identity
    first = {"key": "loop:read", "at": 1796257679.1022844, "calls": [], "n": 2**40 + 1}
    again = {"key": "loop:read", "at": 1796257680.2033955, "calls": [], "n": 7}
    other = {"key": "other", "at": 1796257681.5, "nested": {"empty": [], "also": {}}}
    await store.note(ident, 1001.0, "detections", first)
    await store.note(ident, 1002.0, "detections", again)
    await store.note(ident, 1003.0, "detections", other)
    await store.end_turn(ticket, end(None))
    rec = await store.get("s1")
    assert rec is not None
    assert rec.detections == [
        {**again, "times": 2, "first_at": 1796257679.1022844},
        other,
    ]
    assert isinstance(rec.detections[0]["calls"], list)


async def test_an_ended_session_takes_no_grant(store: Store) -> None:
    await store.end_turn(await store.begin_turn(start(), Limits()), end(None))
    await store.set_status("s1", "ended", "ended by bob")
    with pytest.raises(SessionEnded) as caught:
        await store.grant("s1", Grant(turns=5, tokens=10, by="alice"))
    assert (caught.value.session_id, caught.value.status) == ("s1", "ended")
    assert caught.value.reason == "ended by bob"
    rec = await store.get("s1")
    assert rec is not None
    assert (rec.granted_turns, rec.granted_tokens, rec.grants) == (0, 0, [])
    assert (rec.status, rec.status_reason) == ("ended", "ended by bob")


async def test_a_grant_lets_a_paused_session_go_on(store: Store) -> None:
    await store.end_turn(await store.begin_turn(start(), Limits()), end(None))
    await store.set_status("s1", "paused", "paused by the loop rule: ...")
    granted = await store.grant("s1", Grant(turns=5, by="alice"))
    assert granted is not None
    assert (granted.status, granted.status_reason) == ("active", "granted by alice")
    assert granted.granted_turns == 5


async def test_limit_exceeded_records_nothing(store: Store) -> None:
    limits = Limits(max_turns=2)
    for _ in range(2):
        await store.end_turn(await store.begin_turn(start(), limits), end(None))
    with pytest.raises(LimitExceeded):
        await store.begin_turn(start(at=5000.0), limits)
    rec = await store.get("s1")
    assert rec is not None
    assert (rec.turns, rec.in_flight, rec.last_seen) == (2, 0, 1001.0)


async def test_record_aux_is_not_a_turn(store: Store) -> None:
    await store.record_aux(start("aux").identity, 10.0)
    await store.record_aux(start("aux").identity, 20.0)
    rec = await store.get("aux")
    assert rec is not None
    assert (rec.aux_requests, rec.turns, rec.in_flight) == (2, 0, 0)
    assert rec.last_seen == 20.0


async def test_find_filters_newest_first(store: Store) -> None:
    for session, at, agent in [
        ("a", 100.0, "codex"),
        ("b", 300.0, "claude-code"),
        ("c", 200.0, "codex"),
        ("d", 400.0, "codex"),
    ]:
        await store.begin_turn(start(session, at, agent=agent), Limits())

    async def ids(**query: object) -> list[str]:
        return [r.id for r in await store.find(SessionQuery(**query))]  # type: ignore[arg-type]

    assert await ids() == ["d", "b", "c", "a"]
    assert await ids(agent="codex") == ["d", "c", "a"]
    assert await ids(agent="goose") == []
    assert await ids(status="active") == ["d", "b", "c", "a"]
    assert await ids(status="ended") == []
    assert await ids(since=200.0) == ["d", "b", "c"]
    assert await ids(before=300.0) == ["c", "a"]
    assert await ids(since=150.0, before=400.0, agent="codex") == ["c"]
    assert await ids(limit=2) == ["d", "b"]
    assert await ids(limit=2, before=300.0) == ["c", "a"]  # the next page


async def test_find_sees_unflushed_changes(store: Store) -> None:
    ticket = await store.begin_turn(start("s", 10.0), Limits())
    await store.end_turn(ticket, end(Usage(input_tokens=7, output_tokens=3), at=11.0))
    [rec] = await store.find(SessionQuery())
    assert rec.tokens.total_tokens == 10
    assert rec.last_seen == 11.0


async def test_turns_of_different_sessions_are_apart(store: Store) -> None:
    await store.begin_turn(start("x"), Limits(max_turns=1))
    await store.begin_turn(start("y"), Limits(max_turns=1))
    with pytest.raises(LimitExceeded):
        await store.begin_turn(start("x"), Limits(max_turns=1))


async def test_concurrent_begin_turn_on_a_new_session(store: Store) -> None:
    limits = Limits(max_turns=5)
    results = await asyncio.gather(
        *(store.begin_turn(start("burst"), limits) for _ in range(12)), return_exceptions=True
    )
    tickets = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert sorted(t.turn for t in tickets) == [1, 2, 3, 4, 5]
    assert len(refused) == 7
    assert all(isinstance(r, LimitExceeded) for r in refused)
    rec = await store.get("burst")
    assert rec is not None
    assert (rec.turns, rec.in_flight) == (5, 5)


async def test_concurrent_token_reservations(store: Store) -> None:
    limits = Limits(max_session_tokens=1000)
    results = await asyncio.gather(
        *(store.begin_turn(start("budget", reserve=300), limits) for _ in range(6)),
        return_exceptions=True,
    )
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 3
    rec = await store.get("budget")
    assert rec is not None
    assert rec.reserved_tokens == 900


# -- absorb: figures counted in memory while the backend could not read the session -------------
def test_absorb_adds_counts_and_keeps_the_stricter_status() -> None:
    stored = record()
    stored.turns, stored.user_turns, stored.cost, stored.granted_turns = 3, 2, 1.5, 4
    stored.tokens.input_tokens, stored.tokens.output_tokens = 300, 30
    stored.first_seen, stored.last_seen = 10.0, 20.0
    stored.status, stored.status_reason = "paused", "paused by the loop rule"
    stored.warnings = [{"key": f"w{i}", "at": i} for i in range(15)]
    stored.loops_allowed_until = 2
    fresh = record()
    fresh.first_seen, fresh.last_seen = 30.0, 40.0
    ticket = check_and_reserve(fresh, start(at=30.0), Limits())
    settle(fresh, ticket, end(Usage(input_tokens=100, output_tokens=10), at=40.0))
    fresh.warnings = [{"key": f"new{i}", "at": 100 + i} for i in range(10)]
    fresh.loops_allowed_until = 1  # a grant during the outage, on this process's turn 1

    absorb(fresh, stored)

    assert (fresh.turns, fresh.user_turns, fresh.granted_turns) == (4, 3, 4)
    assert fresh.cost == 1.5
    assert (fresh.tokens.input_tokens, fresh.tokens.output_tokens) == (400, 40)
    assert fresh.models["gpt-5"].turns == 1
    assert (fresh.first_seen, fresh.last_seen) == (10.0, 40.0)
    assert (fresh.status, fresh.status_reason) == ("paused", "paused by the loop rule")
    assert len(fresh.warnings) == 20  # capped, the newest kept, stored first
    assert [w["key"] for w in fresh.warnings[-10:]] == [f"new{i}" for i in range(10)]
    assert fresh.warnings[0]["key"] == "w5"
    assert fresh.loops_allowed_until == 4  # turn 1 of this process is turn 4 of the session


async def test_a_session_the_backend_cannot_read_begins_in_memory() -> None:
    class Failing(MemoryStore):
        async def _fetch(self, session_id: str) -> SessionRecord | None:
            raise LoadFailed(session_id, OSError("disk"))

    store = Failing()
    assert await store.get("s1") is None  # the request path goes on as for a new session
    ticket = await store.begin_turn(start("s1"), Limits())
    assert ticket.turn == 1 and store.unloaded == {"s1"}
    with pytest.raises(LoadFailed):  # failing closed: not counted against half the figures
        await store.begin_turn(replace(start("s1"), fail_open=False), Limits())
    with pytest.raises(LoadFailed):
        await store.begin_turn(replace(start("s2"), fail_open=False), Limits())
    assert "s2" not in store.sessions


async def test_absorbing_an_id_another_key_owns_moves_the_figures_to_the_qualified_id() -> None:
    class Failing(MemoryStore):
        async def _fetch(self, session_id: str) -> SessionRecord | None:
            raise LoadFailed(session_id, OSError("disk"))

    store = Failing()
    theirs = Identity("s1", "explicit", "codex", None, "0123456789ab")
    ticket = await store.begin_turn(replace(start("s1"), identity=theirs), Limits())
    stored = record("s1")  # what the disk had: the id is another key's
    stored.turns = 7
    store._absorb_stored("s1", stored)
    assert "s1" in store.unloaded  # a call still in flight names the id: moved later
    await store.end_turn(ticket, end(None))
    store._absorb_stored("s1", stored)
    moved = store.sessions["s1~0123456789ab"]
    assert moved.turns == 1 and moved.key_hash == "0123456789ab"
    assert "s1" not in store.sessions  # the owner's record is read from its backend again
    assert store.unloaded == {"s1~0123456789ab"}  # the qualified id may be stored too
    assert stored.turns == 7


async def test_the_memory_store_is_never_behind() -> None:
    store = MemoryStore()
    heard: list[str | None] = []
    store.watch(heard.append, 0.01)
    for i in range(5):
        await store.end_turn(await store.begin_turn(start(f"s{i}"), Limits()), end(None))
    await asyncio.sleep(0.02)
    assert (store.trouble, heard, store.unloaded) == (None, [], set())
    assert store.backlog() == Backlog()


# -- retention ------------------------------------------------------------------------------------
DAY = 86400.0


async def test_sessions_past_their_retention_are_deleted(store: Store, tmp_path: Path) -> None:
    store.retention = Retention(ended=1 * DAY, idle=3 * DAY)
    t0 = time.time() - 3.1 * DAY  # the trigger call is now (the disk's sweep reads the clock)
    for session, at in (("ended-old", t0), ("idle-old", t0), ("recent", t0 + 2.5 * DAY),
                        ("ended-recent", t0 + 2.5 * DAY)):  # fmt: skip
        ticket = await store.begin_turn(start(session, at=at), Limits())
        await store.end_turn(ticket, end(None, at=at))
    await store.set_status("ended-old", "ended", "ended by bob")
    await store.set_status("ended-recent", "ended", "ended by bob")
    if isinstance(store, SqliteStore):
        await store.flush()

    # A call past a day and a half: "ended-old" is past its day; nothing idles for 3 yet.
    ticket = await store.begin_turn(start("trigger", at=t0 + 3.1 * DAY), Limits())
    await store.end_turn(ticket, end(None, at=t0 + 3.1 * DAY))
    assert await store.get("ended-old") is None
    assert await store.get("idle-old") is None  # idle 3.1 days > 3
    assert await store.get("recent") is not None  # seen 0.6 days ago
    assert await store.get("ended-recent") is not None  # ended, but its last call is recent
    if isinstance(store, RedisStore):
        # Redis deletes them itself: each session's TTL is its retention from its last call.
        recent = await store.client.ttl(store.keys.session("recent"))
        ended = await store.client.ttl(store.keys.session("ended-recent"))
        assert 2.3 * DAY < recent <= 2.4 * DAY + 1  # idle retention: 3 days after t0 + 2.5
        assert 0.3 * DAY < ended <= 0.4 * DAY + 1  # ended: 1 day after its last call
    else:
        assert store.expired >= 1

    if isinstance(store, SqliteStore):  # the stored rows too, and for good: a reopen has none
        store._sessions_deleted_at = float("-inf")
        await store._delete_expired_sessions()
        await store.flush()
        other = SqliteStore(tmp_path / "gateway.db")  # another process on the same file
        await other.open()
        try:
            assert await other.get("ended-old") is None
            assert await other.get("idle-old") is None
            assert await other.get("recent") is not None
        finally:
            await other.close()


async def test_no_retention_keeps_every_session(store: Store) -> None:
    store.retention = Retention()
    ticket = await store.begin_turn(start("old", at=1.0), Limits())
    await store.end_turn(ticket, end(None, at=1.0))
    ticket = await store.begin_turn(start("new", at=1000 * DAY), Limits())
    await store.end_turn(ticket, end(None, at=1000 * DAY))
    assert await store.get("old") is not None


def test_a_session_with_a_call_in_flight_is_never_expired() -> None:
    record = SessionRecord("s", "x", "a", first_seen=0.0, last_seen=0.0, in_flight=1)
    assert not Retention(ended=1.0, idle=1.0).expired(record, 10 * DAY)
    record.in_flight = 0
    assert Retention(ended=None, idle=1.0).expired(record, 10.0)
