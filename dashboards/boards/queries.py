"""PromQL as the dashboards write it: the objectives and thresholds they draw, the label
matchers they share, and the helpers that build a query and a panel's target.

Every query reads the ``datasource`` template variable, windows rates with
``$__rate_interval`` (totals with ``$__range``) and names only families that the gateway's
metrics export (plus Prometheus' own ``up`` and ``ALERTS``).
"""

from __future__ import annotations

from typing import Any

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

# Label matchers (named: Python 3.11 allows no backslash inside an f-string's braces).
NOT_POLICY = 'source!="policy"'
ERRORS = 'status_class=~"4xx|5xx"'
HTTP_429 = 'reason="http_429"'
LE_SLO = 'le="0.01"'
"""The overhead bucket at the objective, as prometheus_client writes it."""
LE_50, LE_100 = 'le="50.0"', 'le="100.0"'
CACHE_READ, INPUT = 'type="cache_read"', 'type="input"'
OPEN, HALF_OPEN = 'state="open"', 'state="half_open"'
OPENED = 'to="open"'


def sel(metric: str, *matchers: str) -> str:
    """``metric{a="b",c=~"$d"}``: empty matchers are left out."""
    inner = ", ".join(m for m in matchers if m)
    return f"{metric}{{{inner}}}" if inner else metric


def rate(metric: str, *matchers: str, window: str = RATE) -> str:
    return f"rate({sel(metric, *matchers)}[{window}])"


def increase(metric: str, *matchers: str, window: str = RANGE) -> str:
    return f"increase({sel(metric, *matchers)}[{window}])"


def over_time(func: str, metric: str, *matchers: str, window: str = RATE) -> str:
    """``max_over_time(metric{...}[$__rate_interval])`` and its kin: a gauge's extreme within
    each interval, so a value held between two points of the graph is not missed."""
    return f"{func}_over_time({sel(metric, *matchers)}[{window}])"


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
