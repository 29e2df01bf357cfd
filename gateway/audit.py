"""The audit log: one JSON line per policy load or refusal, grant, and session end.

Lines are written by one background thread, so the event loop never waits for the disk.
Without a path, audit events still go to the ``gateway.audit`` logger.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from gateway.private import open_private_append

log = logging.getLogger("gateway.audit")
_STOP = object()


class AuditLog:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.path is not None and self._thread is None:
            self._thread = threading.Thread(target=self._write_forever, name="gateway-audit")
            self._thread.daemon = True
            self._thread.start()

    def stop(self) -> None:
        """Drain and stop; call from a thread (``asyncio.to_thread``): it joins the writer."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=5)
            self._thread = None

    def record(self, event: str, **fields: Any) -> None:
        entry = {"ts": round(time.time(), 3), "event": event, **fields}
        log.info("%s", orjson.dumps(entry).decode())
        if self.path is not None:
            self._queue.put(entry)

    def _write_forever(self) -> None:
        assert self.path is not None
        # 0600: the log names sessions, operators and policy errors.
        with os.fdopen(open_private_append(self.path), "ab") as out:
            while True:
                entry = self._queue.get()
                if entry is _STOP:
                    return
                out.write(orjson.dumps(entry) + b"\n")
                out.flush()
