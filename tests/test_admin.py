"""The admin plane: what a web page, a remote peer and a wrong token can and cannot do."""

from __future__ import annotations

from typing import Any
from unittest import mock

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from pydantic import SecretStr

from gateway.admin import ADMITTED, admin_token, serving_problem
from gateway.appkeys import SETTINGS
from gateway.cli import main
from gateway.settings import Settings
from gateway.store import INTERNAL_FIELDS
from tests.harness import Gateway, MakeGateway, session_headers
from tests.policy.apis import call

TOKEN = "s3cret-admin"


async def raw_post(
    gw: Gateway, path: str, data: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(gw.url(path), data=data, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def with_session(gw: Gateway, session: str) -> None:
    assert (await call(gw, "chat", session_headers(session))).ok


async def test_a_cross_site_write_is_refused(make_gateway: MakeGateway) -> None:
    """What a page on http://evil.example can send to localhost without a CORS preflight."""
    gw = await make_gateway(None)
    await with_session(gw, "victim")
    grant = "/gateway/sessions/victim/grant"
    body = b'{"turns": 50, "by": "mallory"}'

    status, error = await raw_post(
        gw, grant, body, {"Content-Type": "text/plain", "Origin": "http://evil.example"}
    )
    assert status == 403 and "origin" in error["error"]
    status, error = await raw_post(gw, grant, body, {"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in error["error"]
    for form in ("application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, _ = await raw_post(gw, grant, body, {"Content-Type": form})
        assert status == 415, form
    status, _ = await raw_post(
        gw, grant, body, {"Content-Type": "application/json", "Origin": "null"}
    )
    assert status == 403
    assert (await gw.session("victim"))["granted_turns"] == 0
    assert await gw.audit_events("grant") == []


async def test_a_local_json_write_is_admitted_and_audited_with_peer_and_how(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(None)
    await with_session(gw, "mine")
    own = f"http://{gw.server.host}:{gw.server.port}"
    status, shown = await raw_post(
        gw,
        "/gateway/sessions/mine/grant",
        b'{"turns": 2, "by": "alice"}',
        {"Content-Type": "application/json", "Origin": own},
    )
    assert status == 200 and shown["granted_turns"] == 2
    [audited] = await gw.audit_events("grant")
    assert audited["by"] == "alice" and audited["auth"] == "loopback"
    assert audited["peer"] == "127.0.0.1"
    status, _ = await raw_post(
        gw, "/gateway/sessions/mine/end", b"{}", {"Content-Type": "application/json"}
    )
    assert status == 200
    [ended] = await gw.audit_events("session_end")
    assert ended["auth"] == "loopback" and ended["peer"] == "127.0.0.1"


def mocked_write(
    settings: Settings, peer: tuple[str, int] | None, host: str = "127.0.0.1:8787", **headers: str
) -> web.Request:
    app = web.Application()
    app[SETTINGS] = settings
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        peer if name == "peername" else default
    )
    return make_mocked_request(
        "POST",
        "/sessions/s/grant",
        headers={"Host": host, "Content-Type": "application/json", **headers},
        app=app,
        transport=transport,
    )


async def admitted(request: web.Request) -> tuple[int, str | None]:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request[ADMITTED])
        return web.json_response({})

    response = await admin_token(handler, write=True)(request)
    return response.status, seen[0] if seen else None


@pytest.mark.parametrize(
    ("peer", "host", "expected"),
    [
        (("127.0.0.1", 5000), "127.0.0.1:8787", (200, "loopback")),
        (("::1", 5000, 0, 0), "[::1]:8787", (200, "loopback")),
        (("127.0.0.1", 5000), "localhost:8787", (200, "loopback")),
        (("10.0.0.5", 1234), "127.0.0.1:8787", (403, None)),
        (("192.168.1.20", 1234), "gateway.lan:8787", (403, None)),
        (None, "127.0.0.1:8787", (403, None)),
        # DNS rebinding: the page's own name resolved to 127.0.0.1.
        (("127.0.0.1", 5000), "evil.example:8787", (403, None)),
    ],
    ids=["v4", "v6", "localhost", "remote", "lan", "no-peer", "rebinding"],
)
async def test_without_a_token_writes_come_only_from_loopback(
    peer: tuple[Any, ...] | None, host: str, expected: tuple[int, str | None]
) -> None:
    request = mocked_write(Settings(), peer, host, **{"X-Forwarded-For": "127.0.0.1"})
    assert await admitted(request) == expected


@pytest.mark.parametrize(
    ("authorization", "expected"),
    [
        (None, (401, None)),
        (TOKEN, (401, None)),
        (f"Basic {TOKEN}", (401, None)),
        ("Bearer wrong", (401, None)),
        (f"Bearer {TOKEN}x", (401, None)),
        ("Bearer ", (401, None)),
        (f"Bearer {TOKEN}", (200, "token")),
        (f"bearer {TOKEN}", (200, "token")),
    ],
    ids=["none", "raw", "basic", "wrong", "longer", "empty", "bearer", "scheme-case"],
)
async def test_with_a_token_only_the_bearer_token_admits(
    authorization: str | None, expected: tuple[int, str | None]
) -> None:
    settings = Settings(admin_token=SecretStr(TOKEN))
    headers = {} if authorization is None else {"Authorization": authorization}
    # From a remote peer: with a token, where a call comes from does not matter.
    request = mocked_write(settings, ("10.0.0.5", 1234), "gateway.lan", **headers)
    assert await admitted(request) == expected


async def test_the_token_guards_reads_and_writes_but_not_health(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(None, admin_token=SecretStr(TOKEN))
    await with_session(gw, "t")
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.url("/gateway/health")) as resp:
            assert resp.status == 200
        for auth in ({}, {"Authorization": TOKEN}, {"Authorization": "Bearer nope"}):
            async with http.get(gw.url("/gateway/sessions/t"), headers=auth) as resp:
                assert resp.status == 401, auth
                assert TOKEN not in await resp.text()
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        async with http.get(gw.url("/gateway/sessions/t"), headers=bearer) as resp:
            assert resp.status == 200
    status, _ = await raw_post(
        gw,
        "/gateway/sessions/t/grant",
        b'{"turns": 1}',
        {"Content-Type": "application/json", "Authorization": TOKEN},
    )
    assert status == 401
    status, _ = await raw_post(
        gw,
        "/gateway/sessions/t/grant",
        b'{"turns": 1, "by": "ops"}',
        {"Content-Type": "application/json", **bearer},
    )
    assert status == 200
    [audited] = await gw.audit_events("grant")
    assert audited["auth"] == "token" and audited["by"] == "ops"
    assert TOKEN not in str(audited)


async def test_a_grant_for_an_ended_session_is_a_conflict(make_gateway: MakeGateway) -> None:
    """Ended is final: a grant that would change nothing is refused, naming the status."""
    gw = await make_gateway(None)
    await with_session(gw, "over")
    json_body = {"Content-Type": "application/json"}
    status, _ = await raw_post(
        gw, "/gateway/sessions/over/end", b'{"by": "bob", "reason": "done"}', json_body
    )
    assert status == 200
    status, error = await raw_post(
        gw, "/gateway/sessions/over/grant", b'{"turns": 5, "by": "alice"}', json_body
    )
    assert status == 409
    assert error == {
        "error": "session over is ended (ended by bob: done): a grant cannot re-open it; "
        "the agent's next call needs a new session",
        "session": "over",
        "status": "ended",
        "status_reason": "ended by bob: done",
    }
    shown = await gw.session("over")
    assert shown["granted_turns"] == 0 and shown["grants"] == []
    assert await gw.audit_events("grant") == []


async def test_sessions_are_shown_without_the_gateways_own_state(
    make_gateway: MakeGateway,
) -> None:
    """Operators read counts, limits and events; the loop detectors' state and compaction
    recipes stay in the store, which keeps them across restarts."""
    gw = await make_gateway(None)
    for _ in range(2):
        await with_session(gw, "view")
    await gw.grant("view", turns=3)
    detail = await gw.session("view")
    [listed] = (await gw.admin_get("/gateway/sessions"))["sessions"]
    for shown in (detail, listed):
        assert not INTERNAL_FIELDS & shown.keys(), sorted(INTERNAL_FIELDS & shown.keys())
        assert shown["turns"] == 2 and shown["granted_turns"] == 3
        assert {"tokens", "models", "status", "grants", "in_flight", "idle_seconds"} <= set(shown)
    record = await gw.record("view")
    stored = record.to_json()
    assert stored.keys() >= INTERNAL_FIELDS and stored["loops_allowed_until"] == 5


@pytest.mark.parametrize("query", ["status=bogus", "status=ACTIVE", "limit=many", "since=x"])
async def test_a_bad_list_query_is_a_400_naming_it(make_gateway: MakeGateway, query: str) -> None:
    gw = await make_gateway(None)
    async with aiohttp.ClientSession() as http, http.get(gw.url(f"/gateway/sessions?{query}")) as r:
        assert r.status == 400
        assert (await r.json())["error"].startswith("bad query")


async def test_metrics_auth_needs_the_bearer_token(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(None, admin_token=SecretStr(TOKEN), metrics_auth=True)
    async with aiohttp.ClientSession() as http:
        for auth in ({}, {"Authorization": TOKEN}, {"Authorization": "Bearer nope"}):
            async with http.get(gw.url("/metrics"), headers=auth) as resp:
                assert resp.status == 401, auth
                assert resp.headers["WWW-Authenticate"] == "Bearer"
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        async with http.get(gw.url("/metrics"), headers=bearer) as resp:
            assert resp.status == 200 and "gateway_policy_info" in await resp.text()


async def test_metrics_stay_open_without_metrics_auth(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(None, admin_token=SecretStr(TOKEN))
    async with aiohttp.ClientSession() as http, http.get(gw.url("/metrics")) as resp:
        assert resp.status == 200


@pytest.mark.parametrize(
    ("updates", "refused"),
    [
        ({"host": "0.0.0.0"}, "GATEWAY_ADMIN_TOKEN"),
        ({"host": "::"}, "GATEWAY_ADMIN_TOKEN"),
        ({"host": "192.168.1.10"}, "admin_token in the config file"),
        ({"host": "gateway.lan"}, "GATEWAY_ADMIN_TOKEN"),
        ({"host": "0.0.0.0", "admin_token": SecretStr("t")}, None),
        ({"host": "127.0.0.1"}, None),
        ({"host": "127.0.0.2"}, None),
        ({"host": "::1"}, None),
        ({"host": "localhost"}, None),
        ({"metrics_auth": True}, "metrics_auth needs an admin token"),
        ({"metrics_auth": True, "admin_token": SecretStr("t")}, None),
    ],
)
def test_serving_without_a_token_only_on_loopback(
    updates: dict[str, Any], refused: str | None
) -> None:
    problem = serving_problem(Settings(**updates))
    if refused is None:
        assert problem is None
    else:
        assert problem is not None and refused in problem


def test_serve_refuses_a_public_address_without_a_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GATEWAY_ADMIN_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--store", "memory://"]) == 2
    err = capsys.readouterr().err
    assert "refusing to serve on 0.0.0.0" in err and "GATEWAY_ADMIN_TOKEN" in err
