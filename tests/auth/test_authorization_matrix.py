"""The admin plane's authorization matrix, generated from the routes the gateway registers:
every admin route x every caller (the five roles as OIDC tokens, no credential, a gateway key,
a provider key) x every team binding (none, team A, team B), each cell's exact answer.

The world is a keys-mode gateway with real objects of two teams (gateway keys that each made
a call through the OpenAI SDK, so their sessions exist), its fake provider and a loopback
OIDC issuer, on an event loop of its own thread, so that hypothesis can drive examples from
plain functions. Also here: no admin route answers an anonymous caller, the LLM routes refuse
the admin token in both passthrough and keys mode, and no create or rotate body (hypothesis)
ever gives a key more than its creator holds.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.algorithms import RSAAlgorithm

from gateway.app import create_app
from gateway.appkeys import KEYRING
from gateway.auth.config import ROLES, SCOPES
from gateway.auth.keyring import MAX_EXPIRY
from gateway.auth.planes import ROUTE_AUTH, RouteAuth
from gateway.auth.principal import ROLE_SCOPES
from gateway.fake_provider import create_app as create_fake_app
from gateway.openapi import AdminRoute, admin_routes
from gateway.settings import Settings
from tests.conftest import ANTHROPIC_MODEL, GatewayTestServer
from tests.harness import ADMIN, ADMIN_TOKEN, MakeGateway

AUDIENCE = "gateway-admin"
TEAM_A, TEAM_B = "team-a", "team-b"
BINDINGS: dict[str, list[str] | None] = {"unbound": None, TEAM_A: [TEAM_A], TEAM_B: [TEAM_B]}
"""A caller's team binding: its token's ``teams`` claim (none: every team)."""
WRONG_PLANE = ("no credential", "gateway key", "provider key")
CALLERS: tuple[str, ...] = (*ROLES, *WRONG_PLANE)
PROVIDER_KEY = "sk-ant-api03-matrix-provider-key-0001"
POOL_KEYS = {"openai": "sk-pool-openai-matrix-0001", "anthropic": "sk-ant-pool-matrix-0001"}
TEAM_B_POOL, TEAM_B_POOL_KEY = "team-b-pool", "sk-pool-openai-team-b-0002"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def keys_mode(fake: TestServer, tmp: Path, **auth: Any) -> dict[str, Any]:
    """Settings of a keys-mode gateway aimed at ``fake``, its pools read from files in
    ``tmp``: ``platform`` for everyone, and OpenAI's ``team-b-pool`` for team B only."""
    upstreams: dict[str, Any] = {}
    for name, url in (("openai", "/v1"), ("anthropic", "")):
        (tmp / f"pool-{name}").write_text(POOL_KEYS[name] + "\n")
        pools = {"platform": [{"name": "primary", "value": f"file:{tmp}/pool-{name}"}]}
        if name == "openai":
            (tmp / "pool-team-b").write_text(TEAM_B_POOL_KEY + "\n")
            pools[TEAM_B_POOL] = [{"name": "b", "value": f"file:{tmp}/pool-team-b"}]
        upstreams[name] = {"url": str(fake.make_url(url)).rstrip("/"), "credentials": pools}
    team_pools = {TEAM_A: "platform", TEAM_B: TEAM_B_POOL}
    return {"auth": {"mode": "keys", "team_pools": team_pools, **auth}, "upstreams": upstreams}


# -- the world ---------------------------------------------------------------------------------
JWKS = web.AppKey("jwks", dict)


def issuer_app(jwks: dict[str, Any], issuer: list[str]) -> web.Application:
    """A loopback OIDC issuer: discovery and its JWKS."""

    async def discovery(request: web.Request) -> web.Response:
        return web.json_response({"issuer": issuer[0], "jwks_uri": f"{issuer[0]}/jwks"})

    async def keys(request: web.Request) -> web.Response:
        return web.json_response(request.app[JWKS])

    app = web.Application()
    app[JWKS] = jwks
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_get("/jwks", keys)
    return app


@dataclass
class Answer:
    status: int
    body: Any


class World:
    """A keys-mode gateway with objects of two teams, on an event loop of its own thread."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.signing = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.objects: dict[str, str] = {}
        """What the matrix calls by name: sessions and key ids of team A and B."""
        self.keys: dict[str, str] = {}
        """Gateway keys (the secrets) by name."""
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[TestServer] = []
        self.sessions: list[aiohttp.ClientSession] = []
        try:
            self.run(self._start())
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:  # hypothesis shows it with a failing example: no keys
        return f"World({sorted(self.objects)})"

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    async def _start(self) -> None:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
        self.sessions.append(self.http)
        self.fake = TestServer(create_fake_app())
        self.servers.append(self.fake)
        await self.fake.start_server()
        jwk = RSAAlgorithm.to_jwk(self.signing.public_key(), as_dict=True)
        self.issuer_url: list[str] = [""]
        self.idp = TestServer(issuer_app({"keys": [{**jwk, "kid": "k1"}]}, self.issuer_url))
        self.servers.append(self.idp)
        await self.idp.start_server()
        self.issuer_url[0] = str(self.idp.make_url("")).rstrip("/")
        admin_issuer = {
            "issuer": self.issuer_url[0],
            "audience": [AUDIENCE],
            "role_map": {role: role for role in ROLES},
            "roles_claim": "roles",
            "teams_claim": "teams",
        }
        configured = Settings.model_validate(
            {
                "store": "memory://",
                "admin_token": ADMIN_TOKEN,
                # /metrics is open to scrapers unless this is set; set, it is an admin route.
                "metrics_auth": True,
                "state_dir": self.tmp / "state",
                "audit_log": self.tmp / "audit.jsonl",
                **keys_mode(
                    self.fake,
                    self.tmp,
                    admin_issuers=[admin_issuer],
                    egress_allow=["127.0.0.1/32"],
                ),
            }
        )
        self.app = create_app(configured)
        self.gateway = GatewayTestServer(self.app)
        self.servers.append(self.gateway)
        await self.gateway.start_server()
        await self._objects()

    async def _objects(self) -> None:
        """Keys of both teams, each making one call through the SDK: their sessions."""
        for name, team in (("key-a", TEAM_A), ("key-b", TEAM_B), ("rotate-a", TEAM_A),
                           ("revoke-a", TEAM_A)):  # fmt: skip
            made = await self._call("POST", "/gateway/keys", ADMIN, {"team": team, "name": name})
            assert made.status == 201, made.body
            self.keys[name], self.objects[name] = made.body["key"], made.body["id"]
        for key, session in (("key-a", "session-a"), ("key-b", "session-b"), ("key-a", "end-a")):
            client = openai.AsyncOpenAI(
                base_url=str(self.gateway.make_url("/v1")),
                api_key=self.keys[key],
                max_retries=0,
                default_headers={"X-Gateway-Session": session},
            )
            try:
                await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
            finally:
                await client.close()
        listed = await self._call("GET", "/gateway/sessions", ADMIN)
        assert listed.status == 200, listed.body
        by_team = {(s["team"], s["id"]) for s in listed.body["sessions"]}
        for name, team in (("session-a", TEAM_A), ("session-b", TEAM_B), ("end-a", TEAM_A)):
            [found] = [sid for t, sid in by_team if t == team and sid.endswith(name)]
            self.objects[name] = found

    async def _call(
        self, method: str, path: str, headers: dict[str, str], body: Any = None, raw: bytes = b""
    ) -> Answer:
        data = json.dumps(body).encode() if body is not None else raw
        sent = {"Content-Type": "application/json", **headers}
        url = self.gateway.make_url(path)
        async with self.http.request(method, url, data=data, headers=sent) as response:
            text = await response.read()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text.decode(errors="replace")
        return Answer(response.status, parsed)

    def call(
        self, method: str, path: str, headers: dict[str, str], body: Any = None, raw: bytes = b""
    ) -> Answer:
        answer: Answer = self.run(
            asyncio.wait_for(self._call(method, path, headers, body, raw), 20)
        )
        return answer

    def token(self, role: str, teams: list[str] | None, **claims: Any) -> str:
        """An admin OIDC token of the loopback issuer for ``role``, bound to ``teams``."""
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self.issuer_url[0],
            "aud": AUDIENCE,
            "sub": f"{role}@{'+'.join(teams or ['all'])}",
            "iat": now,
            "exp": now + 3600,
            "roles": [role],
            **claims,
        }
        if teams is not None:
            payload["teams"] = teams
        return jwt.encode(payload, self.signing, algorithm="RS256", headers={"kid": "k1"})

    def credential(self, caller: str, binding: str) -> dict[str, str]:
        """The headers ``caller`` sends, bound as ``binding`` says."""
        if caller == "no credential":
            return {}
        if caller == "gateway key":
            key = self.keys["key-b" if binding == TEAM_B else "key-a"]
            return {"Authorization": f"Bearer {key}"}
        if caller == "provider key":  # as Claude Code sends it
            return {"x-api-key": PROVIDER_KEY}
        return {"Authorization": f"Bearer {self.token(caller, BINDINGS[binding])}"}

    def close(self) -> None:
        async def stop() -> None:
            for session in self.sessions:
                await session.close()
            for server in reversed(self.servers):
                await server.close()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    running = World(tmp_path_factory.mktemp("matrix"))
    yield running
    running.close()


# -- the matrix --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """How the matrix calls a route: its path's objects (team A's), its body, and what an
    allowed caller gets."""

    objects: dict[str, str] = field(default_factory=dict)
    """Path parameter -> the name of team A's object in ``World.objects``."""
    body: dict[str, Any] | None = None
    ok: int = 200
    lists: str | None = None
    """The answer's list of team-owned objects (``sessions``, ``keys``): checked per team."""
    foreign: int = 404
    """What a caller bound to team B gets for team A's object."""


CALLS: dict[tuple[str, str], Call] = {
    ("GET", "/gateway/degrade"): Call(),
    ("POST", "/gateway/degrade"): Call(body={"on": False}),
    ("GET", "/gateway/sessions"): Call(lists="sessions"),
    ("GET", "/gateway/sessions/{session_id}"): Call({"session_id": "session-a"}),
    ("POST", "/gateway/sessions/{session_id}/grant"): Call(
        {"session_id": "session-a"}, body={"turns": 1, "reason": "matrix"}
    ),
    ("POST", "/gateway/sessions/{session_id}/end"): Call(
        {"session_id": "end-a"}, body={"reason": "matrix"}
    ),
    ("GET", "/gateway/policy"): Call(),
    ("GET", "/gateway/budgets"): Call(),
    ("GET", "/gateway/calibration"): Call(),
    ("GET", "/gateway/openapi.json"): Call(),
    ("POST", "/gateway/keys"): Call(body={"team": TEAM_A, "name": "matrix"}, ok=201, foreign=403),
    ("GET", "/gateway/keys"): Call(lists="keys"),
    ("GET", "/gateway/keys/{key_id}"): Call({"key_id": "key-a"}),
    ("POST", "/gateway/keys/{key_id}/rotate"): Call({"key_id": "rotate-a"}, body={"grace": "1h"}),
    ("POST", "/gateway/keys/{key_id}/revoke"): Call({"key_id": "revoke-a"}, body={}),
    ("GET", "/gateway/credentials"): Call(),
    ("POST", "/gateway/credentials/reload"): Call(body={"reason": "matrix"}),
    ("GET", "/metrics"): Call(),
}
"""How to call each admin route. Which routes there are comes from the app: a route missing
here fails ``test_every_admin_route_is_in_the_matrix``."""
OWNED = {"sessions": ("session-a", "session-b"), "keys": ("key-a", "key-b")}


def expected(route: AdminRoute, caller: str, binding: str) -> int:
    if caller in WRONG_PLANE:
        return 401
    if route.scope not in ROLE_SCOPES[caller]:  # type: ignore[index]
        return 403
    call = CALLS[(route.method, route.path)]
    if binding == TEAM_B and (call.objects or (call.body and call.body.get("team") == TEAM_A)):
        return call.foreign
    return call.ok


def plane_routes(world: World) -> list[AdminRoute]:
    return [route for route in admin_routes(world.app) if route.plane == "admin"]


def test_every_admin_route_is_in_the_matrix(world: World) -> None:
    routes = plane_routes(world)
    assert {(r.method, r.path) for r in routes} == set(CALLS)
    # The walk finds what aiohttp serves: every declared route of the app and its sub-apps.
    declared: list[RouteAuth] = []
    stack = [world.app]
    while stack:
        app = stack.pop()
        declared.extend(app.get(ROUTE_AUTH, {}).values())
        stack.extend(r._app for r in app.router.resources() if hasattr(r, "_app"))
    assert len(routes) == sum(1 for auth in declared if auth.plane == "admin")


def test_the_authorization_matrix(world: World) -> None:
    routes = plane_routes(world)
    wrong: list[str] = []
    cells = 0
    for route in routes:
        call = CALLS[(route.method, route.path)]
        path = route.path
        for parameter, name in call.objects.items():
            path = path.replace(f"{{{parameter}}}", world.objects[name])
        for caller in CALLERS:
            for binding in BINDINGS:
                cells += 1
                want = expected(route, caller, binding)
                answer = world.call(route.method, path, world.credential(caller, binding),
                                    call.body if call.body is not None else {})  # fmt: skip
                where = f"{route.method} {route.path} as {caller} ({binding})"
                if answer.status != want:
                    wrong.append(
                        f"{where}: {answer.status}, expected {want}: {str(answer.body)[:160]}"
                    )
                    continue
                if want == 401 and caller != "no credential":
                    assert "never the admin API" in answer.body["error"], where
                if call.lists is not None and want == 200:
                    wrong.extend(_listing(answer.body[call.lists], world, binding, where))
    print(f"authorization matrix: {cells} cells ({len(routes)} admin routes x {len(CALLERS)}"
          f" callers x {len(BINDINGS)} team bindings), {len(wrong)} wrong")  # fmt: skip
    assert cells == len(routes) * len(CALLERS) * len(BINDINGS)
    assert not wrong, "\n".join(wrong)


def _listing(listed: list[dict[str, Any]], world: World, binding: str, where: str) -> list[str]:
    """Team A's object is listed for an unbound or team A caller only; B's likewise."""
    ids = {item["id"] for item in listed}
    teams = {item["team"] for item in listed}
    wrong = []
    for name, team in zip(OWNED["sessions" if "session" in where else "keys"], (TEAM_A, TEAM_B),
                          strict=True):  # fmt: skip
        visible = binding in ("unbound", team)
        if (world.objects[name] in ids) != visible:
            wrong.append(f"{where}: {name} {'not ' if visible else ''}listed")
    if binding != "unbound" and teams - {binding}:
        wrong.append(f"{where}: lists objects of {sorted(teams - {binding})}")
    return wrong


def test_team_b_never_learns_of_team_a_objects(world: World) -> None:
    """A caller bound to team B gets the same 404 for team A's objects as for ids that do
    not exist: an id's existence is not disclosed."""
    headers = world.credential("admin", TEAM_B)
    for kind, name, absent in (("sessions", "session-a", "no-such-session"),
                               ("keys", "key-a", "ZZZZZZZZZZZZ")):  # fmt: skip
        real = world.call("GET", f"/gateway/{kind}/{world.objects[name]}", headers)
        none = world.call("GET", f"/gateway/{kind}/{absent}", headers)
        assert real.status == none.status == 404
        said = real.body["error"].replace(world.objects[name], "ID")
        assert said == none.body["error"].replace(absent, "ID")
    listed = world.call("GET", f"/gateway/keys?team={TEAM_A}", headers)
    assert listed.status == 200 and listed.body["keys"] == []


# -- anonymous callers and the LLM plane ---------------------------------------------------------
ANONYMOUS: dict[str, dict[str, str]] = {
    "none": {},
    "empty bearer": {"Authorization": "Bearer "},
    "basic": {"Authorization": "Basic YWRtaW46YWRtaW4="},
    "token as the scheme": {"Authorization": ADMIN_TOKEN},
    "token in x-api-key": {"x-api-key": ADMIN_TOKEN},
    "forwarded from loopback": {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1"},
}


def test_no_admin_route_answers_a_caller_without_a_credential(world: World) -> None:
    """Every admin-plane route, its path's objects real or hostile, the admin token even in
    the query string or as the wrong header: never a 2xx. The probes stay open."""
    hostile = ("..%2F..%2Fmetrics", "%00", "x" * 300, world.objects["session-a"])
    tried = 0
    for route in admin_routes(world.app):
        if route.plane == "probe":
            assert world.call(route.method, route.path, {}).status == 200
            continue
        paths = {route.path.replace(f"{{{p}}}", value) for p in route.parameters
                 for value in hostile} or {route.path}  # fmt: skip
        for path in paths:
            for name, headers in ANONYMOUS.items():
                for query in ("", f"?token={ADMIN_TOKEN}&access_token={ADMIN_TOKEN}"):
                    answer = world.call(route.method, path + query, headers, {"turns": 1})
                    tried += 1
                    assert not 200 <= answer.status < 300, (route, name, query, answer)
                    assert answer.status in (401, 404), (route, name, answer)
    assert tried > 100


LLM_CALLS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "/v1/chat/completions": ("POST", "/v1/chat/completions", CHAT),
    "/v1/messages": ("POST", "/v1/messages", {"model": ANTHROPIC_MODEL, "max_tokens": 16,
                                              "messages": [{"role": "user", "content": "hi"}]}),
    "/v1/messages/count_tokens": ("POST", "/v1/messages/count_tokens",
                                  {"model": ANTHROPIC_MODEL,
                                   "messages": [{"role": "user", "content": "hi"}]}),
    "/v1/responses": ("POST", "/v1/responses", {"model": "gpt-4o-mini", "input": "hi"}),
    "/v1/{tail}": ("GET", "/v1/models", {}),
    "/s/{gateway_session}/v1/{tail}": ("POST", "/s/matrix/v1/chat/completions", CHAT),
}  # fmt: skip
"""A call of each LLM route, by the route's path as registered."""


@pytest.mark.parametrize("mode", ["passthrough", "keys"])
async def test_every_llm_route_refuses_the_admin_token(
    make_gateway: MakeGateway, fake_provider: TestServer, tmp_path: Path, mode: str
) -> None:
    gw = await make_gateway(None, **(keys_mode(fake_provider, tmp_path) if mode == "keys" else {}))
    routes = [
        resource.canonical
        for resource in gw.server.app.router.resources()
        for route in resource
        if gw.server.app[ROUTE_AUTH].get(route) == RouteAuth("llm", "llm")
    ]
    assert set(routes) == set(LLM_CALLS)
    before = gw.upstream_calls()
    async with aiohttp.ClientSession() as http:
        for route in routes:
            method, path, body = LLM_CALLS[route]
            for headers in ({"Authorization": f"Bearer {ADMIN_TOKEN}"}, {"x-api-key": ADMIN_TOKEN}):
                sent = {**headers, "Content-Type": "application/json", "anthropic-version": "1"}
                data = json.dumps(body).encode() if method == "POST" else None
                async with http.request(method, gw.url(path), data=data, headers=sent) as resp:
                    text = await resp.text()
                    assert resp.status == 401, (mode, path, headers, text)
                    assert resp.headers["X-Gateway-Error"] == "gateway_auth_wrong_plane", text
                    assert ADMIN_TOKEN not in text
    assert gw.upstream_calls() == before, "the admin token went upstream"


# -- mass assignment and escalation (hypothesis) -------------------------------------------------
EXTRA_FIELDS = {
    "role": st.sampled_from(["admin", "key-admin", "operator"]),
    "admin": st.just(True),
    "is_admin": st.just(True),
    "scopes": st.sampled_from([["keys:write"], ["admin"], ["llm", "keys:write"], ["*"]]),
    "id": st.sampled_from(["AAAAAAAAAAAA", "key-a"]),
    "digest": st.just("0" * 64),
    "previous_digest": st.just("0" * 64),
    "created_by": st.just("token:trusted"),
    "declared": st.just(True),
    "teams": st.just([TEAM_A, TEAM_B]),
    "owner": st.just("someone-else"),
    "revoked_at": st.none(),
    "expires_at": st.just(4e12),
}
ESCALATING = {"role", "admin", "is_admin", "id", "digest", "previous_digest", "created_by",
              "declared", "teams", "owner", "revoked_at", "expires_at"}  # fmt: skip
"""Fields no body may carry: KeySpec and RotateSpec have none of them."""


def _spec() -> st.SearchStrategy[dict[str, Any]]:
    base = st.fixed_dictionaries(
        {"team": st.sampled_from([TEAM_A, TEAM_B]), "name": st.just("escalation")},
        optional={
            "expires": st.one_of(
                st.floats(min_value=-1e12, max_value=1e12, allow_nan=False),
                st.sampled_from(["9999d", "3651d", "10y", "-1d", "0", "1e9"]),
            ),
            "models": st.lists(st.sampled_from(["*", "gpt-4o*", "claude-*"]), max_size=3),
            "pool": st.sampled_from(["platform", "no-such-pool"]),
        },
    )
    extras = st.dictionaries(st.sampled_from(sorted(EXTRA_FIELDS)), st.none(), max_size=3).flatmap(
        lambda chosen: st.fixed_dictionaries({k: EXTRA_FIELDS[k] for k in chosen})
    )
    return st.tuples(base, extras).map(lambda pair: {**pair[0], **pair[1]})


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=_spec(), binding=st.sampled_from(list(BINDINGS)), role=st.sampled_from(ROLES))
def test_a_create_body_never_grants_more_than_its_creator_holds(
    world: World, spec: dict[str, Any], binding: str, role: str
) -> None:
    headers = world.credential(role, binding)
    answer = world.call("POST", "/gateway/keys", headers, spec)
    extra = set(spec) & ESCALATING
    if "keys:write" not in ROLE_SCOPES[role]:  # type: ignore[index]
        assert answer.status == 403, answer
        return
    if extra:
        assert answer.status == 400, answer
        assert all(name in answer.body["error"] for name in extra), answer
        return
    foreign = binding != "unbound" and spec["team"] != binding
    if set(spec.get("scopes", ["llm"])) - SCOPES or foreign:
        assert answer.status in (400, 403), answer  # which check speaks first does not matter
        return
    if answer.status != 201:  # a bad expiry or an unknown pool: refused, nothing made
        assert answer.status == 400, answer
        assert "expires" in answer.body["error"] or "no-such-pool" in answer.body["error"]
        return
    made = answer.body
    assert made["team"] == spec["team"] and set(made["scopes"]) <= SCOPES
    assert (
        "digest" not in made
        and made["created_by"] == f"oidc:{role}@{binding.replace('unbound', 'all')}"
    )
    lifetime = made["expires_at"] - made["created_at"]
    assert 0 <= lifetime <= MAX_EXPIRY  # clamped; a tiny one is a key born expired
    record = world.run(world.app[KEYRING].get(made["id"]))
    assert record is not None and record.team == spec["team"] and not record.declared


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    extras=st.dictionaries(st.sampled_from(sorted(EXTRA_FIELDS)), st.just(True), max_size=3),
    grace=st.one_of(st.none(), st.sampled_from(["1h", "91d", -5, 0, "x"])),
    action=st.sampled_from(["rotate", "revoke", "show"]),
)
def test_a_key_admin_of_team_a_can_never_touch_a_key_of_team_b(
    world: World, extras: dict[str, Any], grace: Any, action: str
) -> None:
    """Whatever the body says, team B's key is as absent to team A's key admin: 404, and
    the key unchanged."""
    headers = world.credential("key-admin", TEAM_A)
    key_b = world.objects["key-b"]
    before = world.run(world.app[KEYRING].get(key_b))
    body: dict[str, Any] = {**extras, **({} if grace is None else {"grace": grace})}
    if action == "show":
        answer = world.call("GET", f"/gateway/keys/{key_b}", headers)
    else:
        answer = world.call("POST", f"/gateway/keys/{key_b}/{action}", headers, body)
    assert answer.status in (400, 404), answer
    if answer.status == 404:  # as for an id no key has
        assert answer.body["error"] == f"no key {key_b}"
    assert world.run(world.app[KEYRING].get(key_b)) == before
    listed = world.call("GET", "/gateway/keys", headers)
    assert key_b not in {k["id"] for k in listed.body["keys"]}


def test_a_team_bound_creator_cannot_give_a_key_another_teams_pool(world: World) -> None:
    """Team B's upstream credentials (``team_pools``) are team B's: a key admin bound to team
    A cannot make a team A key that spends them."""
    headers = world.credential("key-admin", TEAM_A)
    spec = {"team": TEAM_A, "name": "borrower", "pool": TEAM_B_POOL}
    answer = world.call("POST", "/gateway/keys", headers, spec)
    assert answer.status == 403, answer
    assert TEAM_B_POOL in answer.body["error"]
    # An unbound admin may (it holds every team).
    made = world.call("POST", "/gateway/keys", world.credential("admin", "unbound"), spec)
    assert made.status == 201, made
