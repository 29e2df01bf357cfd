"""The request path shared by every API: auth, JSON, scenarios, recording, serving."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
import anthropic
import openai
import pytest

import gateway.fake_provider as fake_provider
from gateway.fake_provider import CONFIG, RECEIVED, FakeProviderConfig, serve
from tests.conftest import load_fixture

from .conftest import ANTHROPIC_HEADERS, AUTH, CLAUDE_MODEL, parse_sse

CHAT_BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
RESPONSES_BODY = {"model": "gpt-5", "input": "hi"}
MESSAGES_BODY = {
    "model": CLAUDE_MODEL,
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}
ROUTES = [
    ("/v1/chat/completions", CHAT_BODY, AUTH, "openai"),
    ("/v1/responses", RESPONSES_BODY, AUTH, "openai"),
    ("/v1/messages", MESSAGES_BODY, ANTHROPIC_HEADERS, "anthropic"),
]
FIXTURE_FILES = [
    "claude-code-2.1.197-messages-turn4.json",
    "codex-0.169.0-responses-turn1.json",
    "codex-0.169.0-responses-turn3.json",
    "codex-0.169.0-responses-turn268.json",
]


def _without_auth(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k not in ("Authorization", "x-api-key")}


def _assert_error_shape(answer: dict, flavor: str) -> None:
    if flavor == "openai":
        assert set(answer) == {"error"}
        assert set(answer["error"]) == {"message", "type", "param", "code"}
    else:
        assert set(answer) == {"type", "error", "request_id"}
        assert answer["type"] == "error"
        assert set(answer["error"]) == {"type", "message"}


def test_public_api_is_exported() -> None:
    assert sorted(fake_provider.__all__) == sorted(
        [
            "CONFIG",
            "FAULTS",
            "RECEIVED",
            "Fault",
            "FakeProviderConfig",
            "Faults",
            "ReceivedRequest",
            "ToolCallSpec",
            "create_app",
            "serve",
        ]
    )
    for name in fake_provider.__all__:
        assert getattr(fake_provider, name) is not None


@pytest.mark.parametrize(("path", "body", "headers", "flavor"), ROUTES)
async def test_missing_auth_is_401(fake, path, body, headers, flavor) -> None:
    response = await fake.post(path, json=body, headers=_without_auth(headers))
    assert response.status == 401
    answer = await response.json()
    _assert_error_shape(answer, flavor)
    if flavor == "anthropic":
        assert answer["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    "auth", [{"Authorization": "Bearer "}, {"x-api-key": ""}, {"Authorization": "Basic abc"}]
)
async def test_empty_or_wrong_scheme_credentials_are_401(fake, auth) -> None:
    response = await fake.post("/v1/chat/completions", json=CHAT_BODY, headers=auth)
    assert response.status == 401


async def test_either_auth_header_works(fake) -> None:
    for auth in ({"Authorization": "Bearer k"}, {"x-api-key": "k"}):
        response = await fake.post("/v1/chat/completions", json=CHAT_BODY, headers=auth)
        assert response.status == 200


@pytest.mark.parametrize(("path", "body", "headers", "flavor"), ROUTES)
async def test_malformed_json_is_400(fake, path, body, headers, flavor) -> None:
    response = await fake.post(path, data=b'{"model": "x", ', headers=headers)
    assert response.status == 400
    answer = await response.json()
    _assert_error_shape(answer, flavor)


@pytest.mark.parametrize("name", FIXTURE_FILES)
async def test_recorded_agent_requests_are_accepted(fake, name) -> None:
    recorded = load_fixture(name)
    headers = {
        k: v
        for k, v in recorded["headers"].items()
        if k.lower() not in ("accept-encoding", "connection")
    }
    headers["Authorization"] = "Bearer test-key"
    raw = json.dumps(recorded["body"]).encode()
    response = await fake.request(recorded["method"], recorded["path"], data=raw, headers=headers)
    text = await response.text()
    assert response.status == 200, text
    events = parse_sse(text)
    last = json.loads(events[-1][1])
    assert last["type"] in ("message_stop", "response.completed")
    received = fake.app[RECEIVED][-1]
    assert received.body == raw
    assert received.path == recorded["path"]
    assert received.method == "POST"


@pytest.mark.parametrize(("path", "body", "headers", "flavor"), ROUTES)
async def test_cut_stream_aborts_after_n_events(fake, path, body, headers, flavor) -> None:
    scenario = {**headers, "x-fake-scenario": "cut_stream:3"}
    response = await fake.post(path, json={**body, "stream": True}, headers=scenario)
    assert response.status == 200
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        while True:
            chunk = await response.content.readany()
            if not chunk:
                break
            received += chunk
    assert len(parse_sse(received.decode())) == 3


async def test_cut_stream_through_sdk_raises(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="gpt-4o",
        messages=CHAT_BODY["messages"],  # type: ignore[arg-type]
        stream=True,
        extra_headers={"x-fake-scenario": "cut_stream:2"},
    )
    seen = 0
    with pytest.raises(openai.APIError):
        async for _ in stream:
            seen += 1
    assert seen == 2


@pytest.mark.parametrize(("path", "body", "headers", "flavor"), ROUTES)
async def test_token_factor_scales_input_tokens(fake, path, body, headers, flavor) -> None:
    async def tokens(extra: dict[str, str]) -> tuple[int, int]:
        response = await fake.post(path, json=body, headers={**headers, **extra})
        answer = await response.json()
        usage = answer["usage"]
        if "prompt_tokens" in usage:
            return usage["prompt_tokens"], usage["completion_tokens"]
        return usage["input_tokens"], usage["output_tokens"]

    plain_in, plain_out = await tokens({})
    doubled_in, doubled_out = await tokens({"x-fake-scenario": "token_factor:2"})
    assert doubled_in == round(plain_in * 2)
    assert doubled_out == plain_out
    fake.app[CONFIG].token_factor = 1.5
    assert (await tokens({}))[0] == round(plain_in * 1.5)


async def test_tiktoken_mode_counts_text(fake) -> None:
    fake.app[CONFIG].usage_mode = "tiktoken"
    text = "hello world, this is a test of the fake provider"
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}
    answer = await (await fake.post("/v1/chat/completions", json=body, headers=AUTH)).json()
    assert answer["usage"]["prompt_tokens"] == 11  # o200k_base count of the text part


async def test_bigger_prompts_report_more_tokens(fake) -> None:
    small = await (await fake.post("/v1/chat/completions", json=CHAT_BODY, headers=AUTH)).json()
    big_body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "word " * 4000}]}
    big = await (await fake.post("/v1/chat/completions", json=big_body, headers=AUTH)).json()
    assert big["usage"]["prompt_tokens"] > 4000 > small["usage"]["prompt_tokens"]


@pytest.mark.parametrize(("path", "body", "headers", "flavor"), ROUTES)
async def test_no_usage_omits_usage(fake, path, body, headers, flavor) -> None:
    scenario = {**headers, "x-fake-scenario": "no_usage"}
    answer = await (await fake.post(path, json=body, headers=scenario)).json()
    assert "usage" not in answer
    streamed = {**body, "stream": True}
    if flavor == "openai" and path.endswith("completions"):
        streamed["stream_options"] = {"include_usage": True}
    text = await (await fake.post(path, json=streamed, headers=scenario)).text()
    for _, data in parse_sse(text):
        if data == "[DONE]":
            continue
        event = json.loads(data)
        assert not event.get("usage")
        assert not event.get("message", {}).get("usage")
        assert not event.get("response", {}).get("usage")


@pytest.mark.parametrize(
    ("path", "body", "headers", "flavor", "status", "error_type"),
    [
        ("/v1/chat/completions", CHAT_BODY, AUTH, "openai", 429, "requests"),
        ("/v1/chat/completions", CHAT_BODY, AUTH, "openai", 500, "server_error"),
        ("/v1/responses", RESPONSES_BODY, AUTH, "openai", 400, "invalid_request_error"),
        ("/v1/messages", MESSAGES_BODY, ANTHROPIC_HEADERS, "anthropic", 429, "rate_limit_error"),
        ("/v1/messages", MESSAGES_BODY, ANTHROPIC_HEADERS, "anthropic", 529, "overloaded_error"),
        ("/v1/messages", MESSAGES_BODY, ANTHROPIC_HEADERS, "anthropic", 500, "api_error"),
    ],
)
async def test_error_scenario(fake, path, body, headers, flavor, status, error_type) -> None:
    scenario = {**headers, "x-fake-scenario": f"error:{status}"}
    response = await fake.post(path, json=body, headers=scenario)
    assert response.status == status
    answer = await response.json()
    _assert_error_shape(answer, flavor)
    assert answer["error"]["type"] == error_type
    if status == 429:
        assert response.headers["retry-after"] == "1"
        if flavor == "openai":
            assert answer["error"]["code"] == "rate_limit_exceeded"


async def test_error_scenarios_reach_the_sdks(
    oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic
) -> None:
    with pytest.raises(openai.RateLimitError):
        await oai.responses.create(
            model="gpt-5", input="x", extra_headers={"x-fake-scenario": "error:429"}
        )
    with pytest.raises(anthropic.InternalServerError) as caught:
        await claude.messages.create(
            model=CLAUDE_MODEL,
            max_tokens=5,
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-fake-scenario": "error:529"},
        )
    assert caught.value.status_code == 529


async def test_slow_scenario_delays(fake) -> None:
    start = time.monotonic()
    headers = {**AUTH, "x-fake-scenario": "slow:0.2"}
    response = await fake.post("/v1/chat/completions", json=CHAT_BODY, headers=headers)
    assert response.status == 200
    assert time.monotonic() - start >= 0.2


async def test_combined_scenarios(fake) -> None:
    headers = {**AUTH, "x-fake-scenario": 'tool:f:{"a": 1};no_usage'}
    answer = await (await fake.post("/v1/chat/completions", json=CHAT_BODY, headers=headers)).json()
    assert "usage" not in answer
    assert answer["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "f"


async def test_unknown_scenario_is_400(fake) -> None:
    headers = {**AUTH, "x-fake-scenario": "explode"}
    response = await fake.post("/v1/chat/completions", json=CHAT_BODY, headers=headers)
    assert response.status == 400
    assert "x-fake-scenario" in (await response.json())["error"]["message"]


async def test_chunk_delay_paces_events(fake) -> None:
    fake.app[CONFIG].chunk_delay = 0.01
    start = time.monotonic()
    response = await fake.post(
        "/v1/messages", json={**MESSAGES_BODY, "stream": True}, headers=ANTHROPIC_HEADERS
    )
    events = parse_sse(await response.text())
    assert time.monotonic() - start >= 0.01 * (len(events) - 1)


async def test_received_requests_are_bounded_and_exact(fake) -> None:
    raw = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
    for _ in range(3):
        await fake.post("/v1/chat/completions?x=1", data=raw, headers={**AUTH, "X-Trace": "t"})
    received = list(fake.app[RECEIVED])
    assert len(received) == 3
    assert received[0].body == raw
    assert received[0].path == "/v1/chat/completions?x=1"
    assert received[0].headers["X-Trace"] == "t"
    assert fake.app[RECEIVED].maxlen == 1000


async def test_record_false_keeps_nothing(fake) -> None:
    fake.app[CONFIG].record = False
    await fake.post("/v1/chat/completions", json=CHAT_BODY, headers=AUTH)
    assert len(fake.app[RECEIVED]) == 0


async def test_models_list(oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic) -> None:
    ids = [model.id async for model in oai.models.list()]
    assert "gpt-4o" in ids
    claude_ids = [model.id async for model in claude.models.list()]
    assert CLAUDE_MODEL in claude_ids


async def test_embeddings(oai: openai.AsyncOpenAI, fake) -> None:
    first = await oai.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    again = await oai.embeddings.create(model="text-embedding-3-small", input="a")
    assert len(first.data) == 2
    assert first.data[0].embedding == pytest.approx(again.data[0].embedding)
    assert first.data[0].embedding != first.data[1].embedding
    assert first.usage.prompt_tokens >= 1
    body = {"model": "text-embedding-3-small", "input": "a", "dimensions": 4}
    answer = await (await fake.post("/v1/embeddings", json=body, headers=AUTH)).json()
    assert answer["object"] == "list"
    assert len(answer["data"][0]["embedding"]) == 4
    assert answer["usage"]["total_tokens"] == answer["usage"]["prompt_tokens"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_serve_runs_until_cancelled() -> None:
    port = _free_port()
    task = asyncio.ensure_future(serve("127.0.0.1", port, FakeProviderConfig()))
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(50):
                try:
                    async with session.post(
                        f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT_BODY, headers=AUTH
                    ) as response:
                        assert response.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.02)
            else:
                pytest.fail("fake provider did not start")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
