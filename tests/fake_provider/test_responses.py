"""OpenAI Responses through the raw client and the official SDK."""

from __future__ import annotations

import json

import openai
import pytest

from gateway.fake_provider import FakeProviderConfig

from .conftest import AUTH, parse_sse

CALL = {"type": "function_call", "call_id": "call_a", "name": "ls", "arguments": "{}"}
OUTPUT = {"type": "function_call_output", "call_id": "call_a", "output": "a b"}


async def test_sdk_json_answer_has_usage(oai: openai.AsyncOpenAI) -> None:
    answer = await oai.responses.create(model="gpt-5", input="hello")
    assert answer.id.startswith("resp_")
    assert answer.status == "completed"
    assert answer.model == "gpt-5"
    assert answer.output_text == FakeProviderConfig().reply_text
    assert answer.usage is not None
    assert answer.usage.input_tokens > 0
    assert answer.usage.output_tokens > 0
    assert answer.usage.total_tokens == answer.usage.input_tokens + answer.usage.output_tokens
    assert answer.usage.input_tokens_details.cached_tokens == 0
    assert answer.usage.output_tokens_details.reasoning_tokens == 0


async def test_sdk_stream_events_in_order(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.responses.create(model="gpt-5", input="hello", stream=True)
    events = [event async for event in stream]
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert kinds.count("response.output_text.delta") > 2
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == FakeProviderConfig().reply_text
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.usage is not None
    assert completed.response.usage.input_tokens > 0


async def test_stream_wire_format(fake) -> None:
    body = {"model": "gpt-5", "input": "hi", "stream": True}
    response = await fake.post("/v1/responses", json=body, headers=AUTH)
    assert response.headers["Content-Type"].startswith("text/event-stream")
    for name, data in parse_sse(await response.text()):
        assert json.loads(data)["type"] == name


async def test_tool_call_stream(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.responses.create(
        model="gpt-5",
        input="loop",
        stream=True,
        extra_headers={"x-fake-scenario": 'tool_loop:exec_command:{"cmd": "cat /etc/hostname"}'},
    )
    events = [event async for event in stream]
    added = next(e for e in events if e.type == "response.output_item.added")
    assert added.item.type == "function_call"
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(deltas) == json.loads(done.arguments) == {"cmd": "cat /etc/hostname"}
    item = events[-1].response.output[0]
    assert item.type == "function_call"
    assert item.name == "exec_command"
    assert item.call_id.startswith("call_")


async def test_paired_calls_and_settings_accepted(oai: openai.AsyncOpenAI) -> None:
    answer = await oai.responses.create(
        model="gpt-5",
        input=[
            {"type": "message", "role": "developer", "content": "rules"},
            {"role": "user", "content": "go"},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "xyz"},
            CALL,
            OUTPUT,
            {"type": "custom_tool_call", "call_id": "call_b", "name": "apply_patch", "input": "x"},
            {"type": "custom_tool_call_output", "call_id": "call_b", "output": "ok"},
            {"type": "some_future_item", "id": "x_1"},
        ],  # type: ignore[list-item]
        store=False,
        include=["reasoning.encrypted_content"],
        prompt_cache_key="session-1",
        reasoning={"effort": "low", "summary": "auto"},
    )
    assert answer.status == "completed"


@pytest.mark.parametrize(
    ("items", "fragment"),
    [
        (
            [{"role": "user", "content": "x"}, CALL],
            "No tool output found for function call call_a.",
        ),
        ([OUTPUT], "No tool call found for function call output with call_id call_a."),
        ([OUTPUT, CALL], "No tool call found for function call output with call_id call_a."),
        ([{"role": "tool", "content": "x"}], "Invalid value: 'tool'"),
    ],
)
async def test_strict_validation_rejects(oai: openai.AsyncOpenAI, items, fragment) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await oai.responses.create(model="gpt-5", input=items)
    assert fragment in caught.value.message


async def test_trailing_reasoning_is_400(fake) -> None:
    reasoning = {"type": "reasoning", "id": "rs_9", "summary": [], "encrypted_content": "x"}
    body = {"model": "gpt-5", "input": [{"role": "user", "content": "go"}, reasoning]}
    response = await fake.post("/v1/responses", json=body, headers=AUTH)
    assert response.status == 400
    assert await response.json() == {
        "error": {
            "message": "Item 'rs_9' of type 'reasoning' was provided without its required "
            "following item.",
            "type": "invalid_request_error",
            "param": "input",
            "code": None,
        }
    }
    body["input"] = [*body["input"], CALL, OUTPUT]
    assert (await fake.post("/v1/responses", json=body, headers=AUTH)).status == 200


async def test_output_may_answer_a_previous_response(oai: openai.AsyncOpenAI) -> None:
    answer = await oai.responses.create(
        model="gpt-5",
        input=[OUTPUT],
        previous_response_id="resp_prev",  # type: ignore[list-item]
    )
    assert answer.status == "completed"


async def test_missing_model(fake) -> None:
    response = await fake.post("/v1/responses", json={"input": "x"}, headers=AUTH)
    assert response.status == 400
    error = (await response.json())["error"]
    assert error == {
        "message": "Missing required parameter: 'model'.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "missing_required_parameter",
    }
