"""The dashboards and alert rules against the gateway's metrics, without a Prometheus: the
committed JSON is the generator's output, every panel follows the design brief's principles,
every query reads only families the gateway exports, and every exported family is shown."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.utils import floatToGoString

from gateway.telemetry import metrics as gateway_metrics
from tests.dashboards.promql import (
    ALERT_TESTS,
    BOARD_FILES,
    DASHBOARDS,
    PROMETHEUS_OWN,
    RUNBOOK,
    alert_rules,
    all_queries,
    boards,
    concrete,
    exported_families,
    load_build,
    metric_names,
    query_panels,
    variables_used,
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
EXEMPT: dict[str, str] = {}
"""Exported families on no dashboard, each with the reason (none today: every one is shown)."""
HISTOGRAM_BUCKETS = {
    "gen_ai_client_token_usage": gateway_metrics.TOKEN_BUCKETS,
    "gen_ai_client_operation_duration_seconds": gateway_metrics.DURATION_BUCKETS,
    "gen_ai_client_operation_time_to_first_chunk_seconds": gateway_metrics.DURATION_BUCKETS,
    "gateway_request_duration_seconds": gateway_metrics.REQUEST_BUCKETS,
    "gateway_overhead_seconds": gateway_metrics.OVERHEAD_BUCKETS,
    "gateway_session_turn": gateway_metrics.TURN_BUCKETS,
    "gateway_context_fill_ratio": gateway_metrics.FILL_BUCKETS,
    "gateway_event_loop_lag_seconds": gateway_metrics.LAG_BUCKETS,
    "gateway_compaction_duration_seconds": gateway_metrics.COMPACTION_BUCKETS,
    "gateway_upstream_queue_wait_seconds": gateway_metrics.QUEUE_BUCKETS,
}
SEVERITIES = {"critical", "warning", "info"}
EXEMPLAR_HISTOGRAMS = (
    "gateway_overhead_seconds_bucket",
    "gateway_request_duration_seconds_bucket",
    "gen_ai_client_operation_duration_seconds_bucket",
)
"""Histograms whose observations carry a trace id as exemplar (``observe`` in the metrics)."""


def panels() -> list[tuple[str, dict[str, Any]]]:
    return [(name, p) for name, board in boards().items() for p in query_panels(board)]


def allowed_names() -> set[str]:
    return set().union(*exported_families().values()) | PROMETHEUS_OWN


# -- the generator ----------------------------------------------------------------------------
def test_the_kubernetes_prometheus_rule_is_alerts_yaml() -> None:
    generator = load_build().boards
    committed = generator.PROMETHEUS_RULE.read_text()
    assert committed == generator.prometheus_rule(), (
        "stale: run `uv run python dashboards/build.py`"
    )


def test_build_py_help_and_check_write_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    build = load_build()
    board = tmp_path / "board.json"
    monkeypatch.setattr(build, "outputs", lambda: {board: "{}\n"})
    with pytest.raises(SystemExit) as caught:
        build.main(["--help"])
    assert caught.value.code == 0 and "--check" in capsys.readouterr().out
    assert build.main(["--check"]) == 1 and not board.exists()
    assert f"stale: {board}" in capsys.readouterr().out
    assert build.main([]) == 0 and board.read_text() == "{}\n"
    assert build.main(["--check"]) == 0


def test_build_py_help_as_run_from_the_shell() -> None:
    written = {path: path.stat().st_mtime_ns for path in load_build().outputs()}
    shown = subprocess.run(
        [sys.executable, str(DASHBOARDS / "build.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert shown.startswith("usage: dashboards/build.py")
    assert {path: path.stat().st_mtime_ns for path in written} == written, "--help wrote files"


def test_committed_json_is_what_build_py_writes() -> None:
    built = load_build().boards.build()
    assert sorted(built) == sorted(BOARD_FILES)
    for name, text in built.items():
        committed = (DASHBOARDS / name).read_text()
        assert committed == text, f"{name} is stale: run `uv run python dashboards/build.py`"


def test_the_generator_is_deterministic() -> None:
    generator = load_build().boards
    assert generator.build() == generator.build()


def test_the_overhead_objective_is_the_gateways_and_sits_on_a_bucket_boundary() -> None:
    assert load_build().boards.OVERHEAD_SLO == gateway_metrics.OVERHEAD_SLO
    assert gateway_metrics.OVERHEAD_SLO in gateway_metrics.OVERHEAD_BUCKETS


def test_the_token_burn_line_on_the_dashboard_is_the_alerts_threshold() -> None:
    [rule] = [r for r in alert_rules() if r["alert"] == "AgentGatewayTeamTokenBurn"]
    assert rule["expr"].count(f"> {load_build().boards.TEAM_TOKEN_PACE}\n") == 2


def test_the_auth_failure_line_on_the_dashboard_is_the_alerts_threshold() -> None:
    [rule] = [r for r in alert_rules() if r["alert"] == "AgentGatewayAuthFailureSpike"]
    assert f") > {load_build().boards.security.AUTH_SPIKE_SHARE}\n" in rule["expr"]


# -- every panel ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BOARD_FILES)
def test_every_panel_has_a_title_description_unit_and_the_datasource_variable(name: str) -> None:
    board = boards()[name]
    for panel in query_panels(board):
        title = panel.get("title", "")
        assert title, panel
        assert len(panel.get("description", "")) >= 40, f"{title}: say what it answers"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title}: no unit"
        assert panel["datasource"] == DATASOURCE, title
        assert panel["targets"], f"{title}: no query"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, title
            expr = target["expr"]
            assert "$__rate_interval" in expr or "$__range" in expr, f"{title}: {expr}"
            assert not re.search(r"\[\d+[smhdw]\]", expr), f"{title}: a fixed window: {expr}"


def test_latency_time_series_show_exemplars() -> None:
    for name, panel in panels():
        if panel["type"] != "timeseries":
            continue
        for target in panel["targets"]:
            expr = target["expr"]  # a latency in seconds, on the exemplars' own scale
            if "histogram_quantile(" in expr and any(h in expr for h in EXEMPLAR_HISTOGRAMS):
                assert target.get("exemplar") is True, f"{name}: {panel['title']}"


@pytest.mark.parametrize("name", BOARD_FILES)
def test_layout_ids_and_no_hard_coded_uids(name: str) -> None:
    board = boards()[name]
    ids = [p["id"] for p in board["panels"]]
    assert ids == list(range(1, len(ids) + 1))
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]

    def uids(node: Any, path: str) -> list[tuple[str, Any]]:
        if isinstance(node, dict):
            here = [(path, node["uid"])] if "uid" in node else []
            return here + [u for k, v in node.items() for u in uids(v, f"{path}.{k}")]
        if isinstance(node, list):
            return [u for i, v in enumerate(node) for u in uids(v, f"{path}[{i}]")]
        return []

    found = uids(board, "")
    assert found[0] == ("", board["uid"])  # the dashboard's own, stable for links
    assert {uid for _, uid in found[1:]} == {"${datasource}"}, found


@pytest.mark.parametrize("name", BOARD_FILES)
def test_template_variables(name: str) -> None:
    board = boards()[name]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE
            assert variable["definition"].startswith("label_values(")
            assert variable["allValue"] == ".*" and variable["multi"] is True
    exprs = [t["expr"] for p in query_panels(board) for t in p["targets"]]
    exprs += [a["expr"] for a in board["annotations"]["list"]]
    exprs += [v["definition"] for v in variables.values() if v["type"] == "query"]
    for expr in exprs:
        for used in variables_used(expr):
            assert used in variables, f"${used} is not a variable of {name}: {expr}"
            if used != "datasource":
                assert f'=~"${used}"' in expr, f"${used} must be matched with =~: {expr}"


# -- metric names -----------------------------------------------------------------------------
def test_metric_names_are_found_in_promql() -> None:
    expr = (
        'sum by (job, le) (rate(a_bucket{le="0.01", x=~"$x"}[$__rate_interval])) '
        "> 1e3 * 0.5 and on (job) b_total unless b_total offset 10m or on() vector(0)"
    )
    assert metric_names(expr) == {"a_bucket", "b_total"}
    assert metric_names('label_values(up{job="agent-gateway"}, instance)') == {"up"}
    assert metric_names("label_values(instance)") == set()


def test_every_query_reads_only_families_the_gateway_exports() -> None:
    allowed = allowed_names()
    unknown = {
        f"{q.where}: {name}"
        for q in all_queries()
        for name in metric_names(q.expr)
        if name not in allowed
    }
    assert not unknown, sorted(unknown)
    assert all(metric_names(q.expr) for q in all_queries() if q.kind != "variable")


def test_every_exported_family_is_on_a_dashboard_or_exempt() -> None:
    shown = {name for q in all_queries() if q.kind == "panel" for name in metric_names(q.expr)}
    families = exported_families()
    missing = {f for f, names in families.items() if not names & shown and f not in EXEMPT}
    assert not missing, sorted(missing)
    for family in EXEMPT:
        assert family in families, f"stale exemption: {family}"
        assert not families[family] & shown, f"{family} is shown: drop its exemption"


def test_bucket_bounds_in_queries_are_bounds_the_histograms_have() -> None:
    histograms = {f for f, names in exported_families().items() if f + "_bucket" in names}
    assert histograms == set(HISTOGRAM_BUCKETS)
    exprs = [q.expr for q in all_queries()]
    exprs.append(ALERT_TESTS.read_text())
    for expr in exprs:
        for family, bound in re.findall(r'(\w+)_bucket\{[^}]*le="([^"]+)"', expr):
            bounds = {floatToGoString(b) for b in HISTOGRAM_BUCKETS[family]} | {"+Inf"}
            assert bound in bounds, f'{family}_bucket has no le="{bound}"'


def test_concrete_queries_have_no_variables_left() -> None:
    for query in all_queries():
        assert "$" not in concrete(query.expr), query


# -- alert rules ------------------------------------------------------------------------------
def runbook_anchors() -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", RUNBOOK.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


def test_every_alert_has_summary_description_runbook_for_and_severity() -> None:
    rules = alert_rules()
    assert len(rules) >= 10
    anchors = runbook_anchors()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        name, notes = rule["alert"], rule["annotations"]
        assert notes["summary"] and len(notes["description"]) >= 60, name
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert "for" in rule, f"{name}: say how long (0m for an event)"
        page, _, anchor = notes["runbook_url"].partition("#")
        assert page == "docs/runbook.md", name
        assert anchor == name.lower() and anchor in anchors, f"{name}: no runbook section"


def test_every_alert_has_a_firing_and_a_quiet_promtool_case() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    cases = [c for t in tests for c in t["alert_rule_test"]]
    for rule in alert_rules():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c.get("exp_alerts") for c in mine), f"{rule['alert']}: no firing case"
        assert any(not c.get("exp_alerts") for c in mine), f"{rule['alert']}: no quiet case"


def test_alerts_watch_the_gateway_scrape_job() -> None:
    for rule in alert_rules():
        if "up" in metric_names(rule["expr"]):
            assert 'up{job="agent-gateway"}' in rule["expr"], rule["alert"]
