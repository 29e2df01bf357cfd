"""``policy.step``: ``reject`` is the one place a refusal is recorded. Each step that refuses a
call (the policy's decision, a loop, compaction's overflow, the counted limits at the start of
a turn) goes through it: one rejection event and one store note per refused call."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway.appkeys import STORE
from gateway.errors import ContextOverflow, PolicyRejection
from gateway.exchange import Exchange
from gateway.fake_provider import FakeProviderConfig, ToolCallSpec
from gateway.identity import Identity
from gateway.policy.step import reject
from gateway.policy.verdicts import Verdict
from gateway.settings import UpstreamSettings
from gateway.store import MemoryStore, Store
from gateway.upstream import Upstream
from tests.compaction.test_overflow import send
from tests.compaction.test_sessions import POLICY as CONTEXT_POLICY
from tests.compaction.test_sessions import WINDOW
from tests.harness import Gateway, MakeGateway, session_headers
from tests.policy.apis import AgentLoop, call

IDENTITY = Identity("s1", "explicit", "codex", key_hash="abcdef012345")


def exchange(store: Store) -> Exchange:
    """An exchange as the refusing steps see it: identified, with the app's store."""
    app = web.Application()
    app[STORE] = store
    request = make_mocked_request("POST", "/v1/chat/completions", app=app)
    upstream = Upstream.build("openai", UpstreamSettings(url="http://upstream.invalid/v1"))
    ex = Exchange(request, app, upstream, "/v1/chat/completions")
    ex.identity = IDENTITY
    return ex


async def test_reject_notes_the_refusal_once_and_raises_the_policy_error() -> None:
    store = MemoryStore()
    verdict = Verdict("max_turns", "rule-a", "Session s1 has used all 3 turns.")
    with pytest.raises(PolicyRejection) as caught:
        await reject(exchange(store), verdict)
    assert caught.value.headers["X-Gateway-Policy-Limit"] == "max_turns"
    assert caught.value.rule == "rule-a"
    record = await store.get("s1")
    assert record is not None
    assert record.rejected == 1 and record.turns == 0
    [event] = record.rejections
    assert {k: event[k] for k in ("key", "limit", "rule")} == {
        "key": "max_turns",
        "limit": "max_turns",
        "rule": "rule-a",
    }


async def test_an_overflow_verdict_is_the_providers_overflow_error() -> None:
    store = MemoryStore()
    verdict = Verdict("context_window", "defaults", "prompt is too long", overflow=True)
    with pytest.raises(ContextOverflow) as caught:
        await reject(exchange(store), verdict)
    assert caught.value.headers["X-Gateway-Policy-Limit"] == "context_window"
    record = await store.get("s1")
    assert record is not None and record.rejected == 1
    assert [e["limit"] for e in record.rejections] == ["context_window"]


async def test_a_window_budget_verdict_says_when_to_retry() -> None:
    verdict = Verdict("budget_tokens", "team", "spent", retry_after=42.4)
    with pytest.raises(PolicyRejection) as caught:
        await reject(exchange(MemoryStore()), verdict)
    assert caught.value.headers["Retry-After"] == "42"


# -- every refusing step, through the gateway ----------------------------------------------------
def spy_on_notes(gw: Gateway) -> list[tuple[str, bool]]:
    """Every ``Store.note`` the gateway makes, as (kind, rejected)."""
    store = gw.server.app[STORE]
    notes: list[tuple[str, bool]] = []
    original = store.note

    async def note(*args: Any, rejected: bool = False, **kwargs: Any) -> None:
        notes.append((args[2], rejected))
        await original(*args, rejected=rejected, **kwargs)

    store.note = note  # type: ignore[method-assign]
    return notes


def rejections(notes: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    return [n for n in notes if n[0] == "rejections"]


async def assert_one_refusal_noted(gw: Gateway, session: str, limit: str) -> None:
    record = await gw.record(session)
    assert record.rejected == 1
    [event] = record.rejections
    assert event["limit"] == limit and "times" not in event


async def test_the_decision_refuses_through_reject(make_gateway: MakeGateway) -> None:
    gw = await make_gateway("version: 1\ndefaults:\n  limits: {max_body_bytes: 10}\n")
    notes = spy_on_notes(gw)
    refused = await call(gw, "chat", session_headers("big"))
    assert refused.status == 400
    assert rejections(notes) == [("rejections", True)]
    await assert_one_refusal_noted(gw, "big", "max_body_bytes")


async def test_the_counted_limits_refuse_through_reject(make_gateway: MakeGateway) -> None:
    gw = await make_gateway("version: 1\ndefaults:\n  limits: {max_turns: 1}\n")
    headers = session_headers("one-turn")
    assert (await call(gw, "chat", headers)).ok
    notes = spy_on_notes(gw)
    refused = await call(gw, "chat", headers)
    assert refused.status == 400
    assert rejections(notes) == [("rejections", True)]
    await assert_one_refusal_noted(gw, "one-turn", "max_turns")


async def test_a_loop_refuses_through_reject(
    make_gateway: MakeGateway, fake_config: FakeProviderConfig
) -> None:
    fake_config.tool_loop = ToolCallSpec("read_file", {"path": "src/app.py"})
    gw = await make_gateway(
        "version: 1\ndefaults:\n  loops: {identical_tool_calls: 4, action: reject}\n"
    )
    notes = spy_on_notes(gw)
    loop = AgentLoop(gw, "chat", session_headers("looping"), "Fix it.")
    assert await loop.until_refused() == 4
    # The detection is noted too, but as a detection: the refusal is noted once.
    assert rejections(notes) == [("rejections", True)]
    assert ("detections", False) in notes
    await assert_one_refusal_noted(gw, "looping", "loop_identical_tool_calls")


async def test_compaction_refuses_through_reject(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(CONTEXT_POLICY.format(window=WINDOW, strategies="prompt"))
    notes = spy_on_notes(gw)
    status, _, _ = await send(gw, "chat", "overflowing")
    assert status == 400
    assert rejections(notes) == [("rejections", True)]
    await assert_one_refusal_noted(gw, "overflowing", "context_window")
