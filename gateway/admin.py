"""The admin API under ``/gateway/``: health, readiness, sessions and degraded mode, as JSON.

Health and ready are the probe plane (any caller, any ``Host``). Every other route is on the
admin plane (``guard``): it declares the scope it needs when it is registered, and its caller
shows the admin token (``GATEWAY_ADMIN_TOKEN``, or the one generated into the state directory
on first start) or an admin OIDC token whose role holds that scope; a team-bound role sees
only its teams' sessions (another team's answers 404). Writes also need a JSON body and no
foreign ``Origin``: a web page can send a form or text/plain POST to localhost without
asking, but not a cross-site JSON one. ``serving_problem`` is what ``gateway serve`` refuses
to start with.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from typing import Any

import orjson
from aiohttp import web

from gateway import __version__
from gateway.admin_bodies import (
    MAX_BODY,
    MAX_BY,
    MAX_REASON,
    B,
    BodyRefused,
    DegradeBody,
    EndBody,
    GrantBody,
    parse,
    too_large,
)
from gateway.appkeys import (
    ADMIN_AUTH,
    AUDIT,
    COMPACTOR,
    DEGRADED,
    DRAINING,
    HOSTS,
    METRICS,
    POLICY,
    SETTINGS,
    STARTED_AT,
    STORE,
    SUMMARIZERS,
    UPSTREAMS,
)
from gateway.audit import AuditError
from gateway.auth.admin_auth import Refused, weak_token
from gateway.auth.hosts import is_loopback
from gateway.auth.planes import ADMIN_CALLER, add_route, listener_port
from gateway.auth.principal import AdminCaller
from gateway.errors import HostRefused
from gateway.openapi import openapi
from gateway.policy import prices
from gateway.settings import Settings
from gateway.store import (
    INTERNAL_FIELDS,
    Grant,
    LoadFailed,
    SessionEnded,
    SessionQuery,
    SessionRecord,
    Store,
)
from gateway.store.records import SESSION_STATUSES, budget_key_parts

MAX_PAGE = 500
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def operator_view(record: SessionRecord, now: float) -> dict[str, Any]:
    """A session as operators read it (the admin API, and so ``gateway sessions``): the
    store's own form (``to_json``, which keeps everything) without what the gateway keeps for
    itself (``INTERNAL_FIELDS``: detector state, compaction recipes), plus ``idle_seconds``."""
    data = record.to_json()
    for name in INTERNAL_FIELDS:
        data.pop(name, None)
    data["idle_seconds"] = round(max(0.0, now - record.last_seen), 3)
    return data


async def health(request: web.Request) -> web.Response:
    """Liveness: 200 whenever the process serves, degraded or draining; says which and why,
    and how each upstream's guards stand."""
    app = request.config_dict
    uptime = time.time() - app[STARTED_AT]
    degraded = app[DEGRADED]
    summarizers = app[SUMMARIZERS].by_name
    upstreams = {
        name: {
            "breaker": upstream.breaker.state,
            "limit": int(upstream.limiter.limit),
            "in_flight": upstream.limiter.in_flight,
            "queued": upstream.limiter.queued,
            "summarizer_breaker": summarizers[name].breaker.state,
        }
        for name, upstream in app[UPSTREAMS].by_name.items()
    }
    return _json(
        {
            "status": "degraded" if degraded.active else "ok",
            "reasons": _reasons(request),
            "version": __version__,
            "uptime_seconds": round(uptime, 3),
            "upstreams": upstreams,
        }
    )


async def ready(request: web.Request) -> web.Response:
    """Readiness: 503 once a stop has begun (the load balancer sends no new calls while the
    calls in flight drain); degraded still serves, so it stays ready."""
    if request.config_dict[DRAINING].is_set():
        return _json({"status": "draining"}, status=503)
    return _json({"status": "ready"})


MAX_DEGRADE_REASON = MAX_REASON
"""Characters of an operator's reason kept (health, the degrade answer, logs, audit)."""


async def degrade_status(request: web.Request) -> web.Response:
    return _json(_degrade_view(request))


async def degrade(request: web.Request) -> web.Response:
    """``{"on": true, "reason": "store maintenance"}``: degraded mode by hand (``manual``), or
    ``{"on": false}`` to leave it (what the gateway detected itself stays). Audited first."""
    body = await _body(request, DegradeBody)
    if isinstance(body, web.Response):
        return body
    on, reason = body.on, _plain(body.reason)
    if on and not reason:
        return _json({"error": "say why: a reason is needed to degrade by hand"}, status=400)
    degraded = request.config_dict[DEGRADED]
    changed = degraded.holds("manual") != on
    if changed:
        refused = await _audit_first(request, "degraded", on=on, reason="manual", detail=reason)
        if refused:
            return refused
        degraded.set("manual", on, reason, actor=audit_actor(request))
    return _json({**_degrade_view(request), "changed": changed})


def _degrade_view(request: web.Request) -> dict[str, Any]:
    degraded = request.config_dict[DEGRADED]
    return {"status": "degraded" if degraded.active else "ok", "reasons": _reasons(request)}


def _reasons(request: web.Request) -> list[dict[str, Any]]:
    return [
        {"reason": r.reason, "detail": r.detail, "since": round(r.since, 3), "actor": r.actor}
        for r in request.config_dict[DEGRADED].reasons()
    ]


def _plain(text: str) -> str:
    """An operator's text on one line, bounded: it reaches text logs and terminals, where a
    control character could forge a line or move the cursor."""
    cleaned = "".join(" " if not c.isprintable() else c for c in text[: MAX_DEGRADE_REASON * 2])
    return " ".join(cleaned.split())[:MAX_DEGRADE_REASON]


async def list_sessions(request: web.Request) -> web.Response:
    params = request.rel_url.query
    status = params.get("status") or None
    if status is not None and status not in SESSION_STATUSES:
        wanted = ", ".join(SESSION_STATUSES)
        return _json({"error": f"bad query: status must be one of {wanted}"}, status=400)
    try:
        query = SessionQuery(
            agent=params.get("agent") or None,
            status=status,
            since=_float(params.get("since")),
            before=_float(params.get("before")),
            limit=_limit(params.get("limit", "50")),
        )
    except ValueError as exc:
        return _json({"error": f"bad query: {str(exc)[:200]}"}, status=400)
    caller = request[ADMIN_CALLER]
    records, next_cursor = await _page(request.config_dict[STORE], query, caller)
    now = time.time()
    return _json({"sessions": [operator_view(r, now) for r in records], "next_before": next_cursor})


async def _page(
    store: Store, query: SessionQuery, caller: AdminCaller
) -> tuple[list[SessionRecord], float | None]:
    """One page of the sessions ``caller`` sees, and the cursor of the next. A team-bound
    caller's page is filled from as many of the store's pages as it takes (bounded)."""
    if caller.teams is None:
        records = await store.find(query)
        return records, (records[-1].last_seen if len(records) == query.limit else None)
    seen: list[SessionRecord] = []
    cursor = query.before
    for _ in range(_TEAM_PAGES):
        batch = await store.find(replace(query, before=cursor, limit=MAX_PAGE))
        seen.extend(r for r in batch if caller.sees(r.team))
        if len(seen) >= query.limit or len(batch) < MAX_PAGE:
            break
        cursor = batch[-1].last_seen
    else:
        return seen, cursor  # scanned its bound: the next page goes on from here
    page = seen[: query.limit]
    return page, (page[-1].last_seen if len(page) == query.limit else None)


_TEAM_PAGES = 20
"""Store pages one team-bound listing scans at most before it answers with a cursor."""


async def _visible(request: web.Request, session_id: str) -> SessionRecord | None:
    """The session, if it exists and the caller's teams cover it: another team's session is
    as absent (404), so its id's existence is not disclosed."""
    record = await request.config_dict[STORE].get(session_id)
    if record is None or not request[ADMIN_CALLER].sees(record.team):
        return None
    return record


async def get_session(request: web.Request) -> web.Response:
    record = await _visible(request, request.match_info["session_id"])
    if record is None:
        return _json({"error": "no such session"}, status=404)
    return _json(operator_view(record, time.time()))


async def grant(request: web.Request) -> web.Response:
    """``{"turns": 50, "tokens": 0, "reason": "...", "by": "alice"}``: more for a session."""
    body = await _body(request, GrantBody)
    if isinstance(body, web.Response):
        return body
    turns, tokens = body.turns, body.tokens
    by, reason = _operator(request, body.by), body.reason[:MAX_REASON]
    session_id = request.match_info["session_id"]
    given = Grant(turns=turns, tokens=tokens, by=by, reason=reason, at=time.time())
    store = request.config_dict[STORE]
    try:
        # Refused before the audit line (nothing changes, nothing to audit); the store checks
        # again when it grants, and a session ended in between is said in the log below.
        current = await _visible(request, session_id)
        if current is None:
            return _json({"error": "no such session"}, status=404)
        if current.status == "ended":
            raise SessionEnded(current)
        if refused := await _audit_first(
            request, "grant", session=session_id, turns=turns, tokens=tokens, by=by, reason=reason
        ):
            return refused
        try:
            record = await store.grant(session_id, given)
        except SessionEnded:
            _audit_undone(request, "grant", session_id, "the session was ended meanwhile")
            raise
        except LoadFailed:
            _audit_undone(request, "grant", session_id, "the store could not read the session")
            return _store_down()
    except SessionEnded as ended:
        # Ended is final: a grant would be recorded and let nothing through. 409 Conflict:
        # the request is fine, the session's state refuses it.
        why = f" ({ended.reason})" if ended.reason else ""
        return _json(
            {
                "error": f"session {session_id} is ended{why}: a grant cannot re-open it; "
                "the agent's next call needs a new session",
                "session": session_id,
                "status": ended.status,
                "status_reason": ended.reason or None,
            },
            status=409,
        )
    if record is None:
        _audit_undone(request, "grant", session_id, "the session is gone")
        return _json({"error": "no such session"}, status=404)
    return _json(operator_view(record, time.time()))


async def end(request: web.Request) -> web.Response:
    body = await _body(request, EndBody)
    if isinstance(body, web.Response):
        return body
    by, reason = _operator(request, body.by), body.reason[:MAX_REASON]
    session_id = request.match_info["session_id"]
    # Said as it reads in a rejection and in ``sessions show``: "ended by bob: runaway".
    why = f"ended by {by}: {reason}" if reason else f"ended by {by}"
    store = request.config_dict[STORE]
    if await _visible(request, session_id) is None:  # before the audit line: nothing to audit
        return _json({"error": "no such session"}, status=404)
    if refused := await _audit_first(
        request, "session_end", session=session_id, by=by, reason=reason
    ):
        return refused
    try:
        record = await store.set_status(session_id, "ended", why)
    except LoadFailed:
        _audit_undone(request, "session_end", session_id, "the store could not read the session")
        return _store_down()
    if record is None:
        _audit_undone(request, "session_end", session_id, "the session is gone")
        return _json({"error": "no such session"}, status=404)
    return _json(operator_view(record, time.time()))


def _store_down() -> web.Response:
    """The store cannot read the session now (degraded ``store``): try again later."""
    response = _json(
        {"error": "the session store cannot read this session now (degraded: store); retry"},
        status=503,
    )
    response.headers["Retry-After"] = "5"
    return response


async def policy(request: web.Request) -> web.Response:
    live = request.config_dict[POLICY]
    current = live.policy
    return _json(
        {
            "version": current.version,
            "source": current.source,
            "loaded_at": live.loaded_at,
            "reloads": live.reloads,
            "failures": live.failures,
            "last_error": live.last_error,
            "last_error_at": live.last_error_at,
            "rules": [rule.name for rule in current.rules],
            "prices": {"builtin": prices.data_version(), "policy": list(current.file.prices)},
        }
    )


async def budgets(request: web.Request) -> web.Response:
    """Every budget window and its spend; a team-bound caller sees its teams' budgets only
    (a principal's own budget names no team: those are for unbound roles)."""
    counters = await request.config_dict[STORE].budgets()
    caller = request[ADMIN_CALLER]
    if caller.teams is not None:
        counters = [c for c in counters if _team_budget(c.key) in caller.teams]
    return _json({"budgets": [asdict(counter) for counter in counters]})


def _team_budget(key: str) -> str | None:
    per, owner, _window = budget_key_parts(key)
    return owner if per == "team" else None


async def _body(request: web.Request, model: type[B]) -> B | web.Response:
    """The request's body as ``model`` (strict: see ``gateway.admin_bodies``), or the 400
    or 413 that says what is wrong with it. Read to at most ``MAX_BODY`` bytes."""
    try:
        return parse(model, await _read(request))
    except BodyRefused as refused:
        return _json({"error": refused.message}, status=refused.status)


async def _read(request: web.Request) -> bytes:
    """The body, read no further than ``MAX_BODY`` bytes (``BodyRefused``, 413, past it):
    the app's ``client_max_size`` is sized for model calls, far above any admin body."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        too_large(MAX_BODY)
    raw = bytearray()
    while chunk := await request.content.read(MAX_BODY + 1 - len(raw)):
        raw += chunk
        if len(raw) > MAX_BODY:
            too_large(MAX_BODY)
    return bytes(raw)


def _operator(request: web.Request, by: str | None) -> str:
    """Who acts, as the caller says: the body's ``by``, else ``X-Gateway-Operator``, else
    "admin". A claim: the audit log keeps the peer and how it was admitted beside it."""
    named = by or request.headers.get("X-Gateway-Operator") or "admin"
    return named[:MAX_BY]


def _caller(request: web.Request) -> dict[str, str | None]:
    # ``remote`` is the TCP peer, never a header (``X-Forwarded-For`` is a claim).
    caller = request.get(ADMIN_CALLER)
    return {"peer": request.remote, "auth": caller.method if caller else None}


def audit_actor(request: web.Request) -> str:
    """Who made an admin change, as the audit log names it: ``token:<12 hex>`` (the hash of
    the admin token it showed, never the token) or ``oidc:<subject>``."""
    caller = request.get(ADMIN_CALLER)
    return caller.actor if caller is not None else "unknown"


async def _audit_first(request: web.Request, event: str, **fields: Any) -> web.Response | None:
    """The change's audit line, on disk before the change is made; a 503 (and no change)
    when it cannot be written: no admin change goes unaudited."""
    details: dict[str, Any] = {**fields, **_caller(request)}
    try:
        await request.config_dict[AUDIT].commit(event, actor=audit_actor(request), **details)
    except AuditError as exc:
        return _json({"error": f"not done: {exc}; the change was not made"}, status=503)
    return None


def _audit_undone(request: web.Request, event: str, session_id: str, why: str) -> None:
    """An audited change the store then refused (the session changed in between)."""
    request.config_dict[AUDIT].record(
        f"{event}_undone", actor=audit_actor(request), session=session_id, reason=why
    )


async def calibration(request: web.Request) -> web.Response:
    """Per model: how the provider's input counts compare with the gateway's estimates."""
    models = request.config_dict[COMPACTOR].calibration.to_json()
    return _json({"models": models})


def _float(value: str | None) -> float | None:
    if not value:
        return None
    number = float(value)
    if not math.isfinite(number):  # NaN compares false with every time: no page, no cursor
        raise ValueError(f"{value[:20]!r} is not a time")
    return number


def _limit(value: str) -> int:
    """A page's size: at least 1 (0 has no last entry to make a cursor of, and a negative
    LIMIT is no limit in SQLite), at most ``MAX_PAGE``."""
    limit = int(value)
    if limit < 1:
        raise ValueError("limit must be at least 1")
    return min(limit, MAX_PAGE)


def guard(handler: Handler, scope: str, *, write: bool = False, any_host: bool = False) -> Handler:
    """The admin plane's check, before ``handler``: an allowed ``Host``; for a write
    (``write=True``) no foreign ``Origin`` and a JSON body; the caller's credential (the admin
    token or an admin OIDC token, never a gateway or provider key) and a role that holds
    ``scope``. The caller is ``request[ADMIN_CALLER]`` for the handler; a refusal is counted
    and audited (``admin_denied``). ``any_host``: a route scraped by address (``/metrics``:
    Prometheus cannot set ``Host``; the bearer token keeps web pages out).

    A wrapper per route, not a middleware: a sub-application's middleware makes aiohttp build
    a middleware chain for every request of the whole app, the LLM path included."""

    @functools.wraps(handler)  # its name and docstring (the OpenAPI document reads them)
    async def guarded(request: web.Request) -> web.StreamResponse:
        app = request.config_dict
        metrics = app[METRICS]
        settings = app[SETTINGS]
        if settings.admin_host is not None and listener_port(request) not in settings.admin_ports:
            # A separate admin listener: the main one serves no admin route at all.
            return _json({"error": "not found"}, 404)
        if not any_host and not app[HOSTS].allows(request.host):
            metrics.admin_requests.inc((scope, "denied"))
            return _json({"error": HostRefused(request.host).message}, 400)
        if write:
            if not _same_origin(request):
                return _json({"error": "admin writes are refused from another origin"}, 403)
            if request.content_type != "application/json":
                return _json({"error": "admin writes take an application/json body"}, 415)
        who = await app[ADMIN_AUTH].identify(request.headers)
        if isinstance(who, Refused):
            method = "oidc" if who.message.startswith("the bearer") else "token"
            metrics.auth_attempts.inc(("admin", method if who.reason != "missing" else "none",
                                       who.reason))  # fmt: skip
            metrics.admin_requests.inc((scope, "denied"))
            _audit_denied(request, scope, who.reason, actor="unauthenticated")
            response = _json({"error": f"gateway: {who.message}"}, who.status)
            if who.status == 401:
                response.headers["WWW-Authenticate"] = "Bearer"
            return response
        metrics.auth_attempts.inc(("admin", who.method, "ok"))
        if not who.may(scope):
            metrics.admin_requests.inc((scope, "denied"))
            _audit_denied(request, scope, "forbidden", actor=who.actor)
            roles = ", ".join(sorted(who.roles))
            return _json(
                {"error": f"gateway: your role ({roles}) does not allow {scope}; an admin grants"
                 " a role that does (viewer, operator, key-admin, auditor, admin)"},
                403,
            )  # fmt: skip
        request[ADMIN_CALLER] = who
        answer = await handler(request)
        outcome = "ok" if answer.status < 400 else "refused" if answer.status < 500 else "error"
        metrics.admin_requests.inc((scope, outcome))
        return answer

    return guarded


DENIALS_EVERY = 10.0
"""Seconds between two ``admin_denied`` lines for one peer (an IPv6 one by its /64), actor
and reason: a flood of refused calls is one line per period (with how many it stands for,
``also_denied``), not one line each; ``gateway_admin_requests_total`` counts every one."""


def _peer_group(peer: str | None) -> str | None:
    """An IPv6 peer by its /64 (one host holds a whole /64: a flood from it is one peer)."""
    if peer is None or ":" not in peer:
        return peer
    try:
        return str(ipaddress.ip_network(f"{peer.split('%')[0]}/64", strict=False))
    except ValueError:
        return peer


def _audit_denied(request: web.Request, scope: str, reason: str, actor: str) -> None:
    """A refused admin call, on the audit trail (never waited for: nothing changed)."""
    denials = request.config_dict[ADMIN_AUTH].denials
    key, now = (_peer_group(request.remote), actor, reason), time.monotonic()
    last, held = denials.get(key, (-DENIALS_EVERY, 0))
    if now - last < DENIALS_EVERY:
        denials[key] = (last, held + 1)
        return
    if len(denials) > 10_000:  # bounded: many peers, each rare
        denials.clear()
    denials[key] = (now, 0)
    request.config_dict[AUDIT].record(
        "admin_denied", actor=actor, scope=scope, reason=reason,
        path=request.path[:200], method=request.method, peer=request.remote,
        also_denied=held,
    )  # fmt: skip


def _same_origin(request: web.Request) -> bool:
    """No ``Origin`` (a CLI, curl) or our own ``scheme://host``; anything else is a page."""
    origin = request.headers.get("Origin")
    return origin is None or origin == f"{request.scheme}://{request.host}"


def serving_problem(settings: Settings) -> str | None:
    """Why ``gateway serve`` must not start with these settings (it exits 2), or None."""
    loopback = is_loopback(settings.host)
    open_network = not loopback and not settings.allow_network_passthrough
    if settings.auth.mode == "passthrough" and open_network:
        return (
            f"refusing to serve passthrough mode on {settings.host}: anyone who reaches it"
            " could use the gateway with any provider key, unauthenticated. Either switch to"
            " gateway keys (auth: {mode: keys} in the config, upstream credentials under"
            " upstreams.<name>.credentials, then: gateway keys create --team T --name N), or"
            " accept it with --allow-network-passthrough (GATEWAY_ALLOW_NETWORK_PASSTHROUGH=1,"
            " allow_network_passthrough: true), or listen on 127.0.0.1."
        )
    if settings.admin_token is not None and (weak := weak_token(settings.admin_token.reveal())):
        return f"refusing to start: {weak} (GATEWAY_ADMIN_TOKEN or admin_token)."
    return None


ADMIN_ROUTES: tuple[tuple[str, str, Handler, str, bool], ...] = (
    ("GET", "/degrade", degrade_status, "health:read", False),
    ("POST", "/degrade", degrade, "degrade:write", True),
    ("GET", "/sessions", list_sessions, "sessions:read", False),
    ("GET", "/sessions/{session_id}", get_session, "sessions:read", False),
    ("POST", "/sessions/{session_id}/grant", grant, "sessions:write", True),
    ("POST", "/sessions/{session_id}/end", end, "sessions:write", True),
    ("GET", "/policy", policy, "policy:read", False),
    ("GET", "/budgets", budgets, "budgets:read", False),
    ("GET", "/calibration", calibration, "policy:read", False),
    ("GET", "/openapi.json", openapi, "health:read", False),
)
"""(method, path under /gateway, handler, scope, write): the admin API's own routes."""


def admin_app(
    more: tuple[tuple[str, str, Handler, str], ...] = (),
) -> web.Application:
    """The admin API, mounted at ``/gateway/``: health and ready on the probe plane (any
    caller, any ``Host``); every other route on the admin plane behind ``guard`` with its
    scope. ``more``: routes of other modules (keys, credentials), writes when POST."""
    app = web.Application()
    add_route(app, "GET", "/health", health, plane="probe", scope="none")
    add_route(app, "GET", "/ready", ready, plane="probe", scope="none")
    for method, path, handler, scope, write in ADMIN_ROUTES:
        guarded = guard(handler, scope, write=write)
        add_route(app, method, path, guarded, plane="admin", scope=scope)
    for method, path, handler, scope in more:
        guarded = guard(handler, scope, write=method == "POST")
        add_route(app, method, path, guarded, plane="admin", scope=scope)
    return app
