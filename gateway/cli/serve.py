"""``gateway serve`` and ``gateway fake-provider``: the two commands that run a server. Their
modules (aiohttp, the app, the store, the tokenizer) are imported when the command runs, not
before: the other commands start with the standard library only."""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.cli.arguments import command, positive

if TYPE_CHECKING:
    from gateway.server import Listeners
    from gateway.settings import Settings


def add_commands(commands: Any) -> None:
    serve = command(
        commands,
        "serve",
        "run the gateway",
        "Run the gateway in the foreground until SIGINT (Ctrl-C) or SIGTERM; it then turns\n"
        "not-ready, stops accepting connections, lets the calls in flight finish\n"
        "(drain_timeout, 30 s; a second signal cuts them at once), accounts what it cut,\n"
        "writes the store, spans and audit log, and exits 0.\n"
        "Every setting is also read from the config file and GATEWAY_* variables\n"
        "('gateway config reference' lists them).\n"
        "\n"
        "--workers N runs N gateway processes on the one port (the kernel spreads the\n"
        "connections), on a store they share (--store redis://host:6379/0). Each counts its\n"
        "own metrics: worker i also serves GET /metrics and the probes on\n"
        "worker_metrics_port + i (default port + 100 + i); scrape every one of them, since\n"
        "/metrics on the main port answers for whichever worker took the connection.\n"
        "Signals go to the parent, which passes them on (SIGHUP too) and restarts a worker\n"
        "that dies; under systemd use KillMode=mixed.",
    )
    serve.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="listen port (default 8787)")
    serve.add_argument("--config", type=Path, default=None, help="the gateway's YAML config file")
    serve.add_argument(
        "--workers",
        type=positive,
        default=None,
        metavar="N",
        help="gateway processes serving the port together (default 1; more need a shared"
        " store: redis://)",
    )
    serve.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="session store: sqlite:///gateway.db (the default), memory://, or"
        " redis://host:6379/0 (shared by workers and replicas)",
    )
    serve.add_argument(
        "--policy",
        type=Path,
        default=None,
        help="policy file (YAML; default: the packaged policies/default.yaml)",
    )
    serve.add_argument(
        "--allow-network-passthrough",
        action="store_true",
        default=None,
        help="serve passthrough mode on a non-loopback address: anyone who reaches the gateway"
        " uses it with whatever provider key they hold (default: refused; use gateway keys)",
    )
    serve.set_defaults(run=_serve)

    # main() hands "gateway fake-provider ..." to the fake provider's own parser; this entry
    # only lists it here.
    commands.add_parser(
        "fake-provider",
        help="run the offline fake LLM provider ('gateway fake-provider --help' for its options)",
        add_help=False,
        description="Run the offline fake LLM provider.",
    )


def _serve(args: argparse.Namespace) -> int:
    from gateway.admin import serving_problem
    from gateway.auth.pepper import PepperMissing, load_pepper
    from gateway.settings import load_settings
    from gateway.store import display_url, store_url_problem
    from gateway.workers import ListenError, Sockets, Supervisor, store_problem

    try:
        settings = load_settings(
            args.config,
            host=args.host,
            port=args.port,
            store=args.store,
            policy=args.policy,
            allow_network_passthrough=args.allow_network_passthrough,
            workers=args.workers,
        )
    except Exception as exc:  # a bad file, variable or flag: said, not a traceback
        print(f"gateway: the configuration is refused, not starting: {exc}", file=sys.stderr)
        if args.config is not None:
            print(f"  (gateway config check {args.config} says where)", file=sys.stderr)
        return 2
    problem = (
        serving_problem(settings) or store_url_problem(settings.store) or store_problem(settings)
    )
    if problem is not None:
        print(f"gateway: {problem}", file=sys.stderr)
        return 2
    if settings.workers > 1 and settings.auth.mode in ("keys", "mixed"):
        try:  # said once here, not by every worker
            load_pepper(settings, workers=settings.workers)
        except PepperMissing as exc:
            print(f"gateway: not starting: {exc}", file=sys.stderr)
            return 2
    # Bound before anything starts: a port in use is said once, and nothing has run.
    sockets = Sockets(settings)
    try:
        first = sockets.bind_all()
    except ListenError as exc:
        print(f"gateway: not starting: {exc}", file=sys.stderr)
        return 1
    port = first[0].main[0].getsockname()[1]
    workers = ""
    if settings.workers > 1:
        ports = [listeners.metrics[0].getsockname()[1] for listeners in first]
        workers = f" ({settings.workers} workers, their metrics on ports {_ports(ports)})"
    print(
        f"gateway on http://{settings.host}:{port}{workers}"
        f"  openai -> {settings.upstreams['openai'].url}"
        f"  anthropic -> {settings.upstreams['anthropic'].url}"
        f"  store {display_url(settings.store)}",
        flush=True,
    )
    if settings.workers == 1:
        return _run_gateway(settings, first[0])
    _parent_logging(settings)
    return Supervisor(settings, sockets, partial(_worker, settings)).run(first)


def _worker(
    settings: Settings, index: int, listeners: Listeners, started: Callable[[], None]
) -> int:
    """One worker of ``--workers``, in its own process."""
    from gateway.workers import worker_settings

    return _run_gateway(worker_settings(settings, index), listeners, index, started)


def _run_gateway(
    settings: Settings,
    listeners: Listeners,
    worker: int | None = None,
    started: Callable[[], None] | None = None,
) -> int:
    """One gateway in this process until it is stopped; its exit status."""
    import asyncio
    import logging

    from gateway.app import create_app
    from gateway.auth.pepper import PepperMissing
    from gateway.auth.pools import CredentialReferenceError
    from gateway.policy import PolicyError
    from gateway.server import serve
    from gateway.store import StoreRefused
    from gateway.telemetry import logs
    from gateway.workers import WorkerTag

    listener = logs.configure(settings.log_level, settings.log_format)
    if worker is not None:
        for handler in logging.getLogger().handlers:
            handler.addFilter(WorkerTag(worker))
    _install_uvloop()
    try:
        try:
            app = create_app(settings)
        except ValueError as exc:  # the store's URL, read when the app is made
            print(f"gateway: not starting: {exc}", file=sys.stderr)
            return 2
        app.on_startup.append(_tune_gc)
        if started is not None:
            app.on_startup.append(partial(_started, started))
        asyncio.run(serve(app, settings.host, settings.port, listeners))
    except PolicyError as exc:  # the policy file at start: its problems, not a traceback
        print(f"gateway: policy refused, not starting:\n{exc}", file=sys.stderr)
        return 1
    except (PepperMissing, CredentialReferenceError, StoreRefused) as exc:  # said, not raised
        print(f"gateway: not starting: {exc}", file=sys.stderr)
        return 2
    finally:
        listener.stop()
    return 0


async def _started(started: Callable[[], None], app: object) -> None:
    """The app's last start-up step: the worker tells the parent it serves."""
    started()


def _parent_logging(settings: Settings) -> None:
    """The parent's few lines (workers started, ended, restarted), in the workers' format,
    written at once: it has no event loop to keep free, and must start no thread before it
    forks."""
    import logging

    from gateway.telemetry.logs import JSONFormatter, TextFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if settings.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())


def _ports(ports: list[int]) -> str:
    if ports == list(range(ports[0], ports[0] + len(ports))):
        return f"{ports[0]}-{ports[-1]}"
    return ", ".join(map(str, ports))


def fake_provider(options: list[str]) -> int:
    """``gateway fake-provider OPTIONS``: the fake provider parses its own options (``python
    -m gateway.fake_provider`` takes the same)."""
    from gateway.fake_provider.__main__ import parse_args, run

    # Parsed first: --help (or a bad option) exits before the process's loop policy changes.
    host, port, config = parse_args(options)
    _install_uvloop()
    run(host, port, config)
    return 0


async def _tune_gc(app: object) -> None:
    """Every call allocates thousands of short-lived objects and few cycles. Collect the young
    generation less often, and move what start-up built (modules, rank tables, the policy) out
    of the collector's sight. Measured here: about 6% less CPU per small streamed call (three
    A/B pairs, noisy); the collector still runs for cycles."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # not on Windows
        return
    uvloop.install()
