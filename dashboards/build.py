"""The gateway's Grafana dashboards, as code: ``uv run python dashboards/build.py`` (``--check``
to only compare, ``--help`` for the options).

Writes ``gateway-overview.json`` (SREs), ``sessions-and-agents.json`` (platform teams) and
``tokens-and-cost.json`` (org admins) next to this file. Plain dicts, no dependency; the output
is deterministic (sorted keys, panel ids in order of appearance), and a test checks that the
committed JSON is what this file writes.

Every query reads the ``datasource`` template variable, windows rates with
``$__rate_interval`` (totals with ``$__range``) and names only families that
``gateway/telemetry/metrics.py`` exports (plus Prometheus' own ``up`` and ``ALERTS``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
RANGE = "$__range"
JOB = 'job="agent-gateway"'
OVERHEAD_SLO = 0.010
"""Seconds: the gateway's own latency objective (``OVERHEAD_SLO`` in the metrics module)."""
ERROR_SLO = 0.999
"""Share of requests that get no gateway-made 5xx (the error budget is 0.1 %)."""
TEAM_TOKEN_PACE = 3472
"""Tokens/s: the ``AgentGatewayTeamTokenBurn`` threshold (six times a 50M tokens/day pace)."""
GRID_WIDTH = 24

# Label matchers (named: Python 3.11 allows no backslash inside an f-string's braces).
NOT_POLICY = 'source!="policy"'
ERRORS = 'status_class=~"4xx|5xx"'
HTTP_429 = 'reason="http_429"'
LE_SLO = 'le="0.01"'
"""The overhead bucket at the objective, as prometheus_client writes it."""
LE_50, LE_100 = 'le="50.0"', 'le="100.0"'
CACHE_READ, INPUT = 'type="cache_read"', 'type="input"'

Panel = dict[str, Any]


# -- queries -----------------------------------------------------------------------------------
def sel(metric: str, *matchers: str) -> str:
    """``metric{a="b",c=~"$d"}``: empty matchers are left out."""
    inner = ", ".join(m for m in matchers if m)
    return f"{metric}{{{inner}}}" if inner else metric


def rate(metric: str, *matchers: str, window: str = RATE) -> str:
    return f"rate({sel(metric, *matchers)}[{window}])"


def increase(metric: str, *matchers: str, window: str = RANGE) -> str:
    return f"increase({sel(metric, *matchers)}[{window}])"


def quantile(q: float, metric: str, by: str, *matchers: str) -> str:
    """A quantile of a classic histogram: ``histogram_quantile`` over summed bucket rates."""
    group = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({group}) ({rate(metric + '_bucket', *matchers)}))"


def gateway_5xx(window: str, *matchers: str) -> str:
    """Gateway-made 5xx per second: answers with ``source="gateway"`` and a 5xx status, less
    those that stand for an unreachable or timed-out upstream (the gateway answers those too,
    but they are the provider's failures and are counted in ``gateway_upstream_errors_total``).
    0 (not "no data") when there were none."""
    made = sel("gateway_requests_total", 'source="gateway"', 'status_class="5xx"', *matchers)
    unreachable = sel("gateway_upstream_errors_total", 'reason=~"unreachable|timeout"', *matchers)
    return (
        f"clamp_min((sum(rate({made}[{window}])) or on() vector(0))"
        f" - sum(rate({unreachable}[{window}])), 0)"
    )


def upstream_failures(window: str, *matchers: str) -> str:
    """Upstream failures per second: 5xx answers, unreachable, timed out, streams cut. The
    http_5xx reason counts exactly the ``source="upstream"``, 5xx requests, but its series
    exist from the start (at 0), so a first failure is seen."""
    failures = sel(
        "gateway_upstream_errors_total", 'reason=~"http_5xx|unreachable|timeout|cut"', *matchers
    )
    return f"sum(rate({failures}[{window}]))"


def target(expr: str, legend: str = "__auto", *, ref: str = "A", **extra: Any) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref, **extra}


def targets(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [target(expr, legend, ref=chr(ord("A") + i)) for i, (expr, legend) in enumerate(pairs)]


# -- panels ------------------------------------------------------------------------------------
def _thresholds(steps: list[tuple[float | None, str]]) -> dict[str, Any]:
    return {
        "mode": "absolute",
        "steps": [{"color": color, "value": value} for value, color in steps],
    }


def _panel(
    kind: str,
    title: str,
    description: str,
    unit: str,
    queries: list[dict[str, Any]],
    *,
    thresholds: list[tuple[float | None, str]] | None = None,
    custom: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    decimals: int | None = None,
) -> Panel:
    defaults: dict[str, Any] = {
        "unit": unit,
        "thresholds": _thresholds(thresholds or [(None, "green")]),
        "color": {"mode": "thresholds" if kind in ("stat", "bargauge") else "palette-classic"},
    }
    if custom is not None:
        defaults["custom"] = custom
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": queries,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options or {},
    }


def timeseries(
    title: str,
    description: str,
    unit: str,
    queries: list[dict[str, Any]],
    *,
    stack: bool = False,
    bars: bool = False,
    lines_at: list[tuple[float, str]] | None = None,
    minimum: float | None = 0,
    maximum: float | None = None,
    exemplars: bool = False,
) -> Panel:
    """A time series; ``lines_at`` draws dashed threshold lines (an objective, a burn rate);
    ``exemplars`` shows the trace ids the gateway attaches to latency observations (with
    Prometheus' exemplar storage on), each a link to its trace."""
    if exemplars:
        queries = [{**query, "exemplar": True} for query in queries]
        description += " Dots are exemplars: one request each, linked to its trace."
    custom = {
        "drawStyle": "bars" if bars else "line",
        "fillOpacity": 60 if bars else (20 if stack else 10),
        "lineWidth": 1,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"group": "A", "mode": "normal" if stack else "none"},
        "thresholdsStyle": {"mode": "dashed" if lines_at else "off"},
    }
    steps: list[tuple[float | None, str]] = [(None, "transparent" if lines_at else "green")]
    steps += lines_at or []
    return _panel(
        "timeseries",
        title,
        description,
        unit,
        queries,
        thresholds=steps,
        custom=custom,
        minimum=minimum,
        maximum=maximum,
        options={
            "legend": {
                "calcs": ["mean", "max"],
                "displayMode": "table",
                "placement": "bottom",
                "showLegend": True,
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    )


def stat(
    title: str,
    description: str,
    unit: str,
    expr: str,
    *,
    legend: str = "__auto",
    thresholds: list[tuple[float | None, str]] | None = None,
    decimals: int | None = None,
) -> Panel:
    return _panel(
        "stat",
        title,
        description,
        unit,
        [target(expr, legend)],
        thresholds=thresholds,
        decimals=decimals,
        options={
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "auto",
        },
    )


def bargauge(title: str, description: str, unit: str, expr: str, legend: str) -> Panel:
    """Totals over the dashboard's range, one bar per series, largest first."""
    return _panel(
        "bargauge",
        title,
        description,
        unit,
        [target(expr, legend, instant=True, range=False)],
        thresholds=[(None, "blue")],
        options={
            "displayMode": "basic",
            "orientation": "horizontal",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "showUnfilled": True,
        },
    )


def heatmap(title: str, description: str, y_unit: str, bucket_expr: str) -> Panel:
    """A classic histogram as a heatmap: one row per bucket (``le``), calls per interval."""
    panel = _panel(
        "heatmap",
        title,
        description,
        "short",
        [target(bucket_expr, "{{le}}", format="heatmap")],
        options={
            "calculate": False,
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
            "filterValues": {"le": 1e-9},
            "legend": {"show": True},
            "rowsFrame": {"layout": "auto"},
            "tooltip": {"mode": "single", "yHistogram": True},
            "yAxis": {"axisPlacement": "left", "unit": y_unit},
        },
    )
    panel["fieldConfig"]["defaults"]["custom"] = {"scaleDistribution": {"type": "linear"}}
    return panel


# -- dashboards --------------------------------------------------------------------------------
class Board:
    """Panels laid out left to right in rows of 24 grid units; ids in order of appearance."""

    def __init__(self, uid: str, title: str, description: str, tags: list[str]) -> None:
        self.uid, self.title, self.description, self.tags = uid, title, description, tags
        self.panels: list[Panel] = []
        self.variables: list[dict[str, Any]] = [datasource_variable()]
        self.annotations: list[dict[str, Any]] = []
        self.time_from = "now-6h"
        self._x = self._y = self._height = 0

    def row(self, title: str) -> None:
        self._newline()
        self._append({"type": "row", "title": title, "collapsed": False, "panels": []}, 24, 1)

    def add(self, panel: Panel, width: int, height: int) -> None:
        if self._x + width > GRID_WIDTH:
            self._newline()
        self._append(panel, width, height)

    def _append(self, panel: Panel, width: int, height: int) -> None:
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = {"x": self._x, "y": self._y, "w": width, "h": height}
        self.panels.append(panel)
        self._x += width
        self._height = max(self._height, height)

    def _newline(self) -> None:
        if self._x:
            self._y += self._height
        self._x = self._height = 0

    def json(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": self.tags,
            "editable": True,
            "graphTooltip": 1,
            "liveNow": False,
            "refresh": "1m",
            "schemaVersion": 39,
            "time": {"from": self.time_from, "to": "now"},
            "timepicker": {},
            "timezone": "utc",
            "version": 1,
            "weekStart": "",
            "fiscalYearStartMonth": 0,
            "panels": self.panels,
            "templating": {"list": self.variables},
            "annotations": {"list": self.annotations},
            "links": [
                {
                    "type": "dashboards",
                    "tags": ["agent-gateway"],
                    "asDropdown": True,
                    "includeVars": False,
                    "keepTime": True,
                    "title": "Gateway dashboards",
                    "icon": "external link",
                    "targetBlank": False,
                    "tooltip": "",
                    "url": "",
                }
            ],
        }


def datasource_variable() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
        "skipUrlSync": False,
    }


def query_variable(name: str, label: str, metric: str, description: str) -> dict[str, Any]:
    """A multi-value variable from ``label_values(metric, name)``; "All" is ``.*``, so
    queries match it with ``=~"$name"``."""
    query = f"label_values({metric}, {name})"
    return {
        "name": name,
        "label": label,
        "description": description,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": query,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "hide": 0,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "options": [],
        "refresh": 2,
        "regex": "",
        "skipUrlSync": False,
        "sort": 1,
    }


def annotation(name: str, expr: str, title: str, color: str) -> dict[str, Any]:
    return {
        "name": name,
        "datasource": DATASOURCE,
        "enable": True,
        "expr": expr,
        "iconColor": color,
        "step": "1m",
        "titleFormat": title,
        "textFormat": "{{instance}}",
        "useValueForTime": False,
    }


def overview() -> Board:
    b = Board(
        "agent-gateway-overview",
        "Agent gateway / Overview",
        "Is the gateway healthy? Traffic, errors by who made them, the overhead objective, "
        "latency, saturation and the policy in force. For SREs.",
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
    b.add(
        timeseries(
            "Upstream connect retries by provider",
            "Calls retried per second because a connection to the provider could not be "
            "opened (nothing had been sent, so nothing is billed twice). A steady rate means "
            "the provider, or the network to it, is failing.",
            "reqps",
            targets(
                (
                    f"sum by (provider) ({rate('gateway_upstream_retries_total', i)})",
                    "{{provider}}",
                )
            ),
        ),
        12,
        8,
    )

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
    return b


def sessions_and_agents() -> Board:
    b = Board(
        "agent-gateway-sessions",
        "Agent gateway / Sessions and agents",
        "What are the agents doing? Sessions, turns, tokens, context fill, policy decisions, "
        "loops and compaction, by agent. For platform teams.",
        ["agent-gateway", "llm", "agents"],
    )
    a = 'agent=~"$agent"'
    b.variables.append(
        query_variable(
            "agent",
            "Agent",
            "gateway_requests_total",
            "Agent names (from X-Gateway-Agent or the User-Agent), capped: rare ones are "
            "folded into 'other'.",
        )
    )
    turn = "gateway_session_turn"

    b.row("Now")
    b.add(
        stat(
            "Active sessions",
            "Sessions with an LLM call in the last five minutes (the most seen within the "
            "interval), summed over replicas.",
            "none",
            f"sum(max_over_time(gateway_active_sessions{{{a}}}[{RATE}]))",
        ),
        4,
        4,
    )
    b.add(
        stat(
            "Sessions started in range",
            "New sessions (a first turn) over the dashboard's time range.",
            "none",
            f"sum({increase('gateway_sessions_started_total', a)})",
            decimals=0,
        ),
        4,
        4,
    )
    b.add(
        stat(
            "Loop detections in range",
            "Runaway-loop detections over the range: identical tool calls, repeated requests "
            "or a sudden turn rate. Depending on the policy the call was refused, flagged or "
            "the session paused.",
            "none",
            f"sum({increase('gateway_loop_detections_total', a)})",
            thresholds=[(None, "green"), (1, "orange")],
            decimals=0,
        ),
        4,
        4,
    )
    b.add(
        stat(
            "Rejections in range",
            "Calls the policy refused over the range (turn and token limits, budgets, models, "
            "loops, context window, sessions paused or ended by an operator).",
            "none",
            f"sum({increase('gateway_rejections_total', a)})",
            decimals=0,
        ),
        4,
        4,
    )
    b.add(
        stat(
            "Calls past turn 100 in range",
            "Share of LLM calls over the range that were beyond the 100th turn of their "
            "session. Long sessions cost more per turn (the whole history is resent).",
            "percentunit",
            f"1 - sum({increase(turn + '_bucket', LE_100, a)})"
            f" / sum({increase(turn + '_count', a)})",
            thresholds=[(None, "green"), (0.1, "orange")],
            decimals=1,
        ),
        4,
        4,
    )
    b.add(
        stat(
            "Tokens saved by compaction in range",
            "Input tokens compaction took off the calls it sent upstream over the range: "
            "tokens not paid for, and calls that did not overflow the model's window.",
            "short",
            f"sum({increase('gateway_compaction_tokens_saved_total')})",
        ),
        4,
        4,
    )

    b.row("Sessions and turns")
    b.add(
        timeseries(
            "Active sessions by agent",
            "Sessions with a call in the last five minutes, by agent (most within each "
            "interval, summed over replicas).",
            "none",
            targets(
                (
                    f"sum by (agent) (max_over_time(gateway_active_sessions{{{a}}}[{RATE}]))",
                    "{{agent}}",
                )
            ),
            stack=True,
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Sessions started by agent",
            "New sessions per minute, by agent: a session's first turn (its id comes from "
            "the agent's session header, or a fingerprint of its prompt when it sends none).",
            "opm",
            targets(
                (
                    f"sum by (agent) ({rate('gateway_sessions_started_total', a)}) * 60",
                    "{{agent}}",
                )
            ),
            stack=True,
        ),
        12,
        8,
    )
    b.add(
        heatmap(
            "Turn number of calls",
            "Each LLM call counted in the bucket of its turn number within its session "
            "(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000). Weight moving up: sessions run longer.",
            "none",
            f"sum by (le) ({increase(turn + '_bucket', a, window=RATE)})",
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Share of calls past turn 50 and 100 by agent",
            "Of each agent's LLM calls, the share made beyond the 50th and the 100th turn of "
            "their session. Long sessions resend long histories: slower, dearer, nearer "
            "the window.",
            "percentunit",
            targets(
                (
                    f"1 - sum by (agent) ({rate(turn + '_bucket', LE_50, a)})"
                    f" / sum by (agent) ({rate(turn + '_count', a)})",
                    "{{agent}} > 50",
                ),
                (
                    f"1 - sum by (agent) ({rate(turn + '_bucket', LE_100, a)})"
                    f" / sum by (agent) ({rate(turn + '_count', a)})",
                    "{{agent}} > 100",
                ),
            ),
            maximum=1,
        ),
        12,
        8,
    )

    b.row("Tokens and context")
    tokens = "gateway_tokens_total"
    b.add(
        timeseries(
            "Tokens by agent and type",
            "Tokens per second as the providers reported them, by agent and type: input "
            "(includes the cache parts), output, cache_read, cache_creation, reasoning.",
            "suffix: tok/s",
            targets((f"sum by (agent, type) ({rate(tokens, a)})", "{{agent}} {{type}}")),
        ),
        12,
        8,
    )
    cache_read = f"sum by (agent) ({rate(tokens, CACHE_READ, a)})"
    inputs = f"sum by (agent) ({rate(tokens, INPUT, a)})"
    b.add(
        timeseries(
            "Prompt-cache read share by agent",
            "Share of each agent's input tokens read from the provider's prompt cache (they "
            "cost a tenth or less). A drop: something changed the start of the prompts "
            "(a rewritten history, a changed system prompt).",
            "percentunit",
            targets((f"({cache_read} or 0 * {inputs}) / {inputs}", "{{agent}}")),
            maximum=1,
        ),
        12,
        8,
    )
    fill = "gateway_context_fill_ratio"
    b.add(
        heatmap(
            "Context fill of calls",
            "Each call's input tokens over its model's context window, in tenths (all "
            "agents: the metric is by provider). Calls near 1.0 are about to overflow; "
            "compaction should keep them under its compact_at.",
            "percentunit",
            f"sum by (le) ({increase(fill + '_bucket', window=RATE)})",
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Context fill p50 / p95 by provider",
            "Median and 95th percentile of input tokens over the model's window, by "
            "provider (all agents).",
            "percentunit",
            targets(
                (quantile(0.5, fill, "provider"), "p50 {{provider}}"),
                (quantile(0.95, fill, "provider"), "p95 {{provider}}"),
            ),
            maximum=1,
        ),
        12,
        8,
    )
    usage = "gen_ai_client_token_usage"
    b.add(
        timeseries(
            "Tokens per call p50 / p95 by provider and type",
            "Size of single calls (OpenTelemetry GenAI metric gen_ai.client.token.usage): "
            "input and output tokens, median and 95th percentile (all agents).",
            "short",
            targets(
                (
                    quantile(0.5, usage, "gen_ai_provider_name, gen_ai_token_type"),
                    "p50 {{gen_ai_provider_name}} {{gen_ai_token_type}}",
                ),
                (
                    quantile(0.95, usage, "gen_ai_provider_name, gen_ai_token_type"),
                    "p95 {{gen_ai_provider_name}} {{gen_ai_token_type}}",
                ),
            ),
        ),
        24,
        8,
    )

    b.row("Policy and loops")
    b.add(
        timeseries(
            "Policy decisions by decision, limit and rule",
            "Policy decisions per second (all agents: the metric has no agent label): "
            "allowed, or rejected with the limit hit and the rule that set it.",
            "ops",
            targets(
                (
                    f"sum by (decision, limit, rule) ({rate('gateway_policy_decisions_total')})",
                    "{{decision}} {{limit}} {{rule}}",
                )
            ),
            stack=True,
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Rejections by limit and rule",
            "Calls refused per minute by the limit hit (max_turns, max_session_tokens, "
            "budget_tokens, budget_cost, models, loop_*, context_window...) and the rule "
            "that set it. Agents show a 400 to their user "
            "and stop; a budget answers 429 and agents retry later.",
            "opm",
            targets(
                (
                    f"sum by (limit, rule) ({rate('gateway_rejections_total', a)}) * 60",
                    "{{limit}} ({{rule}})",
                )
            ),
            stack=True,
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Loop detections by agent and detector",
            "Runaway-loop detections per minute: identical_tool_calls (the same tool call "
            "again and again), repeated_requests (the same body), turn_rate (a session "
            "suddenly turning far faster than its norm).",
            "opm",
            targets(
                (
                    f"sum by (agent, detector) ({rate('gateway_loop_detections_total', a)}) * 60",
                    "{{agent}} {{detector}}",
                )
            ),
            bars=True,
        ),
        24,
        8,
    )

    b.row("Compaction")
    b.add(
        timeseries(
            "Compactions by strategy and outcome",
            "Compacted calls per minute by strategy (elide_tool_output, summarize, truncate, "
            "clear, prompt) and outcome: applied (a new rewrite), reused (a saved rewrite "
            "replayed, the prompt cache keeps hitting), failed (the next strategy was tried).",
            "opm",
            targets(
                (
                    f"sum by (strategy, outcome) ({rate('gateway_compactions_total')}) * 60",
                    "{{strategy}} {{outcome}}",
                )
            ),
            stack=True,
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Tokens saved by compaction by strategy",
            "Input tokens per second that compaction took off the calls it sent, by strategy.",
            "suffix: tok/s",
            targets(
                (
                    f"sum by (strategy) ({rate('gateway_compaction_tokens_saved_total')})",
                    "{{strategy}}",
                )
            ),
            stack=True,
        ),
        12,
        8,
    )
    compaction = "gateway_compaction_duration_seconds"
    b.add(
        timeseries(
            "Compaction duration p50 / p95 by strategy",
            "How long compacting a call took, by strategy (all agents: the metric has no "
            "agent label): counting the history, waiting for the session's other call, the "
            "strategies and a summarize's summary call. The call waits this long before it "
            "goes upstream; reusing a saved rewrite takes milliseconds, a summary seconds.",
            "s",
            targets(
                (quantile(0.5, compaction, "strategy"), "p50 {{strategy}}"),
                (quantile(0.95, compaction, "strategy"), "p95 {{strategy}}"),
            ),
        ),
        24,
        8,
    )
    return b


def tokens_and_cost() -> Board:
    b = Board(
        "agent-gateway-cost",
        "Agent gateway / Tokens and cost",
        "Who spends what? Tokens and cost by team, agent and model, spend rate and what was "
        "folded into 'other'. Cost is in the policy's price currency (prices per million "
        "tokens). For org admins.",
        ["agent-gateway", "llm", "cost"],
    )
    b.time_from = "now-30d"
    t, a, m = 'team=~"$team"', 'agent=~"$agent"', 'model=~"$model"'
    b.variables += [
        query_variable(
            "team",
            "Team",
            "gateway_tokens_total",
            "Teams (from the policy's keys or its team header); 'unknown' has none.",
        ),
        query_variable(
            "agent",
            "Agent",
            f"gateway_tokens_total{{{t}}}",
            "Agents of the selected teams.",
        ),
        query_variable(
            "model",
            "Model",
            f"gateway_tokens_total{{{t}, {a}}}",
            "Requested models of the selected teams and agents.",
        ),
    ]
    tokens, cost = "gateway_tokens_total", "gateway_cost_total"
    billed = 'type=~"input|output"'

    b.row("Budgets")

    def last(metric: str) -> str:
        return f"max by (scope, owner, window) (max_over_time({metric}[{RATE}]))"

    used_tokens = f"{last('gateway_budget_spent_tokens')} / {last('gateway_budget_limit_tokens')}"
    elapsed = (
        f"clamp_min(1 - ({last('gateway_budget_window_end_timestamp_seconds')} - time())"
        f" / {last('gateway_budget_window_seconds')}, 0.01)"
    )
    b.add(
        timeseries(
            "Token budget used",
            "Share of each token budget spent in its current window, by team (or key) and "
            "window. At 100% the budget's calls are refused (429) until the window ends.",
            "percentunit",
            targets((used_tokens, "{{scope}} {{owner}} ({{window}})")),
            lines_at=[(1.0, "red")],
        ),
        8,
        8,
    )
    b.add(
        timeseries(
            "Cost budget used",
            "Share of each cost budget spent in its current window, by team (or key) and "
            "window (built-in prices, or the policy's).",
            "percentunit",
            targets(
                (
                    f"{last('gateway_budget_spent_cost')} / {last('gateway_budget_limit_cost')}",
                    "{{scope}} {{owner}} ({{window}})",
                )
            ),
            lines_at=[(1.0, "red")],
        ),
        8,
        8,
    )
    b.add(
        timeseries(
            "Token budget pace",
            "Share of the budget spent over share of its window gone: 1 spends the budget "
            "exactly by the window's end; above 2 it runs out before half the window is over "
            "(the AgentGatewayBudgetBurn alert).",
            "none",
            targets((f"({used_tokens}) / {elapsed}", "{{scope}} {{owner}} ({{window}})")),
            lines_at=[(1.0, "orange"), (2.0, "red")],
        ),
        8,
        8,
    )

    b.row("In range")
    b.add(
        stat(
            "Spend in range",
            "Cost over the dashboard's range for the selected teams, agents and models, in "
            "the policy's price currency (models without a price count 0).",
            "short",
            f"sum({increase(cost, t, a, m)})",
            decimals=2,
        ),
        6,
        4,
    )
    b.add(
        stat(
            "Projected 30-day spend",
            "The spend of a 30-day period at the average rate of the dashboard's range.",
            "short",
            f"sum(rate({sel(cost, t, a, m)}[{RANGE}])) * 86400 * 30",
            decimals=2,
        ),
        6,
        4,
    )
    b.add(
        stat(
            "Tokens in range",
            "Input plus output tokens over the range (input includes the cached part), as "
            "budgets count them.",
            "short",
            f"sum({increase(tokens, billed, t, a, m)})",
        ),
        6,
        4,
    )
    other = 'team="other"', 'agent="other"', 'model="other"'
    folded = " or ".join(increase(cost, o) for o in other)
    b.add(
        stat(
            "Spend folded into 'other'",
            "Share of the range's spend whose team, agent or model was folded into 'other' "
            "because the label had reached its cap: that spend is not attributed. Raise the "
            "cap or fix the caller that invents names.",
            "percentunit",
            f"(sum({folded}) or on() vector(0)) / sum({increase(cost)})",
            thresholds=[(None, "green"), (0.01, "orange")],
            decimals=1,
        ),
        6,
        4,
    )

    b.row("Tokens")
    b.add(
        timeseries(
            "Tokens by team",
            "Input plus output tokens per second by team. The dashed line is the token-burn "
            f"alert threshold ({TEAM_TOKEN_PACE} tok/s: six times a 50M tokens/day pace).",
            "suffix: tok/s",
            targets((f"sum by (team) ({rate(tokens, billed, t, a, m)})", "{{team}}")),
            stack=True,
            lines_at=[(TEAM_TOKEN_PACE, "red")],
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Tokens by agent",
            "Input plus output tokens per second by agent (input includes the cached part).",
            "suffix: tok/s",
            targets((f"sum by (agent) ({rate(tokens, billed, t, a, m)})", "{{agent}}")),
            stack=True,
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Tokens by model and type",
            "Tokens per second by requested model and type: input (includes the cache "
            "parts), output, cache_read, cache_creation, reasoning.",
            "suffix: tok/s",
            targets((f"sum by (model, type) ({rate(tokens, t, a, m)})", "{{model}} {{type}}")),
        ),
        12,
        8,
    )
    b.add(
        bargauge(
            "Tokens in range by team",
            "Input plus output tokens over the dashboard's range, by team, largest first.",
            "short",
            f"sort_desc(sum by (team) ({increase(tokens, billed, t, a, m)}))",
            "{{team}}",
        ),
        12,
        8,
    )

    b.row("Cost")
    for by, width in (("team", 8), ("agent", 8), ("model", 8)):
        b.add(
            timeseries(
                f"Spend rate by {by}",
                f"Cost per hour by {by}, in US dollars with the built-in prices (genai-prices; "
                "the policy's prices override them). Calls to models without a price are not "
                "in it: see Calls without a price.",
                "suffix: /h",
                targets((f"sum by ({by}) ({rate(cost, t, a, m)}) * 3600", f"{{{{{by}}}}}")),
                stack=True,
            ),
            width,
            8,
        )
    for by in ("team", "model"):
        b.add(
            bargauge(
                f"Spend in range by {by}",
                f"Cost over the dashboard's range by {by}, largest first.",
                "short",
                f"sort_desc(sum by ({by}) ({increase(cost, t, a, m)}))",
                f"{{{{{by}}}}}",
            ),
            8,
            8,
        )
    b.add(
        bargauge(
            "Calls without a price",
            "Calls over the range whose model has no price (neither the policy's prices nor "
            "the built-in table), by requested model: their cost is missing from the panels "
            "beside. Give the model a price in the policy's prices, or a default with '*'.",
            "short",
            f"sort_desc(sum by (model) ({increase('gateway_unpriced_requests_total', m)}))",
            "{{model}}",
        ),
        8,
        8,
    )
    b.add(
        bargauge(
            "Cost per session by agent",
            "Spend over the range divided by the sessions each agent started in it: what an "
            "agent's session costs on average.",
            "short",
            f"sort_desc(sum by (agent) ({increase(cost, t, a, m)})"
            f" / sum by (agent) ({increase('gateway_sessions_started_total', a)}))",
            "{{agent}}",
        ),
        8,
        8,
    )

    b.row("Governance")
    b.add(
        timeseries(
            "Rejections by limit and agent",
            "Calls the policy refused per minute, by limit (budget_tokens, budget_cost, "
            "max_turns, models...) "
            "and agent (all teams: the metric has no team label).",
            "opm",
            targets(
                (
                    f"sum by (limit, agent) ({rate('gateway_rejections_total', a)}) * 60",
                    "{{limit}} {{agent}}",
                )
            ),
            stack=True,
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Label values folded into 'other'",
            "Per minute, new label values (model, agent, team) folded into 'other' because "
            "the label had reached its cap. Anything here means some usage is not "
            "attributed to its own team, agent or model.",
            "opm",
            targets(
                (
                    f"sum by (label) ({rate('gateway_label_overflow_total')}) * 60",
                    "{{label}}",
                )
            ),
        ),
        12,
        8,
    )
    return b


BOARDS = {
    "gateway-overview.json": overview,
    "sessions-and-agents.json": sessions_and_agents,
    "tokens-and-cost.json": tokens_and_cost,
}


def render(board: Board) -> str:
    return json.dumps(board.json(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def build() -> dict[str, str]:
    """File name to JSON text, for every dashboard."""
    return {name: render(make()) for name, make in BOARDS.items()}


PROMETHEUS_RULE = HERE.parent / "deploy" / "kubernetes" / "monitoring" / "prometheusrule.yaml"


def prometheus_rule() -> str:
    """``alerts.yaml`` as the Prometheus Operator's ``PrometheusRule``: one source of rules."""
    groups = yaml.safe_load((HERE / "alerts.yaml").read_text())["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "agent-gateway",
            "labels": {"app.kubernetes.io/name": "agent-gateway"},
        },
        "spec": {"groups": groups},
    }
    header = "# Generated from dashboards/alerts.yaml by dashboards/build.py: do not edit.\n"
    return header + yaml.safe_dump(rule, sort_keys=False, width=100)


def outputs() -> dict[Path, str]:
    """Every file this script writes, and its text."""
    files = {HERE / name: text for name, text in build().items()}
    files[PROMETHEUS_RULE] = prometheus_rule()
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dashboards/build.py",
        description="Write the Grafana dashboards (dashboards/*.json) and the Prometheus "
        "Operator rule (deploy/kubernetes/monitoring/prometheusrule.yaml, from "
        "dashboards/alerts.yaml) from this file.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing: exit 1 and name the files that differ from what would be written",
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = [
            path
            for path, text in outputs().items()
            if not path.exists() or path.read_text() != text
        ]
        for path in stale:
            print(f"stale: {_shown(path)} (run: uv run python dashboards/build.py)")
        return 1 if stale else 0
    for path, text in outputs().items():
        path.write_text(text)
        print(f"wrote {_shown(path)}")
    return 0


def _shown(path: Path) -> str:
    root = HERE.parent
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


if __name__ == "__main__":
    sys.exit(main())
