"""MemoryStore: bounded by ``max_sessions``, least recently changed first, never a session with
a call in flight; and what one session costs."""

from __future__ import annotations

import gc
import tracemalloc

from gateway.dialects import Usage
from gateway.store import LimitExceeded, Limits, MemoryStore

from .test_base import end, start


async def finished_turn(store: MemoryStore, session: str, at: float, model: str = "gpt-5") -> None:
    ticket = await store.begin_turn(start(session, at=at), Limits())
    usage = Usage(input_tokens=12_000, output_tokens=800, cache_read_tokens=9_000)
    await store.end_turn(ticket, end(usage, at=at + 1, model=model))


async def test_the_least_recently_changed_sessions_go_past_the_cap() -> None:
    store = MemoryStore(max_sessions=100)
    for i in range(150):
        await finished_turn(store, f"s{i}", at=1000.0 + i)
    assert len(store.sessions) == 100 and store.evicted == 50
    assert await store.get("s49") is None
    assert (await store.get("s50")) is not None and (await store.get("s149")) is not None


async def test_a_session_in_use_stays_and_one_that_returns_starts_fresh() -> None:
    store = MemoryStore(max_sessions=10)
    for i in range(10):
        await finished_turn(store, f"s{i}", at=1000.0 + i)
    await finished_turn(store, "s0", at=2000.0)  # s0 is now the most recent
    await finished_turn(store, "new", at=2001.0)
    assert await store.get("s1") is None
    record = await store.get("s0")
    assert record is not None and record.turns == 2
    await finished_turn(store, "s1", at=2002.0)
    again = await store.get("s1")
    assert again is not None and again.turns == 1


async def test_a_session_with_a_call_in_flight_is_never_evicted() -> None:
    store = MemoryStore(max_sessions=5)
    limits = Limits(max_turns=2)
    ticket = await store.begin_turn(start("busy", at=1000.0, reserve=500), limits)
    for i in range(50):
        await finished_turn(store, f"other-{i}", at=1001.0 + i)
    busy = await store.get("busy")
    assert busy is not None and busy.in_flight == 1 and busy.reserved_tokens == 500
    assert len(store.sessions) == 5
    # The turn ends on the record that holds its reservation, and the limit still counts it.
    await store.end_turn(ticket, end(Usage(input_tokens=10, output_tokens=1), at=1100.0))
    assert (busy.in_flight, busy.reserved_tokens, busy.turns) == (0, 0, 1)
    await store.begin_turn(start("busy", at=1101.0), limits)
    try:
        await store.begin_turn(start("busy", at=1102.0), limits)
        raise AssertionError("a third turn of two went through")
    except LimitExceeded as exc:
        assert exc.hit.limit == "max_turns"


async def test_what_a_session_costs() -> None:
    """About 1.9 KB for a session with three turns on two models and a warning (the figure in
    the module docstring and the README); the bound leaves room for a record that grows."""
    sessions = 10_000
    store = MemoryStore(max_sessions=sessions)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(sessions):
            await finished_turn(store, f"session-{i:08d}", at=1000.0 + i)
            await finished_turn(store, f"session-{i:08d}", at=1002.0 + i)
            await finished_turn(store, f"session-{i:08d}", at=1004.0 + i, model="gpt-5-mini")
            await store.note(
                start(f"session-{i:08d}").identity, 1005.0 + i, "warnings", {"w": ["80%"]}
            )
        gc.collect()
        per_session = (tracemalloc.get_traced_memory()[0] - before) / sessions
    finally:
        tracemalloc.stop()
    print(f"memory store: {per_session:.0f} bytes per session")
    assert len(store.sessions) == sessions
    assert 500 < per_session < 4096
