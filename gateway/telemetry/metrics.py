"""Prometheus metrics: the catalogue of every family the gateway exports (``Metrics``).

Names are a contract with the dashboards and alert rules in ``dashboards/``. ``gen_ai_*``
families are named and bucketed as the OpenTelemetry GenAI conventions advise, so third-party
GenAI dashboards read them; the gateway's own dimensions (agent, team, rule, decision) are on
``gateway_*`` families. No session id, key or free text is ever a label, and the open-valued
labels (model, agent, team) are capped in length and in number (``labels``).

Everything for one request is recorded at its end, from its ``Exchange`` (``observe``); the
families read when scraped are in ``collectors``, the scrape itself in ``scrape``.
"""

from __future__ import annotations

import platform
from asyncio import Event
from importlib import metadata
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from gateway.compaction.windows import BUILTIN
from gateway.redact import REDACTOR, SINKS
from gateway.telemetry.collectors import (
    ActiveSessions,
    BudgetStatus,
    CredentialPoolStatus,
    KeyStatus,
    PolicyStatus,
    ProcessStatus,
    RedactionCounts,
    ResilienceStatus,
    StoreFailures,
    StoreStatus,
)
from gateway.telemetry.instruments import Counter, Family, Gauge, Histogram
from gateway.telemetry.labels import AGENT_NAMES, LabelCap, Names, policy_names

if TYPE_CHECKING:
    from gateway.auth.pools import CredentialPools
    from gateway.policy.live import LivePolicy
    from gateway.resilience.degraded import Degradation
    from gateway.upstream import Upstreams

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
COMPACTION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                      30, 60)  # fmt: skip
"""From replaying a saved rewrite (milliseconds) to a summary call (tens of seconds)."""
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BREAKER_STATES = ("closed", "half_open", "open")
RETRY_REASONS = (
    "connect_error",
    "reset",
    "timeout",
    "http_408",
    "http_429",
    "http_5xx",
    "http_529",
)
SHED_REASONS = ("breaker_open", "queue_full", "queue_timeout", "session_share")
EGRESS_REASONS = ("loopback", "link_local", "private", "reserved", "unresolvable", "redirect",
                  "scheme")  # fmt: skip
"""Why the egress guard refuses a fetch (``auth.egress``)."""
DETECTORS = ("identical_tool_calls", "repeated_requests", "turn_rate")


def _version() -> str:
    try:
        return metadata.version("agent-gateway")
    except metadata.PackageNotFoundError:
        return "unknown"


VERSION = _version()
"""Read once at import: package metadata is files on disk, never read on the event loop."""


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
            "Compacted calls by strategy and outcome (applied, reused, failed; skipped: not"
            " tried in degraded mode, the next strategy stood in).",
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
            "Upstream attempts made again after a failure, before anything reached the client,"
            " by upstream and what failed (connect_error, reset, timeout, http_<status>).",
            ["provider", "upstream", "reason"],
        )
        self.retry_budget_exhausted = Counter(
            "gateway_upstream_retry_budget_exhausted",
            "Retries not made because the upstream's retry budget (retry.budget_ratio of its"
            " recent calls) was spent: the failure was passed on as it was.",
            ["upstream"],
        )
        self.breaker_transitions = Counter(
            "gateway_upstream_breaker_transitions",
            "Circuit breaker state changes, by upstream and the state entered"
            " (closed, half_open, open).",
            ["upstream", "to"],
        )
        self.shed = Counter(
            "gateway_shed_requests",
            "Calls answered without an upstream attempt: breaker_open (503/529), queue_full,"
            " queue_timeout, session_share (429 with Retry-After).",
            ["upstream", "reason"],
        )
        self.fallbacks = Counter(
            "gateway_upstream_fallbacks",
            "Calls sent to a fallback upstream while their own upstream's breaker was open.",
            ["upstream", "fallback"],
        )
        self.queue_wait = Histogram(
            "gateway_upstream_queue_wait_seconds",
            "How long calls that found the upstream's concurrency limit reached waited for a"
            " slot (admitted or not).",
            ["upstream"],
            buckets=QUEUE_BUCKETS,
        )
        # -- security: never a key, hash, principal or session as a label --
        self.auth_attempts = Counter(
            "gateway_auth_attempts",
            "Credentials checked, by plane (llm, admin), method (passthrough, key, jwt, token,"
            " oidc, none) and outcome (ok, deprecated, expired, revoked, invalid, missing,"
            " wrong_plane, forbidden, provider_key).",
            ["plane", "method", "outcome"],
        )
        self.admin_requests = Counter(
            "gateway_admin_requests",
            "Admin API calls, by action (the route's scope) and outcome (ok, denied, error).",
            ["action", "outcome"],
        )
        self.deprecated_secret_uses = Counter(
            "gateway_key_deprecated_secret_uses",
            "Calls made with a rotated key's previous secret during its grace: callers that"
            " have not switched yet (the key's public id is in the audit log, not here).",
            ["team"],
        )
        self.credential_failures = Counter(
            "gateway_upstream_credential_failures",
            "Upstream 401/403 answers to a credential of a pool (the call went on with the"
            " pool's next entry when it had one), by upstream, pool and entry name.",
            ["upstream", "pool", "entry"],
        )
        self.egress_blocked = Counter(
            "gateway_egress_blocked",
            "Outbound fetches (JWKS, OIDC discovery) refused by the egress guard, by why"
            " (private, loopback, link_local, reserved, redirect, unresolvable).",
            ["reason"],
        )
        self.audit_write_failures = Counter(
            "gateway_audit_write_failures",
            "Audit lines that could not be written (an admin change asked for was refused).",
            [],
        )
        self.build_info = Gauge(
            "gateway_build_info", "The gateway's version (value 1).", ["version", "python"],
        )  # fmt: skip
        self.build_info.set((VERSION, platform.python_version()), 1)
        for family in [v for v in vars(self).values() if isinstance(v, Family)]:
            self.registry.register(family)
        self.registry.register(self.active_sessions)
        self.keys = KeyStatus(self.team)  # the scrape handler sets its records
        self.registry.register(self.keys)
        self.process = ProcessStatus()
        self.registry.register(self.process)
        # The process's one redactor: every app's /metrics shows the process's redactions.
        self.registry.register(RedactionCounts(REDACTOR.counts, SINKS))
        self._initialise()

    def _initialise(self) -> None:
        """Bounded label sets start at 0: an alert on ``increase()`` cannot see a series whose
        first sample is already 1 (the first loop would never page)."""
        for detector in DETECTORS:
            self.loop_detections.touch(("other", detector))
        for plane, methods in (("llm", ("passthrough", "key", "jwt", "none")),
                               ("admin", ("token", "oidc", "none"))):  # fmt: skip
            for method in methods:
                for outcome in ("ok", "invalid"):
                    self.auth_attempts.touch((plane, method, outcome))
        self.audit_write_failures.touch(())
        for reason in EGRESS_REASONS:
            self.egress_blocked.touch((reason,))
        for provider in ("openai", "anthropic"):
            for reason in ("http_4xx", "http_429", "http_5xx", "unreachable", "timeout", "cut"):
                self.upstream_errors.touch((provider, reason))

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
                Names.of([*AGENT_NAMES, *agents]),
                Names.of(teams),
            )
        return self._known[1:]

    def watch_upstreams(self, upstreams: Upstreams, degraded: Degradation, draining: Event) -> None:
        """The upstreams' breakers, limits and queues, the degraded mode and readiness, read
        when scraped; the counters of every upstream start at 0."""
        self.registry.register(ResilienceStatus(upstreams, degraded, draining))
        for upstream in upstreams.by_name.values():
            name = upstream.name
            for reason in RETRY_REASONS:
                self.upstream_retries.touch((upstream.provider, name, reason))
            self.retry_budget_exhausted.touch((name,))
            for state in BREAKER_STATES:
                self.breaker_transitions.touch((name, state))
            for reason in SHED_REASONS:
                self.shed.touch((name, reason))
            if upstream.fallback is not None:
                self.fallbacks.touch((name, upstream.fallback.name))

    def watch_store(self, store: StoreFailures) -> None:
        self.registry.register(StoreStatus(store))
        self.registry.register(self.budgets)

    def watch_pools(self, pools: CredentialPools) -> None:
        """Each credential pool's healthy and configured entries, read when scraped; every
        401/403 to an entry counted (``credential_failures``, its series starting at 0)."""
        self.registry.register(CredentialPoolStatus(pools))
        for labels in pools.entry_names():
            self.credential_failures.touch(labels)
        count = self.credential_failures.inc
        pools.on_failure.append(
            lambda upstream, pool, entry, _: count((upstream, pool, entry.name))
        )
