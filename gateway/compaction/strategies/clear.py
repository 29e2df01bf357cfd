"""``clear``: only the system prompt and the latest user input stay (goose's ``clear``).

The exchange in progress is kept too when the request ends in one (the model's latest tool call
and its result), so the model goes on from where it is rather than from nothing.
"""

from __future__ import annotations

from gateway.compaction.conversation import Conversation, messages
from gateway.compaction.job import Job


async def clear(conversation: Conversation, job: Job) -> None:
    layout = conversation.layout()
    if len(layout.units) < 2:
        return
    inputs = [position for position, is_input in enumerate(layout.inputs) if is_input]
    keep = {len(layout.units) - 1, *inputs[-1:]}
    dropped = [
        index
        for position, (start, end) in enumerate(layout.units)
        if position not in keep
        for index in range(start, end)
    ]
    if not dropped:
        return
    count = conversation.span(dropped)
    note = conversation.note(
        f"[The gateway cleared {messages(count)} of this conversation to fit the model's "
        "context window. The latest request follows.]",
        count,
    )
    if note.tokens >= conversation.tokens(dropped):
        return  # a note must cost less than what it stands for
    # The note takes the place of the first message dropped; a unit kept between two dropped
    # runs (the latest user input) follows it.
    first, last = dropped[0], dropped[-1]
    gone = set(dropped)
    kept = [conversation.entries[i] for i in range(first, last + 1) if i not in gone]
    conversation.replace(first, last + 1, [note, *kept])
