"""Structured logs: JSON lines, written by a thread, and one line per request.

The event loop never writes to stderr itself: records go through a queue to a writer thread
(a slow terminal or log shipper cannot stall requests). A request line holds ids, figures and
outcomes only; never prompt content, never a key (sessions are named by id, keys by hash);
what a client names freely (model, agent) is capped in length (``gateway.caps``). Every line
passes the redactor (``gateway.redact``, sink ``log``) as it is formatted, on the writer
thread: a secret that reaches a log call anyway is written ``[REDACTED]`` and counted.

Request lines skip ``logging``'s records: once ``configure`` has started the writer, the app's
``RequestLog`` (``app[REQUEST_LOG]``, attached to the writer's queue when the app starts) queues
a line as its fields, formatted on the writer thread. Through a ``LogRecord`` (caller lookup,
thread and process names, handler locks) a request line cost 167,000 instructions, queued as
fields 50,000 (callgrind, the whole process). Without the writer (the app embedded, or under
test) they go through the ``gateway.requests`` logger.

No state lives in this module: the writer is ``configure``'s (the process's logging, as the
root logger's handler), the request log the app's.

While the app runs degraded, DEBUG records are dropped before they reach the queue
(``PauseDebug``, installed by ``RequestLog.attach``): with ``log_level: debug`` they are most of
the writer's work, and optional.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import orjson

from gateway.caps import cap_optional
from gateway.redact import REDACTOR

if TYPE_CHECKING:
    from gateway.exchange import Exchange
    from gateway.resilience.degraded import Degradation

REQUESTS = logging.getLogger("gateway.requests")
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


def _redacted(fields: dict[str, Any]) -> dict[str, Any]:
    """Every string in ``fields`` (nested ones too) redacted: each value on its own, so that
    a replacement never spans two JSON fields and the line stays JSON."""
    redacted = REDACTOR.redact_value(fields, "log")
    assert isinstance(redacted, dict)
    return redacted


def _text(value: object) -> str:
    """orjson's ``default``: an object's text, redacted (it is written as a string)."""
    return REDACTOR.redact(str(value), "log")


class JSONFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and any ``extra`` fields;
    every string redacted (``gateway.redact``, sink ``log``), on the writer thread."""

    _second = -1
    _stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {"message": record.getMessage()}
        fields.update((k, v) for k, v in record.__dict__.items() if k not in _STANDARD)
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        # The head is the gateway's own (a time, a level, a logger name): not scanned.
        head = {
            "time": self.stamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        return orjson.dumps({**head, **_redacted(fields)}, default=_text).decode()

    def request_line(self, line: RequestLine) -> str:
        created, fields = line
        head = {"time": self.stamp(created), "level": "info", "logger": REQUESTS.name}
        # The fields a client's input reaches, looked over together once (the common case:
        # nothing to scrub); only a line with something in them is redacted field by field.
        # The rest are the gateway's own words and numbers.
        probe = "\x00".join([v for k in CLIENT_FIELDS if type(v := fields.get(k)) is str])
        if not REDACTOR.dirty(probe):
            return orjson.dumps({**head, "message": "request", **fields}).decode()
        body = {"message": "request", **_redacted(fields)}
        return orjson.dumps({**head, **body}, default=_text).decode()

    def stamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # one strftime a second, not one a line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    """``time LEVEL logger message``, request fields as ``key=value`` after the message."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The line as ``logging`` formats it (a traceback included), redacted."""
        return REDACTOR.redact(super().format(record), "log")

    def request_line(self, line: RequestLine) -> str:
        created, fields = line
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))
        pairs = " ".join(f"{k}={v}" for k, v in _redacted(fields).items() if v is not None)
        return f"{stamp},{int((created % 1) * 1000):03d} INFO {REQUESTS.name} request {pairs}"


RequestLine = tuple[float, dict[str, Any]]
"""A request's line as queued: when it was made, and its fields."""
Formatter = JSONFormatter | TextFormatter
Queue = queue.SimpleQueue[logging.LogRecord | RequestLine]
"""What the writer thread reads: ``logging``'s records, and request lines as their fields."""


class _Enqueue(logging.handlers.QueueHandler):
    """Hands records to the writer thread as they are: formatting happens there, not on the
    event loop (the standard handler formats before queueing)."""

    def __init__(self, records: Queue) -> None:
        super().__init__(records)
        self.records = records

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class LogWriter:
    """The thread that formats and writes log records, a batch at a time.

    It wakes on a timer, never on a record: a record put on the queue wakes no one, so logging
    costs the event loop no hand-over of the interpreter lock (waking on every record cost
    about one lock hand-over per two requests under load, measured with strace). At most
    ``INTERVAL`` passes before a line is written; ``stop`` writes what is left.
    """

    INTERVAL = 0.1

    def __init__(
        self,
        records: Queue,
        formatter: Formatter,
    ) -> None:
        self.records, self.formatter = records, formatter
        self.stream = sys.stderr
        self._stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="gateway-log-writer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.thread.join()

    def _run(self) -> None:
        while True:
            stopping = self._stopping.wait(self.INTERVAL)
            self._write_pending()
            if stopping:
                return

    def _write_pending(self) -> None:
        lines = []
        while True:
            try:
                item = self.records.get_nowait()
            except queue.Empty:
                break
            lines.append(self._format(item))
        if lines:
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # nowhere to write to: logging must never take the gateway down

    def _format(self, item: logging.LogRecord | RequestLine) -> str:
        if isinstance(item, tuple):
            return self.formatter.request_line(item)
        return self.formatter.format(item)


def configure(level: str, fmt: str) -> LogWriter:
    """Route every log record through a queue to the writer thread; returns it (stop it at exit
    to write what is left). An app started after this queues its request lines to the same
    writer (``RequestLog.attach``)."""
    formatter: Formatter = JSONFormatter() if fmt == "json" else TextFormatter()
    records: Queue = queue.SimpleQueue()
    root = logging.getLogger()
    root.handlers[:] = [_Enqueue(records)]
    root.setLevel(level.upper())
    writer = LogWriter(records, formatter)
    writer.start()
    return writer


class PauseDebug(logging.Filter):
    """Drops DEBUG records while ``degraded`` holds (one attribute read per DEBUG record)."""

    def __init__(self, degraded: Degradation) -> None:
        super().__init__()
        self.degraded = degraded

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.DEBUG or not self.degraded.active


class RequestLog:
    """One app's request lines (``app[REQUEST_LOG]``): queued as their fields to the writer
    thread ``configure`` started, or, without one, logged through ``gateway.requests``."""

    __slots__ = ("_handler", "_pause", "degraded", "lines")

    def __init__(self, lines: Queue | None = None) -> None:
        self.lines = lines
        """The writer's queue while the app runs, if a writer was started."""
        self.degraded: Degradation | None = None
        """The app's degraded mode (``create_app`` sets it): DEBUG records pause in it."""
        self._handler: logging.Handler | None = None
        self._pause: PauseDebug | None = None

    def attach(self) -> None:
        """Queue to the writer ``configure`` installed as the root logger's handler, if any
        (the app's cleanup context, at start-up); its DEBUG records pause while degraded."""
        for handler in logging.getLogger().handlers:
            if isinstance(handler, _Enqueue):
                self.lines = handler.records
                if self.degraded is not None:
                    self._handler, self._pause = handler, PauseDebug(self.degraded)
                    handler.addFilter(self._pause)
                return

    def detach(self) -> None:
        self.lines = None
        if self._handler is not None and self._pause is not None:
            self._handler.removeFilter(self._pause)
        self._handler = self._pause = None


CLIENT_FIELDS = ("path", "session_id", "agent", "model", "team")
"""The request line's fields whose text a client's input reaches, looked over again here and
redacted when they hold a secret's shape or value (the session id, agent and model were
already, where they came in: ``redact.claim``; this is the sink's own check). Every other
field is the gateway's own (routes, outcomes, numbers, hex hashes). A field added to the line
that a client can reach is added here."""


def log_request(requests: RequestLog, ex: Exchange, route: str, trace_id: str | None) -> None:
    """The request's line: who, what, how it ended, how long it took, what it cost."""
    if not REQUESTS.isEnabledFor(logging.INFO):
        return
    end = time.perf_counter()
    identity, facts = ex.identity, ex.facts
    usage = ex.response_facts.usage if ex.response_facts else None
    fields: dict[str, Any] = {
        "trace_id": trace_id,
        "route": route,
        "method": ex.request.method,
        "path": ex.path,
        "status": ex.status,
        "outcome": ex.outcome,
        "session_id": identity.session_id if identity else None,
        "agent": identity.agent if identity else None,
        "key_hash": identity.key_hash if identity else None,
        "principal": ex.principal.id if ex.principal else None,
        "team": identity.team if identity else None,
        "model": cap_optional(facts.model) if facts else None,
        "stream": facts.stream if facts else None,
        "turn": ex.turn,
        "decision": ex.decision_label,
        "input_tokens": usage.input_tokens if usage else None,
        "output_tokens": usage.output_tokens if usage else None,
        "usage_estimated": usage.estimated if usage else None,
        "duration_ms": round((end - ex.started) * 1000, 2),
        "upstream_ms": _between(ex.upstream_at, ex.upstream_done_at),
        "first_chunk_ms": _between(ex.upstream_at, ex.first_byte_at),
    }
    if ex.rejection is not None:
        fields["limit"], fields["rule"] = ex.rejection
    if ex.compaction is not None:
        fields["compacted"] = ex.compaction.header()
    lines = requests.lines
    if lines is not None:
        lines.put((time.time(), fields))
    else:
        REQUESTS.info("request", extra=fields)


def _between(start: float | None, end: float | None) -> float | None:
    return round((end - start) * 1000, 2) if start is not None and end is not None else None
