"""OpenAI Chat Completions: request facts, the include_usage splice, usage, stream observer."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.dialects import OPENAI_CHAT, ErrorKind
from tests.dialects.streams import split_events

INCLUDE_USAGE = b'"stream_options":{"include_usage":true}'


def _sse(chunk: dict[str, Any] | str) -> bytes:
    data = chunk.encode() if isinstance(chunk, str) else orjson.dumps(chunk)
    return b"data: " + data + b"\n\n"


def _chat_stream(usage_nulls: bool = True, tool_call: bool = False) -> bytes:
    """What api.openai.com sends with include_usage: usage null on each chunk, then a usage
    chunk whose choices is empty, then [DONE]."""
    base = {
        "id": "chatcmpl-abc",
        "object": "chat.completion.chunk",
        "created": 1760000000,
        "model": "gpt-4o-2024-08-06",
        "system_fingerprint": "fp_1",
    }
    extra: dict[str, Any] = {"usage": None} if usage_nulls else {}
    deltas: list[dict[str, Any]] = [
        {"role": "assistant", "content": "", "refusal": None},
        {"content": "Hello"},
        {"content": " world"},
    ]
    if tool_call:
        call = {"index": 0, "id": "call_1", "type": "function"}
        deltas.append({"tool_calls": [{**call, "function": {"name": "ls", "arguments": ""}}]})
        deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": '{"p":1}'}}]})
    chunks = [
        {**base, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}]}
        | extra
        for d in deltas
    ]
    reason = "tool_calls" if tool_call else "stop"
    chunks.append(
        {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}]}
        | extra
    )
    usage = {
        "prompt_tokens": 120,
        "completion_tokens": 30,
        "total_tokens": 150,
        "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 12, "audio_tokens": 0},
    }
    chunks.append({**base, "choices": [], "usage": usage})
    return b"".join(_sse(c) for c in chunks) + _sse("[DONE]")


# -- request facts -------------------------------------------------------------------------------


def test_read_request_facts() -> None:
    tools = [{"type": "function", "function": {"name": "ls", "parameters": {}}}]
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "developer", "content": "use tools"},
        {"role": "user", "content": "list files"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
        {"role": "tool", "tool_call_id": "c1", "content": "a.txt"},
        {"role": "user", "content": "thanks"},
    ]
    body = {
        "model": "gpt-4o",
        "stream": True,
        "messages": messages,
        "tools": tools,
        "prompt_cache_key": "pck-1",
        "user": "u-1",
        "metadata": {"session_id": "meta-1"},
    }
    facts = OPENAI_CHAT.read_request(body)
    assert facts.model == "gpt-4o"
    assert facts.stream is True
    assert facts.items == messages
    assert facts.system == messages[:2]
    assert facts.tools == tools
    assert facts.first_user == messages[2]
    assert facts.user_turn is True
    assert facts.session_hints == {
        "prompt_cache_key": "pck-1",
        "user": "u-1",
        "metadata.session_id": "meta-1",
    }


def test_user_turn_false_after_tool_result() -> None:
    body = {
        "model": "gpt-4o",
        "messages": [
            {"role": "user", "content": "list files"},
            {"role": "assistant", "tool_calls": [{"id": "c1"}]},
            {"role": "tool", "tool_call_id": "c1", "content": "a.txt"},
        ],
    }
    facts = OPENAI_CHAT.read_request(body)
    assert facts.user_turn is False
    assert facts.stream is False
    assert facts.session_hints == {}


@pytest.mark.parametrize("stream", [None, False, "true", 1])
def test_stream_only_when_literally_true(stream: Any) -> None:
    assert OPENAI_CHAT.read_request({"stream": stream, "messages": []}).stream is False


def test_read_request_tolerates_junk() -> None:
    facts = OPENAI_CHAT.read_request({"model": 5, "messages": "hi", "tools": {}})
    assert facts.model is None
    assert facts.items == []
    assert facts.tools == []
    assert facts.user_turn is False
    assert facts.first_user is None


# -- upstream body -------------------------------------------------------------------------------


def test_non_stream_body_is_forwarded_untouched() -> None:
    raw = b'{"model": "gpt-4o", "messages": []}'
    out, rewritten = OPENAI_CHAT.upstream_body(orjson.loads(raw), raw)
    assert out is raw
    assert rewritten is False


def test_stream_with_include_usage_is_forwarded_untouched() -> None:
    raw = b'{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[]}'
    out, rewritten = OPENAI_CHAT.upstream_body(orjson.loads(raw), raw)
    assert out == raw
    assert rewritten is False


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}',
        b'{\n  "model": "gpt-4o",\n  "stream": true,\n  "messages": [],\n  "n": 1.50\n}\n',
        b'  {"stream":true}',
        b'{"stream":true,"messages":[{"role":"user","content":"{\\"x\\": \\"\xc3\xa9\\"}"}]}',
    ],
)
def test_stream_without_options_gets_include_usage_spliced(raw: bytes) -> None:
    body = orjson.loads(raw)
    out, rewritten = OPENAI_CHAT.upstream_body(body, raw)
    assert rewritten is True
    assert orjson.loads(out) == {**body, "stream_options": {"include_usage": True}}
    brace = raw.index(b"{") + 1
    assert out[:brace] == raw[:brace]
    assert out[brace : brace + len(INCLUDE_USAGE)] == INCLUDE_USAGE
    rest = out[brace + len(INCLUDE_USAGE) :]
    # Every byte the client sent is still there, in order, after an optional comma.
    assert rest.removeprefix(b",") == raw[brace:]


def test_stream_with_include_usage_false_gets_it_set_true() -> None:
    raw = (
        b'{"model":"gpt-4o","stream":true,'
        b'"stream_options":{"include_usage":false,"include_obfuscation":false},"messages":[]}'
    )
    body = orjson.loads(raw)
    out, rewritten = OPENAI_CHAT.upstream_body(body, raw)
    assert rewritten is True
    assert orjson.loads(out) == {
        **body,
        "stream_options": {"include_usage": True, "include_obfuscation": False},
    }
    assert body["stream_options"]["include_usage"] is False  # the parsed body is not mutated


def test_stream_with_empty_options_gets_include_usage() -> None:
    raw = b'{"stream":true,"stream_options":{}}'
    out, rewritten = OPENAI_CHAT.upstream_body(orjson.loads(raw), raw)
    assert rewritten is True
    assert orjson.loads(out)["stream_options"] == {"include_usage": True}


def test_stream_with_null_options_gets_include_usage() -> None:
    # Some clients serialise an unset field as null. The body sent upstream must ask for usage
    # (and must not hold two "stream_options" keys, where the last one wins).
    raw = b'{"model":"gpt-4o","stream":true,"stream_options":null,"messages":[]}'
    out, rewritten = OPENAI_CHAT.upstream_body(orjson.loads(raw), raw)
    assert rewritten is True
    assert out.count(b'"stream_options"') == 1
    assert orjson.loads(out)["stream_options"] == {"include_usage": True}


# -- answers -------------------------------------------------------------------------------------


def test_read_response_usage_with_cached_and_reasoning_tokens() -> None:
    body = {
        "id": "chatcmpl-1",
        "model": "o3-2025-04-16",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": 2006,
            "completion_tokens": 300,
            "total_tokens": 2306,
            "prompt_tokens_details": {"cached_tokens": 1920},
            "completion_tokens_details": {"reasoning_tokens": 256},
        },
    }
    facts = OPENAI_CHAT.read_response(body)
    assert facts.id == "chatcmpl-1"
    assert facts.model == "o3-2025-04-16"
    assert facts.finish_reasons == ["stop"]
    assert facts.usage is not None
    assert facts.usage.input_tokens == 2006  # cached tokens are part of prompt_tokens
    assert facts.usage.cache_read_tokens == 1920
    assert facts.usage.output_tokens == 300
    assert facts.usage.reasoning_tokens == 256
    assert facts.usage.total_tokens == 2306
    assert facts.usage.estimated is False
    assert facts.output_text == []


def test_read_response_without_usage_keeps_output_for_estimation() -> None:
    message = {"role": "assistant", "content": "hello there"}
    facts = OPENAI_CHAT.read_response({"choices": [{"message": message, "finish_reason": "stop"}]})
    assert facts.usage is None
    assert facts.output_text == [message]


# -- stream observer -----------------------------------------------------------------------------


def test_observer_not_rewritten_passes_every_event_and_reads_usage() -> None:
    observer = OPENAI_CHAT.observe_stream(False)
    assert observer.rewrites is False
    events = split_events(_chat_stream())
    out = [observer.on_event(e) for e in events]
    assert out == [e.raw for e in events]
    facts = observer.facts
    assert facts.id == "chatcmpl-abc"
    assert facts.model == "gpt-4o-2024-08-06"
    assert facts.finish_reasons == ["stop"]
    assert "".join(facts.generated()) == "Hello world"
    assert facts.usage is not None
    assert (facts.usage.input_tokens, facts.usage.output_tokens) == (120, 30)
    assert (facts.usage.cache_read_tokens, facts.usage.reasoning_tokens) == (64, 12)


def test_observer_rewritten_hides_what_the_gateway_asked_for() -> None:
    observer = OPENAI_CHAT.observe_stream(True)
    assert observer.rewrites is True
    events = split_events(_chat_stream())
    out = [observer.on_event(e) for e in events]
    # The usage-only chunk (choices == []) is dropped; [DONE] passes as is.
    assert out[-2] is None
    assert out[-1] == b"data: [DONE]\n\n"
    for sent, event in zip(out[:-2], events[:-2], strict=True):
        assert sent is not None
        assert b'"usage"' not in sent
        assert sent == event.raw.replace(b',"usage":null', b"")
        original = orjson.loads(event.data)
        del original["usage"]
        assert orjson.loads(sent.removeprefix(b"data: ")) == original
    assert observer.facts.usage is not None
    assert observer.facts.usage.total_tokens == 150


def test_observer_rewritten_removes_spaced_usage_null() -> None:
    observer = OPENAI_CHAT.observe_stream(True)
    raw = b'data: {"id": "c1", "choices": [{"delta": {"content": "x"}}], "usage": null}\n\n'
    [event] = split_events(raw)
    sent = observer.on_event(event)
    assert sent == b'data: {"id": "c1", "choices": [{"delta": {"content": "x"}}]}\n\n'


def test_observer_rewritten_without_usage_nulls_changes_nothing() -> None:
    observer = OPENAI_CHAT.observe_stream(True)
    events = split_events(_chat_stream(usage_nulls=False))
    out = [observer.on_event(e) for e in events]
    assert out[:-2] == [e.raw for e in events[:-2]]
    assert out[-2] is None


def test_observer_collects_tool_call_arguments() -> None:
    observer = OPENAI_CHAT.observe_stream(False)
    for event in split_events(_chat_stream(tool_call=True)):
        observer.on_event(event)
    assert observer.facts.finish_reasons == ["tool_calls"]
    assert "".join(observer.facts.generated()) == 'Hello world{"p":1}'


def test_observer_records_an_error_chunk() -> None:
    observer = OPENAI_CHAT.observe_stream(False)
    [event] = split_events(_sse({"error": {"message": "boom", "code": "server_error"}}))
    assert observer.on_event(event) == event.raw
    assert observer.facts.error == "server_error"
    assert observer.facts.usage is None


def test_observer_passes_non_json_events() -> None:
    observer = OPENAI_CHAT.observe_stream(True)
    for raw in (b": keep-alive\n\n", b"data: not json\n\n", b"data: [1, 2]\n\n"):
        [event] = split_events(raw)
        assert observer.on_event(event) == raw
    assert observer.facts.id is None


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status", "type_", "code"),
    [
        (ErrorKind.INVALID_REQUEST, 400, "invalid_request_error", None),
        (ErrorKind.AUTHENTICATION, 401, "invalid_request_error", "invalid_api_key"),
        (ErrorKind.PERMISSION, 403, "invalid_request_error", None),
        (ErrorKind.NOT_FOUND, 404, "invalid_request_error", None),
        (ErrorKind.TOO_LARGE, 413, "invalid_request_error", None),
        (ErrorKind.RATE_LIMIT, 429, "requests", "rate_limit_exceeded"),
        (ErrorKind.INTERNAL, 500, "server_error", None),
        (ErrorKind.UPSTREAM, 502, "server_error", None),
        (ErrorKind.OVERLOADED, 503, "server_error", None),
    ],
)
def test_error_shape(kind: ErrorKind, status: int, type_: str, code: str | None) -> None:
    error = OPENAI_CHAT.error(kind, "nope")
    assert error.status == status
    assert error.body == {"error": {"message": "nope", "type": type_, "param": None, "code": code}}


def test_error_code_override() -> None:
    error = OPENAI_CHAT.error(ErrorKind.INVALID_REQUEST, "too long", "context_length_exceeded")
    assert error.body["error"]["code"] == "context_length_exceeded"
    assert error.status == 400
