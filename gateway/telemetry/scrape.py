"""``GET /metrics``: the app's registry, as Prometheus text or OpenMetrics (with exemplars).

Wired in ``app.py`` beside the other routes. A scrape first reads what the collectors show
from the store (budgets, gateway keys) and, on a worker thread, from /proc (the process
families).
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

from gateway.admin import guard
from gateway.appkeys import HOSTS, KEYRING, METRICS, SETTINGS, STORE
from gateway.auth.hosts import loopback_address
from gateway.auth.planes import listener_port


async def metrics_endpoint(request: web.Request) -> web.StreamResponse:
    """``GET /metrics``: Prometheus text, or OpenMetrics (with exemplars) when asked for.
    With ``metrics_auth``, only for an admin-plane caller with ``metrics:read`` (the admin
    token, or an OIDC token of a role that holds it)."""
    app = request.app
    settings = app[SETTINGS]
    if settings.admin_host is not None and listener_port(request) not in settings.admin_ports:
        return web.Response(status=404, text="not found: /metrics is on the admin listener\n")
    listener = settings.admin_host if settings.admin_host is not None else settings.host
    if settings.metrics_auth or not loopback_address(listener):
        return await _guarded(request)
    if not app[HOSTS].allows(request.host):  # open on loopback, but not to a rebound name
        return web.Response(status=400, text="this Host is not allowed (allowed_hosts)\n")
    return await scrape(request)


KEYS_FRESH = 10.0
"""Seconds the key gauges' records are reused between scrapes: with thousands of keys,
reading them all is work a scraper should not be able to ask for at will."""


async def scrape(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    metrics.budgets.counters = await request.app[STORE].budgets()
    ring = request.app.get(KEYRING)
    if ring is not None and (
        ring.changes != metrics.keys.changes or time.monotonic() - metrics.keys.read_at > KEYS_FRESH
    ):  # read again after a change here, else at most every KEYS_FRESH (another replica's)
        metrics.keys.records = await ring.list(None)
        metrics.keys.read_at, metrics.keys.changes = time.monotonic(), ring.changes
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
