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
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        events: list[SSEEvent] = []
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            block = buf[start : end + 2]
            start = end + 2
            event = _parse_block(block)
            if event is not None:
                events.append(event)
        self._tail = buf[start:]
        return events

    @property
    def pending(self) -> bytes:
        """Bytes of an event that has not been completed (a stream cut mid-event)."""
        return self._tail


def _parse_block(block: bytes) -> SSEEvent | None:
    # The common shapes first: one data line, or one event line and one data line.
    if block.startswith(b"data: ") and block.count(b"\n") == 2:
        return SSEEvent(None, block[6:-2], block)
    if block.startswith(b"event: ") and block.count(b"\n") == 3:
        first = block.index(b"\n")
        if block.startswith(b"data: ", first + 1):
            return SSEEvent(block[7:first].decode(), block[first + 7 : -2], block)
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
