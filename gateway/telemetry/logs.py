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
import time
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from gateway.exchange import Exchange

REQUESTS = logging.getLogger("gateway.requests")
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


class JSONFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
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


def configure(level: str, fmt: str) -> logging.handlers.QueueListener:
    """Route every log record through a queue to a writer thread; returns the listener (stop
    it at exit to flush)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    root = logging.getLogger()
    root.handlers[:] = [_Enqueue(records)]
    root.setLevel(level.upper())
    listener = logging.handlers.QueueListener(records, handler, respect_handler_level=False)
    listener.start()
    return listener


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
        "decision": _decision(ex),
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


def _decision(ex: Exchange) -> str | None:
    if ex.rejection is not None:
        return "rejected"
    if ex.compaction is not None and ex.compaction.items is not None:
        return "compacted"
    return "allowed" if ex.decision is not None else None


def _between(start: float | None, end: float | None) -> float | None:
    return round((end - start) * 1000, 2) if start is not None and end is not None else None
