"""What the dashboards and alert rules ask Prometheus: every query, found in the committed
files, and the metric names each one reads. Plain functions on plain data; file reads are
synchronous (async tests call ``load_all`` through ``asyncio.to_thread``)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import yaml

from gateway.auth.pools import CredentialPools
from gateway.resilience.degraded import Degradation
from gateway.settings import Settings
from gateway.store.records import Backlog
from gateway.telemetry.metrics import Metrics
from gateway.upstream import Upstreams

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "dashboards"
ALERTS = DASHBOARDS / "alerts.yaml"
ALERT_TESTS = DASHBOARDS / "alerts.test.yaml"
RUNBOOK = REPO / "docs" / "runbook.md"
BOARD_FILES = ("gateway-overview.json", "sessions-and-agents.json", "tokens-and-cost.json")
PROMETHEUS_OWN = frozenset({"up", "ALERTS"})
"""Series Prometheus makes itself: a target's scrape health and the alerts' state."""

_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"}
    | {"bool", "offset", "inf", "nan"}
)
_LABEL_VALUES = re.compile(r"^label_values\(\s*(?:(?P<series>.+?)\s*,\s*)?(?P<label>\w+)\s*\)$")
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")


@dataclass(frozen=True)
class Query:
    """One PromQL expression and where it came from."""

    where: str
    expr: str
    kind: str
    """panel, variable (a ``label_values`` query), annotation or alert."""
    instant: bool = False
    row: str = ""
    """A panel's: the title of the row it sits under."""


def load_build() -> ModuleType:
    """``dashboards/build.py`` as a module (the folder is not a package). What it writes is
    built by ``boards``, the package beside it, which it imports: ``load_build().boards``."""
    spec = importlib.util.spec_from_file_location("dashboards_build", DASHBOARDS / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def boards() -> dict[str, dict[str, Any]]:
    return {name: json.loads((DASHBOARDS / name).read_text()) for name in BOARD_FILES}


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def query_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Panels that query (rows only lay the others out)."""
    return [p for p in board["panels"] if p["type"] != "row"]


def board_queries(name: str, board: dict[str, Any]) -> list[Query]:
    found = []
    row = ""
    for panel in board["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        for target in panel["targets"]:
            where = f"{name}: {panel['title']} ({target['refId']})"
            instant = bool(target.get("instant"))
            found.append(Query(where, target["expr"], "panel", instant, row))
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            found.append(Query(f"{name}: variable ${variable['name']}", text, "variable"))
    for annotation in board["annotations"]["list"]:
        found.append(
            Query(f"{name}: annotation {annotation['name']}", annotation["expr"], "annotation")
        )
    return found


def all_queries() -> list[Query]:
    found = [q for name, board in boards().items() for q in board_queries(name, board)]
    found += [Query(f"alert {r['alert']}", r["expr"], "alert") for r in alert_rules()]
    return found


def label_values(query: str) -> tuple[str | None, str]:
    """``label_values(series, label)`` → (series or None, label)."""
    match = _LABEL_VALUES.match(query.strip())
    assert match, f"not a label_values query: {query}"
    return match["series"], match["label"]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are neither functions
    nor keywords, once strings, label matchers, ranges and grouping clauses are taken out."""
    if expr.startswith("label_values("):
        series, _ = label_values(expr)
        return metric_names(series) if series else set()
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", text):
        name = match.group()
        if text[match.end() :].lstrip().startswith("(") or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def exported_families() -> dict[str, set[str]]:
    """Every family a gateway's registry exports, to the sample names it writes (counters
    ``_total``; histograms ``_bucket``, ``_sum``, ``_count``; gauges as named)."""
    metrics = Metrics()
    metrics.watch_policy(SimpleNamespace(reloads=0, failures=0, current=None))
    metrics.watch_store(SimpleNamespace(errors={"load": 0, "write": 0}, backlog=Backlog))
    metrics.watch_upstreams(Upstreams.from_settings(Settings()), Degradation(), asyncio.Event())
    metrics.watch_pools(CredentialPools({}, {}))  # no pool: its families, without samples
    metrics.process.latest = metrics.process.sample()  # what a scrape does, off the loop
    families: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        if family.type == "counter":
            families[family.name] = {family.name + "_total"}
        elif family.type == "histogram":
            families[family.name] = {family.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            families[family.name] = {family.name}
    return families


def variables_used(expr: str) -> set[str]:
    return {v for v in _VARIABLE.findall(expr) if not v.startswith("__")}


def concrete(expr: str, window: str = "1m") -> str:
    """A dashboard query as Grafana would send it with every variable at "All": the interval
    and range variables become ``window``, ``$var`` (always matched with ``=~``) becomes
    ``.*``."""
    for builtin in ("$__rate_interval", "$__range", "$__interval"):
        expr = expr.replace(builtin, window)
    return _VARIABLE.sub(".*", expr)
