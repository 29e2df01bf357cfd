"""The scanning half of the canary run (``test_canary.py``): canary values, every form a
sink could hold one in, the sinks' contents, and the table of what was found where.

A canary is found in a sink when any of its forms occurs there: the value itself; JSON-escaped;
URL-encoded; hex; the SHA-256 hex of it; base64 and base64url (the characters that depend on
the value alone, at each of the three alignments it can have inside a longer encoded text);
and any ``PIECE`` characters of its secret part, as written or lower-cased, so a value cut
short ("sk-proj-abc…"), split across a line or folded to lower case is found too. The leading
part a canary may show (a gateway key's ``gw_<public id>_``, a provider's ``sk-proj-``) is not
searched for on its own.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import quote, quote_plus

PIECE = 16
"""Characters of a canary's secret part that, found anywhere, count as a hit."""


@dataclass(frozen=True)
class Canary:
    name: str
    value: str
    shown: str = ""
    """The value's leading part that may be shown (and so is not searched for in pieces)."""

    def __post_init__(self) -> None:
        assert self.value.startswith(self.shown)
        assert len(self.value) - len(self.shown) >= PIECE, f"{self.name}: too short to scan"

    def forms(self) -> dict[str, str]:
        """Form name -> text; forms equal to an earlier one are left out."""
        data = self.value.encode()
        found: dict[str, str] = {
            "raw": self.value,
            "json": json.dumps(self.value)[1:-1],
            "url": quote(self.value, safe=""),
            "url+": quote_plus(self.value),
            "hex": data.hex(),
            "HEX": data.hex().upper(),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        for offset in range(3):
            padded = b"\0" * offset + data
            for name, encoded in (
                ("base64", base64.b64encode(padded)),
                ("base64url", base64.urlsafe_b64encode(padded)),
            ):
                # The first group holds the padding's bits, the last the next byte's.
                text = encoded.decode()
                found[f"{name}@{offset}"] = text[4 if offset else 0 : -4]
        unique: dict[str, str] = {}
        for name, text in found.items():
            if text not in unique.values():
                unique[name] = text
        return unique

    def pieces(self) -> frozenset[str]:
        """Every ``PIECE`` characters of the secret part, as written and lower-cased (the
        gateway lower-cases a User-Agent to name the agent)."""
        secret = self.value[len(self.shown) :]
        return frozenset(
            text[i : i + PIECE]
            for text in (secret, secret.lower())
            for i in range(len(secret) - PIECE + 1)
        )

    def find(self, text: str) -> list[str]:
        """The forms of this canary that occur in ``text``."""
        hits = [name for name, form in self.forms().items() if form in text]
        if not hits and any(piece in text for piece in self.pieces()):
            hits.append(f"{PIECE}-char piece")
        return hits

    def context(self, text: str, around: int = 50) -> str:
        """Where in ``text`` the canary first occurs, the occurrence masked (and as far as its
        pieces run on): what a reader of a failure needs to find the field that carried it."""
        pieces = self.pieces()
        found = [
            (at, len(form))
            for form in (*self.forms().values(), *pieces)
            if (at := text.find(form)) >= 0
        ]
        if not found:
            return ""
        start, length = min(found)
        end = start + length
        while text[end - PIECE + 1 : end + 1] in pieces:
            end += 1
        while start > 0 and text[start - 1 : start - 1 + PIECE] in pieces:
            start -= 1
        before, after = text[max(0, start - around) : start], text[end : end + 20]
        return ascii(f"{before}<{self.name}>{after}")


@dataclass(frozen=True)
class Hit:
    canary: str
    sink: str
    origin: str
    forms: tuple[str, ...]

    context: str = ""

    def __str__(self) -> str:
        where = f"{self.canary} in {self.sink} ({self.origin}) as {', '.join(self.forms)}"
        return f"{where}: {self.context}" if self.context else where


@dataclass
class Piece:
    """Something one sink holds: a file, a span, an answer."""

    sink: str
    origin: str
    text: str
    allows: frozenset[str] = frozenset()
    """Canaries that belong here (the one answer that hands out a new key)."""


@dataclass
class Sinks:
    """What every sink held at the end of a run, by sink, in the order of ``names``."""

    names: tuple[str, ...]
    pieces: list[Piece] = field(default_factory=list)

    def add(self, sink: str, origin: str, data: str | bytes, allows: Iterable[str] = ()) -> None:
        assert sink in self.names, sink
        # Bytes as Latin-1: one character per byte, so an ASCII form matches where it lies in a
        # binary file (the SQLite pages, a protobuf export).
        text = data.decode("latin-1") if isinstance(data, bytes) else data
        self.pieces.append(Piece(sink, origin, text, frozenset(allows)))

    def size(self, sink: str) -> int:
        return sum(len(piece.text) for piece in self.pieces if piece.sink == sink)

    def scan(self, canaries: Iterable[Canary]) -> tuple[list[Hit], list[Hit]]:
        """(hits, allowed hits): every canary found in a piece, apart or not by its ``allows``."""
        hits: list[Hit] = []
        allowed: list[Hit] = []
        for canary in canaries:
            for piece in self.pieces:
                forms = canary.find(piece.text)
                if forms:
                    context = canary.context(piece.text)
                    hit = Hit(canary.name, piece.sink, piece.origin, tuple(forms), context)
                    (allowed if canary.name in piece.allows else hits).append(hit)
        return hits, allowed

    def table(self, title: str, canaries: list[Canary], hits: list[Hit]) -> str:
        """Canaries by sink, each cell the hits found there; then the bytes scanned per sink."""
        counts = {(hit.canary, hit.sink): 0 for hit in hits}
        for hit in hits:
            counts[hit.canary, hit.sink] += 1
        first = max(len(c.name) for c in canaries)
        widths = [max(len(name), 5) for name in self.names]
        lines = [
            f"{title}: {len(hits)} found, {len(canaries)} canaries x {len(self.names)} sinks"
            f" = {len(canaries) * len(self.names)} cells",
            " | ".join(
                [" " * first, *(n.ljust(w) for n, w in zip(self.names, widths, strict=True))]
            ),
        ]
        for canary in canaries:
            cells = [
                str(counts.get((canary.name, sink), 0)).ljust(width)
                for sink, width in zip(self.names, widths, strict=True)
            ]
            lines.append(" | ".join([canary.name.ljust(first), *cells]))
        sizes = [
            _size(self.size(sink)).ljust(w) for sink, w in zip(self.names, widths, strict=True)
        ]
        lines.append(" | ".join(["scanned".ljust(first), *sizes]))
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 1024:.0f}K" if n >= 1024 else f"{n}B"
