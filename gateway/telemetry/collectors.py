"""Families read when ``/metrics`` is scraped, not updated per request: active sessions, the
process, the live policy, the store's failures, and the budgets.

Each is a ``prometheus_client`` collector registered in the app's ``Metrics.registry``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gateway.policy.live import LivePolicy
    from gateway.store import BudgetCounter
    from gateway.telemetry.labels import LabelCap

ACTIVE_WINDOW = 300.0
"""A session counts as active for this long after its last call."""


class ActiveSessions(Collector):
    """``gateway_active_sessions``: sessions with a call in the last five minutes, by agent.
    Kept as last-seen times (ids are never exported), pruned when scraped."""

    def __init__(self) -> None:
        self.last_seen: dict[str, tuple[str, float]] = {}

    def touch(self, session_id: str, agent: str) -> None:
        self.last_seen[session_id] = (agent, time.monotonic())

    def collect(self) -> Iterable[Metric]:
        cutoff = time.monotonic() - ACTIVE_WINDOW
        stale = [s for s, (_, at) in self.last_seen.items() if at < cutoff]
        for session in stale:
            del self.last_seen[session]
        counts: dict[str, int] = {}
        for agent, _ in self.last_seen.values():
            counts[agent] = counts.get(agent, 0) + 1
        family = GaugeMetricFamily(
            "gateway_active_sessions",
            "Sessions with an LLM call in the last five minutes, by agent.",
            labels=["agent"],
        )
        for agent, count in sorted(counts.items()):
            family.add_metric([agent], count)
        yield family


class ProcessStatus(Collector):
    """``process_*``: CPU, memory, file descriptors and start time of the gateway process,
    under the names every Prometheus client uses (prometheus_client's ``ProcessCollector``).

    That collector reads /proc, which is file I/O: the scrape handler takes a ``sample`` on a
    worker thread and the registry yields the latest one. Without /proc there is none."""

    def __init__(self) -> None:
        self._reader: ProcessCollector | None = None
        self.latest: list[Metric] = []

    def sample(self) -> list[Metric]:
        """Off the event loop only: the reader's constructor reads /proc too."""
        if self._reader is None:
            self._reader = ProcessCollector(registry=None)
        return list(self._reader.collect())

    def collect(self) -> Iterable[Metric]:
        return self.latest


class PolicyStatus(Collector):
    """``gateway_policy_reloads_total`` by outcome and ``gateway_policy_info``, read from the
    live policy when scraped."""

    def __init__(self, live: LivePolicy) -> None:
        self.live = live

    def collect(self) -> Iterable[Metric]:
        reloads = CounterMetricFamily(
            "gateway_policy_reloads",
            "Policy file loads by outcome: ok (in force), error (refused, the old one stays).",
            labels=["outcome"],
        )
        reloads.add_metric(["ok"], self.live.reloads)
        reloads.add_metric(["error"], self.live.failures)
        yield reloads
        info = GaugeMetricFamily(
            "gateway_policy_info", "The policy in force (value 1), by version.", labels=["version"]
        )
        if self.live.current is not None:
            info.add_metric([self.live.current.version], 1)
        yield info


class StoreFailures(Protocol):
    """What ``StoreStatus`` reads from a store (``Store.errors``)."""

    @property
    def errors(self) -> Mapping[str, int]:
        """Failures of the store's backend so far, by operation (``load``, ``write``)."""
        ...


class StoreStatus(Collector):
    """``gateway_store_errors_total`` by operation (load, write), read from the store."""

    def __init__(self, store: StoreFailures) -> None:
        self.store = store

    def collect(self) -> Iterable[Metric]:
        errors = CounterMetricFamily(
            "gateway_store_errors",
            "Session store failures by operation: load (a session could not be read), write "
            "(changes could not be written; retried at the next flush).",
            labels=["operation"],
        )
        counts = self.store.errors
        for operation in ("load", "write"):
            errors.add_metric([operation], counts.get(operation, 0))
        yield errors


class BudgetStatus(Collector):
    """Budgets per team (or key) and window: limit, spent, and where the window stands, so an
    alert can compare spending with the budget's pace. Read from the store when scraped (the
    scrape handler sets ``counters`` first)."""

    def __init__(self, owner: LabelCap) -> None:
        self.owner = owner
        self.counters: list[BudgetCounter] = []

    def collect(self) -> Iterable[Metric]:
        labels = ["scope", "owner", "window"]
        families = {
            name: GaugeMetricFamily(f"gateway_budget_{name}", text, labels=labels)
            for name, text in (
                ("limit_tokens", "A token budget's limit (input plus output tokens)."),
                ("spent_tokens", "Tokens spent in the budget's current window."),
                ("limit_cost", "A cost budget's limit, in the price table's currency."),
                ("spent_cost", "Cost spent in the budget's current window."),
                ("window_end_timestamp_seconds", "When the budget's current window ends."),
                ("window_seconds", "The length of the budget's current window."),
            )
        }
        for counter in self.counters:
            scope, owner, window, _ = [*counter.key.split(":", 3), "", "", ""][:4]
            values = [scope, self.owner(owner), window]
            if counter.max_tokens is not None:
                families["limit_tokens"].add_metric(values, counter.max_tokens)
                families["spent_tokens"].add_metric(values, counter.tokens)
            if counter.max_cost is not None:
                families["limit_cost"].add_metric(values, counter.max_cost)
                families["spent_cost"].add_metric(values, counter.cost)
            families["window_end_timestamp_seconds"].add_metric(values, counter.window_end)
            families["window_seconds"].add_metric(values, _window_seconds(window, counter))
        yield from families.values()


def _window_seconds(window: str, counter: BudgetCounter) -> float:
    if window == "hour":
        return 3600.0
    if window == "day":
        return 86400.0
    end = datetime.fromtimestamp(counter.window_end - 1, UTC)
    return end.day * 86400.0  # the month's last day is its length in days
