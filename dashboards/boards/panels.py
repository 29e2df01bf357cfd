"""The shared panel builders (time series, stat, bar gauge, heatmap, state timeline), the
``Board`` that lays panels out on Grafana's grid, and the template variables and annotations a
board holds."""

from __future__ import annotations

from typing import Any

from .queries import DATASOURCE, target

GRID_WIDTH = 24

Panel = dict[str, Any]


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
    mappings: list[dict[str, Any]] | None = None,
) -> Panel:
    by_value = kind in ("stat", "bargauge", "state-timeline")
    defaults: dict[str, Any] = {
        "unit": unit,
        "thresholds": _thresholds(thresholds or [(None, "green")]),
        "color": {"mode": "thresholds" if by_value else "palette-classic"},
    }
    if mappings is not None:
        defaults["mappings"] = mappings
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


def state_timeline(
    title: str,
    description: str,
    queries: list[dict[str, Any]],
    states: list[tuple[int, str, str]],
) -> Panel:
    """One row per series, coloured by its state: ``states`` maps each value a query returns
    (a small integer) to its text and colour, so the panel reads "closed, open" rather than
    "0, 2"."""
    options = {
        str(value): {"text": text, "color": color, "index": i}
        for i, (value, text, color) in enumerate(states)
    }
    return _panel(
        "state-timeline",
        title,
        description,
        "none",
        queries,
        thresholds=[(None, states[0][2])],
        custom={"fillOpacity": 80, "lineWidth": 0},
        mappings=[{"type": "value", "options": options}],
        options={
            "alignValue": "left",
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": False},
            "mergeValues": True,
            "rowHeight": 0.9,
            "showValue": "auto",
            "tooltip": {"mode": "single", "sort": "none"},
        },
    )


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
