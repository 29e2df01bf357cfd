"""Building and splitting SSE streams for the dialect tests."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.sse import SSEEvent, SSEParser


def split_events(stream: bytes) -> list[SSEEvent]:
    """The events of a whole stream; nothing may be left over."""
    parser = SSEParser()
    events = parser.feed(stream)
    assert parser.pending == b""
    return events


def named_event(name: str, payload: dict[str, Any]) -> bytes:
    """One ``event:``/``data:`` event as Anthropic and Responses send it."""
    return f"event: {name}\ndata: ".encode() + orjson.dumps({"type": name, **payload}) + b"\n\n"
