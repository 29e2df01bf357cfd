"""The server around the app: a cap on open connections, a deadline for request headers, and
the HTTP parser's refusals as JSON both SDKs read (``gateway.server``)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer
from aiohttp.web_protocol import RequestHandler

from gateway.app import create_app
from gateway.fake_provider import CONFIG
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


async def test_the_aiohttp_internals_the_server_reads_are_still_there(
    small_gateway: TestServer,
) -> None:
    """``GatewayServer`` and ``GatewayProtocol`` read aiohttp's private state (the module's
    docstring lists it): an aiohttp release that renames any of it fails here first."""
    slots = set(RequestHandler.__slots__)
    assert {"_request_count", "_request_in_progress", "_task_handler"} <= slots
    server = small_gateway.runner.server if small_gateway.runner else None
    assert isinstance(server, GatewayServer)
    assert isinstance(server._connections, dict) and isinstance(server._kwargs, dict)
    assert server._loop is asyncio.get_running_loop()


def test_idle_keep_alive_connections_are_closed_in_minutes(settings: Settings) -> None:
    app = create_app(settings)
    assert app._handler_args["keepalive_timeout"] == 75.0


# -- stopping: `gateway serve` as a process, SIGTERM, the two log lines ------------------------
class Served:
    """``gateway serve`` run as a process, as an operator runs it."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process, self.port = process, port
        self.url = f"http://127.0.0.1:{port}"
        self.lines: list[dict[str, Any]] = []
        """Every JSON log line, once it has stopped."""

    async def stop(self, again_after: float | None = None) -> tuple[float, list[dict[str, Any]]]:
        """SIGTERM (and, ``again_after`` seconds later, SIGINT: an impatient operator); the
        seconds until the process exited, and the ``gateway.server`` lines."""
        loop = asyncio.get_running_loop()
        sent = loop.time()
        self.process.send_signal(signal.SIGTERM)
        if again_after is not None:
            await asyncio.sleep(again_after)
            self.process.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(self.process.communicate(), 30)
        took = loop.time() - sent
        assert self.process.returncode == 0, stderr.decode()
        lines = [orjson.loads(line) for line in stderr.splitlines() if line.startswith(b"{")]
        self.lines = lines
        return took, [line for line in lines if line["logger"] == "gateway.server"]


@pytest.fixture
async def serve_process(
    unused_tcp_port_factory: Callable[[], int], tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    started: list[Served] = []

    async def start(*args: str, **env: str) -> Served:
        """``gateway serve`` with these arguments (a later ``--store`` wins) and variables."""
        port = unused_tcp_port_factory()
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "gateway", "serve", "--store", "memory://"),
            *("--port", str(port), *args),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            # The generated admin token goes to the test's own directory, not the checkout.
            env={**os.environ, "GATEWAY_STATE_DIR": str(tmp_path / "state"), **env},
        )
        served = Served(process, port)
        started.append(served)
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                assert process.returncode is None, "gateway serve exited at start"
                try:
                    async with http.get(f"{served.url}/gateway/health") as health:
                        if health.status == 200:
                            return served
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError("gateway serve did not answer /gateway/health in 30 s")

    yield start
    for served in started:
        if served.process.returncode is None:
            served.process.kill()
            await served.process.wait()


def stop_lines(lines: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    [begin] = [line for line in lines if line["message"].startswith("shutting down on SIGTERM")]
    [end] = [line for line in lines if line["message"].startswith("shut down in ")]
    assert lines.index(begin) < lines.index(end)
    return begin, end


async def test_an_idle_stop_is_quick_and_says_so(serve_process: Callable[..., Any]) -> None:
    served = await serve_process()
    # An early answer (404) to a request whose body is still coming: aiohttp lingers 2 s
    # reading the rest, and a stop used to wait for it.
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"POST /gateway/nope HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
    assert (await reader.readline()).startswith(b"HTTP/1.1 404")
    took, lines = await served.stop()
    writer.close()
    assert took < 1.0, f"an idle gateway took {took:.2f}s to stop"
    begin, end = stop_lines(lines)
    assert begin["in_flight"] == 0 and begin["drain_timeout"] == 30.0
    assert "0 requests in flight" in begin["message"]
    assert (end["in_flight"], end["finished"], end["cut"]) == (0, 0, 0)


def streamed_chat(served: Served) -> tuple[str, dict[str, Any], dict[str, str]]:
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    return f"{served.url}/v1/chat/completions", body, {"Authorization": "Bearer sk-drain"}


async def test_a_stop_lets_the_call_in_flight_finish(
    serve_process: Callable[..., Any], fake_provider: TestServer
) -> None:
    fake_provider.app[CONFIG].chunk_delay = 0.1  # a stream of about 1.5 s
    served = await serve_process(
        GATEWAY_OPENAI_UPSTREAM=str(fake_provider.make_url("/v1")),
        GATEWAY_ANTHROPIC_UPSTREAM=str(fake_provider.make_url("")).rstrip("/"),
    )
    url, body, headers = streamed_chat(served)
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200
        first = await resp.content.readline()  # the answer has begun: the call is in flight
        stopping = asyncio.ensure_future(served.stop())
        rest = await resp.content.read()
    assert first.startswith(b"data: ") and rest.rstrip().endswith(b"data: [DONE]")
    _, lines = await stopping
    begin, end = stop_lines(lines)
    assert begin["in_flight"] == 1 and "1 request in flight" in begin["message"]
    assert (end["in_flight"], end["finished"], end["cut"]) == (1, 1, 0)
    assert "1 request drained (1 finished, 0 cut" in end["message"]


async def test_a_call_past_the_drain_timeout_is_cut(
    serve_process: Callable[..., Any], fake_provider: TestServer
) -> None:
    fake_provider.app[CONFIG].chunk_delay = 1.0  # a stream of about 15 s
    served = await serve_process(
        GATEWAY_OPENAI_UPSTREAM=str(fake_provider.make_url("/v1")),
        GATEWAY_DRAIN_TIMEOUT="0.3",
    )
    url, body, headers = streamed_chat(served)
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as resp:
        await resp.content.readline()
        stopping = asyncio.ensure_future(served.stop())
        with pytest.raises(aiohttp.ClientPayloadError):  # cut: never a stream that looks whole
            await resp.content.read()
    took, lines = await stopping
    assert took < 3.0
    begin, end = stop_lines(lines)
    assert begin["drain_timeout"] == 0.3
    assert (end["in_flight"], end["finished"], end["cut"]) == (1, 0, 1)
    # Accounted before the store closed, as the stop's cut (not a 502 from the upstream).
    [request] = [line for line in served.lines if line["logger"] == "gateway.requests"]
    assert (request["status"], request["outcome"]) == (200, "drain_cut")
    assert request["usage_estimated"] is True
    assert served.lines.index(request) < served.lines.index(end)


async def test_a_second_signal_cuts_the_drain_short_and_still_closes_cleanly(
    serve_process: Callable[..., Any], fake_provider: TestServer
) -> None:
    """Ctrl-C during a drain used to kill the process with a traceback, before the store's
    last writes and the stop's end line."""
    fake_provider.app[CONFIG].chunk_delay = 1.0  # a stream of about 15 s
    served = await serve_process(GATEWAY_OPENAI_UPSTREAM=str(fake_provider.make_url("/v1")))
    url, body, headers = streamed_chat(served)
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as resp:
        await resp.content.readline()
        stopping = asyncio.ensure_future(served.stop(again_after=0.3))
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.content.read()
    took, lines = await stopping  # exit status 0, checked by stop()
    assert took < 3.0, f"the drain (30 s) went on after the second signal: {took:.2f}s"
    assert any(line["message"] == "SIGINT again: cutting the drain short" for line in lines)
    _, end = stop_lines(lines)
    assert (end["in_flight"], end["finished"], end["cut"]) == (1, 0, 1)
