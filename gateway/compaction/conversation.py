"""A conversation under compaction: its entries, what each stands for, and the rewrite to keep.

Compaction never edits an agent's history in place. It builds a list of entries, each an
original item (kept byte for byte), an original whose tool output was elided, or a note the
gateway wrote (a summary, or a mark of what was removed). The entries in front of the untouched
tail make a ``Rewrite``: a recipe kept with the session and applied again to every later request
whose history starts with the same items. The provider then sees the same compacted prefix turn
after turn (its prompt cache holds), and a summary is paid for once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.dialects.base import History, Layout
from gateway.dialects.envelope import load_json

Op = int | list[Any]
"""How an entry is made from the originals: ``i`` (item i as sent), ``["elide", i]`` (item i
with its tool output elided), ``["note", text, span]`` (the gateway's note for ``span`` items)."""
ELIDE_MIN_BYTES = 2048
"""Tool outputs smaller than this stay: the note would save little."""
Buffer = bytes | memoryview | Any
"""An item's JSON as sent: bytes, or a ``msgspec.Raw`` slice of the request body."""


def messages(count: int) -> str:
    """``1 message``, ``12 messages``: for the notes the gateway writes."""
    return f"{count} message" if count == 1 else f"{count} messages"


@dataclass(slots=True)
class Entry:
    raw: Buffer
    tokens: int
    op: Op
    span: int = 1
    """How many original items it stands for."""
    value: Any = None
    """The decoded item, once something read it."""

    @property
    def original(self) -> bool:
        return isinstance(self.op, int)


@dataclass(slots=True)
class Rewrite:
    """``ops`` stand for the first ``count`` items of any history whose digest they match."""

    digest: str
    count: int
    ops: list[Op]
    strategies: list[str]
    at: float
    summary_model: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "count": self.count,
            "ops": self.ops,
            "strategies": self.strategies,
            "at": self.at,
            "summary_model": self.summary_model,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Rewrite:
        return cls(**data)


def digest(originals: Sequence[Buffer], count: int) -> str:
    """Of the first ``count`` items, lengths included so no two cuts of one history collide."""
    hasher = hashlib.blake2b(digest_size=16)
    for raw in originals[:count]:
        view = memoryview(raw)
        hasher.update(view.nbytes.to_bytes(8, "little"))
        hasher.update(view)
    return hasher.hexdigest()


@dataclass(slots=True)
class Conversation:
    """The entries of one request's conversation and their token count (uncorrected)."""

    history: History
    originals: Sequence[Buffer]
    count: Callable[[Buffer], int]
    """Tokens of one item, framing included (per-item cached)."""
    fixed_tokens: int
    """System prompt fields and tool definitions: counted, never rewritten."""
    entries: list[Entry] = field(default_factory=list)
    total: int = 0

    @classmethod
    def of(
        cls,
        history: History,
        originals: Sequence[Buffer],
        count: Callable[[Buffer], int],
        fixed_tokens: int,
        rewrite: Rewrite | None = None,
    ) -> Conversation:
        conversation = cls(history, originals, count, fixed_tokens)
        start = 0
        if rewrite is not None:
            conversation.entries = [conversation.made(op) for op in rewrite.ops]
            start = rewrite.count
        conversation.entries += [
            Entry(raw, count(raw), index) for index, raw in enumerate(originals[start:], start)
        ]
        conversation.total = fixed_tokens + sum(e.tokens for e in conversation.entries)
        return conversation

    # -- reading ------------------------------------------------------------------------------
    def value(self, index: int) -> Any:
        entry = self.entries[index]
        if entry.value is None:
            entry.value = load_json(entry.raw)
        return entry.value

    def layout(self) -> Layout:
        return self.history.layout([self.value(i) for i in range(len(self.entries))])

    def old_units(self, layout: Layout, keep_last: int, keep_first_input: bool) -> list[range]:
        """Units a strategy may rewrite: not the last ``keep_last``, and, when the first input is
        pinned (summarize and truncate keep it), not the user messages the conversation opens
        with (Codex sends its context files and the task as separate messages)."""
        units = layout.units[: max(0, len(layout.units) - keep_last)]
        if keep_first_input:
            opening = 0
            while (
                opening < len(units)
                and layout.inputs[opening]
                and self.entries[units[opening][0]].original  # a gateway note is not pinned
            ):
                opening += 1
            units = units[opening:]
        return [range(start, end) for start, end in units]

    def items(self) -> list[Buffer]:
        return [entry.raw for entry in self.entries]

    # -- changing -----------------------------------------------------------------------------
    def made(self, op: Op) -> Entry:
        """The entry an op stands for; the same op always gives the same bytes."""
        if isinstance(op, int):
            raw = self.originals[op]
            return Entry(raw, self.count(raw), op)
        if op[0] == "elide":
            original = load_json(self.originals[op[1]])
            elided = self.history.elide(original, ELIDE_MIN_BYTES)
            value = original if elided is None else elided
            raw = orjson.dumps(value)
            return Entry(raw, self.count(raw), op, value=value)
        _, text, span = op
        value = self.history.note(text)
        raw = orjson.dumps(value)
        return Entry(raw, self.count(raw), op, span=span, value=value)

    def replace(self, start: int, end: int, new: list[Entry]) -> None:
        self.total += sum(e.tokens for e in new) - sum(e.tokens for e in self.entries[start:end])
        self.entries[start:end] = new

    def tokens(self, indexes: Iterable[int]) -> int:
        """Tokens of the entries at ``indexes``."""
        return sum(self.entries[i].tokens for i in indexes)

    def span(self, indexes: Iterable[int]) -> int:
        """How many original items the entries at ``indexes`` stand for."""
        return sum(self.entries[i].span for i in indexes)

    def note(self, text: str, span: int) -> Entry:
        """The gateway's note, standing for ``span`` original items."""
        return self.made(["note", text, span])

    # -- remembering --------------------------------------------------------------------------
    def rewrite(
        self, strategies: list[str], at: float, summary_model: str | None
    ) -> Rewrite | None:
        """The recipe for everything in front of the untouched tail, or None if all is as sent."""
        tail = len(self.entries)
        expected = len(self.originals) - 1
        while tail > 0 and self.entries[tail - 1].op == expected:
            tail -= 1
            expected -= 1
        count = expected + 1
        ops = [entry.op for entry in self.entries[:tail]]
        if ops == list(range(count)):
            return None
        return Rewrite(digest(self.originals, count), count, ops, strategies, at, summary_model)
