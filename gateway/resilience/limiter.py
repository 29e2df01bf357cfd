"""``Limiter``: how many calls one upstream has in flight, and who waits for a slot.

The limit moves between ``concurrency.min`` and ``.max`` (AIMD, as Netflix's
concurrency-limits does it): it shrinks by a tenth on an overload answer (503, 529, a timeout)
or when the upstream's time to first byte runs at twice its long-run level, and grows by one
slot per limit's worth of quick answers while the slots are in use (and back by a tenth a
sample, unused, ten seconds after the last overload). The total time of an LLM call follows
its output's length and says nothing about load, so only a stream's first byte counts (a
JSON answer's headers come when the whole answer is written).

Past the limit a call waits in a bounded queue (``concurrency.queue``) for at most
``queue_timeout`` seconds. One owner (a session, or a key without one) holds at most
``session_share`` of the limit; its further calls wait while other owners' calls go first.
A full queue, a wait that times out, an owner over its share when the queue is full: ``Shed``,
answered 429 with ``Retry-After``, no upstream attempt, no allocation past the queue's bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable

from gateway.settings import ConcurrencySettings

DECREASE = 0.9
"""The limit's factor on an overload answer (at most once per ``_COOLDOWN``)."""
_COOLDOWN = 1.0
_FAST_ALPHA = 0.2
_SLOW_ALPHA = 0.02
_WARM = 10
"""First-byte samples before the latency gradient is trusted."""
SAMPLE_EVERY = 4
_RECOVER = 10.0
"""Seconds without an overload after which a limit not in use climbs back by ``_RECOVERY``
a sample: a limit lowered in a burst must not keep a quiet gateway's sessions to a small
share."""
_RECOVERY = 1.1
_NEVER = 1 << 62
_TOLERANCE = 2.0


class Shed(Exception):
    """The call was not admitted: ``reason`` is ``queue_full``, ``queue_timeout`` or
    ``session_share``; ``retry_after`` seconds is when trying again makes sense."""

    def __init__(self, reason: str, retry_after: float, limit: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.limit = limit


class _Waiter:
    __slots__ = ("future", "owner")

    def __init__(self, owner: str, future: asyncio.Future[None]) -> None:
        self.owner = owner
        self.future = future


class Limiter:
    __slots__ = (
        "_clock",
        "_decreased_at",
        "_fast",
        "_samples",
        "_skip",
        "_slow",
        "_waiting",
        "held",
        "in_flight",
        "limit",
        "queued_by",
        "settings",
        "share_cap",
    )

    def __init__(
        self, settings: ConcurrencySettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.limit = float(settings.max)
        self.share_cap = self.share()
        """``share()`` for the limit now, kept so the fast path reads an attribute."""
        self.in_flight = 0
        self.held: dict[str, int] = {}
        """Slots per owner, only owners holding one (memory follows the calls in flight)."""
        self.queued_by: dict[str, int] = {}
        """Waiting calls per owner, only owners with one waiting."""
        self._waiting: deque[_Waiter] = deque()
        self._clock = clock
        self._fast = self._slow = 0.0
        self._samples = 0
        self._skip = 1
        self._decreased_at = -math.inf

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def share(self) -> int:
        """The most slots one owner may hold now."""
        return max(1, int(self.limit * self.settings.session_share))

    def try_acquire(self, owner: str) -> bool:
        """A slot for ``owner``'s call if one is free now: no await, no allocation. Whoever
        waits while a slot is free is over its share (``_wake`` gives free slots to the others
        at once), so a call under its share goes ahead of them."""
        held = self.held.get(owner, 0)
        if self.in_flight < self.limit and held < self.share_cap:
            self.in_flight += 1
            self.held[owner] = held + 1
            return True
        return False

    async def wait(self, owner: str) -> None:
        """After ``try_acquire`` said no: a place in the queue and a slot when one frees for
        this owner; raises ``Shed`` when the queue is full or the wait times out."""
        over_share = self.held.get(owner, 0) >= self.share_cap
        queued = self.queued_by.get(owner, 0)
        if over_share and queued >= self.share_cap:
            # One owner's calls may hold its share and wait for as many more, no more: the
            # queue stays open to the others.
            raise Shed("session_share", self._retry_after(), int(self.limit))
        if len(self._waiting) >= self.settings.queue:
            raise Shed("session_share" if over_share else "queue_full", self._retry_after(),
                       int(self.limit))  # fmt: skip
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(owner, future)
        self._waiting.append(waiter)
        self.queued_by[owner] = queued + 1
        if self.in_flight < self.limit:
            self._wake()  # slots are free, held back only for waiters over their share
        try:
            async with asyncio.timeout(self.settings.queue_timeout):
                await future
        except TimeoutError:
            if future.done() and not future.cancelled():
                return  # granted in the same turn of the loop as the timeout: it has a slot
            raise Shed("queue_timeout", self._retry_after(), int(self.limit)) from None
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(owner)  # granted as it was cancelled: give the slot back
            raise
        finally:
            if not future.done():
                future.cancel()
            with contextlib.suppress(ValueError):  # granted: already out of the queue
                self._waiting.remove(waiter)
            left = self.queued_by.get(owner, 1) - 1
            if left:
                self.queued_by[owner] = left
            else:
                self.queued_by.pop(owner, None)

    def release(self, owner: str) -> None:
        """The call's slot back; the first waiter whose owner is under its share gets it."""
        self.in_flight -= 1
        left = self.held.get(owner, 1) - 1
        if left:
            self.held[owner] = left
        else:
            self.held.pop(owner, None)
        if self._waiting:
            self._wake()

    def answered(self, first_byte: float) -> None:
        """The upstream's response headers came after ``first_byte`` seconds (not overloaded).
        One answer in ``SAMPLE_EVERY`` is read (every call comes here; an average needs
        fewer), and the limit grows by that many steps at once."""
        self._skip -= 1
        if self._skip > 0:
            return
        self._skip = SAMPLE_EVERY if self.settings.adaptive else _NEVER
        if not self.settings.adaptive:
            return
        self._samples += 1
        if self._samples == 1:
            self._fast = self._slow = first_byte
        else:
            self._fast += _FAST_ALPHA * (first_byte - self._fast)
            self._slow += _SLOW_ALPHA * (first_byte - self._slow)
        if self._samples >= _WARM and self._fast > _TOLERANCE * self._slow:
            self._decrease()
        elif self.in_flight * 2 >= self.limit:  # grow while the slots are used ...
            self._grow(self.limit + SAMPLE_EVERY / self.limit)
        elif self.limit < self.settings.max and self._clock() - self._decreased_at > _RECOVER:
            self._grow(self.limit * _RECOVERY)  # ... or back, well after the last overload

    def _grow(self, limit: float) -> None:
        self.limit = min(float(self.settings.max), limit)
        self.share_cap = self.share()
        if self._waiting:
            self._wake()  # more room: the first waiters under their (new) share go

    def overloaded(self) -> None:
        """The upstream said it is overloaded (503, 529) or did not answer in time."""
        if self.settings.adaptive:
            self._decrease()

    def _decrease(self) -> None:
        now = self._clock()
        if now - self._decreased_at < _COOLDOWN:
            return
        self._decreased_at = now
        self.limit = max(float(self.settings.min), self.limit * DECREASE)
        self.share_cap = self.share()

    def _wake(self) -> None:
        share = self.share_cap
        for waiter in self._waiting:
            if self.in_flight >= self.limit:
                return
            if waiter.future.done():
                continue
            held = self.held.get(waiter.owner, 0)
            if held >= share:
                continue
            self.in_flight += 1
            self.held[waiter.owner] = held + 1
            waiter.future.set_result(None)
            # The waiter removes itself from the queue when it runs (``wait``'s finally).

    def _retry_after(self) -> float:
        """About when a slot frees: a second, or the queue's wait when it is long."""
        return max(1.0, min(self.settings.queue_timeout, float(self.queued) / max(self.limit, 1)))
