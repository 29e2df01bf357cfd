"""The admin API under ``/gateway/``: health and sessions, as JSON."""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from gateway import __version__
from gateway.appkeys import STARTED_AT, STORE
from gateway.store import SessionQuery, SessionRecord

MAX_PAGE = 500


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def session_json(record: SessionRecord, now: float) -> dict[str, Any]:
    data = record.to_json()
    data["idle_seconds"] = round(max(0.0, now - record.last_seen), 3)
    return data


async def health(request: web.Request) -> web.Response:
    uptime = time.time() - request.app[STARTED_AT]
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
    records = await request.app[STORE].find(query)
    now = time.time()
    next_cursor = records[-1].last_seen if len(records) == query.limit else None
    return _json({"sessions": [session_json(r, now) for r in records], "next_before": next_cursor})


async def get_session(request: web.Request) -> web.Response:
    record = await request.app[STORE].get(request.match_info["session_id"])
    if record is None:
        return _json({"error": "no such session"}, status=404)
    return _json(session_json(record, time.time()))


def _float(value: str | None) -> float | None:
    return float(value) if value else None


def add_routes(app: web.Application) -> None:
    app.router.add_get("/gateway/health", health)
    app.router.add_get("/gateway/sessions", list_sessions)
    app.router.add_get("/gateway/sessions/{session_id}", get_session)
