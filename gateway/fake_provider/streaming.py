"""Sending SSE events: all at once, paced by ``chunk_delay``, or cut off after n events."""

from __future__ import annotations

import asyncio

from aiohttp import web

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
}


async def send_events(
    request: web.Request,
    events: list[bytes],
    *,
    delay: float,
    cut_after: int | None,
    headers: dict[str, str],
) -> web.StreamResponse:
    """Stream ``events``; with ``cut_after`` close the connection after that many, no EOF.

    Without a delay the events go out in one write, which keeps the fake cheap under load.
    """
    response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
    await response.prepare(request)
    if cut_after is not None:
        events = events[:cut_after]
    writes = events if delay > 0 else [b"".join(events)]
    for number, data in enumerate(writes):
        if number and delay > 0:
            await asyncio.sleep(delay)
        if data:
            await response.write(data)
    if cut_after is not None:
        _abort(request)
        return response
    await response.write_eof()
    return response


def _abort(request: web.Request) -> None:
    """Close the connection under the response: the client sees an unterminated stream."""
    transport = request.transport
    if transport is not None:
        transport.close()
