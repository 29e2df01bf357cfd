"""Rate limits: budgets over a ``minute`` window and ``max_requests``, per principal and per
team, counted atomically when a call begins, answered 429 with ``Retry-After`` in the provider's
rate-limit shape; their counters persist in SQLite (older files migrated) and do not pile up.

The policy and accounting steps read a clock held still (``clock``): a minute window rolls over
only when a test moves it, never by chance in the middle of one.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
from pathlib import Path

import anthropic
import openai
import pytest

import gateway.accounting
import gateway.policy.step
from gateway.dialects import Usage
from gateway.fake_provider import FakeProviderConfig
from gateway.policy import PolicyError, parse_policy
from gateway.policy.budgets import window
from gateway.store import BudgetLimit, LimitExceeded, Limits, MemoryStore, SqliteStore, TurnEnd
from tests.harness import ANTHROPIC_KEY, OPENAI_KEY, Gateway, MakeGateway, key_hash, session_headers
from tests.policy.apis import APIS, Api, Outcome, call
from tests.store.test_base import start
from tests.telemetry.test_metrics import samples, value

OWNER = start().identity.key_hash
"""The key whose calls the store tests begin (``start``)."""

WORK = "Please summarise the design of this gateway in a few words. " * 4


class Clock:
    """Stands in for the ``time`` module of the steps that read the wall clock for budgets."""

    def __init__(self, at: float) -> None:
        self.at = at

    def time(self) -> float:
        return self.at


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Second 30 of a minute to come (so every answer's Retry-After is known: 30)."""
    held = Clock((math.floor(time.time() / 60) + 2) * 60 + 30.0)
    monkeypatch.setattr(gateway.policy.step, "time", held)
    monkeypatch.setattr(gateway.accounting, "time", held)
    return held


@pytest.fixture(autouse=True)
def tiktoken_usage(fake_config: FakeProviderConfig) -> None:
    fake_config.usage_mode = "tiktoken"
    fake_config.reply_text = "Done."


def per_minute(per: str, **maxima: float) -> str:
    fields = ", ".join(f"{name}: {value}" for name, value in maxima.items())
    return f"{{per: {per}, window: minute, {fields}}}"


async def budgets(gw: Gateway) -> dict[str, dict[str, float]]:
    return {b["key"]: b for b in (await gw.admin_get("/gateway/budgets"))["budgets"]}


def assert_rate_limited(
    outcome: Outcome, api: Api, made: int, allowed: int, per: str = "key"
) -> None:
    """429, Retry-After to the end of the minute, in the provider's own shape."""
    assert outcome.status == 429, outcome.body
    assert outcome.headers["retry-after"] == "30"
    assert outcome.headers["x-gateway-policy-limit"] == "budget_requests"
    if api == "messages":
        assert outcome.body["type"] == "error"
        assert outcome.body["error"]["type"] == "rate_limit_error"
    else:
        assert outcome.body["error"]["code"] == "rate_limit_exceeded"
    message = outcome.message
    assert f"allows {allowed} requests a minute: {made} of {allowed} made" in message
    assert f"The {per} budget {per}:" in message and f"per: {per}, window: minute" in message
    assert "try again in 30s" in message and "raise max_requests" in message


@pytest.mark.parametrize("api", APIS)
async def test_requests_per_minute_per_principal(
    make_gateway: MakeGateway, clock: Clock, api: Api
) -> None:
    gw = await make_gateway(
        f"""
        version: 1
        defaults:
          budgets: [{per_minute("key", max_requests=3)}]
        """
    )
    for i in range(3):
        assert (await call(gw, api, session_headers(f"{api}-{i}"))).ok
    refused = await call(gw, api, session_headers(f"{api}-3"))
    assert_rate_limited(refused, api, made=3, allowed=3)
    assert gw.upstream_calls() == 3

    # The other SDK brings another provider key: another principal, its own three calls.
    other: Api = "chat" if api == "messages" else "messages"
    assert (await call(gw, other, session_headers("other"))).ok
    # The refused call was not a request: the count stays at three.
    owner = key_hash(ANTHROPIC_KEY if api == "messages" else OPENAI_KEY)
    mine = (await budgets(gw))[f"key:{owner}:minute:{window('minute', clock.at)[0]}"]
    assert (mine["requests"], mine["max_requests"]) == (3, 3)


async def test_the_sdks_raise_their_rate_limit_errors(
    make_gateway: MakeGateway, clock: Clock
) -> None:
    gw = await make_gateway(
        f"""
        version: 1
        defaults:
          budgets: [{per_minute("key", max_requests=1)}]
        """
    )
    assert (await call(gw, "chat", session_headers("a"))).ok
    assert (await call(gw, "messages", session_headers("b"))).ok
    with pytest.raises(openai.RateLimitError) as openai_error:
        await gw.openai.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )
    assert openai_error.value.code == "rate_limit_exceeded"
    assert openai_error.value.response.headers["retry-after"] == "30"
    with pytest.raises(anthropic.RateLimitError) as anthropic_error:
        await gw.anthropic.messages.create(
            model="claude-sonnet-4-6", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    assert anthropic_error.value.response.headers["retry-after"] == "30"


async def test_requests_per_minute_per_team(make_gateway: MakeGateway, clock: Clock) -> None:
    second_key = "sk-team-alpha-second"
    gw = await make_gateway(
        f"""
        version: 1
        keys:
          "{key_hash(OPENAI_KEY)}": {{name: alpha-one, team: alpha}}
          "{key_hash(second_key)}": {{name: alpha-two, team: alpha}}
          "{key_hash(ANTHROPIC_KEY)}": {{name: beta-one, team: beta}}
        defaults:
          budgets: [{per_minute("team", max_requests=4)}]
        """
    )
    second = openai.AsyncOpenAI(base_url=gw.url("/v1"), api_key=second_key, max_retries=0)
    try:
        for i in range(2):
            assert (await call(gw, "chat", session_headers(f"one-{i}"))).ok
            answer = await second.chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": f"hi {i}"}],
                max_tokens=8,
                extra_headers=session_headers(f"two-{i}"),
            )
            assert answer.choices[0].message.content == "Done."
        # The team's four are spent, whichever of its keys asks.
        assert_rate_limited(
            await call(gw, "responses", session_headers("one-9")), "responses", 4, 4, per="team"
        )
        with pytest.raises(openai.RateLimitError):
            await second.chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": "again"}],
                max_tokens=8,
                extra_headers=session_headers("two-9"),
            )
    finally:
        await second.close()
    # Team beta counts its own.
    assert (await call(gw, "messages", session_headers("beta"))).ok
    counters = await budgets(gw)
    [alpha] = [b for k, b in counters.items() if k.startswith("team:alpha:minute:")]
    [beta] = [b for k, b in counters.items() if k.startswith("team:beta:minute:")]
    assert (alpha["requests"], beta["requests"]) == (4, 1)


@pytest.mark.parametrize("api", APIS)
async def test_concurrent_calls_get_exactly_max_requests(
    make_gateway: MakeGateway, clock: Clock, api: Api
) -> None:
    gw = await make_gateway(
        f"""
        version: 1
        defaults:
          budgets: [{per_minute("key", max_requests=10)}]
        """
    )
    outcomes = await asyncio.gather(
        *(call(gw, api, session_headers(f"burst-{i}")) for i in range(40))
    )
    assert sum(o.ok for o in outcomes) == 10
    for refused in (o for o in outcomes if not o.ok):
        assert_rate_limited(refused, api, made=10, allowed=10)
    assert gw.upstream_calls() == 10
    [counter] = (await budgets(gw)).values()
    assert counter["requests"] == 10
    assert counter["reserved_tokens"] == 0


async def test_tokens_per_minute(make_gateway: MakeGateway, clock: Clock) -> None:
    gw = await make_gateway(
        f"""
        version: 1
        defaults:
          budgets: [{per_minute("key", max_tokens=300)}]
        """
    )
    for passed in range(40):
        outcome = await call(gw, "chat", session_headers(f"t-{passed}"), text=WORK, max_tokens=20)
        if not outcome.ok:
            break
    else:
        raise AssertionError("the budget never ran out")
    assert passed >= 2
    assert outcome.status == 429 and outcome.code("chat") == "rate_limit_exceeded"
    assert outcome.headers["x-gateway-policy-limit"] == "budget_tokens"
    assert outcome.headers["retry-after"] == "30"
    assert "tokens" in outcome.message and ":minute:" in outcome.message
    [counter] = (await budgets(gw)).values()
    assert 0 < counter["tokens"] <= 300 and counter["requests"] == passed


async def test_budgets_sharing_a_window_count_each_call_once(
    make_gateway: MakeGateway, clock: Clock
) -> None:
    """A request limit and a token limit over the same minute share one counter: a call is
    one request and its tokens once, not once per budget."""
    gw = await make_gateway(
        f"""
        version: 1
        defaults:
          budgets:
            - {per_minute("key", max_requests=5)}
            - {per_minute("key", max_tokens=1000000)}
        """
    )
    sessions = [f"shared-{i}" for i in range(5)]
    for session in sessions:
        assert (await call(gw, "chat", session_headers(session))).ok
    assert_rate_limited(await call(gw, "chat", session_headers("shared-5")), "chat", 5, 5)
    [counter] = (await budgets(gw)).values()
    spent = [(await gw.record(session)).tokens.total_tokens for session in sessions]
    assert counter["requests"] == 5
    assert counter["tokens"] == sum(spent) > 0
    assert (counter["max_requests"], counter["max_tokens"]) == (5, 1000000)


async def test_the_next_minute_lets_calls_through_again(
    make_gateway: MakeGateway, clock: Clock
) -> None:
    gw = await make_gateway(
        f"""
        version: 1
        defaults:
          budgets: [{per_minute("key", max_requests=2)}]
        """
    )
    assert (await call(gw, "chat", session_headers("m-0"))).ok
    clock.at += 29.5  # the minute's last half second: Retry-After is whole seconds, at least 1
    assert (await call(gw, "chat", session_headers("m-1"))).ok
    late = await call(gw, "chat", session_headers("m-2"))
    assert late.status == 429 and late.headers["retry-after"] == "1"

    clock.at += 0.5  # the next minute
    assert (await call(gw, "chat", session_headers("m-3"))).ok
    assert (await call(gw, "chat", session_headers("m-4"))).ok
    refused = await call(gw, "chat", session_headers("m-5"))
    assert refused.status == 429 and refused.headers["retry-after"] == "60"
    minutes = sorted(
        (key.rsplit(":minute:", 1)[1], b["requests"]) for key, b in (await budgets(gw)).items()
    )
    assert [count for _, count in minutes] == [2, 2]


async def test_request_budgets_are_exported(make_gateway: MakeGateway, clock: Clock) -> None:
    gw = await make_gateway(
        f"""
        version: 1
        defaults:
          budgets: [{per_minute("key", max_requests=7)}]
        """
    )
    for i in range(2):
        assert (await call(gw, "chat", session_headers(f"x-{i}"))).ok
    found = await samples(gw)
    mine = {"scope": "key", "owner": key_hash(OPENAI_KEY), "window": "minute"}
    assert value(found, "gateway_budget_limit_requests", **mine) == 7
    assert value(found, "gateway_budget_spent_requests", **mine) == 2
    assert value(found, "gateway_budget_window_seconds", **mine) == 60
    assert (
        value(found, "gateway_budget_window_end_timestamp_seconds", **mine)
        == (window("minute", clock.at)[1])
    )
    # No token or cost limit was set: no such series for this budget.
    assert not [name for name, labels in found if "limit_tokens" in name or "limit_cost" in name]


def test_a_budget_needs_a_maximum() -> None:
    for text in (
        "version: 1\ndefaults:\n  budgets: [{per: key, window: minute}]\n",
        "version: 1\nrules:\n  - budgets: [{per: team, window: minute}]\n",
    ):
        with pytest.raises(PolicyError, match="max_tokens, max_cost or max_requests"):
            parse_policy(text, "test.yaml")
    for bad in ("max_requests: 0", "max_requests: -3", "max_requests: many", "window: second"):
        with pytest.raises(PolicyError):
            parse_policy(
                f"version: 1\ndefaults:\n  budgets: [{{per: key, max_tokens: 5, {bad}}}]\n", "t"
            )


# -- the store: counters persisted, migrated, and not kept once their window has ended -----------
def rate(at: float, max_requests: int = 100) -> Limits:
    period, end = window("minute", at)
    key = f"key:{OWNER}:minute:{period}"
    return Limits(budgets=(BudgetLimit(key, end, max_requests=max_requests),))


OLD_SCHEMA = """
CREATE TABLE sessions (
    id TEXT PRIMARY KEY, agent TEXT NOT NULL, status TEXT NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, data BLOB NOT NULL
);
CREATE TABLE budgets (
    key TEXT PRIMARY KEY, window_end REAL NOT NULL, tokens INTEGER NOT NULL, cost REAL NOT NULL
);
"""


def make_old_file(path: Path, live_end: float) -> None:
    """A store file as versions before request budgets wrote it: one live window, one long
    ended."""
    db = sqlite3.connect(path)
    with db:
        db.executescript(OLD_SCHEMA)
        db.execute("INSERT INTO budgets VALUES ('team:a:day:live', ?, 50, 0.5)", (live_end,))
        db.execute("INSERT INTO budgets VALUES ('team:a:day:2001-01-01', 978393600, 9, 0.1)")
    db.close()


def budget_rows(path: Path) -> tuple[set[str], list[tuple[str, int, int]]]:
    db = sqlite3.connect(path)
    try:
        columns = {row[1] for row in db.execute("PRAGMA table_info(budgets)")}
        rows = list(db.execute("SELECT key, tokens, requests FROM budgets ORDER BY key"))
    finally:
        db.close()
    return columns, rows


async def test_an_older_store_file_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    now = time.time()
    live_end = window("day", now)[1]
    await asyncio.to_thread(make_old_file, path, live_end)

    store = SqliteStore(path, flush_interval=0.01)
    await store.open()
    try:
        live = store.budget_counters["team:a:day:live"]
        assert (live.tokens, live.cost, live.requests) == (50, 0.5, 0)
        limits = rate(now, max_requests=2)
        for i in range(2):
            await store.begin_turn(start(f"s{i}", now), limits)
        with pytest.raises(LimitExceeded) as refused:
            await store.begin_turn(start("s2", now), limits)
        assert refused.value.hit.limit == "budget_requests"
        assert (refused.value.hit.used, refused.value.hit.allowed) == (2, 2)
        await store.flush()
    finally:
        await store.close()

    columns, rows = await asyncio.to_thread(budget_rows, path)
    assert "requests" in columns
    period = window("minute", now)[0]
    # The window that ended long ago is gone from the file; the live ones stay, with requests.
    assert rows == [(f"key:{OWNER}:minute:{period}", 0, 2), ("team:a:day:live", 50, 0)]

    again = SqliteStore(path)
    await again.open()
    try:
        assert again.budget_counters[f"key:{OWNER}:minute:{period}"].requests == 2
        with pytest.raises(LimitExceeded):
            await again.begin_turn(start("s3", now), rate(now, max_requests=2))
    finally:
        await again.close()


async def test_a_request_counts_whatever_its_outcome() -> None:
    store = MemoryStore()
    limits = rate(1_000_000.0, max_requests=2)
    ticket = await store.begin_turn(start("a", 1_000_000.0), limits)
    await store.end_turn(ticket, TurnEnd("gpt-4o", None, 502, 1_000_001.0))
    ticket = await store.begin_turn(start("b", 1_000_001.0), limits)
    await store.end_turn(ticket, TurnEnd("gpt-4o", Usage(input_tokens=5), 200, 1_000_002.0))
    with pytest.raises(LimitExceeded):
        await store.begin_turn(start("c", 1_000_002.0), limits)
    [counter] = store.budget_counters.values()
    assert (counter.requests, counter.tokens) == (2, 5)


async def test_ended_minute_counters_are_not_kept() -> None:
    """A day of calls a minute apart leaves a handful of counters in memory, not 1,440."""
    store = MemoryStore()
    midnight = math.floor(1_000_000_000 / 86400) * 86400.0
    for minute in range(1440):
        at = midnight + minute * 60 + 1
        await store.begin_turn(start(f"s{minute}", at), rate(at))
        assert len(store.budget_counters) <= 8
    period = window("minute", midnight + 1439 * 60)[0]
    assert f"key:{OWNER}:minute:{period}" in store.budget_counters
