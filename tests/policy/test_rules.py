"""Rules: what they match on (agent, model, session name, mode, headers, team), and that later
rules override earlier ones. The answer's headers tell which rules applied and what is left."""

from __future__ import annotations

import openai
import pytest

from tests.harness import OPENAI_KEY, Gateway, MakeGateway, key_hash, session_headers
from tests.policy.apis import Api, Outcome, call

RESEARCH_KEY = "sk-research-alice"

RULES = f"""
version: 1
keys:
  "{key_hash(RESEARCH_KEY)}": {{name: alice, team: research}}
team_header: X-Team
defaults:
  limits: {{max_turns: 100}}
rules:
  - name: goose
    match: {{agent: "goose*"}}
    limits: {{max_turns: 11}}
  - name: mini-models
    match: {{model: "gpt-4o-mini*"}}
    limits: {{max_turns: 12}}
  - name: deploys
    match: {{session_name: "deploy-*"}}
    limits: {{max_turns: 13}}
  - name: headless
    match: {{mode: headless}}
    limits: {{max_turns: 14}}
  - name: gold-tier
    match: {{headers: {{x-team-tier: "gold*"}}}}
    limits: {{max_turns: 15}}
  - name: research
    match: {{team: research}}
    limits: {{max_turns: 16}}
  - name: alice-by-key
    match: {{key: alice}}
    loops: {{identical_tool_calls: 3}}
"""

counter = iter(range(10_000))


async def first_call(
    gw: Gateway, api: Api = "chat", model: str | None = None, **headers: str
) -> Outcome:
    """The first call of a fresh session: remaining turns are the effective max_turns - 1."""
    outcome = await call(gw, api, session_headers(f"rules-{next(counter)}", **headers), model=model)
    assert outcome.ok, outcome.body
    return outcome


def max_turns(outcome: Outcome) -> int:
    return int(outcome.headers["x-gateway-turns-remaining"]) + 1


def rules(outcome: Outcome) -> list[str]:
    version, _, listed = outcome.headers["x-gateway-policy"].partition("; rules=")
    assert len(version) == 12
    return listed.split(",")


@pytest.fixture
async def gw(make_gateway: MakeGateway) -> Gateway:
    # The team header is believed from a trusted proxy only; the test client is on loopback.
    return await make_gateway(RULES, trusted_proxies=["127.0.0.1/32"])


async def test_no_rule_matches(gw: Gateway) -> None:
    outcome = await first_call(gw)
    assert max_turns(outcome) == 100
    assert rules(outcome) == ["defaults"]


@pytest.mark.parametrize(
    "headers",
    [{"X-Gateway-Agent": "goose"}, {"User-Agent": "goose/1.9.3 (linux)"}],
    ids=["x-gateway-agent", "user-agent"],
)
async def test_match_by_agent(gw: Gateway, headers: dict[str, str]) -> None:
    outcome = await first_call(gw, **headers)
    assert max_turns(outcome) == 11
    assert rules(outcome) == ["goose"]


async def test_agent_glob_does_not_match_other_agents(gw: Gateway) -> None:
    outcome = await first_call(gw, **{"X-Gateway-Agent": "aider"})
    assert rules(outcome) == ["defaults"]


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_match_by_model(gw: Gateway, api: Api) -> None:
    outcome = await first_call(gw, api, model="gpt-4o-mini-2024-07-18")
    assert max_turns(outcome) == 12
    assert rules(outcome) == ["mini-models"]
    assert rules(await first_call(gw, api, model="gpt-4o")) == ["defaults"]


async def test_match_by_session_name(gw: Gateway) -> None:
    outcome = await first_call(gw, **{"X-Gateway-Session-Name": "deploy-prod"})
    assert max_turns(outcome) == 13
    assert rules(outcome) == ["deploys"]
    other = await first_call(gw, **{"X-Gateway-Session-Name": "nightly-deploy"})
    assert rules(other) == ["defaults"]


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Gateway-Mode": "headless"},
        {"User-Agent": "codex_exec/0.169.0 (Debian 12.0.0; x86_64) xterm (codex_exec; 0.169.0)"},
    ],
    ids=["x-gateway-mode", "codex-exec-user-agent"],
)
async def test_match_by_mode(gw: Gateway, headers: dict[str, str]) -> None:
    outcome = await first_call(gw, **headers)
    assert max_turns(outcome) == 14
    assert rules(outcome) == ["headless"]


async def test_interactive_mode_is_not_headless(gw: Gateway) -> None:
    outcome = await first_call(
        gw, **{"X-Gateway-Mode": "interactive", "User-Agent": "codex_exec/0.169.0"}
    )
    assert rules(outcome) == ["defaults"]


async def test_match_by_header_glob(gw: Gateway) -> None:
    outcome = await first_call(gw, **{"x-team-tier": "gold-plus"})
    assert max_turns(outcome) == 15
    assert rules(outcome) == ["gold-tier"]
    assert rules(await first_call(gw, **{"x-team-tier": "silver"})) == ["defaults"]


async def test_match_by_team_from_the_team_header(gw: Gateway) -> None:
    outcome = await first_call(gw, **{"X-Team": "research"})
    assert max_turns(outcome) == 16
    assert rules(outcome) == ["research"]
    assert rules(await first_call(gw, **{"X-Team": "support"})) == ["defaults"]


async def test_match_by_team_and_name_from_the_keys_map(gw: Gateway) -> None:
    client = openai.AsyncOpenAI(base_url=gw.url("/v1"), api_key=RESEARCH_KEY, max_retries=0)
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers=session_headers("alice-1"),
        )
    finally:
        await client.close()
    assert raw.headers["x-gateway-turns-remaining"] == "15"
    assert raw.headers["x-gateway-policy"].endswith("rules=research,alice-by-key")
    record = await gw.record("alice-1")
    assert record.key_hash == key_hash(RESEARCH_KEY)
    assert key_hash(OPENAI_KEY) != key_hash(RESEARCH_KEY)


async def test_the_keys_map_outranks_the_team_header(gw: Gateway) -> None:
    client = openai.AsyncOpenAI(base_url=gw.url("/v1"), api_key=RESEARCH_KEY, max_retries=0)
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers=session_headers("alice-2", **{"X-Team": "support"}),
        )
    finally:
        await client.close()
    assert "research" in raw.headers["x-gateway-policy"]


async def test_later_rules_override_earlier_ones(gw: Gateway) -> None:
    outcome = await first_call(
        gw,
        **{
            "X-Gateway-Agent": "goose",
            "X-Gateway-Session-Name": "deploy-prod",
            "X-Gateway-Mode": "headless",
        },
    )
    assert rules(outcome) == ["goose", "deploys", "headless"]
    assert max_turns(outcome) == 14  # the last one that sets it wins

    everything = await first_call(
        gw,
        model="gpt-4o-mini",
        **{
            "X-Gateway-Agent": "goose",
            "X-Gateway-Session-Name": "deploy-prod",
            "X-Gateway-Mode": "headless",
            "x-team-tier": "gold",
            "X-Team": "research",
        },
    )
    assert rules(everything) == [
        "goose",
        "mini-models",
        "deploys",
        "headless",
        "gold-tier",
        "research",
    ]
    assert max_turns(everything) == 16


async def test_the_rule_that_set_a_limit_is_named_in_its_refusal(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(
        """
        version: 1
        defaults:
          limits: {max_turns: 100}
        rules:
          - name: goose-short
            match: {agent: goose}
            limits: {max_turns: 1}
          - name: goose-logs
            match: {agent: goose}
            loops: {action: flag}
        """
    )
    headers = session_headers("goose-1", **{"X-Gateway-Agent": "goose"})
    assert (await call(gw, "messages", headers)).ok
    refused = await call(gw, "messages", headers)
    assert refused.status == 400
    assert "rule 'goose-short'" in refused.message
    assert refused.headers["x-gateway-policy-rule"] == "goose-short"
    # Both rules applied: the policy header on the refusal lists them.
    assert refused.headers["x-gateway-policy"].endswith("rules=goose-short,goose-logs")
