"""The policy in force: loaded at start, reloaded when its file changes or on SIGHUP.

A valid new file takes effect for the next request, once its ``policy_loaded`` line is in the
audit log (a line that cannot be written refuses the file: no unaudited policy). An invalid
one is refused: the old policy stays, and the error is kept for ``GET /gateway/policy``,
counted (``failures``, a metric) and written to the logs and the audit log
(``policy_refused``). Whatever a file holds, no reload raises: the watcher
keeps watching, and a SIGHUP task never ends in an exception nobody retrieves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from gateway.audit import AuditError, AuditLog
from gateway.policy.compiled import CompiledPolicy
from gateway.policy.loader import (
    PolicyError,
    PolicyProblem,
    packaged_default,
    parse_policy,
    read_policy,
)

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
                await self._refused(error, reason, stamp)
                if strict:
                    raise
                return False
            previous = self.current.version if self.current is not None else None
            try:
                # On disk before the policy is in force: a policy that took effect always
                # has its line, and one whose line cannot be written does not take effect.
                await self.audit.commit(
                    "policy_loaded",
                    actor="system",
                    reason=reason,
                    source=policy.source,
                    version=policy.version,
                    previous=previous,
                )
            except AuditError as exc:
                problem = PolicyProblem(None, "", f"not loaded: {exc}")
                await self._refused(f"{policy.source}: {problem}", reason, stamp)
                if strict:  # at start: said as a refused policy is, not as a traceback
                    raise PolicyError(policy.source, [problem]) from exc
                return False
            self.current, self._stamp = policy, stamp
            self.loaded_at, self.last_error = time.time(), None
            self.reloads += 1
            log.info("policy %s loaded from %s (%s)", policy.version, policy.source, reason)
            return True

    async def _refused(self, error: str, reason: str, stamp: Stamp | None) -> None:
        self.failures += 1
        self.last_error, self.last_error_at = error, time.time()
        # The file as it was refused: the watcher waits for it to change again.
        self._stamp = stamp
        log.error("policy refused (%s), keeping the one in force:\n%s", reason, error)
        try:
            await self.audit.commit(
                "policy_refused",
                actor="system",
                reason=reason,
                source=str(self.path) if self.path is not None else None,
                kept=self.current.version if self.current is not None else None,
                error=error,
            )
        except AuditError as exc:  # a refusal changes nothing: said in the log, not stopped
            log.error("policy refusal not audited: %s", exc)

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
