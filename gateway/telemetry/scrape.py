"""``GET /metrics``: the app's registry, as Prometheus text or OpenMetrics (with exemplars).

Wired in ``app.py`` beside the other routes. A scrape first reads what the collectors show
from the store (budgets) and, on a worker thread, from /proc (the process families).
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

from gateway.admin import bearer_ok
from gateway.appkeys import METRICS, SETTINGS, STORE


async def metrics_endpoint(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text, or OpenMetrics (with exemplars) when asked for.
    With ``metrics_auth``, only for ``Authorization: Bearer <admin token>``."""
    settings = request.app[SETTINGS]
    if settings.metrics_auth:
        token = settings.admin_token
        if token is None or not bearer_ok(request, token.get_secret_value()):
            return web.Response(
                status=401,
                text="metrics_auth is on: send Authorization: Bearer <admin token>\n",
                headers={"WWW-Authenticate": "Bearer"},
            )
    metrics = request.app[METRICS]
    metrics.budgets.counters = await request.app[STORE].budgets()
    metrics.process.latest = await asyncio.to_thread(metrics.process.sample)
    registry = metrics.registry
    accept = request.headers.get("Accept", "")
    if "application/openmetrics-text" in accept:
        body = openmetrics.generate_latest(registry)  # type: ignore[no-untyped-call]
        content_type = openmetrics.CONTENT_TYPE_LATEST
    else:
        body, content_type = generate_latest(registry), CONTENT_TYPE_LATEST
    return web.Response(body=body, headers={"Content-Type": content_type})
