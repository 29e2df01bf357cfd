"""The Prometheus Operator's ``PrometheusRule`` for the Kubernetes overlay, generated from
``dashboards/alerts.yaml``: one source of alert rules."""

from __future__ import annotations

from pathlib import Path

import yaml

DASHBOARDS = Path(__file__).resolve().parents[1]
PROMETHEUS_RULE = DASHBOARDS.parent / "deploy" / "kubernetes" / "monitoring" / "prometheusrule.yaml"


def prometheus_rule() -> str:
    """``alerts.yaml`` as the Prometheus Operator's ``PrometheusRule``: one source of rules."""
    groups = yaml.safe_load((DASHBOARDS / "alerts.yaml").read_text())["groups"]
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
