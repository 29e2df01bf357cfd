"""OpenAI Responses: request facts (incl. recorded Codex requests), usage, stream observer."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.dialects import OPENAI_RESPONSES, ErrorKind
from tests.conftest import load_fixture
from tests.dialects.streams import named_event, split_events

USAGE = {
    "input_tokens": 5000,
    "input_tokens_details": {"cached_tokens": 4096},
    "output_tokens": 700,
    "output_tokens_details": {"reasoning_tokens": 512},
    "total_tokens": 5700,
}


def _response(status: str, usage: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "id": "resp_123",
        "object": "response",
        "created_at": 1760000000,
        "status": status,
        "model": "gpt-5-codex",
        "output": [],
        "usage": usage,
        "error": None,
    }


def _responses_stream() -> bytes:
    item = {"id": "msg_1", "type": "message", "role": "assistant", "content": []}
    call = {"id": "fc_1", "type": "function_call", "name": "exec_command", "call_id": "call_1"}
    return b"".join(
        [
            named_event(
                "response.created",
                {"sequence_number": 0, "response": _response("in_progress", None)},
            ),
            named_event(
                "response.in_progress",
                {"sequence_number": 1, "response": _response("in_progress", None)},
            ),
            named_event("response.output_item.added", {"output_index": 0, "item": item}),
            named_event("response.output_text.delta", {"item_id": "msg_1", "delta": "Hello"}),
            named_event("response.output_text.delta", {"item_id": "msg_1", "delta": " there"}),
            named_event("response.output_text.done", {"item_id": "msg_1", "text": "Hello there"}),
            named_event("response.output_item.added", {"output_index": 1, "item": call}),
            named_event(
                "response.function_call_arguments.delta", {"item_id": "fc_1", "delta": '{"cmd"'}
            ),
            named_event(
                "response.function_call_arguments.delta", {"item_id": "fc_1", "delta": ': "ls"}'}
            ),
            named_event(
                "response.completed",
                {"sequence_number": 9, "response": _response("completed", USAGE)},
            ),
        ]
    )


# -- request facts -------------------------------------------------------------------------------


def test_read_request_facts() -> None:
    items = [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "d"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "first"}]},
        {"type": "function_call", "name": "ls", "arguments": "{}", "call_id": "c1"},
        {"type": "function_call_output", "call_id": "c1", "output": "a.txt"},
        {"role": "user", "content": "next"},
    ]
    tools = [{"type": "function", "name": "ls", "parameters": {}}]
    body = {
        "model": "gpt-5",
        "stream": True,
        "instructions": "You are Codex.",
        "input": items,
        "tools": tools,
        "prompt_cache_key": "pck-9",
    }
    facts = OPENAI_RESPONSES.read_request(body)
    assert facts.model == "gpt-5"
    assert facts.stream is True
    assert facts.items == items
    assert facts.system == ["You are Codex.", items[0]]
    assert facts.tools == tools
    assert facts.first_user == items[1]
    assert facts.user_turn is True  # an item without "type" is a message
    assert facts.session_hints == {"prompt_cache_key": "pck-9"}


def test_string_input_is_one_user_message() -> None:
    facts = OPENAI_RESPONSES.read_request({"model": "gpt-5", "input": "hello"})
    assert facts.items == [{"type": "message", "role": "user", "content": "hello"}]
    assert facts.first_user == facts.items[0]
    assert facts.user_turn is True
    assert facts.stream is False


def test_user_turn_false_after_function_call_output() -> None:
    facts = OPENAI_RESPONSES.read_request(
        {
            "input": [
                {"role": "user", "content": "go"},
                {"type": "function_call", "name": "ls", "arguments": "{}", "call_id": "c1"},
                {"type": "function_call_output", "call_id": "c1", "output": "x"},
            ]
        }
    )
    assert facts.user_turn is False
    assert facts.first_user == {"role": "user", "content": "go"}


def test_codex_turn1_facts() -> None:
    recorded = load_fixture("codex-0.169.0-responses-turn1.json")
    body = recorded["body"]
    facts = OPENAI_RESPONSES.read_request(body)
    assert facts.model == "gpt-5-codex"
    assert facts.stream is True
    assert facts.user_turn is True
    assert facts.session_hints["prompt_cache_key"] == recorded["headers"]["session-id"]
    assert [t["name"] for t in facts.tools if t.get("type") == "function"] == [
        t["name"] for t in body["tools"] if t.get("type") == "function"
    ]
    assert facts.first_user is not None
    assert facts.first_user["role"] == "user"
    assert facts.first_user is next(i for i in body["input"] if i.get("role") == "user")
    assert all(s["role"] == "developer" for s in facts.system)
    assert len(facts.system) == sum(1 for i in body["input"] if i.get("role") == "developer")


@pytest.mark.parametrize(
    "name", ["codex-0.169.0-responses-turn3.json", "codex-0.169.0-responses-turn268.json"]
)
def test_codex_later_turns_are_not_user_turns(name: str) -> None:
    recorded = load_fixture(name)
    facts = OPENAI_RESPONSES.read_request(recorded["body"])
    assert facts.user_turn is False
    assert facts.items[-1]["type"] == "function_call_output"
    assert facts.session_hints == {"prompt_cache_key": recorded["headers"]["session-id"]}


def test_codex_first_user_is_stable_across_turns() -> None:
    turn1 = OPENAI_RESPONSES.read_request(
        load_fixture("codex-0.169.0-responses-turn1.json")["body"]
    )
    turn3 = OPENAI_RESPONSES.read_request(
        load_fixture("codex-0.169.0-responses-turn3.json")["body"]
    )
    assert turn1.first_user == turn3.first_user
    assert turn1.system == turn3.system
    assert len(turn3.items) == len(turn1.items) + 4  # two call/output pairs


def test_upstream_body_is_forwarded_untouched() -> None:
    raw = b'{"model":"gpt-5","stream":true,"input":"hi"}'
    out, rewritten = OPENAI_RESPONSES.upstream_body(orjson.loads(raw), raw)
    assert out is raw
    assert rewritten is False


# -- answers -------------------------------------------------------------------------------------


def test_read_response_usage() -> None:
    body = _response("completed", USAGE)
    body["output"] = [{"type": "message", "content": [{"type": "output_text", "text": "hi"}]}]
    facts = OPENAI_RESPONSES.read_response(body)
    assert facts.id == "resp_123"
    assert facts.model == "gpt-5-codex"
    assert facts.finish_reasons == ["completed"]
    assert facts.usage is not None
    assert facts.usage.input_tokens == 5000
    assert facts.usage.cache_read_tokens == 4096
    assert facts.usage.output_tokens == 700
    assert facts.usage.reasoning_tokens == 512
    assert facts.usage.cache_creation_tokens == 0
    assert facts.output_text == []
    assert facts.error is None


def test_read_response_without_usage_keeps_output() -> None:
    body = _response("incomplete", None)
    body["output"] = [{"type": "message", "content": [{"type": "output_text", "text": "hi"}]}]
    facts = OPENAI_RESPONSES.read_response(body)
    assert facts.usage is None
    assert facts.finish_reasons == ["incomplete"]
    assert facts.output_text == body["output"]


def test_decode_response_reads_the_answer_without_its_echoed_request() -> None:
    body = _response("completed", USAGE)
    body["instructions"] = "long instructions " * 500
    body["tools"] = [{"type": "function", "name": f"tool{i}", "parameters": {}} for i in range(50)]
    body["output"] = [{"type": "message", "content": [{"type": "output_text", "text": "hi"}]}]

    decoded = OPENAI_RESPONSES.decode_response(orjson.dumps(body))
    assert decoded is not None
    assert "tools" not in decoded and "instructions" not in decoded
    facts = OPENAI_RESPONSES.read_response(decoded)
    assert (facts.id, facts.model) == ("resp_123", "gpt-5-codex")
    assert facts.finish_reasons == ["completed"]
    assert facts.usage == OPENAI_RESPONSES.read_response(body).usage
    for junk in (b"not json", b"[1, 2]", b'"text"', b'{"usage": "lots"'):
        assert OPENAI_RESPONSES.decode_response(junk) is None


# -- stream observer -----------------------------------------------------------------------------


def test_observer_reads_a_whole_stream() -> None:
    observer = OPENAI_RESPONSES.observe_stream(False)
    assert observer.rewrites is False
    events = split_events(_responses_stream())
    assert [observer.on_event(e) for e in events] == [e.raw for e in events]
    facts = observer.facts
    assert facts.id == "resp_123"
    assert facts.model == "gpt-5-codex"
    assert facts.finish_reasons == ["completed"]
    assert "".join(facts.generated()) == 'Hello there{"cmd": "ls"}'
    assert facts.usage is not None
    assert (facts.usage.input_tokens, facts.usage.output_tokens) == (5000, 700)
    assert (facts.usage.cache_read_tokens, facts.usage.reasoning_tokens) == (4096, 512)


def test_observer_after_created_only() -> None:
    observer = OPENAI_RESPONSES.observe_stream(True)
    first = split_events(_responses_stream())[0]
    observer.on_event(first)
    assert observer.facts.id == "resp_123"
    assert observer.facts.finish_reasons == []  # in_progress is not a finish
    assert observer.facts.usage is None


def test_observer_reads_type_when_event_name_is_missing() -> None:
    observer = OPENAI_RESPONSES.observe_stream(False)
    payload = {"type": "response.completed", "response": _response("completed", USAGE)}
    [event] = split_events(b"data: " + orjson.dumps(payload) + b"\n\n")
    observer.on_event(event)
    assert observer.facts.usage is not None
    assert observer.facts.usage.total_tokens == 5700


def test_observer_failed_response_records_error() -> None:
    observer = OPENAI_RESPONSES.observe_stream(False)
    failed = _response("failed", None)
    failed["error"] = {"code": "server_error", "message": "boom"}
    for event in split_events(named_event("response.failed", {"response": failed})):
        observer.on_event(event)
    assert observer.facts.error == "server_error"
    assert observer.facts.finish_reasons == ["failed"]


def test_observer_error_event() -> None:
    observer = OPENAI_RESPONSES.observe_stream(False)
    raw = named_event(
        "error", {"code": "rate_limit_exceeded", "message": "slow down", "param": None}
    )
    [event] = split_events(raw)
    assert observer.on_event(event) == raw
    assert observer.facts.error == "rate_limit_exceeded"


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        (ErrorKind.INVALID_REQUEST, 400),
        (ErrorKind.AUTHENTICATION, 401),
        (ErrorKind.TOO_LARGE, 413),
        (ErrorKind.RATE_LIMIT, 429),
        (ErrorKind.UPSTREAM, 502),
        (ErrorKind.OVERLOADED, 503),
    ],
)
def test_error_shape(kind: ErrorKind, status: int) -> None:
    error = OPENAI_RESPONSES.error(kind, "nope", "some_code")
    assert error.status == status
    assert set(error.body) == {"error"}
    assert set(error.body["error"]) == {"message", "type", "param", "code"}
    assert error.body["error"]["message"] == "nope"
    assert error.body["error"]["code"] == "some_code"
    assert error.body["error"]["param"] is None


def test_observer_relays_a_response_event_of_an_unexpected_shape() -> None:
    observer = OPENAI_RESPONSES.observe_stream(False)
    payload = {"type": "response.completed", "response": "not an object"}
    [event] = split_events(named_event("response.completed", payload))
    assert observer.on_event(event) == event.raw
    assert observer.facts.usage is None and observer.facts.id is None


def test_items_of_unexpected_types_are_read_as_unknown() -> None:
    """A ``type`` or ``call_id`` that is an object or a list (the API refuses it) once raised
    ``TypeError: unhashable`` in the gateway, a 500; it now matches no known type."""
    items = [
        {"role": "user", "content": "hi"},
        {"type": {"a": 1}},
        {"type": ["function_call"], "call_id": "c"},
        {"type": "function_call", "call_id": [1], "name": {"n": 1}, "arguments": 5},
        {"type": "function_call_output", "call_id": {"c": 2}, "output": "x" * 5000},
        7,
    ]
    history = OPENAI_RESPONSES.history
    layout = history.layout(items)
    assert layout.units[0] == (0, 1) and layout.units[-1][1] == len(items)
    assert history.elide(items[1], 10) is None
    assert history.elide(items[4], 10) is not None
    facts = OPENAI_RESPONSES.read_request({"model": "gpt-5", "input": items, "tools": [{}]})
    assert [len(s.raw) for s in OPENAI_RESPONSES.tool_call_turns(facts)] == []
