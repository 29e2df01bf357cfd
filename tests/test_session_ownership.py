"""A session belongs to the key that started it; one credential goes upstream, and it is the
one the key hash is taken from (issue 11, findings 5, 6 and 13)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestServer

from gateway.appkeys import STORE
from gateway.identity import Identity
from gateway.store import Limits, MemoryStore, TurnStart
from tests.conftest import ANTHROPIC_MODEL, received
from tests.harness import ANTHROPIC_KEY, OPENAI_KEY, Gateway, MakeGateway, key_hash, session_headers
from tests.policy.apis import Api, call

LIMITED = "version: 1\ndefaults: {limits: {max_turns: 3}}\n"
OTHER_KEY = "sk-intruder-b"


def clients(gw: Gateway, key: str) -> tuple[openai.AsyncOpenAI, anthropic.AsyncAnthropic]:
    return (
        openai.AsyncOpenAI(base_url=gw.url("/v1"), api_key=key, max_retries=0),
        anthropic.AsyncAnthropic(base_url=gw.url("").rstrip("/"), api_key=key, max_retries=0),
    )


@pytest.fixture
async def intruder(make_gateway: MakeGateway) -> AsyncIterator[tuple[Gateway, Gateway]]:
    """The same gateway, seen by its usual keys and by another key (``OTHER_KEY``)."""
    gw = await make_gateway(LIMITED)
    other_openai, other_anthropic = clients(gw, OTHER_KEY)
    other = Gateway(
        gw.server, gw.fake, gw.policy_path, gw.audit_path, other_openai, other_anthropic, gw._http
    )
    yield gw, other
    await other_openai.close()
    await other_anthropic.close()


@pytest.mark.parametrize("api", ["chat", "responses", "messages"])
async def test_another_key_naming_a_session_gets_its_own(
    intruder: tuple[Gateway, Gateway], api: Api
) -> None:
    """Finding 5: key B with ``X-Gateway-Session: victim`` spent A's turns and read A's
    remaining turns from the answer's headers."""
    owner, other = intruder
    victim = session_headers("victim")
    first = await call(owner, api, victim)
    assert first.ok and first.headers["x-gateway-turns-remaining"] == "2"

    mine = f"victim~{key_hash(OTHER_KEY)}"
    for left in ("2", "1"):
        outcome = await call(other, api, victim)
        assert outcome.ok, outcome.body
        assert outcome.headers["x-gateway-session-id"] == mine
        assert outcome.headers["x-gateway-turns-remaining"] == left  # B's own figures

    # The owner still has its two turns, then its limit.
    for left in ("1", "0"):
        outcome = await call(owner, api, victim)
        assert outcome.ok, outcome.body
        assert outcome.headers["x-gateway-session-id"] == "victim"
        assert outcome.headers["x-gateway-turns-remaining"] == left
    assert (await call(owner, api, victim)).status == 400

    owned = await owner.session("victim")
    assert (owned["turns"], owned["key_hash"]) == (3, key_hash(owner_key(api)))
    theirs = await owner.session(mine)  # the admin API shows the qualified id
    assert (theirs["id"], theirs["turns"], theirs["key_hash"]) == (mine, 2, key_hash(OTHER_KEY))


def owner_key(api: Api) -> str:
    return ANTHROPIC_KEY if api == "messages" else OPENAI_KEY


async def test_count_tokens_of_another_key_is_not_attributed_to_the_owner(
    intruder: tuple[Gateway, Gateway],
) -> None:
    owner, other = intruder
    assert (await call(owner, "messages", session_headers("counted"))).ok
    counted = await other.anthropic.messages.count_tokens(
        model=ANTHROPIC_MODEL,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers=session_headers("counted"),
    )
    assert counted.input_tokens > 0
    assert (await owner.record("counted")).aux_requests == 0
    assert (await owner.record(f"counted~{key_hash(OTHER_KEY)}")).aux_requests == 1


async def test_two_keys_starting_one_new_session_at_once(
    intruder: tuple[Gateway, Gateway],
) -> None:
    owner, other = intruder
    outcomes = await asyncio.gather(
        *(call(gw, "chat", session_headers("race")) for gw in (owner, other) for _ in range(3))
    )
    assert all(o.ok for o in outcomes), [o.body for o in outcomes if not o.ok]
    ids = {o.headers["x-gateway-session-id"] for o in outcomes}
    keys = {key_hash(OPENAI_KEY), key_hash(OTHER_KEY)}
    assert len(ids) == 2 and "race" in ids
    for session in ids:
        record = await owner.record(session)
        assert record.turns == 3 and record.key_hash in keys
    assert (await owner.record("race")).key_hash != (
        await owner.record(ids.difference({"race"}).pop())
    ).key_hash


async def test_the_store_qualifies_a_key_that_lost_the_race() -> None:
    """Both calls looked before either began: the store, not the look-up, decides."""
    store = MemoryStore()
    a = Identity("fresh", "explicit", "codex", key_hash="aaaaaaaaaaaa")
    b = Identity("fresh", "explicit", "codex", key_hash="bbbbbbbbbbbb")
    first = await store.begin_turn(TurnStart(a, "m", True, 1.0), Limits(max_turns=1))
    second = await store.begin_turn(TurnStart(b, "m", True, 1.0), Limits(max_turns=1))
    assert (first.session_id, second.session_id) == ("fresh", "fresh~bbbbbbbbbbbb")
    await store.note(b, 2.0, "warnings", {"key": "w"})
    owned = await store.get("fresh")
    assert owned is not None and owned.turns == 1 and owned.warnings == []
    theirs = await store.get("fresh~bbbbbbbbbbbb")
    assert theirs is not None and theirs.turns == 1 and len(theirs.warnings) == 1


async def test_a_refreshed_token_goes_on_in_a_session_of_its_own(make_gateway: MakeGateway) -> None:
    """A subscription login refreshes its bearer token mid-session: not a refusal."""
    gw = await make_gateway(LIMITED)
    headers = session_headers("cc-session")
    for token, expected in (("oauth-token-1", "cc-session"), ("oauth-token-2", None)):
        client = anthropic.AsyncAnthropic(
            base_url=gw.url("").rstrip("/"), auth_token=token, api_key=None, max_retries=0
        )
        try:
            raw = await client.messages.with_raw_response.create(
                model=ANTHROPIC_MODEL,
                max_tokens=16,
                messages=[{"role": "user", "content": "hi"}],
                extra_headers=headers,
            )
        finally:
            await client.close()
        assert raw.status_code == 200
        session = expected or f"cc-session~{key_hash(token)}"
        assert raw.headers["x-gateway-session-id"] == session
        assert raw.headers["x-gateway-turn"] == "1"
        assert (await gw.record(session)).key_hash == key_hash(token)


# -- one credential ---------------------------------------------------------------------------

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
MESSAGES = {
    "model": ANTHROPIC_MODEL,
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 16,
}
ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/responses", {"model": "gpt-4o", "input": "hi"}),
    ("POST", "/v1/messages", MESSAGES),
    (
        "POST",
        "/v1/messages/count_tokens",
        {"model": ANTHROPIC_MODEL, "messages": MESSAGES["messages"]},
    ),
    ("GET", "/v1/models", None),
    ("POST", "/s/sess-1/v1/chat/completions", CHAT),
]
ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01"}


async def raw(
    gw: Gateway, method: str, path: str, body: dict[str, Any] | None, headers: dict[str, str]
) -> tuple[int, Any]:
    if method == "POST":
        assert body is not None
        status, _, payload = await gw.post(path, body, headers)
        return status, payload
    async with gw._http.get(gw.url(path), headers=headers) as resp:
        return resp.status, await resp.json()


def both_credentials(path: str, bearer: str, api_key: str) -> dict[str, str]:
    """``Authorization`` and ``x-api-key`` at once, with Anthropic's version on its paths."""
    headers = {"Authorization": f"Bearer {bearer}", "x-api-key": api_key}
    if "messages" in path:
        headers.update(ANTHROPIC_HEADERS)
    return headers


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[r[1] for r in ROUTES])
async def test_two_different_credentials_are_refused(
    make_gateway: MakeGateway,
    fake_provider: TestServer,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    gw = await make_gateway(None)
    anthropic_shaped = "messages" in path
    headers = both_credentials(path, "sk-a-secret", "sk-b-secret")
    status, answer = await raw(gw, method, path, body, headers)
    assert status == 400, answer
    if anthropic_shaped:
        assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error"
    else:
        assert answer["error"]["type"] == "invalid_request_error"
    message = answer["error"]["message"]
    assert "Authorization" in message and "x-api-key" in message and "send one" in message
    assert "sk-a-secret" not in str(answer) and "sk-b-secret" not in str(answer)
    assert received(fake_provider) == []


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[r[1] for r in ROUTES])
async def test_the_same_key_twice_goes_upstream_once(
    make_gateway: MakeGateway,
    fake_provider: TestServer,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    gw = await make_gateway(None)
    to_anthropic = "messages" in path
    status, answer = await raw(gw, method, path, body, both_credentials(path, "sk-same", "sk-same"))
    [upstream] = received(fake_provider)
    sent = {name.lower() for name in upstream.headers}
    # /v1/models with x-api-key goes to Anthropic (``Upstreams.for_headers``).
    if to_anthropic or path == "/v1/models":
        assert "x-api-key" in sent and "authorization" not in sent
        assert upstream.headers.get("x-api-key", upstream.headers.get("X-Api-Key")) == "sk-same"
    else:
        assert "authorization" in sent and "x-api-key" not in sent
    if path != "/v1/models":
        assert status == 200, answer


async def test_the_provider_sees_only_its_own_credential_header(
    gateway: TestServer, fake_provider: TestServer
) -> None:
    """An empty second header is not a second key, and stays at the gateway."""
    client = openai.AsyncOpenAI(
        base_url=str(gateway.make_url("/v1")),
        api_key="sk-real",
        max_retries=0,
        default_headers={"x-api-key": ""},
    )
    try:
        await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    finally:
        await client.close()
    [upstream] = received(fake_provider)
    assert {name.lower() for name in upstream.headers} >= {"authorization"}
    assert "x-api-key" not in {name.lower() for name in upstream.headers}


async def test_an_extra_x_api_key_does_not_reset_a_per_key_budget(
    make_gateway: MakeGateway,
) -> None:
    """Finding 6: the hash came from a random x-api-key, a fresh budget on every call."""
    gw = await make_gateway(
        "version: 1\ndefaults:\n  budgets: [{per: key, window: month, max_tokens: 200}]\n"
    )
    work = "Summarise the design document in detail. " * 20
    for _ in range(40):
        outcome = await call(gw, "chat", session_headers("spend"), text=work, max_tokens=20)
        if not outcome.ok:
            break
    assert outcome.status == 429
    for extra in ("sk-random-1", "sk-random-2"):
        status, answer = await _post(gw, extra, work)
        assert status == 400, answer
    # The same key in both headers is the same key: still over its budget.
    status, answer = await _post(gw, OPENAI_KEY, work)
    assert status == 429, answer


async def _post(gw: Gateway, extra: str, work: str) -> tuple[int, Any]:
    status, _, answer = await gw.post(
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": work}]},
        {"Authorization": f"Bearer {OPENAI_KEY}", "x-api-key": extra, **session_headers("spend")},
    )
    return status, answer


# -- session ids that clean down to nothing ----------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "header"),
    [
        ("/s/%00", None),
        ("/s/%E2%80%8B", None),
        ("/s/%C2%A0", None),
        ("", "\u00a0"),
        ("", "   "),
    ],
    ids=["nul-path", "zwsp-path", "nbsp-path", "nbsp-header", "spaces-header"],
)
async def test_empty_session_ids_are_not_shared(
    make_gateway: MakeGateway, prefix: str, header: str | None
) -> None:
    gw = await make_gateway(LIMITED)
    seen = set()
    for task in ("first task", "second task"):
        headers = {"X-Gateway-Session": header} if header is not None else {}
        body = {**CHAT, "messages": [{"role": "user", "content": task}]}
        status, answer_headers, answer = await gw.post(
            f"{prefix}/v1/chat/completions",
            body,
            {"Authorization": f"Bearer {OPENAI_KEY}", **headers},
        )
        if status == 400:  # refused (the path check refuses an encoded NUL): never shared
            assert answer["error"]["type"] == "invalid_request_error"
            continue
        assert status == 200, answer
        seen.add(answer_headers["X-Gateway-Session-Id"])
    assert len(seen) in (0, 2) and "" not in seen
    assert await gw.server.app[STORE].get("") is None


# -- the team header -----------------------------------------------------------------------------

TEAMS = """
version: 1
team_header: X-Team
defaults: {limits: {max_turns: 100}}
rules:
  - {name: research, match: {team: research}, limits: {max_turns: 16}}
"""


@pytest.mark.parametrize(("proxies", "rules"), [([], "defaults"), (["127.0.0.1/32"], "research")])
async def test_the_team_header_counts_only_from_a_trusted_proxy(
    make_gateway: MakeGateway, proxies: list[str], rules: str
) -> None:
    gw = await make_gateway(TEAMS, trusted_proxies=proxies)
    outcome = await call(gw, "chat", session_headers("team", **{"X-Team": "research"}))
    assert outcome.ok
    assert outcome.headers["x-gateway-policy"].endswith(f"rules={rules}")
