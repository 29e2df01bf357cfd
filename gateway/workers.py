"""``gateway serve --workers N``: N gateway processes on one port, so that one host's every core
serves (a Python process runs its code on one core at a time). Each worker is a whole gateway
(``create_app`` and ``server.serve``) on the store they share; the parent only binds, forks,
passes signals on and restarts.

Why it is built this way:

- The parent binds every listening socket before any worker starts (``Sockets``): a port in
  use is said once, before anything runs, not once per worker.
- On Linux each worker serves a socket of its own, all of one ``SO_REUSEPORT`` group, and the
  kernel spreads connections over them evenly. On one shared socket the worker that wakes
  first accepts a whole burst, and agents' SDKs keep their few connections open: measured
  here, 16 keep-alive connections making 2,000 calls gave two workers 0 and 2,000 calls on a
  shared socket, 1,021 and 979 with ``SO_REUSEPORT``. A port already held (even by another
  ``SO_REUSEPORT`` group of this user) is found first by a plain bind (``_probe``). Elsewhere
  the workers share one socket.
- Workers are forked (``multiprocessing``'s ``fork``) while the parent has no event loop and
  no thread: each worker starts its own (the log writer, uvloop) after the fork.
- Workers run in a process group of their own, and the parent passes SIGTERM, SIGINT and
  SIGHUP on: a terminal's Ctrl-C reaches the parent only, so a worker sees one signal per
  signal sent (a first drains, a second cuts the drain), not the terminal's and the
  parent's. Under systemd, ``KillMode=mixed`` does the same. One stop delivered twice at
  once (a wrapper that forwards signals, and a process-group kill) is passed on once
  (``SAME_SIGNAL``). A worker whose parent dies is sent SIGTERM (Linux), so none is left
  behind.
- A worker that dies while the gateway is not stopping is started again, after a backoff if
  it failed (``Backoff``). A worker that fails before it has served (a config, a policy, a
  secret it cannot read) is not retried at once: on the first start the gateway stops with
  the worker's exit status; a restart that fails ``START_ATTEMPTS`` times in a row stops it
  with 1. Restarted workers get fresh sockets: a dead worker's queued connections are
  refused, not left to wait in a socket no one serves.
- Metrics are per process: worker i also serves ``GET /metrics`` and the probes on
  ``worker_metrics_port`` + i (``server.metrics_listener``), one Prometheus target each, so
  no ``worker`` label is needed.
- Several processes cannot share one audit chain (each continues the chain from the line it
  wrote last): worker i writes ``audit.worker<i>.jsonl`` beside ``audit_log``.
- Stores only one process can hold (``memory://``, SQLite) are refused (``store_problem``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.server import Listeners
from gateway.settings import Settings
from gateway.store import SHARED_SCHEMES

log = logging.getLogger("gateway.workers")

Target = Callable[[int, Listeners, Callable[[], None]], int]
"""What a worker runs: its index, its sockets, and a callable to call once its app has
started; returns the process's exit status."""
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
BALANCED = sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")
"""Linux spreads connections over the sockets of one ``SO_REUSEPORT`` group."""
BACKLOG = 128
"""Connections a listening socket queues (aiohttp's own default)."""
START_ATTEMPTS = 5
"""Restarts of one worker in a row that fail before it serves: then the gateway stops."""
SAME_SIGNAL = 0.5
"""Seconds within which a second SIGTERM or SIGINT is the first one again, not passed on: a
wrapper that forwards signals (``uv run``, ``timeout``, an init) and a process-group kill
deliver one stop twice, and a worker would cut its drain. An operator's second Ctrl-C comes
later."""
STOP_GRACE = 15.0
"""Seconds past ``drain_timeout`` a stop waits for the workers before it kills them."""


class ListenError(Exception):
    """A listening socket could not be bound: the message says which and why."""


def store_problem(settings: Settings) -> str | None:
    """Why these settings cannot run their workers, or None."""
    if settings.workers > 1 and urlsplit(settings.store).scheme not in SHARED_SCHEMES:
        return (
            f"--workers {settings.workers} needs a store the workers share: --store"
            " redis://host:6379/0 (memory:// and sqlite are one process's)"
        )
    return None


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker ``index``'s settings: its own audit chain beside ``audit_log``."""
    path = settings.audit_log
    if settings.workers == 1 or path is None:
        return settings
    return settings.model_copy(update={"audit_log": audit_path(path, index)})


def audit_path(path: Path, index: int) -> Path:
    """Worker ``index``'s audit file for ``audit_log`` ``path``."""
    return path.with_name(f"{path.stem}.worker{index}{path.suffix}")


# -- sockets -------------------------------------------------------------------------------------
Address = tuple[int, Any]
"""A socket's family and address, as ``getaddrinfo`` gives it."""


def _resolve(host: str, port: int) -> list[Address]:
    """Every address ``host`` stands for, as asyncio's ``create_server`` binds them."""
    try:
        found = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    addresses: list[Address] = []
    for family, _type, _proto, _name, address in found:
        if (family, address) not in addresses:
            addresses.append((family, address))
    return addresses


def _open(addresses: list[Address], reuse_port: bool, what: str) -> tuple[socket.socket, ...]:
    """Listening sockets on ``addresses``, non-blocking; none left open if one fails."""
    opened: list[socket.socket] = []
    try:
        for family, address in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            opened.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError as exc:
        for sock in opened:
            sock.close()
        raise ListenError(f"cannot listen on {what}: {exc.strerror or exc}") from None
    return tuple(opened)


def _probe(addresses: list[Address], what: str) -> None:
    """Refuse a port something listens on already. A socket of an ``SO_REUSEPORT`` group
    binds beside any other of the group's user, say a gateway started twice by mistake,
    which would then share its connections: a plain bind fails there."""
    for family, address in addresses:
        if address[1] == 0:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise ListenError(f"cannot listen on {what}: {exc.strerror or exc}") from None


def _bound(sockets: Iterable[socket.socket]) -> list[Address]:
    """Where these sockets are bound (a port 0 resolved to the one the system chose)."""
    return [(sock.family, sock.getsockname()) for sock in sockets]


@dataclass(slots=True)
class _Listener:
    """One listener (the main one, the admin one, or a worker's metrics one): where it binds,
    and what was bound there for each worker."""

    what: str
    addresses: list[Address]
    shared: tuple[socket.socket, ...] | None = None
    """The one set of sockets every worker serves (without ``SO_REUSEPORT`` balancing)."""


class Sockets:
    """The listening sockets of every worker. ``bind_all`` binds them all before the first
    start; ``bind(i)`` binds worker i's again for a restart; ``release`` closes the parent's
    copies once a worker has its own."""

    def __init__(self, settings: Settings) -> None:
        self.workers = settings.workers
        self.reuse_port = BALANCED and self.workers > 1
        self.main = _Listener(
            f"{settings.host}:{settings.port}", _resolve(settings.host, settings.port)
        )
        self.admin: _Listener | None = None
        if settings.admin_host is not None and settings.admin_port is not None:
            where = f"{settings.admin_host}:{settings.admin_port}"
            self.admin = _Listener(where, _resolve(settings.admin_host, settings.admin_port))
        self.metrics: list[_Listener] = []
        if self.workers > 1:
            host = settings.admin_host if settings.admin_host is not None else settings.host
            ports = settings.worker_metrics_ports or [0] * self.workers
            for index, port in enumerate(ports):
                what = f"{host}:{port} (worker {index}'s metrics)"
                self.metrics.append(_Listener(what, _resolve(host, port)))

    def bind_all(self) -> list[Listeners]:
        """Every worker's sockets; a ``ListenError`` leaves none open."""
        bound: list[Listeners] = []
        try:
            if self.reuse_port:
                for shared in self._shared():
                    _probe(shared.addresses, shared.what)
            for index in range(self.workers):
                bound.append(self.bind(index))
        except ListenError:
            for listeners in bound:
                self.release(listeners)
            self.close()
            raise
        return bound

    def bind(self, index: int) -> Listeners:
        main = self._group(self.main)
        try:
            admin = self._group(self.admin) if self.admin is not None else ()
            metrics: tuple[socket.socket, ...] = ()
            if self.metrics:
                own = self.metrics[index]
                metrics = _open(own.addresses, False, own.what)
                own.addresses = _bound(metrics)
        except ListenError:
            self.release(Listeners(main))
            raise
        return Listeners(main, admin, metrics)

    def _shared(self) -> list[_Listener]:
        return [self.main] if self.admin is None else [self.main, self.admin]

    def _group(self, listener: _Listener) -> tuple[socket.socket, ...]:
        if listener.shared is not None:
            return listener.shared
        sockets = _open(listener.addresses, self.reuse_port, listener.what)
        listener.addresses = _bound(sockets)  # a port 0: every worker's on the one chosen
        if not self.reuse_port:
            listener.shared = sockets
        return sockets

    def release(self, listeners: Listeners) -> None:
        """Close the parent's copies of a worker's own sockets (the shared ones stay)."""
        shared = {sock for listener in self._shared() for sock in listener.shared or ()}
        for sock in (*listeners.main, *listeners.admin, *listeners.metrics):
            if sock not in shared:
                sock.close()

    def held(self) -> Iterator[socket.socket]:
        """The sockets the parent holds now (shared ones)."""
        for listener in self._shared():
            yield from listener.shared or ()

    def close(self) -> None:
        for sock in self.held():
            sock.close()


# -- the workers ---------------------------------------------------------------------------------
@dataclass(slots=True)
class Backoff:
    """How long a worker that died waits before it starts again: doubling from ``first`` up to
    ``most`` while it keeps failing; a worker that served ``stable`` seconds starts afresh."""

    first: float = 0.5
    most: float = 30.0
    stable: float = 60.0

    def delay(self, failures: int) -> float:
        return 0.0 if failures == 0 else min(self.most, self.first * 2 ** (failures - 1))


@dataclass(slots=True)
class Worker:
    index: int
    process: BaseProcess | None = None
    started: Event | None = None
    """Set by the worker once its app has started."""
    forked_at: float = 0.0
    served: bool = False
    """Whether any process of this worker has ever started serving."""
    failures: int = 0
    """Exits in a row of a worker that failed (after it served, or before)."""
    failed_starts: int = 0
    """Restarts in a row that failed before they served."""
    restart_at: float | None = None
    sockets: Listeners | None = field(default=None, repr=False)
    """Bound for its next start (the first start's, by ``bind_all``)."""


class Supervisor:
    """The parent: starts the workers, passes signals on, restarts a worker that died, and
    stops when they have all ended. ``run`` returns the gateway's exit status."""

    def __init__(
        self, settings: Settings, sockets: Sockets, target: Target, backoff: Backoff | None = None
    ) -> None:
        self.settings, self.sockets, self.target = settings, sockets, target
        self.backoff = backoff or Backoff()
        self.context = multiprocessing.get_context("fork")
        self.workers = [Worker(index) for index in range(settings.workers)]
        self.stopping = False
        self.deadline: float | None = None
        self.stopped_at: float | None = None
        """When a signal began the stop (a stop on a failed start has none)."""
        self.status = 0
        self._signals: list[int] = []
        self._wake_read, self._wake_write = socket.socketpair()

    def run(self, first: list[Listeners]) -> int:
        if threading.active_count() > 1:  # a thread's lock held at the fork would never be freed
            raise RuntimeError("gateway workers are forked before any thread starts")
        previous = self._install()
        try:
            for worker, listeners in zip(self.workers, first, strict=True):
                worker.sockets = listeners
                self._start(worker)
            while self._alive() or not self.stopping:
                self._wait()
                for signum in self._take_signals():
                    self._on_signal(signum)
                for worker in self.workers:
                    if worker.process is not None and worker.process.exitcode is not None:
                        self._ended(worker)
                self._restart_due()
                self._enforce_deadline()
        finally:
            self._uninstall(previous)
            self.sockets.close()
        log.info("all workers stopped", extra={"status": self.status})
        return self.status

    # -- signals -------------------------------------------------------------------------------
    def _install(self) -> dict[int, Any]:
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        signal.set_wakeup_fd(self._wake_write.fileno(), warn_on_full_buffer=False)
        previous: dict[int, Any] = {}
        for signum in FORWARDED:
            previous[signum] = signal.signal(signum, self._on_signal_received)
        return previous

    def _uninstall(self, previous: dict[int, Any]) -> None:
        signal.set_wakeup_fd(-1)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        self._wake_read.close()
        self._wake_write.close()

    def _on_signal_received(self, signum: int, frame: object) -> None:
        self._signals.append(signum)  # handled by the loop; the wakeup fd ends its wait

    def _take_signals(self) -> list[int]:
        with contextlib.suppress(BlockingIOError):
            while self._wake_read.recv(512):
                pass
        taken, self._signals = self._signals, []  # one appended meanwhile stays in one of them
        return taken

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        alive = [worker for worker in self.workers if self._running(worker)]
        if signum == signal.SIGHUP:
            if not self.stopping:  # each worker reloads its policy and credentials
                log.info("SIGHUP: passed on to %d workers", len(alive))
                self._send(alive, signum)
            return
        now = time.monotonic()
        if self.stopped_at is not None and now - self.stopped_at < SAME_SIGNAL:
            log.info("%s again at once: taken as the same stop, not passed on", name)
            return
        if self.stopping:
            log.warning("%s again: passed on, the workers cut their drain", name)
        else:
            log.info("stopping on %s: %d workers drain their calls", name, len(alive))
            self.stopped_at = now
            self._stop()
        self._send(alive, signum)

    def _stop(self) -> None:
        self.stopping = True
        self.deadline = time.monotonic() + self.settings.drain_timeout + STOP_GRACE
        for worker in self.workers:
            worker.restart_at = None
            if worker.sockets is not None:
                self.sockets.release(worker.sockets)
                worker.sockets = None

    def _send(self, workers: list[Worker], signum: int) -> None:
        for worker in workers:
            assert worker.process is not None and worker.process.pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.process.pid, signum)

    # -- processes -----------------------------------------------------------------------------
    def _running(self, worker: Worker) -> bool:
        return worker.process is not None and worker.process.exitcode is None

    def _alive(self) -> bool:
        """Whether a worker's process is still to be reaped (running, or ended unseen)."""
        return any(worker.process is not None for worker in self.workers)

    def _wait(self) -> None:
        ready: list[Any] = [self._wake_read]
        ready.extend(w.process.sentinel for w in self.workers if w.process is not None)
        due = [w.restart_at for w in self.workers if w.restart_at is not None]
        if self.deadline is not None:
            due.append(self.deadline)
        timeout = max(0.0, min(due) - time.monotonic()) if due else None
        multiprocessing.connection.wait(ready, timeout)

    def _start(self, worker: Worker) -> None:
        listeners, worker.sockets = worker.sockets, None
        if listeners is None:
            listeners = self.sockets.bind(worker.index)
        worker.started = started = self.context.Event()
        own = {*listeners.main, *listeners.admin, *listeners.metrics}
        foreign = [sock for sock in self._parent_sockets() if sock not in own]
        process = self.context.Process(
            target=_worker_main,
            args=(self.target, worker.index, listeners, started, os.getpid(), foreign),
            name=f"gateway-worker-{worker.index}",
        )
        # Blocked over the fork: a signal meant for the parent is not run by the child's copy
        # of the parent's handler; the child unblocks once its own dispositions are set.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            self.sockets.release(listeners)
        worker.process, worker.forked_at = process, time.monotonic()
        log.info(
            "worker %d started (pid %d)", worker.index, process.pid,
            extra={"worker": worker.index, "pid": process.pid},
        )  # fmt: skip

    def _parent_sockets(self) -> list[socket.socket]:
        """Every socket the parent holds: a worker closes the ones that are not its own (a
        worker holding another's would keep it open when that one dies)."""
        held = [self._wake_read, self._wake_write, *self.sockets.held()]
        for worker in self.workers:
            if worker.sockets is not None:
                held.extend((*worker.sockets.main, *worker.sockets.admin))
                held.extend(worker.sockets.metrics)
        return held

    def _ended(self, worker: Worker) -> None:
        process = worker.process
        assert process is not None and process.exitcode is not None and worker.started
        code, pid = process.exitcode, process.pid
        served = worker.started.is_set()
        ran = time.monotonic() - worker.forked_at
        process.join()
        process.close()
        worker.process = None
        fields = {"worker": worker.index, "pid": pid, "exit_code": code}
        if self.stopping:
            clean = code == 0 or (not served and code in (-signal.SIGTERM, -signal.SIGINT))
            if not clean:
                self.status = self.status or 1
            level = logging.INFO if clean else logging.WARNING
            log.log(level, "worker %d (pid %s) ended: %s", worker.index, pid, _status(code),
                    extra=fields)  # fmt: skip
            return
        if not served:
            worker.failed_starts += 1
            if not worker.served or worker.failed_starts >= START_ATTEMPTS:
                log.error(
                    "worker %d (pid %s) failed to start (%s)%s: stopping the gateway",
                    worker.index, pid, _status(code),
                    "" if not worker.served else f", {worker.failed_starts} times in a row",
                    extra=fields,
                )  # fmt: skip
                self.status = code if code > 0 else 1
                self._stop()
                self._send([w for w in self.workers if self._running(w)], signal.SIGTERM)
                return
        else:
            worker.served, worker.failed_starts = True, 0
        if ran >= self.backoff.stable:
            worker.failures = 0
        if code != 0 or not served:
            worker.failures += 1
        delay = self.backoff.delay(worker.failures)
        worker.restart_at = time.monotonic() + delay
        log.warning(
            "worker %d (pid %s) ended unexpectedly after %.1fs (%s): restarting it in %.1fs",
            worker.index, pid, ran, _status(code), delay, extra=fields,
        )  # fmt: skip

    def _restart_due(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if self.stopping or worker.restart_at is None or worker.restart_at > now:
                continue
            worker.restart_at = None
            try:
                self._start(worker)
            except ListenError as exc:  # its port taken meanwhile: tried again later
                worker.failures += 1
                worker.restart_at = now + self.backoff.delay(worker.failures)
                log.error("worker %d cannot start: %s", worker.index, exc)

    def _enforce_deadline(self) -> None:
        if self.deadline is None or time.monotonic() < self.deadline:
            return
        left = [worker for worker in self.workers if self._running(worker)]
        if left:
            log.error(
                "%d workers still running %.0fs past the drain timeout: killed",
                len(left), STOP_GRACE,
            )  # fmt: skip
            self._send(left, signal.SIGKILL)
            self.status = self.status or 1
        self.deadline = None


def _status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


# -- in the worker -------------------------------------------------------------------------------
def _worker_main(
    target: Target,
    index: int,
    listeners: Listeners,
    started: Event,
    parent: int,
    foreign: list[socket.socket],
) -> None:
    """A worker's first steps after the fork, then ``target``."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # until ``serve`` drains on it
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the app reloads on it
    for sock in foreign:
        sock.close()
    os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the parent only, which passes it on
    _end_with(parent)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    sys.exit(target(index, listeners, started.set))


def _end_with(parent: int) -> None:
    """Have the kernel send this process SIGTERM when its parent dies (Linux), so a parent
    killed outright leaves no worker serving on its own."""
    if sys.platform != "linux":
        return
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before the call
        os.kill(os.getpid(), signal.SIGTERM)


class WorkerTag(logging.Filter):
    """Adds ``worker`` (its index) to every log record of a worker's process."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True
