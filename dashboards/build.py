"""The gateway's Grafana dashboards and alert rule, as code: ``uv run python dashboards/build.py``
(``--check`` to only compare, ``--help`` for the options).

Writes ``gateway-overview.json`` (SREs), ``sessions-and-agents.json`` (platform teams) and
``tokens-and-cost.json`` (org admins) next to this file, and
``deploy/kubernetes/monitoring/prometheusrule.yaml`` from ``alerts.yaml``. What they hold is
built by ``boards``, the package beside this file (one module per dashboard); this script only
writes or compares.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # imported, not run (the tests): find the package beside it
    sys.path.append(str(HERE))

import boards  # noqa: E402 (after the path)


def outputs() -> dict[Path, str]:
    """Every file this script writes, and its text."""
    files = {HERE / name: text for name, text in boards.build().items()}
    files[boards.PROMETHEUS_RULE] = boards.prometheus_rule()
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dashboards/build.py",
        description="Write the Grafana dashboards (dashboards/*.json) and the Prometheus "
        "Operator rule (deploy/kubernetes/monitoring/prometheusrule.yaml, from "
        "dashboards/alerts.yaml) from the package dashboards/boards.",
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
