"""``gateway audit verify FILE``: recompute an audit log's hash chain (``gateway.audit``) and
name the first line that breaks it, and why. Reads the file as a stream, a line at a time
(at most ``MAX_LINE`` bytes of one are held), so a log of any length is checked in bounded
memory. orjson and ``gateway.audit`` are imported when the command runs.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.cli.arguments import command, subcommands

MAX_LINE = 1 << 20
"""As ``gateway.audit.MAX_LINE`` (kept here so that start-up stays at the standard library;
the test of the command checks they agree)."""
RECENT = 4096
"""Hashes of the last lines remembered, to tell a reordered or copied line from a deletion."""
MAX_NOTES = 20
_GENESIS = "0" * 64
"""As ``gateway.audit.GENESIS``: the ``prev`` of a chain's first line."""
_HEX64 = re.compile(r"[0-9a-f]{64}")


def add_commands(commands: Any) -> None:
    audit = command(commands, "audit", "check the audit log")
    audit_commands = subcommands(audit, "audit commands")
    verify = command(
        audit_commands,
        "verify",
        "check an audit log's hash chain",
        "Recompute the hash chain of an audit log (the gateway's audit_log file): ok with the\n"
        "number of lines and the last hash (exit 0), or the first line that breaks the chain\n"
        "and why: edited, deleted, copied or reordered lines, a line that is not JSON (exit 1).\n"
        "A line cut short by a crash or a full disk is accepted where the gateway named it in\n"
        "the next line (a chain_restart, or skipped_sha256), and reported. Keep the last hash\n"
        "somewhere else: a chain shows what changed inside a file, not a file rewritten whole.",
    )
    verify.add_argument("file", type=Path, metavar="FILE", help="the audit log (JSON lines)")
    verify.add_argument(
        "--after",
        type=_hash_argument,
        default=_GENESIS,
        metavar="HASH",
        help="the last hash of the file this one continues (a rotated log); default: the file"
        " starts the chain",
    )
    verify.add_argument(
        "--allow-unchained",
        action="store_true",
        help="accept lines before the first chained one (a log begun by a gateway without the"
        " chain): they are not covered by it, and anyone could have written them",
    )
    verify.add_argument(
        "--expect-last",
        type=_hash_argument,
        default=None,
        metavar="HASH",
        help="the last hash you kept elsewhere: anything else is a broken chain (a file"
        " rewritten whole, lines cut off the end)",
    )
    verify.set_defaults(run=_verify)


def _hash_argument(text: str) -> str:
    if not _HEX64.fullmatch(text):
        raise argparse.ArgumentTypeError("a hash is 64 lowercase hex digits")
    return text


@dataclass(slots=True)
class Verdict:
    """What ``verify`` found: ``broken`` (line number, why) or None, and what it noted."""

    lines: int = 0
    last_hash: str = ""
    broken: tuple[int, str] | None = None
    notes: list[str] = field(default_factory=list)
    unchained: int = 0
    """Lines before the first chained one (written before the chain existed)."""


@dataclass(slots=True)
class _Raw:
    number: int
    data: bytes
    """The line without its newline; empty when it was too long to hold."""
    sha256: str
    too_long: bool


@dataclass(slots=True)
class _Skipped:
    """A line that cannot be chained (not JSON, too long): fine only if the next one names it."""

    number: int
    why: str
    sha256: str
    prev: str
    """The hash of the last chained line before it."""


def verify(path: Path, after: str = _GENESIS, allow_unchained: bool = False) -> Verdict:
    """Check the chain of the audit log at ``path``; raises ``OSError`` if it cannot be read."""
    import orjson

    from gateway.audit import GENESIS, RESTART, chain_hash, is_hash

    verdict = Verdict(last_hash=after)
    expected = after
    chained = False
    recent: OrderedDict[str, int] = OrderedDict()
    skipped: _Skipped | None = None

    def note(text: str) -> None:
        if len(verdict.notes) < MAX_NOTES:
            verdict.notes.append(text)

    lines = _lines(path)
    for raw in lines:
        verdict.lines = raw.number
        n = raw.number
        entry: Any = None
        why = ""
        if raw.too_long:
            why = f"longer than {MAX_LINE} bytes"
        else:
            try:
                entry = orjson.loads(raw.data)
            except orjson.JSONDecodeError:
                why = "not JSON (a write cut short, or an edit)"
            else:
                if not isinstance(entry, dict):
                    why = "not a JSON object"
        if why:
            if skipped is not None:
                break  # two unreadable lines in a row: the first one is not accounted for
            skipped = _Skipped(n, why, raw.sha256, expected)
            continue
        assert isinstance(entry, dict)
        if "hash" not in entry and "prev" not in entry:
            if skipped is not None:
                break
            if chained:
                why = "no hash: a line added by hand, or by a gateway without the chain"
                verdict.broken = (n, why)
                return verdict
            verdict.unchained += 1
            continue
        if not (is_hash(entry.get("hash")) and is_hash(entry.get("prev"))):
            verdict.broken = (n, "edited: its hash or prev is missing or malformed")
            return verdict
        # Byte for byte as the writer wrote it: else two readers could see two lines with one
        # hash (a key repeated: parsers differ on which copy wins), or spacing hides an edit.
        try:
            rewritten, digest = orjson.dumps(entry), chain_hash(entry)
        except orjson.JSONEncodeError:
            verdict.broken = (n, "edited: a value the gateway cannot have written")
            return verdict
        if rewritten != raw.data:
            verdict.broken = (n, "edited: not byte for byte as the gateway writes a line")
            return verdict
        if digest != entry["hash"]:
            verdict.broken = (n, "edited: its hash does not match its content")
            return verdict
        if entry["hash"] in recent:
            verdict.broken = (n, f"a copy of line {recent[entry['hash']]}")
            return verdict
        prev, named = entry["prev"], entry.get("skipped_sha256")
        if skipped is not None:
            if named != skipped.sha256:
                verdict.broken = (skipped.number, skipped.why)
                return verdict
            if prev == GENESIS and entry.get("event") == RESTART:
                note(f"line {n} restarts the chain after line {skipped.number} ({skipped.why})")
            elif prev == skipped.prev:
                note(f"line {n} continues the chain across line {skipped.number} ({skipped.why})")
            else:
                verdict.broken = (n, _mismatch(prev, skipped.number - 1, recent, lines))
                return verdict
            skipped = None
        elif named is not None:
            verdict.broken = (n, "it names a line cut short before it, which is not there")
            return verdict
        elif prev != expected:
            if prev == GENESIS and entry.get("event") == RESTART and chained:
                # The writer could not read the line before (its reason says why): what
                # came before this line is not bound to what comes after.
                reason = _printable(str(entry.get("reason")))
                verdict.broken = (n, f"the chain restarts here: {reason}")
            else:
                verdict.broken = (n, _mismatch(prev, n - 1, recent, lines, first=not chained))
            return verdict
        chained = True
        expected = verdict.last_hash = entry["hash"]
        recent[entry["hash"]] = n
        if len(recent) > RECENT:
            recent.popitem(last=False)
    if skipped is not None:
        verdict.broken = (skipped.number, skipped.why)
    elif verdict.unchained and not chained:
        verdict.broken = (1, "no line is chained: the file was written before the hash chain")
    elif verdict.unchained and not allow_unchained:
        # Anyone can put lines above the first chained one: refused unless asked for.
        verdict.broken = (
            1,
            f"lines 1 to {verdict.unchained} are not chained (written before the chain, or"
            " added above it); --allow-unchained accepts them, uncovered",
        )
    elif verdict.unchained:
        note(f"lines 1 to {verdict.unchained} were written before the chain: not covered by it")
    return verdict


def _mismatch(
    prev: str,
    before: int,
    recent: OrderedDict[str, int],
    lines: Iterator[_Raw],
    *,
    first: bool = False,
) -> str:
    """Why a line's ``prev`` is not the hash of line ``before``: a guess from the hashes
    seen and the line after it (read ahead; the check stops here anyway)."""
    if prev in recent:
        return (
            f"its prev is the hash of line {recent[prev]}, not of line {before}: a line was"
            " inserted before it, or lines were reordered"
        )
    ahead = next(lines, None)
    if ahead is not None and not ahead.too_long:
        import orjson

        try:
            following = orjson.loads(ahead.data)
        except orjson.JSONDecodeError:
            following = None
        if isinstance(following, dict) and following.get("hash") == prev:
            return f"out of order: line {ahead.number} belongs before it (lines swapped)"
    if first and prev == _GENESIS:
        return "it starts a new chain, not the one --after names"
    if first:
        return (
            f"the file begins mid-chain (prev {prev[:12]}): lines before it were removed, or"
            " it continues a rotated file (give that file's last hash with --after)"
        )
    return (
        f"its prev does not match line {before}'s hash: a line between them was deleted,"
        f" or line {before} was replaced"
    )


def _printable(text: str, limit: int = 200) -> str:
    """Text from the file, safe for a terminal (no escape sequences) and bounded."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _lines(path: Path) -> Iterator[_Raw]:
    """The file's lines, numbered from 1, each held whole only up to ``MAX_LINE`` bytes."""
    with path.open("rb") as f:
        number = 0
        while chunk := f.readline(MAX_LINE + 1):
            number += 1
            digest = hashlib.sha256()
            too_long = False
            while not chunk.endswith(b"\n") and len(chunk) > MAX_LINE:
                too_long = True  # hash the rest of it, a bounded piece at a time
                digest.update(chunk)
                chunk = f.readline(MAX_LINE + 1)
            data = chunk[:-1] if chunk.endswith(b"\n") else chunk
            digest.update(data)
            yield _Raw(number, b"" if too_long else data, digest.hexdigest(), too_long)


def _verify(args: argparse.Namespace) -> int:
    try:
        verdict = verify(args.file, args.after, args.allow_unchained)
    except OSError as exc:
        # Exit 2, not 1: nothing was checked, which is not a broken chain.
        print(f"gateway audit verify: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    if verdict.broken is not None:
        number, why = verdict.broken
        print(f"broken at line {number}: {why}")
        for text in verdict.notes:
            print(f"note: {text}")
        return 1
    if args.expect_last is not None and verdict.last_hash != args.expect_last:
        print(f"broken at the end: the last hash is {verdict.last_hash}, not {args.expect_last}")
        return 1
    print(f"ok: {verdict.lines} lines, chain intact, last hash {verdict.last_hash}")
    for text in verdict.notes:
        print(f"note: {text}")
    return 0
