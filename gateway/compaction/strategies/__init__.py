"""Compaction strategies, one module each; ``STRATEGIES`` maps policy names to them.

A strategy rewrites old parts of a ``Conversation`` towards ``job.goal`` and returns. It may fall
short (nothing old enough, a failed summary): the compactor then tries the next one. ``prompt``
is not here: it rewrites nothing and hands the overflow back to the agent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from gateway.compaction.conversation import Conversation
from gateway.compaction.job import Job
from gateway.compaction.strategies.clear import clear
from gateway.compaction.strategies.elide import elide_tool_output
from gateway.compaction.strategies.summarize import summarize
from gateway.compaction.strategies.truncate import truncate

Strategy = Callable[[Conversation, Job], Awaitable[None]]

STRATEGIES: dict[str, Strategy] = {
    "elide_tool_output": elide_tool_output,
    "summarize": summarize,
    "truncate": truncate,
    "clear": clear,
}

__all__ = ["STRATEGIES", "Strategy"]
