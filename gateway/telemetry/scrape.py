"""``GET /metrics``: the app's registry, as Prometheus text or OpenMetrics (with exemplars).

Wired in ``app.py`` beside the other routes. A scrape first reads what the collectors show
from the store (budgets, gateway keys) and, on a worker thread, from /proc (the process
families).
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

from gateway.admin import guard
from gateway.appkeys import KEYRING, METRICS, SETTINGS, STORE


async def metrics_endpoint(request: web.Request) -> web.StreamResponse:
    """``GET /metrics``: Prometheus text, or OpenMetrics (with exemplars) when asked for.
    With ``metrics_auth``, only for an admin-plane caller with ``metrics:read`` (the admin
    token, or an OIDC token of a role that holds it)."""
    if request.app[SETTINGS].metrics_auth:
        return await _guarded(request)
    return await scrape(request)


async def scrape(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    metrics.budgets.counters = await request.app[STORE].budgets()
    if KEYRING in request.app:  # keys and mixed modes
        metrics.keys.records = await request.app[KEYRING].list(None)
    metrics.process.latest = await asyncio.to_thread(metrics.process.sample)
    registry = metrics.registry
    accept = request.headers.get("Accept", "")
    if "application/openmetrics-text" in accept:
        body = openmetrics.generate_latest(registry)  # type: ignore[no-untyped-call]
        content_type = openmetrics.CONTENT_TYPE_LATEST
    else:
        body, content_type = generate_latest(registry), CONTENT_TYPE_LATEST
    return web.Response(body=body, headers={"Content-Type": content_type})


_guarded = guard(scrape, "metrics:read", any_host=True)
