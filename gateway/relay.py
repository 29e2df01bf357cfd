"""Sending the upstream's answer to the client: JSON whole, SSE chunk by chunk as it comes.

Usage is read on the side; the client's bytes are the upstream's bytes unless the dialect
rewrites an event (only to hide what the gateway itself asked for).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.dialects import StreamObserver
from gateway.errors import UpstreamUnavailable
from gateway.exchange import Exchange
from gateway.sse import SSEParser
from gateway.upstream import response_headers


class UpstreamCut(Exception):
    """The upstream's stream broke (reset, timeout, bad framing) after it had begun."""


class ClientGone(Exception):
    """The client went away while the answer was being sent."""


async def relay(ex: Exchange, upstream: aiohttp.ClientResponse, extra: CIMultiDict[str]) -> None:
    headers = response_headers(upstream.headers)
    headers.extend(extra)
    ex.status = upstream.status
    content_type = upstream.content_type
    if content_type == "text/event-stream":
        await relay_stream(ex, upstream, headers)
    else:
        await relay_body(ex, upstream, headers, content_type == "application/json")


async def relay_body(
    ex: Exchange, upstream: aiohttp.ClientResponse, headers: CIMultiDict[str], is_json: bool
) -> None:
    try:
        data = await upstream.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise UpstreamUnavailable(
            f"The upstream's answer broke off before it was complete ({type(exc).__name__})."
        ) from exc
    ex.first_byte_at = ex.upstream_done_at = time.perf_counter()
    if ex.dialect is not None and is_json and upstream.status < 400:
        parsed = ex.dialect.decode_response(data)
        if parsed is not None:
            ex.response_facts = ex.dialect.read_response(parsed)
    ex.response = web.Response(status=upstream.status, body=data, headers=headers)


async def relay_stream(
    ex: Exchange, upstream: aiohttp.ClientResponse, headers: CIMultiDict[str]
) -> None:
    response = web.StreamResponse(status=upstream.status, headers=headers)
    ex.response = response
    observer = ex.dialect.observe_stream(ex.rewritten) if ex.dialect is not None else None
    if observer is not None:
        ex.response_facts = observer.facts
    rewrites = observer is not None and observer.rewrites
    parser = SSEParser()
    content = upstream.content
    try:
        await _write(response.prepare(ex.request))
        while True:
            try:
                chunk = await content.readany()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise UpstreamCut(type(exc).__name__) from exc
            if not chunk:
                ex.upstream_done_at = time.perf_counter()
                break
            if ex.first_byte_at is None:
                ex.first_byte_at = time.perf_counter()
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
        await _write(response.write_eof())
    except ClientGone:
        ex.outcome = "client_gone"
    except UpstreamCut:
        ex.outcome = "upstream_cut"
        # A clean cut: the client sees a broken stream (and retries), never a complete one.
        if ex.request.transport is not None:
            ex.request.transport.close()
    finally:
        upstream.close()


def _rewrite(observer: StreamObserver, parser: SSEParser, chunk: bytes) -> bytes:
    """Whole events only, as the observer rewrites or drops them."""
    kept = [out for event in parser.feed(chunk) if (out := observer.on_event(event)) is not None]
    return b"".join(kept)


async def _write(pending: Awaitable[object]) -> None:
    try:
        await pending
    except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
        raise ClientGone(str(exc)) from exc
