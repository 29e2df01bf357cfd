"""``elide_tool_output``: old tool results give way to a note of what was there. No LLM call.

Tool output is most of an agent's context (file reads, test logs) and the oldest of it is the
least likely to matter. The largest go first within each exchange, oldest exchanges first.
"""

from __future__ import annotations

from gateway.compaction.conversation import ELIDE_MIN_BYTES, Conversation
from gateway.compaction.job import Job


async def elide_tool_output(conversation: Conversation, job: Job) -> None:
    layout = conversation.layout()
    for unit in conversation.old_units(layout, job.settings.keep_last, keep_first_input=False):
        largest_first = sorted(unit, key=lambda i: len(conversation.entries[i].raw), reverse=True)
        for index in largest_first:
            entry = conversation.entries[index]
            if not entry.original:
                continue
            elided = conversation.history.elide(conversation.value(index), ELIDE_MIN_BYTES)
            if elided is None:
                continue
            assert isinstance(entry.op, int)
            conversation.replace(index, index + 1, [conversation.made(["elide", entry.op])])
            if conversation.total <= job.goal:
                return
