"""Reading a client's request body: bounded in time and in size, decoded from its
``Content-Encoding``.

The server does not decompress bodies itself (``auto_decompress`` is off): a compressed body
is read as sent, bounded by ``max_body_bytes``, and decoded here with the same bound on its
decoded size (a gzip bomb is a 413), so that an encoding the gateway cannot read, or a broken
stream, is answered in the provider's shape (415, 400) instead of aiohttp's plain text. The
body then goes upstream decoded, without its ``Content-Encoding`` (``upstream``).
"""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import web

from gateway.errors import (
    BadRequest,
    BodyTimeout,
    BodyTooLarge,
    ClientDisconnected,
    UnsupportedEncoding,
)

# zlib's window bits: gzip framing, zlib framing, raw deflate (some clients send that as
# "deflate").
_GZIP, _ZLIB, _RAW = 31, 15, -15
_DECODERS = {"gzip": (_GZIP,), "x-gzip": (_GZIP,), "deflate": (_ZLIB, _RAW)}
_THREAD_AT = 256 * 1024
"""Compressed bodies above this size are decoded on a thread: a 64 MiB body takes about
0.2 s of CPU to inflate, too long for the event loop."""
_CHUNK = 1024 * 1024
MAX_MEMBERS = 16
"""gzip members one body may hold: each member's decoder copies the rest of the input, so a
body of thousands of empty members costs quadratic time (4 MiB of them took 10 s)."""


async def read_body(request: web.Request, limit: int, deadline: float) -> bytes:
    """The whole body, decoded; ``GatewayError`` subclasses for what cannot be served.
    ``deadline``: seconds the whole body may take to arrive."""
    try:
        if request.content.is_eof():
            # Already here whole (small bodies arrive with their headers): no timer needed.
            raw = await request.read()
        else:
            async with asyncio.timeout(deadline):
                raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise _too_large(limit) from exc
    except TimeoutError as exc:
        raise BodyTimeout(
            f"The request body did not arrive within {deadline:g}s"
            " (setting timeouts.client_body in the gateway's config file)."
        ) from exc
    except asyncio.CancelledError:
        # aiohttp cancels the handler when its client disconnects mid-body.
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ClientDisconnected("The client closed the connection mid-body.") from None
        raise
    except ConnectionError as exc:
        raise ClientDisconnected("The client closed the connection mid-body.") from exc
    if "Content-Encoding" not in request.headers:
        return raw
    return await _decoded(request, raw, limit)


async def _decoded(request: web.Request, raw: bytes, limit: int) -> bytes:
    # Every Content-Encoding header counts: upstream sees none of them (the body goes decoded).
    encoding = ", ".join(request.headers.getall("Content-Encoding"))
    names = [name.strip().lower() for name in encoding.split(",") if name.strip()]
    if names in ([], ["identity"]):
        return raw
    if len(names) != 1 or names[0] not in _DECODERS:
        raise UnsupportedEncoding(
            f"Content-Encoding {encoding[:64]!r} is not supported by the gateway:"
            " send the body uncompressed, or gzip or deflate."
        )
    wbits = _DECODERS[names[0]]
    if len(raw) > _THREAD_AT:
        return await asyncio.to_thread(inflate, raw, wbits, limit)
    return inflate(raw, wbits, limit)


def inflate(raw: bytes, wbits: tuple[int, ...], limit: int) -> bytes:
    """``raw`` decompressed, at most ``limit`` bytes of it (``BodyTooLarge`` past that)."""
    error: zlib.error | None = None
    for bits in wbits:
        try:
            return _inflate(raw, bits, limit)
        except zlib.error as exc:
            error = exc
    raise BadRequest(f"The request body could not be decompressed: {error}.")


def _inflate(raw: bytes, wbits: int, limit: int) -> bytes:
    decoder = zlib.decompressobj(wbits)
    out: list[bytes] = []
    size = 0
    data = raw
    while True:
        # Bounded output per step: a bomb stops at the limit, not when memory runs out.
        piece = decoder.decompress(data, _CHUNK)
        size += len(piece)
        if size > limit:
            raise _too_large(limit)
        out.append(piece)
        data = decoder.unconsumed_tail
        if not data:
            break
    if not decoder.eof:
        raise zlib.error("the compressed stream is truncated")
    members = 1
    while decoder.unused_data and wbits == _GZIP:
        # gzip allows several members one after the other (a few, in practice).
        members += 1
        if members > MAX_MEMBERS:
            raise zlib.error(f"more than {MAX_MEMBERS} gzip members")
        rest = decoder.unused_data
        decoder = zlib.decompressobj(wbits)
        piece = decoder.decompress(rest, limit - size + 1)
        size += len(piece)
        if size > limit or decoder.unconsumed_tail:
            raise _too_large(limit)
        if not decoder.eof:
            raise zlib.error("the compressed stream is truncated")
        out.append(piece)
    if decoder.unused_data:
        raise zlib.error("data after the end of the compressed stream")
    return b"".join(out)


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(
        f"Request body exceeds the gateway's limit of {limit} bytes"
        " (setting max_body_bytes in the gateway's config file)."
    )
