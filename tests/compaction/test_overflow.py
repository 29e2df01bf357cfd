"""What agents see when a request is over the window: the provider's own overflow error.

With ``strategies: [prompt]`` (or when nothing else gets a request under the window) the gateway
answers as the provider would, so the agent's own compaction takes over: Claude Code on
"prompt is too long", Codex on ``context_length_exceeded`` inside a ``response.failed`` event.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from gateway.fake_provider import CONFIG
from tests.compaction.test_sessions import POLICY, WINDOW, file_contents, summary_calls
from tests.conftest import ANTHROPIC_MODEL
from tests.harness import Gateway, MakeGateway, session_headers
from tests.policy.apis import APIS, Api

THRESHOLD = int(0.8 * WINDOW)
PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses", "messages": "/v1/messages"}


def long_request(api: Api, exchanges: int = 30, stream: bool = False) -> dict[str, Any]:
    """A history of tool exchanges well over the threshold, valid for the API."""
    items: list[dict[str, Any]] = [{"role": "user", "content": "Refactor the parser."}]
    for n in range(exchanges):
        call_id, output = f"call_{n}", file_contents(n)
        if api == "chat":
            items.append(
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": call_id,
                            "type": "function",
                            "function": {"name": "read_file", "arguments": json.dumps({"n": n})},
                        }
                    ],
                }
            )
            items.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif api == "responses":
            items.append(
                {
                    "type": "function_call",
                    "call_id": call_id,
                    "name": "read_file",
                    "arguments": "{}",
                }
            )
            items.append({"type": "function_call_output", "call_id": call_id, "output": output})
        else:
            items.append(
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": call_id, "name": "read_file", "input": {}}
                    ],
                }
            )
            items.append(
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": call_id, "content": output}],
                }
            )
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    if api == "chat":
        tool = {"type": "function", "function": {"name": "read_file", "parameters": schema}}
        return {"model": "gpt-4o", "messages": items, "stream": stream, "tools": [tool]}
    if api == "responses":
        tool = {"type": "function", "name": "read_file", "parameters": schema}
        return {"model": "gpt-4o", "input": items, "stream": stream, "tools": [tool]}
    tool = {"name": "read_file", "input_schema": schema}
    return {
        "model": ANTHROPIC_MODEL,
        "max_tokens": 256,
        "messages": items,
        "stream": stream,
        "tools": [tool],
    }


def api_headers(api: Api, session: str) -> dict[str, str]:
    if api == "messages":
        return session_headers(
            session, **{"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}
        )
    return session_headers(session, Authorization="Bearer sk-test-openai")


async def send(
    gw: Gateway, api: Api, session: str, **request: Any
) -> tuple[int, dict[str, str], Any]:
    return await gw.post(PATHS[api], long_request(api, **request), api_headers(api, session))


@pytest.mark.parametrize("api", APIS)
async def test_prompt_answers_the_providers_own_overflow_error(
    make_gateway: MakeGateway, api: Api
) -> None:
    gw = await make_gateway(POLICY.format(window=WINDOW, strategies="prompt"))
    status, headers, body = await send(gw, api, "prompt")

    assert status == 400
    assert headers["X-Gateway-Policy-Limit"] == "context_window"
    assert gw.upstream_calls() == 0
    if api == "messages":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        match = re.match(
            r"prompt is too long: (\d+) tokens > (\d+) maximum", body["error"]["message"]
        )
        assert match is not None, body
        assert int(match.group(1)) > int(match.group(2)) == THRESHOLD
    else:
        error = body["error"]
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "context_length_exceeded"
    # The operator learns which setting did it and where to change it.
    assert "context.strategies" in json.dumps(body)
    record = await gw.record("prompt")
    assert record.rejections[-1]["limit"] == "context_window"


async def test_prompt_on_a_responses_stream_is_a_response_failed_event(
    make_gateway: MakeGateway,
) -> None:
    """Codex reads a context overflow only from a stream's ``response.failed`` event."""
    gw = await make_gateway(POLICY.format(window=WINDOW, strategies="prompt"))
    status, headers, body = await send(gw, "responses", "codex", stream=True)

    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert isinstance(body, bytes)
    event, data = body.decode().strip().split("\n", 1)
    assert event == "event: response.failed"
    payload = json.loads(data.removeprefix("data: "))
    assert payload["type"] == "response.failed"
    assert payload["response"]["status"] == "failed"
    assert payload["response"]["error"]["code"] == "context_length_exceeded"


async def test_the_openai_sdk_raises_its_own_overflow_error(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(POLICY.format(window=WINDOW, strategies="prompt"))
    request = long_request("chat")
    with pytest.raises(Exception) as caught:
        await gw.openai.chat.completions.create(
            model=request["model"],
            messages=request["messages"],
            tools=request["tools"],
            extra_headers=session_headers("sdk"),
        )
    assert getattr(caught.value, "code", None) == "context_length_exceeded"


@pytest.mark.parametrize("api", APIS)
async def test_a_streamed_request_is_compacted_and_streams(
    make_gateway: MakeGateway, api: Api
) -> None:
    gw = await make_gateway(POLICY.format(window=WINDOW, strategies="summarize"))
    gw.fake.app[CONFIG].context_window = WINDOW
    status, headers, body = await send(gw, api, "stream", stream=True)

    assert status == 200, body
    assert headers["X-Gateway-Compacted"].startswith("summarize;")
    assert b"data: " in body and len(summary_calls(gw)) == 1


@pytest.mark.parametrize("api", APIS)
async def test_a_failed_summary_falls_back_to_the_next_strategy(
    make_gateway: MakeGateway, api: Api
) -> None:
    policy = POLICY.format(window=WINDOW, strategies="summarize, truncate").replace(
        "keep_last: 2", "keep_last: 2\n    summary_model: no-such-model"
    )
    gw = await make_gateway(policy)
    gw.fake.app[CONFIG].context_window = WINDOW
    status, headers, body = await send(gw, api, "fallback")

    assert status == 200, body
    compacted = headers["X-Gateway-Compacted"]
    assert compacted.startswith("truncate;")
    assert "failed=summarize: upstream answered 404" in compacted
    record = await gw.record("fallback")
    assert record.compactions[-1]["failures"] == ["summarize: upstream answered 404"]
    assert record.summary_calls == 0


async def test_a_failed_summary_with_nothing_after_it_is_a_clear_overflow(
    make_gateway: MakeGateway,
) -> None:
    policy = POLICY.format(window=WINDOW, strategies="summarize").replace(
        "keep_last: 2", "keep_last: 2\n    summary_model: no-such-model"
    )
    gw = await make_gateway(policy)
    status, _, body = await send(gw, "chat", "stuck", exchanges=40)

    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert "still over the window after summarize" in body["error"]["message"]


async def test_an_agents_own_compaction_call_is_never_compacted(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(POLICY.format(window=WINDOW, strategies="summarize"))
    headers = {**api_headers("responses", "codex"), "x-openai-subagent": "compact"}
    status, answer_headers, body = await gw.post(
        PATHS["responses"], long_request("responses"), headers
    )

    assert status == 200, body
    assert "X-Gateway-Compacted" not in answer_headers
    assert summary_calls(gw) == []


async def test_a_chained_responses_call_is_left_to_the_provider(make_gateway: MakeGateway) -> None:
    """With ``previous_response_id`` the history lives on the provider's side."""
    gw = await make_gateway(POLICY.format(window=WINDOW, strategies="summarize"))
    request = {**long_request("responses"), "previous_response_id": "resp_earlier"}
    status, headers, body = await gw.post(
        PATHS["responses"], request, api_headers("responses", "c")
    )

    assert status == 200, body
    assert "X-Gateway-Compacted" not in headers and summary_calls(gw) == []


async def test_prompt_lets_the_agents_own_compaction_call_through(
    make_gateway: MakeGateway,
) -> None:
    """An agent compacting after the overflow sends its history without tools to summarize it:
    refusing that too would leave it stuck."""
    gw = await make_gateway(POLICY.format(window=WINDOW, strategies="prompt"))
    request = long_request("chat", exchanges=22)  # past compact_at, within the window
    request["messages"].append({"role": "user", "content": "Summarize the conversation so far."})
    del request["tools"]
    status, _, body = await gw.post(PATHS["chat"], request, api_headers("chat", "own"))

    assert status == 200, body
