"""The HTTP server around the app: a cap on open connections, a deadline for request headers,
and the parser's own refusals in a shape both providers' SDKs read.

aiohttp answers what its parser refuses (a header line over ``max_header_bytes``, a malformed
request) before any route is known, in plain text. Agents and SDKs expect JSON errors, so the
answer here is one body that reads as either provider's error: Anthropic's
``{"type": "error", "error": {"type", "message"}}`` with OpenAI's ``param`` and ``code`` beside.

``GatewayRunner`` is ``web.AppRunner`` building a ``GatewayServer``; ``gateway serve`` and the
tests' servers run on it. It subclasses aiohttp's server and protocol classes (their
``_loop``, ``_kwargs``, ``_connections``, ``_request_count``, ``_request_in_progress`` and
``_task_handler`` are read): ``tests/test_server.py`` fails if an aiohttp release changes them.

A stop (``serve``, on SIGTERM or SIGINT) is logged when it begins and when it ends, and
audited: ``app[DRAINING]`` is set first (``/gateway/ready`` answers not-ready from then on),
then the server stops accepting connections, closes those with no request being handled and
waits up to ``drain_timeout`` for the requests in flight. What is still running then is cut:
its handler task is cancelled, so the pipeline's ``finally`` accounts the turn as far as it got
(outcome ``drain_cut``, the output estimated) while the store is still open, and the client
sees its connection close (never an answer that looks whole). Only then does the app close:
the store's last writes, the spans and the audit log are flushed by its cleanup contexts.
A second signal ends the wait at once.

``serve`` binds its host and port itself, or serves ``Listeners`` bound already (``gateway
serve`` binds first, so a port in use is said before anything starts; with ``--workers`` the
parent binds and each worker serves its own, ``gateway.workers``). A worker's own metrics
listener is a second ``GatewayServer`` over the same app that passes on only ``GET /metrics``
and the probes: a filter there, not on the main listener, costs the LLM path nothing.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

from gateway.appkeys import AUDIT, DRAINING, SETTINGS

log = logging.getLogger("gateway.server")

RETRY_AFTER = 1
DRAIN_POLL = 0.02
"""How often a stop looks whether the requests in flight have ended (only while stopping)."""
CUT_GRACE = 1.0
"""How long a request cut at the drain deadline has to unwind (its turn accounted, its request
logged) before the app's resources close."""


def error_body(kind: str, message: str, code: str) -> bytes:
    """An error both SDKs parse: the path (and so the provider) is unknown at this point."""
    error = {"type": kind, "message": message, "param": None, "code": code}
    return orjson.dumps({"type": "error", "error": error})


def _busy_answer(limit: int) -> bytes:
    body = error_body(
        "overloaded_error",
        f"The gateway has {limit} open connections, its limit (max_client_connections):"
        " retry shortly.",
        "too_many_connections",
    )
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Retry-After: {RETRY_AFTER}\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class GatewayProtocol(RequestHandler):
    """One client connection: closed if its first request's headers take longer than
    ``headers_timeout``; parser refusals answered as JSON."""

    headers_timeout = 30.0

    def refuse(self) -> None:
        """Read nothing more, and close after what was written once ``start`` has begun:
        closing inside ``connection_made`` left ``start`` to fail on Python 3.11 (a traceback
        per refusal)."""
        if self.transport is not None:
            self.transport.pause_reading()
        asyncio.get_running_loop().call_soon(self.force_close)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        loop = asyncio.get_running_loop()
        self._headers_timer: asyncio.TimerHandle | None = loop.call_later(
            self.headers_timeout, self._headers_too_slow
        )

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        # One timer per connection, not cancelled per request (that would cost every request
        # a call): when it fires, a connection that has sent a whole request is left alone.
        self._headers_timer = None
        if not self._request_count:
            self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the response had begun: nothing more can be sent")
        if isinstance(exc, LineTooLong):
            status, text = 431, "A request header (or the request line) is too large"
            code = "request_header_fields_too_large"
        elif status == 500:
            text, code = "The gateway failed on this request.", "internal_error"
        else:
            text, code = "The request is not valid HTTP", "bad_http_request"
        # One line, no traceback: the sender's bytes are not the gateway's fault.
        log.info("refused a request from %s: %s (%s)", request.remote, status, type(exc).__name__)
        kind = "api_error" if status >= 500 else "invalid_request_error"
        response = web.Response(
            status=status,
            body=error_body(kind, f"{text} ({status}).", code),
            content_type="application/json",
        )
        response.force_close()
        return response


@dataclass(frozen=True, slots=True)
class Listeners:
    """Listening sockets bound before the app starts, served as they are."""

    main: tuple[socket.socket, ...]
    """The gateway's own (``host``, ``port``): one per address the host resolves to."""
    admin: tuple[socket.socket, ...] = ()
    """The admin listener's (``admin_host``, ``admin_port``), when there is one."""
    metrics: tuple[socket.socket, ...] = ()
    """A worker's own metrics listener (``--workers``: ``worker_metrics_port`` + its index),
    which answers only ``GET /metrics`` and the probes."""


METRICS_PATHS = frozenset({"/metrics", "/gateway/health", "/gateway/ready"})
"""What a worker's metrics listener passes on to the app."""
METRICS_CONNECTIONS = 64
"""Open connections a worker's metrics listener holds at most (a scraper needs one or two)."""


@dataclass(slots=True)
class Drain:
    """What a stop did with the requests in flight when it began."""

    in_flight: int = 0
    finished: int = 0
    cut: int = 0


class GatewayServer(web.Server):
    """Makes ``GatewayProtocol``s, refuses connections past ``max_connections``, and on a stop
    drains the requests in flight, counting them (``drain``)."""

    def __init__(self, *args: Any, max_connections: int, headers_timeout: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_connections = max_connections
        self.headers_timeout = headers_timeout
        self.open = 0
        self.refused = 0
        self.drain: Drain | None = None
        """Set by ``shutdown``."""
        self.hurry = asyncio.Event()
        """Set by a second stop signal: the drain ends now, what is in flight is cut."""
        self._busy = _busy_answer(max_connections)

    def in_flight(self) -> list[RequestHandler]:
        """The connections whose request is being handled now (a stream being relayed counts
        until its last byte)."""
        return [handler for handler in self._connections if handler._request_in_progress]

    def pre_shutdown(self) -> None:
        """Close every connection that has no request being handled. aiohttp closes the idle
        keep-alive ones; this also closes one still reading the rest of a body after an early
        answer (413, 408), which aiohttp lets linger ``lingering_time`` (2 s here) and a stop
        then waited for: the answer was written, nothing is lost."""
        super().pre_shutdown()
        for handler in list(self._connections):
            if not handler._request_in_progress:
                handler.force_close()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's)
        """Wait up to ``timeout`` for the requests in flight to end, then cut what is left and
        give it ``CUT_GRACE`` to unwind.

        A cut cancels the connection's task, which cancels the request's handler: the
        pipeline's ``finally`` then ends the turn with what was seen (``drain_cut``) and the
        connection is closed. Closing the connection alone left the handler running (aiohttp
        does not cancel handlers when a connection closes), to be ended by the upstream
        session's close or the loop's end, after the store had closed: its turn was lost.

        It polls: a stop happens once, and being told of each request's end would cost every
        request a callback."""
        # The tasks now: a connection that closes during the wait forgets its own.
        tasks = {handler: handler._task_handler for handler in self.in_flight()}
        drain = self.drain = Drain(in_flight=len(tasks))
        waiting = await _until_ended(list(tasks), timeout, self.hurry)
        drain.cut = len(waiting)
        drain.finished = drain.in_flight - drain.cut
        for handler in waiting:
            task = tasks[handler]
            if task is not None:
                task.cancel("cut at the drain deadline")
            else:
                handler.force_close()
        await _until_ended(waiting, CUT_GRACE)
        await super().shutdown(CUT_GRACE)

    def __call__(self) -> RequestHandler:
        protocol = GatewayProtocol(self, loop=self._loop, **self._kwargs)
        protocol.headers_timeout = self.headers_timeout
        return protocol

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.open += 1
        if self.open > self.max_connections:
            # Answered before reading anything: the cap protects the process, and a client
            # told 503 with Retry-After comes back (agents retry it).
            self.refused += 1
            transport.write(self._busy)
            if isinstance(handler, GatewayProtocol):
                handler.refuse()
            else:
                handler.force_close()

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self.open -= 1
        super().connection_lost(handler, exc)


async def _until_ended(
    handlers: list[RequestHandler], seconds: float | None, hurry: asyncio.Event | None = None
) -> list[RequestHandler]:
    """Wait up to ``seconds`` (None: for ever), or until ``hurry`` is set, for these
    connections' requests to end; the ones still running."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (seconds or 0.0)
    while handlers and (seconds is None or loop.time() < deadline):
        if hurry is not None and hurry.is_set():
            break
        await asyncio.sleep(DRAIN_POLL)
        handlers = [handler for handler in handlers if handler._request_in_progress]
    return handlers


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose server is a ``GatewayServer`` set from the app's settings."""

    async def cleanup(self) -> None:
        """Stop: ``DRAINING`` first (``serve`` sets it on the signal already; a test server's
        close comes here), then aiohttp's order: the listening sockets closed, idle
        connections closed, ``on_shutdown``, the drain (``GatewayServer.shutdown``), and last
        the app's cleanup contexts."""
        self.app[DRAINING].set()
        await super().cleanup()

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        settings = self.app[SETTINGS]
        return GatewayServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            loop=plain._loop,
            max_connections=settings.max_client_connections,
            headers_timeout=settings.timeouts.client_body,
            **plain._kwargs,
        )


async def metrics_listener(
    runner: GatewayRunner, sockets: tuple[socket.socket, ...]
) -> web.BaseRunner:
    """A listener on ``sockets`` for ``GET /metrics`` and the probes of ``runner``'s app (the
    same app, its own counters, its own auth rules), refusing every other path: Prometheus
    scrapes each worker there. Started; the caller cleans it up."""
    main = runner.server
    assert main is not None, "the app's runner is set up first"
    app_handler = main.request_handler

    async def only_metrics(request: web.BaseRequest) -> web.StreamResponse:
        if request.rel_url.raw_path not in METRICS_PATHS:
            message = (
                "not found: this listener serves GET /metrics, /gateway/health, /gateway/ready"
            )
            return web.json_response({"error": message}, status=404)
        if request.method != "GET":
            return web.json_response({"error": "method not allowed: GET only"}, status=405)
        return await app_handler(request)

    server = GatewayServer(
        only_metrics,
        request_factory=main.request_factory,
        loop=main._loop,
        max_connections=METRICS_CONNECTIONS,
        headers_timeout=runner.app[SETTINGS].timeouts.client_body,
        **main._kwargs,
    )
    metrics = web.ServerRunner(server, shutdown_timeout=CUT_GRACE)
    await metrics.setup()
    for sock in sockets:
        await web.SockSite(metrics, sock).start()
    return metrics


async def serve(
    app: web.Application, host: str, port: int, listeners: Listeners | None = None
) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, then drain and close it (``gateway serve``): on
    ``host`` and ``port`` (and the admin listener), or on ``listeners`` bound already."""
    drain_timeout = app[SETTINGS].drain_timeout
    runner = GatewayRunner(app, access_log=None, shutdown_timeout=drain_timeout)
    await runner.setup()
    received: list[signal.Signals] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        if stop.is_set() and isinstance(server, GatewayServer):
            # A second signal while draining (an impatient Ctrl-C): cut what is in flight now,
            # but still close the app (the store's last writes, the turns' accounting).
            log.warning("%s again: cutting the drain short", sig.name)
            server.hurry.set()
        # Not ready from the first moment, before anything stops: /gateway/ready answers 503
        # on the connections still open while the calls drain.
        app[DRAINING].set()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    server = runner.server
    metrics: web.BaseRunner | None = None
    try:
        settings = app[SETTINGS]
        if listeners is None:
            await web.TCPSite(runner, host, port).start()
            if settings.admin_host is not None:  # the admin API on a listener of its own
                await web.TCPSite(runner, settings.admin_host, settings.admin_port).start()
        else:
            for sock in (*listeners.main, *listeners.admin):
                await web.SockSite(runner, sock).start()
            if listeners.metrics:
                metrics = await metrics_listener(runner, listeners.metrics)
        await stop.wait()
        in_flight = len(server.in_flight()) if isinstance(server, GatewayServer) else 0
        log.info(
            "shutting down on %s: no new connections; %s in flight, given up to %gs to end",
            received[0].name,
            _requests(in_flight),
            drain_timeout,
            extra={"in_flight": in_flight, "drain_timeout": drain_timeout},
        )
        app[AUDIT].record(
            "shutdown",
            actor="system",
            reason=f"{received[0].name} received",
            in_flight=in_flight,
            drain_timeout=drain_timeout,
        )
    finally:
        started = loop.time()
        try:
            if metrics is not None:  # closed as the main listener is: the app closes next
                await metrics.cleanup()
            await runner.cleanup()  # the drain: the handlers stay, for a second signal
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    drain = server.drain if isinstance(server, GatewayServer) else None
    drain = drain or Drain()
    log.info(
        "shut down in %.2fs: %s drained (%d finished, %d cut at the %gs limit)",
        loop.time() - started,
        _requests(drain.in_flight),
        drain.finished,
        drain.cut,
        drain_timeout,
        extra={"in_flight": drain.in_flight, "finished": drain.finished, "cut": drain.cut},
    )


def _requests(n: int) -> str:
    return "1 request" if n == 1 else f"{n} requests"
