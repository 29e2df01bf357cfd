"""The LLM plane under each auth mode, driven with the official SDKs: who may call, which
credential goes upstream, and how a refusal reads (the gateway's, never the provider's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.auth.planes import ROUTE_AUTH, undeclared
from gateway.fake_provider import FAULTS, RECEIVED, Fault
from gateway.settings import Settings
from tests.conftest import ANTHROPIC_MODEL
from tests.harness import (
    ADMIN,
    ADMIN_TOKEN,
    POOL_ANTHROPIC,
    POOL_OPENAI,
    POOL_OPENAI_2,
    Gateway,
    MakeGateway,
    create_key,
    keys_mode,
)

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": ANTHROPIC_MODEL, "max_tokens": 32,
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip


def lowered(headers: dict[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def last_received(gw: Gateway) -> dict[str, str]:
    return {k.lower(): v for k, v in gw.fake.app[RECEIVED][-1].headers.items()}


@pytest.fixture
async def keyed(make_gateway: MakeGateway, fake_provider: TestServer, tmp_path: Path) -> Gateway:
    return await make_gateway(None, **keys_mode(fake_provider, tmp_path))


async def test_a_gateway_key_calls_both_apis_and_the_pool_credential_goes_upstream(
    keyed: Gateway,
) -> None:
    key = (await create_key(keyed))["key"]
    client = openai.AsyncOpenAI(base_url=keyed.url("/v1"), api_key=key, max_retries=0)
    answer = await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert answer.choices[0].message.content
    sent = last_received(keyed)
    assert sent["authorization"] == f"Bearer {POOL_OPENAI}"
    assert key not in str(sent)
    claude = anthropic.AsyncAnthropic(base_url=keyed.url(""), api_key=key, max_retries=0)
    message = await claude.messages.create(**MESSAGES)  # type: ignore[call-overload]
    assert message.content
    sent = last_received(keyed)
    assert sent["x-api-key"] == POOL_ANTHROPIC
    assert "authorization" not in sent
    await client.close()
    await claude.close()


async def test_a_provider_key_in_keys_mode_is_refused_and_neither_used_nor_stored(
    keyed: Gateway,
) -> None:
    before = len(keyed.fake.app[RECEIVED])
    status, headers, body = await keyed.post(
        "/v1/chat/completions", CHAT, {"Authorization": "Bearer sk-proj-realkey1234567890abcd"}
    )
    assert status == 401
    message = body["error"]["message"]
    assert message.startswith("gateway (not OpenAI):")
    assert "neither used nor stored" in message
    assert "sk-proj-realkey" not in str(body)
    assert headers["X-Gateway-Error"] == "gateway_auth_provider_key"
    assert lowered(headers)["x-request-id"].startswith("gwreq_")
    assert len(keyed.fake.app[RECEIVED]) == before
    # Anthropic's shape, for Claude Code ("Failed to authenticate" followed by our words).
    status, headers, body = await keyed.post(
        "/v1/messages", MESSAGES, {"x-api-key": "sk-ant-api03-realkey", "anthropic-version": "1"}
    )
    assert status == 401
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    assert body["error"]["message"].startswith("gateway (not Anthropic):")
    assert lowered(headers)["request-id"] == lowered(headers)["x-request-id"]


async def test_unknown_id_and_wrong_secret_read_the_same(keyed: Gateway) -> None:
    key = (await create_key(keyed))["key"]
    public = key.split("_")[1]
    wrong_secret = key[:-10] + ("A" if key[-10] != "A" else "B") + key[-9:]
    answers = []
    for token in (wrong_secret, f"gw_ZZZZZZZZZZZZ_{key.split('_')[2]}"):
        status, headers, body = await keyed.post(
            "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {token}"}
        )
        assert status == 401
        answers.append((headers["X-Gateway-Error"], body["error"]["type"]))
        assert token not in str(body)
    assert answers[0] == answers[1]
    assert public  # the public id may be shown; the secret never


async def test_a_key_limited_to_models_is_refused_others_with_a_403(keyed: Gateway) -> None:
    key = (await create_key(keyed, models=["gpt-4o*"]))["key"]
    ok = await keyed.post("/v1/chat/completions", CHAT, {"Authorization": f"Bearer {key}"})
    assert ok[0] == 200
    status, headers, body = await keyed.post(
        "/v1/chat/completions", {**CHAT, "model": "o3"}, {"Authorization": f"Bearer {key}"}
    )
    assert status == 403
    assert headers["X-Gateway-Error"] == "gateway_forbidden_model"
    assert "may not call model 'o3'" in body["error"]["message"]


async def test_passthrough_refuses_the_admin_token_on_a_model_route(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(None)
    before = len(gw.fake.app[RECEIVED])
    status, headers, body = await gw.post(
        "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert status == 401
    assert headers["X-Gateway-Error"] == "gateway_auth_wrong_plane"
    assert ADMIN_TOKEN not in str(body)
    assert len(gw.fake.app[RECEIVED]) == before  # never sent to the provider


async def test_a_gateway_key_on_the_admin_api_is_refused(keyed: Gateway) -> None:
    key = (await create_key(keyed))["key"]
    async with keyed._http.get(
        keyed.url("/gateway/sessions"), headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        assert resp.status == 401
        assert "model routes" in (await resp.json())["error"]


async def test_a_refused_pool_credential_fails_over_to_the_next(keyed: Gateway) -> None:
    key = (await create_key(keyed))["key"]
    keyed.fake.app[FAULTS].replace(Fault(kind="status", status=401, count=1))
    status, _headers, _body = await keyed.post(
        "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {key}"}
    )
    assert status == 200
    first, second = list(keyed.fake.app[RECEIVED])[-2:]
    assert first.headers["Authorization"] == f"Bearer {POOL_OPENAI}"
    assert second.headers["Authorization"] == f"Bearer {POOL_OPENAI_2}"


async def test_mixed_mode_brings_your_own_key_only_with_the_scope(
    make_gateway: MakeGateway, fake_provider: TestServer, tmp_path: Path
) -> None:
    gw = await make_gateway(None, **keys_mode(fake_provider, tmp_path, mode="mixed"))
    plain = (await create_key(gw))["key"]
    byok = (await create_key(gw, name="byok-bot", scopes=["llm", "upstream:byok"]))["key"]
    own = "sk-proj-mine-1234567890"
    status, headers, _ = await gw.post(
        "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {own}", "X-Gateway-Key": plain}
    )
    assert status == 401 and headers["X-Gateway-Error"] == "gateway_auth_provider_key"
    status, _, _ = await gw.post(
        "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {own}", "X-Gateway-Key": byok}
    )
    assert status == 200
    assert last_received(gw)["authorization"] == f"Bearer {own}"
    assert "x-gateway-key" not in last_received(gw)


async def test_a_foreign_host_is_refused_but_probes_answer_any(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(None)
    status, headers, body = await gw.post(
        "/v1/chat/completions", CHAT, {"Authorization": "Bearer sk-x", "Host": "evil.example"}
    )
    assert status == 400
    assert headers["X-Gateway-Error"] == "gateway_host_refused"
    assert body["error"]["message"].startswith("gateway (not OpenAI):")
    async with gw._http.get(gw.url("/gateway/health"), headers={"Host": "10.1.2.3:8787"}) as r:
        assert r.status == 200
    async with gw._http.get(gw.url("/gateway/sessions"), headers={**ADMIN, "Host": "evil"}) as r:
        assert r.status == 400


async def test_an_app_with_a_route_that_declares_no_plane_does_not_start(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    app = create_app(Settings(store="memory://", state_dir=tmp_path, admin_token=ADMIN_TOKEN))
    assert undeclared(app) == []
    assert {auth.plane for auth in app[ROUTE_AUTH].values()} == {"llm", "admin"}
    app.router.add_get("/undeclared", _nothing)
    assert sorted(undeclared(app)) == ["GET /undeclared", "HEAD /undeclared"]
    with pytest.raises(RuntimeError, match=r"routes without a plane and scope: .*GET /undeclared"):
        await aiohttp_server(app)


async def _nothing(request: web.Request) -> web.Response:
    return web.Response()


@pytest.mark.parametrize("query", ["api_key=sk-abc123q", "key=qv7x9&model=y",
                                   "a=1&Access_Token=tok9q7", "X-API-KEY=zq93k",
                                   "%61pi_key=skq71"])  # fmt: skip
async def test_a_credential_in_the_query_string_is_refused_and_never_logged(
    make_gateway: MakeGateway, query: str
) -> None:
    gw = await make_gateway(None)
    before = len(gw.fake.app[RECEIVED])
    status, headers, body = await gw.post(
        f"/v1/chat/completions?{query}", CHAT, {"Authorization": "Bearer sk-x"}
    )
    assert status == 400
    assert headers["X-Gateway-Error"] == "gateway_credential_in_query"
    assert query.split("=")[1].split("&")[0] not in str(body)
    assert len(gw.fake.app[RECEIVED]) == before
    status, _, _ = await gw.post(
        "/v1/chat/completions?foo=bar", CHAT, {"Authorization": "Bearer x"}
    )
    assert status == 200  # other query parameters pass


async def test_a_separate_admin_listener_serves_only_the_admin_api(
    fake_provider: TestServer, tmp_path: Path, unused_tcp_port_factory: Any
) -> None:
    import aiohttp

    main, admin = unused_tcp_port_factory(), unused_tcp_port_factory()
    settings = Settings(
        store="memory://", state_dir=tmp_path, admin_token=ADMIN_TOKEN, port=main,
        admin_host="127.0.0.1", admin_port=admin,
        upstreams={"openai": str(fake_provider.make_url("/v1"))},
    )  # fmt: skip
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", main).start()
    await web.TCPSite(runner, "127.0.0.1", admin).start()
    try:
        async with aiohttp.ClientSession() as http:
            on_main, on_admin = f"http://127.0.0.1:{main}", f"http://127.0.0.1:{admin}"
            async with http.get(f"{on_main}/gateway/sessions", headers=ADMIN) as r:
                assert r.status == 404
            async with http.get(f"{on_admin}/gateway/sessions", headers=ADMIN) as r:
                assert r.status == 200
            async with http.post(
                f"{on_admin}/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer k"}
            ) as r:
                assert r.status == 404
            async with http.post(
                f"{on_main}/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer k"}
            ) as r:
                assert r.status == 200
            for base in (on_main, on_admin):  # probes on both
                async with http.get(f"{base}/gateway/health") as r:
                    assert r.status == 200
    finally:
        await runner.cleanup()


async def test_a_credential_header_that_is_not_utf8_is_a_4xx_not_a_500(
    make_gateway: MakeGateway, fake_provider: TestServer, tmp_path: Path
) -> None:
    import socket

    for gw in (
        await make_gateway(None),
        await make_gateway(None, **keys_mode(fake_provider, tmp_path)),
    ):
        port = gw.server.port
        assert port is not None
        for header in (b"x-api-key: sk-\xff\xfe", b"Authorization: Bearer abc\xff"):
            for path in (b"/v1/chat/completions", b"/gateway/sessions"):
                body = b'{"model": "gpt-4o-mini", "messages": []}'
                request = (
                    b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + header + b"\r\n"
                    b"Content-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
                )  # fmt: skip

                def exchange(data: bytes = request, port: int = port) -> bytes:
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                        sock.sendall(data)
                        chunks = []
                        while chunk := sock.recv(65536):
                            chunks.append(chunk)
                    return b"".join(chunks)

                import asyncio

                answer = await asyncio.to_thread(exchange)
                status = int(answer.split(b" ", 2)[1])
                assert 400 <= status < 500, (path, header, answer[:300])


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer\t{ADMIN_TOKEN}"},
        {"Authorization": f"Token {ADMIN_TOKEN}"},
        {"x-api-key": f"Bearer {ADMIN_TOKEN}"},
        {"x-api-key": ADMIN_TOKEN},
    ],
)
async def test_the_admin_token_in_any_spelling_never_reaches_the_provider(
    make_gateway: MakeGateway, headers: dict[str, str]
) -> None:
    gw = await make_gateway(None)
    before = len(gw.fake.app[RECEIVED])
    status, answer_headers, _ = await gw.post("/v1/chat/completions", CHAT, headers)
    assert status == 401 and answer_headers["X-Gateway-Error"] == "gateway_auth_wrong_plane"
    assert len(gw.fake.app[RECEIVED]) == before


async def test_gateway_keys_reach_only_the_paths_an_operator_opened(
    make_gateway: MakeGateway, fake_provider: TestServer, tmp_path: Path
) -> None:
    gw = await make_gateway(None, **keys_mode(fake_provider, tmp_path))
    key = (await create_key(gw, models=["gpt-4o-mini"]))["key"]
    auth = {"Authorization": f"Bearer {key}"}
    before = len(gw.fake.app[RECEIVED])
    for path, body in (
        ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"}),
        ("/v1/completions", {"model": "gpt-4o", "prompt": "x"}),
        ("/v1/messages/batches", {"requests": []}),
    ):
        status, headers, answer = await gw.post(path, body, auth)
        assert status == 403, (path, answer)
        assert headers["X-Gateway-Error"] == "gateway_forbidden_path"
    assert len(gw.fake.app[RECEIVED]) == before
    async with gw._http.get(gw.url("/v1/models"), headers=auth) as resp:
        assert resp.status == 200  # open by default
    opened = await make_gateway(
        None, **{**keys_mode(fake_provider, tmp_path), "auth": {"mode": "keys",
                                                              "open_paths": ["/v1/embeddings"]}}
    )  # fmt: skip
    key = (await create_key(opened, models=["gpt-4o-mini"]))["key"]
    status, headers, _ = await opened.post(
        "/v1/embeddings", {"model": "text-embedding-3-large", "input": "x"},
        {"Authorization": f"Bearer {key}"},
    )  # fmt: skip
    assert status == 403 and headers["X-Gateway-Error"] == "gateway_forbidden_model"


async def test_a_403_from_the_upstream_moves_no_credential(keyed: Gateway) -> None:
    key = (await create_key(keyed))["key"]
    keyed.fake.app[FAULTS].replace(Fault(kind="status", status=403, count=1))
    before = len(keyed.fake.app[RECEIVED])
    status, _headers, _body = await keyed.post(
        "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {key}"}
    )
    assert status == 403  # the upstream's own answer, passed on
    assert len(keyed.fake.app[RECEIVED]) == before + 1  # not sent again with another entry
    status, _, _ = await keyed.post(
        "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {key}"}
    )
    assert status == 200
    assert last_received(keyed)["authorization"] == f"Bearer {POOL_OPENAI}"  # still the first


async def test_a_credential_header_sent_twice_is_refused(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(None)
    before = len(gw.fake.app[RECEIVED])
    async with gw._http.post(
        gw.url("/v1/chat/completions"),
        json=CHAT,
        headers=[
            ("Authorization", "Bearer sk-one-key-1234"),
            ("Authorization", f"Bearer {ADMIN_TOKEN}"),
        ],
    ) as resp:
        assert resp.status == 400
    assert len(gw.fake.app[RECEIVED]) == before


async def test_open_paths_name_their_methods_and_model_limits_read_any_body(
    make_gateway: MakeGateway, fake_provider: TestServer, tmp_path: Path
) -> None:
    gw = await make_gateway(
        None,
        **{
            **keys_mode(fake_provider, tmp_path),
            "auth": {"mode": "keys", "open_paths": ["GET /v1/models/*", "POST /v1/embeddings"]},
        },
    )
    key = (await create_key(gw, models=["gpt-4o-mini"]))["key"]
    auth = {"Authorization": f"Bearer {key}"}
    async with gw._http.delete(gw.url("/v1/models/ft:gpt-4o:org:prod:abc"), headers=auth) as r:
        assert r.status == 403  # the organization's fine-tunes are not a key's to delete
    spaced = b' {"model": "text-embedding-3-large", "input": "x"}'
    status, headers, _ = await gw.post("/v1/embeddings", spaced, auth)
    assert status == 403 and headers["X-Gateway-Error"] == "gateway_forbidden_model"
    status, headers, _ = await gw.post("/v1/embeddings", b"not json", auth)
    assert status == 403 and headers["X-Gateway-Error"] == "gateway_forbidden_model"


async def test_refusals_are_counted_by_how_the_credential_was_checked(keyed: Gateway) -> None:
    from gateway.appkeys import METRICS

    key = (await create_key(keyed))["key"]
    wrong = key[:-8] + ("A" * 8 if not key.endswith("A" * 8) else "B" * 8)
    await keyed.post("/v1/chat/completions", CHAT, {"Authorization": f"Bearer {wrong}"})
    await keyed.post("/v1/chat/completions", CHAT, {"Authorization": "Bearer sk-proj-x1234567"})
    await keyed.post("/v1/chat/completions", CHAT, {"Authorization": f"Bearer {ADMIN_TOKEN}"})
    registry = keyed.server.app[METRICS].registry

    def attempts(method: str, outcome: str) -> float:
        labels = {"plane": "llm", "method": method, "outcome": outcome}
        return registry.get_sample_value("gateway_auth_attempts_total", labels) or 0.0

    assert attempts("key", "invalid") == 1
    assert attempts("none", "provider_key") == 1  # no gateway credential was there to check
    assert attempts("none", "wrong_plane") == 1
