"""The fake provider's fault rules: every kind, counts, paths, the control endpoint, the SDKs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.fake_provider import RECEIVED, FakeProviderConfig, create_app
from gateway.fake_provider.__main__ import parse_args
from gateway.fake_provider.faults import (
    FAULTS,
    MAX_RULES,
    Fault,
    FaultError,
    Faults,
    parse_spec,
)

from .conftest import ANTHROPIC_HEADERS, AUTH, CLAUDE_MODEL, parse_sse

CHAT_BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES_BODY = {
    "model": CLAUDE_MODEL,
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}
# method, path, body, headers: every API route
API_ROUTES = [
    ("POST", "/v1/chat/completions", CHAT_BODY, AUTH),
    ("POST", "/v1/responses", {"model": "gpt-5", "input": "hi"}, AUTH),
    ("POST", "/v1/messages", MESSAGES_BODY, ANTHROPIC_HEADERS),
    (
        "POST",
        "/v1/messages/count_tokens",
        {"model": CLAUDE_MODEL, "messages": MESSAGES_BODY["messages"]},
        ANTHROPIC_HEADERS,
    ),
    ("GET", "/v1/models", None, AUTH),
    ("POST", "/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"}, AUTH),
]
CONTROL = "/_fake/faults"
Client = TestClient[Any, Any]


async def _chat(fake: Client, **extra: object) -> aiohttp.ClientResponse:
    return await fake.post("/v1/chat/completions", json={**CHAT_BODY, **extra}, headers=AUTH)


async def _until(condition: Callable[[], bool]) -> None:
    """Poll: the fake exposes counters (``waiting``), not events to wait on."""
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


# --- status -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "body", "headers"), API_ROUTES)
async def test_status_reaches_every_api_route_before_auth(
    fake: Client, method: str, path: str, body: dict[str, Any] | None, headers: dict[str, str]
) -> None:
    fake.app[FAULTS].add(Fault("status", status=503, count=1))
    keyless = {k: v for k, v in headers.items() if k not in ("Authorization", "x-api-key")}
    response = await fake.request(method, path, json=body, headers=keyless)
    assert response.status == 503  # an outage, not the 401 the missing key would get
    answer = await response.json()
    if "anthropic-version" in headers:
        assert answer["type"] == "error"
        assert answer["error"]["type"] == "api_error"
    else:
        assert answer["error"]["type"] == "server_error"
    again = await fake.request(method, path, json=body, headers=headers)
    assert again.status == 200
    assert fake.app[FAULTS].seen == 2


async def test_anthropic_529_is_overloaded_with_retry_after(fake: Client) -> None:
    fake.app[FAULTS].add(Fault("status", status=529))
    response = await fake.post("/v1/messages", json=MESSAGES_BODY, headers=ANTHROPIC_HEADERS)
    assert response.status == 529
    answer = await response.json()
    assert answer["type"] == "error"
    assert answer["error"] == {"type": "overloaded_error", "message": "Overloaded"}
    assert answer["request_id"] == response.headers["request-id"]
    assert response.headers["retry-after"] == "1"
    assert "retry-after-ms" not in response.headers


@pytest.mark.parametrize(
    ("fault", "retry_after", "retry_after_ms"),
    [
        (Fault("status", status=503, retry_after=7), "7", None),
        (Fault("status", status=503, retry_after=1.5, retry_after_ms=1500), "1.5", "1500"),
        (Fault("status", status=429, retry_after_ms=250), "1", "250"),
        (Fault("status", status=500), None, None),
    ],
)
async def test_retry_headers(
    fake: Client, fault: Fault, retry_after: str | None, retry_after_ms: str | None
) -> None:
    fake.app[FAULTS].add(fault)
    response = await _chat(fake)
    assert response.status == fault.status
    assert response.headers.get("Retry-After") == retry_after
    assert response.headers.get("retry-after-ms") == retry_after_ms


async def test_anthropic_sdk_reads_529_as_overloaded(
    fake_app: web.Application, claude: anthropic.AsyncAnthropic
) -> None:
    fake_app[FAULTS].add(Fault("status", status=529, count=1))
    with pytest.raises(anthropic.InternalServerError) as caught:
        await claude.messages.create(
            model=CLAUDE_MODEL, max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    assert isinstance(caught.value, anthropic.OverloadedError)
    assert caught.value.status_code == 529
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"] == {"type": "overloaded_error", "message": "Overloaded"}


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (503, openai.InternalServerError),
        (400, openai.BadRequestError),
    ],
)
async def test_openai_sdk_reads_the_status(
    fake_app: web.Application,
    oai: openai.AsyncOpenAI,
    status: int,
    error_class: type[openai.APIStatusError],
) -> None:
    fake_app[FAULTS].add(Fault("status", status=status))
    with pytest.raises(error_class) as caught:
        await oai.chat.completions.create(model="gpt-4o", messages=CHAT_BODY["messages"])  # type: ignore[arg-type]
    assert caught.value.status_code == status
    assert isinstance(caught.value, openai.APIStatusError)


async def test_seen_counts_the_sdks_own_retries(
    fake_app: web.Application, fake_server: TestServer
) -> None:
    """The faults reach attempts the caller never sees: here the SDK's two retries."""
    fake_app[FAULTS].add(Fault("status", status=503, count=2, retry_after_ms=1))
    client = openai.AsyncOpenAI(
        base_url=str(fake_server.make_url("/v1")), api_key="test-key", max_retries=2
    )
    async with client:
        answer = await client.chat.completions.create(
            model="gpt-4o",
            messages=CHAT_BODY["messages"],  # type: ignore[arg-type]
        )
    assert answer.choices[0].message.content
    faults = fake_app[FAULTS]
    assert (faults.seen, faults.rules[0].hits, faults.rules[0].remaining) == (3, 2, 0)


# --- reset ------------------------------------------------------------------------------------


async def test_reset_is_a_disconnect_not_a_500(
    fake: Client, caplog: pytest.LogCaptureFixture
) -> None:
    fake.app[FAULTS].add(Fault("reset", count=1))
    with caplog.at_level(logging.DEBUG, logger="aiohttp"):
        with pytest.raises(aiohttp.ClientConnectionError) as caught:
            await _chat(fake)
        await asyncio.sleep(0.01)
    assert isinstance(caught.value, aiohttp.ClientOSError | aiohttp.ServerDisconnectedError)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert fake.app[RECEIVED][-1].path == "/v1/chat/completions"  # recorded before the reset
    assert (await _chat(fake)).status == 200


async def test_reset_through_the_sdks(
    fake_app: web.Application, oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic
) -> None:
    fake_app[FAULTS].add(Fault("reset", count=2))
    with pytest.raises(openai.APIConnectionError):
        await oai.chat.completions.create(model="gpt-4o", messages=CHAT_BODY["messages"])  # type: ignore[arg-type]
    with pytest.raises(anthropic.APIConnectionError):
        await claude.messages.create(
            model=CLAUDE_MODEL, max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )


# --- delay and hang ---------------------------------------------------------------------------


async def test_delay_then_a_normal_answer(fake: Client) -> None:
    fake.app[FAULTS].add(Fault("delay", seconds=0.2, count=1))
    started = time.monotonic()
    response = await _chat(fake)
    assert response.status == 200
    assert time.monotonic() - started >= 0.2
    started = time.monotonic()
    assert (await _chat(fake)).status == 200
    assert time.monotonic() - started < 0.2


async def test_hang_is_released_by_clear(fake: Client) -> None:
    faults = fake.app[FAULTS]
    faults.add(Fault("hang"))
    pending = asyncio.ensure_future(_chat(fake))
    await _until(lambda: faults.waiting == 1)
    await asyncio.sleep(0.05)
    assert not pending.done()
    faults.clear()
    response = await asyncio.wait_for(pending, 5)
    assert response.status == 200
    assert faults.waiting == 0


async def test_hang_is_released_by_delete(fake: Client) -> None:
    await fake.post(CONTROL, json={"faults": [{"kind": "hang", "path": "/v1/chat"}]})
    pending = asyncio.ensure_future(_chat(fake))
    await _until(lambda: fake.app[FAULTS].waiting == 1)
    cleared = await fake.delete(CONTROL)
    assert (await cleared.json())["waiting"] == 1
    assert (await asyncio.wait_for(pending, 5)).status == 200


async def test_hang_does_not_hold_up_shutdown() -> None:
    app = create_app()
    app[FAULTS].add(Fault("hang"))
    server = TestServer(app)
    await server.start_server()
    async with aiohttp.ClientSession() as session:
        pending = asyncio.ensure_future(
            session.post(server.make_url("/v1/chat/completions"), json=CHAT_BODY, headers=AUTH)
        )
        await _until(lambda: app[FAULTS].waiting == 1)
        started = time.monotonic()
        await asyncio.wait_for(server.close(), 5)
        assert time.monotonic() - started < 5
        with pytest.raises(aiohttp.ClientConnectionError):
            await asyncio.wait_for(pending, 5)


# --- cut_stream -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        ("/v1/chat/completions", CHAT_BODY, AUTH),
        ("/v1/messages", MESSAGES_BODY, ANTHROPIC_HEADERS),
    ],
)
async def test_cut_stream_sends_k_events_then_cuts(
    fake: Client, path: str, body: dict[str, Any], headers: dict[str, str]
) -> None:
    fake.app[FAULTS].add(Fault("cut_stream", events=2, count=1))
    response = await fake.post(path, json={**body, "stream": True}, headers=headers)
    assert response.status == 200
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        while chunk := await response.content.readany():
            received += chunk
    assert len(parse_sse(received.decode())) == 2
    whole = await fake.post(path, json={**body, "stream": True}, headers=headers)
    assert len(parse_sse(await whole.text())) > 2


async def test_cut_stream_passes_non_streaming_requests_by(fake: Client) -> None:
    faults = fake.app[FAULTS]
    faults.add(Fault("cut_stream", events=1, count=1), Fault("status", status=502, count=1))
    assert (await _chat(fake)).status == 502  # the next rule took it
    assert [(r.hits, r.remaining) for r in faults.rules] == [(0, 1), (1, 0)]


# --- counts, order, paths ---------------------------------------------------------------------


async def test_rules_are_a_queue_and_count_their_hits(fake: Client) -> None:
    fake.app[FAULTS].add(Fault("status", status=503, count=2), Fault("status", status=429, count=1))
    statuses = [(await _chat(fake)).status for _ in range(4)]
    assert statuses == [503, 503, 429, 200]
    state = await (await fake.get(CONTROL)).json()
    assert state["seen"] == 4
    assert [(f["status"], f["remaining"], f["hits"]) for f in state["faults"]] == [
        (503, 0, 2),
        (429, 0, 1),
    ]


async def test_a_rule_without_count_lasts_until_cleared(fake: Client) -> None:
    fake.app[FAULTS].add(Fault("status", status=500))
    assert [(await _chat(fake)).status for _ in range(3)] == [500, 500, 500]
    fake.app[FAULTS].clear()
    assert (await _chat(fake)).status == 200
    assert fake.app[FAULTS].seen == 1  # cleared with the rules


async def test_path_prefix_filter(fake: Client) -> None:
    fake.app[FAULTS].add(Fault("status", status=529, path="/v1/messages"))
    assert (await _chat(fake)).status == 200
    messages = await fake.post("/v1/messages", json=MESSAGES_BODY, headers=ANTHROPIC_HEADERS)
    assert messages.status == 529
    counted = await fake.post(
        "/v1/messages/count_tokens",
        json={"model": CLAUDE_MODEL, "messages": MESSAGES_BODY["messages"]},
        headers=ANTHROPIC_HEADERS,
    )
    assert counted.status == 529  # a prefix: the sub-path matches too
    rule = fake.app[FAULTS].rules[0]
    assert (rule.hits, rule.remaining, fake.app[FAULTS].seen) == (2, None, 3)


async def test_fault_beats_the_scenario_header(fake: Client) -> None:
    fake.app[FAULTS].add(Fault("status", status=503, count=1))
    response = await fake.post(
        "/v1/chat/completions", json=CHAT_BODY, headers={**AUTH, "x-fake-scenario": "error:418"}
    )
    assert response.status == 503


# --- the control endpoint ---------------------------------------------------------------------


async def test_control_endpoint_round_trip(fake: Client) -> None:
    body = {
        "faults": [
            {"kind": "status", "status": 503, "count": 3, "retry_after": 1},
            {"kind": "delay", "seconds": 0.01, "path": "/v1/responses"},
        ],
        "replace": True,
    }
    posted = await fake.post(CONTROL, json=body)
    assert posted.status == 200
    state = await posted.json()
    assert state == {
        "seen": 0,
        "waiting": 0,
        "faults": [
            {
                "kind": "status",
                "count": 3,
                "status": 503,
                "retry_after": 1,
                "remaining": 3,
                "hits": 0,
            },
            {
                "kind": "delay",
                "count": None,
                "path": "/v1/responses",
                "seconds": 0.01,
                "remaining": None,
                "hits": 0,
            },
        ],
    }
    assert (await _chat(fake)).status == 503
    appended = await fake.post(CONTROL, json={"faults": [{"kind": "reset", "count": 1}]})
    assert [f["kind"] for f in (await appended.json())["faults"]] == ["status", "delay", "reset"]
    final = await (await fake.delete(CONTROL)).json()
    assert final["seen"] == 1
    assert final["faults"][0]["hits"] == 1
    assert await (await fake.get(CONTROL)).json() == {"seen": 0, "waiting": 0, "faults": []}


async def test_replace_drops_the_old_rules(fake: Client) -> None:
    fake.app[FAULTS].add(Fault("status", status=500))
    await _chat(fake)
    posted = await fake.post(
        CONTROL, json={"faults": [{"kind": "hang", "count": 1}], "replace": True}
    )
    state = await posted.json()
    assert state["seen"] == 0
    assert [f["kind"] for f in state["faults"]] == ["hang"]


async def test_control_requests_are_not_api_requests(fake: Client) -> None:
    await fake.get(CONTROL)
    await fake.post(CONTROL, json={"faults": [{"kind": "status", "status": 500}]})
    assert fake.app[FAULTS].seen == 0
    assert not fake.app[RECEIVED]
    assert (await fake.get(CONTROL)).status == 200  # a fault never reaches the control routes


HOSTILE_BODIES = [
    b"not json",
    b"",
    b"[]",
    b'"faults"',
    b"{}",
    b'{"faults": {}}',
    b'{"faults": [], "replace": "yes"}',
    b'{"faults": [], "extra": 1}',
    b'{"faults": [1]}',
    b'{"faults": [{}]}',
    b'{"faults": [{"kind": "explode"}]}',
    b'{"faults": [{"kind": ["status"]}]}',
    b'{"faults": [{"kind": "status"}]}',
    b'{"faults": [{"kind": "status", "status": 200}]}',
    b'{"faults": [{"kind": "status", "status": 503.0}]}',
    b'{"faults": [{"kind": "status", "status": "503"}]}',
    b'{"faults": [{"kind": "status", "status": true}]}',
    b'{"faults": [{"kind": "status", "status": 503, "seconds": 1}]}',
    b'{"faults": [{"kind": "status", "status": 503, "retry_after": -1}]}',
    b'{"faults": [{"kind": "status", "status": 503, "retry_after_ms": 1.5}]}',
    b'{"faults": [{"kind": "reset", "status": 503}]}',
    b'{"faults": [{"kind": "reset", "count": 0}]}',
    b'{"faults": [{"kind": "reset", "count": -1}]}',
    b'{"faults": [{"kind": "reset", "count": 1e99}]}',
    b'{"faults": [{"kind": "reset", "path": "v1"}]}',
    b'{"faults": [{"kind": "reset", "path": 1}]}',
    b'{"faults": [{"kind": "delay"}]}',
    b'{"faults": [{"kind": "delay", "seconds": 1e9}]}',
    b'{"faults": [{"kind": "delay", "seconds": NaN}]}',
    b'{"faults": [{"kind": "cut_stream", "events": -2}]}',
    b'{"faults": [{"kind": "hang", "__class__": 1}]}',
    b'{"faults": [{"kind": "hang", "path": "/' + b"x" * 300 + b'"}]}',
    b'{"faults": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    orjson.dumps({"faults": [{"kind": "reset"}] * (MAX_RULES + 1)}),
]


@pytest.mark.parametrize("body", HOSTILE_BODIES)
async def test_hostile_bodies_are_400(fake: Client, body: bytes) -> None:
    response = await fake.post(CONTROL, data=body, headers={"Content-Type": "application/json"})
    assert response.status == 400
    answer = await response.json()
    assert answer["error"]["type"] == "invalid_request_error"
    assert len(answer["error"]["message"]) < 300
    assert fake.app[FAULTS].rules == ()


async def test_oversized_body_is_413(fake: Client) -> None:
    body = orjson.dumps({"faults": [], "pad": "x" * 100_000})
    response = await fake.post(CONTROL, data=body)
    assert response.status == 413


async def test_append_past_the_limit_adds_nothing(fake: Client) -> None:
    full = {"faults": [{"kind": "reset", "count": 1}] * MAX_RULES}
    assert (await fake.post(CONTROL, json=full)).status == 200
    response = await fake.post(CONTROL, json={"faults": [{"kind": "hang"}]})
    assert response.status == 400
    assert "at most 100" in (await response.json())["error"]["message"]
    assert len(fake.app[FAULTS].rules) == MAX_RULES
    replaced = await fake.post(CONTROL, json={"faults": [{"kind": "hang"}], "replace": True})
    assert replaced.status == 200


# --- the Python API and the command line ------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: Fault("status"),
        lambda: Fault("status", status=99),
        lambda: Fault("reset", seconds=1),
        lambda: Fault("delay", seconds=float("inf")),
        lambda: Fault("cut_stream", events=True),
        lambda: Fault("hang", count=0),
        lambda: Fault("boom"),  # type: ignore[arg-type]
    ],
)
def test_faults_are_checked_when_built(build: Callable[[], Fault]) -> None:
    with pytest.raises(FaultError):
        build()


def test_add_refuses_past_the_limit() -> None:
    faults = Faults()
    with pytest.raises(FaultError):
        faults.add(*[Fault("reset")] * (MAX_RULES + 1))
    assert faults.rules == ()


@pytest.mark.parametrize(
    ("spec", "fault"),
    [
        ("status:503:count=3:retry_after=1", Fault("status", status=503, count=3, retry_after=1)),
        ("status:529:path=/v1/messages", Fault("status", status=529, path="/v1/messages")),
        ("reset:count=1", Fault("reset", count=1)),
        ("delay:2.5", Fault("delay", seconds=2.5)),
        ("hang", Fault("hang")),
        ("cut_stream:2", Fault("cut_stream", events=2)),
    ],
)
def test_parse_spec(spec: str, fault: Fault) -> None:
    assert parse_spec(spec) == fault


@pytest.mark.parametrize(
    "spec", ["", "boom", "status", "status:abc", "reset:1", "hang:count=x", "delay:1:color=red"]
)
def test_parse_spec_refuses(spec: str) -> None:
    with pytest.raises(FaultError):
        parse_spec(spec)


def test_command_line_faults_reach_the_config() -> None:
    _, _, config = parse_args(["--fault", "status:503:count=1", "--fault", "reset:count=1"])
    assert config.faults == (Fault("status", status=503, count=1), Fault("reset", count=1))


async def test_configured_faults_seed_the_app(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
) -> None:
    config = FakeProviderConfig(
        faults=(Fault("status", status=503, count=1), Fault("reset", count=1))
    )
    client = await aiohttp_client(create_app(config))
    assert (await _chat(client)).status == 503
    with pytest.raises(aiohttp.ClientConnectionError):
        await _chat(client)
    assert (await _chat(client)).status == 200


def test_bad_command_line_fault_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--fault", "status:200"])
    assert "between 400 and 599" in capsys.readouterr().err
    assert parse_args([])[2] == FakeProviderConfig()
