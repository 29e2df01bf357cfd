"""The audit log: one JSON line per control-plane change (policy loads and refusals, grants,
session ends, degraded mode on and off, breaker transitions, keys and credentials).

Every line has ``ts``, ``event``, ``actor`` (``token:<12 hex>``, the SHA-256 of the admin
token that was shown, never the token; ``loopback`` for a tokenless write from this host;
``system`` for what the gateway did itself) and ``reason``, then what changed. Lines are only
ever appended (``O_APPEND``, one ``write`` each, a file created 0600), written by one thread
so the event loop never waits for the disk. Without a path, they go to the ``gateway.audit``
logger only. Every line passes the redactor (``gateway.redact``, sink ``audit``) first.

The lines form a hash chain: each has ``prev`` (the previous line's ``hash``, 64 zeros for a
file's first line) and ``hash``, the SHA-256 of ``prev`` followed by the line without its
``hash`` as canonical JSON (``chain_hash``). ``gateway audit verify FILE`` recomputes it: an
edited, deleted, copied or reordered line breaks it at that line. On start the writer reads
the file's last line (from the end, at most ``MAX_LINE`` bytes) to continue the chain; when
that line cannot be read as one (a write cut short by a crash), it writes a ``chain_restart``
line first, which says why and names the unreadable line by its SHA-256 (``skipped_sha256``),
and a new segment of the chain starts from 64 zeros. A write cut short while the gateway runs
(a full disk) leaves a piece of a line: the next line names it the same way and the chain
goes on across it. Lines written before the chain existed (no ``hash``) stay as they are; the
chain starts after them.

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
import re
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gateway.private import create_private_file
from gateway.redact import REDACTOR

log = logging.getLogger("gateway.audit")
MAX_REASON = 500
"""Characters of ``reason`` kept: what an operator types, bounded."""
MAX_FIELD = 4000
"""Characters of any other text kept (a refused policy's errors can run long)."""
MAX_LINE = 1 << 20
"""Bytes of one line, at most: what the writer reads back at start and the verifier reads."""
GENESIS = "0" * 64
"""The ``prev`` of the first line of a file, or of a new segment after a ``chain_restart``."""
RESTART = "chain_restart"
_HASH = re.compile(r"[0-9a-f]{64}")
_CHAIN_BYTES = len(b',"prev":"","hash":""') + 128
"""What ``prev`` and ``hash`` add to a line."""
_STOP = object()


class AuditError(Exception):
    """The audit line could not be written: the change it stands for must not be made."""


def token_actor(token: str) -> str:
    """The actor for a change made with an admin token: its hash, as the log names it."""
    return "token:" + hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def chain_hash(entry: Mapping[str, Any]) -> str:
    """A line's ``hash``: SHA-256 of its ``prev`` and of the line without ``hash`` as
    canonical JSON (orjson, keys sorted at every level)."""
    body = orjson.dumps(
        {k: v for k, v in entry.items() if k != "hash"}, option=orjson.OPT_SORT_KEYS
    )
    return hashlib.sha256(str(entry["prev"]).encode() + body).hexdigest()


def is_hash(value: object) -> bool:
    """A ``prev`` or ``hash`` as the writer makes them: 64 lowercase hex digits."""
    return isinstance(value, str) and _HASH.fullmatch(value) is not None


@dataclass(slots=True)
class _Line:
    entry: dict[str, Any]
    """The line's fields, plain JSON values, redacted; ``prev`` and ``hash`` are added by
    the writer thread, which alone knows the previous line."""
    done: concurrent.futures.Future[None] | None
    """Settled once written and fsync'ed (``commit``); None for ``record``."""


class AuditLog:
    def __init__(self, path: Path | None, *, on_failure: Callable[[], None] | None = None) -> None:
        """``on_failure`` is called for each line that could not be written, e.g. to count
        it in a metric: on the writer thread, or the caller's for a line refused before it
        is queued (a field orjson cannot write, a line over ``MAX_LINE``)."""
        self.path = path
        self.on_failure = on_failure
        self._queue: queue.SimpleQueue[_Line | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._stopped = False
        self._torn = False
        """The file does not end with a newline (a write stopped part way, a crash): the
        next line starts on a new one."""
        # The chain, kept by the writer thread only.
        self._prev = GENESIS
        self._restart: str | None = None
        """Why a ``chain_restart`` line is owed before the next one: the file's last line,
        read at start, cannot be chained to."""
        self._skipped: str | None = None
        """The SHA-256 of the unreadable last line on disk (a piece of a line, cut short),
        written as ``skipped_sha256`` in the next line, which the verifier checks."""

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
        try:
            entry = self._line(event, actor, reason, fields)
        except Exception as exc:  # a value orjson refuses (an int beyond 64 bits)
            log.error("audit line %s not recorded: %s", event, exc)
            self._failed()
            return
        if entry is None:  # over the line limit; never raises: the line is kept, not its fields
            entry = self._line(event, actor, reason, {"dropped": "fields over the line limit"})
            assert entry is not None
        if self.path is not None:
            self._queue.put(_Line(entry, None))

    async def commit(self, event: str, *, actor: str, reason: str = "", **fields: Any) -> None:
        """Write a line and return once it is on disk; make the change it names only after.
        Raises ``AuditError`` when it cannot be written (then make no change)."""
        try:
            entry = self._line(event, actor, reason, fields)
        except Exception as exc:
            self._failed()
            raise AuditError(
                f"cannot write the audit log: a field cannot be written: {exc}"
            ) from exc
        if entry is None:
            self._failed()
            raise AuditError(f"cannot write the audit log: the line is over {MAX_LINE} bytes")
        if self.path is None:
            return  # no file configured: the logger line above is the whole trail
        if self._thread is None or self._stopped:
            raise AuditError("the audit log is not open (the gateway is starting or stopping)")
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put(_Line(entry, done))
        # The writer may have stopped between the check and the put, after its last look at
        # the queue: then nobody would settle ``done``. Whoever settles it first wins.
        if self._stopped and done.cancel():
            raise AuditError("the audit log is closing")
        await asyncio.wrap_future(done)

    def _line(
        self, event: str, actor: str, reason: str, fields: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The line's fields as plain JSON values, bounded and redacted, and logged; None
        when the line would be longer than ``MAX_LINE``."""
        entry: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "event": event,
            "actor": actor,
            "reason": str(reason)[:MAX_REASON],
        }
        for name, value in fields.items():
            entry[name] = value[:MAX_FIELD] if isinstance(value, str) else value
        # default=str: a value of an odd type is written as text rather than raising on the
        # request path (record) or refusing a change (commit) for a formatting reason. Read
        # back, the line holds plain values only: what the redactor sees is what is written
        # (an object's text included), and the writer thread shares nothing with the caller.
        plain = orjson.loads(orjson.dumps(entry, default=str))
        redacted = REDACTOR.redact_value(plain, "audit")
        assert isinstance(redacted, dict)
        data = orjson.dumps(redacted)
        if len(data) + _CHAIN_BYTES > MAX_LINE:
            return None
        log.info("%s", data.decode())
        return redacted

    def _failed(self) -> None:
        if self.on_failure is not None:
            try:
                self.on_failure()
            except Exception:
                log.exception("audit log: the failure callback failed")

    def _write_forever(self) -> None:
        try:
            self._resume()
            while (item := self._queue.get()) is not _STOP:
                assert isinstance(item, _Line)
                # A commit whose caller gave up (cancelled) before its turn: its change will
                # not be made, so its line is not written either.
                if item.done is not None and not item.done.set_running_or_notify_cancel():
                    continue
                try:
                    self._write(item.entry, sync=item.done is not None)
                except Exception as exc:  # OSError above all; any error fails only its line
                    self._close()  # opened again for the next line: a full disk can recover
                    log.error("audit log %s: cannot write: %s", self.path, exc)
                    self._failed()
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

    # -- the chain -------------------------------------------------------------------------
    def _resume(self) -> None:
        """Continue the chain from the file's last line, or owe a ``chain_restart``."""
        self._prev, self._restart, self._skipped, self._torn = GENESIS, None, None, False
        assert self.path is not None
        try:
            tail, whole = _read_tail(self.path, MAX_LINE + 2)
        except (FileNotFoundError, NotADirectoryError):
            return  # a new file: its first line starts the chain
        except OSError as exc:
            self._restart = f"the last line could not be read: {exc.strerror}"
            return
        if not tail:
            return
        self._torn = not tail.endswith(b"\n")
        body = tail if self._torn else tail[:-1]
        cut = body.rfind(b"\n")
        if cut < 0 and not whole:
            self._restart = f"the last line is longer than {MAX_LINE} bytes"
            return
        last = body[cut + 1 :]
        try:
            entry = orjson.loads(last)
        except orjson.JSONDecodeError:
            entry, why = None, "the last line is not JSON (a write cut short?)"
        else:
            if not isinstance(entry, dict):
                why = "the last line is not a JSON object"
            elif "hash" not in entry and "prev" not in entry:
                return  # written before the chain: the chain starts with the next line
            elif not is_hash(entry.get("hash")):
                why = "the last line's hash is missing or malformed"
            else:
                self._prev = entry["hash"]
                return
        self._restart, self._skipped = why, hashlib.sha256(last).hexdigest()

    def _write(self, entry: dict[str, Any], sync: bool) -> None:
        fd = self._open()
        if self._restart is not None:
            log.warning("audit log %s: the hash chain restarts: %s", self.path, self._restart)
            self._prev = GENESIS
            self._put(fd, self._restart_line(self._restart))
            self._restart = None  # written: owed until then (a failure fails this line too)
        self._put(fd, entry)
        if sync:
            os.fsync(fd)

    def _restart_line(self, why: str) -> dict[str, Any]:
        line = {"ts": round(time.time(), 3), "event": RESTART, "actor": "system", "reason": why}
        redacted = REDACTOR.redact_value(line, "audit")
        assert isinstance(redacted, dict)
        return redacted

    def _put(self, fd: int, entry: dict[str, Any]) -> None:
        """Chain ``entry`` to the previous line and append it."""
        entry = {**entry, "prev": self._prev}
        if self._skipped is not None:
            entry["skipped_sha256"] = self._skipped
        digest = chain_hash(entry)
        line = (b"\n" if self._torn else b"") + orjson.dumps({**entry, "hash": digest}) + b"\n"
        written = self._append(fd, line)
        if written != len(line):
            on_disk = line[:written]
            if not on_disk.endswith(b"\n"):
                # A piece of a line ends the file now: the next line starts on a new one and
                # names the piece (the chain goes on across it; the verifier checks the name).
                self._torn = True
                self._skipped = hashlib.sha256(on_disk.rsplit(b"\n", 1)[-1]).hexdigest()
            else:
                self._torn = False
            raise OSError(f"wrote {written} of {len(line)} bytes")
        self._torn, self._skipped, self._prev = False, None, digest

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


def _read_tail(path: Path, size: int) -> tuple[bytes, bool]:
    """The file's last ``size`` bytes, and whether they are the whole file. Non-blocking
    open: a FIFO named as the log must not hang the writer."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        end = os.lseek(fd, 0, os.SEEK_END)
        start = max(0, end - size)
        return os.pread(fd, end - start, start), start == 0
    finally:
        os.close(fd)
