"""Counted limits under concurrency (reservations), and team budgets over calendar windows:
a spent budget answers 429 with Retry-After in the provider's rate-limit shape."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import anthropic
import openai
import pytest

from gateway.fake_provider import FakeProviderConfig
from tests.harness import (
    ANTHROPIC_KEY,
    OPENAI_KEY,
    Gateway,
    MakeGateway,
    key_hash,
    session_headers,
)
from tests.policy.apis import APIS, Api, Outcome, call

OTHER_TEAM_KEY = "sk-team-beta"
WORK = "Please summarise the design of this gateway in a few words. " * 4


@pytest.fixture(autouse=True)
def tiktoken_usage(fake_config: FakeProviderConfig) -> None:
    """The fake reports tiktoken counts and a short reply, as a real provider would: usage that
    stays within what the gateway reserved (its own estimate plus the output cap)."""
    fake_config.usage_mode = "tiktoken"
    fake_config.reply_text = "Done."


@pytest.mark.parametrize("api", APIS)
async def test_concurrent_calls_never_overshoot_the_session_token_cap(
    make_gateway: MakeGateway, api: Api
) -> None:
    cap = 120
    gw = await make_gateway(
        f"""
        version: 1
        defaults:
          limits: {{max_session_tokens: {cap}}}
        """
    )
    session = f"cap-{api}"
    outcomes = await asyncio.gather(
        *(call(gw, api, session_headers(session), max_tokens=20) for _ in range(20))
    )
    passed = [o for o in outcomes if o.ok]
    refused = [o for o in outcomes if not o.ok]
    assert passed, "the cap is far above one call"
    assert refused, "20 calls cannot all fit under the cap"
    for outcome in refused:
        assert outcome.status == 400
        assert outcome.code(api) == "gateway_policy_max_session_tokens"
    record = await gw.record(session)
    assert record.turns == len(passed)
    assert record.tokens.total_tokens <= cap, (record.tokens, len(passed))
    assert record.in_flight == 0 and record.reserved_tokens == 0
    assert record.rejected == len(refused)


@pytest.mark.parametrize("api", APIS)
async def test_concurrent_calls_get_exactly_max_turns(make_gateway: MakeGateway, api: Api) -> None:
    gw = await make_gateway(
        """
        version: 1
        defaults:
          limits: {max_turns: 5}
        """
    )
    session = f"race-{api}"
    outcomes = await asyncio.gather(*(call(gw, api, session_headers(session)) for _ in range(20)))
    assert sum(o.ok for o in outcomes) == 5
    assert sorted(int(o.headers["x-gateway-turn"]) for o in outcomes if o.ok) == [1, 2, 3, 4, 5]
    assert all(o.code(api) == "gateway_policy_max_turns" for o in outcomes if not o.ok)
    assert gw.upstream_calls() == 5
    record = await gw.record(session)
    assert record.turns == 5 and record.rejected == 15 and record.in_flight == 0


def seconds_to_the_hour() -> float:
    now = datetime.now(UTC)
    end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    return end.timestamp() - time.time()


BUDGET_POLICY = f"""
version: 1
keys:
  "{key_hash(OPENAI_KEY)}": {{name: alpha-bot, team: alpha}}
  "{key_hash(OTHER_TEAM_KEY)}": {{name: beta-bot, team: beta}}
  "{key_hash(ANTHROPIC_KEY)}": {{name: gamma-bot, team: gamma}}
defaults:
  budgets:
    - {{per: team, window: hour, max_tokens: 300}}
"""


async def spend_until_refused(gw: Gateway, api: Api, session: str) -> tuple[int, Outcome]:
    for passed in range(40):
        outcome = await call(gw, api, session_headers(session), text=WORK, max_tokens=20)
        if not outcome.ok:
            return passed, outcome
    raise AssertionError("the budget never ran out")


async def test_team_token_budget_answers_429_with_retry_after(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(BUDGET_POLICY)
    passed, refused = await spend_until_refused(gw, "chat", "alpha-1")
    assert passed >= 2
    assert refused.status == 429
    assert refused.body == {
        "error": {
            "message": refused.message,
            "type": "requests",
            "param": None,
            # What Codex waits and retries on (CLIENTS.md): the text says how long.
            "code": "rate_limit_exceeded",
        }
    }
    assert "try again in" in refused.message
    assert "team:alpha:hour:" in refused.message
    retry_after = int(refused.headers["retry-after"])
    assert abs(retry_after - seconds_to_the_hour()) <= 2
    upstream = gw.upstream_calls()

    # Another session of the same team shares the budget; Responses too.
    again = await call(gw, "responses", session_headers("alpha-2"))
    assert again.status == 429 and again.code("responses") == "rate_limit_exceeded"
    assert gw.upstream_calls() == upstream

    # Team beta's budget is its own.
    beta = openai.AsyncOpenAI(base_url=gw.url("/v1"), api_key=OTHER_TEAM_KEY, max_retries=0)
    try:
        answer = await beta.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=20,
            extra_headers=session_headers("beta-1"),
        )
        assert answer.choices[0].message.content == "Done."
    finally:
        await beta.close()

    budgets = {b["key"]: b for b in (await gw.admin_get("/gateway/budgets"))["budgets"]}
    [alpha] = [b for key, b in budgets.items() if key.startswith("team:alpha:hour:")]
    [beta_counter] = [b for key, b in budgets.items() if key.startswith("team:beta:hour:")]
    assert 0 < alpha["tokens"] <= 300
    assert alpha["reserved_tokens"] == 0
    assert 0 < beta_counter["tokens"] < alpha["tokens"]
    assert abs(alpha["window_end"] - time.time() - seconds_to_the_hour()) <= 2


async def test_budget_429_in_the_anthropic_shape(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(BUDGET_POLICY)
    passed, refused = await spend_until_refused(gw, "messages", "gamma-1")
    assert passed >= 2
    assert refused.status == 429
    assert refused.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": refused.message},
    }
    assert int(refused.headers["retry-after"]) >= 1
    with pytest.raises(anthropic.RateLimitError):
        await gw.anthropic.messages.create(
            model="claude-sonnet-4-6",
            max_tokens=20,
            messages=[{"role": "user", "content": WORK}],
            extra_headers=session_headers("gamma-2"),
        )
    # The openai key is team alpha: untouched by gamma's spending.
    assert (await call(gw, "chat", session_headers("alpha-1"))).ok


async def test_team_cost_budget_with_prices(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(
        f"""
        version: 1
        keys:
          "{key_hash(OPENAI_KEY)}": {{name: alpha-bot, team: alpha}}
        prices:
          "gpt-4o*": {{input: 1000, output: 2000}}
        defaults:
          budgets:
            - {{per: team, window: day, max_cost: 0.3}}
        """
    )
    passed, refused = await spend_until_refused(gw, "chat", "cost-1")
    assert passed >= 2
    assert refused.status == 429
    assert refused.code("chat") == "rate_limit_exceeded"
    assert "cost" in refused.message
    assert int(refused.headers["retry-after"]) >= 1
    [counter] = (await gw.admin_get("/gateway/budgets"))["budgets"]
    assert counter["key"].startswith("team:alpha:day:")
    assert 0 < counter["cost"] <= 0.3
    assert counter["reserved_cost"] == 0
    record = await gw.record("cost-1")
    expected = (record.tokens.input_tokens * 1000 + record.tokens.output_tokens * 2000) / 1e6
    assert record.cost == pytest.approx(expected)
    assert counter["cost"] == pytest.approx(expected)


async def test_a_budget_per_key_counts_each_key(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(
        """
        version: 1
        defaults:
          budgets:
            - {per: key, window: month, max_tokens: 200}
        """
    )
    passed, refused = await spend_until_refused(gw, "chat", "key-1")
    assert passed >= 1 and refused.status == 429
    assert f"key:{key_hash(OPENAI_KEY)}:month:" in refused.message
    assert (await call(gw, "messages", session_headers("key-2"))).ok  # another key
