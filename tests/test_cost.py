"""Cost out of the box, through the official SDKs: the packaged policy prices real model names
from the built-in table, per session, per budget and on the metrics; cache reads and writes
are priced as the provider prices them; a model without a price is counted as such, and
refused under a cost budget unless the policy sets a default price."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.dialects.base import Usage
from gateway.policy.prices import builtin, cost
from tests.harness import MakeGateway, session_headers
from tests.policy.apis import APIS, Api, call
from tests.telemetry.test_metrics import samples, value

DAY = int(time.time() // 86400)
UNPRICED = "house-model-7"


def priced(model: str, usage: Usage) -> float:
    price = builtin(model, DAY)
    assert price is not None, model
    return cost(price, usage)


@pytest.mark.parametrize("api", APIS)
async def test_the_packaged_policy_costs_sessions_and_metrics(
    make_gateway: MakeGateway, api: Api
) -> None:
    gw = await make_gateway(None)
    session = f"cost-{api}"
    outcome = await call(gw, api, session_headers(session))
    assert outcome.ok
    record = await gw.record(session)
    [model] = record.models
    tokens = record.tokens
    expected = priced(model, Usage(tokens.input_tokens, tokens.output_tokens))
    assert record.cost == pytest.approx(expected) and record.cost > 0
    shown = await gw.session(session)
    assert shown["cost"] == pytest.approx(expected)
    assert not shown["warnings"]
    found = await samples(gw)
    assert value(found, "gateway_cost_total") == pytest.approx(expected)
    assert value(found, "gateway_unpriced_requests_total") == 0


async def test_the_policy_endpoint_names_the_price_data(make_gateway: MakeGateway) -> None:
    gw = await make_gateway("version: 1\nprices:\n  'house-*': {input: 1, output: 2}\n")
    prices = (await gw.admin_get("/gateway/policy"))["prices"]
    assert prices["builtin"]["source"] == "genai-prices"
    assert prices["builtin"]["version"]
    assert prices["policy"] == ["house-*"]


# -- cache reads and writes, from an upstream that reports them --------------------------------
ANTHROPIC_USAGE = {
    "input_tokens": 1_000,  # Anthropic's uncached part: the cache figures come on top
    "cache_creation_input_tokens": 4_000,
    "cache_read_input_tokens": 20_000,
    "output_tokens": 300,
}
OPENAI_USAGE = {
    "prompt_tokens": 30_000,  # OpenAI's total: the cached part is inside
    "completion_tokens": 2_000,
    "total_tokens": 32_000,
    "prompt_tokens_details": {"cached_tokens": 24_000},
    "completion_tokens_details": {"reasoning_tokens": 1_500},  # inside completion_tokens
}


async def messages(request: web.Request) -> web.Response:
    body = await request.json()
    return web.json_response(
        {
            "id": "msg_01cache",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [{"type": "text", "text": "cached"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": ANTHROPIC_USAGE,
        }
    )


async def chat(request: web.Request) -> web.Response:
    body = await request.json()
    return web.json_response(
        {
            "id": "chatcmpl-cache",
            "object": "chat.completion",
            "created": 1_735_689_600,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "cached"},
                    "finish_reason": "stop",
                }
            ],
            "usage": OPENAI_USAGE,
        }
    )


@pytest.fixture
async def caching_upstream(aiohttp_server: Any) -> TestServer:
    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/chat/completions", chat)
    server: TestServer = await aiohttp_server(app)
    return server


async def test_cache_reads_and_writes_are_priced_as_the_provider_prices_them(
    make_gateway: MakeGateway, caching_upstream: TestServer
) -> None:
    upstreams = dict(
        openai=str(caching_upstream.make_url("/v1")),
        anthropic=str(caching_upstream.make_url("")).rstrip("/"),
    )
    gw = await make_gateway(None, upstreams=upstreams)
    await gw.anthropic.messages.create(
        model="claude-sonnet-4-6",
        max_tokens=64,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers=session_headers("cache-anthropic"),
    )
    await gw.openai.chat.completions.create(
        model="gpt-5",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers=session_headers("cache-openai"),
    )
    # Sonnet 4.6: $3 input, $0.30 cache read, $3.75 cache write, $15 output per million.
    anthropic_cost = (1_000 * 3.0 + 20_000 * 0.3 + 4_000 * 3.75 + 300 * 15.0) / 1e6
    # GPT-5: $1.25 input, $0.125 cache read, $10 output (reasoning tokens counted once).
    openai_cost = (6_000 * 1.25 + 24_000 * 0.125 + 2_000 * 10.0) / 1e6
    assert (await gw.record("cache-anthropic")).cost == pytest.approx(anthropic_cost)
    assert (await gw.record("cache-openai")).cost == pytest.approx(openai_cost)
    found = await samples(gw)
    total = anthropic_cost + openai_cost
    assert value(found, "gateway_cost_total") == pytest.approx(total)


# -- models without a price --------------------------------------------------------------------
@pytest.mark.parametrize("api", APIS)
async def test_an_unpriced_model_is_counted_and_warned_not_free(
    make_gateway: MakeGateway, api: Api
) -> None:
    gw = await make_gateway(None)
    session = f"unpriced-{api}"
    for _ in range(2):
        assert (await call(gw, api, session_headers(session), model=UNPRICED)).ok
    found = await samples(gw)
    assert value(found, "gateway_unpriced_requests_total", model=UNPRICED) == 2
    assert value(found, "gateway_cost_total") == 0
    shown = await gw.session(session)
    assert shown["cost"] == 0
    [warning] = shown["warnings"]
    assert warning["model"] == UNPRICED and warning["times"] == 2
    assert "no price" in warning["warnings"][0] and "prices" in warning["warnings"][0]


COST_BUDGET = """
version: 1
defaults:
  budgets:
    - {per: key, window: month, max_cost: 50}
"""


@pytest.mark.parametrize("api", APIS)
async def test_a_cost_budget_refuses_an_unpriced_model(make_gateway: MakeGateway, api: Api) -> None:
    gw = await make_gateway(COST_BUDGET)
    before = gw.upstream_calls()
    refused = await call(gw, api, session_headers(f"budget-{api}"), model=UNPRICED)
    assert refused.status == 400
    assert refused.code(api) == "gateway_policy_unpriced_model"
    assert UNPRICED in refused.message and "prices" in refused.message
    assert "'*'" in refused.message
    assert gw.upstream_calls() == before
    # A priced model goes on, and its cost is spent from the budget.
    assert (await call(gw, api, session_headers(f"budget-{api}"))).ok
    [counter] = (await gw.admin_get("/gateway/budgets"))["budgets"]
    assert counter["cost"] > 0


async def test_the_refusal_of_a_huge_unpriced_name_echoes_it_capped(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(COST_BUDGET)
    refused = await call(gw, "chat", session_headers("huge"), model="z" * 1_000_000)
    assert refused.status == 400 and refused.code("chat") == "gateway_policy_unpriced_model"
    assert len(refused.message) < 1_000


async def test_a_default_price_lets_an_unpriced_model_through_a_cost_budget(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(COST_BUDGET + "prices:\n  '*': {input: 100, output: 100}\n")
    assert (await call(gw, "chat", session_headers("defaulted"), model=UNPRICED)).ok
    record = await gw.record("defaulted")
    assert record.cost == pytest.approx(record.tokens.total_tokens * 100 / 1e6)
    assert not record.warnings


async def test_sessions_show_prints_the_cost(
    make_gateway: MakeGateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.harness import ADMIN_TOKEN
    from tests.test_cli import run_cli

    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)

    gw = await make_gateway(None)
    assert (await call(gw, "chat", session_headers("shown-cost"))).ok
    assert await run_cli("sessions", "--url", gw.url().rstrip("/"), "show", "shown-cost") == 0
    assert re.search(r"^cost\s+\S*\d", capsys.readouterr().out, re.MULTILINE)
