"""The circuit breaker's states, on a clock the test moves."""

from __future__ import annotations

from gateway.resilience.breaker import CLOSED, HALF_OPEN, OPEN, Breaker, Transition
from gateway.settings import BreakerSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(**settings: object) -> tuple[Breaker, Clock, list[Transition]]:
    clock, moves = Clock(), []
    b = Breaker("up", BreakerSettings(**settings), moves.append, clock)  # type: ignore[arg-type]
    return b, clock, moves


def test_it_opens_after_consecutive_failures_and_answers_at_once() -> None:
    b, _, moves = breaker(failures=3, open=30)
    for _ in range(2):
        b.failure("http_5xx")
        assert b.allow()
    b.failure("http_5xx")
    assert b.state == OPEN
    assert not b.allow()
    assert [(m.old, m.new) for m in moves] == [(CLOSED, OPEN)]
    assert "3 consecutive failures (http_5xx)" in moves[0].reason


def test_a_success_resets_the_consecutive_count() -> None:
    b, _, _ = breaker(failures=3, min_calls=1000)
    for _ in range(10):
        b.failure("reset")
        b.failure("reset")
        b.success()
    assert b.state == CLOSED


def test_a_failure_ratio_over_the_window_opens_it() -> None:
    b, clock, _ = breaker(failures=100, failure_ratio=0.5, window=10, min_calls=10)
    for i in range(20):
        clock.now += 0.2
        if i % 2:
            b.failure("timeout")
        else:
            b.success()
    assert b.state == OPEN


def test_old_calls_leave_the_window() -> None:
    b, clock, _ = breaker(failures=100, failure_ratio=0.5, window=5, min_calls=4)
    for _ in range(3):
        b.failure("timeout")
    clock.now += 10  # those failures are out of the window
    for _ in range(10):
        b.success()
    b.failure("timeout")
    assert b.state == CLOSED


def test_half_open_lets_one_probe_through_and_a_success_closes_it() -> None:
    b, clock, moves = breaker(failures=1, open=30)
    b.failure("http_5xx")
    clock.now += 29
    assert not b.allow()
    assert b.retry_after() >= 1
    clock.now += 2
    assert b.allow()  # the probe
    assert b.state == HALF_OPEN
    assert not b.allow()  # nobody else while it is out
    b.success()
    assert b.state == CLOSED
    assert [m.new for m in moves] == [OPEN, HALF_OPEN, CLOSED]


def test_a_failed_probe_opens_it_again_for_the_whole_period() -> None:
    b, clock, _ = breaker(failures=1, open=30)
    b.failure("http_5xx")
    clock.now += 31
    assert b.allow()
    b.failure("http_529")
    assert b.state == OPEN
    clock.now += 29
    assert not b.allow()


def test_an_abandoned_probe_lets_the_next_call_probe() -> None:
    b, clock, _ = breaker(failures=1, open=1)
    b.failure("reset")
    clock.now += 2
    assert b.allow()
    assert not b.allow()
    b.abandoned()
    assert b.allow()


def test_a_disabled_breaker_never_opens() -> None:
    b, _, _ = breaker(enabled=False, failures=1)
    for _ in range(50):
        b.failure("http_5xx")
    assert b.allow()


def test_forcing_states() -> None:
    b, _, moves = breaker()
    b.force(OPEN, "operator")
    assert not b.allow()
    b.force(CLOSED, "operator")
    assert b.allow()
    assert [m.reason for m in moves] == ["operator", "operator"]
