"""Anthropic Messages and count_tokens through the raw client and the official SDK."""

from __future__ import annotations

import json

import anthropic
import pytest

from gateway.fake_provider import FakeProviderConfig

from .conftest import ANTHROPIC_HEADERS, CLAUDE_MODEL, parse_sse

USER = [{"role": "user", "content": "hello"}]


def _tool_use(tool_id: str) -> dict[str, object]:
    return {"type": "tool_use", "id": tool_id, "name": "Read", "input": {"file_path": "/x"}}


def _tool_result(tool_id: str) -> dict[str, object]:
    return {"type": "tool_result", "tool_use_id": tool_id, "content": "data"}


async def test_sdk_json_answer_has_usage(claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(
        model=CLAUDE_MODEL,
        max_tokens=100,
        system=[{"type": "text", "text": "be brief"}],
        messages=USER,  # type: ignore[arg-type]
    )
    assert message.id.startswith("msg_")
    assert message.model == CLAUDE_MODEL
    assert message.stop_reason == "end_turn"
    assert message.content[0].type == "text"
    assert message.content[0].text == FakeProviderConfig().reply_text
    assert message.usage.input_tokens > 0
    assert message.usage.output_tokens > 0
    assert message.usage.cache_creation_input_tokens == 0
    assert message.usage.cache_read_input_tokens == 0


async def test_sdk_stream(claude: anthropic.AsyncAnthropic) -> None:
    async with claude.messages.stream(
        model=CLAUDE_MODEL,
        max_tokens=100,
        messages=USER,  # type: ignore[arg-type]
    ) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"
    assert final.content[0].type == "text"
    assert final.content[0].text == FakeProviderConfig().reply_text
    assert final.usage.input_tokens > 0
    assert final.usage.output_tokens > 1
    assert final.stop_reason == "end_turn"


async def test_stream_wire_format(fake) -> None:
    body = {"model": CLAUDE_MODEL, "max_tokens": 10, "messages": USER, "stream": True}
    response = await fake.post("/v1/messages", json=body, headers=ANTHROPIC_HEADERS)
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = parse_sse(await response.text())
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert names.count("content_block_delta") > 2
    for name, data in events:
        assert json.loads(data)["type"] == name
    start = json.loads(events[0][1])["message"]["usage"]
    assert start["input_tokens"] > 0
    assert start["output_tokens"] == 1
    delta = json.loads(events[-2][1])
    assert delta["delta"]["stop_reason"] == "end_turn"
    assert delta["usage"]["output_tokens"] > 1


async def test_tool_loop_stream(claude: anthropic.AsyncAnthropic) -> None:
    async with claude.messages.stream(
        model=CLAUDE_MODEL,
        max_tokens=100,
        messages=USER,  # type: ignore[arg-type]
        extra_headers={"x-fake-scenario": 'tool_loop:Read:{"file_path": "/etc/hostname"}'},
    ) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    block = final.content[0]
    assert block.type == "tool_use"
    assert block.id.startswith("toolu_")
    assert block.name == "Read"
    assert block.input == {"file_path": "/etc/hostname"}


async def test_paired_tool_use_accepted(claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(
        model=CLAUDE_MODEL,
        max_tokens=100,
        messages=[
            {"role": "user", "content": "read it"},
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "ok"}, _tool_use("toolu_1")],
            },
            {"role": "user", "content": [_tool_result("toolu_1"), {"type": "text", "text": "go"}]},
        ],  # type: ignore[list-item]
    )
    assert message.stop_reason == "end_turn"


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": [_tool_use("toolu_1"), _tool_use("toolu_2")]},
                {"role": "user", "content": [_tool_result("toolu_1")]},
            ],
            "messages.1: `tool_use` ids were found without `tool_result` blocks immediately "
            "after: toolu_2. Each `tool_use` block must have a corresponding `tool_result` "
            "block in the next message.",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": [_tool_use("toolu_1")]},
                {"role": "user", "content": "no result"},
            ],
            "`tool_use` ids were found without `tool_result` blocks immediately after: toolu_1.",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": "hi"},
                {"role": "user", "content": [_tool_result("toolu_7")]},
            ],
            "messages.2.content.0: unexpected `tool_use_id` found in `tool_result` blocks: toolu_7",
        ),
        ([{"role": "assistant", "content": "x"}], 'first message must use the "user" role'),
        ([{"role": "system", "content": "x"}], "Input should be 'user' or 'assistant'"),
        ([], "at least one message is required"),
    ],
)
async def test_strict_validation_rejects(
    claude: anthropic.AsyncAnthropic, messages, fragment
) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        await claude.messages.create(model=CLAUDE_MODEL, max_tokens=10, messages=messages)
    assert fragment in caught.value.message
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert body["request_id"].startswith("req_")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_tokens": None}, "max_tokens: Field required"),
        ({"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
        ({"model": None}, "model: Field required"),
        ({"system": [{"type": "image"}]}, "system.0.type"),
    ],
)
async def test_required_fields(fake, change, message) -> None:
    body = {"model": CLAUDE_MODEL, "max_tokens": 10, "messages": USER}
    body.update(change)
    body = {key: value for key, value in body.items() if value is not None}
    response = await fake.post("/v1/messages", json=body, headers=ANTHROPIC_HEADERS)
    assert response.status == 400
    assert (await response.json())["error"]["message"].startswith(message)


async def test_anthropic_version_required(fake) -> None:
    body = {"model": CLAUDE_MODEL, "max_tokens": 10, "messages": USER}
    response = await fake.post("/v1/messages", json=body, headers={"x-api-key": "k"})
    assert response.status == 400
    answer = await response.json()
    assert answer["type"] == "error"
    assert answer["error"] == {
        "type": "invalid_request_error",
        "message": "anthropic-version: header is required",
    }
    assert answer["request_id"].startswith("req_")


async def test_mid_conversation_system_needs_its_beta(fake) -> None:
    body = {
        "model": CLAUDE_MODEL,
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "note"}],
    }
    refused = await fake.post("/v1/messages", json=body, headers=ANTHROPIC_HEADERS)
    assert refused.status == 400
    beta = {**ANTHROPIC_HEADERS, "anthropic-beta": "mid-conversation-system-2026-04-07"}
    accepted = await fake.post("/v1/messages", json=body, headers=beta)
    assert accepted.status == 200


async def test_count_tokens(claude: anthropic.AsyncAnthropic) -> None:
    counted = await claude.messages.count_tokens(model=CLAUDE_MODEL, messages=USER)  # type: ignore[arg-type]
    created = await claude.messages.create(model=CLAUDE_MODEL, max_tokens=5, messages=USER)  # type: ignore[arg-type]
    assert counted.input_tokens == created.usage.input_tokens > 0
