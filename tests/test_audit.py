"""The audit log: JSON lines written by a thread, in a file only the gateway's user can read;
one line for every control-plane change, on disk before the change takes effect."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from gateway.appkeys import AUDIT, POLICY, UPSTREAMS
from gateway.audit import MAX_FIELD, MAX_REASON, AuditError, AuditLog, token_actor
from gateway.policy import LivePolicy, PolicyError
from gateway.settings import load_settings
from tests.harness import (
    ADMIN,
    ADMIN_TOKEN,
    Gateway,
    MakeGateway,
    key_hash,
    read_audit,
    session_headers,
    write_text,
)
from tests.policy.apis import call


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


# The trail of control-plane changes: what each line holds, that a change asked for is on
# disk before it takes effect, and that a change whose line cannot be written is not made.


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def started(path: Path | None) -> AuditLog:
    audit = AuditLog(path)
    audit.start()
    return audit


class Gate:
    """Holds the audit writer thread inside its write until ``open()``: the test sees what
    the gateway does while a line is not yet on disk."""

    def __init__(self, audit: AuditLog, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()
        write = audit._append

        def held(fd: int, line: bytes) -> int:
            self.entered.set()
            assert self.released.wait(10), "the test never opened the gate"
            return write(fd, line)

        monkeypatch.setattr(audit, "_append", held)

    async def reached(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 5), "nothing reached the audit log"

    def open(self) -> None:
        self.released.set()


def failing(audit: AuditLog, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, line: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(audit, "_append", full)


async def test_commit_returns_with_the_line_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = started(path)
    try:
        await audit.commit("grant", actor="loopback", reason="why", session="s", turns=2)
        # Read before the log stops: commit's return is the promise, not stop's flush.
        [line] = await asyncio.to_thread(lines, path)
        assert line["event"] == "grant" and line["actor"] == "loopback"
        assert line["reason"] == "why" and line["session"] == "s" and line["turns"] == 2
        assert isinstance(line["ts"], float)
    finally:
        await asyncio.to_thread(audit.stop)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_every_line_has_time_event_actor_and_a_bounded_reason(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = started(path)
    audit.record("breaker", upstream="openai", old="closed", new="open", reason="x" * 10_000)
    await audit.commit("policy_refused", actor="system", error="e" * 100_000, odd=Path("/p"))
    await asyncio.to_thread(audit.stop)
    recorded, committed = await asyncio.to_thread(lines, path)
    assert recorded["actor"] == "system" and len(recorded["reason"]) == MAX_REASON
    assert committed["reason"] == "" and len(committed["error"]) == MAX_FIELD
    assert committed["odd"] == "/p"  # a value of another type is written as text
    for line in (recorded, committed):
        assert {"ts", "event", "actor", "reason"} <= line.keys()


async def test_a_line_that_cannot_be_written_refuses_the_commit(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    audit = started(blocker / "audit.jsonl")
    try:
        with pytest.raises(AuditError, match="cannot write the audit log"):
            await audit.commit("grant", actor="loopback", session="s")
        audit.record("breaker", upstream="openai")  # the request path goes on regardless
    finally:
        await asyncio.to_thread(audit.stop)


async def test_a_full_disk_refuses_then_recovers_with_whole_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    audit = started(path)
    await audit.commit("grant", actor="loopback", session="before")
    write = audit._append
    calls = 0

    def half_then_full(fd: int, line: bytes) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return write(fd, line[: len(line) // 2])  # the disk filled part way
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(audit, "_append", half_then_full)
    for session in ("torn", "refused"):
        with pytest.raises(AuditError):
            await audit.commit("grant", actor="loopback", session=session)
    monkeypatch.setattr(audit, "_append", write)
    await audit.commit("grant", actor="loopback", session="after")
    await asyncio.to_thread(audit.stop)
    text = await asyncio.to_thread(path.read_text)
    whole = []
    for raw in text.splitlines():
        try:
            whole.append(json.loads(raw)["session"])
        except ValueError:
            assert raw.startswith('{"ts"')  # the torn half stands alone on its line
    assert whole == ["before", "after"]


async def test_commit_before_start_or_after_stop_is_refused(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(AuditError, match="not open"):
        await audit.commit("grant", actor="loopback")
    audit.start()
    await asyncio.to_thread(audit.stop)
    with pytest.raises(AuditError, match="not open"):
        await audit.commit("grant", actor="loopback")


async def test_without_a_path_lines_go_to_the_logger(caplog: pytest.LogCaptureFixture) -> None:
    audit = started(None)
    with caplog.at_level(logging.INFO, logger="gateway.audit"):
        await audit.commit("session_end", actor="loopback", session="s", reason="done")
        audit.record("breaker", upstream="openai")
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.audit"]
    assert [(e["event"], e["actor"]) for e in logged] == [
        ("session_end", "loopback"),
        ("breaker", "system"),
    ]


async def test_many_commits_at_once_are_all_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = started(path)
    big = "r" * 400

    async def one(i: int) -> None:
        if i % 5 == 0:
            audit.record("breaker", upstream=f"u{i}", reason=big)
        await audit.commit("grant", actor="loopback", session=f"s{i}", reason=big)

    await asyncio.gather(*(one(i) for i in range(300)))
    await asyncio.to_thread(audit.stop)
    written = await asyncio.to_thread(lines, path)
    assert sorted(e["session"] for e in written if e["event"] == "grant") == sorted(
        f"s{i}" for i in range(300)
    )
    assert len([e for e in written if e["event"] == "breaker"]) == 60


async def test_a_commit_given_up_before_its_turn_is_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    audit = started(path)
    gate = Gate(audit, monkeypatch)
    first = asyncio.get_running_loop().create_task(audit.commit("grant", actor="a", session="1"))
    await gate.reached()
    second = asyncio.get_running_loop().create_task(audit.commit("grant", actor="a", session="2"))
    await asyncio.sleep(0.01)
    second.cancel()  # e.g. the admin call's handler cancelled: its change will not be made
    gate.open()
    await first
    with pytest.raises(asyncio.CancelledError):
        await second
    await asyncio.to_thread(audit.stop)
    assert [e["session"] for e in await asyncio.to_thread(lines, path)] == ["1"]


async def test_the_log_is_appended_to_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for run in range(3):
        audit = started(path)
        await audit.commit("policy_loaded", actor="system", reason="start", run=run)
        audit.record("breaker", actor="system", run=run)
        await asyncio.to_thread(audit.stop)
    written = await asyncio.to_thread(lines, path)
    assert [(e["event"], e["run"]) for e in written] == [
        (event, run) for run in range(3) for event in ("policy_loaded", "breaker")
    ]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_path_comes_from_the_config_or_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(f"audit_log: {tmp_path / 'from-file.jsonl'}\n")
    assert load_settings(config, env={}).audit_log == tmp_path / "from-file.jsonl"
    env = {"GATEWAY_AUDIT_LOG": str(tmp_path / "from-env.jsonl")}
    assert load_settings(config, env=env).audit_log == tmp_path / "from-env.jsonl"


def test_a_token_actor_is_its_hash() -> None:
    digest = hashlib.sha256(b"s3cret-admin").hexdigest()[:12]
    assert token_actor("s3cret-admin") == f"token:{digest}"


# Through a running gateway: each kind of change, read back from the file.

TEN_TURNS = "version: 1\ndefaults:\n  limits: {max_turns: 10}\n"
THREE_TURNS = "version: 1\ndefaults:\n  limits: {max_turns: 3}\n"
BROKEN = "version: 1\ndefaults:\n  limits:\n    max_turns: -5\n"


async def events(gw: Gateway, event: str) -> list[dict[str, Any]]:
    """The file as it is now (``Gateway.audit_events`` waits for a line; this does not)."""
    written = await asyncio.to_thread(read_audit, gw.audit_path)
    return [e for e in written if e["event"] == event]


def version_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


async def rewrite(gw: Gateway, text: str, forward: float) -> None:
    assert gw.policy_path is not None
    await asyncio.to_thread(write_text, gw.policy_path, text, bump_mtime=forward)


async def test_policy_load_reload_and_refusal_are_audited(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(TEN_TURNS)
    [loaded] = await gw.audit_events("policy_loaded")
    assert loaded["actor"] == "system" and loaded["reason"] == "start"
    assert loaded["version"] == version_of(TEN_TURNS) and loaded["previous"] is None
    assert loaded["source"] == str(gw.policy_path)

    await rewrite(gw, THREE_TURNS, forward=5)
    live = gw.server.app[POLICY]
    assert await live.reload("SIGHUP")
    [reloaded] = await gw.audit_events("policy_loaded", lambda e: e["reason"] == "SIGHUP")
    assert reloaded["version"] == version_of(THREE_TURNS)
    assert reloaded["previous"] == version_of(TEN_TURNS)

    await rewrite(gw, BROKEN, forward=10)
    assert not await live.reload("SIGHUP")
    [refused] = await gw.audit_events("policy_refused")
    assert refused["actor"] == "system" and refused["reason"] == "SIGHUP"
    assert "line 4: defaults.limits.max_turns" in refused["error"]
    assert refused["kept"] == version_of(THREE_TURNS)
    assert live.policy.version == version_of(THREE_TURNS)


async def test_a_policy_whose_line_cannot_be_written_is_not_loaded(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await make_gateway(TEN_TURNS)
    live = gw.server.app[POLICY]
    failing(gw.server.app[AUDIT], monkeypatch)
    await rewrite(gw, THREE_TURNS, forward=5)
    assert not await live.reload("SIGHUP")
    assert live.policy.version == version_of(TEN_TURNS)
    assert live.last_error is not None and "audit log" in live.last_error
    assert live.failures == 1


async def test_a_gateway_whose_audit_log_cannot_be_written_does_not_start(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    audit = started(blocker / "audit.jsonl")
    try:
        with pytest.raises(PolicyError, match="not loaded: cannot write the audit log"):
            await LivePolicy(None, audit).load()
    finally:
        await asyncio.to_thread(audit.stop)


async def test_grant_and_end_are_audited_with_who_and_why(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(TEN_TURNS)
    await call(gw, "chat", session_headers("audited"))
    await gw.grant("audited", turns=3, by="alice", reason="needs more")
    await gw.admin_post("/gateway/sessions/audited/end", {"by": "bob", "reason": "done"})
    [granted] = await gw.audit_events("grant")
    assert granted["actor"] == token_actor(ADMIN_TOKEN) and granted["session"] == "audited"
    assert granted["auth"] == "token" and granted["peer"] == "127.0.0.1"
    assert (granted["turns"], granted["by"], granted["reason"]) == (3, "alice", "needs more")
    [ended] = await gw.audit_events("session_end")
    assert ended["actor"] == token_actor(ADMIN_TOKEN)
    assert (ended["by"], ended["reason"]) == ("bob", "done")
    assert await gw.audit_events("grant_undone") == []


async def test_the_actor_is_the_admin_tokens_hash_never_the_token(
    make_gateway: MakeGateway,
) -> None:
    token = "op-Vb8Kq3Rw6Tz1Yx4Nm7Pd2Lc9Hf5Gs0Ja"
    gw = await make_gateway(TEN_TURNS, admin_token=token)
    await call(gw, "chat", session_headers("tokened"))
    auth = {"Authorization": f"Bearer {token}"}
    url = gw.url("/gateway/sessions/tokened/grant")
    async with gw._http.post(url, json={"turns": 1}, headers=auth) as resp:
        assert resp.status == 200
    [granted] = await gw.audit_events("grant")
    assert granted["actor"] == token_actor(token) == f"token:{key_hash(token)}"
    text = await asyncio.to_thread(gw.audit_path.read_text)
    assert token not in text


async def test_a_grant_takes_effect_only_once_its_line_is_written(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await make_gateway(TEN_TURNS)
    await call(gw, "chat", session_headers("ordered"))
    gate = Gate(gw.server.app[AUDIT], monkeypatch)
    granting = asyncio.get_running_loop().create_task(gw.grant("ordered", turns=7))
    await gate.reached()
    await asyncio.sleep(0.05)  # time enough for the grant, were it not waiting for the line
    assert (await gw.record("ordered")).granted_turns == 0
    assert not granting.done() and await events(gw, "grant") == []
    gate.open()
    shown = await granting
    assert shown["granted_turns"] == 7
    # Read at once, no waiting: the line was on disk before the answer.
    [line] = await events(gw, "grant")
    assert line["session"] == "ordered" and line["turns"] == 7


async def test_an_end_takes_effect_only_once_its_line_is_written(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await make_gateway(TEN_TURNS)
    await call(gw, "chat", session_headers("ending"))
    gate = Gate(gw.server.app[AUDIT], monkeypatch)
    ending = asyncio.get_running_loop().create_task(
        gw.admin_post("/gateway/sessions/ending/end", {"reason": "runaway"})
    )
    await gate.reached()
    await asyncio.sleep(0.05)
    assert (await gw.record("ending")).status != "ended"
    assert await events(gw, "session_end") == []
    gate.open()
    assert (await ending)["status"] == "ended"
    [line] = await events(gw, "session_end")
    assert line["session"] == "ending" and line["reason"] == "runaway"


async def test_an_admin_change_whose_line_cannot_be_written_is_refused(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await make_gateway(TEN_TURNS)
    await call(gw, "chat", session_headers("unaudited"))
    failing(gw.server.app[AUDIT], monkeypatch)
    for path, body in (("grant", {"turns": 5}), ("end", {"reason": "x"})):
        url = gw.url(f"/gateway/sessions/unaudited/{path}")
        async with gw._http.post(url, json=body, headers=ADMIN) as resp:
            assert resp.status == 503
            error = (await resp.json())["error"]
        assert "audit log" in error and "the change was not made" in error
    record = await gw.record("unaudited")
    assert record.granted_turns == 0 and record.status != "ended"


async def test_refused_admin_calls_change_nothing_and_write_no_change(
    make_gateway: MakeGateway,
) -> None:
    """An unknown session (404) changes nothing: no line. A call without the token (401)
    changes nothing either: its line says it was denied, and who tried, never a change."""
    gw = await make_gateway(TEN_TURNS)
    for path, body in (("grant", {"turns": 1}), ("end", {"reason": "x"})):
        url = gw.url(f"/gateway/sessions/nobody/{path}")
        async with gw._http.post(url, json=body, headers=ADMIN) as resp:
            assert resp.status == 404
    written = await asyncio.to_thread(read_audit, gw.audit_path)
    assert [e["event"] for e in written] == ["policy_loaded"]
    await call(gw, "chat", session_headers("someone"))
    url = gw.url("/gateway/sessions/someone/grant")
    async with gw._http.post(url, json={"turns": 1}) as resp:
        assert resp.status == 401
    [denied] = await gw.audit_events("admin_denied")
    assert (denied["actor"], denied["reason"]) == ("unauthenticated", "missing")
    assert denied["scope"] == "sessions:write" and denied["method"] == "POST"
    written = await asyncio.to_thread(read_audit, gw.audit_path)
    assert [e["event"] for e in written] == ["policy_loaded", "admin_denied"]
    assert (await gw.record("someone")).granted_turns == 0


async def test_a_breaker_transition_is_audited_as_the_systems(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(TEN_TURNS)
    breaker = gw.server.app[UPSTREAMS].by_name["openai"].breaker
    breaker.force("open", "test")
    breaker.force("closed", "test over")
    # record(): written promptly by the thread, not awaited; wait for the second line.
    assert await gw.audit_events("breaker", lambda e: e["new"] == "closed"), "no breaker line"
    opened, closed = await gw.audit_events("breaker")
    assert (opened["actor"], opened["upstream"], opened["old"], opened["new"]) == (
        "system",
        "openai",
        "closed",
        "open",
    )
    assert opened["reason"] == "test" and closed["reason"] == "test over"
