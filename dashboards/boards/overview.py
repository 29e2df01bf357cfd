"""*Agent gateway / Overview*, for SREs: ``gateway-overview.json``."""

from __future__ import annotations

from .panels import Board, annotation, heatmap, query_variable, stat, state_timeline, timeseries
from .queries import (
    ERROR_SLO,
    ERRORS,
    HALF_OPEN,
    HTTP_429,
    JOB,
    LE_SLO,
    NOT_POLICY,
    OPEN,
    OPENED,
    OVERHEAD_SLO,
    RANGE,
    RATE,
    gateway_5xx,
    increase,
    over_time,
    quantile,
    rate,
    sel,
    targets,
    upstream_failures,
)
from .security import security


def overview() -> Board:
    b = Board(
        "agent-gateway-overview",
        "Agent gateway / Overview",
        "Is the gateway healthy? Traffic, errors by who made them, the resilience guards "
        "(degraded mode, breakers, retries, shedding), the overhead objective, latency, "
        "saturation, the policy in force and security (refused credentials, keys, "
        "credential pools, egress, redactions, the audit log). For SREs.",
        ["agent-gateway", "llm"],
    )
    i = 'instance=~"$instance"'
    b.variables.append(
        query_variable(
            "instance",
            "Replica",
            f"up{{{JOB}}}",
            "Gateway replicas (Prometheus targets of the agent-gateway job).",
        )
    )
    b.annotations += [
        annotation(
            "Policy reloads",
            f'sum by (instance) (changes(gateway_policy_reloads_total{{outcome="ok", {i}}}'
            "[$__interval])) > 0",
            "Policy reloaded",
            "blue",
        ),
        annotation(
            "Gateway restarts",
            f"sum by (instance) (resets(gateway_requests_total{{{i}}}[$__interval])) > 0",
            "Gateway restarted",
            "orange",
        ),
        annotation(
            "Breakers opened",
            "sum by (instance, upstream) (changes("
            f"{sel('gateway_upstream_breaker_transitions_total', OPENED, i)}[$__interval])) > 0",
            "Breaker of {{upstream}} opened",
            "red",
        ),
    ]
    requests = "gateway_requests_total"
    all_rate = f"sum({rate(requests, i)})"
    called = f"sum({rate(requests, NOT_POLICY, i)})"

    b.row("Status")
    b.add(
        stat(
            "Replicas up",
            "Gateway replicas Prometheus scraped successfully throughout the interval. Fewer "
            "than you run means a replica is down (alert AgentGatewayInstanceDown).",
            "none",
            f"sum(min_over_time(up{{{JOB}, {i}}}[{RATE}]))",
            thresholds=[(None, "red"), (1, "green")],
        ),
        4,
        4,
    )
    b.add(
        stat(
            "Requests per second",
            "All requests the gateway answered, whoever made the answer (upstream, gateway "
            "or policy).",
            "reqps",
            all_rate,
        ),
        4,
        4,
    )
    b.add(
        stat(
            "Gateway-made error ratio",
            "Share of requests answered with a 5xx the gateway itself made (its bugs, not the "
            "provider's errors, not unreachable providers, not policy stops). The objective "
            f"is under {1 - ERROR_SLO:.1%}.",
            "percentunit",
            f"{gateway_5xx(RATE, i)} / {all_rate}",
            thresholds=[(None, "green"), (1 - ERROR_SLO, "red")],
            decimals=3,
        ),
        4,
        4,
    )
    b.add(
        stat(
            "Upstream error ratio",
            "Share of calls sent upstream that failed on the provider's side: 5xx answers, "
            "provider unreachable or timed out, streams the provider cut.",
            "percentunit",
            f"{upstream_failures(RATE, i)} / {called}",
            thresholds=[(None, "green"), (0.01, "orange"), (0.05, "red")],
            decimals=2,
        ),
        4,
        4,
    )
    b.add(
        stat(
            "Overhead p99",
            "99th percentile of the time the gateway itself adds to a request (reading, "
            "policy, compaction without the summary call, accounting). The objective is "
            f"under {OVERHEAD_SLO * 1000:.0f} ms.",
            "s",
            quantile(0.99, "gateway_overhead_seconds", "", i),
            thresholds=[(None, "green"), (OVERHEAD_SLO, "red")],
        ),
        4,
        4,
    )
    b.add(
        stat(
            "Firing gateway alerts",
            "Alerts of the AgentGateway* rules firing now (dashboards/alerts.yaml); each "
            "has a section in docs/runbook.md.",
            "none",
            f'count(max_over_time(ALERTS{{alertstate="firing", alertname=~"AgentGateway.*"}}'
            f"[{RATE}])) or on() vector(0)",
            thresholds=[(None, "green"), (1, "red")],
        ),
        4,
        4,
    )

    b.row("Traffic and errors")
    b.add(
        timeseries(
            "Requests by route and status class",
            "Requests per second by gateway route (openai.chat, openai.responses, "
            "anthropic.messages, anthropic.count_tokens, passthrough) and HTTP status class.",
            "reqps",
            targets(
                (
                    f"sum by (route, status_class) ({rate(requests, i)})",
                    "{{route}} {{status_class}}",
                )
            ),
            stack=True,
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Errors by source",
            "4xx and 5xx answers per second by who made them: upstream (the provider's own "
            "error, passed through), gateway (the gateway's, including a 502/504 for an "
            "unreachable provider) and policy (a limit, budget or loop stop).",
            "reqps",
            targets(
                (
                    f"sum by (source, status_class) ({rate(requests, ERRORS, i)})",
                    "{{source}} {{status_class}}",
                )
            ),
            stack=True,
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Upstream errors by provider and reason",
            "Provider failures per second: http_4xx, http_429 (rate limited), http_5xx, "
            "unreachable, timeout, cut (a stream the provider broke).",
            "reqps",
            targets(
                (
                    f"sum by (provider, reason) ({rate('gateway_upstream_errors_total', i)})",
                    "{{provider}} {{reason}}",
                )
            ),
            stack=True,
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Upstream rate-limited share by provider",
            "Share of calls sent to each provider that it answered 429 (rate limited). "
            "Agents retry these; a high share slows every session on that provider.",
            "percentunit",
            targets(
                (
                    f"sum by (provider) "
                    f"({rate('gateway_upstream_errors_total', HTTP_429, i)})"
                    f" / sum by (provider) ({rate(requests, NOT_POLICY, i)})",
                    "{{provider}}",
                )
            ),
            maximum=1,
        ),
        12,
        8,
    )

    resilience(b, i)

    b.row("Latency and objectives")
    b.add(
        timeseries(
            "Event-loop lag p99",
            "How late the gateway's event loop ran a timer, 99th percentile: every request "
            "in flight waits this long too. Above a few milliseconds the gateway is CPU-bound "
            "or something blocks the loop.",
            "s",
            targets(
                (
                    "histogram_quantile(0.99, sum by (instance, le) "
                    f"({rate('gateway_event_loop_lag_seconds_bucket', i)}))",
                    "{{instance}}",
                )
            ),
        ),
        12,
        8,
    )
    overhead = "gateway_overhead_seconds"
    b.add(
        timeseries(
            "Gateway overhead p50 / p95 / p99",
            "Time the gateway itself adds to a request, without the provider's time and "
            "without the summary call of a compaction. The dashed line is the 10 ms objective "
            "for p99 (a histogram bucket boundary sits exactly on it).",
            "s",
            targets(
                (quantile(0.5, overhead, "", i), "p50"),
                (quantile(0.95, overhead, "", i), "p95"),
                (quantile(0.99, overhead, "", i), "p99"),
            ),
            lines_at=[(OVERHEAD_SLO, "red")],
            exemplars=True,
        ),
        12,
        8,
    )
    b.add(
        heatmap(
            "Gateway overhead distribution",
            "How many requests fell in each overhead bucket per interval: the whole "
            "distribution behind the percentiles. Rows above 0.01 s miss the objective.",
            "s",
            f"sum by (le) ({increase(overhead + '_bucket', i, window=RATE)})",
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Requests within the 10 ms overhead objective by route",
            "Share of each route's requests to which the gateway added at most 10 ms. The "
            "objective is 99 % (the dashed line).",
            "percentunit",
            targets(
                (
                    f"sum by (route) ({rate(overhead + '_bucket', LE_SLO, i)})"
                    f" / sum by (route) ({rate(overhead + '_count', i)})",
                    "{{route}}",
                )
            ),
            lines_at=[(0.99, "red")],
            minimum=None,
            maximum=1,
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Error budget burn rates",
            "How fast the error budgets are being spent: 1 spends the budget exactly over "
            "30 days; 6 and 14.4 are the slow and fast burn alert thresholds. Gateway-made "
            "errors against a 0.1 % budget; overhead against 1 % of requests over 10 ms.",
            "none",
            targets(
                (f"{gateway_5xx(RATE, i)} / {all_rate} / {1 - ERROR_SLO:g}", "gateway errors"),
                (
                    f"(1 - sum({rate(overhead + '_bucket', LE_SLO, i)})"
                    f" / sum({rate(overhead + '_count', i)})) / 0.01",
                    "overhead over 10 ms",
                ),
            ),
            lines_at=[(1, "green"), (6, "orange"), (14.4, "red")],
        ),
        12,
        8,
    )
    b.add(
        stat(
            "Error budget left in range",
            "Share of the gateway-made error budget (0.1 % of requests) not spent over the "
            "dashboard's time range. Negative: the range broke the objective.",
            "percentunit",
            f"1 - ({gateway_5xx(RANGE, i)} / {all_rate.replace(RATE, RANGE)}) / {1 - ERROR_SLO:g}",
            thresholds=[(None, "red"), (0, "orange"), (0.5, "green")],
            decimals=1,
        ),
        6,
        8,
    )
    b.add(
        timeseries(
            "Request duration p50 / p99 by route",
            "End-to-end duration of requests through the gateway, provider time included "
            "(an LLM answer takes seconds; the gateway's own share is the overhead above).",
            "s",
            targets(
                (quantile(0.5, "gateway_request_duration_seconds", "route", i), "p50 {{route}}"),
                (quantile(0.99, "gateway_request_duration_seconds", "route", i), "p99 {{route}}"),
            ),
            exemplars=True,
        ),
        18,
        8,
    )
    genai = "gen_ai_client_operation_duration_seconds"
    b.add(
        timeseries(
            "GenAI operation duration p95 by provider and operation",
            "95th percentile of an LLM call from the moment it was sent upstream to its last "
            "byte (OpenTelemetry GenAI metric gen_ai.client.operation.duration).",
            "s",
            targets(
                (
                    quantile(0.95, genai, "gen_ai_provider_name, gen_ai_operation_name", i),
                    "{{gen_ai_provider_name}} {{gen_ai_operation_name}}",
                )
            ),
            exemplars=True,
        ),
        12,
        8,
    )
    ttfc = "gen_ai_client_operation_time_to_first_chunk_seconds"
    b.add(
        timeseries(
            "Time to first chunk p50 / p95 by provider",
            "Streamed calls: time from sending the request upstream to the provider's first "
            "chunk, what a user waits before text starts to appear (GenAI metric "
            "gen_ai.client.operation.time_to_first_chunk).",
            "s",
            targets(
                (quantile(0.5, ttfc, "gen_ai_provider_name", i), "p50 {{gen_ai_provider_name}}"),
                (quantile(0.95, ttfc, "gen_ai_provider_name", i), "p95 {{gen_ai_provider_name}}"),
            ),
        ),
        12,
        8,
    )

    b.row("Saturation and configuration")
    b.add(
        timeseries(
            "In-flight requests by route",
            "Most requests being handled at once within each interval, by route. LLM calls "
            "last seconds, so tens in flight are normal; a climb with flat traffic means "
            "slow providers.",
            "none",
            targets(
                (
                    f"sum by (route) (max_over_time(gateway_in_flight_requests{{{i}}}[{RATE}]))",
                    "{{route}}",
                )
            ),
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Store errors by operation",
            "Failures of the session store (SQLite or memory) per second, by operation. "
            "Any is worth a look: turns are still answered, but counts may be lost.",
            "ops",
            targets(
                (
                    f"sum by (operation) ({rate('gateway_store_errors_total', i)})"
                    " or on() vector(0)",
                    "{{operation}}",
                )
            ),
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Store backlog by kind",
            "Changes the session store holds in memory and has not yet written, summed over "
            "replicas: sessions and budget counters. Near 0 normally (writes are batched); "
            "while its disk or database fails the backlog grows, nothing is lost, and past "
            "the lag bound the replica runs degraded (reason store).",
            "none",
            targets(
                (
                    f"sum by (kind) ({over_time('max', 'gateway_store_backlog', i)})",
                    "{{kind}}",
                )
            ),
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Store backlog age by replica",
            "How long the oldest change not yet written has waited on each replica (0: all "
            "written). Growing steadily: the store's writes fail or cannot keep up.",
            "s",
            targets(
                (
                    "max by (instance) "
                    f"({over_time('max', 'gateway_store_backlog_age_seconds', i)})",
                    "{{instance}}",
                )
            ),
        ),
        12,
        8,
    )
    # process_* names are every Prometheus client's: only the gateway's job is ours.
    b.add(
        timeseries(
            "CPU by replica",
            "CPU time each gateway process used per second of wall time: 100% is one core "
            "busy all the time (the dashed line). The event loop runs on one core, so a "
            "replica near the line is CPU-bound and every request waits (compare the "
            "event-loop lag).",
            "percentunit",
            targets(
                (
                    f"sum by (instance) ({rate('process_cpu_seconds_total', JOB, i)})",
                    "{{instance}}",
                )
            ),
            lines_at=[(1.0, "orange")],
        ),
        8,
        8,
    )
    b.add(
        timeseries(
            "Memory by replica",
            "Resident memory of each gateway process (what it holds in RAM, what a container "
            "memory limit counts) and its virtual memory (address space reserved, much larger "
            "and mostly unused). Resident memory that only grows is a leak.",
            "bytes",
            targets(
                (
                    f"max by (instance) (max_over_time("
                    f"{sel('process_resident_memory_bytes', JOB, i)}[{RATE}]))",
                    "resident {{instance}}",
                ),
                (
                    f"max by (instance) (max_over_time("
                    f"{sel('process_virtual_memory_bytes', JOB, i)}[{RATE}]))",
                    "virtual {{instance}}",
                ),
            ),
        ),
        8,
        8,
    )
    b.add(
        timeseries(
            "Open file descriptors by replica",
            "Share of each gateway process's file descriptor limit in use: every client "
            "connection, upstream connection and open file takes one. At 100% new "
            "connections are refused.",
            "percentunit",
            targets(
                (
                    f"max by (instance) (max_over_time("
                    f"{sel('process_open_fds', JOB, i)}[{RATE}]))"
                    f" / max by (instance) (max_over_time("
                    f"{sel('process_max_fds', JOB, i)}[{RATE}]))",
                    "{{instance}}",
                )
            ),
            lines_at=[(0.8, "orange")],
            maximum=1,
        ),
        8,
        8,
    )
    b.add(
        stat(
            "Policy reloads in range by outcome",
            "Policy file loads over the dashboard's range: ok (now in force) and error "
            "(refused: the previous policy stays in force; alert AgentGatewayPolicyReloadFailing).",
            "none",
            f"sum by (outcome) ({increase('gateway_policy_reloads_total', i)})",
            legend="{{outcome}}",
            decimals=0,
        ),
        6,
        8,
    )
    b.add(
        stat(
            "Uptime by replica",
            "Time since each gateway process started. A short uptime is a recent restart "
            "(a deploy, a crash, a memory limit reached); one that stays short is a replica "
            "restarting again and again.",
            "s",
            f"time() - max by (instance) (last_over_time("
            f"{sel('process_start_time_seconds', JOB, i)}[{RATE}]))",
            legend="{{instance}}",
            thresholds=[(None, "orange"), (600, "green")],
        ),
        6,
        8,
    )
    b.add(
        timeseries(
            "Replicas by policy version",
            "How many replicas run each policy version (the policy file's version label). "
            "Two lines at once: a reload is rolling out, or a replica refused the new file.",
            "none",
            targets(
                (
                    f"count by (version) (last_over_time(gateway_policy_info{{{i}}}[{RATE}]))",
                    "{{version}}",
                )
            ),
            stack=True,
        ),
        6,
        8,
    )
    b.add(
        timeseries(
            "Replicas by gateway version",
            "How many replicas run each gateway build (version and Python). Two lines at "
            "once: a rollout in progress.",
            "none",
            targets(
                (
                    f"count by (version, python) "
                    f"(last_over_time(gateway_build_info{{{i}}}[{RATE}]))",
                    "{{version}} (Python {{python}})",
                )
            ),
            stack=True,
        ),
        6,
        8,
    )

    security(b, i)
    return b


def resilience(b: Board, i: str) -> None:
    """The guards around the upstream calls (retries and their budget, breakers and
    fallbacks, concurrency limits and their queues) and the gateway's own degraded mode and
    readiness: issue 14's mechanisms, each with the question it answers."""
    b.row("Resilience")
    b.add(
        state_timeline(
            "Degraded mode by reason",
            "Whether any replica runs degraded, for each reason: manual (an operator said so), "
            "store (its writes fail or lag), span_exporter (its queue is full), summarizer "
            "(its breaker is open), loop_lag (the event loop runs late). Degraded, the "
            "gateway still forwards calls and enforces the hard limits; summaries, content "
            "capture and debug logs pause. Red for 5 minutes: alert AgentGatewayDegraded.",
            targets((f"max by (reason) ({over_time('max', 'gateway_degraded', i)})", "{{reason}}")),
            [(0, "ok", "green"), (1, "degraded", "red")],
        ),
        8,
        7,
    )
    b.add(
        state_timeline(
            "Readiness by replica",
            "Whether each replica takes new calls (ready) or is stopping: from SIGTERM it "
            "answers not-ready on /gateway/ready, so the load balancer sends it nothing new, "
            "and lets the calls in flight finish up to the drain deadline.",
            targets(
                (f"min by (instance) ({over_time('min', 'gateway_ready', i)})", "{{instance}}")
            ),
            [(0, "draining", "orange"), (1, "ready", "green")],
        ),
        8,
        7,
    )
    breaker = "gateway_upstream_breaker_state"
    b.add(
        state_timeline(
            "Circuit breaker by upstream",
            "Each upstream's breaker, the worst replica's: closed (calls go through), "
            "half-open (one probe call tests the upstream), open (calls go to the fallback, "
            "or are answered at once with the provider's overload error and Retry-After). "
            "Not closed for a minute: alert AgentGatewayUpstreamBreakerOpen.",
            targets(
                (
                    f"max by (upstream) (2 * {over_time('max', breaker, OPEN, i)}"
                    f" or {over_time('max', breaker, HALF_OPEN, i)})",
                    "{{upstream}}",
                )
            ),
            [(0, "closed", "green"), (1, "half-open", "orange"), (2, "open", "red")],
        ),
        8,
        7,
    )
    b.add(
        timeseries(
            "Shed calls by upstream and reason",
            "Calls answered at once, without an upstream attempt, per second: breaker_open "
            "(the breaker is open and no fallback took the call: 503, or 529 for Anthropic), "
            "queue_full and queue_timeout (the upstream's concurrency limit was reached and "
            "its queue was full, or the wait too long: 429 with Retry-After), session_share "
            "(one session held its share of the slots: 429). Alert AgentGatewayShedding.",
            "reqps",
            targets(
                (
                    f"sum by (upstream, reason) ({rate('gateway_shed_requests_total', i)})",
                    "{{upstream}} {{reason}}",
                )
            ),
            stack=True,
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Upstream retries by upstream and reason",
            "Attempts made again per second, before anything reached the client, by what "
            "failed: connect_error, reset, timeout, http_408, http_429, http_5xx, http_529. "
            "Retries add load to an upstream that is already failing: the retry budget caps "
            "them at a share of its calls.",
            "reqps",
            targets(
                (
                    f"sum by (upstream, reason) ({rate('gateway_upstream_retries_total', i)})",
                    "{{upstream}} {{reason}}",
                )
            ),
            stack=True,
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Concurrency limit, in flight and queued by upstream",
            "Per upstream, summed over replicas: the limit of calls in flight (adaptive "
            "between concurrency.min and .max, lowered when the upstream slows or answers "
            "overloaded), the most calls in flight and the most waiting for a slot within "
            "each interval. In flight at the limit with a queue: calls wait, then are shed.",
            "none",
            targets(
                (
                    "sum by (upstream) "
                    f"({over_time('max', 'gateway_upstream_concurrency_limit', i)})",
                    "limit {{upstream}}",
                ),
                (
                    f"sum by (upstream) ({over_time('max', 'gateway_upstream_in_flight', i)})",
                    "in flight {{upstream}}",
                ),
                (
                    f"sum by (upstream) ({over_time('max', 'gateway_upstream_queued', i)})",
                    "queued {{upstream}}",
                ),
            ),
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Queue wait p99 by upstream",
            "99th percentile of the time calls that found the upstream's concurrency limit "
            "reached waited for a slot (admitted or shed). Near concurrency.queue_timeout, "
            "calls are being shed.",
            "s",
            targets(
                (
                    quantile(0.99, "gateway_upstream_queue_wait_seconds", "upstream", i),
                    "{{upstream}}",
                )
            ),
        ),
        6,
        8,
    )
    b.add(
        timeseries(
            "Retries refused by the retry budget",
            "Retries not made per second because the upstream's retry budget was spent "
            "(retry.budget_ratio of its recent calls): the failure went to the client as it "
            "was. Lasting 10 minutes: alert AgentGatewayRetryBudgetExhausted.",
            "reqps",
            targets(
                (
                    "sum by (upstream) "
                    f"({rate('gateway_upstream_retry_budget_exhausted_total', i)})",
                    "{{upstream}}",
                )
            ),
        ),
        6,
        8,
    )
    b.add(
        timeseries(
            "Calls sent to a fallback",
            "Calls per second that an upstream's fallback answered while that upstream's "
            "breaker was open (the response's X-Gateway-Upstream names it). No data: no "
            "upstream has a fallback configured.",
            "reqps",
            targets(
                (
                    f"sum by (upstream, fallback) ({rate('gateway_upstream_fallbacks_total', i)})",
                    "{{upstream}} to {{fallback}}",
                )
            ),
            stack=True,
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Breaker transitions by upstream",
            "Circuit breaker state changes per interval, by upstream and the state entered: "
            "open (the upstream failed), half_open (a probe goes), closed (the probe "
            "succeeded). Open and half_open again and again: the upstream has not recovered.",
            "none",
            targets(
                (
                    "sum by (upstream, to) ("
                    f"{increase('gateway_upstream_breaker_transitions_total', i, window=RATE)})",
                    "{{upstream}} to {{to}}",
                )
            ),
            bars=True,
        ),
        12,
        8,
    )
