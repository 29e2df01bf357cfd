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


def file_contents(n: int, words: int = 250) -> str:
    """A different tool result each call (250 words: about 1,500 bytes), a file an agent read."""
    rng = random.Random(n)
    return f"file {n}:\n" + " ".join(rng.choice(WORDS) for _ in range(words))


def summary_calls(gw: Gateway) -> list[bytes]:
    return [r.body for r in gw.fake.app[RECEIVED] if INSTRUCTIONS.encode() in r.body]


def agent_calls(gw: Gateway) -> list[bytes]:
    return [r.body for r in gw.fake.app[RECEIVED] if INSTRUCTIONS.encode() not in r.body]


async def run_session(
    gw: Gateway, api: Api, session: str, turns: int, words: int = 250
) -> list[str]:
    loop = AgentLoop(gw, api, session_headers(session), "Refactor the parser module.")
    loop.tool_output = lambda n: file_contents(n, words)
    compacted: list[str] = []
    for turn in range(turns):
        args = json.dumps({"path": f"src/file{turn}.py"})
        outcome = await loop.turn({"x-fake-scenario": f"tool:read_file:{args}"})
        assert outcome.ok, f"turn {turn}: {outcome.body}"
        compacted.append(outcome.headers.get("x-gateway-compacted", ""))
    return compacted


def gateway_note(body: bytes) -> int:
    """Where the gateway's summary ends in a request body (-1 when it has none)."""
    start = body.find(b"[Summary of the earlier part of this conversation")
    return -1 if start < 0 else body.index(b"}", start)


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

    # Every call reusing the summary sent the same bytes up to its end: the provider's prompt
    # cache sees one stable prefix.
    bodies = agent_calls(gw)
    first = next(i for i, b in enumerate(bodies) if gateway_note(b) >= 0)
    prefix = bodies[first][: gateway_note(bodies[first])]
    following = [b for b in bodies[first + 1 :] if gateway_note(b) >= 0]
    same = [b for b in following if b[: gateway_note(b)] == prefix]
    assert len(same) >= 5


@pytest.mark.parametrize("api", APIS)
async def test_when_the_rest_outgrows_the_window_again_a_new_summary_builds_on_the_first(
    make_gateway: MakeGateway, api: Api
) -> None:
    gw = await make_gateway(POLICY.format(window=WINDOW, strategies="summarize"))
    gw.fake.app[CONFIG].context_window = WINDOW
    headers = await run_session(gw, api, "longer", 36)

    made = [i for i, h in enumerate(headers) if h and "reused" not in h]
    assert len(made) >= 2, headers
    # Between two summaries, every call reused the one before: one summary call per threshold.
    assert all("reused" in headers[i] for i in range(made[0] + 1, made[1]))
    calls = summary_calls(gw)
    assert len(calls) == len(made)
    assert b"[Summary of the earlier part" not in calls[0]
    assert b"[Summary of the earlier part" in calls[1]  # the new summary reads the old one
    record = await gw.record("longer")
    assert record.summary_calls == len(made)
    assert len(record.context_rewrites) <= 3


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("strategy", ["elide_tool_output", "truncate", "clear"])
async def test_strategies_without_an_llm_call_keep_the_session_going(
    make_gateway: MakeGateway, api: Api, strategy: str
) -> None:
    gw = await make_gateway(POLICY.format(window=WINDOW, strategies=strategy))
    gw.fake.app[CONFIG].context_window = WINDOW
    # Tool outputs of about 3 KB: smaller ones are not worth eliding.
    headers = await run_session(gw, api, strategy, 30, words=500)

    assert any(h.startswith(f"{strategy};") for h in headers), headers
    assert summary_calls(gw) == []
    record = await gw.record(strategy)
    assert record.compactions and record.compactions[-1]["strategies"] == [strategy]
    assert record.tokens_saved > 0


@pytest.mark.parametrize("api", APIS)
async def test_calibration_converges_on_a_provider_that_counts_differently(
    make_gateway: MakeGateway, api: Api
) -> None:
    """The fake counts 1.5 times what tiktoken counts, as another provider's tokenizer might;
    the gateway learns the factor, so its threshold is a fraction of the provider's count."""
    gw = await make_gateway(POLICY.format(window=WINDOW, strategies="summarize"))
    config = gw.fake.app[CONFIG]
    config.usage_mode, config.token_factor, config.context_window = "tiktoken", 1.5, WINDOW
    await run_session(gw, api, "calibrated", 30)

    calibration = (await gw.admin_get("/gateway/calibration"))["models"]
    (model,) = calibration
    assert calibration[model]["samples"] >= 20
    assert abs(calibration[model]["factor"] - 1.5) < 0.1, calibration
    assert calibration[model]["error"] < 0.05, calibration
    # Compacted at the provider's count: it never saw a request over its window.
    assert (await gw.record("calibrated")).compacted_calls > 0


async def test_sessions_show_tells_what_compaction_did(
    make_gateway: MakeGateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.harness import ADMIN_TOKEN
    from tests.test_cli import run_cli

    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)

    gw = await make_gateway(POLICY.format(window=WINDOW, strategies="summarize"))
    await run_session(gw, "chat", "shown", 18)
    record = await gw.record("shown")
    assert await run_cli("sessions", "--url", gw.url().rstrip("/"), "show", "shown") == 0
    shown = capsys.readouterr().out
    assert f"compacted        {record.compacted_calls} calls" in shown
    assert ", 1 summary call\n" in shown  # one call, said as one
    assert "summarize: " in shown and " tokens" in shown
    # The admin API shows what compaction did, never its recipes (they hold the summary's
    # text); the store keeps them, for the next request.
    session = await gw.session("shown")
    assert session["compactions"] and "context_rewrites" not in session
    assert record.context_rewrites
