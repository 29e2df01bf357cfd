"""Request bodies: decoded from their Content-Encoding and forwarded as the upstream can read
them, bounded in size and in time, and a client that leaves mid-body is a 499, not a 500."""

from __future__ import annotations

import asyncio
import gzip
import logging
import time
import zlib
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.appkeys import STORE
from gateway.body import inflate
from gateway.errors import BadRequest, BodyTooLarge
from gateway.settings import Settings, Timeouts
from tests.conftest import received

CHAT = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
MESSAGES = orjson.dumps(
    {
        "model": "claude-sonnet-4-6",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}],
    }
)
OPENAI = {"Authorization": "Bearer sk-test", "Content-Type": "application/json"}
ANTHROPIC = {
    "x-api-key": "sk-ant-test",
    "anthropic-version": "2023-06-01",
    "Content-Type": "application/json",
}


async def post(
    server: TestServer, path: str, data: bytes, headers: dict[str, str]
) -> tuple[int, Any]:
    async with (
        ClientSession() as http,
        http.post(server.make_url(path), data=data, headers=headers) as response,
    ):
        return response.status, await response.json(content_type=None)


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data, wbits=-15)),  # raw deflate, as some send
    ],
)
async def test_a_compressed_body_goes_upstream_decoded_without_its_encoding(
    gateway: TestServer, fake_provider: TestServer, encoding: str, encode: Any
) -> None:
    headers = {**OPENAI, "Content-Encoding": encoding, "X-Gateway-Session": "zipped"}
    status, payload = await post(gateway, "/v1/chat/completions", encode(CHAT), headers)
    assert status == 200, payload
    (seen,) = received(fake_provider)
    assert seen.body == CHAT
    assert "content-encoding" not in {name.lower() for name in seen.headers}
    record = await gateway.app[STORE].get("zipped")
    assert record is not None and record.turns == 1


@pytest.mark.parametrize(
    ("path", "headers", "body"),
    [("/v1/chat/completions", OPENAI, CHAT), ("/v1/messages", ANTHROPIC, MESSAGES)],
)
async def test_a_broken_compressed_body_is_a_400_in_the_providers_shape(
    gateway: TestServer, fake_provider: TestServer, path: str, headers: dict[str, str], body: bytes
) -> None:
    broken = gzip.compress(body)[:-12]
    status, payload = await post(gateway, path, broken, {**headers, "Content-Encoding": "gzip"})
    assert status == 400
    assert payload["error"]["type"] == "invalid_request_error"
    assert "decompressed" in payload["error"]["message"]
    status, payload = await post(
        gateway, path, b"garbage", {**headers, "Content-Encoding": "deflate"}
    )
    assert status == 400
    assert received(fake_provider) == []


@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip, br", "compress"])
async def test_an_encoding_the_gateway_cannot_read_is_a_415_in_the_providers_shape(
    gateway: TestServer, fake_provider: TestServer, encoding: str
) -> None:
    headers = {**ANTHROPIC, "Content-Encoding": encoding}
    status, payload = await post(gateway, "/v1/messages", b"\x00\x01binary", headers)
    assert status == 415
    assert payload["type"] == "error"
    assert payload["error"]["type"] == "invalid_request_error"
    assert "Content-Encoding" in payload["error"]["message"]
    assert received(fake_provider) == []


async def test_a_gzip_bomb_is_a_413(
    aiohttp_server: Any, settings: Settings, fake_provider: TestServer
) -> None:
    gateway = await aiohttp_server(
        create_app(settings.model_copy(update={"max_body_bytes": 65536}))
    )
    bomb = gzip.compress(b"{" + b" " * 50_000_000 + b"}", 9)
    assert len(bomb) < 65536
    headers = {**OPENAI, "Content-Encoding": "gzip"}
    status, payload = await post(gateway, "/v1/chat/completions", bomb, headers)
    assert status == 413
    assert "max_body_bytes" in payload["error"]["message"]
    assert received(fake_provider) == []


def test_inflate_stops_at_the_limit_and_reads_gzip_members() -> None:
    with pytest.raises(BodyTooLarge):
        inflate(gzip.compress(b"x" * 100_000), (31,), 50_000)
    assert inflate(gzip.compress(b"ab") + gzip.compress(b"cd"), (31,), 100) == b"abcd"
    with pytest.raises(BadRequest):
        inflate(gzip.compress(b"ab") + b"trailing", (31,), 100)


async def _slow_gateway(aiohttp_server: Any, settings: Settings, seconds: float) -> TestServer:
    timeouts = Timeouts(client_body=seconds)
    server: TestServer = await aiohttp_server(
        create_app(settings.model_copy(update={"timeouts": timeouts}))
    )
    return server


async def test_a_body_that_does_not_arrive_in_time_is_a_408_and_the_connection_closes(
    aiohttp_server: Any, settings: Settings, fake_provider: TestServer
) -> None:
    gateway = await _slow_gateway(aiohttp_server, settings, 0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer k\r\n"
        b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"model"'
    )
    await writer.drain()
    started = time.monotonic()
    answer = await asyncio.wait_for(reader.read(), 5)  # read() returns: the gateway closed
    assert time.monotonic() - started < 4  # the timeout, then at most 2 s of lingering
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert orjson.loads(body)["error"]["code"] == "request_timeout"
    writer.close()
    assert received(fake_provider) == []


async def test_a_client_gone_mid_body_is_one_499_line_without_traceback(
    gateway: TestServer, fake_provider: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    _reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer k\r\n"
        b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"model"'
    )
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    for _ in range(50):
        lines = [r for r in caplog.records if r.name == "gateway.requests"]
        if lines:
            break
        await asyncio.sleep(0.02)
    (line,) = lines
    assert (line.status, line.outcome) == (499, "client_gone")  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    async with ClientSession() as http, http.get(gateway.make_url("/metrics")) as response:
        exposition = await response.text()
    requests = [line for line in exposition.splitlines() if line.startswith("gateway_requests")]
    assert any('status_class="4xx"' in line for line in requests)
    assert not any('status_class="5xx"' in line for line in requests)
    assert received(fake_provider) == []


async def test_hundreds_of_slow_clients_do_not_starve_the_others(
    aiohttp_server: Any, settings: Settings, fake_provider: TestServer
) -> None:
    """300 sockets that send headers and a first piece of body, then nothing: health and LLM
    calls still answer at once, and the body timeout frees every one of those slots."""
    gateway = await _slow_gateway(aiohttp_server, settings, 1.0)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer k\r\n"
        b'Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"model"'
    )
    slow = []
    for _ in range(300):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(head)
        slow.append((reader, writer))
    await asyncio.gather(*(writer.drain() for _, writer in slow))
    started = time.monotonic()
    async with ClientSession() as http:
        async with http.get(gateway.make_url("/gateway/health")) as health:
            assert health.status == 200
        status, _ = await post(gateway, "/v1/chat/completions", CHAT, OPENAI)
        assert status == 200
    assert time.monotonic() - started < 2
    answers = await asyncio.wait_for(asyncio.gather(*(r.read() for r, _ in slow)), 10)
    assert all(answer.startswith(b"HTTP/1.1 408") for answer in answers)
    for _, writer in slow:
        writer.close()
    assert len(received(fake_provider)) == 1


def test_many_gzip_members_are_refused_quickly() -> None:
    """Each member's decoder copied the rest of the input: 4 MiB of empty members took 10 s."""
    started = time.monotonic()
    with pytest.raises(BadRequest, match="gzip members"):
        inflate(gzip.compress(b"", mtime=0) * 200_000, (31,), 64 * 1024 * 1024)
    assert time.monotonic() - started < 1


async def test_every_content_encoding_header_counts(
    gateway: TestServer, fake_provider: TestServer
) -> None:
    async with (
        ClientSession() as http,
        http.post(
            gateway.make_url("/v1/embeddings"),
            data=gzip.compress(b'{"model": "text-embedding-3-small", "input": "hi"}'),
            headers=[
                ("Authorization", "Bearer sk-test"),
                ("Content-Type", "application/json"),
                ("Content-Encoding", "identity"),
                ("Content-Encoding", "gzip"),
            ],
        ) as response,
    ):
        assert response.status == 415
    assert received(fake_provider) == []
