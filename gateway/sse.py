"""Incremental server-sent-events parsing that keeps each event's raw bytes.

The relay forwards upstream chunks as they come; this parser only tells the dialect what the
events were, so usage can be read on the side. Raw bytes are kept per event for the one case
that drops events (the usage chunk the gateway itself asked for).
"""

from __future__ import annotations

from typing import NamedTuple


class SSEEvent(NamedTuple):
    """One event: its name, its data lines joined, and its bytes as sent. A tuple, not a
    frozen dataclass: a stream makes one per event, and a frozen dataclass sets each field
    through ``object.__setattr__``."""

    event: str | None
    data: bytes
    raw: bytes


class SSEParser:
    """Feed it chunks; it returns the events completed so far and keeps the partial tail."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buf = self._tail + chunk if self._tail else chunk
        if buf.find(b"\r") >= 0:  # not ``in``: see dialects.openai_chat._without_usage_null
            buf = buf.replace(b"\r\n", b"\n")
        # One split for the whole chunk: the bytes methods that take a start offset (find,
        # startswith, count) parse their arguments the slow way on Python 3.11.
        *blocks, self._tail = buf.split(b"\n\n")
        events: list[SSEEvent] = []
        for block in blocks:
            event = _event(block)
            if event is not None:
                events.append(event)
        return events

    @property
    def pending(self) -> bytes:
        """Bytes of an event that has not been completed (a stream cut mid-event)."""
        return self._tail


def _event(block: bytes) -> SSEEvent | None:
    """One event from its block (without the blank line that ended it)."""
    lines = block.split(b"\n")
    # The common shapes first: one data line, or one event line and one data line.
    if len(lines) == 1:
        if block[:6] == b"data: ":
            return SSEEvent(None, block[6:], block + b"\n\n")
    elif len(lines) == 2:
        first, second = lines
        if first[:7] == b"event: " and second[:6] == b"data: ":
            return SSEEvent(first[7:].decode("utf-8", "replace"), second[6:], block + b"\n\n")
    return _parse_block(block + b"\n\n")


def _parse_block(block: bytes) -> SSEEvent | None:
    name: str | None = None
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value.decode("utf-8", "replace")
    if name is None and not data:
        return SSEEvent(None, b"", block) if block.strip() else None
    return SSEEvent(name, b"\n".join(data), block)
