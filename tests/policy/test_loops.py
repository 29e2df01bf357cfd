"""Runaway loops, driven like real agents: each turn sends the history with the model's last
tool call and its result. Reject, flag and pause; retry storms; helper calls; a recorded Codex
request from a real loop."""

from __future__ import annotations

import json
from collections.abc import Iterator

import aiohttp
import openai
import pytest

from gateway.fake_provider import FakeProviderConfig, ToolCallSpec
from gateway.loops import COUNT_BOUND, Detection, Signature, identical_run, signatures
from gateway.policy import Caller, parse_policy
from gateway.policy.decide import Decision
from gateway.policy.verdicts import loop_verdict
from gateway.store import Limits
from tests.conftest import load_fixture
from tests.harness import MakeGateway, session_headers
from tests.policy.apis import APIS, AgentLoop, Api, call

LOOPS = """
version: 1
defaults:
  loops: {{identical_tool_calls: 4, repeated_requests: 3, action: {action}}}
"""


@pytest.fixture
def looping_model(fake_config: FakeProviderConfig) -> ToolCallSpec:
    """The model answers every call with the same tool call, like a stuck agent."""
    fake_config.tool_loop = ToolCallSpec("read_file", {"path": "src/app.py"})
    return fake_config.tool_loop


@pytest.mark.usefixtures("looping_model")
@pytest.mark.parametrize("api", APIS)
async def test_identical_tool_calls_are_refused(make_gateway: MakeGateway, api: Api) -> None:
    gw = await make_gateway(LOOPS.format(action="reject"))
    session = f"loop-{api}"
    loop = AgentLoop(gw, api, session_headers(session), "Fix the failing test.")
    went_through = await loop.until_refused()
    # Four calls made four identical tool calls; the call carrying all four is refused.
    assert went_through == 4 and loop.tool_calls_made == 4
    refused = loop.refusal
    assert refused is not None
    assert refused.status == 400
    assert refused.code(api) == "gateway_policy_loop_identical_tool_calls"
    message = refused.message
    assert "runaway loop" in message
    assert "read_file" in message and "4 times" in message
    assert f"gateway sessions grant {session}" in message
    assert gw.upstream_calls() == 4

    shown = await gw.session(session)
    assert shown["status"] == "active"  # reject stops the call, not the session
    [detection] = shown["detections"]
    assert detection["detector"] == "identical_tool_calls"
    assert detection["tool"] == "read_file"
    assert detection["count"] == 4 and detection["threshold"] == 4
    assert shown["rejections"][-1]["limit"] == "loop_identical_tool_calls"

    # The agent retrying the same history is refused again, and not sent upstream.
    again = await loop.turn()
    assert again.status == 400 and gw.upstream_calls() == 4


@pytest.mark.usefixtures("looping_model")
async def test_a_grant_lets_a_refused_loop_go_on(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(LOOPS.format(action="reject"))
    loop = AgentLoop(gw, "chat", session_headers("loop-grant"), "Fix it.")
    assert await loop.until_refused() == 4
    await gw.grant("loop-grant", turns=2, reason="it is polling on purpose")
    assert (await loop.turn()).ok
    assert (await loop.turn()).ok
    assert (await loop.turn()).status == 400  # the grant's turns are used up


@pytest.mark.usefixtures("looping_model")
async def test_the_stop_names_the_real_run_not_the_threshold(make_gateway: MakeGateway) -> None:
    """Past the threshold the run is counted on: a stop after a grant says how many
    identical calls the history really holds."""
    gw = await make_gateway(LOOPS.format(action="reject"))
    loop = AgentLoop(gw, "chat", session_headers("loop-count"), "Fix it.")
    assert await loop.until_refused() == 4
    assert "read_file 4 times in a row" in loop.refusal.message  # type: ignore[union-attr]
    await gw.grant("loop-count", turns=3)
    for _ in range(3):
        assert (await loop.turn()).ok
    refused = await loop.turn()
    assert refused.status == 400
    # Turns 5, 6 and 7 each added one more identical call to the history.
    assert "the same tool call read_file 7 times in a row" in refused.message
    assert "(loops.identical_tool_calls = 4 from the defaults)" in refused.message
    detections = (await gw.session("loop-count"))["detections"]
    assert detections[-1]["count"] == 7 and detections[-1]["at_least"] is False


async def test_a_huge_run_is_counted_up_to_a_bound(make_gateway: MakeGateway) -> None:
    """A history of 150 identical calls: the count stops at COUNT_BOUND, and says so."""
    gw = await make_gateway(LOOPS.format(action="reject"))
    history: list[dict[str, object]] = [{"role": "user", "content": "Fix it."}]
    for index in range(150):
        call_id = f"call_{index}"
        function = {"name": "read_file", "arguments": '{"path": "src/app.py"}'}
        history.append(
            {
                "role": "assistant",
                "tool_calls": [{"id": call_id, "type": "function", "function": function}],
            }
        )
        history.append({"role": "tool", "tool_call_id": call_id, "content": "same contents"})
    with pytest.raises(openai.BadRequestError) as caught:
        await gw.openai.chat.completions.create(
            model="gpt-4o",
            messages=history,  # type: ignore[arg-type]
            tools=[{"type": "function", "function": {"name": "read_file", "parameters": {}}}],
            extra_headers=session_headers("loop-huge"),
        )
    assert caught.value.code == "gateway_policy_loop_identical_tool_calls"
    assert f"read_file at least {COUNT_BOUND} times in a row" in caught.value.message
    [detection] = (await gw.session("loop-huge"))["detections"]
    assert detection["count"] == COUNT_BOUND and detection["at_least"] is True
    assert gw.upstream_calls() == 0


def turns_of(*calls: str) -> list[Signature]:
    """Assistant turns, newest first, each one call of ``read_file`` with these arguments."""
    return [signatures([("read_file", arguments)]) for arguments in calls]


def test_identical_run_counts_to_the_first_different_turn() -> None:
    same = '{"path": "a"}'
    turns = turns_of(same, '{ "path" : "a" }', same, '{"path": "b"}', same)
    assert identical_run(iter(turns))[::2] == (3, False)  # reformatted arguments are the same
    assert identical_run(iter(turns_of(same, same)), bound=2)[::2] == (2, False)
    assert identical_run(iter(turns_of(same, same, same)), bound=2)[::2] == (2, True)
    assert identical_run(iter([]))[::2] == (0, False)


def test_identical_run_reads_no_further_than_its_bound() -> None:
    read = 0

    def endless() -> Iterator[Signature]:
        nonlocal read
        while True:
            read += 1
            yield signatures([("read_file", '{"path": "a"}')])

    assert identical_run(endless(), bound=50)[::2] == (50, True)
    assert read == 51


@pytest.mark.parametrize(
    ("detection", "said"),
    [
        (
            Detection("identical_tool_calls", 29, 8, "read_file"),
            "the same tool call read_file 29 times in a row",
        ),
        (
            Detection("identical_tool_calls", 100, 8, "read_file", at_least=True),
            "the same tool call read_file at least 100 times in a row",
        ),
        (Detection("repeated_requests", 7, 6), "the same request 7 times in a row"),
        (
            Detection("turn_rate", 240.4, 40.0),
            "240 turns a minute, over the 40 a minute its own norm allows",
        ),
    ],
    ids=["identical", "bounded", "repeated", "rate"],
)
def test_each_detector_says_what_it_saw(detection: Detection, said: str) -> None:
    assert detection.describe() == said


def test_a_turn_rate_stop_names_the_factor_it_was_set_to() -> None:
    policy = parse_policy("version: 1\ndefaults:\n  loops: {turn_rate_factor: 5}\n", "p")
    effective = policy.resolve(Caller())
    decision = Decision(effective, Limits(), detections=[Detection("turn_rate", 150.0, 25.0)])
    verdict = loop_verdict(decision, "s", None)
    assert verdict is not None and verdict.limit == "loop_turn_rate"
    assert "150 turns a minute, over the 25 a minute its own norm allows" in verdict.message
    assert "(loops.turn_rate_factor = 5 from the defaults)" in verdict.message


@pytest.mark.usefixtures("looping_model")
async def test_different_arguments_are_not_a_loop(
    make_gateway: MakeGateway, fake_config: FakeProviderConfig
) -> None:
    gw = await make_gateway(LOOPS.format(action="reject"))
    loop = AgentLoop(gw, "chat", session_headers("progress"), "Read every file.")
    for index in range(8):
        fake_config.tool_loop = ToolCallSpec("read_file", {"path": f"src/{index}.py"})
        assert (await loop.turn()).ok
    assert (await gw.session("progress"))["detections"] == []


@pytest.mark.usefixtures("looping_model")
async def test_new_user_input_starts_a_new_run(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(LOOPS.format(action="reject"))
    loop = AgentLoop(gw, "messages", session_headers("user-breaks"), "Look at the file.")
    for _ in range(3):
        assert (await loop.turn()).ok
    loop.history.append({"role": "user", "content": [{"type": "text", "text": "Again, please."}]})
    for _ in range(3):
        assert (await loop.turn()).ok
    assert (await gw.session("user-breaks"))["detections"] == []


@pytest.mark.usefixtures("looping_model")
@pytest.mark.parametrize("api", APIS)
async def test_flag_records_the_loop_and_lets_it_go_on(make_gateway: MakeGateway, api: Api) -> None:
    gw = await make_gateway(LOOPS.format(action="flag"))
    session = f"flag-{api}"
    loop = AgentLoop(gw, api, session_headers(session), "Fix it.")
    for _ in range(7):
        outcome = await loop.turn()
        assert outcome.ok, outcome.body
    shown = await gw.session(session)
    assert shown["status"] == "active" and shown["rejected"] == 0
    [detection] = shown["detections"]  # one entry, counted
    assert detection["detector"] == "identical_tool_calls" and detection["tool"] == "read_file"
    assert detection["times"] == 3  # turns 5, 6 and 7 carried 4+ identical calls
    assert detection["count"] >= 4


@pytest.mark.usefixtures("looping_model")
@pytest.mark.parametrize("api", APIS)
async def test_pause_stops_the_session_until_a_grant(make_gateway: MakeGateway, api: Api) -> None:
    gw = await make_gateway(LOOPS.format(action="pause"))
    session = f"pause-{api}"
    headers = session_headers(session)
    loop = AgentLoop(gw, api, headers, "Fix it.")
    assert await loop.until_refused() == 4
    refused = loop.refusal
    assert refused is not None
    assert "runaway loop" in refused.message and "paused" in refused.message
    shown = await gw.session(session)
    assert shown["status"] == "paused"

    # Paused: even a different request, without the loop in it, is refused.
    before = gw.upstream_calls()
    other = await call(gw, api, headers, text="Something else entirely.")
    assert other.status == 400
    assert other.code(api) == "gateway_policy_session_paused"
    assert f"gateway sessions grant {session}" in other.message
    assert gw.upstream_calls() == before

    granted = await gw.grant(session, turns=3, by="carol", reason="checked")
    assert granted["status"] == "active"
    assert (await loop.turn()).ok, "the loop goes on after the grant"
    assert (await call(gw, api, headers, text="Something else entirely.")).ok
    assert (await gw.session(session))["status"] == "active"


def storm_request(session: str, **extra: str) -> dict[str, object]:
    return {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "Run the tests."}],
        "tools": [{"type": "function", "function": {"name": "run_tests", "parameters": {}}}],
        "extra_headers": session_headers(session, **extra),
    }


async def test_a_retry_storm_is_refused(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(LOOPS.format(action="reject"))
    request = storm_request("storm")
    await gw.openai.chat.completions.create(**request)  # type: ignore[call-overload]
    await gw.openai.chat.completions.create(**request)  # type: ignore[call-overload]
    with pytest.raises(openai.BadRequestError) as caught:
        await gw.openai.chat.completions.create(**request)  # type: ignore[call-overload]
    assert caught.value.code == "gateway_policy_loop_repeated_requests"
    assert "the same request 3 times in a row" in caught.value.message
    assert gw.upstream_calls() == 2
    [detection] = (await gw.session("storm"))["detections"]
    assert detection["detector"] == "repeated_requests" and detection["count"] == 3


async def test_a_retry_after_a_failure_is_not_a_storm(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(LOOPS.format(action="reject"))
    request = storm_request("retries")
    failing = storm_request("retries", **{"x-fake-scenario": "error:500"})
    await gw.openai.chat.completions.create(**request)  # type: ignore[call-overload]
    with pytest.raises(openai.InternalServerError):
        await gw.openai.chat.completions.create(**failing)  # type: ignore[call-overload]
    # The same bytes again after a failure: a client's retry, not counted.
    await gw.openai.chat.completions.create(**request)  # type: ignore[call-overload]
    with pytest.raises(openai.BadRequestError) as caught:
        await gw.openai.chat.completions.create(**request)  # type: ignore[call-overload]
    assert caught.value.code == "gateway_policy_loop_repeated_requests"
    record = await gw.record("retries")
    assert record.upstream_errors == 1 and record.turns == 3


async def test_a_different_request_after_repeats_is_not_a_storm(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(LOOPS.format(action="reject"))
    request = storm_request("almost")
    await gw.openai.chat.completions.create(**request)  # type: ignore[call-overload]
    await gw.openai.chat.completions.create(**request)  # type: ignore[call-overload]
    different = {**request, "messages": [{"role": "user", "content": "Now run the linter."}]}
    # Not a repeat: the third request differs from the two before it.
    answer = await gw.openai.chat.completions.create(**different)  # type: ignore[call-overload]
    assert answer.choices[0].message.content
    assert (await gw.session("almost"))["detections"] == []


@pytest.mark.usefixtures("looping_model")
async def test_helper_calls_are_not_loop_checked(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(LOOPS.format(action="reject"))
    loop = AgentLoop(gw, "chat", session_headers("helpers"), "Fix it.")
    assert await loop.until_refused() == 4

    # x-openai-subagent is a claim: a call that carries tools is loop-checked all the same
    # (Codex's own helper calls carry none).
    claimed = await loop.turn({"x-openai-subagent": "compact"})
    assert claimed.status == 400, claimed.body
    assert claimed.body["error"]["code"] == "gateway_policy_loop_identical_tool_calls"

    # A call without tools (a title or summary call) over that history goes through.
    titled = await gw.openai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[*loop.history, {"role": "user", "content": "Title this conversation."}],  # type: ignore[list-item]
        extra_headers=session_headers("helpers"),
    )
    assert titled.choices[0].message
    # Byte-identical helper calls are no retry storm either.
    for _ in range(4):
        assert (await call(gw, "chat", session_headers("helpers"), text="title?")).ok
    record = await gw.record("helpers")
    assert record.turns == 4 + 1 + 4


async def test_recorded_codex_loop_is_refused_by_the_packaged_policy(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(None)
    fixture = load_fixture("codex-0.169.0-responses-turn268.json")
    headers = {**fixture["headers"], "Authorization": "Bearer x"}
    session = fixture["headers"]["session-id"]
    statuses = []
    async with aiohttp.ClientSession() as http:
        for _ in range(12):
            async with http.post(
                gw.url(fixture["path"]), data=json.dumps(fixture["body"]), headers=headers
            ) as resp:
                statuses.append(resp.status)
                if resp.status == 400:
                    error = (await resp.json())["error"]
                    break
                await resp.read()
    assert statuses[-1] == 400, statuses
    assert error["code"] == "gateway_policy_loop_identical_tool_calls"
    assert "runaway loop" in error["message"]
    assert f"gateway sessions grant {session}" in error["message"]
    # The recorded history holds 267 identical calls, not the threshold's 8 (or 9).
    assert "exec_command at least 100 times in a row" in error["message"]
    detections = (await gw.session(session))["detections"]
    assert detections and detections[0]["detector"] == "identical_tool_calls"
    assert detections[0]["count"] == 100 and detections[0]["at_least"] is True
