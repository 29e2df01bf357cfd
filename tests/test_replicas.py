"""Two gateway replicas on one Redis, end to end (issue 16, §4): two apps built by
``make_gateway`` with the same store URL (so the same key prefix), each driven through HTTP
with the official SDKs against the one fake provider. Whatever replica a call lands on, a
session's turns, a max-turns limit under a race, a team budget, a loop, an operator's grant,
a revoked key, a session's owner and a compaction summary are the same; with Redis stopped
mid-run the calls keep flowing (or, ``store_outage: closed``, are refused with a 503) and
nothing is lost once it is back.

Each test takes a fresh prefix of the session-wide ``shared_redis``, or a server of its own
(``redis_server``) where Redis is stopped and started again.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestServer

from gateway.appkeys import DEGRADED, STORE
from gateway.compaction.transcript import INSTRUCTIONS
from gateway.fake_provider import CONFIG, RECEIVED, FakeProviderConfig, ToolCallSpec
from gateway.settings import DegradedSettings
from gateway.store import RedisStore
from tests.harness import (
    ADMIN,
    OPENAI_KEY,
    Gateway,
    MakeGateway,
    create_key,
    key_hash,
    keys_mode,
    session_headers,
    wait_until,
)
from tests.policy.apis import AgentLoop, Outcome, call
from tests.redis_server import SharedRedis, redis_server

Replicas = tuple[Gateway, Gateway]
PEPPER = "pepper-of-both-replicas-0123456789abcdef-XYZ"
"""Both replicas hash gateway keys with one pepper (a shared store refuses a generated one)."""


async def replicas(
    make_gateway: MakeGateway, url: str, policy: str | None, **more: Any
) -> Replicas:
    """Two gateways on the Redis at ``url`` (one prefix): two replicas of one deployment."""
    first = await make_gateway(policy, store=url, **more)
    second = await make_gateway(policy, store=url, **more)
    assert isinstance(first.server.app[STORE], RedisStore)
    assert first.server.app[STORE] is not second.server.app[STORE]
    return first, second


def redis_store(gw: Gateway) -> RedisStore:
    store = gw.server.app[STORE]
    assert isinstance(store, RedisStore)
    return store


async def until(check: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> float:
    """Polls ``check`` until it holds; returns the seconds it took."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < seconds, "condition not met in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def landed(*gateways: Gateway) -> None:
    """Every call these replicas began has ended and what they queued for Redis (a turn's
    usage, notes, compactions: written in the background after the answer) is written:
    another replica now reads it."""
    stores = [redis_store(gw) for gw in gateways]
    await wait_until(lambda: not any(store._leases or store._queue for store in stores))


def usage_total(outcome: Outcome) -> int:
    usage = outcome.body.usage
    total = getattr(usage, "total_tokens", None)
    return int(total if total is not None else usage.input_tokens + usage.output_tokens)


# -- 1. one session, both replicas ---------------------------------------------------------------
async def test_a_sessions_turns_are_counted_across_both(
    make_gateway: MakeGateway, shared_redis: SharedRedis
) -> None:
    a, b = await replicas(make_gateway, shared_redis.url(), None)
    headers = session_headers("shared")
    spent = 0
    for turn, (gw, api) in enumerate(
        [(a, "chat"), (b, "responses"), (a, "responses"), (b, "chat"), (a, "chat"), (b, "chat")],
        start=1,
    ):
        outcome = await call(gw, api, headers)  # type: ignore[arg-type]
        assert outcome.ok, outcome.body
        assert outcome.headers["x-gateway-turn"] == str(turn)  # counted on the other too
        spent += usage_total(outcome)
    await landed(a, b)
    for gw in (a, b):
        shown = await gw.session("shared")
        assert shown["turns"] == 6
        assert shown["tokens"]["total_tokens"] == spent
        assert shown["in_flight"] == 0 and shown["reserved_tokens"] == 0
        assert shown["key_hash"] == key_hash(OPENAI_KEY)
        listed = await gw.admin_get("/gateway/sessions")
        assert [s["id"] for s in listed["sessions"]] == ["shared"]
    assert a.upstream_calls() == 6


# -- 2. max_turns exact under a race across both --------------------------------------------------
async def test_max_turns_is_exact_when_both_replicas_race_for_the_last_turns(
    make_gateway: MakeGateway, shared_redis: SharedRedis
) -> None:
    policy = "version: 1\ndefaults: {limits: {max_turns: 30}}\n"
    a, b = await replicas(make_gateway, shared_redis.url(), policy)
    headers = session_headers("race")
    for turn in range(25):
        assert (await call((a, b)[turn % 2], "chat", headers)).ok
    assert a.upstream_calls() == 25

    outcomes = await asyncio.gather(
        *(call(gw, "chat", headers) for _ in range(40) for gw in (a, b))
    )
    passed = [o for o in outcomes if o.ok]
    refused = [o for o in outcomes if not o.ok]
    assert len(passed) == 5 and len(refused) == 75
    assert sorted(int(o.headers["x-gateway-turn"]) for o in passed) == [26, 27, 28, 29, 30]
    for outcome in refused:
        assert outcome.status == 400, outcome.body
        assert outcome.body["error"]["code"] == "gateway_policy_max_turns"
        assert "max_turns" in outcome.message
    assert a.upstream_calls() == 30
    await landed(a, b)
    for gw in (a, b):
        record = await gw.record("race")
        assert (record.turns, record.in_flight, record.reserved_tokens) == (30, 0, 0)
        assert record.rejected == 75


# -- 3. a team budget, both replicas, concurrent --------------------------------------------------
OTHER_KEY = "sk-replicas-second-key"
"""A second key of the same team (passthrough: teams named by key hash in the policy)."""
TEAM_POLICY = f"""
version: 1
keys:
  "{key_hash(OPENAI_KEY)}": {{name: alpha-bot, team: alpha}}
  "{key_hash(OTHER_KEY)}": {{name: alpha-helper, team: alpha}}
defaults:
  budgets:
    - {{per: team, window: day, {{limit}}}}
"""


def openai_client(gw: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url("/v1"), api_key=key, max_retries=0)


async def chat_as(client: openai.AsyncOpenAI, session: str, text: str = "hi") -> Outcome:
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": text}],
            max_tokens=20,
            extra_headers=session_headers(session),
        )
    except openai.APIStatusError as exc:
        return Outcome(exc.status_code, exc.response.headers, exc.response.json())
    return Outcome(raw.status_code, raw.headers, raw.parse())


async def team_race(
    a: Gateway, b: Gateway, prefix: str, text: str = "hi"
) -> tuple[list[Outcome], list[Outcome]]:
    """40 calls at once of one team: two clients on each replica, ten sessions each. Returns
    the calls served and those refused."""
    clients = [openai_client(gw, key) for gw in (a, b) for key in (OPENAI_KEY, OTHER_KEY)]
    try:
        outcomes = await asyncio.gather(
            *(
                chat_as(c, f"{prefix}-{n}-{i}", text)
                for n in range(10)
                for i, c in enumerate(clients)
            )
        )
    finally:
        for client in clients:
            await client.close()
    return [o for o in outcomes if o.ok], [o for o in outcomes if not o.ok]


async def test_a_team_request_budget_is_not_overshot_across_both(
    make_gateway: MakeGateway, shared_redis: SharedRedis
) -> None:
    policy = TEAM_POLICY.replace("{limit}", "max_requests: 12")
    a, b = await replicas(make_gateway, shared_redis.url(), policy)
    passed, refused = await team_race(a, b, "team")
    assert len(passed) == 12 and len(refused) == 28
    for outcome in refused:
        assert outcome.status == 429, outcome.body
        assert outcome.body["error"]["code"] == "rate_limit_exceeded"
        assert "team:alpha:day:" in outcome.message
        assert 1 <= int(outcome.headers["retry-after"]) <= 86400
    assert a.upstream_calls() == 12
    await landed(a, b)
    for gw in (a, b):
        [counter] = (await gw.admin_get("/gateway/budgets"))["budgets"]
        assert counter["key"].startswith("team:alpha:day:")
        assert (counter["requests"], counter["reserved_tokens"]) == (12, 0)


async def test_a_team_token_budget_is_not_overshot_across_both(
    make_gateway: MakeGateway, shared_redis: SharedRedis, fake_config: FakeProviderConfig
) -> None:
    # Usage as a provider counts it (tiktoken) and a short reply: within what was reserved.
    fake_config.usage_mode = "tiktoken"
    fake_config.reply_text = "Done."
    cap = 600
    policy = TEAM_POLICY.replace("{limit}", f"max_tokens: {cap}")
    a, b = await replicas(make_gateway, shared_redis.url(), policy)
    work = "Please summarise the design of this gateway in a few words. " * 4
    passed, refused = await team_race(a, b, "tok", work)
    assert passed and refused, "the cap holds a few calls, not 40"
    assert all(o.status == 429 and "retry-after" in o.headers for o in refused)
    await landed(a, b)
    [counter] = (await b.admin_get("/gateway/budgets"))["budgets"]
    assert counter["requests"] == len(passed) == a.upstream_calls()
    assert 0 < counter["tokens"] <= cap and counter["reserved_tokens"] == 0


# -- 4. a loop whose calls alternate between replicas ---------------------------------------------
LOOPS = """
version: 1
defaults:
  loops: {{identical_tool_calls: 4, repeated_requests: 3, action: {action}}}
"""


def storm_request(session: str) -> dict[str, Any]:
    return {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "Run the tests."}],
        "tools": [{"type": "function", "function": {"name": "run_tests", "parameters": {}}}],
        "extra_headers": session_headers(session),
    }


async def test_a_retry_storm_alternating_between_replicas_is_stopped(
    make_gateway: MakeGateway, shared_redis: SharedRedis
) -> None:
    a, b = await replicas(make_gateway, shared_redis.url(), LOOPS.format(action="reject"))
    request = storm_request("storm")
    await a.openai.chat.completions.create(**request)
    await b.openai.chat.completions.create(**request)
    with pytest.raises(openai.BadRequestError) as caught:
        await a.openai.chat.completions.create(**request)
    assert caught.value.code == "gateway_policy_loop_repeated_requests"
    assert "the same request 3 times in a row" in caught.value.message
    with pytest.raises(openai.BadRequestError):  # and on the other replica
        await b.openai.chat.completions.create(**request)
    assert a.upstream_calls() == 2
    await landed(a, b)
    shown = await b.session("storm")
    assert [d["detector"] for d in shown["detections"]] == ["repeated_requests"]
    assert shown["turns"] == 2 and shown["rejected"] == 2


@pytest.fixture
def looping_model(fake_config: FakeProviderConfig) -> ToolCallSpec:
    """The model answers every call with the same tool call, like a stuck agent."""
    fake_config.tool_loop = ToolCallSpec("read_file", {"path": "src/app.py"})
    return fake_config.tool_loop


@pytest.mark.usefixtures("looping_model")
async def test_identical_tool_calls_alternating_between_replicas_pause_the_session(
    make_gateway: MakeGateway, shared_redis: SharedRedis
) -> None:
    a, b = await replicas(make_gateway, shared_redis.url(), LOOPS.format(action="pause"))
    loop = AgentLoop(a, "chat", session_headers("loop"), "Fix the failing test.")
    for turn in range(4):
        loop.gw = (a, b)[turn % 2]
        assert (await loop.turn()).ok
    loop.gw = a
    refused = await loop.turn()
    assert refused.status == 400
    assert refused.body["error"]["code"] == "gateway_policy_loop_identical_tool_calls"
    assert "paused" in refused.message
    assert a.upstream_calls() == 4
    # Paused on the other replica too (at once: a pause is no queued write): even a call
    # without the loop in it is refused there.
    other = await call(b, "chat", session_headers("loop"), text="Something else entirely.")
    assert other.status == 400
    assert other.body["error"]["code"] == "gateway_policy_session_paused"
    assert a.upstream_calls() == 4
    assert (await b.session("loop"))["status"] == "paused"


@pytest.mark.usefixtures("looping_model")
async def test_a_flagged_loop_decided_again_is_noted_once_per_call(
    make_gateway: MakeGateway, shared_redis: SharedRedis
) -> None:
    """Flagged (not stopped) detections are kept once per call, even when the call was decided
    on a copy the other replica had overtaken and decided again."""
    a, b = await replicas(make_gateway, shared_redis.url(), LOOPS.format(action="flag"))
    loop = AgentLoop(a, "chat", session_headers("flagged"), "Fix the failing test.")
    for turn in range(7):
        loop.gw = (a, b)[turn % 2]  # each replica's copy is behind at every one of its calls
        assert (await loop.turn()).ok
        await landed(a, b)
    shown = await b.session("flagged")
    [detection] = [d for d in shown["detections"] if d["detector"] == "identical_tool_calls"]
    flagged_calls = 7 - 4  # calls 5 to 7: their histories hold 4 identical calls or more
    assert detection.get("times", 1) == flagged_calls, shown["detections"]


# -- 5. a grant on one replica, honoured on the other ---------------------------------------------
async def test_a_grant_made_on_one_replica_is_honoured_by_the_other(
    make_gateway: MakeGateway, shared_redis: SharedRedis
) -> None:
    policy = "version: 1\ndefaults: {limits: {max_turns: 2}}\n"
    a, b = await replicas(make_gateway, shared_redis.url(), policy)
    headers = session_headers("granted")
    assert (await call(a, "chat", headers)).ok
    assert (await call(a, "chat", headers)).ok
    stopped = await call(a, "chat", headers)
    assert stopped.status == 400 and stopped.body["error"]["code"] == "gateway_policy_max_turns"

    granted = await b.grant("granted", turns=1, by="alice", reason="one more")
    assert granted["granted_turns"] == 1
    assert (await call(a, "chat", headers)).ok  # at once: no wait for a cache
    again = await call(a, "chat", headers)
    assert again.status == 400 and again.body["error"]["code"] == "gateway_policy_max_turns"
    assert a.upstream_calls() == 3


async def test_a_session_ended_on_one_replica_is_ended_on_the_other(
    make_gateway: MakeGateway, shared_redis: SharedRedis
) -> None:
    a, b = await replicas(make_gateway, shared_redis.url(), None)
    headers = session_headers("ending")
    assert (await call(a, "chat", headers)).ok
    ended = await b.admin_post("/gateway/sessions/ending/end", {"by": "bob", "reason": "done"})
    assert ended["status"] == "ended"
    refused = await call(a, "chat", headers)
    assert refused.status == 400, refused.body
    assert "ended by bob: done" in refused.message
    status, _, conflict = await a.post("/gateway/sessions/ending/grant", {"turns": 1}, ADMIN)
    assert status == 409 and conflict["status"] == "ended"
    assert a.upstream_calls() == 1


@pytest.mark.usefixtures("looping_model")
async def test_a_session_paused_on_one_replica_is_resumed_by_a_grant_on_the_other(
    make_gateway: MakeGateway, shared_redis: SharedRedis
) -> None:
    a, b = await replicas(make_gateway, shared_redis.url(), LOOPS.format(action="pause"))
    loop = AgentLoop(a, "chat", session_headers("paused"), "Fix it.")
    assert await loop.until_refused() == 4
    assert (await a.session("paused"))["status"] == "paused"
    granted = await b.grant("paused", turns=2, by="carol", reason="polling on purpose")
    assert granted["status"] == "active"
    assert (await loop.turn()).ok, "the loop goes on on the first replica after the grant"
    assert (await call(a, "chat", session_headers("paused"), text="Something else.")).ok


# -- 6. a key revoked on one replica, refused on the other ----------------------------------------
async def test_a_key_revoked_on_one_replica_is_refused_on_the_other_within_a_second(
    make_gateway: MakeGateway,
    shared_redis: SharedRedis,
    fake_provider: TestServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GATEWAY_KEY_PEPPER", PEPPER)
    a, b = await replicas(
        make_gateway, shared_redis.url(), "version: 1\n", **keys_mode(fake_provider, tmp_path)
    )
    made = await create_key(a, name="replicated")
    key = made["key"]
    on_a, on_b = openai_client(a, key), openai_client(b, key)
    try:
        assert (await chat_as(on_a, "keyed")).ok
        assert (await chat_as(on_b, "keyed")).ok  # made on A, known to B: and now in its cache
        started = time.monotonic()
        status, _, revoked = await a.post(
            f"/gateway/keys/{made['id']}/revoke", {"now": True}, ADMIN
        )
        assert status == 200 and revoked["status"] == "revoked", revoked
        refused = await chat_as(on_a, "keyed")
        assert refused.status == 401  # the replica that revoked it: at once

        async def refused_on_b() -> bool:
            return (await chat_as(on_b, "keyed")).status == 401

        await until(refused_on_b, 3.0)
        took = time.monotonic() - started
    finally:
        await on_a.close()
        await on_b.close()
    # auth.key_cache (1 s) bounds it; the margin is one poll's round trip on a busy machine.
    assert took <= 1.3, f"refused on the other replica after {took:.2f} s"
    async with openai_client(b, key) as client:
        answer = await chat_as(client, "keyed")
    assert answer.status == 401 and "revoked" in answer.message


async def test_a_replica_started_while_redis_is_away_answers_503_for_its_keys(
    make_gateway: MakeGateway,
    fake_provider: TestServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replica that has not read the keys cannot tell a good key from an unknown one: a 503
    with ``Retry-After`` (agents retry) rather than a 401 (agents stop), until Redis answers."""
    monkeypatch.setenv("GATEWAY_KEY_PEPPER", PEPPER)
    async with redis_server(tmp_path / "redis") as server:
        settings = keys_mode(fake_provider, tmp_path)
        a = await make_gateway("version: 1\n", store=server.url, **settings)
        made = await create_key(a, name="made-before")
        await server.stop()
        late = await make_gateway("version: 1\n", store=server.url, **settings)
        assert not redis_store(late).keys_known
        client = openai_client(late, made["key"])
        try:
            refused = await chat_as(client, "late")
            assert refused.status == 503, refused.body
            assert refused.body["error"]["code"] == "gateway_store_unavailable"
            assert made["id"] in refused.body["error"]["message"]
            assert refused.headers["retry-after"] == "5"
            await server.start()
            await until(lambda: asyncio.sleep(0, redis_store(late).keys_known), 15.0)
            assert (await chat_as(client, "late")).ok
            wrong = openai_client(late, made["key"][:-4] + "AAAA")
            try:  # and a wrong key is a 401 again
                assert (await chat_as(wrong, "late")).status == 401
            finally:
                await wrong.close()
        finally:
            await client.close()


# -- 7. a session bound to its key on one replica is bound on the other ---------------------------
async def test_a_session_bound_on_one_replica_is_bound_on_the_other(
    make_gateway: MakeGateway, shared_redis: SharedRedis
) -> None:
    policy = "version: 1\ndefaults: {limits: {max_turns: 3}}\n"
    a, b = await replicas(make_gateway, shared_redis.url(), policy)
    victim = session_headers("victim")
    first = await call(a, "chat", victim)
    assert first.ok and first.headers["x-gateway-turns-remaining"] == "2"

    intruder = openai_client(b, OTHER_KEY)
    mine = f"victim~{key_hash(OTHER_KEY)}"
    try:
        for left in ("2", "1"):
            outcome = await chat_as(intruder, "victim")
            assert outcome.ok, outcome.body
            assert outcome.headers["x-gateway-session-id"] == mine
            assert outcome.headers["x-gateway-turns-remaining"] == left  # its own figures
    finally:
        await intruder.close()
    for gw, left in ((b, "1"), (a, "0")):  # the owner, on either replica: its own turns
        outcome = await call(gw, "chat", victim)
        assert outcome.ok, outcome.body
        assert outcome.headers["x-gateway-session-id"] == "victim"
        assert outcome.headers["x-gateway-turns-remaining"] == left
    await landed(a, b)
    for gw in (a, b):
        owned, theirs = await gw.session("victim"), await gw.session(mine)
        assert (owned["turns"], owned["key_hash"]) == (3, key_hash(OPENAI_KEY))
        assert (theirs["turns"], theirs["key_hash"]) == (2, key_hash(OTHER_KEY))


async def test_two_keys_starting_one_session_at_once_on_two_replicas(
    make_gateway: MakeGateway, shared_redis: SharedRedis
) -> None:
    """Each replica looked before either began: the store, not the look-up, binds the id."""
    a, b = await replicas(make_gateway, shared_redis.url(), None)
    clients = [openai_client(gw, key) for gw in (a, b) for key in (OPENAI_KEY, OTHER_KEY)]
    try:
        outcomes = await asyncio.gather(*(chat_as(c, "fresh") for c in clients for _ in range(3)))
    finally:
        for client in clients:
            await client.close()
    assert all(o.ok for o in outcomes), [o.body for o in outcomes if not o.ok]
    ids = {o.headers["x-gateway-session-id"] for o in outcomes}
    assert len(ids) == 2 and "fresh" in ids
    await landed(a, b)
    owners = {(await a.record(session)).key_hash for session in ids}
    assert owners == {key_hash(OPENAI_KEY), key_hash(OTHER_KEY)}
    assert [(await b.record(session)).turns for session in sorted(ids)] == [6, 6]


# -- 8. a compaction summary made on one replica, reused on the other -----------------------------
WINDOW = 8000
SUMMARIZE = f"""
version: 1
defaults:
  loops: {{identical_tool_calls: 1000}}
  context:
    window: {WINDOW}
    compact_at: 0.8
    target: 0.5
    keep_last: 2
    strategies: [summarize]
"""


def summary_calls(gw: Gateway) -> int:
    return sum(INSTRUCTIONS.encode() in r.body for r in gw.fake.app[RECEIVED])


def file_contents(n: int) -> str:
    words = ["alpha", "beta", "gamma", "delta", "zeta", "theta", "kappa", "sigma", "omega"]
    return f"file {n}:\n" + " ".join(words[(n * 7 + i * 3) % len(words)] for i in range(250))


async def test_a_summary_made_on_one_replica_is_reused_on_the_other(
    make_gateway: MakeGateway, shared_redis: SharedRedis
) -> None:
    a, b = await replicas(make_gateway, shared_redis.url(), SUMMARIZE, store_summaries=True)
    a.fake.app[CONFIG].context_window = WINDOW  # the provider refuses a longer history
    loop = AgentLoop(a, "chat", session_headers("long"), "Refactor the parser module.")
    loop.tool_output = file_contents

    async def turn(gw: Gateway, number: int) -> str:
        loop.gw = gw
        args = json.dumps({"path": f"src/file{number}.py"})
        outcome = await loop.turn({"x-fake-scenario": f"tool:read_file:{args}"})
        assert outcome.ok, f"turn {number}: {outcome.body}"
        return str(outcome.headers.get("x-gateway-compacted", ""))

    number = 0
    while not (made := await turn(a, number)):  # until replica A summarizes
        number += 1
        assert number < 30, "no summary in 30 turns"
    assert made.startswith("summarize;") and "reused" not in made
    assert summary_calls(a) == 1
    await landed(a)
    held = await b.record("long")
    assert len(held.context_rewrites) == 1  # the summary is in Redis: B reads it

    for later in range(number + 1, number + 4):
        shown = await turn(b, later)
        assert "reused" in shown, shown
    assert summary_calls(a) == 1, "replica B made a summary call of its own"
    await landed(b)
    record = await a.record("long")
    assert record.summary_calls == 1 and record.compacted_calls == 4


# -- 9. Redis stopped mid-run and started again ---------------------------------------------------
def store_degraded(gw: Gateway) -> bool:
    return gw.server.app[DEGRADED].holds("store")


async def test_redis_away_and_back_loses_no_turn_of_either_replica(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    async with redis_server(tmp_path / "redis") as server:
        a, b = await replicas(
            make_gateway, server.url, None, degraded=DegradedSettings(store_lag=0.5)
        )
        headers = session_headers("through")
        spent = 0

        async def turns(*gateways: Gateway) -> None:
            nonlocal spent
            for gw in gateways:
                outcome = await call(gw, "chat", headers)
                assert outcome.ok, outcome.body  # fail open: served whatever Redis does
                spent += usage_total(outcome)

        await turns(a, b, a)
        # One call in flight as Redis goes: begun (and reserved) there, ended without it.
        slow = {**headers, "x-fake-scenario": "slow:0.3"}
        in_flight = asyncio.ensure_future(call(b, "chat", slow))
        await wait_until(lambda: bool(redis_store(b)._leases))
        await server.stop()  # the last turns' usage may still be queued: written once back
        await turns(b, a, b, a)
        ended = await in_flight
        assert ended.ok, ended.body
        spent += usage_total(ended)
        for gw in (a, b):
            assert store_degraded(gw)
            health = await gw.admin_get("/gateway/health")
            assert health["status"] == "degraded"
            [reason] = [r for r in health["reasons"] if r["reason"] == "store"]
            assert "Redis unreachable" in reason["detail"]
        await server.start()

        async def both_back() -> bool:
            return not (store_degraded(a) or store_degraded(b))

        await until(both_back, 8.0)  # reconnected (backoff with jitter), counts merged
        await turns(b, a)
        await landed(a, b)
        for gw in (a, b):
            shown = await gw.session("through")
            assert shown["turns"] == 3 + 1 + 4 + 2
            assert shown["tokens"]["total_tokens"] == spent
            assert shown["in_flight"] == 0 and shown["reserved_tokens"] == 0
            assert (await gw.admin_get("/gateway/health"))["status"] == "ok"
        assert redis_store(a).merged + redis_store(b).merged == 2
        assert a.upstream_calls() == 10


async def test_with_store_outage_closed_calls_are_refused_while_redis_is_away(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    policy = "version: 1\ndefaults: {store_outage: closed}\n"
    async with redis_server(tmp_path / "redis") as server:
        a, b = await replicas(make_gateway, server.url, policy)
        assert (await call(a, "chat", session_headers("known"))).ok
        await landed(a)
        await server.stop()
        for gw in (a, b):
            for session in ("known", "fresh"):
                refused = await call(gw, "chat", session_headers(session))
                assert refused.status == 503, refused.body
                assert refused.headers["retry-after"] == "5"
                assert "store_outage: closed" in refused.message
            anthropic_refused = await call(gw, "messages", session_headers("fresh"))
            assert anthropic_refused.status == 503
            assert anthropic_refused.body["error"]["type"] == "overloaded_error"
        assert a.upstream_calls() == 1
        await server.start()

        async def both_back() -> bool:
            return not (store_degraded(a) or store_degraded(b))

        await until(both_back, 8.0)
        for gw in (a, b):
            assert (await call(gw, "chat", session_headers("known"))).ok
        await landed(a, b)
        record = await b.record("known")
        assert (record.turns, record.in_flight) == (3, 0)
        assert a.upstream_calls() == 3


# -- 10. what one client sends cannot take Redis from the others -----------------------------------
@pytest.mark.parametrize("max_tokens", [-(10**6), 2**62, 10**30])
async def test_a_hostile_max_tokens_neither_degrades_the_store_nor_reserves_below_zero(
    make_gateway: MakeGateway, shared_redis: SharedRedis, max_tokens: int
) -> None:
    """A negative or huge ``max_tokens`` is junk or bounded (``as_int``): the reservation made in
    Redis stays a whole, non-negative number, the script never fails halfway (HINCRBY refuses
    what is past 2^63 or not an integer), and the store stays up for every other client."""
    a, b = await replicas(make_gateway, shared_redis.url(), None)
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": max_tokens,
    }
    auth = {"Authorization": f"Bearer {OPENAI_KEY}", **session_headers("hostile")}
    status, _, answer = await a.post("/v1/chat/completions", body, auth)
    assert status < 500, answer
    await landed(a, b)
    assert not store_degraded(a) and redis_store(a).errors["write"] == 0
    record = await redis_store(b).get("hostile")
    # Served, or over the session's token limit (a 400 naming it): never a turn half counted.
    assert status == 200 or answer["error"]["code"] == "gateway_policy_max_session_tokens"
    assert record is not None and record.turns == (1 if status == 200 else 0)
    assert record.in_flight == 0 and record.reserved_tokens == 0
    outcome = await call(b, "chat", session_headers("hostile"))  # the next call: as ever
    assert outcome.ok, outcome.body


# -- 11. one round trip before a call goes upstream ----------------------------------------------
async def test_a_sessions_next_call_makes_one_round_trip_before_forwarding(
    make_gateway: MakeGateway, shared_redis: SharedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replica decides on the copy its last turn's settle brought back (no read), and the
    check-and-reserve checks that copy is current: one ``EVALSHA`` before the upstream. When
    the other replica has changed the session meanwhile, the check says so, with the session
    as it is, and the call is decided again: still exact."""
    a, b = await replicas(make_gateway, shared_redis.url(), None)
    sent: list[str] = []
    for gw in (a, b):
        client = redis_store(gw).client
        for name in ("hgetall", "evalsha"):
            original = getattr(client, name)

            def spy(*args: Any, _name: str = name, _original: Any = original) -> Any:
                sent.append(_name)
                return _original(*args)

            monkeypatch.setattr(client, name, spy)
    headers = session_headers("one-trip")
    first = await call(a, "chat", headers)
    assert first.ok, first.body
    assert sent == ["hgetall", "evalsha"]  # a session this replica has no copy of: read
    for turn in range(2, 6):
        await landed(a)
        sent.clear()
        outcome = await call(a, "chat", headers)
        assert outcome.ok, outcome.body
        assert outcome.headers["x-gateway-turn"] == str(turn)
        assert sent == ["evalsha"], sent  # the begin; the settle goes by the writer's pipeline
    # The other replica's turn overtakes a's copy: a's begin finds it changed, decides again.
    assert (await call(b, "chat", headers)).ok
    await landed(a, b)
    sent.clear()
    outcome = await call(a, "chat", headers)
    assert outcome.ok and outcome.headers["x-gateway-turn"] == "7", outcome.body
    assert sent == ["evalsha", "evalsha"], sent  # changed (with the session), then begun
    await landed(a, b)
    shown = await b.session("one-trip")
    assert shown["turns"] == 7 and shown["in_flight"] == 0
