"""The gateway's Grafana dashboards and its Kubernetes alert rule, as code.

- ``queries``: PromQL helpers, label matchers, the objectives the panels draw;
- ``panels``: the shared panel builders and ``Board``, the grid they are laid out on;
- ``overview``, ``sessions_and_agents``, ``tokens_and_cost``: one module per dashboard
  (``security``: the overview's Security row);
- ``rules``: ``alerts.yaml`` as the Prometheus Operator's ``PrometheusRule``.

``build()`` renders every dashboard; ``dashboards/build.py`` writes them (and the rule). The
folder ``dashboards/`` is not a package (``tests/dashboards`` is one, and would shadow it): the
script imports this one as ``boards``, from beside it, and its modules import each other
relatively. Plain dicts, no dependency; the output is deterministic (sorted keys, panel ids in
order of appearance), and a test checks that the committed JSON is what this package builds.
"""

from __future__ import annotations

import json

from .overview import overview
from .panels import Board
from .queries import OVERHEAD_SLO, TEAM_TOKEN_PACE
from .rules import PROMETHEUS_RULE, prometheus_rule
from .sessions_and_agents import sessions_and_agents
from .tokens_and_cost import tokens_and_cost

__all__ = [
    "BOARDS",
    "OVERHEAD_SLO",
    "PROMETHEUS_RULE",
    "TEAM_TOKEN_PACE",
    "Board",
    "build",
    "prometheus_rule",
    "render",
]

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
