"""``truncate``: the oldest exchanges go, until the request fits. No LLM call.

The system prompt and the first user message (usually the task) stay, and so do the last
``keep_last`` exchanges. A note says how many messages were removed, so the model knows there
was more.
"""

from __future__ import annotations

from gateway.compaction.conversation import Conversation
from gateway.compaction.job import Job


async def truncate(conversation: Conversation, job: Job) -> None:
    layout = conversation.layout()
    units = conversation.old_units(layout, job.settings.keep_last, keep_first_input=True)
    if not units:
        return
    dropped = range(units[0].start, units[0].start)
    for unit in units:
        dropped = range(units[0].start, unit.stop)
        saved = sum(conversation.entries[i].tokens for i in dropped)
        if conversation.total - saved <= job.goal:
            break
    count = conversation.span(dropped)
    note = conversation.note(
        f"[The gateway removed the {count} oldest messages of this conversation to fit the "
        "model's context window. The task and the latest messages follow as they were.]",
        count,
    )
    conversation.replace(dropped.start, dropped.stop, [note])
