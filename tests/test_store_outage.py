"""The session store failing under a running gateway: degraded for ``store`` and back, calls
served from memory (``store_outage: open``) or refused with a 503 (``closed``), and no turn
lost once the disk is back. Faults are injected into the SQLite store's disk calls."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.appkeys import DEGRADED, STORE
from gateway.settings import DegradedSettings, Settings
from gateway.store import SqliteStore
from tests.conftest import ANTHROPIC_MODEL, GatewayTestServer
from tests.harness import ADMIN, Gateway, MakeGateway, disk_error, session_headers, wait_until

CLOSED = """
version: 1
defaults:
  store_outage: closed
"""
LIMITED = """
version: 1
defaults:
  limits: {max_turns: 4}
"""


async def _on_sqlite(make_gateway: MakeGateway, tmp_path: Path, policy: str | None) -> Gateway:
    gw = await make_gateway(
        policy,
        store=f"sqlite:///{tmp_path / 'gateway.db'}",
        degraded=DegradedSettings(store_lag=0.5),
    )
    sqlite_store(gw).flush_interval = 0.01
    return gw


def sqlite_store(gw: Gateway) -> SqliteStore:
    store = gw.server.app[STORE]
    assert isinstance(store, SqliteStore)
    return store


def degraded(gw: Gateway) -> bool:
    return gw.server.app[DEGRADED].holds("store")


async def chat(gw: Gateway, session: str) -> None:
    await gw.openai.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers=session_headers(session),
    )


async def message(gw: Gateway, session: str) -> None:
    await gw.anthropic.messages.create(
        model=ANTHROPIC_MODEL,
        max_tokens=16,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers=session_headers(session),
    )


async def on_disk(path: Path, session: str) -> Any:
    """The session as a fresh process would read it from the file."""
    reader = SqliteStore(path)
    await reader.open()
    try:
        return await reader.get(session)
    finally:
        await reader.close()


async def test_failing_writes_degrade_the_gateway_and_no_turn_is_lost(
    make_gateway: MakeGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await _on_sqlite(make_gateway, tmp_path, None)
    store = sqlite_store(gw)
    await chat(gw, "work")

    monkeypatch.setattr(store, "_write", disk_error)
    for _ in range(3):  # fail open: the calls keep flowing, counted in memory
        await chat(gw, "work")
    await message(gw, "other")
    await wait_until(lambda: degraded(gw))
    health = await gw.admin_get("/gateway/health")
    assert health["status"] == "degraded"
    assert "store" in str(health["reasons"])
    async with gw._http.get(gw.url("/metrics")) as resp:
        text = await resp.text()
    assert 'gateway_store_backlog{kind="sessions"} 2.0' in text
    assert 'gateway_degraded{reason="store"} 1.0' in text
    assert store.errors["write"] >= 1

    monkeypatch.undo()
    await wait_until(lambda: not degraded(gw))
    assert store.backlog().sessions == 0
    path = tmp_path / "gateway.db"
    work, other = await on_disk(path, "work"), await on_disk(path, "other")
    assert work is not None and work.turns == 4
    assert other is not None and other.turns == 1


async def test_a_session_the_store_cannot_read_is_served_then_merged(
    make_gateway: MakeGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await _on_sqlite(make_gateway, tmp_path, LIMITED)
    store = sqlite_store(gw)
    for _ in range(3):
        await chat(gw, "old")
    await store.flush()
    del store.sessions["old"]  # as after eviction or a restart: only the disk knows it

    monkeypatch.setattr(store, "_select_one", disk_error)
    # The stored three turns cannot be read: limits from the in-memory view (fail open).
    await chat(gw, "old")
    await chat(gw, "old")
    assert degraded(gw) and store.unloaded == {"old"}
    assert (await gw.record("old")).turns == 2

    monkeypatch.undo()
    await wait_until(lambda: not store.unloaded and not degraded(gw))
    assert (await gw.record("old")).turns == 5  # added to the stored counts, not over them
    with pytest.raises(openai.BadRequestError) as caught:
        await chat(gw, "old")
    assert "max_turns" in caught.value.message
    await store.flush()
    record = await on_disk(tmp_path / "gateway.db", "old")
    assert record is not None and (record.turns, record.rejected) == (5, 1)


async def test_failing_closed_refuses_with_a_503_before_the_upstream(
    make_gateway: MakeGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await _on_sqlite(make_gateway, tmp_path, CLOSED)
    store = sqlite_store(gw)
    await chat(gw, "known")
    sent = gw.upstream_calls()

    monkeypatch.setattr(store, "_select_one", disk_error)
    with pytest.raises(openai.APIStatusError) as caught:
        await chat(gw, "fresh")
    assert caught.value.status_code == 503
    assert caught.value.response.headers["Retry-After"] == "5"
    assert "store_outage: closed" in caught.value.message
    assert "store_outage: open" in caught.value.message
    with pytest.raises(openai.APIStatusError) as caught:
        await chat(gw, "known")  # in memory, but the store is degraded: refused too
    assert caught.value.status_code == 503
    with pytest.raises(anthropic.APIStatusError) as refused:
        await message(gw, "fresh")
    assert refused.value.status_code == 503
    assert refused.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert gw.upstream_calls() == sent

    monkeypatch.undo()
    await wait_until(lambda: not degraded(gw))
    await chat(gw, "known")
    await message(gw, "fresh")
    assert (await gw.record("known")).turns == 2


async def test_fail_closed_while_writes_fail_for_what_a_rule_matches(
    make_gateway: MakeGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = """
    version: 1
    rules:
      - name: strict-openai
        match: {model: "gpt-*"}
        store_outage: closed
    """
    gw = await _on_sqlite(make_gateway, tmp_path, policy)
    monkeypatch.setattr(sqlite_store(gw), "_write", disk_error)
    await chat(gw, "s")  # the change that will not be written
    await wait_until(lambda: degraded(gw))
    with pytest.raises(openai.APIStatusError) as caught:
        await chat(gw, "s")
    assert caught.value.status_code == 503
    assert caught.value.response.headers["X-Gateway-Policy-Rule"] == "strict-openai"
    await message(gw, "s2")  # the rule does not match: served from memory
    monkeypatch.undo()
    await wait_until(lambda: not degraded(gw))
    await chat(gw, "s")


async def test_shutdown_with_a_failing_disk_logs_what_was_lost(
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    configured = settings.model_copy(update={"store": f"sqlite:///{tmp_path / 'gateway.db'}"})
    server = GatewayTestServer(create_app(configured))
    await server.start_server()
    store = server.app[STORE]
    assert isinstance(store, SqliteStore)
    store.close_timeout, store.flush_interval = 0.2, 0.01
    client = openai.AsyncOpenAI(
        base_url=str(server.make_url("/v1")), api_key="sk-test-openai", max_retries=0
    )
    monkeypatch.setattr(store, "_write", disk_error)
    try:
        for session in ("a", "b", "a"):
            await client.chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": "hi"}],
                extra_headers=session_headers(session),
            )
    finally:
        await client.close()
    with caplog.at_level(logging.ERROR, logger="gateway.store"):
        await server.close()
    lost = [r.getMessage() for r in caplog.records if "before shutdown" in r.getMessage()]
    assert len(lost) == 1
    assert lost[0].startswith("store: 2 sessions (3 turns in all")


async def test_the_memory_store_never_degrades(
    gateway: TestServer, openai_client: openai.AsyncOpenAI
) -> None:
    for _ in range(3):
        await openai_client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers=session_headers("mem"),
        )
    store = gateway.app[STORE]
    assert store.trouble is None and store.backlog().sessions == 0
    assert not gateway.app[DEGRADED].holds("store")


@pytest.mark.parametrize("route", ["grant", "end"])
async def test_an_admin_change_the_store_cannot_read_is_a_503_not_a_500(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    from gateway.store import LoadFailed

    gw = await make_gateway(None)
    await gw.openai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers=session_headers("unreadable"),
    )
    store = gw.server.app[STORE]

    async def unreadable(session_id: str, *args: Any) -> Any:
        raise LoadFailed(session_id, OSError("disk I/O error"))

    monkeypatch.setattr(store, "grant" if route == "grant" else "set_status", unreadable)
    body = {"turns": 5, "reason": "test"} if route == "grant" else {"reason": "test"}
    async with gw._http.post(
        gw.url(f"/gateway/sessions/unreadable/{route}"), json=body, headers=ADMIN
    ) as response:
        assert response.status == 503
        assert response.headers["Retry-After"]
