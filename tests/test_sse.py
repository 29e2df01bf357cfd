"""SSEParser: events survive any chunking, keep their raw bytes, and a cut leaves ``pending``."""

from __future__ import annotations

import itertools

import orjson
from hypothesis import given
from hypothesis import strategies as st

from gateway.sse import SSEEvent, SSEParser


def _data(payload: dict[str, object]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _named(name: str, payload: dict[str, object]) -> bytes:
    return f"event: {name}\n".encode() + _data(payload)


def _chat_stream() -> bytes:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o"}
    chunks = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {**base, "choices": [{"index": 0, "delta": {"content": "Héllo"}, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None},
        {**base, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}},
    ]
    return b"".join(_data(c) for c in chunks) + b": keep-alive\n\n" + b"data: [DONE]\n\n"


def _anthropic_stream() -> bytes:
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-6"}
    return b"".join(
        [
            _named("message_start", {"type": "message_start", "message": message}),
            _named("ping", {"type": "ping"}),
            _named(
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"text": "a\nb"}},
            ),
            _named("message_delta", {"type": "message_delta", "usage": {"output_tokens": 3}}),
            _named("message_stop", {"type": "message_stop"}),
        ]
    )


STREAMS = [_chat_stream(), _anthropic_stream()]
STREAMS += [s.replace(b"\n", b"\r\n") for s in STREAMS]


def _feed_all(chunks: list[bytes]) -> tuple[list[SSEEvent], bytes]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events, parser.pending


def _split(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def test_whole_chat_stream_parses_into_its_events() -> None:
    events, pending = _feed_all([_chat_stream()])
    assert pending == b""
    assert [e.data[:1] for e in events] == [b"{", b"{", b"{", b"{", b"", b"["]
    assert events[-1].data == b"[DONE]"
    assert orjson.loads(events[3].data)["usage"] == {"prompt_tokens": 9, "completion_tokens": 2}
    # The relay can put the stream back together from the events' raw bytes.
    assert b"".join(e.raw for e in events) == _chat_stream()


def test_whole_anthropic_stream_keeps_event_names() -> None:
    events, pending = _feed_all([_anthropic_stream()])
    assert pending == b""
    assert [e.event for e in events] == [
        "message_start",
        "ping",
        "content_block_delta",
        "message_delta",
        "message_stop",
    ]
    assert orjson.loads(events[2].data)["delta"]["text"] == "a\nb"
    assert b"".join(e.raw for e in events) == _anthropic_stream()


def test_every_single_cut_point_gives_the_same_events() -> None:
    for stream in STREAMS:
        whole, _ = _feed_all([stream])
        for cut in range(len(stream) + 1):
            events, pending = _feed_all([stream[:cut], stream[cut:]])
            assert events == whole, (stream[:40], cut)
            assert pending == b""


def test_byte_by_byte_feeding_gives_the_same_events() -> None:
    for stream in STREAMS:
        whole, _ = _feed_all([stream])
        events, pending = _feed_all([stream[i : i + 1] for i in range(len(stream))])
        assert events == whole
        assert pending == b""


@given(
    stream=st.sampled_from(STREAMS),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=40),
)
def test_random_chunking_is_invisible(stream: bytes, cuts: list[int]) -> None:
    whole, _ = _feed_all([stream])
    events, pending = _feed_all(_split(stream, [c % (len(stream) + 1) for c in cuts]))
    assert events == whole
    assert b"".join(e.raw for e in events) == b"".join(e.raw for e in whole)
    assert pending == b""


def test_crlf_line_endings_give_the_same_data_as_lf() -> None:
    lf, _ = _feed_all([_anthropic_stream()])
    crlf, _ = _feed_all([_anthropic_stream().replace(b"\n", b"\r\n")])
    assert [(e.event, e.data) for e in crlf] == [(e.event, e.data) for e in lf]
    assert all(b"\r" not in e.data for e in crlf)


def test_crlf_split_between_cr_and_lf() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: x\r\n\r") == []
    assert parser.feed(b"\ndata: y\r") == [SSEEvent(None, b"x", b"data: x\n\n")]
    assert parser.feed(b"\n\r\n") == [SSEEvent(None, b"y", b"data: y\n\n")]
    assert parser.pending == b""


def test_multi_line_data_joins_with_newlines() -> None:
    [event] = SSEParser().feed(b"event: e\ndata: first\ndata:second\ndata:  third\n\n")
    assert event.event == "e"
    # One leading space is dropped, no more; a missing space is fine.
    assert event.data == b"first\nsecond\n third"


def test_comments_are_ignored_inside_an_event() -> None:
    [event] = SSEParser().feed(b": note\ndata: {}\n: another\nid: 7\nretry: 10\n\n")
    assert event.event is None
    assert event.data == b"{}"
    assert event.raw == b": note\ndata: {}\n: another\nid: 7\nretry: 10\n\n"


def test_comment_only_block_is_an_event_without_data() -> None:
    events = SSEParser().feed(b": ping\n\ndata: 1\n\n")
    assert events == [SSEEvent(None, b"", b": ping\n\n"), SSEEvent(None, b"1", b"data: 1\n\n")]


def test_event_without_data_keeps_its_name() -> None:
    [event] = SSEParser().feed(b"event: ping\n\n")
    assert (event.event, event.data) == ("ping", b"")


def test_pending_holds_a_cut_event() -> None:
    parser = SSEParser()
    assert parser.pending == b""
    events = parser.feed(b'data: {"a":1}\n\ndata: {"b"')
    assert [e.data for e in events] == [b'{"a":1}']
    assert parser.pending == b'data: {"b"'
    assert parser.feed(b":2}\n") == []
    assert parser.pending == b'data: {"b":2}\n'
    assert [e.data for e in parser.feed(b"\n")] == [b'{"b":2}']
    assert parser.pending == b""


def test_pending_after_a_cut_crlf_stream_is_normalised() -> None:
    parser = SSEParser()
    assert parser.feed(b"event: x\r\ndata: 1") == []
    assert parser.pending == b"event: x\ndata: 1"


def test_empty_chunk_changes_nothing() -> None:
    parser = SSEParser()
    parser.feed(b"data: 1")
    assert parser.feed(b"") == []
    assert parser.pending == b"data: 1"
