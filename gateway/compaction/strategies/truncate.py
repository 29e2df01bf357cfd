"""``truncate``: the oldest exchanges go, until the request fits. No LLM call.

The system prompt and the first user message (usually the task) stay, and so do the last
``keep_last`` exchanges. A note says how many messages were removed, so the model knows there
was more.
"""

from __future__ import annotations

from gateway.compaction.conversation import Conversation, Entry, messages
from gateway.compaction.job import Job


async def truncate(conversation: Conversation, job: Job) -> None:
    layout = conversation.layout()
    units = conversation.old_units(layout, job.settings.keep_last, keep_first_input=True)
    if not units:
        return
    first = units[0].start
    for unit in units:
        dropped = range(first, unit.stop)
        note = _note(conversation, dropped)
        saved = conversation.tokens(dropped) - note.tokens
        if conversation.total - saved <= job.goal:
            break
    if saved > 0:  # a note must cost less than what it stands for
        conversation.replace(dropped.start, dropped.stop, [note])


def _note(conversation: Conversation, dropped: range) -> Entry:
    count = conversation.span(dropped)
    return conversation.note(
        f"[The gateway removed the oldest {messages(count)} of this conversation to fit the "
        "model's context window. The task and the latest messages follow as they were.]",
        count,
    )
