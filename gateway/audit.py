"""The audit log: one JSON line per control-plane change (policy loads and refusals, grants,
session ends, degraded mode on and off, breaker transitions).

Every line has ``ts``, ``event``, ``actor`` (``token:<12 hex>``, the SHA-256 of the admin
token that was shown, never the token; ``loopback`` for a tokenless write from this host;
``system`` for what the gateway did itself) and ``reason``, then what changed. Lines are only
ever appended (``O_APPEND``, one ``write`` each, a file created 0600), written by one thread
so the event loop never waits for the disk. Without a path, they go to the ``gateway.audit``
logger only.

Two ways in:

- ``await commit(...)`` for a change someone asked for: it returns once the line is written
  and fsync'ed, so the change is made only after its line is on disk; if the line cannot be
  written it raises ``AuditError`` and the caller refuses the change. fsync, not only a
  flush: these changes are rare (an operator's hand, a policy file) and the promise is that
  no change survives a crash that its line does not.
- ``record(...)`` for what the gateway does by itself on the request path (a breaker
  transition, degradation it detects): queued and written at once, fsync'ed when the log
  stops. It never waits and never raises: the request path does not stop for the audit log.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gateway.private import create_private_file

log = logging.getLogger("gateway.audit")
MAX_REASON = 500
"""Characters of ``reason`` kept: what an operator types, bounded."""
MAX_FIELD = 4000
"""Characters of any other text kept (a refused policy's errors can run long)."""
_STOP = object()


class AuditError(Exception):
    """The audit line could not be written: the change it stands for must not be made."""


def token_actor(token: str) -> str:
    """The actor for a change made with an admin token: its hash, as the log names it."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


@dataclass(slots=True)
class _Line:
    data: bytes
    done: concurrent.futures.Future[None] | None
    """Settled once written and fsync'ed (``commit``); None for ``record``."""


class AuditLog:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[_Line | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._stopped = False
        self._torn = False
        """The last write stopped part way (disk full): the next line starts on a new one."""

    def start(self) -> None:
        if self.path is not None and self._thread is None:
            self._stopped = False
            self._thread = threading.Thread(target=self._write_forever, name="gateway-audit")
            self._thread.daemon = True
            self._thread.start()

    def stop(self) -> None:
        """Write what is queued, fsync, stop; call from a thread (``asyncio.to_thread``): it
        joins the writer."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=5)
            self._thread = None

    def record(self, event: str, *, actor: str = "system", reason: str = "", **fields: Any) -> None:
        """Queue a line for something the gateway did itself; never waits, never raises."""
        data = self._line(event, actor, reason, fields)
        if self.path is not None:
            self._queue.put(_Line(data, None))

    async def commit(self, event: str, *, actor: str, reason: str = "", **fields: Any) -> None:
        """Write a line and return once it is on disk; make the change it names only after.
        Raises ``AuditError`` when it cannot be written (then make no change)."""
        data = self._line(event, actor, reason, fields)
        if self.path is None:
            return  # no file configured: the logger line above is the whole trail
        if self._thread is None or self._stopped:
            raise AuditError("the audit log is not open (the gateway is starting or stopping)")
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put(_Line(data, done))
        # The writer may have stopped between the check and the put, after its last look at
        # the queue: then nobody would settle ``done``. Whoever settles it first wins.
        if self._stopped and done.cancel():
            raise AuditError("the audit log is closing")
        await asyncio.wrap_future(done)

    def _line(self, event: str, actor: str, reason: str, fields: dict[str, Any]) -> bytes:
        entry: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "event": event,
            "actor": actor,
            "reason": str(reason)[:MAX_REASON],
        }
        for name, value in fields.items():
            entry[name] = value[:MAX_FIELD] if isinstance(value, str) else value
        # default=str: a value of an odd type is written as text rather than raising on the
        # request path (record) or refusing a change (commit) for a formatting reason.
        data = orjson.dumps(entry, default=str)
        log.info("%s", data.decode())
        return data

    def _write_forever(self) -> None:
        try:
            while (item := self._queue.get()) is not _STOP:
                assert isinstance(item, _Line)
                # A commit whose caller gave up (cancelled) before its turn: its change will
                # not be made, so its line is not written either.
                if item.done is not None and not item.done.set_running_or_notify_cancel():
                    continue
                try:
                    self._write(item.data, sync=item.done is not None)
                except Exception as exc:  # OSError above all; any error fails only its line
                    self._close()  # opened again for the next line: a full disk can recover
                    log.error("audit log %s: cannot write: %s", self.path, exc)
                    if item.done is not None:
                        item.done.set_exception(AuditError(f"cannot write the audit log: {exc}"))
                else:
                    if item.done is not None:
                        item.done.set_result(None)
        finally:
            self._stopped = True
            self._fail_queued()
            if self._fd is not None:
                try:
                    os.fsync(self._fd)  # what record() queued reaches the disk at stop
                except OSError as exc:
                    log.error("audit log %s: cannot flush at stop: %s", self.path, exc)
            self._close()

    def _fail_queued(self) -> None:
        """Commits queued behind the stop: refused, so their changes are not made."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            done = item.done if isinstance(item, _Line) else None
            if done is not None and done.set_running_or_notify_cancel():
                done.set_exception(AuditError("the audit log is closing"))

    def _write(self, data: bytes, sync: bool) -> None:
        fd = self._open()
        line = (b"\n" if self._torn else b"") + data + b"\n"
        written = self._append(fd, line)
        if written != len(line):
            self._torn = True
            raise OSError(f"wrote {written} of {len(line)} bytes")
        self._torn = False
        if sync:
            os.fsync(fd)

    def _append(self, fd: int, line: bytes) -> int:
        """One ``write`` of a whole line: with ``O_APPEND`` it lands at the end in one piece."""
        return os.write(fd, line)

    def _open(self) -> int:
        if self._fd is None:
            assert self.path is not None
            # 0600: the log names sessions, operators and policy errors.
            created = create_private_file(self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            if created:
                # The new file's name must survive a crash as well as its lines.
                directory = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)
        return self._fd

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)
