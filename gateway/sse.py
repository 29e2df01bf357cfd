"""Incremental server-sent-events parsing that keeps each event's raw bytes, in bounded memory.

The relay forwards upstream chunks as they come; this parser only tells the dialect what the
events were, so usage can be read on the side. Raw bytes are kept per event for the one case
that drops events (the usage chunk the gateway itself asked for).

What the upstream sends is not trusted: an event larger than ``MAX_EVENT_BYTES`` is not held
(a hostile or broken upstream could otherwise grow it until the process dies). Its bytes still
reach the client as they came, unread, and parsing resumes after it (``SSEParser``).
"""

from __future__ import annotations

from typing import NamedTuple

MAX_EVENT_BYTES = 16 * 1024 * 1024
"""The largest event read. Real events are a few KB; the largest legitimate ones are the final
events that restate a whole answer (Responses' ``response.completed``, with base64 images when
the model drew some: a few MB). Past it an event is relayed unread, not cut: the client gets
the stream the upstream sent, and only what that one event said is missing from accounting
(a usage only it carried, as Responses' final event does, is then estimated as for a cut
stream). Cutting would cost the agent the whole turn and a retry, for a limit of the gateway's
own; a client SDK that cannot take such an event applies its own. The memory held is bounded
either way: this much per stream (about three times that, briefly, where the relay rewrites
events and hands the dropped one back whole)."""
_LONG = 64 * 1024
"""A partial event past this size is collected in a bytearray (appending is linear) instead
of being joined again to every chunk (quadratic in the event's size)."""


class SSEEvent(NamedTuple):
    """One event: its name, its data lines joined, and its bytes as sent. A tuple, not a
    frozen dataclass: a stream makes one per event, and a frozen dataclass sets each field
    through ``object.__setattr__``.

    Bytes of an event too large to read come (to a parser that hands them back) as events of
    no name and no data, like a comment block: observers relay them and read nothing."""

    event: str | None
    data: bytes
    raw: bytes


class SSEParser:
    """Feed it chunks; it returns the events completed so far and keeps the partial tail.

    A partial event never grows past ``limit`` bytes (plus one chunk): beyond it the event is
    dropped unread until its end, where parsing resumes (``oversized`` counts such events).
    ``hand_back``: the caller sends what the events carry (a relay that rewrites events), so
    the dropped event's bytes are handed back as opaque events rather than dropped.
    """

    __slots__ = ("_hand_back", "_limit", "_long", "_long_at", "_skipping", "_tail", "oversized")

    def __init__(self, limit: int = MAX_EVENT_BYTES, *, hand_back: bool = False) -> None:
        self._tail = b""
        """The partial event; while ``_skipping``, the last bytes seen of the one dropped."""
        self._long: bytearray | None = None
        """A partial event past ``_long_at`` (while ``_skipping``, an empty marker): when
        set, every chunk takes ``_feed_long``."""
        self._long_at = min(_LONG, limit)
        self._skipping = False
        self._limit = limit
        self._hand_back = hand_back
        self.oversized = 0

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if self._long is not None:
            return self._feed_long(chunk)
        buf = self._tail + chunk if self._tail else chunk
        if buf.find(b"\r") >= 0:  # not ``in``: see dialects.openai_chat._without_usage_null
            buf = buf.replace(b"\r\n", b"\n")
        # One split for the whole chunk: the bytes methods that take a start offset (find,
        # startswith, count) parse their arguments the slow way on Python 3.11.
        *blocks, tail = buf.split(b"\n\n")
        events: list[SSEEvent] = []
        for block in blocks:
            event = _event(block)
            if event is not None:
                events.append(event)
        if len(tail) > self._long_at:
            self._tail = b""
            self._long = bytearray(tail)
            if len(tail) > self._limit:
                events.extend(self._overflow())
        else:
            self._tail = tail
        return events

    @property
    def pending(self) -> bytes:
        """Bytes of an event that has not been completed (a stream cut mid-event); none for
        an event too large, which is not held."""
        if self._skipping:
            return b""
        return bytes(self._long) if self._long is not None else self._tail

    def _feed_long(self, chunk: bytes) -> list[SSEEvent]:
        """A chunk while a long event is held (or skipped): only its end is looked for."""
        if self._skipping:
            return self._skip(chunk)
        long = self._long
        assert long is not None
        # Two bytes before the chunk are enough to see an end split between chunks: "\n\r"
        # then "\n" (a CRLF blank line) is the longest such spelling.
        probe = long[-2:] + chunk
        if probe.find(b"\r") >= 0:
            probe = probe.replace(b"\r\n", b"\n")
        long += chunk
        if probe.find(b"\n\n") >= 0:  # it ends here: parsed as a whole, once
            self._long = None
            return self.feed(bytes(long))
        if len(long) > self._limit:
            return self._overflow()
        return []

    def _overflow(self) -> list[SSEEvent]:
        """The held event is too large: dropped (handed back whole, if asked) and skipped
        to its end. Its last two bytes are kept, to see an end split between chunks."""
        long = self._long
        assert long is not None
        self.oversized += 1
        self._skipping = True
        self._long = bytearray()
        self._tail = bytes(long[-2:])
        return self._opaque(bytes(long)) if self._hand_back else []

    def _skip(self, chunk: bytes) -> list[SSEEvent]:
        """A chunk of a dropped event: the bytes up to its end go back as they came (if
        asked), and events are read again after it."""
        seen = self._tail  # already handed back: only looked at
        probe = seen + chunk
        end = min(
            (at + len(blank) for blank in _BLANK_LINES if (at := probe.find(blank)) >= 0),
            default=-1,
        )
        if end < 0:
            self._tail = probe[-2:]
            return self._opaque(chunk)
        end -= len(seen)  # where the dropped event ends in ``chunk``
        self._skipping = False
        self._long = None
        self._tail = b""
        events = self._opaque(chunk[:end])
        events.extend(self.feed(chunk[end:]))
        return events

    def _opaque(self, raw: bytes) -> list[SSEEvent]:
        return [SSEEvent(None, b"", raw)] if self._hand_back and raw else []


_BLANK_LINES = (b"\n\n", b"\r\n\r\n", b"\n\r\n", b"\r\n\n")
"""The spellings of the blank line that ends an event, as the parser reads line ends."""


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
