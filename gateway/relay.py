"""Sending the upstream's answer to the client: JSON whole, SSE chunk by chunk as it comes.

Usage is read on the side; the client's bytes are the upstream's bytes unless the dialect
rewrites an event (only to hide what the gateway itself asked for).

What the upstream sends is bounded like what a client sends: an answer the gateway holds is
at most ``max_response_bytes`` (else a 502), an answer of any kind takes at most
``timeouts.stream_total`` (else it is cut, like a broken stream), and an SSE event too large
to read is relayed unread (``sse``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.appkeys import SETTINGS
from gateway.dialects import StreamObserver
from gateway.errors import UpstreamUnavailable
from gateway.exchange import Exchange
from gateway.sse import MAX_EVENT_BYTES, SSEParser
from gateway.upstream import response_headers

log = logging.getLogger("gateway.relay")


class UpstreamCut(Exception):
    """The upstream's stream broke (reset, timeout, bad framing) after it had begun, or was
    still going at ``timeouts.stream_total``."""


class ClientGone(Exception):
    """The client went away while the answer was being sent."""


async def relay(ex: Exchange, upstream: aiohttp.ClientResponse, extra: CIMultiDict[str]) -> None:
    headers = response_headers(upstream.headers)
    headers.extend(extra)
    ex.status = upstream.status
    settings = ex.app[SETTINGS]
    # Every answer ends: one that keeps trickling bytes would hold its connections (and the
    # turn's reservations) for ever, the idle timeout never firing. Checked as each chunk
    # comes (a clock read), not by a timer per call (an asyncio timeout cost 2% of a call).
    deadline = time.monotonic() + settings.timeouts.stream_total
    content_type = upstream.content_type
    if content_type == "text/event-stream":
        await relay_stream(ex, upstream, headers, deadline)
    else:
        is_json = content_type == "application/json"
        await relay_body(ex, upstream, headers, is_json, deadline, settings.max_response_bytes)


async def relay_body(
    ex: Exchange,
    upstream: aiohttp.ClientResponse,
    headers: CIMultiDict[str],
    is_json: bool,
    deadline: float,
    limit: int,
) -> None:
    """The answer read whole, then sent: at most ``limit`` bytes of it. A larger one is a
    502 on an LLM route (the gateway reads it, and no agent wants it); on any other route
    (files, models) it goes to the client as it comes, never held whole."""
    length = upstream.content_length
    if length is not None and length > limit:
        if ex.dialect is None:
            await relay_stream(ex, upstream, headers, deadline, length=length)
            return
        raise _too_large(upstream, limit)
    try:
        parts, whole = await _read_body(upstream.content, limit, deadline)
    except (aiohttp.ClientError, TimeoutError) as exc:
        upstream.close()
        raise UpstreamUnavailable(
            f"The upstream's answer broke off before it was complete ({type(exc).__name__})."
        ) from exc
    except _Expired:
        upstream.close()
        raise UpstreamUnavailable(
            "The upstream's answer was still coming after timeouts.stream_total."
        ) from None
    if not whole:
        if ex.dialect is not None:
            raise _too_large(upstream, limit)
        await relay_stream(ex, upstream, headers, deadline, first=parts)
        return
    data = b"".join(parts)  # one part (the usual): that part itself, not a copy
    ex.first_byte_at = ex.upstream_done_at = time.perf_counter()
    if ex.dialect is not None and is_json and upstream.status < 400:
        parsed = ex.dialect.decode_response(data)
        if parsed is not None:
            ex.response_facts = ex.dialect.read_response(parsed)
    ex.response = web.Response(status=upstream.status, body=data, headers=headers)


class _Expired(Exception):
    """``timeouts.stream_total`` passed while an answer was read."""


async def _read_body(
    content: aiohttp.StreamReader, limit: int, deadline: float
) -> tuple[list[bytes], bool]:
    """The body's chunks, and whether that is all of it: reading stops past ``limit`` bytes
    (the chunk that went past it included)."""
    parts: list[bytes] = []
    size = 0
    while chunk := await content.readany():
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            return parts, False
        if time.monotonic() > deadline:
            raise _Expired
    return parts, True


def _too_large(upstream: aiohttp.ClientResponse, limit: int) -> UpstreamUnavailable:
    upstream.close()  # its unread rest must not be read as the next answer
    return UpstreamUnavailable(
        f"The upstream's answer is larger than max_response_bytes ({limit} bytes) and was "
        "refused unread; raise max_response_bytes if such answers are wanted."
    )


async def relay_stream(
    ex: Exchange,
    upstream: aiohttp.ClientResponse,
    headers: CIMultiDict[str],
    deadline: float,
    *,
    length: int | None = None,
    first: list[bytes] | None = None,
) -> None:
    """The answer sent as it comes, events read on the side, cut at ``deadline``
    (``time.monotonic``). ``length``: its size, when the upstream gave it; ``first``: chunks
    already read (a body too large to hold)."""
    response = web.StreamResponse(status=upstream.status, headers=headers)
    if length is not None:
        response.content_length = length
    ex.response = response
    observer = ex.dialect.observe_stream(ex.rewritten) if ex.dialect is not None else None
    if observer is not None:
        ex.response_facts = observer.facts
    rewrites = observer is not None and observer.rewrites
    parser = SSEParser(hand_back=rewrites)
    try:
        await _write(response.prepare(ex.request))
        if first:
            ex.first_byte_at = time.perf_counter()
            for chunk in first:
                await _write(response.write(chunk))
        await _pump(ex, upstream.content, response, observer, parser, rewrites, deadline)
        await _write(response.write_eof())
    except ClientGone:
        ex.outcome = "client_gone"
    except UpstreamCut as cut:
        ex.outcome = "upstream_cut"
        if cut.args == (_STREAM_TOTAL,):
            log.warning(
                "upstream %s: an answer still coming after timeouts.stream_total was cut",
                ex.upstream.name,
            )
        # A clean cut: the client sees a broken stream (and retries), never a complete one.
        if ex.request.transport is not None:
            ex.request.transport.close()
    finally:
        upstream.close()
        if parser.oversized:
            log.warning(
                "upstream %s: %d SSE event(s) over %d bytes relayed unread",
                ex.upstream.name,
                parser.oversized,
                MAX_EVENT_BYTES,
            )


_STREAM_TOTAL = "timeouts.stream_total"


async def _pump(
    ex: Exchange,
    content: aiohttp.StreamReader,
    response: web.StreamResponse,
    observer: StreamObserver | None,
    parser: SSEParser,
    rewrites: bool,
    deadline: float,
) -> None:
    """Chunks from the upstream to the client until the upstream's end (or ``deadline``)."""
    while True:
        try:
            chunk = await content.readany()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamCut(type(exc).__name__) from exc
        if not chunk:
            ex.upstream_done_at = time.perf_counter()
            return
        if ex.first_byte_at is None:
            ex.first_byte_at = time.perf_counter()
        if time.monotonic() > deadline:
            raise UpstreamCut(_STREAM_TOTAL)
        if rewrites:
            assert observer is not None
            chunk = _rewrite(observer, parser, chunk)
            if chunk:
                await _write(response.write(chunk))
            continue
        # The client's bytes first; usage is read on the side, after.
        await _write(response.write(chunk))
        if observer is not None:
            for event in parser.feed(chunk):
                observer.on_event(event)


def _rewrite(observer: StreamObserver, parser: SSEParser, chunk: bytes) -> bytes:
    """Whole events only, as the observer rewrites or drops them."""
    kept = [out for event in parser.feed(chunk) if (out := observer.on_event(event)) is not None]
    return b"".join(kept)


async def _write(pending: Awaitable[object]) -> None:
    try:
        await pending
    except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
        raise ClientGone(str(exc)) from exc
