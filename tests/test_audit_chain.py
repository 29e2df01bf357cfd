"""The audit log's hash chain: every line bound to the one before it, continued across
restarts, checked by ``gateway audit verify``, which names the first line an edit, a deletion,
a copy or a reordering broke. Lines are redacted before they are hashed."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from gateway import audit as audit_module
from gateway.audit import GENESIS, MAX_LINE, RESTART, AuditError, AuditLog, chain_hash
from gateway.cli import audit as cli_audit
from gateway.cli import main
from gateway.redact import REDACTOR, REPLACEMENT
from gateway.secret import Secret


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def raw_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def write_lines(path: Path, rows: list[bytes]) -> None:
    path.write_bytes(b"".join(row + b"\n" for row in rows))


async def written(path: Path, runs: int = 3) -> None:
    """Three runs of the gateway on one file: a commit and a record each."""
    for run in range(runs):
        audit = AuditLog(path)
        audit.start()
        await audit.commit("grant", actor="loopback", reason="needs more", run=run, turns=2)
        audit.record("breaker", upstream="openai", run=run)
        await asyncio.to_thread(audit.stop)


def write_runs(path: Path, runs: int = 3) -> None:
    asyncio.run(written(path, runs))


def verify(path: Path, *extra: str) -> tuple[int, str]:
    """``gateway audit verify FILE``: its exit code and what it printed."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["audit", "verify", str(path), *extra])
    return code, out.getvalue()


def test_the_chain_continues_across_restarts_and_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_runs(path)
    entries = lines(path)
    assert [(e["event"], e["run"]) for e in entries] == [
        (event, run) for run in range(3) for event in ("grant", "breaker")
    ]
    assert entries[0]["prev"] == GENESIS
    for before, after in itertools.pairwise(entries):
        assert after["prev"] == before["hash"]
    for entry in entries:
        body = {k: v for k, v in entry.items() if k != "hash"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        assert entry["hash"] == hashlib.sha256(entry["prev"].encode() + canonical).hexdigest()
        assert entry["hash"] == chain_hash(entry)
    code, out = verify(path)
    assert code == 0
    assert out == f"ok: 6 lines, chain intact, last hash {entries[-1]['hash']}\n"
    assert verify(path, "--expect-last", entries[-1]["hash"])[0] == 0
    code, out = verify(path, "--expect-last", entries[-2]["hash"])  # lines cut off the end
    assert code == 1 and "broken at the end" in out


@pytest.mark.parametrize(
    ("damage", "line", "why"),
    [
        ("edit_value", 3, "edited: its hash does not match its content"),
        ("edit_spacing", 3, "edited: not byte for byte"),
        ("repeat_key", 3, "edited: not byte for byte"),
        ("delete", 3, "a line between them was deleted"),
        ("swap", 3, "out of order: line 4 belongs before it (lines swapped)"),
        ("insert_chained", 4, "its prev is the hash of line 2, not of line 3: a line was inserted"),
        ("copy", 4, "a copy of line 3"),
        ("truncate_last", 6, "not JSON"),
        ("drop_first", 1, "the file begins mid-chain"),
        ("garbage", 3, "not JSON"),
        ("blank", 3, "not JSON"),
        ("unchained_insert", 3, "no hash: a line added by hand"),
        ("bad_hash", 3, "its hash or prev is missing or malformed"),
        ("array", 3, "not a JSON object"),
    ],
)
def test_verify_names_the_first_broken_line_and_why(
    tmp_path: Path, damage: str, line: int, why: str
) -> None:
    path = tmp_path / "audit.jsonl"
    write_runs(path)
    rows = raw_lines(path)
    third = json.loads(rows[2])
    if damage == "edit_value":
        rows[2] = rows[2].replace(b'"turns":2', b'"turns":9')
    elif damage == "edit_spacing":
        rows[2] = json.dumps(third).encode()  # same values, the spacing of json.dumps
    elif damage == "repeat_key":
        rows[2] = b'{"event":"forged",' + rows[2][1:]  # a reader keeping the first sees "forged"
    elif damage == "delete":
        del rows[2]
    elif damage == "swap":
        rows[2], rows[3] = rows[3], rows[2]
    elif damage == "insert_chained":
        # A line with a correct hash, chained to line 2: line 3 no longer follows its prev.
        forged = {
            "ts": 1.0,
            "event": "grant",
            "actor": "forger",
            "reason": "",
            "prev": third["prev"],
        }
        forged["hash"] = chain_hash(forged)
        rows.insert(2, json.dumps(forged, separators=(",", ":")).encode())
    elif damage == "copy":
        rows.insert(3, rows[2])
    elif damage == "truncate_last":
        rows[-1] = rows[-1][:-10]
    elif damage == "drop_first":
        del rows[0]
    elif damage == "garbage":
        rows[2] = b"\xff\xfe not json"
    elif damage == "blank":
        rows[2] = b""
    elif damage == "unchained_insert":
        rows.insert(2, b'{"event":"grant","actor":"me"}')
    elif damage == "bad_hash":
        third["hash"] = "z" * 64
        rows[2] = json.dumps(third, separators=(",", ":")).encode()
    elif damage == "array":
        rows[2] = b"[1,2,3]"
    write_lines(path, rows)
    code, out = verify(path)
    assert code == 1
    first = out.splitlines()[0]
    assert first.startswith(f"broken at line {line}: ") and why in first, out


@pytest.mark.parametrize(
    "hostile",
    [
        b"[" * 100_000 + b"]" * 100_000,  # a depth bomb
        b"x" * (3 * MAX_LINE),  # one line of 3 MiB: read a MiB at a time
        b'{"ts":1,"prev":"' + b"0" * 64 + b'","hash":"' + b"0" * 64 + b'","n":1e400}',
        b'{"prev":"' + b"0" * 64 + b'","hash":"' + b"0" * 64 + b'","n":123456789012345678901234}',
        b"\x00" * 64,
        b'{"a":"\\ud800"}',
    ],
    ids=["depth", "huge", "infinity", "bigint", "nul", "surrogate"],
)
def test_verify_refuses_hostile_lines_without_crashing(tmp_path: Path, hostile: bytes) -> None:
    path = tmp_path / "audit.jsonl"
    write_runs(path, runs=1)
    with path.open("ab") as f:
        f.write(hostile + b"\n")
    code, out = verify(path)
    assert code == 1 and out.startswith("broken at line 3: "), out


def test_a_rotated_file_verifies_with_the_last_hash_of_the_one_before(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    write_runs(path)
    rows = raw_lines(path)
    older, newer = tmp_path / "audit.jsonl.1", tmp_path / "audit.jsonl.2"
    write_lines(older, rows[:3])
    write_lines(newer, rows[3:])
    assert verify(older)[0] == 0
    assert verify(newer)[0] == 1
    last = json.loads(rows[2])["hash"]
    assert verify(newer, "--after", last)[0] == 0
    code, out = verify(path, "--after", last)
    assert code == 1 and "it starts a new chain, not the one --after names" in out
    with pytest.raises(SystemExit):
        verify(newer, "--after", "not-a-hash")


def test_a_cut_short_last_line_is_named_by_a_chain_restart(tmp_path: Path) -> None:
    """A crash mid-write leaves a piece of a line last: the next start writes a
    ``chain_restart`` naming it, and the chain verifies again, with the restart noted."""
    path = tmp_path / "audit.jsonl"
    write_runs(path, runs=1)
    data = path.read_bytes()
    piece = data[:-40]  # the last line cut short, no newline
    path.write_bytes(piece)
    assert verify(path)[0] == 1
    write_runs(path, runs=1)
    rows = raw_lines(path)
    assert len(rows) == 5
    restart = json.loads(rows[2])
    assert restart["event"] == RESTART and restart["actor"] == "system"
    assert restart["prev"] == GENESIS and "not JSON" in restart["reason"]
    assert restart["skipped_sha256"] == hashlib.sha256(rows[1]).hexdigest()
    code, out = verify(path)
    assert code == 0, out
    assert "note: line 3 restarts the chain after line 2 (not JSON" in out
    # The restart names the piece: changing the piece breaks the chain at the piece.
    rows[1] = rows[1][:-1]
    write_lines(path, rows)
    code, out = verify(path)
    assert code == 1 and out.startswith("broken at line 2: not JSON")


def test_a_write_cut_short_by_a_full_disk_is_crossed_by_the_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    failures: list[int] = []
    audit = AuditLog(path, on_failure=lambda: failures.append(1))

    async def run() -> None:
        audit.start()
        await audit.commit("grant", actor="loopback", session="before")
        write = audit._append
        monkeypatch.setattr(audit, "_append", lambda fd, line: write(fd, line[: len(line) // 2]))
        with pytest.raises(AuditError):
            await audit.commit("grant", actor="loopback", session="torn")
        monkeypatch.setattr(audit, "_append", write)
        await audit.commit("grant", actor="loopback", session="after")
        await asyncio.to_thread(audit.stop)

    asyncio.run(run())
    assert failures == [1]
    rows = raw_lines(path)
    before, after = json.loads(rows[0]), json.loads(rows[2])
    assert after["prev"] == before["hash"]  # the chain goes on across the piece
    assert after["skipped_sha256"] == hashlib.sha256(rows[1]).hexdigest()
    code, out = verify(path)
    assert code == 0, out
    assert "note: line 3 continues the chain across line 2" in out


def test_lines_from_before_the_chain_are_kept_and_noted(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"event": "before"}\n{"event": "also before"}\n')
    write_runs(path, runs=1)
    entries = lines(path)
    assert [e["event"] for e in entries] == ["before", "also before", "grant", "breaker"]
    assert entries[2]["prev"] == GENESIS
    code, out = verify(path)  # lines above the chain: anyone could have put them there
    assert code == 1 and "lines 1 to 2 are not chained" in out
    code, out = verify(path, "--allow-unchained")
    assert code == 0
    assert "note: lines 1 to 2 were written before the chain: not covered by it" in out
    path.write_text('{"event": "before"}\n')
    code, out = verify(path)
    assert code == 1 and "no line is chained" in out


def test_a_secret_is_redacted_before_the_line_is_hashed(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    canary = Secret("canary-audit-7f3a9c2e51")  # known to the redactor from now on
    provider_key = "sk-ant-api03-" + "Q" * 40
    before = REDACTOR.counts["audit"]

    async def run() -> None:
        audit = AuditLog(path)
        audit.start()
        await audit.commit(
            "credentials_reload",
            actor="system",
            reason=f"reloaded {canary.reveal()}",
            detail={"value": canary.reveal(), "pasted": [f"Bearer {provider_key}"]},
        )
        audit.record("key_deprecated_use", note=Exception(f"with {provider_key}"))
        await asyncio.to_thread(audit.stop)

    asyncio.run(run())
    text = path.read_text()
    assert canary.reveal() not in text and provider_key not in text
    first, second = lines(path)
    assert first["reason"] == f"reloaded {REPLACEMENT}"
    assert first["detail"] == {"value": REPLACEMENT, "pasted": [REPLACEMENT]}
    assert second["note"] == f"with {REPLACEMENT}"  # an object's text is redacted too
    assert REDACTOR.counts["audit"] - before == 4
    assert verify(path)[0] == 0  # the hash covers the line as it is on disk


async def test_a_failed_write_is_counted_and_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures: list[int] = []
    audit = AuditLog(tmp_path / "audit.jsonl", on_failure=lambda: failures.append(1))
    audit.start()

    def full(fd: int, line: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit, "_append", full)
    with pytest.raises(AuditError):
        await audit.commit("key_revoke", actor="token:abc")
    audit.record("breaker", upstream="openai")
    with pytest.raises(AuditError, match="a field cannot be written"):
        await audit.commit("key_create", actor="token:abc", size=1 << 70)
    with pytest.raises(AuditError, match="over"):
        await audit.commit("key_create", actor="token:abc", big=["x" * 4000] * 300)
    await asyncio.to_thread(audit.stop)
    assert len(failures) == 4


def test_an_unreadable_or_huge_last_line_restarts_without_crashing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"x" * (MAX_LINE + 10) + b"\n")
    write_runs(path, runs=1)
    rows = raw_lines(path)
    restart = json.loads(rows[1])
    assert restart["event"] == RESTART and "longer than" in restart["reason"]
    assert "skipped_sha256" not in restart  # not read whole: nothing to name it by
    code, out = verify(path)
    assert code == 1 and out.startswith("broken at line 1: longer than")
    for garbage in (b"[1, 2]\n", b'{"hash": 5}\n', b"\x00\x01\x02"):
        path.write_bytes(garbage)
        write_runs(path, runs=1)
        assert json.loads(raw_lines(path)[1])["event"] == RESTART


def test_verify_of_a_missing_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", "verify", str(tmp_path / "nowhere.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_an_empty_file_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"")
    assert verify(path) == (0, f"ok: 0 lines, chain intact, last hash {'0' * 64}\n")


def test_the_cli_and_the_writer_agree_on_their_limits() -> None:
    assert cli_audit.MAX_LINE == audit_module.MAX_LINE
    assert cli_audit._GENESIS == audit_module.GENESIS
