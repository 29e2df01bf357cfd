"""``create_app``: the one place that wires the gateway together."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator

from aiohttp import web
from opentelemetry.trace import TracerProvider

from gateway import admin, pipeline
from gateway.appkeys import (
    AUDIT,
    COMPACTOR,
    HTTP,
    METRICS,
    POLICY,
    REQUEST_LOG,
    SETTINGS,
    STARTED_AT,
    STORE,
    TOKENS,
    TRACING,
    UPSTREAMS,
)
from gateway.audit import AuditLog
from gateway.compaction import Compactor
from gateway.policy import LivePolicy, prices
from gateway.settings import Settings
from gateway.store import Store, open_store
from gateway.telemetry.logs import RequestLog
from gateway.telemetry.loop_lag import watch_loop_lag
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.scrape import metrics_endpoint
from gateway.telemetry.tracing import Tracing
from gateway.tokens import TokenCounter
from gateway.upstream import Upstreams, client_session


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
    app[UPSTREAMS] = Upstreams.from_settings(settings)
    app[STARTED_AT] = time.time()
    app[TOKENS] = TokenCounter()
    app[COMPACTOR] = Compactor(app[TOKENS].count_item, app[TOKENS].count_items)
    app[STORE] = store if store is not None else open_store(settings.store)
    app[AUDIT] = AuditLog(settings.audit_log)
    app[POLICY] = LivePolicy(settings.policy, app[AUDIT], settings.policy_poll_interval)
    app[METRICS] = Metrics()
    app[METRICS].watch_policy(app[POLICY])
    app[METRICS].watch_store(app[STORE])
    app[TRACING] = Tracing(tracer_provider)
    app[REQUEST_LOG] = RequestLog()
    # Opened in this order, closed in reverse.
    app.cleanup_ctx.append(_request_log)
    app.cleanup_ctx.append(_tracing)
    app.cleanup_ctx.append(_audit)
    app.cleanup_ctx.append(_policy)
    app.cleanup_ctx.append(_tokenizer)
    app.cleanup_ctx.append(_prices)
    app.cleanup_ctx.append(_store)
    app.cleanup_ctx.append(_upstream_session)
    app.cleanup_ctx.append(_loop_lag)
    app.add_subapp("/gateway/", admin.admin_app())
    app.router.add_get("/metrics", metrics_endpoint)
    pipeline.add_routes(app)
    return app


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
        task = asyncio.get_running_loop().create_task(live.reload("SIGHUP"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
    yield
    with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
    watcher.cancel()
    await asyncio.gather(watcher, *reloads, return_exceptions=True)


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
    await store.open()
    yield
    await store.close()


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
    task = asyncio.get_running_loop().create_task(watch_loop_lag(app[METRICS]))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
