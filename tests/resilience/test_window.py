"""Counts over the last seconds from marks taken once a second."""

from __future__ import annotations

from gateway.resilience.window import MARK_EVERY, Window


def count(window: Window, events: list[float], now: float) -> int:
    """Replays calls at these times as the breaker does, and counts those in the window."""
    total, roll_at = 0, float("-inf")
    for at in events:
        if at >= roll_at:
            roll_at = window.roll(at, total)
        total += 1
    (grew,) = window.since(now, total)
    return grew


def test_every_call_of_a_young_window_counts() -> None:
    assert count(Window(10), [0.0, 0.1, 0.5, 3.0, 9.0], 9.5) == 5


def test_calls_older_than_the_window_fall_out() -> None:
    events = [float(t) for t in range(0, 30)]  # one a second
    assert count(Window(10), events, 29.5) in (10, 11)  # to a second


def test_a_burst_before_an_idle_spell_is_forgotten() -> None:
    events = [0.0 + i * 0.001 for i in range(500)] + [100.0, 100.5]
    assert count(Window(10), events, 101.0) == 2


def test_marks_are_at_most_one_a_second_and_bounded() -> None:
    window = Window(5)
    roll_at = float("-inf")
    for total in range(10_000):
        at = total * 0.01
        if at >= roll_at:
            roll_at = window.roll(at, total)
            assert roll_at == at + MARK_EVERY
    assert len(window._marks) <= 6  # the bound is the point
