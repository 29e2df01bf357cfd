"""``create_app``: the one place that wires the gateway together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from functools import partial
from urllib.parse import urlparse

import aiohttp
from aiohttp import web
from opentelemetry.trace import TracerProvider

from gateway import admin, pipeline
from gateway.appkeys import (
    ADMIN_AUTH,
    AUDIT,
    AUTH,
    COMPACTOR,
    DEGRADED,
    DRAINING,
    HOSTS,
    HTTP,
    KEYRING,
    METRICS,
    POLICY,
    POOLS,
    REQUEST_LOG,
    SETTINGS,
    STARTED_AT,
    STORE,
    SUMMARIZERS,
    TOKENS,
    TRACING,
    UPSTREAMS,
)
from gateway.audit import AuditError, AuditLog
from gateway.auth.admin_auth import AdminAuth
from gateway.auth.authenticator import Authenticator
from gateway.auth.egress import egress_session
from gateway.auth.hosts import HostCheck
from gateway.auth.jwt import JwtVerifier
from gateway.auth.keyring import KeyRing
from gateway.auth.pepper import load_pepper
from gateway.auth.planes import add_route, undeclared
from gateway.auth.pools import CredentialPools
from gateway.compaction import Compactor
from gateway.compaction.summary import Summarizers
from gateway.policy import LivePolicy, prices
from gateway.resilience.breaker import Transition
from gateway.resilience.degraded import Change, Degradation
from gateway.secret import Secret
from gateway.settings import Settings
from gateway.state import ADMIN_TOKEN_FILE, read_or_create, state_dir
from gateway.store import SHARED_SCHEMES, Retention, Store, open_store
from gateway.telemetry.logs import RequestLog
from gateway.telemetry.loop_lag import LagWatch, watch_loop_lag
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.scrape import metrics_endpoint
from gateway.telemetry.tracing import Tracing, export_watch
from gateway.tokens import TokenCounter
from gateway.upstream import Upstreams, client_session

log = logging.getLogger("gateway.app")


def create_app(
    settings: Settings | None = None,
    store: Store | None = None,
    tracer_provider: TracerProvider | None = None,
) -> web.Application:
    """A gateway application. ``store`` overrides ``settings.store`` (tests share one);
    ``tracer_provider`` traces this app's calls (else the ``OTEL_*`` variables decide)."""
    settings = settings or Settings()
    # No middleware: the LLM path answers its own errors in the provider's shape (pipeline),
    # and the admin API is a sub-application with its own.
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        # Bodies are decoded by the pipeline (gateway.body), bounded and in the provider's
        # error shape; header lines past max_header_bytes are refused by the parser.
        handler_args={
            "auto_decompress": False,
            "max_line_size": settings.max_header_bytes,
            "max_field_size": settings.max_header_bytes,
            # After an early answer (408, 413) the rest of a body is read and dropped this
            # long before the connection closes (aiohttp's default is 10 s).
            "lingering_time": 2.0,
            # An idle keep-alive connection holds a slot of max_client_connections: close it
            # after this long (aiohttp's own default is an hour; run_app used 75 s).
            "keepalive_timeout": 75.0,
        },
    )
    app[SETTINGS] = settings
    app[STARTED_AT] = time.time()
    app[TOKENS] = TokenCounter()
    app[COMPACTOR] = Compactor(app[TOKENS].count_item, app[TOKENS].count_items)
    app[STORE] = (
        store
        if store is not None
        else open_store(settings.store, store_summaries=settings.store_summaries)
    )
    app[STORE].retention = Retention(settings.retention.ended, settings.retention.idle)
    app[METRICS] = Metrics()
    app[AUDIT] = AuditLog(
        settings.audit_log, on_failure=lambda: app[METRICS].audit_write_failures.inc(())
    )
    app[POLICY] = LivePolicy(settings.policy, app[AUDIT], settings.policy_poll_interval)
    app[METRICS].watch_policy(app[POLICY])
    app[METRICS].watch_store(app[STORE])
    app[TRACING] = Tracing(tracer_provider)
    app[REQUEST_LOG] = RequestLog()
    # Degraded mode: each change logged and audited (the gauge reads it when scraped); while
    # it holds, content capture and DEBUG records pause, summaries are skipped.
    app[DEGRADED] = Degradation(partial(_degradation_changed, app))
    app[TRACING].degraded = app[REQUEST_LOG].degraded = app[DEGRADED]
    app[TRACING].capture_teams = lambda: app[POLICY].policy.capture_teams
    app[DRAINING] = asyncio.Event()
    app[UPSTREAMS] = Upstreams.from_settings(settings, partial(_breaker_moved, app))
    app[SUMMARIZERS] = Summarizers(app[UPSTREAMS], app[DEGRADED])
    # Who may call: filled in at start-up (``_auth``), once the admin token, the key pepper
    # and the credential references are read.
    app[AUTH] = Authenticator(
        settings.auth.mode,
        None,
        team_pools=dict(settings.auth.team_pools),
        open_paths=tuple(settings.auth.open_paths),
    )
    app[ADMIN_AUTH] = AdminAuth()
    app[HOSTS] = HostCheck(settings.allowed_hosts, settings.host)
    app[METRICS].watch_upstreams(app[UPSTREAMS], app[DEGRADED], app[DRAINING])
    # Opened in this order, closed in reverse.
    app.cleanup_ctx.append(_request_log)
    app.cleanup_ctx.append(_tracing)
    app.cleanup_ctx.append(_audit)
    app.cleanup_ctx.append(_policy)
    app.cleanup_ctx.append(_tokenizer)
    app.cleanup_ctx.append(_prices)
    app.cleanup_ctx.append(_store)
    app.cleanup_ctx.append(_auth)
    app.cleanup_ctx.append(_upstream_session)
    app.cleanup_ctx.append(_loop_lag)
    app.cleanup_ctx.append(_span_export)
    app.add_subapp("/gateway/", admin.admin_app(auth_routes()))
    add_route(app, "GET", "/metrics", metrics_endpoint, plane="admin", scope="metrics:read")
    pipeline.add_routes(app)
    app.on_startup.insert(0, _routes_declared)  # before any cleanup context opens
    return app


async def _routes_declared(app: web.Application) -> None:
    """Every route says its plane and scope (``auth.planes``), or the app does not start."""
    if missing := undeclared(app):
        raise RuntimeError(f"routes without a plane and scope: {', '.join(missing)}")


def _breaker_moved(app: web.Application, moved: Transition) -> None:
    """A breaker changed state: counted, logged, audited (a control-plane change the
    gateway made itself)."""
    app[METRICS].breaker_transitions.inc((moved.breaker, moved.new))
    level = logging.WARNING if moved.new == "open" else logging.INFO
    log.log(level, "upstream %s breaker %s -> %s: %s", moved.breaker, moved.old, moved.new,
            moved.reason)  # fmt: skip
    app[AUDIT].record(
        "breaker", actor="system", upstream=moved.breaker, old=moved.old, new=moved.new,
        reason=moved.reason,
    )  # fmt: skip


def _degradation_changed(app: web.Application, change: Change) -> None:
    """Degraded mode entered (a warning) or left for one reason, and audited; a change by hand
    is audited by the admin API itself, with its caller, before it takes effect."""
    if change.on:
        log.warning("degraded (%s): %s", change.reason, change.detail)
    else:
        log.info("no longer degraded for %s: %s", change.reason, change.detail)
    if change.reason != "manual":
        app[AUDIT].record(
            "degraded", on=change.on, reason=change.reason, detail=change.detail,
            actor=change.actor,
        )  # fmt: skip


async def _tracing(app: web.Application) -> AsyncIterator[None]:
    """Tracing from the ``OTEL_*`` variables (if no provider was given); spans flushed at exit."""
    await app[TRACING].start()
    yield
    await app[TRACING].stop()


async def _audit(app: web.Application) -> AsyncIterator[None]:
    app[AUDIT].start()
    yield
    await asyncio.to_thread(app[AUDIT].stop)


async def _policy(app: web.Application) -> AsyncIterator[None]:
    """Load the policy (a bad file stops the start), then follow its file and SIGHUP."""
    live = app[POLICY]
    await live.load()
    watcher = asyncio.get_running_loop().create_task(live.watch())
    reloads: set[asyncio.Task[bool]] = set()

    def on_sighup() -> None:
        # The policy, and the upstream credentials (``_auth`` opens them after this).
        for reload in (live.reload("SIGHUP"), _reload_credentials(app)):
            task = asyncio.get_running_loop().create_task(reload)
            reloads.add(task)
            task.add_done_callback(reloads.discard)

    with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
    yield
    with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
    watcher.cancel()
    await asyncio.gather(watcher, *reloads, return_exceptions=True)


async def _reload_credentials(app: web.Application) -> bool:
    """SIGHUP: the credential references read again (audited first; a line that cannot be
    written leaves the credentials as they were)."""
    pools = app.get(POOLS)
    if pools is None:
        return False
    try:
        return (await pools.reload("SIGHUP")).ok
    except AuditError as exc:
        log.error("credentials not reloaded on SIGHUP: %s", exc)
        return False


async def _tokenizer(app: web.Application) -> AsyncIterator[None]:
    # Loading the rank tables takes about a second of CPU: not on the event loop.
    await asyncio.to_thread(app[TOKENS].load)
    yield


async def _prices(app: web.Application) -> AsyncIterator[None]:
    # The built-in price table (genai-prices, bundled): a quarter of a second of imports.
    await asyncio.to_thread(prices.load)
    yield


async def _store(app: web.Application) -> AsyncIterator[None]:
    store = app[STORE]
    # The store says when it falls behind (writes failing or lagging, reads failing) and
    # when it has caught up: the gateway is degraded for "store" in between.
    store.watch(partial(_store_trouble, app), app[SETTINGS].degraded.store_lag)
    await store.open()
    yield
    await store.close()


def _store_trouble(app: web.Application, detail: str | None) -> None:
    app[DEGRADED].set("store", detail is not None, detail or "store caught up", "system")


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    app[HTTP] = client_session(app[SETTINGS])
    yield
    await app[HTTP].close()


async def _request_log(app: web.Application) -> AsyncIterator[None]:
    """Request lines straight to the log writer thread when one runs (``gateway serve``)."""
    app[REQUEST_LOG].attach()
    yield
    app[REQUEST_LOG].detach()


async def _loop_lag(app: web.Application) -> AsyncIterator[None]:
    """The lag histogram, and degraded mode (``loop_lag``) while the lag stays past its bound."""
    watch = LagWatch(app[DEGRADED], app[SETTINGS].degraded.loop_lag)
    task = asyncio.get_running_loop().create_task(watch_loop_lag(app[METRICS], watch))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _span_export(app: web.Application) -> AsyncIterator[None]:
    """Degraded mode (``span_exporter``) while a span queue is full (tracing started before)."""
    watch = export_watch(app[TRACING], app[DEGRADED])
    if watch is None:
        yield
        return
    task = asyncio.get_running_loop().create_task(watch.run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def auth_routes() -> tuple[tuple[str, str, admin.Handler, str], ...]:
    """Admin routes of the security modules: gateway keys, upstream credentials."""
    from gateway.auth import keys_api, pools

    return (*keys_api.ROUTES, *pools.ROUTES)


async def _auth(app: web.Application) -> AsyncIterator[None]:
    """Who may call, read at start-up off the event loop: the admin token (configured, or
    generated into the state directory), the key ring (its pepper), the JWT issuers (their
    keys fetched through the egress guard), the upstream credential pools."""
    settings = app[SETTINGS]
    auth, admin_auth = app[AUTH], app[ADMIN_AUTH]
    token = settings.admin_token
    if token is None:
        directory = state_dir(settings.state_dir, settings.store)
        token = Secret(await asyncio.to_thread(read_or_create, directory, ADMIN_TOKEN_FILE))
    admin_auth.token = token
    auth.admin_token = token.reveal()
    metrics = app[METRICS]

    def egress() -> aiohttp.ClientSession:
        """A session through the egress guard, per JWKS refresh (rare): JWKS and discovery
        URLs are the identity provider's, not the operator's upstreams."""
        allowed = settings.auth.egress_allow
        return egress_session(allowed, on_block=lambda why: metrics.egress_blocked.inc((why,)))

    if settings.auth.jwt_issuers:
        auth.jwt = JwtVerifier(settings.auth.jwt_issuers, egress)
    if settings.auth.admin_issuers:
        admin_auth.oidc = JwtVerifier(settings.auth.admin_issuers, egress)
    pools = app[POOLS] = await CredentialPools.load(settings, audit=app[AUDIT])
    auth.pools = pools
    metrics.watch_pools(pools)
    if settings.auth.mode in ("keys", "mixed"):
        shared = urlparse(settings.store).scheme in SHARED_SCHEMES
        pepper = await asyncio.to_thread(
            load_pepper, settings, workers=settings.workers, shared_store=shared
        )
        names = lambda: {pool for _upstream, pool, _entry in pools.entry_names()}  # noqa: E731
        app[KEYRING] = auth.keys = KeyRing(app[STORE], pepper, settings.auth, pools=names)
        await auth.keys.load_declared()
    watcher = asyncio.get_running_loop().create_task(pools.watch())
    yield
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
