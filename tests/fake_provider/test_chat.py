"""OpenAI Chat Completions through the raw client and the official SDK."""

from __future__ import annotations

import json

import openai
import pytest

from gateway.fake_provider import CONFIG, FakeProviderConfig, ToolCallSpec

from .conftest import AUTH, parse_sse

USER = [{"role": "user", "content": "hello"}]


async def test_sdk_json_answer_has_usage(oai: openai.AsyncOpenAI) -> None:
    answer = await oai.chat.completions.create(model="gpt-4o", messages=USER)  # type: ignore[arg-type]
    assert answer.id.startswith("chatcmpl-")
    assert answer.model == "gpt-4o"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content == FakeProviderConfig().reply_text
    assert answer.usage is not None
    assert answer.usage.prompt_tokens > 0
    assert answer.usage.completion_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cached_tokens == 0
    assert answer.usage.completion_tokens_details is not None
    assert answer.usage.completion_tokens_details.reasoning_tokens == 0


async def test_sdk_stream_with_include_usage(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="gpt-4o",
        messages=USER,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == FakeProviderConfig().reply_text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 2
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


async def test_stream_wire_format_without_include_usage(fake) -> None:
    body = {"model": "gpt-4o", "messages": USER, "stream": True}
    response = await fake.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    text = await response.text()
    assert text.endswith("data: [DONE]\n\n")
    events = parse_sse(text)
    assert all(name is None for name, _ in events)
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all("usage" not in chunk for chunk in chunks)
    assert all(chunk["choices"] for chunk in chunks)
    assert ", " not in events[0][1] and '": ' not in events[0][1]  # compact like OpenAI


async def test_stream_include_usage_marks_every_chunk_null(fake) -> None:
    body = {
        "model": "gpt-4o",
        "messages": USER,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = await fake.post("/v1/chat/completions", json=body, headers=AUTH)
    chunks = [json.loads(data) for _, data in parse_sse(await response.text())[:-1]]
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert set(chunks[-1]["usage"]) >= {
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "prompt_tokens_details",
        "completion_tokens_details",
    }


async def test_tool_loop_config_answers_the_same_call(fake_app, oai: openai.AsyncOpenAI) -> None:
    fake_app[CONFIG].tool_loop = ToolCallSpec("read_file", {"path": "/etc/hostname"})
    for _ in range(2):
        answer = await oai.chat.completions.create(model="gpt-4o", messages=USER)  # type: ignore[arg-type]
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        assert choice.message.tool_calls is not None
        call = choice.message.tool_calls[0]
        assert call.id.startswith("call_")
        assert call.function.name == "read_file"  # type: ignore[union-attr]
        assert json.loads(call.function.arguments) == {"path": "/etc/hostname"}  # type: ignore[union-attr]


async def test_streamed_tool_call_via_scenario(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="gpt-4o",
        messages=USER,  # type: ignore[arg-type]
        stream=True,
        extra_headers={"x-fake-scenario": 'tool:exec:{"cmd": "ls; pwd"}'},
    )
    chunks = [chunk async for chunk in stream]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].index == 0
    assert calls[0].id is not None
    assert calls[0].function is not None and calls[0].function.name == "exec"
    arguments = "".join((tc.function.arguments or "") for tc in calls if tc.function)
    assert json.loads(arguments) == {"cmd": "ls; pwd"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_answered_tool_call_is_accepted(oai: openai.AsyncOpenAI) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "list files"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "ls", "arguments": "{}"}},
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "pwd", "arguments": "{}"},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_2", "content": "/"},
        {"role": "tool", "tool_call_id": "call_1", "content": "a b"},
        {"role": "user", "content": "thanks"},
    ]
    answer = await oai.chat.completions.create(model="gpt-4o", messages=messages)  # type: ignore[arg-type]
    assert answer.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        (
            [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "call_9",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "user", "content": "y"},
            ],
            "did not have response messages: call_9",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "tool", "tool_call_id": "call_9", "content": "orphan"},
            ],
            "messages with role 'tool' must be a response to a preceeding message with "
            "'tool_calls'",
        ),
        ([], "empty array"),
        ([{"role": "robot", "content": "x"}], "Invalid value: 'robot'"),
    ],
)
async def test_strict_validation_rejects(oai: openai.AsyncOpenAI, messages, fragment) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await oai.chat.completions.create(model="gpt-4o", messages=messages)
    assert fragment in caught.value.message
    error = caught.value.body
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"


async def test_stream_options_need_stream(fake) -> None:
    body = {"model": "gpt-4o", "messages": USER, "stream_options": {"include_usage": True}}
    response = await fake.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["param"] == "stream_options"


async def test_missing_model(fake) -> None:
    response = await fake.post("/v1/chat/completions", json={"messages": USER}, headers=AUTH)
    assert response.status == 400
    assert "model" in (await response.json())["error"]["message"]
