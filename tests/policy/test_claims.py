"""Client claims: ``policy check`` warns about claim-only rules that loosen a setting, and
``policy explain`` marks the settings a claim decided."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.policy import parse_policy
from gateway.policy.claims import ClaimWarning, claim_only, claims_of, loosening
from tests.harness import POLICIES
from tests.policy.test_policy_cli import EXPLAIN


def warnings_of(text: str) -> list[ClaimWarning]:
    return loosening(parse_policy(textwrap.dedent(text), "test.yaml").file)


def one_rule(match: str, change: str, defaults: str = "{}") -> list[tuple[str, str]]:
    found = warnings_of(
        f"version: 1\ndefaults: {defaults}\nrules:\n  - name: r\n    match: {match}\n    {change}\n"
    )
    return [(w.rule, w.setting) for w in found]


LOOSER_DEFAULTS = (
    "{limits: {max_turns: 50, max_session_tokens: 1000, max_request_input_tokens: 100,"
    " max_body_bytes: 1000, models: {allow: ['gpt-4o-mini*'], deny: ['*-preview*']}},"
    " budgets: [{per: key, window: day, max_tokens: 1000}],"
    " loops: {action: reject, identical_tool_calls: 5},"
    " context: {strategies: [elide_tool_output, truncate]}, store_outage: closed}"
)


@pytest.mark.parametrize(
    ("change", "setting"),
    [
        ("limits: {max_turns: 500}", "limits.max_turns"),
        ("limits: {max_turns: null}", "limits.max_turns"),
        ("limits: {max_session_tokens: 5000}", "limits.max_session_tokens"),
        ("limits: {max_request_input_tokens: 101}", "limits.max_request_input_tokens"),
        ("limits: {max_body_bytes: 2000}", "limits.max_body_bytes"),
        ("limits: {models: {allow: ['gpt-5*']}}", "limits.models.allow"),
        ("limits: {models: {deny: []}}", "limits.models.deny"),
        ("budgets: [{per: key, window: day, max_tokens: 5000}]", "budgets"),
        ("budgets: []", "budgets"),
        ("budgets: [{per: team, window: day, max_tokens: 10}]", "budgets"),
        ("loops: {action: flag}", "loops.action"),
        ("loops: {identical_tool_calls: 9}", "loops.identical_tool_calls"),
        ("loops: {turn_rate_factor: 50}", "loops.turn_rate_factor"),
        ("context: {strategies: [truncate]}", "context.strategies"),
        ("store_outage: open", "store_outage"),
    ],
)
@pytest.mark.parametrize(
    "match", ["{agent: codex}", "{mode: headless}", "{session_name: 'x*'}", "{headers: {x-t: a}}"]
)
def test_a_claim_only_rule_that_loosens_is_warned_about(
    match: str, change: str, setting: str
) -> None:
    assert one_rule(match, change, LOOSER_DEFAULTS) == [("r", setting)]


@pytest.mark.parametrize(
    "change",
    [
        "limits: {max_turns: 10}",
        "limits: {models: {allow: ['gpt-4o-mini-2024*']}}",
        "limits: {models: {deny: ['*-preview*', 'gpt-4o*']}}",
        "budgets: [{per: key, window: day, max_tokens: 10}, {per: team, window: day, max_cost: 1}]",
        "loops: {action: pause, identical_tool_calls: 3}",
        "context: {strategies: [elide_tool_output, summarize, truncate]}",
        "limits: {warn_at: 0.9, idle_timeout: 60}",
        "store_outage: closed",
    ],
)
def test_a_claim_rule_that_tightens_is_fine(change: str) -> None:
    assert one_rule("{agent: codex}", change, LOOSER_DEFAULTS) == []


@pytest.mark.parametrize(
    "match", ["{key: ci-bot}", "{team: research}", "{agent: codex, team: research}", "{}"]
)
def test_rules_on_the_credential_may_loosen(match: str) -> None:
    assert one_rule(match, "limits: {max_turns: 5000}", "{limits: {max_turns: 5}}") == []


def test_no_limit_in_the_defaults_is_not_loosened_by_a_limit() -> None:
    assert one_rule("{agent: codex}", "limits: {max_turns: 5000}") == []


def test_a_claim_that_lifts_an_earlier_keys_limit_is_found() -> None:
    """No limit by default, 10 for one team; a claim then gives anyone 100."""
    [warning] = warnings_of(
        """
        version: 1
        rules:
          - {name: small, match: {team: support}, limits: {max_turns: 10}}
          - {name: codex-long, match: {agent: "codex*"}, limits: {max_turns: 100}}
        """
    )
    assert (warning.rule, warning.claims, warning.setting) == (
        "codex-long",
        ("agent",),
        "limits.max_turns",
    )
    message = warning.message()
    assert "100" in message and "10 in rule 'small'" in message and "agent" in message


def test_claims_of_a_rule() -> None:
    policy = parse_policy(
        "version: 1\nrules:\n  - match: {agent: a, mode: headless, model: m, headers: {X-B: c}}\n"
        "  - match: {key: k, model: m}\n",
        "t",
    )
    first, second = (r.rule for r in policy.rules)
    assert claims_of(first) == ("agent", "mode", "header x-b")
    assert claim_only(first)
    assert claims_of(second) == () and not claim_only(second)


def test_policy_check_warns_and_still_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "claims.yaml"
    path.write_text(
        "version: 1\ndefaults: {limits: {max_turns: 50}, loops: {action: reject}}\nrules:\n"
        "  - {name: say-codex, match: {agent: codex}, limits: {max_turns: 500}}\n"
        "  - {name: say-gold, match: {headers: {x-tier: gold}}, loops: {action: flag}}\n"
    )
    assert main(["policy", "check", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{path}: ok (version ")
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 2
    assert "rule 'say-codex'" in warnings[0] and "limits.max_turns to 500" in warnings[0]
    assert "rule 'say-gold'" in warnings[1] and "header x-tier" in warnings[1]
    assert "loops.action to flag" in warnings[1]


def test_the_shipped_organization_policy_is_warned_about(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["policy", "check", str(POLICIES / "organization.yaml")]) == 0
    err = capsys.readouterr().err
    assert "rule 'ci-codex'" in err and "from 100 in rule 'support-is-small'" in err


def test_explain_marks_what_a_claim_decided(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(EXPLAIN) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    assert lines["limits.max_turns"].endswith("ci-codex  (claim: agent, mode)")
    assert lines["loops.action"].endswith("(claim: agent, mode)")
    assert lines["limits.models.allow"].endswith("support-is-small")  # the team: no claim
    assert "claim" not in lines["limits.warn_at"]


def test_explain_json_lists_the_claims(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*EXPLAIN, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["claims"]["limits.max_turns"] == ["agent", "mode"]
    assert data["claims"]["loops.identical_tool_calls"] == ["agent", "mode"]
    assert "limits.models.allow" not in data["claims"]
    assert "budgets" not in data["claims"]
