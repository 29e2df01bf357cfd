"""When and how a request is compacted: the threshold, the saved rewrite, the strategies.

``Compactor.compact`` is called for every LLM call and is cheap when nothing is to be done: a
session with no saved rewrite and a body too small to come near the window costs one
multiplication. Otherwise it counts the conversation (per-item cached), applies the session's
saved rewrite when the history still starts with what it stands for, and, past ``compact_at``,
runs the policy's strategies until the request is under ``target``. One session compacts one
request at a time: a second request arriving meanwhile waits and reuses the result.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from gateway.compaction.calibration import Calibration
from gateway.compaction.conversation import Buffer, Conversation, Rewrite, digest
from gateway.compaction.job import Job, Summarizer, Summary, SummaryFailed, SummarySkipped
from gateway.compaction.strategies import STRATEGIES
from gateway.dialects.base import History
from gateway.policy.model import Context

MIN_BYTES_PER_TOKEN = 1.2
"""Text and code run three to four bytes a token, and the densest data (base64, hashes,
minified text) about 1.4; a body under 1.2 bytes per threshold token is never counted."""


SUMMARY_RETRY_AFTER = 60.0
"""Seconds a session's summary call is not tried again after it failed."""


class Overflow(Exception):
    """Over the window after every strategy, or the policy says ``prompt``."""

    def __init__(self, tokens: int, maximum: int, reason: str) -> None:
        super().__init__(reason)
        self.tokens = tokens
        self.maximum = maximum
        self.reason = reason


@dataclass(slots=True)
class Call:
    """One request as the compactor needs it."""

    session_id: str
    model: str | None
    history: History
    originals: Sequence[Buffer]
    """The conversation's items as sent."""
    fixed: Sequence[Buffer | object]
    """Everything else the model reads (system field, tool definitions): counted only."""
    body_size: int
    settings: Context
    window: int
    summarize: Summarizer | None
    rewrites: Callable[[], Awaitable[list[Rewrite]]]
    """The session's saved rewrites, newest last (read again after waiting for the lock)."""
    keep: Callable[[Outcome], Awaitable[None]]
    """Saves what a compaction did with the session, while the session's lock is held."""
    summary_chars: int = 400_000
    skip_summary: str | None = None
    """Why ``summarize`` is skipped (degraded mode): the next strategy takes over."""
    helper: bool = False
    """A call without tools: most likely the agent's own compaction or title call, which
    ``prompt`` must let through (refusing it would leave the agent no way to compact)."""


@dataclass(slots=True)
class Outcome:
    estimate: int
    """Tokens of what is sent, as tiktoken counts them (calibration compares this)."""
    before: int
    """Tokens of the request as the agent sent it, calibrated."""
    after: int
    """Tokens of what is sent, calibrated."""
    items: list[Buffer] | None = None
    """The conversation to send, or None when it goes as it came."""
    strategies: list[str] = field(default_factory=list)
    reused: bool = False
    """A saved rewrite was applied and nothing new was done."""
    rewrite: Rewrite | None = None
    """A new rewrite to save (the session's next requests reuse it)."""
    summary: Summary | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def saved(self) -> int:
        return max(0, self.before - self.after)

    def header(self) -> str:
        parts = [",".join(self.strategies) or "none"]
        if self.reused:
            parts.append("reused")
        parts.append(f"saved_tokens={self.saved}")
        parts.append(f"tokens={self.before}->{self.after}")
        parts += [f"failed={failure}" for failure in self.failures]
        return "; ".join(parts)


class Compactor:
    def __init__(
        self,
        count: Callable[[Buffer | object, str | None], int],
        count_all: Callable[[Sequence[Buffer | object], str | None], int] | None = None,
    ) -> None:
        """``count`` gives one item's tokens; ``count_all`` (the same, summed, faster) those of
        a whole history, for the common case where nothing is rewritten."""
        self.calibration = Calibration()
        self._count = count
        self._count_all = count_all or (lambda items, model: sum(count(i, model) for i in items))
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._summary_failed: dict[str, float] = {}
        """When each session's last summary call failed: it is not retried for a while, so a
        provider that is down does not make every call wait for the summary timeout."""

    def may_reach(self, model: str | None, body_size: int, window: int, settings: Context) -> bool:
        """Whether a body this size could reach the threshold (if not, it is not counted)."""
        factor = max(1.0, self.calibration.factor(model))
        return body_size / MIN_BYTES_PER_TOKEN * factor >= settings.compact_at * window

    async def compact(self, call: Call) -> Outcome | None:
        """None when the request is left alone without counting it. Raises ``Overflow``."""
        settings = call.settings
        factor = self.calibration.factor(call.model)
        threshold = settings.compact_at * call.window
        saved = await call.rewrites()
        if not saved:
            if not self.may_reach(call.model, call.body_size, call.window, settings):
                return None
            total = self._count_all([*call.fixed, *call.originals], call.model)
            if total * factor < threshold:
                calibrated = round(total * factor)
                return Outcome(total, calibrated, calibrated)
        conversation = self._conversation(call, saved)
        if conversation.total * factor < threshold:
            return self._outcome(call, conversation, factor, saved)
        lock = self._locks.setdefault(call.session_id, asyncio.Lock())
        async with lock:
            saved = await call.rewrites()
            conversation = self._conversation(call, saved)
            if conversation.total * factor < threshold:
                return self._outcome(call, conversation, factor, saved)
            base = matching(saved, call.originals)
            outcome = await self._run(call, conversation, factor, base)
            if outcome.rewrite is not None or outcome.summary is not None or outcome.failures:
                await call.keep(outcome)
            return outcome

    def _conversation(self, call: Call, saved: list[Rewrite]) -> Conversation:
        def count(item: Buffer) -> int:
            return self._count(item, call.model)

        fixed = sum(self._count(part, call.model) for part in call.fixed)
        return Conversation.of(
            call.history, call.originals, count, fixed, matching(saved, call.originals)
        )

    def _outcome(
        self, call: Call, conversation: Conversation, factor: float, saved: list[Rewrite]
    ) -> Outcome:
        """Under the threshold: as sent, or with the saved rewrite the history still matches."""
        rewrite = matching(saved, call.originals)
        after = round(conversation.total * factor)
        if rewrite is None:
            return Outcome(conversation.total, after, after)
        before = self._total(call, conversation)
        return Outcome(
            conversation.total,
            round(before * factor),
            after,
            items=conversation.items(),
            strategies=list(rewrite.strategies),
            reused=True,
        )

    def _total(self, call: Call, conversation: Conversation) -> int:
        return conversation.fixed_tokens + sum(conversation.count(raw) for raw in call.originals)

    async def _run(
        self, call: Call, conversation: Conversation, factor: float, base: Rewrite | None
    ) -> Outcome:
        """The strategies in order, on the conversation as the saved rewrite ``base`` (if any)
        left it; what they could not improve on still goes out with ``base`` applied."""
        settings = call.settings
        threshold = settings.compact_at * call.window
        before = round(self._total(call, conversation) * factor)
        job = Job(
            settings,
            goal=int(settings.target * call.window / factor),
            summarize=self._guarded(call),
            skip_summary=call.skip_summary,
            transcript_chars=call.summary_chars,
        )
        applied: list[str] = []
        for name in settings.strategies:
            if name == "prompt":
                if call.helper or conversation.total * factor < threshold:
                    continue  # the agent's own compaction call, or what went before sufficed
                raise Overflow(
                    round(conversation.total * factor),
                    round(settings.compact_at * call.window),
                    "the policy hands compaction back to the agent (strategy prompt)",
                )
            tokens = conversation.total
            await STRATEGIES[name](conversation, job)
            if conversation.total < tokens:
                applied.append(name)
            if conversation.total <= job.goal:
                break
        after = round(conversation.total * factor)
        if after > call.window:
            tried = ", ".join(settings.strategies) or "none"
            raise Overflow(after, call.window, f"still over the window after {tried}")
        model = job.summary.model if job.summary else None
        outcome = Outcome(
            conversation.total,
            before,
            after,
            summary=job.summary,
            failures=job.failures,
        )
        if applied:
            outcome.items, outcome.strategies = conversation.items(), applied
            outcome.rewrite = conversation.rewrite(applied, time.time(), model)
        elif base is not None:
            outcome.items, outcome.strategies = conversation.items(), list(base.strategies)
            outcome.reused = True
        return outcome

    def _guarded(self, call: Call) -> Summarizer | None:
        summarize = call.summarize
        if summarize is None:
            return None
        session = call.session_id
        failed_at = self._summary_failed.get(session)
        if failed_at is not None and time.monotonic() - failed_at < SUMMARY_RETRY_AFTER:
            ago = time.monotonic() - failed_at

            async def skipped(transcript: str) -> Summary:
                raise SummaryFailed(f"not retried: the last summary call failed {ago:.0f}s ago")

            return skipped

        async def guarded(transcript: str) -> Summary:
            try:
                summary = await summarize(transcript)
            except SummarySkipped:
                raise  # no call was made: nothing to hold against the session
            except SummaryFailed:
                now = time.monotonic()
                stale = [
                    k for k, at in self._summary_failed.items() if now - at > SUMMARY_RETRY_AFTER
                ]
                for key in stale:
                    del self._summary_failed[key]
                self._summary_failed[session] = now
                raise
            self._summary_failed.pop(session, None)
            return summary

        return guarded


def matching(saved: list[Rewrite], originals: Sequence[Buffer]) -> Rewrite | None:
    """The newest saved rewrite whose items the history still starts with."""
    for rewrite in reversed(saved):
        if rewrite.count <= len(originals) and digest(originals, rewrite.count) == rewrite.digest:
            return rewrite
    return None
