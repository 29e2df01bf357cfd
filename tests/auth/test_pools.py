"""Upstream credential pools (``gateway.auth.pools``): references, which pool serves whom,
failover and its cool-down, reload (by hand, by the file watcher, audited), the admin routes
and CLI, the metrics, the config checks, and no value in any repr, message, log or status."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import traceback
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import generate_latest

from gateway.appkeys import AUDIT, POOLS
from gateway.audit import AuditError, AuditLog
from gateway.auth.config import AuthSettings, CredentialEntry, pool_problems
from gateway.auth.planes import ADMIN_CALLER
from gateway.auth.pools import (
    MAX_SECRET_BYTES,
    ROUTES,
    CredentialPools,
    CredentialReferenceError,
    resolve,
)
from gateway.auth.principal import AdminCaller
from gateway.cli import main
from gateway.settings import Settings
from gateway.telemetry.metrics import Metrics
from tests.harness import read_audit, wait_until, write_text

CANARY = "sk-ant-CANARY-7d1e9c3b5a"
"""A value that must never show anywhere but in the header it is sent in."""
OTHER = "sk-ant-ROTATED-2f8a6c4e0b"
OPENAI = "sk-proj-CANARY-openai-4c2d"


def make_settings(credentials: dict[str, dict[str, list[dict[str, Any]]]], **auth: Any) -> Settings:
    upstreams = {name: {"credentials": pools} for name, pools in credentials.items()}
    return Settings(store="memory://", auth={"mode": "keys", **auth}, upstreams=upstreams)


class Clock:
    """Monotonic time a test moves by hand (the cool-down without waiting for it)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def header_value(pools: CredentialPools, upstream: str, pool: str | None = None) -> str:
    choice = pools.choose(upstream, pool, None, {})
    assert choice is not None
    ((_, value),) = choice.headers()
    return value


def two_entries(tmp_path: Path) -> tuple[Settings, dict[str, str], Path]:
    secret = tmp_path / "anthropic-2"
    secret.write_text(OTHER + "\n")
    env = {"ANTHROPIC_KEY": CANARY}
    settings = make_settings(
        {
            "anthropic": {
                "platform": [
                    {"name": "primary", "value": "env:ANTHROPIC_KEY"},
                    {"name": "secondary", "value": f"file:{secret}"},
                ]
            }
        }
    )
    return settings, env, secret


# -- references -----------------------------------------------------------------------------------
def test_env_and_file_references_resolve_to_secrets(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text(f"  {OTHER}\n")
    from_env = resolve("env:KEY", {"KEY": f"{CANARY}\n"})
    from_file = resolve(f"file:{path}", {})
    assert from_env.reveal() == CANARY and from_file.reveal() == OTHER  # stripped
    assert CANARY not in repr(from_env) and OTHER not in str(from_file)


def _fifo(tmp_path: Path) -> str:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return f"file:{path}"


@pytest.mark.parametrize(
    ("make", "env", "named", "problem"),
    [
        (lambda p: "env:MISSING_KEY", {}, "env:MISSING_KEY", "MISSING_KEY is not set"),
        (lambda p: "env:BLANK", {"BLANK": " \n"}, "env:BLANK", "is empty"),
        (lambda p: f"file:{p}/absent", {}, "absent", "no such file"),
        (lambda p: f"file:{p}", {}, "file:", "not a regular file"),  # a directory
        (_fifo, {}, "fifo", "not a regular file"),  # never blocks on a pipe
        (lambda p: "file:/dev/zero", {}, "file:/dev/zero", "not a regular file"),
        (lambda p: "env:SHORT", {"SHORT": "sk-1"}, "env:SHORT", "shorter than 8"),
        (lambda p: "env:TWO", {"TWO": f"{CANARY}\n{OTHER}"}, "env:TWO", "bare credential"),
        (lambda p: "env:BEARER", {"BEARER": f"Bearer {CANARY}"}, "env:BEARER", "bare credential"),
        (lambda p: "env:CTRL", {"CTRL": f"{CANARY}\r\nX-Evil: 1"}, "env:CTRL", "control"),
        (lambda p: CANARY, {}, "(credential value)", "not a reference"),
    ],
)
def test_an_unreadable_reference_is_named_and_its_value_never_shown(
    tmp_path: Path,
    make: Callable[[Path], str],
    env: dict[str, str],
    named: str,
    problem: str,
) -> None:
    with pytest.raises(CredentialReferenceError) as caught:
        resolve(make(tmp_path), env)
    text = "".join(traceback.format_exception(caught.value))
    assert named in str(caught.value) and problem in str(caught.value)
    assert CANARY not in text and OTHER not in text and CANARY not in repr(caught.value)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "is empty"),
        (b"\n  \n", "is empty"),
        (CANARY.encode() + b"\xff\xfe", "not UTF-8"),
        ((CANARY + "x" * MAX_SECRET_BYTES).encode(), "larger than 16 KiB"),
    ],
)
def test_a_bad_credential_file_is_refused_by_its_path(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    path = tmp_path / "mounted" / "key"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(CredentialReferenceError) as caught:
        resolve(f"file:{path}", {})
    assert str(caught.value).startswith(f"file:{path}: ") and problem in str(caught.value)
    assert CANARY not in "".join(traceback.format_exception(caught.value))


def test_a_path_with_a_line_break_is_shown_escaped(tmp_path: Path) -> None:
    """A crafted path cannot forge a second log line through the error that names it."""
    with pytest.raises(CredentialReferenceError) as caught:
        resolve(f"file:{tmp_path}/a\nforged log line", {})
    assert "\n" not in str(caught.value) and "\\n" in str(caught.value)


# -- building: headers, strict start --------------------------------------------------------------
def test_each_entry_is_sent_in_its_providers_header_unless_it_names_one() -> None:
    env = {"A": CANARY, "B": OTHER, "O": OPENAI, "P": OPENAI + "x"}
    settings = make_settings(
        {
            "anthropic": {
                "own": [{"name": "a", "value": "env:A"}],
                "bearer": [{"name": "b", "value": "env:B", "header": "authorization"}],
            },
            "openai": {
                "own": [{"name": "o", "value": "env:O"}],
                "keyed": [{"name": "p", "value": "env:P", "header": "x-api-key"}],
            },
        }
    )
    pools = CredentialPools.from_settings(settings, env)
    shapes = {
        (upstream, pool): pools.choose(upstream, pool, None, {}).headers()  # type: ignore[union-attr]
        for upstream, pool in [
            ("anthropic", "own"),
            ("anthropic", "bearer"),
            ("openai", "own"),
            ("openai", "keyed"),
        ]
    }
    assert shapes == {
        ("anthropic", "own"): (("x-api-key", CANARY),),
        ("anthropic", "bearer"): (("Authorization", f"Bearer {OTHER}"),),
        ("openai", "own"): (("Authorization", f"Bearer {OPENAI}"),),
        ("openai", "keyed"): (("x-api-key", OPENAI + "x"),),
    }
    # Built once at load: the request path gets the same tuple every time.
    first = pools.choose("anthropic", "own", None, {})
    again = pools.choose("anthropic", "own", None, {})
    assert first is again and first is not None and first.headers() is again.headers()  # type: ignore[union-attr]


def test_an_unreadable_reference_refuses_the_start_naming_each_one(tmp_path: Path) -> None:
    settings = make_settings(
        {
            "anthropic": {
                "platform": [
                    {"name": "primary", "value": "env:ANTHROPIC_KEY"},
                    {"name": "secondary", "value": f"file:{tmp_path}/gone"},
                ]
            }
        }
    )
    with pytest.raises(CredentialReferenceError) as caught:
        CredentialPools.from_settings(settings, {})
    message = str(caught.value)
    assert "upstreams.anthropic.platform.primary: env:ANTHROPIC_KEY" in message
    assert f"upstreams.anthropic.platform.secondary: file:{tmp_path}/gone: no such file" in message


def test_in_passthrough_pools_are_unused_so_a_missing_reference_only_shows_in_status() -> None:
    settings = make_settings(
        {"anthropic": {"platform": [{"name": "primary", "value": "env:ABSENT_KEY"}]}},
        mode="passthrough",
    )
    pools = CredentialPools.from_settings(settings, {})
    assert pools.choose("anthropic", None, None, {}) is None
    (entry,) = pools.status()["upstreams"]["anthropic"]["platform"]["entries"]
    assert entry["resolved"] is False and entry["healthy"] is False
    assert "ABSENT_KEY is not set" in entry["error"]


# -- which pool serves whom -----------------------------------------------------------------------
def test_choose_takes_the_principals_pool_then_its_teams_then_the_only_one() -> None:
    env = {"P": CANARY, "R": OTHER, "S": OPENAI}
    settings = make_settings(
        {
            "anthropic": {
                "platform": [{"name": "p", "value": "env:P"}],
                "research": [{"name": "r", "value": "env:R"}],
            },
            "openai": {"shared": [{"name": "s", "value": "env:S"}]},
        }
    )
    pools = CredentialPools.from_settings(settings, env)
    team_pools = {"lab": "research", "web": "platform"}

    def entry(upstream: str, pool: str | None, team: str | None) -> str | None:
        choice = pools.choose(upstream, pool, team, team_pools)
        return None if choice is None else choice.entry.name

    assert entry("anthropic", "platform", "lab") == "p"  # its own pool before its team's
    assert entry("anthropic", None, "lab") == "r"  # its team's
    assert entry("anthropic", "nonesuch", "lab") == "r"  # its own is not on this upstream
    assert entry("openai", "platform", "lab") == "s"  # the upstream's only pool serves all
    assert entry("openai", None, None) == "s"
    # Two pools and nothing naming one: no credential configured for this principal here.
    assert entry("anthropic", None, None) is None
    assert entry("anthropic", None, "unmapped") is None
    assert entry("anthropic", "nonesuch", None) is None
    assert entry("elsewhere", "platform", "lab") is None


def test_an_upstream_without_pools_serves_nobody() -> None:
    settings = make_settings({"anthropic": {"platform": [{"name": "p", "value": "env:P"}]}})
    pools = CredentialPools.from_settings(settings, {"P": CANARY})
    assert pools.choose("openai", None, None, {}) is None


# -- failover -------------------------------------------------------------------------------------
def _three(clock: Clock) -> CredentialPools:
    settings = make_settings(
        {
            "anthropic": {
                "platform": [
                    {"name": "first", "value": "env:K1"},
                    {"name": "second", "value": "env:K2"},
                    {"name": "third", "value": "env:K3"},
                ]
            }
        }
    )
    env = {"K1": CANARY, "K2": OTHER, "K3": OPENAI}
    return CredentialPools.from_settings(settings, env, cool_down=300.0, clock=clock)


def test_a_refused_entry_fails_over_to_the_next_in_order_then_to_none() -> None:
    clock = Clock()
    pools = _three(clock)
    seen: list[tuple[str, str, str, int]] = []
    pools.on_failure.append(lambda u, p, e, s: seen.append((u, p, e.name, s)))

    first = pools.choose("anthropic", None, None, {})
    assert first is not None and first.entry.name == "first"
    following = pools.failed("anthropic", "platform", "first", 401)
    assert following is not None and following.entry.name == "second"
    assert pools.choose("anthropic", None, None, {}) is following  # later calls skip it too
    last = pools.failed("anthropic", "platform", following.entry, 403)
    assert last is not None and last.entry.name == "third"
    assert pools.failed("anthropic", "platform", "third", 401) is None
    assert seen == [
        ("anthropic", "platform", "first", 401),
        ("anthropic", "platform", "second", 403),
        ("anthropic", "platform", "third", 401),
    ]
    # Every entry refused: calls still go out with the one refused longest ago (the client
    # then gets the provider's own answer), and failing it again offers nothing new.
    fallback = pools.choose("anthropic", None, None, {})
    assert fallback is not None and fallback.entry.name == "first"
    assert pools.failed("anthropic", "platform", "first", 401) is None
    assert list(pools.counts()) == [("anthropic", "platform", 0, 3)]


def test_a_refused_entry_is_tried_again_after_the_cool_down() -> None:
    clock = Clock()
    pools = _three(clock)
    pools.failed("anthropic", "platform", "first", 401)
    clock.now += 299.0
    assert pools.choose("anthropic", None, None, {}).entry.name == "second"  # type: ignore[union-attr]
    assert list(pools.counts()) == [("anthropic", "platform", 2, 3)]
    clock.now += 1.0
    assert pools.choose("anthropic", None, None, {}).entry.name == "first"  # type: ignore[union-attr]
    assert list(pools.counts()) == [("anthropic", "platform", 3, 3)]


def test_failures_of_unknown_pools_or_entries_change_nothing() -> None:
    pools = _three(Clock())
    assert pools.failed("anthropic", "nonesuch", "first", 401) is None
    assert pools.failed("openai", "platform", "first", 401) is None
    assert pools.failed("anthropic", "platform", "nonesuch", 401) is None
    assert list(pools.counts()) == [("anthropic", "platform", 3, 3)]


def test_a_failing_hook_does_not_fail_the_call(caplog: pytest.LogCaptureFixture) -> None:
    pools = _three(Clock())

    def broken(*args: object) -> None:
        raise RuntimeError("hook bug")

    pools.on_failure.append(broken)
    following = pools.failed("anthropic", "platform", "first", 401)
    assert following is not None and following.entry.name == "second"
    assert "credential failure hook failed" in caplog.text


# -- reload ---------------------------------------------------------------------------------------
async def test_reload_picks_up_a_changed_file_and_environment(tmp_path: Path) -> None:
    settings, env, secret = two_entries(tmp_path)
    pools = await CredentialPools.load(settings, env)
    assert header_value(pools, "anthropic") == CANARY
    env["ANTHROPIC_KEY"] = "sk-ant-NEW-env-value-1"
    await asyncio.to_thread(write_text, secret, "sk-ant-NEW-file-value-2\n")
    result = await pools.reload("test")
    assert result.ok and result.unchanged == 0
    assert result.changed == ("anthropic/platform/primary", "anthropic/platform/secondary")
    assert header_value(pools, "anthropic") == "sk-ant-NEW-env-value-1"
    following = pools.failed("anthropic", "platform", "primary", 401)
    assert following is not None and following.headers() == (
        ("x-api-key", "sk-ant-NEW-file-value-2"),
    )
    assert pools.reloads == 1 and pools.reload_reason == "test"


async def test_a_failed_reference_keeps_its_previous_value_and_is_reported(tmp_path: Path) -> None:
    settings, env, secret = two_entries(tmp_path)
    pools = await CredentialPools.load(settings, env)
    del env["ANTHROPIC_KEY"]
    await asyncio.to_thread(secret.unlink)
    result = await pools.reload("rotation gone wrong")
    assert not result.ok and result.changed == ()
    assert result.failed == {
        "anthropic/platform/primary": "env:ANTHROPIC_KEY: the environment variable"
        " ANTHROPIC_KEY is not set",
        "anthropic/platform/secondary": f"file:{secret}: no such file",
    }
    assert header_value(pools, "anthropic") == CANARY  # served on
    entries = pools.status()["upstreams"]["anthropic"]["platform"]["entries"]
    assert [e["healthy"] for e in entries] == [True, True]
    assert "is not set" in entries[0]["error"]
    # Half of a reload failing still swaps in the half that was read.
    env["ANTHROPIC_KEY"] = "sk-ant-NEW-env-value-1"
    result = await pools.reload("half fixed")
    assert result.changed == ("anthropic/platform/primary",) and list(result.failed) == [
        "anthropic/platform/secondary"
    ]
    assert header_value(pools, "anthropic") == "sk-ant-NEW-env-value-1"


async def test_reload_clears_the_failure_marks_of_changed_entries_only(tmp_path: Path) -> None:
    clock = Clock()
    settings, env, _ = two_entries(tmp_path)
    pools = await CredentialPools.load(settings, env, clock=clock)
    refused = pools.choose("anthropic", None, None, {})
    assert refused is not None
    pools.failed("anthropic", "platform", "primary", 401)
    pools.failed("anthropic", "platform", "secondary", 401)
    await pools.reload("nothing changed")
    assert list(pools.counts()) == [("anthropic", "platform", 0, 2)]
    env["ANTHROPIC_KEY"] = "sk-ant-NEW-env-value-1"
    await pools.reload("primary rotated")
    assert list(pools.counts()) == [("anthropic", "platform", 1, 2)]
    assert header_value(pools, "anthropic") == "sk-ant-NEW-env-value-1"
    # A 401 to the value sent before the reload does not mark the new one.
    assert pools.failed("anthropic", "platform", refused.entry, 401) is not None
    assert header_value(pools, "anthropic") == "sk-ant-NEW-env-value-1"


@pytest.fixture
async def audit(tmp_path: Path) -> AsyncIterator[AuditLog]:
    log = AuditLog(tmp_path / "audit.log")
    log.start()
    yield log
    await asyncio.to_thread(log.stop)


async def test_a_reload_is_audited_before_it_takes_effect(tmp_path: Path, audit: AuditLog) -> None:
    settings, env, _ = two_entries(tmp_path)
    pools = await CredentialPools.load(settings, env, audit=audit)
    env["ANTHROPIC_KEY"] = "sk-ant-NEW-env-value-1"
    await pools.reload("rotated", actor="token:abc123")
    assert audit.path is not None
    (line,) = await asyncio.to_thread(read_audit, audit.path)
    assert line["event"] == "credentials_reload" and line["actor"] == "token:abc123"
    assert line["changed"] == ["anthropic/platform/primary"] and line["failed"] == {}
    assert line["reason"] == "rotated" and line["unchanged"] == 1
    # An audit log that cannot be written: nothing is swapped in.
    closed = AuditLog(tmp_path / "closed.log")  # never started
    env["ANTHROPIC_KEY"] = "sk-ant-NEVER-applied-3"
    with pytest.raises(AuditError):
        await pools.reload("unaudited", audit=closed)
    assert header_value(pools, "anthropic") == "sk-ant-NEW-env-value-1"
    assert pools.reload_reason == "rotated"


async def test_a_refused_entry_is_audited_once(tmp_path: Path, audit: AuditLog) -> None:
    settings, env, _ = two_entries(tmp_path)
    pools = await CredentialPools.load(settings, env, audit=audit)
    for _ in range(3):
        pools.failed("anthropic", "platform", "primary", 401)
    assert audit.path is not None
    await wait_until(lambda: bool(read_audit(audit.path)))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)  # a second line, if any, is queued right behind the first
    lines = await asyncio.to_thread(read_audit, audit.path)
    assert [(x["event"], x["entry"], x["status"]) for x in lines] == [
        ("credential_failed", "primary", 401)
    ]


async def test_the_watcher_reloads_when_a_credential_file_changes(tmp_path: Path) -> None:
    settings, env, secret = two_entries(tmp_path)
    pools = await CredentialPools.load(settings, env)
    pools.failed("anthropic", "platform", "primary", 401)
    watcher = asyncio.get_running_loop().create_task(pools.watch(interval=0.01))
    try:
        await asyncio.to_thread(write_text, secret, "sk-ant-FROM-the-watcher-4\n")
        await wait_until(lambda: pools.reloads == 1)
        assert pools.reload_reason == f"file changed: {secret}"
        assert header_value(pools, "anthropic") == "sk-ant-FROM-the-watcher-4"
        await asyncio.sleep(0.05)  # unchanged since: no further reload
        assert pools.reloads == 1
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def test_without_file_references_the_watcher_has_nothing_to_watch() -> None:
    settings = make_settings({"anthropic": {"platform": [{"name": "p", "value": "env:P"}]}})
    pools = await CredentialPools.load(settings, {"P": CANARY})
    await asyncio.wait_for(pools.watch(interval=0.01), 1)


# -- no value anywhere ----------------------------------------------------------------------------
async def test_no_value_in_any_repr_message_log_status_or_audit_line(
    tmp_path: Path, audit: AuditLog, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings, env, secret = two_entries(tmp_path)
    pools = await CredentialPools.load(settings, env, audit=audit)
    choice = pools.choose("anthropic", None, None, {})
    assert choice is not None
    following = pools.failed("anthropic", "platform", choice.entry, 401)
    await asyncio.to_thread(secret.write_text, "short\n")  # a failed reload, reported
    result = await pools.reload("leak check")
    assert not result.ok
    texts = [
        repr(pools),
        repr(choice),
        str(choice),
        repr(choice.entry),
        repr(following),
        repr(choice.entry.secret),
        repr(result),
        json.dumps(result.to_json()),
        json.dumps(pools.status()),
        caplog.text,
    ]
    assert audit.path is not None
    await wait_until(lambda: len(read_audit(audit.path)) >= 2)  # type: ignore[arg-type]
    texts.append(await asyncio.to_thread(audit.path.read_text))
    for text in texts:
        assert CANARY not in text and OTHER not in text, text
    with pytest.raises(TypeError):
        pickle.dumps(choice.entry)
    with pytest.raises(TypeError):
        pickle.dumps(choice)


# -- the admin routes and the CLI ------------------------------------------------------------------
OPERATOR = AdminCaller(actor="oidc:alice", method="oidc", roles=frozenset({"operator"}))


@web.middleware
async def _as_operator(request: web.Request, handler: Any) -> web.StreamResponse:
    """Stands in for the admin guard: the caller it would have admitted."""
    if request.headers.get("X-Test-Anonymous") is None:
        request[ADMIN_CALLER] = OPERATOR
    response: web.StreamResponse = await handler(request)
    return response


def admin_app(pools: CredentialPools, audit: AuditLog) -> web.Application:
    app = web.Application()
    admin = web.Application(middlewares=[_as_operator])
    for method, path, handler, scope in ROUTES:
        assert scope == "credentials:write"
        admin.router.add_route(method, path, handler)
    app[POOLS], app[AUDIT] = pools, audit
    app.add_subapp("/gateway", admin)
    return app


@pytest.fixture
async def served(
    tmp_path: Path, audit: AuditLog, aiohttp_client: Any
) -> tuple[TestClient[Any, Any], CredentialPools, dict[str, str]]:
    settings, env, _ = two_entries(tmp_path)
    pools = await CredentialPools.load(settings, env)
    client: TestClient[Any, Any] = await aiohttp_client(admin_app(pools, audit))
    return client, pools, env


async def test_the_admin_routes_reload_and_show_status_never_values(
    served: tuple[TestClient[Any, Any], CredentialPools, dict[str, str]], audit: AuditLog
) -> None:
    client, _, env = served
    env["ANTHROPIC_KEY"] = "sk-ant-NEW-env-value-1"
    response = await client.post("/gateway/credentials/reload", json={"reason": "rotated"})
    assert response.status == 200
    body = await response.json()
    assert body["ok"] and body["changed"] == ["anthropic/platform/primary"]
    assert audit.path is not None
    (line,) = await asyncio.to_thread(read_audit, audit.path)
    assert line["actor"] == "oidc:alice" and line["reason"] == "rotated"

    status = await client.get("/gateway/credentials")
    text = await status.text()
    assert status.status == 200 and CANARY not in text and "sk-ant-NEW" not in text
    entries = json.loads(text)["upstreams"]["anthropic"]["platform"]["entries"]
    assert [(e["name"], e["reference"], e["healthy"]) for e in entries] == [
        ("primary", "env:ANTHROPIC_KEY", True),
        ("secondary", entries[1]["reference"], True),
    ]
    assert json.loads(text)["reload_reason"] == "rotated"


@pytest.mark.parametrize(
    ("body", "status", "said"),
    [
        (b"not json", 400, "must be JSON"),
        (b'{"reason": "x", "values": {"primary": "sk-ant-inline"}}', 400, "reload takes only"),
        (b'{"reason": 5}', 400, "reason"),
        (b'["reason"]', 400, "reload takes only"),
        (b'{"reason": "' + b"x" * 600 + b'"}', 400, "reason"),
        (b'{"reason": "' + b"x" * 5000 + b'"}', 413, "larger than"),
    ],
)
async def test_a_bad_reload_body_is_refused_and_nothing_reloads(
    served: tuple[TestClient[Any, Any], CredentialPools, dict[str, str]],
    body: bytes,
    status: int,
    said: str,
) -> None:
    client, pools, _ = served
    response = await client.post(
        "/gateway/credentials/reload", data=body, headers={"Content-Type": "application/json"}
    )
    assert response.status == status
    answer = await response.json()
    assert said in answer["error"] and "sk-ant-inline" not in answer["error"]
    assert pools.reloads == 0


async def test_a_reload_the_audit_log_refuses_is_not_made(
    tmp_path: Path, aiohttp_client: Any
) -> None:
    settings, env, _ = two_entries(tmp_path)
    pools = await CredentialPools.load(settings, env)
    client = await aiohttp_client(admin_app(pools, AuditLog(tmp_path / "never-started.log")))
    env["ANTHROPIC_KEY"] = "sk-ant-NEVER-applied-3"
    response = await client.post("/gateway/credentials/reload", json={})
    assert response.status == 503
    assert "not reloaded" in (await response.json())["error"]
    assert header_value(pools, "anthropic") == CANARY and pools.reloads == 0
    anonymous = await client.post(
        "/gateway/credentials/reload", json={}, headers={"X-Test-Anonymous": "1"}
    )
    assert anonymous.status == 401


async def _cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def test_the_cli_reloads_and_shows_the_pools(
    tmp_path: Path, audit: AuditLog, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, env, secret = two_entries(tmp_path)
    pools = await CredentialPools.load(settings, env)
    server = TestServer(admin_app(pools, audit))
    await server.start_server()
    try:
        url = str(server.make_url("")).rstrip("/")
        pools.failed("anthropic", "platform", "primary", 401)
        assert await _cli("credentials", "status", "--url", url) == 0
        shown = capsys.readouterr().out
        assert "primary" in shown and "env:ANTHROPIC_KEY" in shown and "refused 401" in shown
        assert "secondary" in shown and "healthy" in shown and CANARY not in shown

        env["ANTHROPIC_KEY"] = "sk-ant-NEW-env-value-1"
        assert await _cli("credentials", "reload", "--reason", "rotated", "--url", url) == 0
        out = capsys.readouterr().out
        assert "reloaded 2 credentials: 1 changed" in out and "anthropic/platform/primary" in out

        await asyncio.to_thread(secret.unlink)
        assert await _cli("credentials", "--url", url, "reload") == 1  # a reference failed
        out = capsys.readouterr().out
        assert f"anthropic/platform/secondary: file:{secret}: no such file" in out
        assert OTHER not in out

        assert await _cli("credentials", "status", "--json", "--url", url) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["reload_reason"] == "admin" and data["reloads"] == 2
    finally:
        await server.close()


# -- metrics --------------------------------------------------------------------------------------
def test_pool_health_and_failures_are_exported() -> None:
    clock = Clock()
    pools = _three(clock)
    metrics = Metrics()
    metrics.watch_pools(pools)
    exported = generate_latest(metrics.registry).decode()
    assert 'gateway_upstream_credential_pool_healthy{pool="platform",upstream="anthropic"} 3.0' in (
        exported
    )
    assert 'gateway_upstream_credential_pool_entries{pool="platform",upstream="anthropic"} 3.0' in (
        exported
    )
    assert (
        'gateway_upstream_credential_failures_total{entry="second",pool="platform",'
        'upstream="anthropic"} 0.0' in exported
    )
    pools.failed("anthropic", "platform", "first", 401)
    pools.failed("anthropic", "platform", "first", 401)
    exported = generate_latest(metrics.registry).decode()
    assert 'gateway_upstream_credential_pool_healthy{pool="platform",upstream="anthropic"} 2.0' in (
        exported
    )
    assert (
        'gateway_upstream_credential_failures_total{entry="first",pool="platform",'
        'upstream="anthropic"} 2.0' in exported
    )
    assert CANARY not in exported


# -- config checks --------------------------------------------------------------------------------
def test_pool_problems_refuse_what_can_never_work() -> None:
    entry = CredentialEntry(name="primary", value="env:KEY")
    credentials = {
        "anthropic": {"platform": [entry, entry], "empty": [], "bad name!": [entry]},
        "openai": {},
    }
    auth = AuthSettings(
        mode="keys",
        team_pools={"lab": "research", "web": "platform"},
        keys=[
            {"id": "abcdef", "hash": "0" * 64, "name": "k", "team": "web", "pool": "gone"},
            {"id": "abcdeg", "hash": "0" * 64, "name": "k2", "team": "web", "pool": "platform"},
        ],
    )
    problems = dict(pool_problems(auth, credentials))
    assert problems[("upstreams", "anthropic", "credentials", "platform")] == (
        "entry names used twice: primary"
    )
    assert "empty pool" in problems[("upstreams", "anthropic", "credentials", "empty")]
    assert "not a pool name" in problems[("upstreams", "anthropic", "credentials", "bad name!")]
    assert "no upstream has a pool named 'research'" in problems[("auth", "team_pools", "lab")]
    assert "'gone'" in problems[("auth", "keys", "0", "pool")]
    assert len(problems) == 5  # web's pool and the second key's exist


def test_pool_problems_in_each_mode_without_any_pool() -> None:
    for mode, refused in (("keys", True), ("jwt", True), ("mixed", False), ("passthrough", False)):
        issuers = [{"issuer": "https://idp.example", "audience": ["gw"]}] if mode == "jwt" else []
        auth = AuthSettings(mode=mode, jwt_issuers=issuers)
        problems = dict(pool_problems(auth, {"anthropic": {}, "openai": {}}))
        assert (("auth", "mode") in problems) is refused, mode


def test_pool_problems_accept_a_settings_upstreams_as_they_are() -> None:
    settings = make_settings(
        {"anthropic": {"platform": [{"name": "p", "value": "env:P"}]}}, team_pools={"w": "platform"}
    )
    credentials = {name: u.credentials for name, u in settings.upstreams.items()}
    assert pool_problems(settings.auth, credentials) == []
