"""``summarize``: the older conversation becomes one summary message, written by an LLM.

Everything but the system prompt, the first user message and the last ``keep_last`` exchanges
goes to the summary call as a plain transcript; a summary already in that part (from an earlier
compaction) is in the transcript too, so summaries build on each other. A failed call leaves the
conversation as it was and says why in ``job.failures``: the next strategy takes over. So does a
skipped one (``summarize: skipped: ...``): the gateway runs degraded, or the summarizer's
breaker is open; the transcript is then not even built.
"""

from __future__ import annotations

from typing import Any

from gateway.compaction.conversation import Conversation, messages
from gateway.compaction.job import Job, SummaryFailed
from gateway.compaction.transcript import transcript

MIN_TOKENS = 256
"""Less old conversation than this is not summarized."""
INTRO = (
    "[Summary of the earlier part of this conversation, written by the gateway to fit the "
    "model's context window. It replaces {messages}.]\n\n"
)


async def summarize(conversation: Conversation, job: Job) -> None:
    if job.skip_summary is not None:
        job.failures.append(f"summarize: skipped: {job.skip_summary}")
        return
    if job.summarize is None:
        job.failures.append("summarize: no upstream to call")
        return
    layout = conversation.layout()
    units = conversation.old_units(layout, job.settings.keep_last, keep_first_input=True)
    if not units:
        return
    replaced = range(units[0].start, units[-1].stop)
    if conversation.tokens(replaced) < MIN_TOKENS:
        return  # not worth a call: no summary would be much shorter
    earlier: list[str] = []
    rest: list[Any] = []
    for index in replaced:
        op = conversation.entries[index].op
        if isinstance(op, list) and op[0] == "note":
            earlier.append(op[1])  # an earlier summary (or note) goes in whole
        else:
            rest.append(conversation.value(index))
    text = transcript(rest, job.transcript_chars, earlier)
    try:
        summary = await job.summarize(text)
    except SummaryFailed as exc:
        job.failures.append(f"summarize: {exc}")
        return
    job.summary = summary
    count = conversation.span(replaced)
    note = conversation.note(INTRO.format(messages=messages(count)) + summary.text.strip(), count)
    if note.tokens >= conversation.tokens(replaced):
        job.failures.append("summarize: the summary was no shorter than what it summarized")
        return
    conversation.replace(replaced.start, replaced.stop, [note])
