"""The adaptive concurrency limit, its bounded queue and each owner's share."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.resilience.limiter import Limiter, Shed
from gateway.settings import ConcurrencySettings


def limiter(**settings: object) -> Limiter:
    return Limiter(ConcurrencySettings(**settings))  # type: ignore[arg-type]


async def test_slots_up_to_the_limit_then_a_queue_then_shed() -> None:
    lim = limiter(max=2, min=1, queue=1, queue_timeout=5, session_share=1.0)
    assert lim.try_acquire("a")
    assert lim.try_acquire("b")
    assert not lim.try_acquire("c")
    waiting = asyncio.get_running_loop().create_task(lim.wait("c"))
    await asyncio.sleep(0)
    assert lim.queued == 1
    with pytest.raises(Shed) as shed:
        await lim.wait("d")
    assert shed.value.reason == "queue_full"
    assert shed.value.retry_after >= 1
    lim.release("a")
    await waiting  # got a's slot
    assert lim.in_flight == 2
    assert lim.queued == 0


async def test_a_wait_times_out_as_shed() -> None:
    lim = limiter(max=1, min=1, queue=5, queue_timeout=0.05, session_share=1.0)
    assert lim.try_acquire("a")
    with pytest.raises(Shed) as shed:
        await lim.wait("b")
    assert shed.value.reason == "queue_timeout"
    assert lim.queued == 0
    assert lim.in_flight == 1


async def test_one_owner_cannot_take_every_slot() -> None:
    lim = limiter(max=8, min=1, queue=100, queue_timeout=5, session_share=0.25)
    assert [lim.try_acquire("runaway") for _ in range(3)] == [True, True, False]
    runaway = [asyncio.get_running_loop().create_task(lim.wait("runaway")) for _ in range(10)]
    await asyncio.sleep(0)
    # Others still get slots at once though the runaway's calls wait.
    others = [asyncio.get_running_loop().create_task(lim.wait(f"o{i}")) for i in range(6)]
    await asyncio.wait_for(asyncio.gather(*others), 1)
    assert lim.in_flight == 8
    assert lim.held["runaway"] == 2
    lim.release("runaway")
    await asyncio.sleep(0)
    assert lim.held["runaway"] == 2  # its next waiter took its freed slot, no more
    for task in runaway:
        task.cancel()
    await asyncio.gather(*runaway, return_exceptions=True)
    assert lim.queued == 0


async def test_a_cancelled_waiter_that_was_granted_gives_its_slot_back() -> None:
    lim = limiter(max=1, min=1, queue=5, queue_timeout=5, session_share=1.0)
    assert lim.try_acquire("a")
    waiter = asyncio.get_running_loop().create_task(lim.wait("b"))
    await asyncio.sleep(0)
    lim.release("a")  # granted to b ...
    waiter.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert lim.in_flight == 0
    assert lim.held == {}


def test_overload_shrinks_the_limit_to_its_floor_and_quick_answers_grow_it() -> None:
    now = [0.0]
    lim = Limiter(ConcurrencySettings(max=100, min=10), clock=lambda: now[0])
    for _ in range(100):
        now[0] += 1.1
        lim.overloaded()
    assert lim.limit == 10
    lim.in_flight = 10  # busy: the slots are used
    for _ in range(500):
        lim.answered(0.1)
    assert lim.limit > 20


def test_a_slower_first_byte_shrinks_the_limit() -> None:
    now = [0.0]
    lim = Limiter(ConcurrencySettings(max=100, min=10), clock=lambda: now[0])
    for _ in range(50):
        lim.answered(0.1)
    before = lim.limit
    for _ in range(20):
        now[0] += 1.1
        lim.answered(1.0)  # ten times slower
    assert lim.limit < before


def test_a_fixed_limit_does_not_move() -> None:
    lim = limiter(max=50, min=5, adaptive=False)
    lim.overloaded()
    lim.answered(10.0)
    assert lim.limit == 50


def test_memory_stays_bounded_by_calls_in_flight() -> None:
    lim = limiter(max=10_000, min=1, session_share=1.0)
    for i in range(5000):
        assert lim.try_acquire(f"s{i}")
    for i in range(5000):
        lim.release(f"s{i}")
    assert lim.held == {}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["call", "end", "cancel", "overload", "fast"]), st.integers(0, 5)
        ),
        max_size=60,
    )
)
def test_any_sequence_keeps_the_counts_true_and_the_queue_bounded(
    steps: list[tuple[str, int]],
) -> None:
    """Calls, ends, cancelled waits and the limit moving, in any order: slots held always add
    up to the calls in flight, never past the limit's ceiling, and the queue stays in bound."""

    async def run() -> None:
        lim = Limiter(
            ConcurrencySettings(max=4, min=1, queue=3, queue_timeout=5, session_share=0.5)
        )
        holding: list[str] = []
        waiting: list[tuple[str, asyncio.Task[None]]] = []
        for action, n in steps:
            owner = f"o{n % 3}"
            if action == "call":
                if lim.try_acquire(owner):
                    holding.append(owner)
                else:
                    task = asyncio.get_running_loop().create_task(lim.wait(owner))
                    waiting.append((owner, task))
            elif action == "end" and holding:
                lim.release(holding.pop(n % len(holding)))
            elif action == "cancel" and waiting:
                _, task = waiting.pop(n % len(waiting))
                task.cancel()
            elif action == "overload":
                lim.overloaded()
            elif action == "fast":
                lim.answered(0.01)
            await asyncio.sleep(0)
            for owner_, task in list(waiting):
                if task.done():
                    waiting.remove((owner_, task))
                    if not task.cancelled() and task.exception() is None:
                        holding.append(owner_)
            assert lim.in_flight == len(holding) == sum(lim.held.values())
            assert lim.in_flight <= 4
            assert lim.queued <= 3
            assert all(count > 0 for count in lim.held.values())
        for _, task in waiting:
            task.cancel()
        await asyncio.gather(*(task for _, task in waiting), return_exceptions=True)
        for owner in holding:
            lim.release(owner)
        assert lim.in_flight == 0
        assert lim.held == {}
        assert lim.queued == 0

    asyncio.run(run())


async def test_a_grant_in_the_same_turn_as_the_queue_timeout_keeps_its_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The release that grants the slot and the timeout fire in one iteration of the loop: the
    waiter has the slot (not shed with a slot counted for nobody)."""
    lim = limiter(max=1, min=1, adaptive=False, queue=4, queue_timeout=0.05, session_share=1)
    assert lim.try_acquire("a")
    loop = asyncio.get_running_loop()
    timeouts: list[asyncio.Timeout] = []
    real = asyncio.timeout

    def recording(delay: float | None) -> asyncio.Timeout:
        made = real(delay)
        timeouts.append(made)
        return made

    monkeypatch.setattr(asyncio, "timeout", recording)
    waiter = loop.create_task(lim.wait("b"))
    await asyncio.sleep(0)
    [made] = timeouts
    when = made.when()
    assert when is not None
    loop.call_at(when - 0.02, time.sleep, 0.05)  # a busy loop: both timers due at once
    loop.call_at(when - 0.001, lim.release, "a")
    await waiter  # granted: no Shed
    assert lim.in_flight == 1
    assert lim.held == {"b": 1}
    lim.release("b")
    assert lim.in_flight == 0


async def test_one_owner_over_its_share_cannot_fill_the_queue() -> None:
    lim = limiter(max=8, min=1, adaptive=False, queue=100, queue_timeout=5, session_share=0.25)
    assert [lim.try_acquire("hog") for _ in range(3)] == [True, True, False]
    hog = [asyncio.get_running_loop().create_task(lim.wait("hog")) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(Shed) as shed:
        await lim.wait("hog")  # its share in flight and as many waiting
    assert shed.value.reason == "session_share"
    assert lim.queued == 2
    assert lim.try_acquire("polite")  # free slots go to others, whoever waits
    for task in hog:
        task.cancel()
    await asyncio.gather(*hog, return_exceptions=True)
    assert lim.queued_by == {}
