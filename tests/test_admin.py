"""The admin plane: what a web page, a caller without the token, a wrong token and a foreign
``Host`` can and cannot do, and what ``gateway serve`` refuses to start with."""

from __future__ import annotations

import hmac
import stat
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from gateway.admin import ADMIN_ROUTES, serving_problem
from gateway.audit import token_actor
from gateway.auth import admin_auth
from gateway.auth.admin_auth import AdminAuth, Refused
from gateway.cli import main
from gateway.secret import Secret
from gateway.settings import Settings
from gateway.state import ADMIN_TOKEN_FILE
from gateway.store import INTERNAL_FIELDS
from tests.harness import ADMIN, ADMIN_TOKEN, Gateway, MakeGateway, session_headers
from tests.policy.apis import call

TOKEN = "op-Vb8Kq3Rw6Tz1Yx4Nm7Pd2Lc9Hf5Gs0Ja"
"""An operator's own admin token (strong enough for ``serving_problem``)."""
JSON = {"Content-Type": "application/json"}
KEYS_MODE: dict[str, Any] = {
    "auth": {"mode": "keys"},
    "upstreams": {
        "openai": {
            "url": "https://api.openai.com/v1",
            "credentials": {"main": [{"name": "a", "value": "env:OPENAI_API_KEY"}]},
        }
    },
}
"""Gateway keys, with the provider credential the gateway sends (by reference)."""


async def raw_post(
    gw: Gateway, path: str, data: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(gw.url(path), data=data, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def raw_get(gw: Gateway, path: str, headers: dict[str, str]) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(gw.url(path), headers=headers) as resp:
        return resp.status, await resp.text()


async def with_session(gw: Gateway, session: str) -> None:
    assert (await call(gw, "chat", session_headers(session))).ok


async def test_a_cross_site_write_is_refused_even_with_the_token(
    make_gateway: MakeGateway,
) -> None:
    """What a page on http://evil.example can send to localhost without a CORS preflight:
    refused for its origin or its body's type, before any credential is looked at."""
    gw = await make_gateway(None)
    await with_session(gw, "victim")
    grant = "/gateway/sessions/victim/grant"
    body = b'{"turns": 50, "by": "mallory"}'

    status, error = await raw_post(
        gw, grant, body, {**ADMIN, "Content-Type": "text/plain", "Origin": "http://evil.example"}
    )
    assert status == 403 and "origin" in error["error"]
    status, error = await raw_post(gw, grant, body, {**ADMIN, "Content-Type": "text/plain"})
    assert status == 415 and "application/json" in error["error"]
    for form in ("application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, _ = await raw_post(gw, grant, body, {**ADMIN, "Content-Type": form})
        assert status == 415, form
    status, _ = await raw_post(gw, grant, body, {**ADMIN, **JSON, "Origin": "null"})
    assert status == 403
    assert (await gw.session("victim"))["granted_turns"] == 0
    assert await gw.audit_events("grant") == []


async def test_a_json_write_with_the_token_is_admitted_and_audited_with_peer_and_how(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(None)
    await with_session(gw, "mine")
    own = f"http://{gw.server.host}:{gw.server.port}"
    status, shown = await raw_post(
        gw,
        "/gateway/sessions/mine/grant",
        b'{"turns": 2, "by": "alice"}',
        {**ADMIN, **JSON, "Origin": own},
    )
    assert status == 200 and shown["granted_turns"] == 2
    [audited] = await gw.audit_events("grant")
    assert audited["by"] == "alice" and audited["auth"] == "token"
    assert audited["actor"] == token_actor(ADMIN_TOKEN) and audited["peer"] == "127.0.0.1"
    assert ADMIN_TOKEN not in str(audited)
    status, _ = await raw_post(gw, "/gateway/sessions/mine/end", b"{}", {**ADMIN, **JSON})
    assert status == 200
    [ended] = await gw.audit_events("session_end")
    assert ended["auth"] == "token" and ended["peer"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("method", "path"),
    [(method, f"/gateway{path.replace('{session_id}', 's')}") for method, path, *_ in ADMIN_ROUTES],
)
async def test_without_a_credential_even_loopback_is_refused(
    make_gateway: MakeGateway, method: str, path: str
) -> None:
    """No "a local caller may": every admin route, read or write, from 127.0.0.1 and with a
    forwarded-for claim, answers 401 without the token, and nothing changes."""
    gw = await make_gateway(None)
    await with_session(gw, "s")
    headers = {**JSON, "X-Forwarded-For": "127.0.0.1"}
    body = b'{"turns": 1, "on": true, "reason": "x"}' if method == "POST" else None
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, gw.url(path), data=body, headers=headers) as resp,
    ):
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == "Bearer"
        error = (await resp.json())["error"]
    assert error.startswith("gateway: ") and "Authorization: Bearer" in error
    shown = await gw.session("s")
    assert shown["granted_turns"] == 0 and shown["status"] != "ended"
    assert (await gw.admin_get("/gateway/health"))["status"] == "ok"
    [denied] = await gw.audit_events("admin_denied")
    assert denied["actor"] == "unauthenticated" and denied["reason"] == "missing"
    assert denied["path"] == path and denied["peer"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, 401),
        ({"Authorization": ADMIN_TOKEN}, 401),
        ({"Authorization": f"Basic {ADMIN_TOKEN}"}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": f"Bearer {ADMIN_TOKEN}x"}, 401),
        ({"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"}, 401),
        ({"Authorization": "Bearer "}, 401),
        ({"Authorization": f"Bearer {'A' * 10_000}"}, 401),
        ({"Authorization": "Bearer gw_live_abcdefghijklmnopqrstuvwxyz012345"}, 401),
        ({"x-api-key": ADMIN_TOKEN}, 401),
        ({"Authorization": f"Bearer {ADMIN_TOKEN}"}, 200),
        ({"Authorization": f"bearer {ADMIN_TOKEN}"}, 200),
    ],
    ids=[
        "none",
        "raw",
        "basic",
        "wrong",
        "longer",
        "shorter",
        "empty",
        "huge",
        "gateway-key",
        "x-api-key",
        "bearer",
        "scheme-case",
    ],
)
async def test_only_the_bearer_token_admits(
    make_gateway: MakeGateway, headers: dict[str, str], expected: int
) -> None:
    gw = await make_gateway(None)
    await with_session(gw, "t")
    status, text = await raw_get(gw, "/gateway/sessions/t", headers)
    assert status == expected, text
    if expected == 401:
        assert ADMIN_TOKEN not in text and "A" * 100 not in text


async def test_the_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every check of a presented token goes through ``hmac.compare_digest``: how long a
    wrong guess takes says nothing of how much of it was right."""
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(admin_auth.hmac, "compare_digest", spy)
    auth = AdminAuth(token=Secret(TOKEN))
    for given, admitted in ((TOKEN[:-1] + "x", False), (TOKEN[:5], False), (TOKEN, True)):
        who = await auth.identify(CIMultiDict({"Authorization": f"Bearer {given}"}))
        assert isinstance(who, Refused) is not admitted
        assert compared[-1] == (given.encode(), TOKEN.encode())
    assert len(compared) == 3


async def test_the_host_is_checked_before_the_credential(make_gateway: MakeGateway) -> None:
    """DNS rebinding: a page's own name resolved to 127.0.0.1 sends that name as ``Host``.
    The admin plane refuses it, token or not; the probes answer any ``Host``."""
    gw = await make_gateway(None)
    port = gw.server.port
    refused = ("evil.example", "localhost.evil.example", "127.0.0.1.evil.example", "127.0.0.evil")
    for host in (*refused, *(f"{name}:{port}" for name in refused), f"localhost:{port}x", ""):
        status, text = await raw_get(gw, "/gateway/sessions", {**ADMIN, "Host": host})
        assert status == 400 and "is not one this gateway serves" in text, host
        status, _ = await raw_get(gw, "/gateway/health", {"Host": host})
        assert status == 200
    status, _ = await raw_post(
        gw, "/gateway/degrade", b'{"on": true, "reason": "x"}',
        {**ADMIN, **JSON, "Host": f"evil.example:{port}"},
    )  # fmt: skip
    assert status == 400
    assert (await gw.admin_get("/gateway/health"))["status"] == "ok"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"127.0.0.2:{port}", f"[::1]:{port}"):
        status, text = await raw_get(gw, "/gateway/sessions", {**ADMIN, "Host": host})
        assert status == 200, (host, text)


async def test_a_configured_token_guards_reads_and_writes_but_not_health(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(None, admin_token=TOKEN)
    await with_session(gw, "t")
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    status, _ = await raw_get(gw, "/gateway/health", {})
    assert status == 200
    for auth in ({}, {"Authorization": TOKEN}, ADMIN):  # ADMIN: another token now
        status, text = await raw_get(gw, "/gateway/sessions/t", auth)
        assert status == 401, auth
        assert TOKEN not in text
    status, _ = await raw_get(gw, "/gateway/sessions/t", bearer)
    assert status == 200
    status, _ = await raw_post(
        gw, "/gateway/sessions/t/grant", b'{"turns": 1}', {**JSON, "Authorization": TOKEN}
    )
    assert status == 401
    status, _ = await raw_post(
        gw, "/gateway/sessions/t/grant", b'{"turns": 1, "by": "ops"}', {**JSON, **bearer}
    )
    assert status == 200
    [audited] = await gw.audit_events("grant")
    assert audited["auth"] == "token" and audited["by"] == "ops"
    assert audited["actor"] == token_actor(TOKEN)
    assert TOKEN not in str(audited)


async def test_without_a_configured_token_one_is_generated_into_the_state_dir(
    make_gateway: MakeGateway, settings: Settings
) -> None:
    """Private (0600), long, and the only credential the admin plane then takes; a restart
    reads the same one again."""
    gw = await make_gateway(None, admin_token=None)
    assert settings.state_dir is not None
    path = settings.state_dir / ADMIN_TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    generated = path.read_text().strip()
    assert len(generated) >= 32 and admin_auth.weak_token(generated) is None
    status, _ = await raw_get(gw, "/gateway/sessions", ADMIN)
    assert status == 401
    status, _ = await raw_get(gw, "/gateway/sessions", {"Authorization": f"Bearer {generated}"})
    assert status == 200
    again = await make_gateway(None, admin_token=None)
    assert path.read_text().strip() == generated
    status, _ = await raw_get(again, "/gateway/sessions", {"Authorization": f"Bearer {generated}"})
    assert status == 200


async def test_a_grant_for_an_ended_session_is_a_conflict(make_gateway: MakeGateway) -> None:
    """Ended is final: a grant that would change nothing is refused, naming the status."""
    gw = await make_gateway(None)
    await with_session(gw, "over")
    headers = {**ADMIN, **JSON}
    status, _ = await raw_post(
        gw, "/gateway/sessions/over/end", b'{"by": "bob", "reason": "done"}', headers
    )
    assert status == 200
    status, error = await raw_post(
        gw, "/gateway/sessions/over/grant", b'{"turns": 5, "by": "alice"}', headers
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
    async with (
        aiohttp.ClientSession() as http,
        http.get(gw.url(f"/gateway/sessions?{query}"), headers=ADMIN) as r,
    ):
        assert r.status == 400
        assert (await r.json())["error"].startswith("bad query")


async def test_metrics_auth_needs_the_bearer_token(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(None, admin_token=TOKEN, metrics_auth=True)
    async with aiohttp.ClientSession() as http:
        for auth in ({}, {"Authorization": TOKEN}, {"Authorization": "Bearer nope"}, ADMIN):
            async with http.get(gw.url("/metrics"), headers=auth) as resp:
                assert resp.status == 401, auth
                assert resp.headers["WWW-Authenticate"] == "Bearer"
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        async with http.get(gw.url("/metrics"), headers=bearer) as resp:
            assert resp.status == 200 and "gateway_policy_info" in await resp.text()


async def test_metrics_stay_open_without_metrics_auth(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(None, admin_token=TOKEN)
    async with aiohttp.ClientSession() as http, http.get(gw.url("/metrics")) as resp:
        assert resp.status == 200


async def test_open_metrics_refuse_a_foreign_host_and_other_addresses_need_the_token(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(None, admin_token=TOKEN)
    rebound = {"Host": "rebound.example"}  # a page on a name rebound to 127.0.0.1
    async with aiohttp.ClientSession() as http, http.get(gw.url("/metrics"), headers=rebound) as r:
        assert r.status == 400
    # Listening on another address, /metrics needs the token whatever metrics_auth says.
    wide = await make_gateway(None, admin_token=TOKEN, host="0.0.0.0")
    async with aiohttp.ClientSession() as http:
        async with http.get(wide.url("/metrics")) as resp:
            assert resp.status == 401
        bearer = {"Authorization": f"Bearer {TOKEN}", "Host": "10.0.0.7:8787"}
        async with http.get(wide.url("/metrics"), headers=bearer) as resp:
            assert resp.status == 200  # scraped by the pod's address


async def test_a_flood_of_refused_calls_is_one_audit_line_per_period(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(None)
    async with aiohttp.ClientSession() as http:
        for _ in range(50):
            async with http.get(gw.url("/gateway/sessions")) as resp:
                assert resp.status == 401
    denied = await gw.audit_events("admin_denied")
    assert len(denied) == 1


PASSTHROUGH_REFUSED = "refusing to serve passthrough mode"
WEAK = "refusing to start: the admin token"


@pytest.mark.parametrize(
    ("updates", "refused"),
    [
        # A token is generated when none is configured: no address is refused for that.
        ({"host": "127.0.0.1"}, None),
        ({"host": "127.0.0.2"}, None),
        ({"host": "::1"}, None),
        ({"host": "localhost"}, None),
        ({"metrics_auth": True}, None),
        # Passthrough off loopback: anyone who reaches it spends whatever key they hold.
        ({"host": "0.0.0.0"}, PASSTHROUGH_REFUSED),
        ({"host": "::"}, PASSTHROUGH_REFUSED),
        ({"host": "192.168.1.10"}, PASSTHROUGH_REFUSED),
        ({"host": "gateway.lan"}, PASSTHROUGH_REFUSED),
        ({"host": "0.0.0.0", "admin_token": TOKEN}, PASSTHROUGH_REFUSED),
        ({"host": "0.0.0.0", "allow_network_passthrough": True}, None),
        ({"host": "0.0.0.0", **KEYS_MODE}, None),
        # An operator's token too weak to stand guard, wherever it listens. (Each value is
        # one no other test writes: a Secret made is scrubbed from every sink from then on.)
        ({"admin_token": "t"}, WEAK),
        ({"admin_token": "Wm8Zt3Nc6Hy1Bd5Fg0Js2UeQx2Lr9vK"}, WEAK),  # 31 characters
        ({"admin_token": f"changeme-{TOKEN}"}, WEAK),
        ({"admin_token": "zQ" * 20}, WEAK),  # long, but two characters
        ({"admin_token": Secret(TOKEN)}, None),
        ({"host": "0.0.0.0", **KEYS_MODE, "admin_token": "short"}, WEAK),
    ],
)
def test_what_serve_refuses_to_start_with(updates: dict[str, Any], refused: str | None) -> None:
    problem = serving_problem(Settings(**updates))
    if refused is None:
        assert problem is None
    else:
        assert problem is not None and refused in problem
        token = updates.get("admin_token")
        if isinstance(token, str) and len(token) > 1:
            assert token not in problem


def test_serve_refuses_passthrough_on_a_public_address(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("GATEWAY_ADMIN_TOKEN", "GATEWAY_AUTH_MODE", "GATEWAY_ALLOW_NETWORK_PASSTHROUGH"):
        monkeypatch.delenv(name, raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--store", "memory://"]) == 2
    err = capsys.readouterr().err
    assert "refusing to serve passthrough mode on 0.0.0.0" in err
    assert "--allow-network-passthrough" in err and "gateway keys create" in err


def test_serve_refuses_a_weak_admin_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    weak = "Rw6Tz1Yx4N"  # 10 characters (and one no other test writes: see above)
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", weak)
    assert main(["serve", "--store", "memory://"]) == 2
    err = capsys.readouterr().err
    assert "refusing to start: the admin token is 10 characters" in err
    assert "GATEWAY_ADMIN_TOKEN" in err and weak not in err


async def test_metrics_on_a_public_admin_listener_need_the_token(
    make_gateway: MakeGateway, unused_tcp_port_factory: Any
) -> None:
    from gateway.telemetry.scrape import metrics_endpoint  # noqa: F401 (the route under test)

    gw = await make_gateway(
        None, admin_token=TOKEN, admin_host="0.0.0.0", admin_port=unused_tcp_port_factory()
    )
    # The test server is the main listener: /metrics lives on the admin one, public here.
    async with aiohttp.ClientSession() as http, http.get(gw.url("/metrics")) as resp:
        assert resp.status == 404


def test_ipv6_peers_of_one_64_are_one_peer_for_the_denial_lines() -> None:
    from gateway.admin import _peer_group

    assert _peer_group("2001:db8::1") == _peer_group("2001:db8::ffff:abcd") == "2001:db8::/64"
    assert _peer_group("2001:db8:0:1::1") != _peer_group("2001:db8::1")
    assert _peer_group("192.0.2.7") == "192.0.2.7"
    assert _peer_group(None) is None
