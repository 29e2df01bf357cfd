"""Budget windows: the calendar period (UTC) a budget counts in, from a minute (rate limits)
to a month, and the counter a caller's spending goes to (``budgets`` in the policy; the store
checks and records them atomically)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gateway.policy.compiled import Caller, Effective
from gateway.policy.model import Budget
from gateway.store import BudgetLimit


def budget_limit(budget: Budget, who: Caller, effective: Effective, now: float) -> BudgetLimit:
    # ``per: key`` is the principal: ``key_hash`` is its owner tag in every auth mode (the
    # gateway key's or JWT subject's, or in passthrough the provider key's hash).
    owner = (who.team or "unassigned") if budget.per == "team" else (who.key_hash or "no-key")
    period, end = window(budget.window, now)
    return BudgetLimit(
        key=f"{budget.per}:{owner}:{budget.window}:{period}",
        window_end=end,
        max_tokens=budget.max_tokens,
        max_cost=budget.max_cost,
        max_requests=budget.max_requests,
        rule=effective.source("budgets"),
    )


def window(kind: str, now: float) -> tuple[str, float]:
    """The calendar period (UTC) ``now`` falls in, and when it ends."""
    at = datetime.fromtimestamp(now, UTC)
    if kind == "minute":
        start = at.replace(second=0, microsecond=0)
        return start.strftime("%Y-%m-%dT%H:%M"), (start + timedelta(minutes=1)).timestamp()
    if kind == "hour":
        start = at.replace(minute=0, second=0, microsecond=0)
        return start.strftime("%Y-%m-%dT%H"), (start + timedelta(hours=1)).timestamp()
    if kind == "day":
        start = at.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y-%m-%d"), (start + timedelta(days=1)).timestamp()
    start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    following = (start + timedelta(days=32)).replace(day=1)
    return start.strftime("%Y-%m"), following.timestamp()
