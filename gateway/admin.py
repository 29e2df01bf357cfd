"""The admin API under ``/gateway/``: health and sessions, as JSON."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import orjson
from aiohttp import web

from gateway import __version__
from gateway.appkeys import AUDIT, COMPACTOR, POLICY, SETTINGS, STARTED_AT, STORE
from gateway.store import Grant, SessionQuery, SessionRecord

MAX_PAGE = 500
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def session_json(record: SessionRecord, now: float) -> dict[str, Any]:
    data = record.to_json()
    # A rewrite holds a summary of the conversation: prompt content, not for the admin API.
    data["context_rewrites"] = [
        {key: rewrite[key] for key in ("digest", "count", "strategies", "at", "summary_model")}
        for rewrite in record.context_rewrites
    ]
    data["idle_seconds"] = round(max(0.0, now - record.last_seen), 3)
    return data


async def health(request: web.Request) -> web.Response:
    uptime = time.time() - request.config_dict[STARTED_AT]
    return _json({"status": "ok", "version": __version__, "uptime_seconds": round(uptime, 3)})


async def list_sessions(request: web.Request) -> web.Response:
    params = request.rel_url.query
    try:
        query = SessionQuery(
            agent=params.get("agent") or None,
            status=params.get("status") or None,
            since=_float(params.get("since")),
            before=_float(params.get("before")),
            limit=min(int(params.get("limit", "50")), MAX_PAGE),
        )
    except ValueError as exc:
        return _json({"error": f"bad query: {exc}"}, status=400)
    records = await request.config_dict[STORE].find(query)
    now = time.time()
    next_cursor = records[-1].last_seen if len(records) == query.limit else None
    return _json({"sessions": [session_json(r, now) for r in records], "next_before": next_cursor})


async def get_session(request: web.Request) -> web.Response:
    record = await request.config_dict[STORE].get(request.match_info["session_id"])
    if record is None:
        return _json({"error": "no such session"}, status=404)
    return _json(session_json(record, time.time()))


async def grant(request: web.Request) -> web.Response:
    """``{"turns": 50, "tokens": 0, "reason": "...", "by": "alice"}``: more for a session."""
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    try:
        turns, tokens = int(body.get("turns", 0)), int(body.get("tokens", 0))
    except (TypeError, ValueError):
        return _json({"error": "turns and tokens must be whole numbers"}, status=400)
    if turns < 0 or tokens < 0 or turns + tokens == 0:
        return _json({"error": "grant a positive number of turns and/or tokens"}, status=400)
    by, reason = _operator(request, body), str(body.get("reason", ""))[:500]
    session_id = request.match_info["session_id"]
    given = Grant(turns=turns, tokens=tokens, by=by, reason=reason, at=time.time())
    record = await request.config_dict[STORE].grant(session_id, given)
    if record is None:
        return _json({"error": "no such session"}, status=404)
    request.config_dict[AUDIT].record(
        "grant", session=session_id, turns=turns, tokens=tokens, by=by, reason=reason
    )
    return _json(session_json(record, time.time()))


async def end(request: web.Request) -> web.Response:
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    by, reason = _operator(request, body), str(body.get("reason", ""))[:500]
    session_id = request.match_info["session_id"]
    why = f"by {by}: {reason}" if reason else f"by {by}"
    record = await request.config_dict[STORE].set_status(session_id, "ended", why)
    if record is None:
        return _json({"error": "no such session"}, status=404)
    request.config_dict[AUDIT].record("session_end", session=session_id, by=by, reason=reason)
    return _json(session_json(record, time.time()))


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
    """Who acts: the body's ``by``, else ``X-Gateway-Operator``, else "admin"."""
    by = body.get("by") or request.headers.get("X-Gateway-Operator") or "admin"
    return str(by)[:120]


async def calibration(request: web.Request) -> web.Response:
    """Per model: how the provider's input counts compare with the gateway's estimates."""
    models = request.config_dict[COMPACTOR].calibration.to_json()
    return _json({"models": models})


def _float(value: str | None) -> float | None:
    return float(value) if value else None


def admin_token(handler: Handler) -> Handler:
    """With ``GATEWAY_ADMIN_TOKEN`` set, the route needs it as a bearer.

    A wrapper per route, not a middleware: a sub-application's middleware makes aiohttp build
    a middleware chain for every request of the whole app, the LLM path included."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        token = request.config_dict[SETTINGS].admin_token
        if token is not None:
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
                return _json({"error": "admin token required"}, status=401)
        return await handler(request)

    return guarded


def admin_app() -> web.Application:
    """The admin API, mounted at ``/gateway/``: every route but health (for liveness probes)
    behind ``admin_token``."""
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/sessions", admin_token(list_sessions))
    app.router.add_get("/sessions/{session_id}", admin_token(get_session))
    app.router.add_post("/sessions/{session_id}/grant", admin_token(grant))
    app.router.add_post("/sessions/{session_id}/end", admin_token(end))
    app.router.add_get("/policy", admin_token(policy))
    app.router.add_get("/budgets", admin_token(budgets))
    app.router.add_get("/calibration", admin_token(calibration))
    return app
