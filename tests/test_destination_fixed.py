"""Only the operator chooses where a call goes (CVE-2024-6587: a request field chose the host,
and the provider key went with it). A second fake provider stands where a hostile request
points; every trick in the body, the headers or the request target must leave it without a
single request, in passthrough and in keys mode, and in keys mode the pool's credentials
reach only the configured upstream (never the second one, never a client's answer)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.fake_provider import RECEIVED, FakeProviderConfig
from gateway.fake_provider import create_app as create_fake_app
from tests.conftest import ANTHROPIC_MODEL
from tests.harness import ADMIN, ANTHROPIC_KEY, OPENAI_KEY, Gateway, MakeGateway

POOL_OPENAI = "sk-pool-openai-destination-0001"
POOL_ANTHROPIC = "sk-ant-pool-destination-0001"
POOL_SECRETS = (POOL_OPENAI, POOL_ANTHROPIC)

BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/responses": {"model": "gpt-5", "input": "hi"},
    "/v1/messages": {
        "model": ANTHROPIC_MODEL,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}],
    },
    "/v1/messages/count_tokens": {
        "model": ANTHROPIC_MODEL,
        "messages": [{"role": "user", "content": "hi"}],
    },
    "/v1/embeddings": {"model": "text-embedding-3-small", "input": "hi"},
}


@dataclass
class Scene:
    """The gateway, the upstream it is configured with, and the second provider a request
    tries to reach instead (every request that reaches it, any path, is in ``reached``)."""

    gateway: Gateway
    second: TestServer
    openai: dict[str, str]
    anthropic: dict[str, str]
    reached: list[str] = field(default_factory=list)
    answers: list[bytes] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"127.0.0.1:{self.second.port}"

    def headers(self, path: str) -> dict[str, str]:
        """The credential for the API of ``path`` (passthrough: one provider key a call)."""
        if path.startswith("/v1/messages"):
            return {**self.anthropic, "anthropic-version": "2023-06-01"}
        return dict(self.openai)

    async def post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> int:
        status, answer_headers, answer = await self.gateway.post(
            path, body, {**self.headers(path), **(headers or {})}
        )
        self.answers.append(json.dumps([answer_headers, str(answer)]).encode())
        return status

    def assert_untouched(self) -> None:
        assert self.reached == [], self.reached
        assert list(self.second.app[RECEIVED]) == []
        for answer in self.answers:  # a pool credential never travels back to a client
            assert not any(secret.encode() in answer for secret in POOL_SECRETS), answer[:300]


def recorder(reached: list[str]) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def record(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        reached.append(f"{request.method} {request.path_qs}")
        return await handler(request)

    return record


def keys_mode(fake: TestServer, tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "oa").write_text(POOL_OPENAI + "\n")
    (tmp_path / "an").write_text(POOL_ANTHROPIC + "\n")
    pool = "platform"
    return {
        "auth": {"mode": "keys", "open_paths": ["/v1/models", "/v1/models/*", "/v1/embeddings"]},
        "upstreams": {
            "openai": {
                "url": str(fake.make_url("/v1")),
                "credentials": {pool: [{"name": "one", "value": f"file:{tmp_path / 'oa'}"}]},
            },
            "anthropic": {
                "url": str(fake.make_url("")).rstrip("/"),
                "credentials": {pool: [{"name": "one", "value": f"file:{tmp_path / 'an'}"}]},
            },
        },
    }


@pytest.fixture(params=["passthrough", "keys"])
async def scene(
    request: pytest.FixtureRequest,
    make_gateway: MakeGateway,
    fake_provider: TestServer,
    aiohttp_server: Any,
    tmp_path: Path,
) -> Scene:
    reached: list[str] = []
    second_app = create_fake_app(FakeProviderConfig())
    second_app.middlewares.append(recorder(reached))
    second: TestServer = await aiohttp_server(second_app)
    if request.param == "passthrough":
        gateway = await make_gateway(None)
        openai, anthropic = {"Authorization": f"Bearer {OPENAI_KEY}"}, {"x-api-key": ANTHROPIC_KEY}
    else:
        gateway = await make_gateway(None, **keys_mode(fake_provider, tmp_path))
        status, _, created = await gateway.post(
            "/gateway/keys", {"team": "platform", "name": "destination-bot"}, ADMIN
        )
        assert status == 201, created
        openai = {"Authorization": f"Bearer {created['key']}"}
        anthropic = {"x-api-key": created["key"]}
    return Scene(gateway, second, openai, anthropic, reached)


def body_tricks(to: str) -> list[dict[str, Any]]:
    """Fields that chose the host or the key in some gateway or SDK, aimed at ``to``."""
    url, v1 = f"http://{to}", f"http://{to}/v1"
    key = "sk-attacker-chosen-0000"
    return [
        {"api_base": v1},
        {"base_url": v1},
        {"api_key": key, "base_url": url},
        {"extra_headers": {"Host": to, "X-Forwarded-Host": to, "Authorization": f"Bearer {key}"}},
        {"extra_body": {"api_base": v1, "base_url": v1}},
        {"azure_endpoint": url, "api_version": "2024-02-01"},
        {"litellm_params": {"api_base": v1, "api_key": key, "custom_llm_provider": "openai"}},
        {"metadata": {"api_base": v1, "base_url": v1}},
        {"api_base": v1, "base_url": v1, "azure_endpoint": url, "url": v1, "host": to},
    ]


@pytest.mark.parametrize("path", list(BODIES))
async def test_no_body_field_chooses_the_destination(scene: Scene, path: str) -> None:
    before = len(scene.gateway.fake.app[RECEIVED])
    tricks = body_tricks(scene.where)
    for trick in tricks:
        status = await scene.post(path, {**BODIES[path], **trick})
        assert 100 <= status < 600
    scene.assert_untouched()
    # Not refused wholesale: the calls went, to the configured upstream.
    assert len(scene.gateway.fake.app[RECEIVED]) - before == len(tricks)


def header_tricks(to: str) -> list[dict[str, str]]:
    url = f"http://{to}/v1/chat/completions"
    return [
        {"Host": to},
        {"X-Forwarded-Host": to},
        {"X-Forwarded-Host": to, "X-Forwarded-Proto": "http", "X-Forwarded-Port": to[10:]},
        {"X-Original-URL": url},
        {"X-Rewrite-URL": url},
        {"X-Original-Host": to},
        {"X-Host": to},
        {"Forwarded": f"host={to};proto=http"},
        {"Forwarded": f'for=127.0.0.1;host="{to}"'},
        {"X-Gateway-Upstream": f"http://{to}"},
        {"X-Gateway-Base-URL": f"http://{to}"},
        {"Host": to, "X-Forwarded-Host": to, "Forwarded": f"host={to}", "X-Original-URL": url},
    ]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/models"])
async def test_no_header_chooses_the_destination(scene: Scene, path: str) -> None:
    for trick in header_tricks(scene.where):
        if path == "/v1/models":
            async with scene.gateway._http.get(
                scene.gateway.url(path), headers={**scene.headers(path), **trick}
            ) as resp:
                scene.answers.append(json.dumps([dict(resp.headers)]).encode() + await resp.read())
                assert 100 <= resp.status < 600
            continue
        status = await scene.post(path, BODIES[path], trick)
        assert 100 <= status < 600
    scene.assert_untouched()


async def raw_call(port: int, target: str, headers: dict[str, str], body: bytes) -> bytes:
    """One request as bytes on a socket: the request target exactly as written (a client
    library would normalise it). Returns the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [f"POST {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items())]
        lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
        writer.write("\r\n".join(lines).encode("latin-1") + body)
        await writer.drain()
        async with asyncio.timeout(20):
            return await reader.read()
    finally:
        writer.close()


def targets(to: str, gateway: str) -> list[str]:
    """Request targets that name the second provider in the authority, or smuggle it into
    the path (doubled slashes, userinfo, encoded separators, dot segments, backslashes),
    with and without the session prefix."""
    api = "/v1/chat/completions"
    tails = [
        f"//{to}{api}",
        f"/v1//{to}{api}",
        f"/v1/@{to}{api}",
        f"/v1/..//{to}{api}",
        f"/v1/%2F%2F{to}{api}",
        f"/v1/%2f%2f{to}%2fv1%2fchat%2fcompletions",
        f"/v1/http:%2F%2F{to}{api}",
        f"/v1/chat/completions/../../..//{to}{api}",
        f"/v1/..%2F..%2F{to}{api}",
        f"/v1\\\\{to}{api}",
        f"/v1/\\{to}\\v1\\chat\\completions",
        f"/v1/%5C%5C{to}{api}",
        f"/v1/chat/completions?url=http://{to}{api}",
        f"/v1/chat/completions#@{to}",
    ]
    sessions = [
        f"/s/http:%2F%2F{to}{api}",
        f"/s//{to}{api}",
        f"/s/@{to}{api}",
        f"/s/x/..//{to}{api}",
        f"/s/x/v1//{to}{api}",
        f"/s/x/%2F%2F{to}{api}",
        f"/s/..%2F{to}{api}",
        f"/s/x\\{to}{api}",
        f"/s/x{api}/../../../{to}{api}",
    ]
    absolute = [
        f"http://{to}{api}",
        f"http://{gateway}@{to}{api}",
        f"http://{to}@{gateway}{api}",
        f"http://{to}/s/x{api}",
        f"https://{to}{api}",
    ]
    return tails + sessions + absolute


async def test_no_request_target_chooses_the_destination(scene: Scene) -> None:
    port = scene.gateway.server.port
    assert port is not None
    body = json.dumps(BODIES["/v1/chat/completions"]).encode()
    for target in targets(scene.where, f"127.0.0.1:{port}"):
        for host in (f"127.0.0.1:{port}", scene.where):
            headers = {"Host": host, "Content-Type": "application/json", **scene.openai}
            answer = await raw_call(port, target, headers, body)
            assert answer.startswith(b"HTTP/1.1 ") and answer[9:12].isdigit(), (target, answer)
            scene.answers.append(answer)
    scene.assert_untouched()
