"""Bad input and broken upstreams: a clear error or a clean cut; no crash, no lost counts."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.appkeys import STORE
from gateway.fake_provider import FakeProviderConfig
from gateway.settings import Settings, Timeouts
from tests.conftest import ANTHROPIC_MODEL, received
from tests.harness import MakeGateway

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


async def gateway_over(aiohttp_server: Any, messages: Any, host: str = "") -> TestServer:
    """A gateway whose Anthropic upstream is one hand-written ``/v1/messages`` handler
    (reached by ``host``, if given, instead of its address)."""
    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    upstream = await aiohttp_server(app)
    url = upstream.make_url("")
    if host:
        url = url.with_host(host)
    settings = Settings(
        store="memory://",
        upstreams=dict(anthropic=str(url).rstrip("/")),
    )
    gateway: TestServer = await aiohttp_server(create_app(settings))
    return gateway


async def test_malformed_json_is_a_provider_shaped_400_and_never_forwarded(
    gateway: TestServer, fake_provider: TestServer
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.make_url("/v1/chat/completions"),
            data=b'{"model": "gpt-4o", "messages": [',
            headers={"Authorization": "Bearer k", "Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 400
            body = await resp.json()
            assert body["error"]["type"] == "invalid_request_error"
            assert "not valid JSON" in body["error"]["message"]
            assert set(body["error"]) == {"message", "type", "param", "code"}
        async with http.post(
            gateway.make_url("/v1/messages"),
            data=b"[1, 2]",
            headers={"x-api-key": "k", "anthropic-version": "2023-06-01"},
        ) as resp:
            assert resp.status == 400
            body = await resp.json()
            assert body["type"] == "error"
            assert body["error"]["type"] == "invalid_request_error"
    assert received(fake_provider) == []


async def test_upstream_down_is_a_provider_shaped_502(unused_tcp_port: int) -> None:
    port = unused_tcp_port
    settings = Settings(
        store="memory://",
        upstream_retries=1,
        upstreams=dict(openai=f"http://127.0.0.1:{port}/v1", anthropic=f"http://127.0.0.1:{port}"),
    )
    server = TestServer(create_app(settings))
    await server.start_server()
    try:
        client = openai.AsyncOpenAI(
            base_url=str(server.make_url("/v1")), api_key="k", max_retries=0
        )
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={"X-Gateway-Session": "down"},
            )
        await client.close()
        assert caught.value.status_code == 502
        assert caught.value.body["type"] == "server_error"  # type: ignore[index]
        record = await server.app[STORE].get("down")
        assert record is not None and record.turns == 1 and record.upstream_errors == 1
        assert record.in_flight == 0
    finally:
        await server.close()


async def test_body_over_the_limit_is_413_in_shape(
    aiohttp_server: Any, settings: Settings, fake_provider: TestServer
) -> None:
    small = settings.model_copy(update={"max_body_bytes": 1024})
    gateway = await aiohttp_server(create_app(small))
    client = anthropic.AsyncAnthropic(
        base_url=str(gateway.make_url("")).rstrip("/"), api_key="k", max_retries=0
    )
    with pytest.raises(anthropic.APIStatusError) as caught:
        await client.messages.create(
            model=ANTHROPIC_MODEL,
            max_tokens=10,
            messages=[{"role": "user", "content": "x" * 4096}],
        )
    await client.close()
    assert caught.value.status_code == 413
    assert caught.value.body["error"]["type"] == "request_too_large"  # type: ignore[index]
    assert "max_body_bytes" in caught.value.message
    assert received(fake_provider) == []


async def test_ten_megabyte_body_goes_through(
    make_gateway: MakeGateway, fake_provider: TestServer
) -> None:
    # No compaction: two million tokens are over every window, and this is about the body.
    gateway = await make_gateway("version: 1\ndefaults: {context: {strategies: []}}\n")
    big = "word " * (2 * 1024 * 1024)  # 10 MiB of text
    completion = await gateway.openai.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": big}],
        extra_headers={"X-Gateway-Session": "big"},
    )
    assert completion.choices[0].message.content
    assert len(received(fake_provider)[0].body) > 10 * 1024 * 1024
    record = await gateway.record("big")
    assert record.tokens.input_tokens > 2_000_000


async def test_upstream_cut_mid_stream_is_cut_cleanly_and_estimated(
    gateway: TestServer, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    headers = {"X-Gateway-Session": "cut", "x-fake-scenario": "cut_stream:5"}
    text: list[str] = []
    with pytest.raises(Exception) as caught:
        async with anthropic_client.messages.stream(
            model=ANTHROPIC_MODEL,
            max_tokens=64,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers=headers,
        ) as stream:
            async for piece in stream.text_stream:
                text.append(piece)
    # The SDK's own HTTP stack reports the broken transfer; the stream never looks complete.
    assert "incomplete" in repr(caught.value).lower() or "protocol" in repr(caught.value).lower()
    record = await gateway.app[STORE].get("cut")
    assert record is not None
    assert record.turns == 1 and record.estimated_turns == 1 and record.in_flight == 0
    assert record.tokens.input_tokens > 0  # from message_start, before the cut
    assert record.tokens.output_tokens >= 1


async def test_client_disconnect_mid_stream_is_accounted_without_leaks(
    gateway: TestServer, fake_config: FakeProviderConfig
) -> None:
    fake_config.chunk_delay = 0.05
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    tasks_before = len(asyncio.all_tasks())
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            gateway.make_url("/v1/chat/completions"),
            json=body,
            headers={"Authorization": "Bearer k", "X-Gateway-Session": "gone"},
        )
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")
        await resp.content.readuntil(b"\n\n")
        resp.close()  # drop the connection mid-stream
    for _ in range(100):
        record = await gateway.app[STORE].get("gone")
        if record is not None and record.in_flight == 0:
            break
        await asyncio.sleep(0.05)
    assert record is not None
    assert record.in_flight == 0 and record.turns == 1
    assert record.estimated_turns == 1
    assert record.tokens.input_tokens > 0
    await asyncio.sleep(0.1)
    assert len(asyncio.all_tasks()) <= tasks_before


async def test_first_byte_timeout_is_504(
    aiohttp_server: Any, settings: Settings, fake_provider: TestServer
) -> None:
    quick = settings.model_copy(update={"timeouts": Timeouts(first_byte=0.2)})
    gateway = await aiohttp_server(create_app(quick))
    client = openai.AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key="k", max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-scenario": "slow:2"},
        )
    await client.close()
    assert caught.value.status_code == 504
    assert "did not answer within 0.2s" in caught.value.message


async def test_headers_may_take_longer_than_idle_up_to_first_byte(
    aiohttp_server: Any, settings: Settings, fake_provider: TestServer
) -> None:
    """A long non-streamed answer: until its headers, ``first_byte`` bounds the wait, not
    ``idle`` (the gap between two chunks)."""
    patient = settings.model_copy(update={"timeouts": Timeouts(first_byte=5.0, idle=0.2)})
    gateway = await aiohttp_server(create_app(patient))
    client = openai.AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key="k", max_retries=0)
    answer = await client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-fake-scenario": "slow:0.6"},
    )
    await client.close()
    assert answer.choices[0].message.content


async def test_stream_bytes_reach_the_client_unchanged(aiohttp_server: Any) -> None:
    """Whatever the upstream's chunking, the client gets the same bytes in the same order."""
    events = [
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1",'
        b'"model":"m","usage":{"input_tokens":7,"output_tokens":1}}}\n\n',
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"h\\u00e9llo"}}\n\n',
        b": keep-alive comment\n\n",
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
        b'"end_turn"},"usage":{"output_tokens":3}}\n\n',
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    ]
    payload = b"".join(events)

    async def upstream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for start in range(0, len(payload), 7):  # split events at awkward places
            await response.write(payload[start : start + 7])
            await asyncio.sleep(0)
        await response.write_eof()
        return response

    gateway = await gateway_over(aiohttp_server, upstream)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            gateway.make_url("/v1/messages"),
            data=orjson.dumps({"model": "m", "max_tokens": 5, "stream": True, "messages": []}),
            headers={"x-api-key": "k", "X-Gateway-Session": "bytes"},
        ) as resp,
    ):
        got = await resp.read()
    assert got == payload
    record = await gateway.app[STORE].get("bytes")
    assert record is not None
    assert (record.tokens.input_tokens, record.tokens.output_tokens) == (7, 3)


async def test_a_gateway_bug_is_a_provider_shaped_500(
    gateway: TestServer, anthropic_client: anthropic.AsyncAnthropic, monkeypatch: Any
) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr("gateway.pipeline.identify", broken)
    with pytest.raises(anthropic.APIStatusError) as caught:
        await anthropic_client.messages.create(
            model=ANTHROPIC_MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.status_code == 500
    assert caught.value.body == {  # type: ignore[comparison-overlap]
        "type": "error",
        "error": {
            "type": "api_error",
            "message": "gateway (not Anthropic): The gateway failed on this request.",
        },
    }
    # The gateway's own answer, said in headers too; its id, where Anthropic's SDK looks.
    headers = caught.value.response.headers
    assert headers["X-Gateway-Error"] == "gateway_error"
    assert headers["X-Request-ID"].startswith("gwreq_")
    assert headers["request-id"] == headers["X-Request-ID"] == caught.value.request_id


async def test_an_upstream_idle_past_the_timeout_is_cut_and_accounted(
    aiohttp_server: Any, settings: Settings, fake_provider: TestServer, fake_config: Any
) -> None:
    """timeouts.idle: a stream whose next chunk never comes is cut, not held open forever."""
    fake_config.chunk_delay = 1.0
    quick = settings.model_copy(update={"timeouts": Timeouts(idle=0.2)})
    gateway = await aiohttp_server(create_app(quick))
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            gateway.make_url("/v1/chat/completions"),
            json={**CHAT, "stream": True},
            headers={"Authorization": "Bearer k", "X-Gateway-Session": "idle"},
        )
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    record = await gateway.app[STORE].get("idle")
    assert record is not None and record.in_flight == 0 and record.estimated_turns == 1


async def test_garbled_sse_from_upstream_is_relayed_and_estimated(aiohttp_server: Any) -> None:
    """A stream that is not valid SSE or JSON reaches the client as it came; nothing crashes and
    the turn is counted with an estimate."""
    garbage = (
        b'data: {"type": "message_start", "message": {BROKEN\n\n'
        b"not sse at all\n\ndata: \xff\xfe\n\n"
    )

    async def upstream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(garbage)
        await response.write_eof()
        return response

    gateway = await gateway_over(aiohttp_server, upstream)
    body = {"model": "m", "max_tokens": 5, "stream": True, "messages": []}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            gateway.make_url("/v1/messages"),
            data=orjson.dumps(body),
            headers={"x-api-key": "k", "X-Gateway-Session": "garbled"},
        ) as resp,
    ):
        assert resp.status == 200
        assert await resp.read() == garbage
    record = await gateway.app[STORE].get("garbled")
    assert record is not None and record.turns == 1 and record.in_flight == 0
    assert record.estimated_turns == 1
