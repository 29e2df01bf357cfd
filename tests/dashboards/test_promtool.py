"""``promtool check rules`` and ``promtool test rules`` on the alert rules (plain sync tests:
the blockbuster fixture only watches the event loop)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.dashboards.promql import ALERT_TESTS, ALERTS, DASHBOARDS
from tests.harness import installed


def promtool() -> str:
    return installed("promtool", "prometheus")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=DASHBOARDS, capture_output=True, text=True, timeout=60
    )


def test_promtool_check_rules() -> None:
    result = run("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules() -> None:
    result = run("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_compose_stacks_prometheus_config_is_valid(tmp_path: Path) -> None:
    config = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "prometheus.yml"
    result = run("check", "config", "--syntax-only", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    # In full, with the token file (a compose secret at run time) pointed at one that exists.
    secret = "/run/secrets/gateway_admin_token"
    text = config.read_text()
    assert secret in text
    token = tmp_path / "token"
    token.write_text("t")
    copy = tmp_path / "prometheus.yml"
    copy.write_text(text.replace(secret, str(token)))
    result = run("check", "config", str(copy))
    assert result.returncode == 0, result.stdout + result.stderr
