"""Structured logs: JSON lines, written by a thread, and one line per request.

The event loop never writes to stderr itself: records go through a queue to a listener thread
(a slow terminal or log shipper cannot stall requests). A request line holds ids, figures and
outcomes only; never prompt content, never a key (sessions are named by id, keys by hash).
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

from gateway.telemetry.metrics import decision_of

if TYPE_CHECKING:
    from gateway.exchange import Exchange

REQUESTS = logging.getLogger("gateway.requests")
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


class JSONFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and any ``extra`` fields."""

    _second = -1
    _stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # one strftime a second, not one a line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        line: dict[str, Any] = {
            "time": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update((k, v) for k, v in record.__dict__.items() if k not in _STANDARD)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class _Enqueue(logging.handlers.QueueHandler):
    """Hands records to the writer thread as they are: formatting happens there, not on the
    event loop (the standard handler formats before queueing)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class LogWriter:
    """The thread that formats and writes log records, a batch at a time: under load one write
    (and one flush) carries many lines, instead of a system call per line."""

    BATCH = 4096
    LINGER = 0.05

    def __init__(
        self, records: queue.SimpleQueue[logging.LogRecord | None], formatter: logging.Formatter
    ) -> None:
        self.records, self.formatter = records, formatter
        self.stream = sys.stderr
        self.thread = threading.Thread(target=self._run, name="gateway-log-writer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.records.put(None)
        self.thread.join()

    def _run(self) -> None:
        while True:
            record = self.records.get()
            if record is not None:
                # Let a batch gather: at most LINGER's worth of wake-ups and writes a second,
                # each taking the interpreter lock from the event loop only briefly.
                time.sleep(self.LINGER)
            batch = [record]
            while record is not None and len(batch) < self.BATCH:
                try:
                    record = self.records.get_nowait()
                except queue.Empty:
                    break
                batch.append(record)
            lines = [self.formatter.format(r) for r in batch if r is not None]
            if lines:
                try:
                    self.stream.write("\n".join(lines) + "\n")
                    self.stream.flush()
                except (OSError, ValueError):
                    pass  # nowhere to write to: logging must never take the gateway down
            if batch[-1] is None:
                return


def configure(level: str, fmt: str) -> LogWriter:
    """Route every log record through a queue to the writer thread; returns it (stop it at exit
    to write what is left)."""
    formatter: logging.Formatter = JSONFormatter()
    if fmt != "json":
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    records: queue.SimpleQueue[logging.LogRecord | None] = queue.SimpleQueue()
    root = logging.getLogger()
    root.handlers[:] = [_Enqueue(records)]
    root.setLevel(level.upper())
    writer = LogWriter(records, formatter)
    writer.start()
    return writer


def log_request(ex: Exchange, route: str, trace_id: str | None) -> None:
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
        "model": facts.model if facts else None,
        "stream": facts.stream if facts else None,
        "turn": ex.turn,
        "decision": decision_of(ex),
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
    REQUESTS.info("request", extra=fields)


def _between(start: float | None, end: float | None) -> float | None:
    return round((end - start) * 1000, 2) if start is not None and end is not None else None
