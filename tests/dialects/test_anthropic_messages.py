"""Anthropic Messages: request facts (incl. a recorded Claude Code request), usage, stream."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.dialects import ANTHROPIC_MESSAGES, ErrorKind
from gateway.dialects.anthropic_messages import session_from_user_id
from tests.conftest import load_fixture
from tests.dialects.streams import named_event, split_events

CLAUDE_CODE = "claude-code-2.1.197-messages-turn4.json"


def _messages_stream(delta_usage: dict[str, Any] | None = None) -> bytes:
    message = {
        "id": "msg_01ABC",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-6",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": 12,
            "cache_creation_input_tokens": 300,
            "cache_read_input_tokens": 9000,
            "output_tokens": 1,
        },
    }
    tool = {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}}
    return b"".join(
        [
            named_event("message_start", {"message": message}),
            named_event(
                "content_block_start",
                {"index": 0, "content_block": {"type": "thinking", "thinking": ""}},
            ),
            named_event(
                "content_block_delta",
                {"index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm"}},
            ),
            named_event("content_block_stop", {"index": 0}),
            named_event("ping", {}),
            named_event(
                "content_block_start", {"index": 1, "content_block": {"type": "text", "text": ""}}
            ),
            named_event(
                "content_block_delta",
                {"index": 1, "delta": {"type": "text_delta", "text": "Let me"}},
            ),
            named_event(
                "content_block_delta",
                {"index": 1, "delta": {"type": "text_delta", "text": " look"}},
            ),
            named_event("content_block_stop", {"index": 1}),
            named_event("content_block_start", {"index": 2, "content_block": tool}),
            named_event(
                "content_block_delta",
                {
                    "index": 2,
                    "delta": {"type": "input_json_delta", "partial_json": '{"file_path":'},
                },
            ),
            named_event(
                "content_block_delta",
                {
                    "index": 2,
                    "delta": {"type": "input_json_delta", "partial_json": ' "/etc/hostname"}'},
                },
            ),
            named_event("content_block_stop", {"index": 2}),
            named_event(
                "message_delta",
                {
                    "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                    "usage": delta_usage or {"output_tokens": 87},
                },
            ),
            named_event("message_stop", {}),
        ]
    )


# -- request facts -------------------------------------------------------------------------------


def test_read_request_facts() -> None:
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": [{"type": "text", "text": "hi"}]},
        {"role": "user", "content": [{"type": "text", "text": "more"}]},
    ]
    tools = [{"name": "Read", "input_schema": {"type": "object"}}]
    body = {
        "model": "claude-sonnet-4-6",
        "max_tokens": 1024,
        "stream": True,
        "system": "be brief",
        "messages": messages,
        "tools": tools,
        "metadata": {"session_id": "s-1"},
    }
    facts = ANTHROPIC_MESSAGES.read_request(body)
    assert facts.model == "claude-sonnet-4-6"
    assert facts.stream is True
    assert facts.items == messages
    assert facts.system == ["be brief"]
    assert facts.tools == tools
    assert facts.first_user == messages[0]
    assert facts.user_turn is True
    assert facts.session_hints == {"metadata.session_id": "s-1"}


def test_system_blocks_are_kept_as_a_list() -> None:
    system = [{"type": "text", "text": "a"}, {"type": "text", "text": "b", "cache_control": {}}]
    facts = ANTHROPIC_MESSAGES.read_request({"system": system, "messages": []})
    assert facts.system == system
    assert facts.user_turn is False
    assert facts.stream is False


def test_user_turn_false_after_tool_result() -> None:
    messages = [
        {"role": "user", "content": "read it"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Read"}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "x"}]},
    ]
    assert ANTHROPIC_MESSAGES.read_request({"messages": messages}).user_turn is False


def test_user_turn_true_when_text_follows_a_tool_result() -> None:
    content = [
        {"type": "tool_result", "tool_use_id": "t1", "content": "x"},
        {"type": "text", "text": "now stop"},
    ]
    facts = ANTHROPIC_MESSAGES.read_request({"messages": [{"role": "user", "content": content}]})
    assert facts.user_turn is True


def test_user_turn_false_when_last_is_assistant_prefill() -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "{"}]
    assert ANTHROPIC_MESSAGES.read_request({"messages": messages}).user_turn is False


def test_claude_code_fixture_facts() -> None:
    recorded = load_fixture(CLAUDE_CODE)
    body = recorded["body"]
    facts = ANTHROPIC_MESSAGES.read_request(body)
    assert facts.model == body["model"]
    assert facts.stream is True
    assert facts.session_hints == {
        "metadata.user_id": recorded["headers"]["X-Claude-Code-Session-Id"]
    }
    assert facts.user_turn is False
    assert facts.items[-1]["content"][-1]["type"] == "tool_result"
    assert facts.system == body["system"]
    assert len(facts.system) == 3
    assert facts.first_user == body["messages"][0]
    assert facts.tools == body["tools"]
    uses = [
        block["id"]
        for m in facts.items
        if m["role"] == "assistant"
        for block in m["content"]
        if block["type"] == "tool_use"
    ]
    results = [
        block["tool_use_id"]
        for m in facts.items
        if m["role"] == "user" and isinstance(m["content"], list)
        for block in m["content"]
        if block["type"] == "tool_result"
    ]
    # The fixture README says 4 pairs; the recording holds 3 (turn 4 = three earlier calls).
    assert len(uses) == 3
    assert uses == results


def test_upstream_body_is_forwarded_untouched() -> None:
    raw = b'{"model":"claude-sonnet-4-6","stream":true,"messages":[]}'
    out, rewritten = ANTHROPIC_MESSAGES.upstream_body(orjson.loads(raw), raw)
    assert out is raw
    assert rewritten is False


# -- session ids in metadata.user_id -------------------------------------------------------------


def test_session_from_json_user_id() -> None:
    user_id = orjson.dumps(
        {"device_id": "ab" * 32, "account_uuid": "", "session_id": "e2421020-ab1a"}
    ).decode()
    assert session_from_user_id(user_id) == "e2421020-ab1a"


def test_session_from_legacy_user_id() -> None:
    user_id = (
        "user_8dd8e268e30a9b27d06fcd159e7499a36507ad0db5182f839fdc83b4c3df871b"
        "_account_1b4e28ba-2fa1-11d2-883f-0016d3cca427"
        "_session_6f1d0a52-9c1e-4b0e-8e57-3a2b1c0d9e8f"
    )
    assert session_from_user_id(user_id) == "6f1d0a52-9c1e-4b0e-8e57-3a2b1c0d9e8f"


def test_legacy_user_id_without_account() -> None:
    assert session_from_user_id("user_abc_account__session_s-1") == "s-1"


@pytest.mark.parametrize(
    "user_id",
    [
        "",
        "plain-user",
        "user_abc_account_def_session_",
        "{not json",
        '{"session_id": ""}',
        '{"session_id": 5}',
        '{"device_id": "x"}',
    ],
)
def test_no_session_in_user_id(user_id: str) -> None:
    assert session_from_user_id(user_id) is None


def test_legacy_user_id_becomes_a_hint() -> None:
    body = {"messages": [], "metadata": {"user_id": "user_h_account_a_session_s-42"}}
    assert ANTHROPIC_MESSAGES.read_request(body).session_hints == {"metadata.user_id": "s-42"}


# -- answers -------------------------------------------------------------------------------------


def test_read_response_input_includes_cache_tokens() -> None:
    body = {
        "id": "msg_1",
        "type": "message",
        "model": "claude-sonnet-4-6",
        "content": [{"type": "text", "text": "hi"}],
        "stop_reason": "end_turn",
        "usage": {
            "input_tokens": 10,
            "cache_creation_input_tokens": 200,
            "cache_read_input_tokens": 3000,
            "output_tokens": 25,
        },
    }
    facts = ANTHROPIC_MESSAGES.read_response(body)
    assert facts.id == "msg_1"
    assert facts.model == "claude-sonnet-4-6"
    assert facts.finish_reasons == ["end_turn"]
    assert facts.usage is not None
    assert facts.usage.input_tokens == 3210
    assert facts.usage.cache_read_tokens == 3000
    assert facts.usage.cache_creation_tokens == 200
    assert facts.usage.output_tokens == 25
    assert facts.usage.total_tokens == 3235
    assert facts.output_text == []


def test_read_response_with_null_cache_fields() -> None:
    usage = {"input_tokens": 7, "output_tokens": 3, "cache_read_input_tokens": None}
    facts = ANTHROPIC_MESSAGES.read_response({"usage": usage, "content": []})
    assert facts.usage is not None
    assert (facts.usage.input_tokens, facts.usage.cache_read_tokens) == (7, 0)
    assert facts.finish_reasons == []


def test_read_response_without_usage_keeps_content() -> None:
    content = [{"type": "text", "text": "hi"}]
    facts = ANTHROPIC_MESSAGES.read_response({"content": content, "stop_reason": "end_turn"})
    assert facts.usage is None
    assert facts.output_text == content


# -- stream observer -----------------------------------------------------------------------------


def test_observer_reads_a_whole_stream() -> None:
    observer = ANTHROPIC_MESSAGES.observe_stream(False)
    assert observer.rewrites is False
    events = split_events(_messages_stream())
    assert [observer.on_event(e) for e in events] == [e.raw for e in events]
    facts = observer.facts
    assert facts.id == "msg_01ABC"
    assert facts.model == "claude-sonnet-4-6"
    assert facts.finish_reasons == ["tool_use"]
    assert "".join(facts.generated()) == 'hmmLet me look{"file_path": "/etc/hostname"}'
    assert facts.usage is not None
    assert facts.usage.input_tokens == 12 + 300 + 9000
    assert facts.usage.cache_read_tokens == 9000
    assert facts.usage.cache_creation_tokens == 300
    assert facts.usage.output_tokens == 87
    assert facts.error is None


def test_observer_takes_restated_input_from_message_delta() -> None:
    restated = {
        "input_tokens": 12,
        "cache_creation_input_tokens": 300,
        "cache_read_input_tokens": 9500,
        "output_tokens": 90,
    }
    observer = ANTHROPIC_MESSAGES.observe_stream(False)
    for event in split_events(_messages_stream(restated)):
        observer.on_event(event)
    usage = observer.facts.usage
    assert usage is not None
    assert usage.input_tokens == 12 + 300 + 9500
    assert usage.cache_read_tokens == 9500
    assert usage.output_tokens == 90


def test_observer_message_delta_without_start_usage() -> None:
    observer = ANTHROPIC_MESSAGES.observe_stream(False)
    delta = {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 4}}
    for event in split_events(named_event("message_delta", delta)):
        observer.on_event(event)
    assert observer.facts.usage is not None
    assert observer.facts.usage.output_tokens == 4
    assert observer.facts.finish_reasons == ["end_turn"]


def test_observer_error_event() -> None:
    observer = ANTHROPIC_MESSAGES.observe_stream(False)
    raw = named_event("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}})
    [event] = split_events(raw)
    assert observer.on_event(event) == raw
    assert observer.facts.error == "overloaded_error"


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status", "type_"),
    [
        (ErrorKind.INVALID_REQUEST, 400, "invalid_request_error"),
        (ErrorKind.AUTHENTICATION, 401, "authentication_error"),
        (ErrorKind.PERMISSION, 403, "permission_error"),
        (ErrorKind.NOT_FOUND, 404, "not_found_error"),
        (ErrorKind.TOO_LARGE, 413, "request_too_large"),
        (ErrorKind.RATE_LIMIT, 429, "rate_limit_error"),
        (ErrorKind.INTERNAL, 500, "api_error"),
        (ErrorKind.UPSTREAM, 502, "api_error"),
        (ErrorKind.OVERLOADED, 529, "overloaded_error"),
    ],
)
def test_error_shape(kind: ErrorKind, status: int, type_: str) -> None:
    error = ANTHROPIC_MESSAGES.error(kind, "nope", "ignored_code")
    assert error.status == status
    assert error.body == {"type": "error", "error": {"type": type_, "message": "nope"}}


def test_user_turn_looks_past_a_trailing_system_note() -> None:
    """Claude Code (mid-conversation-system beta) may put a system note after the user's text."""
    body = {
        "messages": [
            {"role": "user", "content": "fix the bug"},
            {"role": "system", "content": "reminder: be careful"},
        ]
    }
    assert ANTHROPIC_MESSAGES.read_request(body).user_turn is True
