"""Retry decisions: backoff with full jitter, Retry-After headers, the budget."""

from __future__ import annotations

import email.utils

from hypothesis import given
from hypothesis import strategies as st

from gateway.resilience.retry import (
    BUDGET_WINDOW,
    RETRYABLE_STATUSES,
    RetryBudget,
    backoff,
    retry_after,
)


def test_the_statuses_the_sdks_retry() -> None:
    assert {408, 429, 500, 502, 503, 504, 529} == RETRYABLE_STATUSES
    assert not {400, 401, 403, 404, 413, 422} & RETRYABLE_STATUSES


def test_backoff_is_full_jitter_below_the_cap() -> None:
    waits = [backoff(n, 0.2, 5.0) for n in range(1, 12) for _ in range(50)]
    assert all(0 <= w <= 5.0 for w in waits)
    first = [backoff(1, 0.2, 5.0) for _ in range(200)]
    assert max(first) <= 0.2
    assert len(set(first)) > 100  # spread out, not one value


def test_retry_after_forms() -> None:
    assert retry_after({"retry-after-ms": "1500"}) == 1.5
    assert retry_after({"retry-after": "3"}) == 3.0
    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    later = email.utils.formatdate(1_000_030, usegmt=True)
    assert retry_after({"retry-after": later}, now=1_000_000) == 30.0
    assert retry_after({}) is None
    assert retry_after({"retry-after": "soon"}) is None
    assert retry_after({"retry-after": "-5"}) is None
    assert retry_after({"retry-after-ms": "nan"}) is None


@given(st.text(max_size=200), st.text(max_size=200))
def test_hostile_retry_after_never_raises(ms: str, seconds: str) -> None:
    value = retry_after({"retry-after-ms": ms, "retry-after": seconds}, now=0)
    assert value is None or 0 <= value < 1e9


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def test_the_budget_allows_a_ratio_of_recent_requests_plus_a_reserve() -> None:
    clock = Clock()
    budget = RetryBudget(0.2, reserve=0.0, clock=clock)
    for _ in range(100):
        budget.request()
    allowed = sum(budget.try_spend() for _ in range(100))
    assert allowed == 20


def test_the_reserve_lets_a_quiet_gateway_retry() -> None:
    clock = Clock()
    budget = RetryBudget(0.2, reserve=1.0, clock=clock)
    budget.request()
    allowed = sum(budget.try_spend() for _ in range(100))
    # One a second over the window, and the fraction of the one request (0.2, counted whole).
    assert allowed == BUDGET_WINDOW + 1


def test_the_budget_forgets_old_requests() -> None:
    clock = Clock()
    budget = RetryBudget(0.5, reserve=0.0, clock=clock)
    for _ in range(100):
        budget.request()
    clock.now += BUDGET_WINDOW + 1
    assert not budget.try_spend()
