"""The strict checks, called directly: no server."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.fake_provider.errors import FakeError
from gateway.fake_provider.validation import (
    validate_chat,
    validate_messages,
    validate_responses,
)

HEADERS = {"anthropic-version": "2023-06-01"}


def _call(call_id: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": "f", "arguments": "{}"}}


def test_chat_trailing_unanswered_call_is_rejected() -> None:
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [_call("c1")]},
    ]
    with pytest.raises(FakeError, match="did not have response messages: c1"):
        validate_chat({"model": "m", "messages": messages})


def test_chat_duplicate_tool_answer_is_rejected() -> None:
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [_call("c1")]},
        {"role": "tool", "tool_call_id": "c1", "content": "a"},
        {"role": "tool", "tool_call_id": "c1", "content": "b"},
    ]
    with pytest.raises(FakeError, match="preceeding message with 'tool_calls'") as caught:
        validate_chat({"model": "m", "messages": messages})
    assert caught.value.status == 400
    assert caught.value.param == "messages.[3].role"


def test_chat_missing_messages() -> None:
    with pytest.raises(FakeError) as caught:
        validate_chat({"model": "m"})
    assert caught.value.code == "missing_required_parameter"


def test_responses_accepts_string_and_missing_input() -> None:
    validate_responses({"model": "m", "input": "hi"})
    validate_responses({"model": "m", "previous_response_id": "resp_1"})


def test_responses_custom_tool_call_needs_output() -> None:
    items = [{"type": "custom_tool_call", "call_id": "c", "name": "patch", "input": "x"}]
    with pytest.raises(FakeError, match=r"No tool output found for custom tool call c\."):
        validate_responses({"model": "m", "input": items})


@pytest.mark.parametrize(
    ("reasoning", "item_id"),
    [
        ({"type": "reasoning", "id": "rs_1", "summary": []}, "rs_1"),
        ({"type": "reasoning", "summary": []}, "rs_unknown"),
    ],
)
def test_responses_trailing_reasoning_is_rejected(reasoning: dict[str, Any], item_id: str) -> None:
    items = [{"role": "user", "content": "x"}, reasoning]
    with pytest.raises(FakeError) as caught:
        validate_responses({"model": "m", "input": items})
    assert caught.value.status == 400
    assert caught.value.type_ == "invalid_request_error"
    assert caught.value.param == "input"
    assert caught.value.message == (
        f"Item '{item_id}' of type 'reasoning' was provided without its required following item."
    )


def test_responses_reasoning_followed_by_a_call_is_accepted() -> None:
    items = [
        {"role": "user", "content": "x"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": "ok"},
    ]
    validate_responses({"model": "m", "input": items})


def test_responses_input_of_wrong_type() -> None:
    with pytest.raises(FakeError, match="Invalid type for 'input'"):
        validate_responses({"model": "m", "input": 3})


def test_messages_trailing_tool_use_is_rejected() -> None:
    body = {
        "model": "m",
        "max_tokens": 5,
        "messages": [
            {"role": "user", "content": "x"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}],
            },
        ],
    }
    with pytest.raises(FakeError, match=r"^messages.1: `tool_use` ids were found"):
        validate_messages(body, HEADERS)


def test_messages_tool_use_must_be_answered_in_the_very_next_message() -> None:
    use = {"type": "tool_use", "id": "t1", "name": "f", "input": {}}
    result = {"type": "tool_result", "tool_use_id": "t1", "content": "r"}
    body = {
        "model": "m",
        "max_tokens": 5,
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": [use]},
            {"role": "user", "content": "wait"},
            {"role": "user", "content": [result]},
        ],
    }
    with pytest.raises(
        FakeError,
        match=r"^messages\.1: `tool_use` ids were found without `tool_result` blocks "
        r"immediately after: t1\.",
    ):
        validate_messages(body, HEADERS)


def test_count_tokens_does_not_need_max_tokens() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    validate_messages(body, HEADERS, require_max_tokens=False)
    with pytest.raises(FakeError, match="max_tokens: Field required"):
        validate_messages(body, HEADERS)


@pytest.mark.parametrize("max_tokens", ["10", 1.5, True, -1])
def test_max_tokens_must_be_a_positive_int(max_tokens: object) -> None:
    body = {"model": "m", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(FakeError, match=r"^max_tokens: "):
        validate_messages(body, HEADERS)


def test_system_string_or_text_blocks() -> None:
    base = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    validate_messages({**base, "system": "be brief"}, HEADERS)
    validate_messages({**base, "system": [{"type": "text", "text": "a"}]}, HEADERS)
    with pytest.raises(FakeError):
        validate_messages({**base, "system": 5}, HEADERS)
