"""The policy in force: the packaged default, hot reload of a changed file, and a broken file
refused while the old policy stays."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from gateway.policy import packaged_default
from tests.harness import POLICIES, Gateway, MakeGateway, session_headers, write_text
from tests.policy.apis import call
from tests.policy.hostile import HOSTILE, deep

TEN_TURNS = """\
version: 1
defaults:
  limits: {max_turns: 10}
"""
THREE_TURNS = """\
version: 1
defaults:
  limits: {max_turns: 3}
rules:
  - name: added-later
    match: {agent: nobody}
"""
BROKEN_SCHEMA = """\
version: 1
defaults:
  limits:
    max_turns: -5
"""
BROKEN_YAML = """\
version: 1
defaults:
  limits: {max_turns: 3
rules: []
"""


def version_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


async def eventually(check: Callable[[], Awaitable[Any]], within: float = 1.0) -> Any:
    """Poll ``check`` until it returns something truthy, for at most ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.02)


async def rewrite(gw: Gateway, text: str, forward: float) -> None:
    assert gw.policy_path is not None
    await asyncio.to_thread(write_text, gw.policy_path, text, bump_mtime=forward)


async def test_the_packaged_default_runs_without_a_policy(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(None)
    shown = await gw.admin_get("/gateway/policy")
    assert "default.yaml" in shown["source"]
    assert shown["rules"] == [] and shown["last_error"] is None and shown["reloads"] == 1
    text, _ = await asyncio.to_thread(packaged_default)
    assert shown["version"] == version_of(text)
    outcome = await call(gw, "chat", session_headers("packaged"))
    assert outcome.ok
    assert outcome.headers["x-gateway-turns-remaining"] == "999"  # defaults.limits.max_turns
    assert outcome.headers["x-gateway-policy"] == f"{version_of(text)}; rules=defaults"


def test_policies_default_yaml_is_the_packaged_one() -> None:
    # policies/default.yaml says it is the file `gateway serve` runs without --policy.
    text, _ = packaged_default()
    assert (POLICIES / "default.yaml").read_text() == text


async def test_a_changed_file_takes_effect_and_a_broken_one_is_refused(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(TEN_TURNS, policy_poll_interval=0.05)
    first = await gw.admin_get("/gateway/policy")
    assert first["version"] == version_of(TEN_TURNS)
    assert first["source"] == str(gw.policy_path) and first["reloads"] == 1
    for _ in range(2):
        assert (await call(gw, "chat", session_headers("hot"))).ok

    # A lower max_turns: the next requests obey it within a second.
    await rewrite(gw, THREE_TURNS, forward=5)
    probes = iter(range(1000))

    async def obeys_three() -> bool:
        outcome = await call(gw, "chat", session_headers(f"probe-{next(probes)}"))
        return outcome.headers["x-gateway-turns-remaining"] == "2"

    assert await eventually(obeys_three), "the new policy was not in force within a second"
    assert (await call(gw, "chat", session_headers("hot"))).ok  # turn 3 of 3
    refused = await call(gw, "chat", session_headers("hot"))
    assert refused.status == 400 and "all 3 turns" in refused.message
    assert version_of(THREE_TURNS) in refused.headers["x-gateway-policy"]

    second = await gw.admin_get("/gateway/policy")
    assert second["version"] == version_of(THREE_TURNS)
    assert second["reloads"] == 2 and second["rules"] == ["added-later"]
    assert second["loaded_at"] > first["loaded_at"]
    loaded = await gw.audit_events("policy_loaded", lambda e: e["reason"] == "file changed")
    assert loaded and loaded[0]["version"] == version_of(THREE_TURNS)

    # A broken file: refused, the old policy stays, the error names the line.
    await rewrite(gw, BROKEN_SCHEMA, forward=10)

    async def refused_file() -> Any:
        shown = await gw.admin_get("/gateway/policy")
        return shown if shown["last_error"] else None

    third = await eventually(refused_file)
    assert third, "the broken file was not noticed within a second"
    assert "line 4: defaults.limits.max_turns" in third["last_error"]
    assert str(gw.policy_path) in third["last_error"]
    assert third["version"] == version_of(THREE_TURNS)
    assert third["reloads"] == 2 and third["failures"] == 1
    assert third["last_error_at"] >= second["loaded_at"]
    outcome = await call(gw, "chat", session_headers("after-broken"))
    assert outcome.ok and outcome.headers["x-gateway-turns-remaining"] == "2"
    [audited] = await gw.audit_events("policy_refused")
    assert "line 4" in audited["error"] and audited["source"] == str(gw.policy_path)

    # The broken file is not retried over and over while it stays as it is.
    await asyncio.sleep(0.2)
    assert (await gw.admin_get("/gateway/policy"))["failures"] == 1

    # Fixed: loads again, and the error is cleared.
    await rewrite(gw, TEN_TURNS, forward=15)

    async def fixed() -> Any:
        shown = await gw.admin_get("/gateway/policy")
        return shown if shown["version"] == version_of(TEN_TURNS) else None

    fourth = await eventually(fixed)
    assert fourth and fourth["last_error"] is None and fourth["reloads"] == 3


@pytest.mark.parametrize("broken", [BROKEN_SCHEMA, BROKEN_YAML], ids=["schema", "yaml"])
async def test_a_broken_file_keeps_the_policy_in_force(
    make_gateway: MakeGateway, broken: str
) -> None:
    gw = await make_gateway(THREE_TURNS, policy_poll_interval=0.05)
    await rewrite(gw, broken, forward=5)

    async def refused_file() -> Any:
        shown = await gw.admin_get("/gateway/policy")
        return shown if shown["last_error"] else None

    shown = await eventually(refused_file)
    assert shown, "the broken file was not noticed within a second"
    assert shown["version"] == version_of(THREE_TURNS)
    assert "line " in shown["last_error"]
    for turn in (1, 2, 3):
        assert (await call(gw, "chat", session_headers("kept"))).ok, turn
    assert (await call(gw, "chat", session_headers("kept"))).status == 400


async def test_a_broken_file_at_start_stops_the_gateway(make_gateway: MakeGateway) -> None:
    with pytest.raises(Exception, match=r"line 4: defaults\.limits\.max_turns"):
        await make_gateway(BROKEN_SCHEMA)


async def test_sighup_reloads_at_once(make_gateway: MakeGateway) -> None:
    """With file polling far off, SIGHUP alone brings the new file in."""
    import os
    import signal

    gw = await make_gateway(TEN_TURNS, policy_poll_interval=3600)
    await rewrite(gw, THREE_TURNS, forward=5)
    os.kill(os.getpid(), signal.SIGHUP)

    async def reloaded() -> Any:
        shown = await gw.admin_get("/gateway/policy")
        return shown["version"] == version_of(THREE_TURNS)

    assert await eventually(reloaded), "SIGHUP did not reload the policy"
    loaded = await gw.audit_events("policy_loaded", lambda e: e["reason"] == "SIGHUP")
    assert loaded and loaded[0]["version"] == version_of(THREE_TURNS)


async def write_bytes(gw: Gateway, content: bytes, forward: float) -> None:
    def write() -> None:
        # Whole, then renamed into place: a poll in the middle of writing a large file would
        # see a half-written one (a second, different refusal).
        assert gw.policy_path is not None
        staged = gw.policy_path.with_suffix(".staged")
        staged.write_bytes(content)
        stat = staged.stat()
        os.utime(staged, (stat.st_atime + forward, stat.st_mtime + forward))
        os.replace(staged, gw.policy_path)

    await asyncio.to_thread(write)


async def policy_shown(gw: Gateway, check: Callable[[dict[str, Any]], bool]) -> Any:
    async def shown() -> Any:
        policy = await gw.admin_get("/gateway/policy")
        return policy if check(policy) else None

    return await eventually(shown, within=3.0)


@pytest.mark.parametrize("name", ["not-utf8", "deep-block", "very-deep", "alias-bomb", "oversized"])
async def test_a_hostile_file_on_change_is_refused_and_the_watcher_goes_on(
    make_gateway: MakeGateway, name: str
) -> None:
    content, at, message = HOSTILE[name]
    gw = await make_gateway(THREE_TURNS, policy_poll_interval=0.05)
    await write_bytes(gw, content, forward=5)

    refused = await policy_shown(gw, lambda p: p["last_error"] is not None)
    assert refused, f"the {name} file was not noticed"
    assert refused["last_error"].startswith(f"{gw.policy_path}: {at}")
    assert message in refused["last_error"]
    assert refused["failures"] == 1 and refused["version"] == version_of(THREE_TURNS)
    [audited] = await gw.audit_events("policy_refused")
    assert message in audited["error"] and audited["reason"] == "file changed"
    async with aiohttp.ClientSession() as http, http.get(gw.url("/metrics")) as resp:
        assert 'gateway_policy_reloads_total{outcome="error"} 1.0' in await resp.text()
    assert (await call(gw, "chat", session_headers("kept"))).headers[
        "x-gateway-turns-remaining"
    ] == "2"

    # Not retried while it stays as it is; a valid edit is picked up without a SIGHUP.
    await asyncio.sleep(0.25)
    assert (await gw.admin_get("/gateway/policy"))["failures"] == 1
    await rewrite(gw, TEN_TURNS, forward=10)
    fixed = await policy_shown(gw, lambda p: p["version"] == version_of(TEN_TURNS))
    assert fixed, "the valid edit after a refused file was not picked up"
    assert fixed["last_error"] is None and fixed["reloads"] == 2 and fixed["failures"] == 1


async def test_a_deeply_nested_file_by_sighup_is_recorded_not_lost_in_a_task(
    make_gateway: MakeGateway,
) -> None:
    """Once a RecursionError escaped the reload task: "Task exception was never retrieved"."""
    import gc
    import signal

    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    try:
        gw = await make_gateway(TEN_TURNS, policy_poll_interval=3600)
        await write_bytes(gw, deep(5000), forward=5)
        os.kill(os.getpid(), signal.SIGHUP)
        refused = await policy_shown(gw, lambda p: p["last_error"] is not None)
        assert refused, "the SIGHUP reload of a deep file recorded nothing"
        assert refused["last_error"].startswith(f"{gw.policy_path}: line 2: ")
        assert "nest" in refused["last_error"] and refused["failures"] == 1
        [audited] = await gw.audit_events("policy_refused")
        assert audited["reason"] == "SIGHUP"
        gc.collect()
        await asyncio.sleep(0)
        assert unhandled == []
    finally:
        loop.set_exception_handler(None)


async def test_a_deleted_file_is_refused_and_its_return_picked_up(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(THREE_TURNS, policy_poll_interval=0.05)
    assert gw.policy_path is not None
    await asyncio.to_thread(gw.policy_path.unlink)
    import signal

    os.kill(os.getpid(), signal.SIGHUP)
    refused = await policy_shown(gw, lambda p: p["last_error"] is not None)
    assert refused and "cannot read the file" in refused["last_error"]
    await rewrite(gw, TEN_TURNS, forward=10)
    assert await policy_shown(gw, lambda p: p["version"] == version_of(TEN_TURNS))


async def test_a_refusal_names_the_policy_version_and_rule_not_its_path(
    make_gateway: MakeGateway,
) -> None:
    text = """\
version: 1
rules:
  - name: only-mini
    match: {agent: "*"}
    limits: {models: {allow: ["gpt-4o-mini"]}}
"""
    gw = await make_gateway(text)
    refused = await call(gw, "chat", session_headers("path"), model="gpt-4o")
    assert refused.status == 400
    assert "only-mini" in refused.message and version_of(text) in refused.message
    assert gw.policy_path is not None
    assert str(gw.policy_path.parent) not in refused.message
    assert "policy-0.yaml" not in str(refused.body)
