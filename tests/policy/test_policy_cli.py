"""``gateway policy check|explain`` on files, and ``gateway sessions grant|end`` against a
running gateway."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from gateway.cli import main
from tests.harness import ADMIN_TOKEN, POLICIES, MakeGateway, session_headers
from tests.policy.apis import call
from tests.policy.hostile import HOSTILE, rules

ORGANIZATION = POLICIES / "organization.yaml"
EXPLAIN = [
    "policy",
    "explain",
    "--policy",
    str(ORGANIZATION),
    "--agent",
    "codex",
    "--mode",
    "headless",
    "--team",
    "support",
    "--model",
    "gpt-4o-mini",
]


@pytest.mark.parametrize("path", sorted(POLICIES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_policy_checks(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: ok (version ")


@pytest.mark.parametrize(
    ("text", "line", "where", "message"),
    [
        (
            "version: 1\ndefaults:\n  limits:\n    max_turns: 0\n",
            4,
            "defaults.limits.max_turns",
            "greater than or equal to 1",
        ),
        (
            "version: 1\nrules:\n  - name: bad\n    match: {agent: x}\n    limits: {warn_at: 2}\n",
            5,
            "rules[0].limits.warn_at",
            "less than or equal to 1",
        ),
        (
            "version: 1\ndefaults:\n  loops:\n    action: explode\n",
            4,
            "defaults.loops.action",
            "'reject', 'flag' or 'pause'",
        ),
        (
            "version: 1\ndefaults:\n  limits:\n    max_turn: 5\n",
            4,
            "defaults.limits.max_turn",
            "Extra inputs are not permitted",
        ),
        (
            "version: 1\ndefaults:\n  budgets:\n    - {per: team, window: day}\n",
            4,
            "defaults.budgets[0]",
            "a budget needs max_tokens, max_cost or max_requests",
        ),
    ],
    ids=["range", "rule", "choice", "unknown-key", "budget"],
)
def test_a_broken_file_names_file_line_path_and_problem(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    text: str,
    line: int,
    where: str,
    message: str,
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    assert main(["policy", "check", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{path}: line {line}: {where}: "), err
    assert message in err


def test_every_error_shows_in_one_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Errors of the file's schema and errors inside rules (checked only merged over the
    defaults) together, in the file's order: not one round of fixes per stage."""
    path = tmp_path / "broken.yaml"
    path.write_text(
        "version: 1\n"  # 1
        "defaults:\n"
        "  limits: {max_turns: 0}\n"  # 3: the file's schema
        "rules:\n"
        "  - name: typo\n"  # 5
        "    limits: {max_trns: 5}\n"  # 6: inside a rule
        "  - name: shape\n"
        "    match: {agnt: codex}\n"  # 8: the file's schema
        "    loops: {action: explode}\n"  # 9: inside a rule
        "keys: {abc: {team: x}}\n"  # 10: the file's schema
    )
    assert main(["policy", "check", str(path)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[1:3] for line in lines] == [
        ["line 3", "defaults.limits.max_turns"],
        ["line 6", "rules[0].limits.max_trns"],
        ["line 8", "rules[1].match.agnt"],
        ["line 9", "rules[1].loops.action"],
        ["line 10", "keys.abc.name"],
    ], lines


def test_a_rule_is_not_blamed_for_the_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(
        "version: 1\ndefaults:\n  limits: {max_turns: 0}\n  extra: 1\n"
        "rules:\n  - {name: fine, limits: {warn_at: 0.5}}\n"
        "  - {name: mends-it, limits: {max_turns: 5}, budgets: [7]}\n"
    )
    assert main(["policy", "check", str(path)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[2] for line in lines] == [
        "defaults.limits.max_turns",
        "defaults.extra",
        "rules[1].budgets[0]",  # once, though both checks see it
    ], lines


def test_every_bad_rule_of_an_otherwise_valid_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(
        "version: 1\nrules:\n"
        "  - {name: a, limits: {warn_at: 2}}\n"
        "  - {name: b}\n"
        "  - {name: c, context: {target: 0.9}}\n"
    )
    assert main(["policy", "check", str(path)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[1:3] for line in lines] == [
        ["line 3", "rules[0].limits.warn_at"],
        ["line 5", "rules[2].context"],
    ], lines
    assert "context.target must be below context.compact_at" in lines[1]


@pytest.mark.parametrize(
    ("count", "said"), [(0, "0 rules: none"), (1, "1 rule: r0"), (2, "2 rules: r0, r1")]
)
def test_check_counts_rules_in_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], count: int, said: str
) -> None:
    path = tmp_path / "policy.yaml"
    listed = ", ".join(f"{{name: r{i}}}" for i in range(count))
    path.write_text(f"version: 1\nrules: [{listed}]\n")
    assert main(["policy", "check", str(path)]) == 0
    assert f"; {said})" in capsys.readouterr().out


def test_not_yaml_is_a_broken_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("version: 1\ndefaults:\n  limits: {max_turns: 3\nrules: []\n")
    assert main(["policy", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert re.match(rf"{re.escape(str(path))}: line \d+: not valid YAML", err), err


def test_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", str(tmp_path / "nope.yaml")]) == 1
    assert "nope.yaml" in capsys.readouterr().err


def test_explain_shows_each_setting_and_the_rule_that_set_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(EXPLAIN) == 0
    out = capsys.readouterr().out
    assert "matching rules: support-is-small, ci-codex" in out
    marked = r"ci-codex  \(claim: agent, mode\)$"  # a claim decided it
    assert re.search(r"^limits\.max_turns\s+200\s+" + marked, out, re.M), out
    assert re.search(
        r"^limits\.models\.allow\s+\[gpt-4o-mini\*, claude-haiku-\*\]\s+support-is-small$",
        out,
        re.M,
    ), out
    assert re.search(r"^limits\.models\.deny\s+\[\*-preview\*\]\s+defaults$", out, re.M), out
    assert re.search(r"^loops\.action\s+pause\s+" + marked, out, re.M), out


def test_explain_shows_budgets_as_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(EXPLAIN) == 0
    out = capsys.readouterr().out
    assert re.search(r"^budgets\s+1 \(below\)\s+support-is-small$", out, re.M), out
    assert out.endswith(
        "\nbudgets:\n  per   window  max tokens  max cost  max requests\n"
        "  team  hour    2,000,000   -         -\n"
    ), out
    assert "{" not in out  # no Python repr anywhere


def test_explain_without_budgets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "explain"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^budgets\s+none\s+defaults$", out, re.M), out
    assert "\nbudgets:" not in out


def test_explain_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*EXPLAIN, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["policy"]["source"] == str(ORGANIZATION)
    assert data["rules"] == ["support-is-small", "ci-codex"]
    assert data["settings"]["limits"]["max_turns"] == 200
    assert data["settings"]["limits"]["models"]["allow"] == ["gpt-4o-mini*", "claude-haiku-*"]
    assert data["sources"]["limits.max_turns"] == "ci-codex"
    assert data["sources"]["limits.models.allow"] == "support-is-small"
    assert data["settings"]["budgets"] == [
        {
            "per": "team",
            "window": "hour",
            "max_tokens": 2000000,
            "max_cost": None,
            "max_requests": None,
        }
    ]


def test_explain_interactive_caller_gets_no_headless_rule(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [a if a != "headless" else "interactive" for a in EXPLAIN]
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rules"] == ["support-is-small"]
    assert data["settings"]["limits"]["max_turns"] == 100


async def run_cli(*argv: str) -> int:
    # The CLI is synchronous (urllib): off the event loop the gateway serves on.
    return await asyncio.to_thread(main, list(argv))


@pytest.fixture
def admin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI shows the test gateway's admin token."""
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)


@pytest.mark.usefixtures("admin_env")
async def test_sessions_grant_and_end_against_a_running_gateway(
    make_gateway: MakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = await make_gateway(
        """
        version: 1
        defaults:
          limits: {max_turns: 1}
        """
    )
    url = gw.url("").rstrip("/")
    headers = session_headers("cli-s")
    assert (await call(gw, "chat", headers)).ok
    refused = await call(gw, "chat", headers)
    assert refused.status == 400 and "gateway sessions grant cli-s" in refused.message

    code = await run_cli(
        "sessions", "--url", url, "grant", "cli-s", "--turns", "5", "--reason", "ok", "--by", "dana"
    )
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("granted 5 turns and 0 tokens to cli-s")
    assert "status active" in out
    for _ in range(5):
        assert (await call(gw, "chat", headers)).ok
    assert (await call(gw, "chat", headers)).status == 400
    shown = await gw.session("cli-s")
    assert shown["granted_turns"] == 5
    assert shown["grants"][-1]["by"] == "dana" and shown["grants"][-1]["reason"] == "ok"

    code = await run_cli("sessions", "--url", url, "--json", "end", "cli-s", "--by", "dana")
    assert code == 0
    ended = json.loads(capsys.readouterr().out)
    assert ended["status"] == "ended" and ended["status_reason"] == "ended by dana"

    # Ended is final: a grant is refused, with the session's status, and changes nothing.
    with pytest.raises(SystemExit) as caught:
        await run_cli("sessions", "--url", url, "grant", "cli-s", "--turns", "5", "--by", "dana")
    message = str(caught.value.code)
    assert message.startswith("gateway: ") and "409" in message
    assert "session cli-s is ended (ended by dana)" in message
    assert "a grant cannot re-open it" in message
    shown = await gw.session("cli-s")
    assert shown["granted_turns"] == 5 and len(shown["grants"]) == 1
    refused = await call(gw, "chat", headers)
    assert refused.status == 400 and "Session cli-s was ended by dana." in refused.message
    [audited] = await gw.audit_events("session_end")
    assert audited["session"] == "cli-s" and audited["by"] == "dana"
    assert len(await gw.audit_events("grant")) == 1  # the refused grant changed nothing


@pytest.mark.usefixtures("admin_env")
async def test_ending_prints_who_ended_it_and_why(
    make_gateway: MakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = await make_gateway("version: 1\n")
    url = gw.url("").rstrip("/")
    assert (await call(gw, "chat", session_headers("said-once"))).ok
    argv = ("sessions", "--url", url, "end", "said-once", "--by", "erin", "--reason", "done")
    assert await run_cli(*argv) == 0
    assert capsys.readouterr().out == "session said-once ended by erin: done\n"


@pytest.mark.usefixtures("admin_env")
async def test_granting_an_unknown_session_fails_clearly(make_gateway: MakeGateway) -> None:
    gw = await make_gateway("version: 1\n")
    url = gw.url("").rstrip("/")
    with pytest.raises(SystemExit) as caught:
        await run_cli("sessions", "--url", url, "grant", "nobody", "--turns", "5")
    assert "404" in str(caught.value.code) and "no such session" in str(caught.value.code)


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_file_is_refused_with_file_line_and_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    content, at, message = HOSTILE[name]
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(content)
    assert main(["policy", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}: {at}"), err
    assert message in err and "Traceback" not in err
    assert len(err) < 1000, "one short message, not a dump"


def test_the_largest_allowed_policy_loads(tmp_path: Path) -> None:
    """10,000 rules in just under 1 MiB: within every limit, so it loads (a few seconds)."""
    from gateway.policy.loader import MAX_POLICY_BYTES, MAX_RULES, read_policy

    content = rules(MAX_RULES)
    assert len(content) <= MAX_POLICY_BYTES
    path = tmp_path / "big.yaml"
    path.write_bytes(content)
    policy = read_policy(path)
    assert len(policy.rules) == MAX_RULES and policy.rules[-1].name == f"rule-{MAX_RULES - 1}"


def test_anchors_and_merge_keys_still_work(tmp_path: Path) -> None:
    from gateway.policy.loader import read_policy

    path = tmp_path / "anchors.yaml"
    path.write_text(
        "version: 1\n"
        "defaults:\n  limits: &small {max_turns: 7}\n"
        "rules:\n  - name: ci\n    match: {agent: codex}\n    limits: {<<: *small, warn_at: 0.5}\n"
    )
    policy = read_policy(path)
    assert policy.file.defaults.limits.max_turns == 7
    assert policy.rules[0].rule.limits == {"max_turns": 7, "warn_at": 0.5}
