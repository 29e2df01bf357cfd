"""The audit log: JSON lines written by a thread, in a file only the gateway's user can read."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from gateway.audit import AuditLog


@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask-022", "umask-000"])
def test_the_audit_log_and_its_new_directories_are_private(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "logs" / "gateway" / "audit.jsonl"
    old = os.umask(umask)
    try:
        audit = AuditLog(path)
        audit.start()
        audit.record("grant", session="s", by="alice")
        audit.stop()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    [line] = path.read_text().splitlines()
    assert json.loads(line)["by"] == "alice"


def test_an_existing_log_is_appended_to_and_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"event": "before"}\n')
    path.chmod(0o640)  # the operator's choice, e.g. for a log shipper's group
    audit = AuditLog(path)
    audit.start()
    audit.record("session_end", session="s")
    audit.stop()
    assert [json.loads(x)["event"] for x in path.read_text().splitlines()] == [
        "before",
        "session_end",
    ]
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
