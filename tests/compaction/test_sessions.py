"""Long agent sessions through the gateway with the official SDKs, compacted on the way.

The fake provider enforces a context window of its own, as the real APIs do: without the
gateway's compaction these sessions would fail once their history outgrew it.
"""

from __future__ import annotations

import json
import random

import pytest

from gateway.compaction.transcript import INSTRUCTIONS
from gateway.fake_provider import CONFIG, RECEIVED
from tests.harness import Gateway, MakeGateway, session_headers
from tests.policy.apis import APIS, AgentLoop, Api

WINDOW = 8000
POLICY = """
version: 1
defaults:
  loops: {{identical_tool_calls: 1000}}
  context:
    window: {window}
    compact_at: 0.8
    target: 0.5
    keep_last: 2
    strategies: [{strategies}]
"""
WORDS = ["alpha", "beta", "gamma", "delta", "zeta", "theta", "kappa", "sigma", "omega"]


def file_contents(n: int) -> str:
    """A different tool result each call, about 1,500 bytes: a file an agent read."""
    rng = random.Random(n)
    return f"file {n}:\n" + " ".join(rng.choice(WORDS) for _ in range(250))


def summary_calls(gw: Gateway) -> list[bytes]:
    return [r.body for r in gw.fake.app[RECEIVED] if INSTRUCTIONS.encode() in r.body]


def agent_calls(gw: Gateway) -> list[bytes]:
    return [r.body for r in gw.fake.app[RECEIVED] if INSTRUCTIONS.encode() not in r.body]


async def run_session(gw: Gateway, api: Api, session: str, turns: int) -> list[str]:
    loop = AgentLoop(gw, api, session_headers(session), "Refactor the parser module.")
    loop.tool_output = file_contents
    compacted: list[str] = []
    for turn in range(turns):
        args = json.dumps({"path": f"src/file{turn}.py"})
        outcome = await loop.turn({"x-fake-scenario": f"tool:read_file:{args}"})
        assert outcome.ok, f"turn {turn}: {outcome.body}"
        compacted.append(outcome.headers.get("x-gateway-compacted", ""))
    return compacted


@pytest.mark.parametrize("api", APIS)
async def test_a_long_session_is_summarized_once_and_the_summary_reused(
    make_gateway: MakeGateway, api: Api
) -> None:
    gw = await make_gateway(POLICY.format(window=WINDOW, strategies="summarize"))
    gw.fake.app[CONFIG].context_window = WINDOW
    headers = await run_session(gw, api, "long", 30)

    made = [h for h in headers if h and "reused" not in h]
    reused = [h for h in headers if "reused" in h]
    assert made and all(h.startswith("summarize;") for h in made), headers
    assert len(reused) >= 5, headers
    record = await gw.record("long")
    # One summary call per compaction, none for the calls that reused one.
    assert len(summary_calls(gw)) == record.summary_calls == len(made)
    assert record.compacted_calls == len(made) + len(reused)
    assert record.tokens_saved > 0
    event = record.compactions[-1]
    assert event["strategies"] == ["summarize"] and event["summary_model"]
    assert event["tokens_after"] < event["tokens_before"]
