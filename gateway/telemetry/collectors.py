"""Families read when ``/metrics`` is scraped, not updated per request: active sessions, the
process, the live policy, the store's failures, the budgets, the upstreams' guards, the
credential pools, the redactions and the gateway keys.

Each is a ``prometheus_client`` collector registered in the app's ``Metrics.registry``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from gateway.store.records import budget_key_parts
from gateway.telemetry.labels import OTHER

if TYPE_CHECKING:
    from asyncio import Event

    from gateway.policy.live import LivePolicy
    from gateway.resilience.degraded import Degradation
    from gateway.store import BudgetCounter
    from gateway.telemetry.labels import LabelCap
    from gateway.upstream import Upstreams

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
    """``gateway_store_errors_total`` by operation (load, write), and the backlog of changes
    not yet written (``gateway_store_backlog``, ``gateway_store_backlog_age_seconds``), read
    from the store."""

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
        # Read when the store has one (a bare stand-in in a test may not).
        backlog = getattr(self.store, "backlog", None)
        if backlog is not None:
            held = backlog()
            waiting = GaugeMetricFamily(
                "gateway_store_backlog",
                "Changes held in memory and not yet written by the session store, by kind"
                " (sessions, budgets); they grow while its disk fails.",
                labels=["kind"],
            )
            waiting.add_metric(["sessions"], held.sessions)
            waiting.add_metric(["budgets"], held.budgets)
            age = GaugeMetricFamily(
                "gateway_store_backlog_age_seconds",
                "How long the oldest change not yet written has waited (0: all written).",
            )
            age.add_metric([], held.age)
            yield from (waiting, age)


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
                ("limit_requests", "A request budget's limit (LLM calls in its window)."),
                ("spent_requests", "LLM calls begun in the budget's current window."),
                ("window_end_timestamp_seconds", "When the budget's current window ends."),
                ("window_seconds", "The length of the budget's current window."),
            )
        }
        for counter in self.counters:
            scope, owner, window = budget_key_parts(counter.key)
            values = [scope, self.owner(owner), window]
            if counter.max_tokens is not None:
                families["limit_tokens"].add_metric(values, counter.max_tokens)
                families["spent_tokens"].add_metric(values, counter.tokens)
            if counter.max_cost is not None:
                families["limit_cost"].add_metric(values, counter.max_cost)
                families["spent_cost"].add_metric(values, counter.cost)
            if counter.max_requests is not None:
                families["limit_requests"].add_metric(values, counter.max_requests)
                families["spent_requests"].add_metric(values, counter.requests)
            families["window_end_timestamp_seconds"].add_metric(values, counter.window_end)
            families["window_seconds"].add_metric(values, _window_seconds(window, counter))
        yield from families.values()


def _window_seconds(window: str, counter: BudgetCounter) -> float:
    if window == "minute":
        return 60.0
    if window == "hour":
        return 3600.0
    if window == "day":
        return 86400.0
    end = datetime.fromtimestamp(counter.window_end - 1, UTC)
    return end.day * 86400.0  # the month's last day is its length in days


class ResilienceStatus(Collector):
    """Each upstream's breaker state, concurrency limit, calls in flight and queued; the
    degraded mode by reason; readiness (0 while a stop drains)."""

    def __init__(self, upstreams: Upstreams, degraded: Degradation, draining: Event) -> None:
        self.upstreams = upstreams
        self.degraded = degraded
        self.draining = draining

    def collect(self) -> Iterable[Metric]:
        from gateway.resilience.breaker import STATES
        from gateway.resilience.degraded import REASONS

        state = GaugeMetricFamily(
            "gateway_upstream_breaker_state",
            "The upstream's circuit breaker: 1 for the state it is in (closed, half_open, open).",
            labels=["upstream", "state"],
        )
        limit = GaugeMetricFamily(
            "gateway_upstream_concurrency_limit",
            "Calls the upstream may have in flight now (adaptive between concurrency.min and"
            " .max).",
            labels=["upstream"],
        )
        in_flight = GaugeMetricFamily(
            "gateway_upstream_in_flight", "Calls holding a slot of the upstream's limit.",
            labels=["upstream"],
        )  # fmt: skip
        queued = GaugeMetricFamily(
            "gateway_upstream_queued", "Calls waiting for a slot of the upstream's limit.",
            labels=["upstream"],
        )  # fmt: skip
        for upstream in self.upstreams.by_name.values():
            name = upstream.name
            for each in STATES:
                state.add_metric([name, each], 1.0 if upstream.breaker.state == each else 0.0)
            limit.add_metric([name], int(upstream.limiter.limit))
            in_flight.add_metric([name], upstream.limiter.in_flight)
            queued.add_metric([name], upstream.limiter.queued)
        degraded = GaugeMetricFamily(
            "gateway_degraded",
            "1 while the gateway runs degraded for this reason (manual, store, span_exporter,"
            " summarizer, loop_lag): the core path serves, optional work is paused.",
            labels=["reason"],
        )
        for reason in REASONS:
            degraded.add_metric([reason], 1.0 if self.degraded.holds(reason) else 0.0)
        ready = GaugeMetricFamily(
            "gateway_ready", "1 while the gateway takes new calls; 0 once a stop drains."
        )
        ready.add_metric([], 0.0 if self.draining.is_set() else 1.0)
        yield from (state, limit, in_flight, queued, degraded, ready)


class PoolCounts(Protocol):
    """What ``CredentialPoolStatus`` reads (``gateway.auth.pools.CredentialPools``)."""

    def counts(self) -> Iterable[tuple[str, str, int, int]]:
        """``(upstream, pool, healthy entries, entries)`` of each pool."""
        ...


class CredentialPoolStatus(Collector):
    """Each upstream credential pool's healthy and configured entries: fewer healthy than
    configured is a pool running on its spares (an entry the upstream refused, 401/403)."""

    def __init__(self, pools: PoolCounts) -> None:
        self.pools = pools

    def collect(self) -> Iterable[Metric]:
        healthy = GaugeMetricFamily(
            "gateway_upstream_credential_pool_healthy",
            "Entries of an upstream credential pool not refused by the upstream (401/403) in"
            " their cool-down; below gateway_upstream_credential_pool_entries: degraded.",
            labels=["upstream", "pool"],
        )
        entries = GaugeMetricFamily(
            "gateway_upstream_credential_pool_entries",
            "Entries configured in an upstream credential pool.",
            labels=["upstream", "pool"],
        )
        for upstream, pool, up, configured in self.pools.counts():
            healthy.add_metric([upstream, pool], up)
            entries.add_metric([upstream, pool], configured)
        yield from (healthy, entries)


class RedactionCounts(Collector):
    """``gateway_redactions_total`` by sink (log, span, audit, error, config): secrets the
    redactor scrubbed, read from its counts when scraped. Every sink is exported from the
    start, at 0, so that an alert on ``increase()`` sees the first one."""

    def __init__(self, counts: Mapping[str, int], sinks: Iterable[str]) -> None:
        self.counts = counts
        self.sinks = tuple(sinks)

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "gateway_redactions",
            "Secrets (a loaded secret's value, or a credential's shape) replaced by"
            " [REDACTED] before they reached a sink, by sink: a sink that starts receiving"
            " secrets shows here first.",
            labels=["sink"],
        )
        for sink in self.sinks:
            family.add_metric([sink], self.counts.get(sink, 0))
        yield family


KEY_STATES = ("active", "expiring", "expired", "revoked")
EXPIRING_WITHIN = 7 * 86400.0
"""A key ending within this long is ``expiring`` (the AgentGatewayKeysExpiringSoon alert)."""


class KeyState(Protocol):
    """What ``KeyStatus`` reads of a key (``gateway.auth.keys.KeyRecord``)."""

    @property
    def team(self) -> str: ...

    @property
    def expires_at(self) -> float | None: ...

    def status(self, now: float) -> str:
        """``active``, ``expired`` or ``revoked`` at ``now``."""
        ...


class KeyStatus(Collector):
    """Gateway keys by team and state (``gateway_keys``: active, expiring within 7 days,
    expired, revoked; each key in one state) and the active keys expiring within 7 days by
    team (``gateway_keys_expiring``, what the alert reads). Counts only: a key's id is never
    a label. Read from the key ring when scraped (the scrape handler sets ``records`` first).

    Teams pass the team label's cap (``Metrics.team``), so that a team has one label value on
    every family. A team it folds into ``other`` is remembered, so that the folding is counted
    once and not at every scrape, until the policy changes the names the cap recognises."""

    def __init__(
        self,
        team: LabelCap,
        within: float = EXPIRING_WITHIN,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.team = team
        self.within = within
        self.clock = clock
        self.records: Sequence[KeyState] = ()
        self.read_at = float("-inf")
        self.changes = -1
        """The key ring's ``changes`` when ``records`` were read."""
        """``time.monotonic()`` when ``records`` were read (the scrape reuses them a while)."""
        self._folded: tuple[object, set[str]] = (None, set())

    def _label(self, team: str) -> str:
        names = self.team.names()
        if self._folded[0] is not names:  # another policy: what it recognises may differ
            self._folded = (names, set())
        folded = self._folded[1]
        if team in folded:
            return OTHER
        label = self.team(team)
        if label == OTHER and team != OTHER:
            folded.add(team)
        return label

    def collect(self) -> Iterable[Metric]:
        now = self.clock()
        counts: dict[tuple[str, str], int] = {}
        for record in self.records:
            state = record.status(now)
            if state not in KEY_STATES:
                continue
            ends = record.expires_at
            if state == "active" and ends is not None and ends - now <= self.within:
                state = "expiring"
            labels = (self._label(record.team), state)
            counts[labels] = counts.get(labels, 0) + 1
        keys = GaugeMetricFamily(
            "gateway_keys",
            "Gateway keys by team and state: active, expiring (active, ending within 7 days),"
            " expired, revoked. Each key is in one state.",
            labels=["team", "state"],
        )
        expiring = GaugeMetricFamily(
            "gateway_keys_expiring",
            "Active gateway keys that expire within 7 days, by team: rotate them or make new"
            " ones before their calls are refused.",
            labels=["team"],
        )
        for team in sorted({team for team, _ in counts}):
            for state in KEY_STATES:
                keys.add_metric([team, state], counts.get((team, state), 0))
            expiring.add_metric([team], counts.get((team, "expiring"), 0))
        yield from (keys, expiring)
