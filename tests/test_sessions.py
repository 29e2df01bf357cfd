"""Session identity from real agents' requests, the admin API, and restarts with SQLite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.appkeys import STORE
from gateway.secret import Secret
from gateway.settings import Settings
from tests.conftest import ANTHROPIC_MODEL, load_fixture
from tests.harness import ADMIN

TOKEN = "op-Vb8Kq3Rw6Tz1Yx4Nm7Pd2Lc9Hf5Gs0Ja"
"""An operator's own admin token, other than the harness's."""


async def replay(
    gateway: TestServer, fixture: dict[str, Any], **extra: str
) -> aiohttp.ClientResponse:
    """Send a recorded agent request as the agent sent it (plus a fake key)."""
    headers = {**fixture["headers"], **extra}
    if "/responses" in fixture["path"]:
        headers["Authorization"] = "Bearer sk-fake"
    else:
        headers["x-api-key"] = "sk-fake"
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            gateway.make_url(fixture["path"]), data=orjson.dumps(fixture["body"]), headers=headers
        )
        await resp.read()
        return resp


async def test_claude_code_request_is_its_session(gateway: TestServer) -> None:
    fixture = load_fixture("claude-code-2.1.197-messages-turn4.json")
    resp = await replay(gateway, fixture)
    assert resp.status == 200, await resp.text()
    record = await gateway.app[STORE].get("e2421020-ab1a-44ff-878a-9dd3137426a2")
    assert record is not None
    assert (record.source, record.agent) == ("claude-code", "claude-code")
    assert record.turns == 1 and record.user_turns == 0  # the newest item is a tool result
    assert record.tokens.input_tokens > 10_000

    # Without the header, metadata.user_id still names the same session.
    del fixture["headers"]["X-Claude-Code-Session-Id"]
    await replay(gateway, fixture)
    record = await gateway.app[STORE].get("e2421020-ab1a-44ff-878a-9dd3137426a2")
    assert record is not None and record.turns == 2


async def test_codex_requests_are_one_session(gateway: TestServer) -> None:
    for name in ("codex-0.169.0-responses-turn1.json", "codex-0.169.0-responses-turn3.json"):
        resp = await replay(gateway, load_fixture(name))
        assert resp.status == 200, await resp.text()
    fixture = load_fixture("codex-0.169.0-responses-turn268.json")
    del fixture["headers"]["session-id"]  # prompt_cache_key still says who it is
    # 264 identical calls in its history: the default policy stops it as a runaway loop.
    looping = await replay(gateway, fixture)
    assert looping.status == 400
    assert looping.headers["X-Gateway-Session-Id"] == "01a2130c-841d-71b1-9300-636302af95c0"
    record = await gateway.app[STORE].get("01a2130c-841d-71b1-9300-636302af95c0")
    assert record is not None
    assert (record.source, record.agent) == ("codex", "codex")
    assert record.turns == 2 and record.user_turns == 1 and record.rejected == 1


async def chat(gateway: TestServer, body: dict[str, Any], **headers: str) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            gateway.make_url("/v1/chat/completions"),
            json=body,
            headers={"Authorization": "Bearer sk-one", **headers},
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return resp.headers["X-Gateway-Session-Id"]


async def test_five_sources_are_told_apart(gateway: TestServer) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    assert await chat(gateway, body, **{"X-Gateway-Session": "explicit-1"}) == "explicit-1"
    assert await chat(gateway, body, **{"X-Claude-Code-Session-Id": "cc-1"}) == "cc-1"
    assert await chat(gateway, body, **{"session-id": "codex-1"}) == "codex-1"
    assert await chat(gateway, {**body, "user": "user-1"}) == "user-1"
    assert await chat(gateway, {**body, "metadata": {"session_id": "meta-1"}}) == "meta-1"
    assert await chat(gateway, body, **{"agent-session-id": "20261124_3"}) == "20261124_3"
    fingerprint = await chat(gateway, body)
    assert fingerprint.startswith("fp_")
    sources = {
        sid: (await gateway.app[STORE].get(sid)).source  # type: ignore[union-attr]
        for sid in ("explicit-1", "cc-1", "codex-1", "user-1", "meta-1", "20261124_3", fingerprint)
    }
    assert sources == {
        "explicit-1": "explicit",
        "cc-1": "claude-code",
        "codex-1": "codex",
        "user-1": "body",
        "meta-1": "body",
        "20261124_3": "header",
        fingerprint: "fingerprint",
    }


async def test_fingerprint_follows_a_conversation_and_tells_others_apart(
    gateway: TestServer,
) -> None:
    system = {"role": "system", "content": "You are aider."}
    first = {"role": "user", "content": "Fix the bug."}
    turn1 = {"model": "gpt-4o", "messages": [system, first]}
    turn2 = {
        "model": "gpt-4o",
        "messages": [
            system,
            first,
            {"role": "assistant", "content": "Done."},
            {"role": "user", "content": "Thanks, now tests."},
        ],
    }
    one = await chat(gateway, turn1)
    assert await chat(gateway, turn2) == one
    other_system = {**turn1, "messages": [{"role": "system", "content": "Other."}, first]}
    assert await chat(gateway, other_system) != one
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            gateway.make_url("/v1/chat/completions"),
            json=turn1,
            headers={"Authorization": "Bearer another-key"},
        ) as resp,
    ):
        assert resp.headers["X-Gateway-Session-Id"] != one
    record = await gateway.app[STORE].get(one)
    assert record is not None and record.turns == 2 and record.user_turns == 2


async def test_session_in_the_path(gateway: TestServer) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            gateway.make_url("/s/aider-main/v1/chat/completions"),
            json=body,
            headers={"Authorization": "Bearer k"},
        ) as resp,
    ):
        assert resp.status == 200
    record = await gateway.app[STORE].get("aider-main")
    assert record is not None and record.source == "path"


async def test_restart_with_sqlite_resumes_counts(
    aiohttp_server: Any, settings: Settings, tmp_path: Path
) -> None:
    durable = settings.model_copy(update={"store": f"sqlite:///{tmp_path / 'gw.db'}"})
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    first = await aiohttp_server(create_app(durable))
    for _ in range(3):
        await chat(first, body, **{"X-Gateway-Session": "durable"})
    before = await first.app[STORE].get("durable")
    assert before is not None
    await first.close()  # graceful shutdown flushes

    second = await aiohttp_server(create_app(durable))
    await chat(second, body, **{"X-Gateway-Session": "durable"})
    after = await second.app[STORE].get("durable")
    assert after is not None
    assert after.turns == 4
    assert after.tokens.input_tokens == before.tokens.input_tokens * 4 // 3
    assert after.first_seen == before.first_seen


@pytest.fixture
def admin_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"admin_token": Secret(TOKEN)})


async def test_admin_api_lists_filters_pages_and_needs_the_token(
    aiohttp_server: Any, admin_settings: Settings
) -> None:
    gateway = await aiohttp_server(create_app(admin_settings))
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    for i in range(5):
        await chat(
            gateway,
            body,
            **{"X-Gateway-Session": f"s{i}", "X-Gateway-Agent": "goose" if i % 2 else "aider"},
        )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.make_url("/gateway/health")) as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ok"
        for refused in ({}, ADMIN):  # none, and another token than the configured one
            async with http.get(gateway.make_url("/gateway/sessions"), headers=refused) as resp:
                assert resp.status == 401
        async with http.get(gateway.make_url("/gateway/sessions?limit=2"), headers=auth) as resp:
            page = await resp.json()
        assert [s["id"] for s in page["sessions"]] == ["s4", "s3"]
        cursor = page["next_before"]
        async with http.get(
            gateway.make_url(f"/gateway/sessions?limit=2&before={cursor}"), headers=auth
        ) as resp:
            assert [s["id"] for s in (await resp.json())["sessions"]] == ["s2", "s1"]
        async with http.get(
            gateway.make_url("/gateway/sessions?agent=goose"), headers=auth
        ) as resp:
            assert [s["id"] for s in (await resp.json())["sessions"]] == ["s3", "s1"]
        async with http.get(gateway.make_url("/gateway/sessions/s0"), headers=auth) as resp:
            detail = await resp.json()
        assert detail["turns"] == 1 and detail["agent"] == "aider"
        assert detail["tokens"]["input_tokens"] > 0 and "gpt-4o" in detail["models"]
        async with http.get(gateway.make_url("/gateway/sessions/nope"), headers=auth) as resp:
            assert resp.status == 404


async def test_anthropic_model_id_is_current(anthropic_client: Any) -> None:
    """The model id the tests use raises no SDK deprecation warning (warnings are errors)."""
    message = await anthropic_client.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.model == ANTHROPIC_MODEL
