"""Fixtures: the fake provider, a gateway aimed at it, and the official SDKs as clients."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner
from blockbuster import BlockBuster, blockbuster_ctx

from gateway.app import create_app
from gateway.fake_provider import RECEIVED, FakeProviderConfig, ReceivedRequest
from gateway.fake_provider import create_app as create_fake_app
from gateway.redact import REDACTOR
from gateway.server import GatewayRunner
from gateway.settings import Settings
from tests.harness import ADMIN_TOKEN

# Recorded agent requests, kept in the repository (copied from the team's shared fixtures).
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "agents"
ANTHROPIC_MODEL = "claude-sonnet-4-6"


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    """Fail any blocking call made on the event loop (file or socket I/O, sleeps)."""
    with blockbuster_ctx("gateway") as bb:
        yield bb


@pytest.fixture
def fake_config() -> FakeProviderConfig:
    return FakeProviderConfig()


@pytest.fixture
async def fake_provider(aiohttp_server: Any, fake_config: FakeProviderConfig) -> TestServer:
    server: TestServer = await aiohttp_server(create_fake_app(fake_config))
    return server


def received(fake_provider: TestServer) -> list[ReceivedRequest]:
    return list(fake_provider.app[RECEIVED])


@pytest.fixture(autouse=True)
def _secrets_of_this_test_only() -> Iterator[None]:
    """The redactor is process-wide: a secret one test made (a weak token, a canary) must not
    blank text in the tests after it."""
    known = REDACTOR.known()
    yield
    REDACTOR.forget_since(known)


@pytest.fixture
def settings(fake_provider: TestServer, tmp_path: Path) -> Settings:
    return Settings(
        store="memory://",
        admin_token=ADMIN_TOKEN,
        state_dir=tmp_path / "state",
        upstreams=dict(
            openai=str(fake_provider.make_url("/v1")),
            anthropic=str(fake_provider.make_url("")).rstrip("/"),
        ),
    )


class GatewayTestServer(TestServer):
    """A test server on the gateway's own runner (connection cap, parser errors as JSON)."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return GatewayRunner(self.app, **kwargs)


@pytest.fixture
async def gateway(settings: Settings) -> AsyncIterator[TestServer]:
    server = GatewayTestServer(create_app(settings))
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture
async def openai_client(gateway: TestServer) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(
        base_url=str(gateway.make_url("/v1")), api_key="sk-test-openai", max_retries=0
    )
    yield client
    await client.close()


@pytest.fixture
async def anthropic_client(gateway: TestServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(
        base_url=str(gateway.make_url("")).rstrip("/"), api_key="sk-ant-test", max_retries=0
    )
    yield client
    await client.close()


def load_fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


# The make_gateway fixture (a gateway on a policy file of the test's own), for every test module.
from tests.harness import make_gateway  # noqa: E402, F401
from tests.redis_server import shared_redis  # noqa: E402, F401
