"""The policy in force: loaded at start, reloaded when its file changes or on SIGHUP.

A valid new file takes effect for the next request. An invalid one is refused: the old policy
stays, and the error is kept for ``GET /gateway/policy``, counted (``failures``, a metric) and
written to the logs and the audit log. Whatever a file holds, no reload raises: the watcher
keeps watching, and a SIGHUP task never ends in an exception nobody retrieves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from gateway.audit import AuditLog
from gateway.policy.compiled import CompiledPolicy
from gateway.policy.loader import PolicyError, packaged_default, parse_policy, read_policy

log = logging.getLogger("gateway.policy")
Stamp = tuple[int, int, int]
"""What tells a changed file: modification time (ns), size, inode (an editor's rename)."""


class LivePolicy:
    def __init__(self, path: Path | None, audit: AuditLog, poll_interval: float = 1.0) -> None:
        self.path = path
        self.audit = audit
        self.poll_interval = poll_interval
        self.current: CompiledPolicy | None = None
        self.loaded_at = 0.0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.reloads = 0
        self.failures = 0
        self._stamp: Stamp | None = None
        self._lock = asyncio.Lock()

    @property
    def policy(self) -> CompiledPolicy:
        assert self.current is not None, "policy not loaded: the app has not started"
        return self.current

    async def load(self) -> None:
        """The first load: a bad file stops the gateway from starting."""
        await self._load(strict=True, reason="start")

    async def reload(self, reason: str) -> bool:
        return await self._load(strict=False, reason=reason)

    async def _load(self, strict: bool, reason: str) -> bool:
        async with self._lock:
            stamp = await asyncio.to_thread(self._stat)
            try:
                policy = await asyncio.to_thread(self._read)
            except Exception as exc:  # a bug in loading must not stop the watcher either
                if isinstance(exc, PolicyError):
                    error = str(exc)
                else:
                    log.exception("policy load failed unexpectedly (%s)", reason)
                    error = f"{self.path}: cannot be loaded: {type(exc).__name__}"
                self._refused(error, reason, stamp)
                if strict:
                    raise
                return False
            self.current, self._stamp = policy, stamp
            self.loaded_at, self.last_error = time.time(), None
            self.reloads += 1
            log.info("policy %s loaded from %s (%s)", policy.version, policy.source, reason)
            self.audit.record(
                "policy_loaded", source=policy.source, version=policy.version, reason=reason
            )
            return True

    def _refused(self, error: str, reason: str, stamp: Stamp | None) -> None:
        self.failures += 1
        self.last_error, self.last_error_at = error, time.time()
        # The file as it was refused: the watcher waits for it to change again.
        self._stamp = stamp
        log.error("policy refused (%s), keeping the one in force:\n%s", reason, error)
        self.audit.record("policy_refused", source=str(self.path), reason=reason, error=error)

    def _read(self) -> CompiledPolicy:
        if self.path is None:
            text, source = packaged_default()
            return parse_policy(text, source)
        return read_policy(self.path)

    def _stat(self) -> Stamp | None:
        if self.path is None:
            return None
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    async def watch(self) -> None:
        """Poll the file's status (on a thread) and reload when it changes. A refused file is
        not retried until it changes again; nothing a file holds ends this loop."""
        if self.path is None:
            return
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                stamp = await asyncio.to_thread(self._stat)
                if stamp is not None and stamp != self._stamp:
                    await self.reload("file changed")
            except Exception:  # pragma: no cover - _load already catches what a file can cause
                log.exception("policy watcher: unexpected error, still watching")
