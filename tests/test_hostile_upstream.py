"""A hostile or broken upstream: events too large to hold, answers too large to want, streams
that never end. The gateway's memory stays bounded, the client always gets an end (the whole
stream, a clean cut, or a provider-shaped 502), and the turn is accounted.

The upstream here is a small aiohttp app on loopback written for each case, not the fake
provider: it sends what no provider should.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st

from gateway.app import create_app
from gateway.appkeys import STORE
from gateway.settings import Settings, Timeouts
from gateway.sse import MAX_EVENT_BYTES, SSEEvent, SSEParser

MiB = 1024 * 1024
CHUNK = 64 * 1024
HUGE = 4 * MAX_EVENT_BYTES
"""An event four times the bound: held whole (or joined again per chunk), it would show."""
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- the parser alone ----------------------------------------------------------------------------
def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def _feed(parser: SSEParser, chunks: list[bytes]) -> list[SSEEvent]:
    return [event for chunk in chunks for event in parser.feed(chunk)]


SMALL = [b'data: {"n":1}\n\n', b"event: ping\ndata: {}\n\n", b": comment\n\n"]
AFTER = [b'event: message_delta\ndata: {"usage":{"output_tokens":42}}\n\n', b"data: [DONE]\n\n"]


@given(
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    most=st.integers(1, 256),
    size=st.integers(600, 3000),
    crlf=st.booleans(),
    hand_back=st.booleans(),
)
def test_an_event_past_the_bound_is_skipped_and_reading_resumes_after_it(
    cuts: list[int], most: int, size: int, crlf: bool, hand_back: bool
) -> None:
    """Whatever the chunking (chunks of at most ``most`` bytes: the bound is on what the
    parser holds, a chunk is the reader's) and line ends: the events around an oversized one
    are read as they are, the oversized one is not, and (handed back) every byte is given
    back in order."""
    huge = b"event: content_block_delta\ndata: " + b"x" * size + b"\n\n"
    stream = b"".join([*SMALL, huge, *AFTER])
    if crlf:
        stream = stream.replace(b"\n", b"\r\n")
    parser = SSEParser(limit=256, hand_back=hand_back)
    events = _feed(parser, _chunks(stream, [*cuts, *range(0, len(stream), most)]))
    read = [e for e in events if e.data or e.event]
    assert [e.raw for e in read] == [*SMALL[:2], *AFTER]
    assert parser.oversized == 1 and parser.pending == b""
    if hand_back:
        given_back = b"".join(e.raw for e in events)
        assert given_back.replace(b"\r\n", b"\n") == stream.replace(b"\r\n", b"\n")
    else:
        assert [e.raw for e in events] == [*SMALL, *AFTER]


def test_events_under_the_bound_are_read_whole_however_long() -> None:
    """Past the point where a partial event is collected apart, an event under the bound is
    still read whole, its bytes unchanged."""
    big = b'data: {"text":"' + b"y" * (300 * 1024) + b'"}\n\n'
    parser = SSEParser()
    events = _feed(parser, [*_chunks(SMALL[0] + big, list(range(0, len(big), 1000))), AFTER[0]])
    assert [e.raw for e in events] == [SMALL[0], big, AFTER[0]]
    assert parser.oversized == 0


@contextmanager
def peak_memory() -> Iterator[list[int]]:
    """The peak of Python allocations made inside the block, in bytes (``[peak]`` after)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    result: list[int] = []
    try:
        yield result
    finally:
        result.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


@pytest.mark.parametrize("hand_back", [False, True])
def test_the_parser_holds_at_most_its_bound(hand_back: bool) -> None:
    limit = MiB
    chunk = b"z" * CHUNK
    parser = SSEParser(limit=limit, hand_back=hand_back)
    with peak_memory() as peak:
        parser.feed(b"data: ")
        for _ in range(32 * MiB // CHUNK):
            for event in parser.feed(chunk):
                del event
        events = parser.feed(b"\n\n" + AFTER[0])
    assert [e.raw for e in events if e.event] == [AFTER[0]]
    assert peak[0] < 3 * limit + 4 * CHUNK, peak[0]


# -- through the gateway -------------------------------------------------------------------------
@pytest.fixture
async def hostile(
    aiohttp_server: Any, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[TestServer]]]:
    """``await hostile(handler, **settings)``: a gateway whose upstreams (both) are one
    hand-written aiohttp handler on loopback."""

    async def make(handler: Handler, **updates: Any) -> TestServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        upstream = await aiohttp_server(app)
        settings = Settings(
            store="memory://",
            state_dir=tmp_path / "state",
            upstreams=dict(
                openai=str(upstream.make_url("/v1")),
                anthropic=str(upstream.make_url("")).rstrip("/"),
            ),
            **updates,
        )
        gateway: TestServer = await aiohttp_server(create_app(settings))
        return gateway

    yield make


ANTHROPIC = {
    "path": "/v1/messages",
    "headers": {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"},
    "body": {"model": "claude-sonnet-4-6", "max_tokens": 64, "stream": True, "messages": []},
}
CHAT = {
    "path": "/v1/chat/completions",
    "headers": {"Authorization": "Bearer sk-test"},
    "body": {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
}


def _sse(name: str | None, payload: dict[str, Any]) -> bytes:
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + orjson.dumps(payload) + b"\n\n"


ANTHROPIC_START = _sse(
    "message_start",
    {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-6",
            "usage": {"input_tokens": 11, "output_tokens": 1},
        },
    },
)
ANTHROPIC_END = _sse(
    "message_delta",
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 42}},
) + _sse("message_stop", {"type": "message_stop"})
CHAT_BASE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o"}
CHAT_START = _sse(None, {**CHAT_BASE, "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
CHAT_USAGE = _sse(
    None, {**CHAT_BASE, "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 42}}
)
CHAT_END = (
    _sse(None, {**CHAT_BASE, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    + CHAT_USAGE
    + b"data: [DONE]\n\n"
)


def huge_event(api: str) -> Iterator[bytes]:
    """One event of ``HUGE`` bytes, in chunks (the same chunk object again: the upstream
    itself holds next to nothing)."""
    if api == "anthropic":
        yield b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        yield b'"delta":{"type":"text_delta","text":"'
    else:
        yield b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,'
        yield b'"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"'
    filler = b"a" * CHUNK
    for _ in range(HUGE // CHUNK):
        yield filler
    yield b'"}}]}\n\n' if api == "chat" else b'"}}\n\n'


async def read_all(resp: aiohttp.ClientResponse) -> tuple[int, str]:
    """Size and digest of a body, read as it comes (never held)."""
    digest, size = hashlib.sha256(), 0
    async for chunk in resp.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


@pytest.mark.parametrize("api", ["anthropic", "chat"])
async def test_an_sse_event_past_the_bound_is_relayed_unread_in_bounded_memory(
    hostile: Callable[..., Awaitable[TestServer]], api: str
) -> None:
    """An event four times ``MAX_EVENT_BYTES``: the client gets the stream as sent (on chat,
    without the usage chunk the gateway asked for: the relay rewrites there), the gateway never
    holds the event whole, and the usage sent after it is still read."""
    start, end = (ANTHROPIC_START, ANTHROPIC_END) if api == "anthropic" else (CHAT_START, CHAT_END)
    sent = hashlib.sha256()
    sent_size = 0

    async def upstream(request: web.Request) -> web.StreamResponse:
        nonlocal sent_size
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in [start, *huge_event(api), end]:
            await response.write(piece)
            if piece is not CHAT_END or api == "anthropic":
                sent.update(piece)
                sent_size += len(piece)
            else:  # what the client should get: the finish chunk, not the usage chunk
                kept = piece.replace(CHAT_USAGE, b"")
                sent.update(kept)
                sent_size += len(kept)
        await response.write_eof()
        return response

    gateway = await hostile(upstream)
    call = ANTHROPIC if api == "anthropic" else CHAT
    headers = {**call["headers"], "X-Gateway-Session": f"huge-{api}"}
    with peak_memory() as peak:
        async with (
            asyncio.timeout(120),
            aiohttp.ClientSession() as http,
            http.post(gateway.make_url(call["path"]), json=call["body"], headers=headers) as resp,
        ):
            assert resp.status == 200
            got = await read_all(resp)
    assert got == (sent_size, sent.hexdigest())
    # Held whole, the event alone would be HUGE. Passed through, at most the bound is held;
    # a rewriting relay hands the dropped event back at once, and the client's connection
    # copies it on its way out (chunked framing, transport buffer).
    copies = 1 if api == "anthropic" else 3
    assert peak[0] < copies * MAX_EVENT_BYTES + 8 * MiB < HUGE, peak[0]
    record = await gateway.app[STORE].get(f"huge-{api}")
    assert record is not None and record.turns == 1 and record.in_flight == 0
    assert (record.tokens.input_tokens, record.tokens.output_tokens) == (11, 42)
    assert record.estimated_turns == 0  # the usage after the dropped event was read


def endless_events() -> Iterator[bytes]:
    yield ANTHROPIC_START
    while True:
        yield _sse("ping", {"type": "ping"})


def endless_event() -> Iterator[bytes]:
    yield ANTHROPIC_START
    yield b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"'
    while True:
        yield b"b" * 512


@pytest.mark.parametrize("source", [endless_events, endless_event])
async def test_a_stream_that_never_ends_is_cut_at_stream_total_and_accounted(
    hostile: Callable[..., Awaitable[TestServer]], source: Callable[[], Iterator[bytes]]
) -> None:
    """A stream that trickles for ever (events, or one event that never ends): ``idle`` never
    fires, ``stream_total`` does. The client sees a broken stream, never a complete one, and
    the turn is counted as cut: the stated input kept, the rest estimated."""

    async def upstream(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in source():
            await response.write(piece)
            await asyncio.sleep(0.01)
        return response  # pragma: no cover (never ends)

    gateway = await hostile(upstream, timeouts=Timeouts(idle=5.0, stream_total=0.5))
    headers = {**ANTHROPIC["headers"], "X-Gateway-Session": "endless"}
    async with (
        asyncio.timeout(20),
        aiohttp.ClientSession() as http,
        http.post(
            gateway.make_url("/v1/messages"), json=ANTHROPIC["body"], headers=headers
        ) as resp,
    ):
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_all(resp)
    record = await gateway.app[STORE].get("endless")
    assert record is not None and record.turns == 1 and record.in_flight == 0
    assert record.estimated_turns == 1 and record.tokens.input_tokens == 11


def is_provider_error(api: str, body: Any) -> bool:
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return False
    return body.get("type") == "error" if api == "anthropic" else "message" in body["error"]


NON_STREAMED = {
    "anthropic": ("/v1/messages", {**ANTHROPIC["body"], "stream": False}, ANTHROPIC["headers"]),
    "chat": ("/v1/chat/completions", {**CHAT["body"], "stream": False}, CHAT["headers"]),
}


async def post_json(gateway: TestServer, api: str) -> tuple[int, dict[str, str], Any]:
    path, body, headers = NON_STREAMED[api]
    async with (
        asyncio.timeout(30),
        aiohttp.ClientSession() as http,
        http.post(gateway.make_url(path), json=body, headers=headers) as resp,
    ):
        raw = await resp.read()
        return resp.status, dict(resp.headers), orjson.loads(raw)


@pytest.mark.parametrize("api", ["anthropic", "chat"])
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_a_json_answer_past_max_response_bytes_is_a_502_read_no_further(
    hostile: Callable[..., Awaitable[TestServer]], api: str, declared: bool
) -> None:
    """An answer that does not end (declared as 8 GiB, or chunked for ever): a 502 in the
    provider's shape, after reading at most ``max_response_bytes`` of it."""

    async def upstream(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if declared:
            response.content_length = 8 * 1024 * MiB
        await response.prepare(request)
        await response.write(b'{"id":"x","content":"')
        filler = b"c" * CHUNK
        while True:
            await response.write(filler)

    gateway = await hostile(upstream, max_response_bytes=MiB)
    with peak_memory() as peak:
        status, headers, body = await post_json(gateway, api)
    assert status == 502 and is_provider_error(api, body), (status, body)
    assert "max_response_bytes" in str(body) and headers["X-Gateway-Error"]
    assert peak[0] < 6 * MiB, peak[0]


async def test_a_json_answer_that_never_ends_is_a_502_at_stream_total(
    hostile: Callable[..., Awaitable[TestServer]],
) -> None:
    async def upstream(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        while True:
            await response.write(b" ")
            await asyncio.sleep(0.01)

    gateway = await hostile(upstream, timeouts=Timeouts(idle=5.0, stream_total=0.5))
    status, _, body = await post_json(gateway, "anthropic")
    assert status == 502 and is_provider_error("anthropic", body), (status, body)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_a_large_answer_outside_the_llm_routes_is_passed_on_whole(
    hostile: Callable[..., Awaitable[TestServer]], declared: bool
) -> None:
    """A file's content past ``max_response_bytes``: nothing of it is read, so it is not
    refused; it goes to the client as it comes, never held whole."""
    size = 24 * MiB
    filler = b"f" * CHUNK

    async def upstream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if declared:
            response.content_length = size
        await response.prepare(request)
        for _ in range(size // CHUNK):
            await response.write(filler)
        await response.write_eof()
        return response

    gateway = await hostile(upstream, max_response_bytes=MiB)
    with peak_memory() as peak:
        async with (
            asyncio.timeout(60),
            aiohttp.ClientSession() as http,
            http.get(
                gateway.make_url("/v1/files/file-1/content"),
                headers={"Authorization": "Bearer sk-test"},
            ) as resp,
        ):
            assert resp.status == 200
            if declared:
                assert resp.content_length == size
            got = await read_all(resp)
    assert got == (size, hashlib.sha256(filler * (size // CHUNK)).hexdigest())
    assert peak[0] < 8 * MiB, peak[0]
