"""The admin API under ``/gateway/``: health, readiness, sessions and degraded mode, as JSON.

Who may call it (``admin_token``, ``admitted``): with an admin token set, every route but
health and ready needs it as ``Authorization: Bearer <token>``. Without one, reads are open
and writes (grant, end, degrade) are accepted only from a loopback peer, so only a process on
this host can make them; ``serving_problem`` refuses to serve on another address without a
token. Writes also need a JSON body and no foreign ``Origin``: a web page can send a form or
text/plain POST to localhost without asking, but not a cross-site JSON one.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import orjson
from aiohttp import web
from yarl import URL

from gateway import __version__
from gateway.appkeys import (
    AUDIT,
    COMPACTOR,
    DEGRADED,
    DRAINING,
    POLICY,
    SETTINGS,
    STARTED_AT,
    STORE,
    SUMMARIZERS,
    UPSTREAMS,
)
from gateway.audit import AuditError, token_actor
from gateway.policy import prices
from gateway.settings import Settings
from gateway.store import (
    INTERNAL_FIELDS,
    Grant,
    LoadFailed,
    SessionEnded,
    SessionQuery,
    SessionRecord,
)
from gateway.store.records import SESSION_STATUSES

MAX_PAGE = 500
MAX_GRANT = 2**53
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ADMITTED = web.RequestKey("admitted", str)
"""How an admin call was let in: ``token`` or ``loopback`` (the audit log says which)."""
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


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


MAX_DEGRADE_REASON = 500
"""Characters of an operator's reason kept (health, the degrade answer, logs, audit)."""
_DEGRADE_FIELDS = frozenset({"on", "reason"})


async def degrade_status(request: web.Request) -> web.Response:
    return _json(_degrade_view(request))


async def degrade(request: web.Request) -> web.Response:
    """``{"on": true, "reason": "store maintenance"}``: degraded mode by hand (``manual``), or
    ``{"on": false}`` to leave it (what the gateway detected itself stays). Audited first."""
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    unknown = sorted(str(name)[:40] for name in body if name not in _DEGRADE_FIELDS)
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        return _json({"error": f"unknown field(s): {shown}; degrade takes on and reason"}, 400)
    on = body.get("on")
    if not isinstance(on, bool):
        return _json({"error": "on must be true or false"}, status=400)
    given = body.get("reason", "")
    if not isinstance(given, str):
        return _json({"error": "reason must be a string"}, status=400)
    reason = _plain(given)
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
            limit=min(int(params.get("limit", "50")), MAX_PAGE),
        )
    except ValueError as exc:
        return _json({"error": f"bad query: {exc}"}, status=400)
    records = await request.config_dict[STORE].find(query)
    now = time.time()
    next_cursor = records[-1].last_seen if len(records) == query.limit else None
    return _json({"sessions": [operator_view(r, now) for r in records], "next_before": next_cursor})


async def get_session(request: web.Request) -> web.Response:
    record = await request.config_dict[STORE].get(request.match_info["session_id"])
    if record is None:
        return _json({"error": "no such session"}, status=404)
    return _json(operator_view(record, time.time()))


async def grant(request: web.Request) -> web.Response:
    """``{"turns": 50, "tokens": 0, "reason": "...", "by": "alice"}``: more for a session."""
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    try:
        turns, tokens = int(body.get("turns", 0)), int(body.get("tokens", 0))
    except (TypeError, ValueError, OverflowError):
        return _json({"error": "turns and tokens must be whole numbers"}, status=400)
    if turns < 0 or tokens < 0 or turns + tokens == 0:
        return _json({"error": "grant a positive number of turns and/or tokens"}, status=400)
    if turns > MAX_GRANT or tokens > MAX_GRANT:  # JSON's exact integers; the audit line too
        return _json({"error": f"grant at most {MAX_GRANT} turns or tokens at once"}, status=400)
    by, reason = _operator(request, body), str(body.get("reason", ""))[:500]
    session_id = request.match_info["session_id"]
    given = Grant(turns=turns, tokens=tokens, by=by, reason=reason, at=time.time())
    store = request.config_dict[STORE]
    try:
        # Refused before the audit line (nothing changes, nothing to audit); the store checks
        # again when it grants, and a session ended in between is said in the log below.
        current = await store.get(session_id)
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
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    by, reason = _operator(request, body), str(body.get("reason", ""))[:500]
    session_id = request.match_info["session_id"]
    # Said as it reads in a rejection and in ``sessions show``: "ended by bob: runaway".
    why = f"ended by {by}: {reason}" if reason else f"ended by {by}"
    store = request.config_dict[STORE]
    if await store.get(session_id) is None:  # before the audit line: nothing to audit
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
    counters = await request.config_dict[STORE].budgets()
    return _json({"budgets": [asdict(counter) for counter in counters]})


async def _body(request: web.Request) -> dict[str, Any] | web.Response:
    raw = await request.read()
    if not raw:
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _json({"error": "the body must be JSON"}, status=400)
    if not isinstance(body, dict):
        return _json({"error": "the body must be a JSON object"}, status=400)
    return body


def _operator(request: web.Request, body: dict[str, Any]) -> str:
    """Who acts, as the caller says: the body's ``by``, else ``X-Gateway-Operator``, else
    "admin". A claim: the audit log keeps the peer and how it was admitted beside it."""
    by = body.get("by") or request.headers.get("X-Gateway-Operator") or "admin"
    return str(by)[:120]


def _caller(request: web.Request) -> dict[str, str | None]:
    # ``remote`` is the TCP peer, never a header (``X-Forwarded-For`` is a claim).
    return {"peer": request.remote, "auth": request.get(ADMITTED)}


def audit_actor(request: web.Request) -> str:
    """Who made an admin change, as the audit log names it: ``token:<12 hex>`` (the hash of
    the admin token it showed, never the token) or ``loopback`` (no token set, this host)."""
    token = request.config_dict[SETTINGS].admin_token
    if request.get(ADMITTED) == "token" and token is not None:
        return token_actor(token.get_secret_value())  # the bearer shown equals this token
    return request.get(ADMITTED) or "unknown"


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
    return float(value) if value else None


def admin_token(handler: Handler, *, write: bool = False) -> Handler:
    """With ``admin_token`` set, the route needs it as a bearer; a write (``write=True``) is
    also refused from a foreign ``Origin``, without a JSON body, and without a token from any
    peer but loopback.

    A wrapper per route, not a middleware: a sub-application's middleware makes aiohttp build
    a middleware chain for every request of the whole app, the LLM path included."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        if write:
            if not _same_origin(request):
                return _json({"error": "admin writes are refused from another origin"}, 403)
            if request.content_type != "application/json":
                return _json({"error": "admin writes take an application/json body"}, 415)
        token = request.config_dict[SETTINGS].admin_token
        if token is not None:
            if not bearer_ok(request, token.get_secret_value()):
                return _json({"error": "admin token required (Authorization: Bearer)"}, 401)
            request[ADMITTED] = "token"
        elif write:
            if not (_loopback(request.remote) and _loopback_host(request.host)):
                return _json(
                    {
                        "error": "without an admin token, admin writes are accepted only from "
                        "this host; set GATEWAY_ADMIN_TOKEN (or admin_token in the config)"
                    },
                    403,
                )
            request[ADMITTED] = "loopback"
        return await handler(request)

    return guarded


def bearer_ok(request: web.Request, token: str) -> bool:
    """``Authorization: Bearer <token>`` (the scheme case-insensitive, RFC 7235), compared in
    constant time. A raw token without the scheme is refused."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def _loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def _loopback_host(host: str) -> bool:
    """The ``Host`` the caller asked for names this machine's loopback: a page on another name
    that resolves to 127.0.0.1 (DNS rebinding) is same-origin to itself, not to us."""
    if any(c in host for c in "@/?#\\"):
        return False
    try:
        name = URL(f"http://{host}").host or ""
    except ValueError:
        return False
    return name.lower() in LOOPBACK_NAMES or _loopback(name)


def _same_origin(request: web.Request) -> bool:
    """No ``Origin`` (a CLI, curl) or our own ``scheme://host``; anything else is a page."""
    origin = request.headers.get("Origin")
    return origin is None or origin == f"{request.scheme}://{request.host}"


def serving_problem(settings: Settings) -> str | None:
    """Why ``gateway serve`` must not start with these settings, or None."""
    if settings.admin_token is None:
        if not _loopback(settings.host) and settings.host.lower() not in LOOPBACK_NAMES:
            return (
                f"refusing to serve on {settings.host} without an admin token: anyone who can "
                "reach it could grant and end sessions. Set GATEWAY_ADMIN_TOKEN (or admin_token "
                "in the config file), or listen on 127.0.0.1."
            )
        if settings.metrics_auth:
            return (
                "metrics_auth needs an admin token: set GATEWAY_ADMIN_TOKEN (or admin_token in "
                "the config file)."
            )
    return None


def admin_app() -> web.Application:
    """The admin API, mounted at ``/gateway/``: every route but health and ready (for the
    liveness and readiness probes) behind ``admin_token``."""
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/degrade", admin_token(degrade_status))
    app.router.add_post("/degrade", admin_token(degrade, write=True))
    app.router.add_get("/sessions", admin_token(list_sessions))
    app.router.add_get("/sessions/{session_id}", admin_token(get_session))
    app.router.add_post("/sessions/{session_id}/grant", admin_token(grant, write=True))
    app.router.add_post("/sessions/{session_id}/end", admin_token(end, write=True))
    app.router.add_get("/policy", admin_token(policy))
    app.router.add_get("/budgets", admin_token(budgets))
    app.router.add_get("/calibration", admin_token(calibration))
    return app
