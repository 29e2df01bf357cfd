"""Envelopes: small fields decoded, big arrays kept raw and decoded one element at a time."""

from __future__ import annotations

import msgspec
import orjson
import pytest

from gateway.dialects import ANTHROPIC_MESSAGES, OPENAI_CHAT, OPENAI_RESPONSES
from gateway.dialects.envelope import EnvelopeError, Items, load_json


def test_items_decode_only_what_is_read() -> None:
    messages = [{"role": "user", "content": f"m{i}"} for i in range(50)]
    body = OPENAI_CHAT.decode(orjson.dumps({"model": "gpt-4o", "messages": messages}))
    items = body.get("messages")
    assert isinstance(items, Items) and len(items) == 50
    assert items[-1] == messages[-1]
    unread = sum(1 for value in items._decoded if value is not items._decoded[0])
    assert unread == 1  # only the last one was decoded
    assert items == messages  # reading all of them gives the same list
    assert items[1:3] == messages[1:3]


def test_get_and_contains_follow_the_body() -> None:
    body = OPENAI_CHAT.decode(b'{"model": "m", "stream_options": null, "messages": []}')
    assert body.get("model") == "m"
    assert "stream_options" in body and body.get("stream_options") is None
    assert "stream" not in body and body.get("stream", False) is False
    assert body.get("messages") == []


@pytest.mark.parametrize("dialect", [OPENAI_CHAT, OPENAI_RESPONSES, ANTHROPIC_MESSAGES])
@pytest.mark.parametrize("raw", [b'{"model": "m", "messages": [', b"[1, 2]", b"not json", b""])
def test_what_is_not_a_request_object_is_refused(dialect: object, raw: bytes) -> None:
    with pytest.raises(EnvelopeError):
        dialect.decode(raw)  # type: ignore[attr-defined]


def test_responses_input_may_be_a_string() -> None:
    body = OPENAI_RESPONSES.decode(b'{"model": "gpt-5", "input": "hello"}')
    facts = OPENAI_RESPONSES.read_request(body)
    assert facts.user_turn and facts.items[0]["content"] == "hello"


def test_envelope_and_dict_give_the_same_facts() -> None:
    body = {
        "model": "claude-sonnet-4-6",
        "system": [{"type": "text", "text": "be brief"}],
        "messages": [{"role": "user", "content": "hi"}],
        "metadata": {"user_id": '{"session_id": "s1"}'},
        "max_tokens": 10,
    }
    from_dict = ANTHROPIC_MESSAGES.read_request(body)
    from_envelope = ANTHROPIC_MESSAGES.read_request(ANTHROPIC_MESSAGES.decode(orjson.dumps(body)))
    assert from_envelope.system == from_dict.system
    assert from_envelope.items == from_dict.items
    assert from_envelope.session_hints == from_dict.session_hints == {"metadata.user_id": "s1"}
    assert from_envelope.max_output_tokens == from_dict.max_output_tokens == 10


# -- bodies that could fail later are refused in the one scan ---------------------------------
@pytest.mark.parametrize(
    "raw",
    [
        b'{"messages":' + b"[" * 1000 + b"]" * 1000 + b"}",
        b'{"metadata":' + b'{"a":' * 1000 + b"1" + b"}" * 1001,
        b'{"messages":[{"role":"user","content":"\xff"}]}',
        b'{"model":"gpt-\xc3"}',
        b'{"messages":[{"content":"\\ud800"}]}',
    ],
    ids=[
        "nested history",
        "nested field",
        "bad UTF-8 in an item",
        "bad UTF-8 in a field",
        "surrogate",
    ],
)
def test_what_could_fail_later_is_refused_now(raw: bytes) -> None:
    for dialect in (OPENAI_CHAT, OPENAI_RESPONSES, ANTHROPIC_MESSAGES):
        with pytest.raises(EnvelopeError):
            dialect.decode(raw)


def test_an_item_only_orjson_refuses_is_still_read() -> None:
    """msgspec accepts a number past a double's range; orjson alone refuses it."""
    items = Items([msgspec.Raw(b'{"n":1e400,"big":123456789012345678901234567890,"k":-5}')])
    assert items[0] == {"n": float("inf"), "big": 1.2345678901234568e29, "k": -5}
    assert load_json(b"[18446744073709551615]") == [18446744073709551615]
