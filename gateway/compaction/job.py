"""What a compaction strategy is given: the goal, the settings, and a way to summarize."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gateway.dialects.base import Usage
from gateway.policy.model import Context


@dataclass(slots=True, frozen=True)
class Summary:
    text: str
    model: str
    usage: Usage | None = None


class SummaryFailed(Exception):
    """The summary call timed out, failed upstream, or came back empty (the reason says)."""


class SummarySkipped(SummaryFailed):
    """The summary call was not made: the summarizer's breaker is open. Not a failure of the
    session's own summary: the next call of the session may summarize again at once."""


Summarizer = Callable[[str], Awaitable[Summary]]
"""Asks the session's upstream to summarize a transcript; raises ``SummaryFailed``."""


@dataclass(slots=True)
class Job:
    settings: Context
    goal: int
    """Tokens to get under, as the gateway counts them (before calibration)."""
    summarize: Summarizer | None = None
    skip_summary: str | None = None
    """Why ``summarize`` is skipped for this job (the gateway runs degraded), if it is."""
    transcript_chars: int = 400_000
    """The most transcript the summary model can read (its window, in characters, with room)."""
    summary: Summary | None = None
    """The summary made by this job, if any (its usage is billed to the session)."""
    failures: list[str] = field(default_factory=list)
    """Strategies that could not run, with why: ``summarize: timeout``."""
