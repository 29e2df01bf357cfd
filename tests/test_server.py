"""The server around the app: a cap on open connections, a deadline for request headers, and
the HTTP parser's refusals as JSON both SDKs read (``gateway.server``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import anthropic
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.server import GatewayServer
from gateway.settings import Settings, Timeouts
from tests.conftest import ANTHROPIC_MODEL, GatewayTestServer, received


@pytest.fixture
async def small_gateway(settings: Settings) -> AsyncIterator[TestServer]:
    limited = settings.model_copy(
        update={"max_client_connections": 4, "timeouts": Timeouts(client_body=0.5)}
    )
    server = GatewayTestServer(create_app(limited))
    await server.start_server()
    yield server
    await server.close()


async def raw_answer(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer


async def test_connections_past_the_cap_get_a_503_with_retry_after(
    small_gateway: TestServer,
) -> None:
    held = [await asyncio.open_connection("127.0.0.1", small_gateway.port) for _ in range(4)]
    answer = await raw_answer(small_gateway.port, b"")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503")
    assert b"Retry-After: 1" in head
    error = orjson.loads(body)["error"]
    assert error["code"] == "too_many_connections"
    assert "max_client_connections" in error["message"]
    for _, writer in held:
        writer.close()
    await asyncio.sleep(0.1)
    answer = await raw_answer(
        small_gateway.port, b"GET /gateway/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200")
    server = small_gateway.runner.server if small_gateway.runner else None
    assert isinstance(server, GatewayServer) and server.refused == 1


async def test_a_connection_whose_headers_never_finish_is_closed(
    small_gateway: TestServer,
) -> None:
    started = time.monotonic()
    answer = await raw_answer(small_gateway.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost:")
    assert answer == b""  # closed without an answer: there is no request to answer
    assert time.monotonic() - started < 3


async def test_malformed_http_is_a_json_400(small_gateway: TestServer) -> None:
    answer = await raw_answer(
        small_gateway.port, b"POST /v1/messages HTTP/1.1\r\nBad Header\r\n\r\n"
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split()[1] == b"400"
    assert orjson.loads(body)["error"]["type"] == "invalid_request_error"


async def test_oversized_headers_are_a_431_both_sdks_read(
    gateway: TestServer, fake_provider: TestServer
) -> None:
    huge = {"X-Padding": "a" * 40_000}
    client = openai.AsyncOpenAI(
        base_url=str(gateway.make_url("/v1")), api_key="sk-test", max_retries=0
    )
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], extra_headers=huge
        )
    await client.close()
    assert caught.value.status_code == 431
    assert "too large" in caught.value.message
    claude = anthropic.AsyncAnthropic(
        base_url=str(gateway.make_url("")).rstrip("/"), api_key="sk-ant", max_retries=0
    )
    with pytest.raises(anthropic.APIStatusError) as refused:
        await claude.messages.create(
            model=ANTHROPIC_MODEL,
            max_tokens=8,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers=huge,
        )
    await claude.close()
    assert refused.value.status_code == 431
    assert "too large" in refused.value.message
    assert received(fake_provider) == []


async def test_refused_connections_leave_no_traceback(
    small_gateway: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    held = [await asyncio.open_connection("127.0.0.1", small_gateway.port) for _ in range(4)]
    answers = await asyncio.gather(*(raw_answer(small_gateway.port, b"") for _ in range(10)))
    assert all(answer.startswith(b"HTTP/1.1 503") for answer in answers)
    for _, writer in held:
        writer.close()
    await asyncio.sleep(0.2)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= 40]
    server = small_gateway.runner.server if small_gateway.runner else None
    assert isinstance(server, GatewayServer) and server.open == 0


def test_idle_keep_alive_connections_are_closed_in_minutes(settings: Settings) -> None:
    app = create_app(settings)
    assert app._handler_args["keepalive_timeout"] == 75.0
