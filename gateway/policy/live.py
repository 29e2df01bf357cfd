"""The policy in force: loaded at start, reloaded when its file changes or on SIGHUP.

A valid new file takes effect for the next request. An invalid one is refused: the old policy
stays, and the error is kept for ``GET /gateway/policy`` and written to the logs and the audit
log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from gateway.audit import AuditLog
from gateway.policy.compiled import CompiledPolicy
from gateway.policy.loader import PolicyError, packaged_default, parse_policy

log = logging.getLogger("gateway.policy")


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
        self._mtime: float | None = None
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
            try:
                policy, mtime = await asyncio.to_thread(self._read)
            except (PolicyError, OSError) as exc:
                self.failures += 1
                self.last_error, self.last_error_at = str(exc), time.time()
                log.error("policy refused (%s), keeping the one in force:\n%s", reason, exc)
                self.audit.record(
                    "policy_refused", source=str(self.path), reason=reason, error=str(exc)
                )
                if strict:
                    raise
                return False
            self.current, self._mtime = policy, mtime
            self.loaded_at, self.last_error = time.time(), None
            self.reloads += 1
            log.info("policy %s loaded from %s (%s)", policy.version, policy.source, reason)
            self.audit.record(
                "policy_loaded", source=policy.source, version=policy.version, reason=reason
            )
            return True

    def _read(self) -> tuple[CompiledPolicy, float | None]:
        if self.path is None:
            text, source = packaged_default()
            return parse_policy(text, source), None
        mtime = self.path.stat().st_mtime
        return parse_policy(self.path.read_text(), str(self.path)), mtime

    def _changed(self) -> bool:
        assert self.path is not None
        try:
            return self.path.stat().st_mtime != self._mtime
        except OSError:
            return False

    async def watch(self) -> None:
        """Poll the file's modification time (on a thread) and reload when it changes."""
        if self.path is None:
            return
        while True:
            await asyncio.sleep(self.poll_interval)
            if await asyncio.to_thread(self._changed):
                changed_at = self._mtime
                if not await self.reload("file changed"):
                    # Do not retry the same broken file every second; wait for a new change.
                    self._mtime = await asyncio.to_thread(self._stat) or changed_at

    def _stat(self) -> float | None:
        assert self.path is not None
        try:
            return self.path.stat().st_mtime
        except OSError:
            return None
