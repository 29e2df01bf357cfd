"""Fixtures for the fake provider's tests: a running fake, raw and SDK clients aimed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.fake_provider import FakeProviderConfig, create_app

AUTH = {"Authorization": "Bearer test-key"}
ANTHROPIC_HEADERS = {"x-api-key": "test-key", "anthropic-version": "2023-06-01"}
CLAUDE_MODEL = "claude-sonnet-4-6"


@pytest.fixture
def fake_app() -> web.Application:
    return create_app(FakeProviderConfig())


@pytest.fixture
async def fake(
    fake_app: web.Application,
    aiohttp_client: Callable[[web.Application], Awaitable[TestClient[Any, Any]]],
) -> TestClient[Any, Any]:
    """A raw aiohttp client on the fake provider."""
    return await aiohttp_client(fake_app)


@pytest.fixture
async def fake_server(
    fake_app: web.Application,
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
) -> TestServer:
    return await aiohttp_server(fake_app)


@pytest.fixture
async def oai(fake_server: TestServer) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(
        base_url=str(fake_server.make_url("/v1")), api_key="test-key", max_retries=0
    )
    yield client
    await client.close()


@pytest.fixture
async def claude(fake_server: TestServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(
        base_url=str(fake_server.make_url("")), api_key="test-key", max_retries=0
    )
    yield client
    await client.close()


def parse_sse(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) pairs of an SSE body."""
    events: list[tuple[str | None, str]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name = None
        data = []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
        events.append((name, "\n".join(data)))
    return events
