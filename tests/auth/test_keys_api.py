"""The admin API's key routes and the ``gateway keys`` commands: strict bodies, a team-bound
caller's view, audit before change, the key shown once and never a digest.

The handlers are tested twice: on a small app whose stand-in guard names the caller (team-bound
roles, as an OIDC token would make them), and on a whole gateway behind its own guard.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.appkeys import AUDIT, KEYRING
from gateway.audit import AuditLog
from gateway.auth.config import AuthSettings
from gateway.auth.keyring import KeyRing, Refusal, Verified
from gateway.auth.keys import KEY_LENGTH, parse
from gateway.auth.keys_api import MAX_BODY, ROUTES
from gateway.auth.planes import ADMIN_CALLER
from gateway.auth.principal import AdminCaller
from gateway.cli import main
from gateway.secret import Secret
from gateway.store import MemoryStore
from tests.harness import ADMIN, ADMIN_TOKEN, Gateway, MakeGateway, read_audit

PEPPER = Secret("keys-api-test-pepper-" + "a" * 30)
CALLER = "X-Test-Caller"
SEARCH_ADMIN = {CALLER: json.dumps({"roles": ["key-admin"], "teams": ["search"]})}
FULL_ADMIN = {CALLER: json.dumps({"roles": ["admin"]})}
VIEWER = {CALLER: json.dumps({"roles": ["auditor"]})}


def _stand_in_guard(handler: Any, scope: str) -> Any:
    """The admin guard's part these handlers rely on: ``request[ADMIN_CALLER]`` set, the
    route's scope held (the caller named by a header, as only a test may)."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        named = json.loads(request.headers[CALLER])
        teams = named.get("teams")
        caller = AdminCaller(
            actor="oidc:tester",
            method="oidc",
            roles=frozenset(named["roles"]),
            teams=None if teams is None else frozenset(teams),
        )
        if not caller.may(scope):
            return web.json_response({"error": "forbidden"}, status=403)
        request[ADMIN_CALLER] = caller
        response: web.StreamResponse = await handler(request)
        return response

    return guarded


@pytest.fixture
async def keys_app(
    aiohttp_client: Any, tmp_path: Path
) -> AsyncIterator[tuple[TestClient[Any, Any], KeyRing, AuditLog]]:
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.start()
    app = web.Application()
    ring = KeyRing(MemoryStore(), PEPPER, AuthSettings())
    app[KEYRING], app[AUDIT] = ring, audit
    for method, path, handler, scope in ROUTES:
        app.router.add_route(method, f"/gateway{path}", _stand_in_guard(handler, scope))
    client = await aiohttp_client(app)
    yield client, ring, audit
    await asyncio.to_thread(audit.stop)


async def _create(
    client: TestClient[Any, Any], headers: dict[str, str] = FULL_ADMIN, **spec: Any
) -> tuple[int, dict[str, Any], Any]:
    body = {"team": "search", "name": "ci", **spec}
    async with client.post("/gateway/keys", json=body, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.json()


def _no_digest(answer: Any, ring: KeyRing) -> None:
    text = json.dumps(answer)
    assert '"digest"' not in text and "previous_digest" not in text


async def test_create_shows_the_key_once_and_never_its_digest(
    keys_app: tuple[TestClient[Any, Any], KeyRing, AuditLog],
) -> None:
    client, ring, _ = keys_app
    status, headers, answer = await _create(client, models=["claude-*"], expires="30d")
    assert status == 201 and headers["Cache-Control"] == "no-store"
    key = answer["key"]
    assert len(key) == KEY_LENGTH and parse(key) is not None and answer["id"] == key[3:15]
    assert answer["status"] == "active" and answer["models"] == ["claude-*"]
    assert isinstance(await ring.verify(key), Verified)
    record = await ring.get(answer["id"])
    assert record is not None and record.digest not in json.dumps(answer)
    async with client.get(f"/gateway/keys/{answer['id']}", headers=FULL_ADMIN) as resp:
        shown = await resp.json()
    assert resp.status == 200 and "key" not in shown and key not in json.dumps(shown)
    _no_digest(shown, ring)
    async with client.get("/gateway/keys", headers=FULL_ADMIN) as resp:
        listed = await resp.json()
    assert [k["id"] for k in listed["keys"]] == [answer["id"]]
    assert key[16:59] not in json.dumps(listed) and record.digest not in json.dumps(listed)


@pytest.mark.parametrize(
    ("raw", "status", "says"),
    [
        (b'{"team": "search", "name": "ci", "admin": true}', 400, "unknown field(s) admin"),
        (b'{"team": "search", "name": "ci", "owner": 1, "role": 2}', 400, "owner, role"),
        (b'{"team": "search", "team": "billing", "name": "ci"}', 400, "no duplicate fields"),
        (b'{"team": "search", "name": "ci", "expires": NaN}', 400, "no NaN"),
        (b"{not json", 400, "must be JSON"),
        (b"\xff\xfe", 400, "must be JSON"),
        (b"[1, 2]", 400, "a JSON object"),
        (b"[" * 100_000, 413, "larger than"),
        (b'{"team": "search", "name": "ci", "pad": "' + b"x" * MAX_BODY + b'"}', 413, "larger"),
        (b'{"name": "ci"}', 400, "team: Field required"),
        (b'{"team": "search", "name": "ci", "scopes": ["keys:write"]}', 400, "unknown scope"),
        (b'{"team": "search", "name": "ci", "expires": "100y"}', 400, "not a duration"),
        (b'{"team": "\\u0000\\u001b[2J", "name": "ci"}', 400, "team: String should match"),
    ],
)
async def test_bad_bodies_are_refused_clearly(
    keys_app: tuple[TestClient[Any, Any], KeyRing, AuditLog], raw: bytes, status: int, says: str
) -> None:
    client, ring, _ = keys_app
    headers = {**FULL_ADMIN, "Content-Type": "application/json"}
    async with client.post("/gateway/keys", data=raw, headers=headers) as resp:
        answer = await resp.json()
    assert resp.status == status and says in answer["error"], answer
    assert "\x1b" not in answer["error"] and len(answer["error"]) < 600
    assert await ring.list() == []


async def test_unknown_fields_are_refused_on_every_write(
    keys_app: tuple[TestClient[Any, Any], KeyRing, AuditLog],
) -> None:
    client, ring, _ = keys_app
    _, _, made = await _create(client)
    for action, body in (("rotate", {"grace": 0, "keep": True}), ("revoke", {"now": 1})):
        url = f"/gateway/keys/{made['id']}/{action}"
        async with client.post(url, json=body, headers=FULL_ADMIN) as resp:
            assert resp.status == 400, await resp.text()
    assert isinstance(await ring.verify(made["key"]), Verified), "nothing changed"


async def test_a_team_bound_caller_sees_and_changes_only_its_teams_keys(
    keys_app: tuple[TestClient[Any, Any], KeyRing, AuditLog],
) -> None:
    client, ring, _ = keys_app
    _, _, billing = await _create(client, team="billing")
    status, _, refused = await _create(client, SEARCH_ADMIN, team="billing")
    assert status == 403 and "own teams (search)" in refused["error"]
    status, _, search = await _create(client, SEARCH_ADMIN)
    assert status == 201

    errors = []
    for method, path in (("GET", ""), ("POST", "/rotate"), ("POST", "/revoke")):
        async with client.request(
            method, f"/gateway/keys/{billing['id']}{path}", json={}, headers=SEARCH_ADMIN
        ) as resp:
            assert resp.status == 404, (method, path, await resp.text())
            errors.append((await resp.json())["error"].replace(billing["id"], "NoSuchKey123"))
    async with client.get("/gateway/keys/NoSuchKey123", headers=SEARCH_ADMIN) as resp:
        assert resp.status == 404
        absent = (await resp.json())["error"]
    assert errors == [absent] * 3, "another team's key reads exactly as an absent one"

    async with client.get("/gateway/keys", headers=SEARCH_ADMIN) as resp:
        assert [k["id"] for k in (await resp.json())["keys"]] == [search["id"]]
    async with client.get("/gateway/keys?team=billing", headers=SEARCH_ADMIN) as resp:
        assert (await resp.json())["keys"] == []
    async with client.get("/gateway/keys?team=billing", headers=FULL_ADMIN) as resp:
        assert [k["id"] for k in (await resp.json())["keys"]] == [billing["id"]]
    assert isinstance(await ring.verify(billing["key"]), Verified)


async def test_rotate_and_revoke_through_the_api(
    keys_app: tuple[TestClient[Any, Any], KeyRing, AuditLog],
) -> None:
    client, ring, _ = keys_app
    _, _, made = await _create(client)
    url = f"/gateway/keys/{made['id']}"
    async with client.post(f"{url}/rotate", json={"grace": "1h"}, headers=FULL_ADMIN) as resp:
        rotated = await resp.json()
        assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
    assert rotated["id"] == made["id"] and rotated["key"] != made["key"]
    assert rotated["previous_until"] == pytest.approx(rotated["rotated_at"] + 3600)
    old = await ring.verify(made["key"])
    assert isinstance(old, Verified) and old.deprecated_until == rotated["previous_until"]
    async with client.post(f"{url}/revoke", json={"now": True}, headers=FULL_ADMIN) as resp:
        revoked = await resp.json()
    assert resp.status == 200 and revoked["status"] == "revoked" and "key" not in revoked
    assert await ring.verify(rotated["key"]) == Refusal("revoked", made["id"])
    async with client.post(f"{url}/rotate", json={}, headers=FULL_ADMIN) as resp:
        assert resp.status == 409 and "revoked" in (await resp.json())["error"]


async def test_every_change_is_audited_without_a_secret(
    keys_app: tuple[TestClient[Any, Any], KeyRing, AuditLog], tmp_path: Path
) -> None:
    client, ring, _ = keys_app
    _, _, made = await _create(client)
    url = f"/gateway/keys/{made['id']}"
    async with client.post(f"{url}/rotate", json={"grace": 0}, headers=FULL_ADMIN) as resp:
        rotated = await resp.json()
    async with client.post(f"{url}/revoke", json={}, headers=FULL_ADMIN) as resp:
        assert resp.status == 200
    record = await ring.get(made["id"])
    assert record is not None
    lines = await asyncio.to_thread(read_audit, tmp_path / "audit.jsonl")
    assert [line["event"] for line in lines] == ["key_create", "key_rotate", "key_revoke"]
    for line in lines:
        assert line["key_id"] == made["id"] and line["team"] == "search"
        assert line["actor"] == "oidc:tester" and line["auth"] == "oidc"
    assert lines[1]["grace"] == 0 and lines[2]["now"] is False
    text = (tmp_path / "audit.jsonl").read_text()
    for secret in (made["key"], made["key"][16:59], rotated["key"][16:59], record.digest):
        assert secret not in text


async def test_no_change_is_made_when_its_audit_line_cannot_be_written(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    audit = AuditLog(tmp_path)  # a directory: no line can be appended to it
    audit.start()
    try:
        app = web.Application()
        ring = KeyRing(MemoryStore(), PEPPER, AuthSettings())
        app[KEYRING], app[AUDIT] = ring, audit
        for method, path, handler, scope in ROUTES:
            app.router.add_route(method, f"/gateway{path}", _stand_in_guard(handler, scope))
        client = await aiohttp_client(app)
        status, _, answer = await _create(client)
        assert status == 503 and "the change was not made" in answer["error"]
        assert "key" not in answer and await ring.list() == []
    finally:
        await asyncio.to_thread(audit.stop)


async def test_a_read_only_role_cannot_write(
    keys_app: tuple[TestClient[Any, Any], KeyRing, AuditLog],
) -> None:
    client, ring, _ = keys_app
    status, _, _ = await _create(client, VIEWER)
    assert status == 403 and await ring.list() == []
    async with client.get("/gateway/keys", headers=VIEWER) as resp:
        assert resp.status == 200


async def test_a_gateway_without_keys_says_how_to_use_them(aiohttp_client: Any) -> None:
    app = web.Application()
    app[AUDIT] = AuditLog(None)
    for method, path, handler, scope in ROUTES:
        app.router.add_route(method, f"/gateway{path}", _stand_in_guard(handler, scope))
    client = await aiohttp_client(app)
    status, _, answer = await _create(client)
    assert status == 409 and "auth.mode" in answer["error"]


# -- a whole gateway, its own guard, and the CLI -----------------------------------------------
def _keys_mode(fake: TestServer, tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "pool-openai").write_text("sk-pool-openai-for-keys-api\n")
    (tmp_path / "pool-anthropic").write_text("sk-ant-pool-for-keys-api\n")

    def pool(name: str) -> dict[str, Any]:
        return {"platform": [{"name": "primary", "value": f"file:{tmp_path / name}"}]}

    return {
        "auth": {"mode": "keys"},
        "upstreams": {
            "openai": {"url": str(fake.make_url("/v1")), "credentials": pool("pool-openai")},
            "anthropic": {
                "url": str(fake.make_url("")).rstrip("/"),
                "credentials": pool("pool-anthropic"),
            },
        },
    }


@pytest.fixture
async def keys_gateway(
    make_gateway: MakeGateway, fake_provider: TestServer, tmp_path: Path
) -> Gateway:
    return await make_gateway(None, **_keys_mode(fake_provider, tmp_path))


async def _cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def test_the_gateway_serves_the_key_routes_behind_its_guard(keys_gateway: Gateway) -> None:
    gw = keys_gateway
    body = {"team": "platform", "name": "ci"}
    status, headers, made = await gw.post("/gateway/keys", body, ADMIN)
    assert status == 201, made
    assert headers["Cache-Control"] == "no-store"
    status, _, refused = await gw.post("/gateway/keys", body, {})
    assert status == 401, refused
    status, _, refused = await gw.post(
        "/gateway/keys", body, {"Authorization": f"Bearer {made['key']}"}
    )
    assert status == 401, "a gateway key is no admin credential"
    status, _, refused = await gw.post("/gateway/keys", {**body, "is_admin": True}, ADMIN)
    assert status == 400 and "is_admin" in refused["error"]
    assert isinstance(await gw.server.app[KEYRING].verify(made["key"]), Verified)
    events = await gw.audit_events("key_create")
    assert events and events[0]["key_id"] == made["id"]


async def test_the_key_commands_against_a_gateway(
    keys_gateway: Gateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = keys_gateway
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    url = gw.url("").rstrip("/")
    argv = ("create", "--team", "platform", "--name", "nightly", "--models", "gpt-4o*,o3")
    assert await _cli("keys", "--url", url, *argv, "--expires", "30d") == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert parse(key) is not None and "will not show it again" in err and key not in err
    key_id = key[3:15]

    client = openai.AsyncOpenAI(base_url=gw.url("/v1"), api_key=key, max_retries=0)
    try:
        answer = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.choices
    finally:
        await client.close()

    assert await _cli("keys", "list", "--url", url) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["ID", "NAME", "TEAM", "STATUS"]
    assert table[1].split()[:4] == [key_id, "nightly", "platform", "active"]
    assert await _cli("keys", "show", key_id, "--url", url) == 0
    shown = capsys.readouterr().out
    assert "gpt-4o*, o3" in shown and key[16:59] not in shown

    assert await _cli("keys", "rotate", key_id, "--grace", "1h", "--url", url) == 0
    out, err = capsys.readouterr()
    assert parse(out.strip()) is not None and out.strip() != key and "works until" in err
    assert await _cli("keys", "revoke", key_id, "--now", "--url", url) == 0
    assert capsys.readouterr().out.startswith(f"key {key_id} revoked at ")
    assert await gw.server.app[KEYRING].verify(key) == Refusal("revoked", key_id)
    with pytest.raises(SystemExit) as refused:
        await _cli("keys", "show", "ZZZZZZZZZZZZ", "--url", url)
    assert "(the gateway answered 404)" in str(refused.value.code)
