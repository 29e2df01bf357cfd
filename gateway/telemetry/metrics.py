"""Prometheus metrics: the GenAI convention histograms and the gateway's own families.

Names are a contract with the dashboards and alert rules in ``dashboards/``. ``gen_ai_*``
families are named and bucketed as the OpenTelemetry GenAI conventions advise, so third-party
GenAI dashboards read them; the gateway's own dimensions (agent, team, rule, decision) are on
``gateway_*`` families. No session id, key or free text is ever a label, and the open-valued
labels (model, agent, team) are capped twice: each value in length (``gateway.caps``), and in
number: values past the cap are counted as ``other`` (and the folding itself in
``gateway_label_overflow_total``). Recognised values (``Names``: the agents the gateway knows,
the models of its window table and those the policy names) keep their own label ahead of the
made-up ones a client could send to fill the cap.

Everything for one request is recorded at its end, from its ``Exchange`` (``observe``).
"""

from __future__ import annotations

import asyncio
import fnmatch
import platform
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from importlib import metadata
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from gateway.caps import LIMIT, cap
from gateway.compaction.windows import BUILTIN
from gateway.dialects.base import Usage
from gateway.identity import AGENTS
from gateway.telemetry.instruments import Counter, Family, Gauge, Histogram

if TYPE_CHECKING:
    from gateway.exchange import Exchange
    from gateway.policy.live import LivePolicy
    from gateway.policy.model import PolicyFile
    from gateway.store import BudgetCounter

TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)  # fmt: skip
"""The GenAI conventions' advice for ``gen_ai.client.token.usage``."""
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)  # fmt: skip
"""The GenAI conventions' advice for operation duration and time to first chunk."""
OVERHEAD_SLO = 0.010
"""The gateway's own latency objective (p99 under 10 ms): a bucket boundary sits on it."""
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, OVERHEAD_SLO, 0.025, 0.05, 0.1, 0.25, 1.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TURN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
FILL_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
LAG_INTERVAL = 0.5
COMPACTION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                      30, 60)  # fmt: skip
"""From replaying a saved rewrite (milliseconds) to a summary call (tens of seconds)."""
ACTIVE_WINDOW = 300.0
"""A session counts as active for this long after its last call."""
OTHER = "other"
DETECTORS = ("identical_tool_calls", "repeated_requests", "turn_rate")


UNKNOWN, MATCHED, NAMED = 0, 1, 2
"""How well a label value is recognised: not at all, by a glob (``claude-*``), by its name."""


@dataclass(slots=True, frozen=True, eq=False)
class Names:
    """The values of one label the gateway recognises: exact names (always their own label
    value: there are only so many) and globs (which any made-up name can match, so what they
    match shares a cap of its own). Compared in lower case; a model without its provider
    prefix, as the window table matches it."""

    exact: frozenset[str]
    globs: re.Pattern[str] | None = None
    model: bool = False

    @classmethod
    def of(cls, names: Iterable[str], model: bool = False) -> Names:
        exact, globs = set[str](), list[str]()
        for name in names:
            name = name.lower()
            if any(c in name for c in "*?["):
                if name[0] not in "*?[":  # ``*`` (allow everything) recognises nothing
                    globs.append(fnmatch.translate(name))
                stem = name.rstrip("*-")
                if name.endswith("*") and not any(c in stem for c in "*?["):
                    exact.add(stem)  # ``gpt-4o*`` names gpt-4o itself
            else:
                exact.add(name)
        pattern = re.compile("|".join(globs)) if globs else None
        return cls(frozenset(exact | {"unknown"}), pattern, model)

    def recognise(self, value: str) -> int:
        name = value.lower()
        if self.model:
            name = name.rsplit("/", 1)[-1]
        if name in self.exact:
            return NAMED
        if self.globs is not None and self.globs.match(name):
            return MATCHED
        return UNKNOWN


def policy_names(file: PolicyFile) -> tuple[list[str], list[str], list[str]]:
    """The models, agents and teams a policy file names (globs included)."""
    models = [*file.prices, *file.windows]
    models += [*file.defaults.limits.models.allow, *file.defaults.limits.models.deny]
    agents: list[str] = []
    teams = [info.team for info in file.keys.values() if info.team]
    for rule in file.rules:
        match = rule.match
        models += [match.model] if match.model else []
        agents += [match.agent] if match.agent else []
        teams += [match.team] if match.team else []
        allowed = (rule.limits or {}).get("models")
        if isinstance(allowed, dict):
            for key in ("allow", "deny"):
                listed = allowed.get(key)
                if isinstance(listed, list):
                    models += [m for m in listed if isinstance(m, str)]
    return models, agents, teams


class LabelCap:
    """One open-valued label: each value capped in length; recognised values (``Names``)
    always kept by name, those a glob matches up to ``limit`` of them, and the first ``limit``
    others; later ones are ``other``. A caller may say a value is not ``proven`` (a model the
    provider refused, which is how made-up names end): it is then ``other`` unless already
    kept, and takes no place in the cap."""

    def __init__(
        self,
        name: str,
        limit: int,
        overflow: Counter,
        names: Callable[[], Names] | None = None,
    ) -> None:
        self.name, self.limit, self.seen = name, limit, set[str]()
        self.names = names or (lambda: _NO_NAMES)
        self._kept = [0, 0]
        """Values kept, by recognition (unknown, matched): each kind has its own cap."""
        self._overflow, self._labels = overflow, (name,)
        overflow.touch(self._labels)

    def __call__(self, value: str | None, proven: bool = True) -> str:
        value = value or "unknown"
        if len(value) > LIMIT:
            value = cap(value)
        if value in self.seen:
            return value
        kind = self.names().recognise(value)
        if kind == NAMED:
            self.seen.add(value)
            return value
        if proven and self._kept[kind] < self.limit:
            self._kept[kind] += 1
            self.seen.add(value)
            return value
        self._overflow.inc(self._labels)
        return OTHER


_NO_NAMES = Names.of(())
_AGENT_NAMES = frozenset(agent for _, agent in AGENTS)


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


class StoreStatus(Collector):
    """``gateway_store_errors_total`` by operation (load, write), read from the store."""

    def __init__(self, store: object) -> None:
        self.store = store

    def collect(self) -> Iterable[Metric]:
        errors = CounterMetricFamily(
            "gateway_store_errors",
            "Session store failures by operation: load (a session could not be read), write "
            "(changes could not be written; retried at the next flush).",
            labels=["operation"],
        )
        counts: dict[str, int] = getattr(self.store, "errors", {})
        for operation in ("load", "write"):
            errors.add_metric([operation], counts.get(operation, 0))
        yield errors


class BudgetStatus(Collector):
    """Budgets per team (or key) and window: limit, spent, and where the window stands, so an
    alert can compare spending with the budget's pace. Read from the store when scraped."""

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


class Metrics:
    """Every family the gateway exports, in its own registry (one per app: tests run many)."""

    def __init__(self, max_label_values: int = 50) -> None:
        self.registry = CollectorRegistry()
        self._agents: set[str] = set()
        self.label_overflow = Counter(
            "gateway_label_overflow",
            "Label values folded into 'other' because the label had reached its cap.",
            ["label"],
        )
        self._live: LivePolicy | None = None
        self._known: tuple[object, Names, Names, Names] | None = None
        self.model = LabelCap(
            "model", max_label_values, self.label_overflow, lambda: self.known()[0]
        )
        self.agent = LabelCap(
            "agent", max_label_values, self.label_overflow, lambda: self.known()[1]
        )
        self.team = LabelCap("team", max_label_values, self.label_overflow, lambda: self.known()[2])
        self.budget_owner = LabelCap("budget_owner", max_label_values, self.label_overflow)
        self.budgets = BudgetStatus(self.budget_owner)
        genai = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"]
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per call as the provider reported them (GenAI conventions).",
            [*genai, "gen_ai_response_model", "gen_ai_token_type"],
            buckets=TOKEN_BUCKETS,
        )
        self.operation_duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "Duration of each LLM call through the gateway (GenAI conventions).",
            [*genai, "error_type"],
            buckets=DURATION_BUCKETS,
        )
        self.time_to_first_chunk = Histogram(
            "gen_ai_client_operation_time_to_first_chunk_seconds",
            "Time from the request to the first chunk of the answer (GenAI conventions).",
            genai,
            buckets=DURATION_BUCKETS,
        )
        self.requests = Counter(
            "gateway_requests",
            "Requests by route, provider, model, agent, status class, who answered (upstream, "
            "gateway, policy) and the policy's decision (allowed, compacted, rejected, none).",
            ["route", "provider", "model", "agent", "status_class", "source", "decision"],
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "End-to-end duration of each request through the gateway.",
            ["route", "provider"],
            buckets=REQUEST_BUCKETS,
        )
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "Time the gateway itself adds to a request (reading, policy, compaction without "
            "the summary call, accounting): a bucket boundary at the 10 ms objective.",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
        )
        self.in_flight = Gauge(
            "gateway_in_flight_requests", "Requests being handled now.", ["route"]
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors",
            "Upstream failures by provider and reason (http_4xx, http_429, http_5xx, "
            "unreachable, timeout, cut).",
            ["provider", "reason"],
        )
        self.tokens = Counter(
            "gateway_tokens",
            "Tokens by type (input, output, cache_read, cache_creation, reasoning), model, "
            "agent and team. Input includes the cache parts.",
            ["type", "model", "agent", "team"],
        )
        self.cost = Counter(
            "gateway_cost",
            "Cost in the price table's currency (US dollars built in), by model, agent and team.",
            ["model", "agent", "team"],
        )
        self.unpriced = Counter(
            "gateway_unpriced_requests",
            "Calls that used tokens of a model with no price (neither the policy's prices nor "
            "the built-in table): their cost is not in gateway_cost_total. By model.",
            ["model"],
        )
        self.sessions_started = Counter(
            "gateway_sessions_started", "Sessions begun, by agent.", ["agent"]
        )
        self.active_sessions = ActiveSessions()
        self.session_turn = Histogram(
            "gateway_session_turn",
            "The turn number of each LLM call within its session, by agent.",
            ["agent"],
            buckets=TURN_BUCKETS,
        )
        self.context_fill = Histogram(
            "gateway_context_fill_ratio",
            "Input tokens of a call over its model's context window, by provider.",
            ["provider"],
            buckets=FILL_BUCKETS,
        )
        self.decisions = Counter(
            "gateway_policy_decisions",
            "Policy decisions by decision (allowed, rejected), limit and rule.",
            ["decision", "limit", "rule"],
        )
        self.rejections = Counter(
            "gateway_rejections",
            "Calls the gateway refused, by limit, rule and agent.",
            ["limit", "rule", "agent"],
        )
        self.loop_detections = Counter(
            "gateway_loop_detections",
            "Runaway-loop detections by agent and detector.",
            ["agent", "detector"],
        )
        self.compactions = Counter(
            "gateway_compactions",
            "Compacted calls by strategy and outcome (applied, reused, failed).",
            ["strategy", "outcome"],
        )
        self.tokens_saved = Counter(
            "gateway_compaction_tokens_saved",
            "Input tokens compaction took off the calls sent, by strategy.",
            ["strategy"],
        )
        self.compaction_duration = Histogram(
            "gateway_compaction_duration_seconds",
            "Wall time of a call's compaction step (counting, waiting for the session, the "
            "strategies, the summary call), once per series it added to "
            "gateway_compactions_total, by strategy and outcome.",
            ["strategy", "outcome"],
            buckets=COMPACTION_BUCKETS,
        )
        self.loop_lag = Histogram(
            "gateway_event_loop_lag_seconds",
            "How late the event loop ran a timer it was asked to run (sampled every 0.5 s): "
            "time every request waits when the loop is busy or blocked.",
            buckets=LAG_BUCKETS,
        )
        self.upstream_retries = Counter(
            "gateway_upstream_retries",
            "Calls retried because a connection to the upstream could not be opened.",
            ["provider", "reason"],
        )
        self.build_info = Gauge(
            "gateway_build_info", "The gateway's version (value 1).", ["version", "python"],
        )  # fmt: skip
        self.build_info.set((VERSION, platform.python_version()), 1)
        for family in [v for v in vars(self).values() if isinstance(v, Family)]:
            self.registry.register(family)
        self.registry.register(self.active_sessions)
        self.process = ProcessStatus()
        self.registry.register(self.process)
        self._initialise()

    def _initialise(self) -> None:
        """Bounded label sets start at 0: an alert on ``increase()`` cannot see a series whose
        first sample is already 1 (the first loop would never page)."""
        for detector in DETECTORS:
            self.loop_detections.touch(("other", detector))
        for provider in ("openai", "anthropic"):
            for reason in ("http_4xx", "http_429", "http_5xx", "unreachable", "timeout", "cut"):
                self.upstream_errors.touch((provider, reason))
            self.upstream_retries.touch((provider, "connect_error"))

    def agent_seen(self, agent: str) -> None:
        """A new agent's loop-detection series start at 0, so the alert on ``increase()`` sees
        its first loop."""
        if agent not in self._agents:
            self._agents.add(agent)
            for detector in DETECTORS:
                self.loop_detections.touch((agent, detector))

    def watch_policy(self, live: LivePolicy) -> None:
        self._live = live
        self.registry.register(PolicyStatus(live))

    def known(self) -> tuple[Names, Names, Names]:
        """The models, agents and teams recognised: built in, and named by the policy in force
        (worked out once per policy, and only for a label value not seen before)."""
        policy = self._live.current if self._live is not None else None
        if self._known is None or self._known[0] is not policy:
            models, agents, teams = policy_names(policy.file) if policy else ([], [], [])
            self._known = (
                policy,
                Names.of([*BUILTIN, *models], model=True),
                Names.of([*_AGENT_NAMES, *agents]),
                Names.of(teams),
            )
        return self._known[1:]

    def retried(self, provider: str) -> Callable[[], None]:
        """What ``upstream.send`` calls on each retry of a failed connect."""
        return partial(self.upstream_retries.inc, (provider, "connect_error"))

    def watch_store(self, store: object) -> None:
        self.registry.register(StoreStatus(store))
        self.registry.register(self.budgets)


def _version() -> str:
    try:
        return metadata.version("agent-gateway")
    except metadata.PackageNotFoundError:
        return "unknown"


VERSION = _version()
"""Read once at import: package metadata is files on disk, never read on the event loop."""


def observe(metrics: Metrics, ex: Exchange, route: str, trace_id: str | None) -> None:
    """Everything one request adds to the metrics, read from its exchange at its end. With a
    trace id, latency observations carry it as an exemplar (OpenMetrics exposition only)."""
    end = time.perf_counter()
    provider = ex.upstream.provider
    identity, facts, usage = ex.identity, ex.facts, ex.response_facts
    agent = metrics.agent(identity.agent if identity else None)
    source = _source(ex)
    status = ex.final_status
    # A model the provider (or the policy) refused may be made up: it takes no label of its own.
    model = metrics.model(facts.model if facts else None, status < 400)
    status_class = f"{status // 100}xx"
    decision = ex.decision_label
    metrics.requests.inc((route, provider, model, agent, status_class, source, decision))
    metrics.request_duration.observe((route, provider), end - ex.started, trace_id)
    if ex.upstream_at is not None:
        after = end - ex.upstream_done_at if ex.upstream_done_at is not None else 0.0
        own = ex.upstream_at - ex.started - ex.summary_seconds + after
        metrics.overhead.observe((route,), max(0.0, own), trace_id)
    if source == "upstream" and status >= 400:
        reason = "http_429" if status == 429 else f"http_{status // 100}xx"
        metrics.upstream_errors.inc((provider, reason))
    elif ex.outcome in _UPSTREAM_FAILURES:
        metrics.upstream_errors.inc((provider, _UPSTREAM_FAILURES[ex.outcome]))
    if ex.dialect is None or facts is None:
        return
    genai = (ex.dialect.operation, provider, model)
    if ex.upstream_at is not None:
        error = ""
        if ex.outcome != "ok":
            error = ex.outcome
        elif status >= 400:
            error = str(status)  # the upstream's own error: its status is the type
        duration = end - ex.upstream_at
        metrics.operation_duration.observe((*genai, error), duration, trace_id)
        if ex.first_byte_at is not None and facts.stream:
            metrics.time_to_first_chunk.observe(genai, ex.first_byte_at - ex.upstream_at)
    if identity is not None:
        metrics.agent_seen(agent)
        metrics.active_sessions.touch(identity.session_id, agent)
        if ex.turn == 1:
            metrics.sessions_started.inc((agent,))
    if ex.turn is not None:
        metrics.session_turn.observe((agent,), ex.turn)
    _observe_policy(metrics, ex, agent)
    if usage is not None and usage.usage is not None:
        _observe_usage(metrics, ex, genai, model, agent, usage.usage)


def _observe_usage(
    metrics: Metrics,
    ex: Exchange,
    genai: tuple[str, str, str],
    model: str,
    agent: str,
    usage: Usage,
) -> None:
    response_model = metrics.model(ex.response_facts.model if ex.response_facts else None)
    team = metrics.team(ex.team)
    for kind, value in (
        ("input", usage.input_tokens),
        ("output", usage.output_tokens),
        ("cache_read", usage.cache_read_tokens),
        ("cache_creation", usage.cache_creation_tokens),
        ("reasoning", usage.reasoning_tokens),
    ):
        if value:
            metrics.tokens.inc((kind, model, agent, team), value)
    metrics.token_usage.observe((*genai, response_model, "input"), usage.input_tokens)
    metrics.token_usage.observe((*genai, response_model, "output"), usage.output_tokens)
    if ex.cost:
        metrics.cost.inc((model, agent, team), ex.cost)
    elif ex.unpriced:
        metrics.unpriced.inc((model,))
    if ex.window:
        metrics.context_fill.observe((ex.upstream.provider,), usage.input_tokens / ex.window)


def _observe_policy(metrics: Metrics, ex: Exchange, agent: str) -> None:
    decision = ex.decision
    if ex.rejection is not None:
        limit, rule = ex.rejection
        metrics.decisions.inc(("rejected", limit, rule))
        metrics.rejections.inc((limit, rule, agent))
    elif decision is not None:
        metrics.decisions.inc(("allowed", "", ""))
    if decision is not None:
        for detection in decision.detections:
            metrics.loop_detections.inc((agent, detection.detector))
    outcome = ex.compaction
    if outcome is not None:
        for strategy in outcome.strategies or ["none"]:
            state = "reused" if outcome.reused else "applied" if outcome.items else "failed"
            metrics.compactions.inc((strategy, state))
            metrics.compaction_duration.observe((strategy, state), ex.compaction_seconds)
            share = outcome.saved / len(outcome.strategies or [1])
            metrics.tokens_saved.inc((strategy,), share)
        for failure in outcome.failures:
            failed = (failure.split(":", 1)[0], "failed")
            metrics.compactions.inc(failed)
            metrics.compaction_duration.observe(failed, ex.compaction_seconds)


def _source(ex: Exchange) -> str:
    """Who made the answer: the upstream, the policy, or the gateway itself (its errors)."""
    if ex.rejection is not None:
        return "policy"
    if ex.outcome in ("ok", "client_gone", "upstream_cut") and ex.status:
        return "upstream"
    return "gateway"


_UPSTREAM_FAILURES = {
    "upstream_unavailable": "unreachable",
    "upstream_timeout": "timeout",
    "upstream_cut": "cut",
}


async def metrics_endpoint(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text, or OpenMetrics (with exemplars) when asked for.
    With ``metrics_auth``, only for ``Authorization: Bearer <admin token>``."""
    from gateway.admin import bearer_ok
    from gateway.appkeys import METRICS, SETTINGS, STORE

    settings = request.app[SETTINGS]
    if settings.metrics_auth:
        token = settings.admin_token
        if token is None or not bearer_ok(request, token.get_secret_value()):
            return web.Response(
                status=401,
                text="metrics_auth is on: send Authorization: Bearer <admin token>\n",
                headers={"WWW-Authenticate": "Bearer"},
            )
    metrics = request.app[METRICS]
    metrics.budgets.counters = await request.app[STORE].budgets()
    metrics.process.latest = await asyncio.to_thread(metrics.process.sample)
    registry = metrics.registry
    accept = request.headers.get("Accept", "")
    if "application/openmetrics-text" in accept:
        body = openmetrics.generate_latest(registry)  # type: ignore[no-untyped-call]
        content_type = openmetrics.CONTENT_TYPE_LATEST
    else:
        body, content_type = generate_latest(registry), CONTENT_TYPE_LATEST
    return web.Response(body=body, headers={"Content-Type": content_type})


async def watch_loop_lag(metrics: Metrics) -> None:
    """Sleep ``LAG_INTERVAL`` again and again and record how late each wake-up came."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time() + LAG_INTERVAL
        await asyncio.sleep(LAG_INTERVAL)
        metrics.loop_lag.observe((), max(0.0, loop.time() - asked))
