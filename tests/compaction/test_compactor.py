"""``Compactor.compact``: when a request is left alone, compacted, or refused; saved rewrites
reused turn after turn; summaries built on summaries; one compaction per session at a time."""

from __future__ import annotations

import asyncio
import base64
import random
from typing import Any

import orjson
import pytest

from gateway.compaction import Compactor, Outcome, Overflow, Rewrite, Summary
from gateway.compaction.compactor import MIN_BYTES_PER_TOKEN
from gateway.compaction.conversation import Buffer
from gateway.compaction.strategies.summarize import INTRO
from gateway.dialects import ANTHROPIC_MESSAGES, OPENAI_CHAT, OPENAI_RESPONSES
from gateway.dialects.base import Dialect, History
from gateway.fake_provider.validation import validate_chat, validate_messages, validate_responses
from tests.compaction.builders import (
    SYSTEM,
    TASK,
    Session,
    Summarizer,
    anthropic_history,
    chat_exchange,
    chat_history,
    context,
    count,
    decoded,
    raws,
    responses_history,
    tokens,
    tool_output,
)

CHAT: History = OPENAI_CHAT.history
WINDOW = 20_000
"""compact_at 0.8 → 16,000 tokens; target 0.5 → 10,000. An exchange of 3,000-byte output is
about 680 tokens, one of 1,500 bytes about 350."""


def big_history(exchanges: int = 25) -> list[dict[str, Any]]:
    """About 17,000 tokens: over the threshold."""
    return chat_history(exchanges, chars=3000)


class Counting:
    """The token counter, counting how often it is asked."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, item: Buffer | object, model: str | None) -> int:
        self.calls += 1
        return count(item, model)


class SlowSession(Session):
    """A store whose writes take a while (the lock must cover them)."""

    async def keep(self, outcome: Outcome) -> None:
        await asyncio.sleep(0.02)
        await super().keep(outcome)


# -- left alone --------------------------------------------------------------------------------


async def test_a_body_too_small_to_reach_the_threshold_is_not_counted() -> None:
    counting = Counting()
    session = Session()
    call = session.call(CHAT, chat_history(3), context(), WINDOW)
    assert call.body_size < 0.8 * WINDOW * 2
    assert await Compactor(counting).compact(call) is None
    assert counting.calls == 0
    assert session.reads == 1


async def test_a_body_of_dense_tokens_is_still_counted() -> None:
    """BUG: ``may_reach`` assumes no prompt has more tokens than half its bytes
    (``MIN_BYTES_PER_TOKEN = 2``), but base64, hashes and minified text run about 1.4 bytes a
    token. Here an agent that dumped binary fixtures has 19,000 tokens in a 31 KB body: over
    the threshold (16,000), yet the compactor returns None without counting."""
    items = chat_history(0)
    for n in range(12):
        exchange = chat_exchange(n)
        data = base64.b64encode(random.Random(n).randbytes(1725)).decode()
        exchange[1]["content"] = f"$ base64 fixtures/blob{n}.bin\n{data}"
        items += exchange
    call = Session().call(CHAT, items, context(), WINDOW, Summarizer())
    assert call.body_size < 2 * 0.8 * WINDOW
    assert tokens(items) > 0.8 * WINDOW * 1.15
    outcome = await Compactor(count).compact(call)
    assert outcome is not None, f"{tokens(items)} tokens went uncounted"
    assert outcome.items is not None and outcome.after <= 0.5 * WINDOW


async def test_under_the_threshold_the_request_goes_as_sent_with_an_estimate() -> None:
    items = chat_history(20, chars=3000)  # about 13,600 tokens
    session = Session()
    summarizer = Summarizer()
    call = session.call(CHAT, items, context(), WINDOW, summarizer)
    outcome = await Compactor(count).compact(call)
    assert outcome is not None
    expected = tokens(items)
    assert expected < 0.8 * WINDOW
    assert (outcome.estimate, outcome.before, outcome.after) == (expected, expected, expected)
    assert outcome.items is None and outcome.rewrite is None and not outcome.reused
    assert outcome.strategies == [] and outcome.failures == []
    assert outcome.header() == f"none; saved_tokens=0; tokens={expected}->{expected}"
    assert summarizer.transcripts == [] and session.kept == []


async def test_fixed_parts_are_counted_but_never_rewritten() -> None:
    items = chat_history(20, chars=3000)
    tools = [{"type": "function", "function": {"name": "read_file", "description": "x " * 4000}}]
    fixed = raws(tools)
    session = Session()
    call = session.call(CHAT, items, context(), WINDOW, Summarizer(), fixed=fixed)
    call.body_size += len(fixed[0])
    outcome = await Compactor(count).compact(call)
    assert outcome is not None
    assert outcome.before == tokens(items) + count(fixed[0], "gpt-4o")
    assert outcome.before > 0.8 * WINDOW  # the tools push it over
    assert outcome.items is not None and outcome.strategies == ["elide_tool_output"]
    assert outcome.after <= 0.5 * WINDOW


# -- compacted ---------------------------------------------------------------------------------


async def test_strategies_run_in_order_until_the_request_is_under_target() -> None:
    items = big_history()
    originals = raws(items)
    summarizer = Summarizer()
    session = Session()
    call = session.call(CHAT, items, context(), WINDOW, summarizer)
    outcome = await Compactor(count).compact(call)

    assert outcome is not None and outcome.items is not None
    # Eliding old outputs was enough: no summary was asked for.
    assert outcome.strategies == ["elide_tool_output"]
    assert summarizer.transcripts == [] and outcome.summary is None
    assert outcome.before == tokens(items) > 0.8 * WINDOW
    assert outcome.after == outcome.estimate == tokens(decoded(outcome.items))
    assert outcome.after <= 0.5 * WINDOW
    assert outcome.header() == (
        f"elide_tool_output; saved_tokens={outcome.before - outcome.after}; "
        f"tokens={outcome.before}->{outcome.after}"
    )
    # The oldest outputs went first, and no more than needed.
    sent = decoded(outcome.items)
    elided = [i for i, m in enumerate(sent) if m["role"] == "tool" and "removed" in m["content"]]
    assert elided == list(range(3, 3 + 2 * len(elided), 2))
    assert 0 < len(elided) < 23
    assert outcome.items[elided[-1] + 1 :] == originals[elided[-1] + 1 :]
    # The rewrite stands for everything up to the last elided output.
    rewrite = outcome.rewrite
    assert rewrite is not None and rewrite.count == elided[-1] + 1
    assert rewrite.ops[:4] == [0, 1, 2, ["elide", 3]]
    assert rewrite.strategies == ["elide_tool_output"] and rewrite.summary_model is None
    assert session.kept == [outcome]


async def test_elide_takes_the_largest_output_of_an_exchange_first() -> None:
    """BUG: ``strategies/elide.py`` says "The largest go first within each exchange", but
    outputs are elided in the order they come: here the small output of two parallel calls is
    elided although eliding the large one alone reaches the goal."""
    exchange = chat_exchange(0, parallel=2)
    exchange[1]["content"] = tool_output(1, 3000)  # about 660 tokens
    exchange[2]["content"] = tool_output(2, 12_000)  # about 2,600 tokens
    items = [*chat_history(0), *exchange, *chat_exchange(1, 500), *chat_exchange(2, 500)]
    window = int(tokens(items) / 0.85)
    large_only = [*items[:4], CHAT.elide(items[4], 2048), *items[5:]]
    assert tokens(large_only) <= int(0.5 * window)  # eliding the large one is enough
    call = Session().call(CHAT, items, context(strategies=["elide_tool_output"]), window)
    outcome = await Compactor(count).compact(call)
    assert outcome is not None and outcome.rewrite is not None
    assert outcome.rewrite.ops == [0, 1, 2, 3, ["elide", 4]]


async def test_the_next_strategy_runs_when_one_is_not_enough() -> None:
    items = big_history()
    summarizer = Summarizer()
    session = Session()
    call = session.call(CHAT, items, context(target=0.1), WINDOW, summarizer)
    outcome = await Compactor(count).compact(call)

    assert outcome is not None and outcome.items is not None
    assert outcome.strategies == ["elide_tool_output", "summarize"]  # truncate never ran
    # The summary model read the conversation with its outputs already elided.
    (transcript,) = summarizer.transcripts
    assert TASK not in transcript  # the task is pinned, not summarized
    assert transcript.count("[Tool output removed by the gateway") == 23
    assert outcome.summary is not None and outcome.summary.model == "summary-model"
    sent = decoded(outcome.items)
    assert sent[:2] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TASK}]
    assert sent[2]["role"] == "user"
    assert sent[2]["content"].startswith(INTRO.format(messages="46 messages"))
    assert sent[2]["content"].endswith("(summary 1)")
    assert outcome.items[3:] == call.originals[-4:]  # the last two exchanges, as sent
    rewrite = outcome.rewrite
    assert rewrite is not None
    assert rewrite.count == len(items) - 4
    assert rewrite.ops == [0, 1, ["note", sent[2]["content"], 46]]
    assert rewrite.summary_model == "summary-model"
    assert outcome.after <= 0.1 * WINDOW


async def test_a_strategy_that_changes_nothing_is_not_listed() -> None:
    items = chat_history(50)  # outputs of 1,500 bytes: too small to elide
    outcome = await Compactor(count).compact(
        Session().call(CHAT, items, context(), WINDOW, Summarizer())
    )
    assert outcome is not None and outcome.strategies == ["summarize"]


async def test_truncate_keeps_the_task_and_the_last_exchanges() -> None:
    items = chat_history(50)
    call = Session().call(CHAT, items, context(strategies=["truncate"], keep_last=3), WINDOW)
    outcome = await Compactor(count).compact(call)
    assert outcome is not None and outcome.items is not None
    sent = decoded(outcome.items)
    assert sent[:2] == items[:2]
    assert sent[2]["role"] == "user" and sent[2]["content"].startswith(
        f"[The gateway removed the oldest {len(items) - len(sent) + 1} messages"
    )
    assert outcome.items[-6:] == call.originals[-6:]
    assert outcome.after <= 0.5 * WINDOW
    # Only as much as needed went: the next older exchange would have fit.
    assert outcome.after + 350 > 0.5 * WINDOW
    validate_chat({"model": "gpt-4o", "messages": sent})


async def test_clear_keeps_the_system_prompt_latest_input_and_exchange_in_progress() -> None:
    items = [*chat_history(50), {"role": "user", "content": "Now run the tests."}]
    items += chat_exchange(99)
    call = Session().call(CHAT, items, context(strategies=["clear"]), WINDOW)
    outcome = await Compactor(count).compact(call)
    assert outcome is not None and outcome.items is not None
    sent = decoded(outcome.items)
    assert [m["role"] for m in sent] == ["system", "user", "user", "assistant", "tool"]
    assert sent[1]["content"].startswith(f"[The gateway cleared {len(items) - 4} messages")
    assert sent[2:] == items[-3:]
    validate_chat({"model": "gpt-4o", "messages": sent})


# -- saved rewrites ------------------------------------------------------------------------------


async def test_the_saved_rewrite_is_reused_by_the_next_longer_request() -> None:
    compactor = Compactor(count)
    summarizer = Summarizer()
    session = Session()
    settings = context(strategies=["summarize"])
    items = chat_history(50)
    first = await compactor.compact(session.call(CHAT, items, settings, WINDOW, summarizer))
    assert first is not None and first.rewrite is not None and first.items is not None
    assert len(session.saved) == 1

    longer = [*items, *chat_exchange(50), *chat_exchange(51)]
    call = session.call(CHAT, longer, settings, WINDOW, summarizer)
    second = await compactor.compact(call)
    assert second is not None and second.items is not None
    assert second.reused and second.strategies == ["summarize"]
    assert second.rewrite is None and second.summary is None
    assert len(summarizer.transcripts) == 1
    assert len(session.kept) == 1  # nothing new to save
    # The same compacted prefix, byte for byte (the provider's prompt cache holds); the rest
    # as the agent sent it.
    prefix = len(first.rewrite.ops)
    assert second.items[:prefix] == first.items[:prefix]
    assert second.items[prefix:] == call.originals[first.rewrite.count :]
    assert second.before == tokens(longer)
    assert second.after == second.estimate == tokens(decoded(second.items))
    assert second.header() == (
        f"summarize; reused; saved_tokens={second.saved}; tokens={second.before}->{second.after}"
    )


async def test_a_saved_rewrite_is_applied_even_to_a_body_that_looks_small() -> None:
    compactor = Compactor(count)
    session = Session()
    settings = context(strategies=["summarize"])
    items = chat_history(50)
    await compactor.compact(session.call(CHAT, items, settings, WINDOW, Summarizer()))
    call = session.call(CHAT, [*items, *chat_exchange(50)], settings, WINDOW)
    call.body_size = 100
    outcome = await compactor.compact(call)
    assert outcome is not None and outcome.reused


async def test_a_second_summary_is_made_on_top_of_the_first() -> None:
    compactor = Compactor(count)
    summarizer = Summarizer()
    session = Session()
    settings = context(strategies=["summarize"])
    first = await compactor.compact(
        session.call(CHAT, chat_history(50), settings, WINDOW, summarizer)
    )
    assert first is not None and first.rewrite is not None

    # The rest grows until the rewritten request is past the threshold again.
    grown = chat_history(95)
    second = await compactor.compact(session.call(CHAT, grown, settings, WINDOW, summarizer))
    assert second is not None and second.items is not None
    assert not second.reused and second.strategies == ["summarize"]
    assert len(summarizer.transcripts) == 2
    # The summary model read the first summary (whole, first), then what came after it.
    transcript = summarizer.transcripts[1]
    op = first.rewrite.ops[2]
    assert isinstance(op, list) and op[0] == "note"
    first_note = op[1]
    assert transcript.startswith(first_note + "\n\n[assistant]\n")
    assert first_note.startswith(INTRO.format(messages=f"{first.rewrite.count - 2} messages"))
    assert first_note.endswith("(summary 1)")
    # Exchanges 0-47 are in the first summary; the second transcript goes on from 48.
    assert "src/file480.py" in transcript and "src/file470.py" not in transcript
    sent = decoded(second.items)
    assert sent[2]["content"].startswith(INTRO.format(messages=f"{len(grown) - 6} messages"))
    assert sent[2]["content"].endswith("(summary 2)")
    assert second.rewrite is not None and second.rewrite.count == len(grown) - 4
    assert [r["count"] for r in session.saved] == [first.rewrite.count, second.rewrite.count]

    # The next request reuses the newest rewrite.
    third = await compactor.compact(
        session.call(CHAT, [*grown, *chat_exchange(95)], settings, WINDOW, summarizer)
    )
    assert third is not None and third.reused and third.items is not None
    assert third.items[:3] == second.items[:3]
    assert len(summarizer.transcripts) == 2


async def test_a_rewrite_the_history_no_longer_starts_with_is_ignored() -> None:
    compactor = Compactor(count)
    session = Session()
    settings = context(strategies=["summarize"])
    await compactor.compact(session.call(CHAT, chat_history(50), settings, WINDOW, Summarizer()))
    # The agent compacted on its own: a new history, under the threshold.
    edited = chat_history(20, start=100)
    edited[1] = {"role": "user", "content": "Summary of before: ... Continue."}
    outcome = await compactor.compact(session.call(CHAT, edited, settings, WINDOW))
    assert outcome is not None
    assert outcome.items is None and not outcome.reused and outcome.strategies == []


async def test_a_failed_compaction_over_a_saved_rewrite_still_sends_the_saved_rewrite() -> None:
    """Over the threshold with a saved rewrite, when no strategy changes anything more (here
    the summary call fails), what goes out is the history with the saved rewrite applied: what
    was counted and checked against the window, not the agent's full history."""
    compactor = Compactor(count)
    summarizer = Summarizer()
    session = Session()
    settings = context(strategies=["summarize"])
    window = 10_000
    first = await compactor.compact(
        session.call(CHAT, chat_history(25), settings, window, summarizer)
    )
    assert first is not None and first.rewrite is not None and first.items is not None

    summarizer.fail = "timeout after 120s"
    grown = chat_history(47)
    call = session.call(CHAT, grown, settings, window, summarizer)
    outcome = await compactor.compact(call)  # no Overflow: the rewritten history fits
    assert outcome is not None
    assert outcome.failures == ["summarize: timeout after 120s"]
    assert tokens(grown) > window  # as sent by the agent, it does not fit
    assert outcome.after <= window
    # What is sent must be what was counted: the saved rewrite and the rest.
    assert outcome.items is not None, "the original history (over the window) would be sent"
    prefix = len(first.rewrite.ops)
    assert outcome.items[:prefix] == first.items[:prefix]
    assert tokens(decoded(outcome.items)) == outcome.after


# -- failures ------------------------------------------------------------------------------------


async def test_a_failed_summary_is_recorded_and_the_next_strategy_used() -> None:
    summarizer = Summarizer(fail="timeout after 120s")
    session = Session()
    call = session.call(
        CHAT, chat_history(50), context(strategies=["summarize", "truncate"]), WINDOW, summarizer
    )
    outcome = await Compactor(count).compact(call)
    assert outcome is not None and outcome.items is not None
    assert outcome.strategies == ["truncate"]
    assert outcome.failures == ["summarize: timeout after 120s"]
    assert outcome.summary is None
    assert len(summarizer.transcripts) == 1
    assert outcome.header().startswith("truncate; saved_tokens=")
    assert outcome.header().endswith("; failed=summarize: timeout after 120s")
    assert session.kept == [outcome]
    assert session.saved[0]["strategies"] == ["truncate"]


async def test_a_failed_summary_is_not_retried_for_a_while() -> None:
    """A provider that is down must not make every later call wait for the summary timeout."""
    summarizer = Summarizer(fail="timeout after 120s")
    compactor = Compactor(count)
    session = Session()
    settings = context(strategies=["summarize", "truncate"])
    await compactor.compact(session.call(CHAT, chat_history(50), settings, WINDOW, summarizer))
    other = Session(id="session-2")
    session.saved.clear()  # as if the truncation had not been kept: compact afresh
    later = await compactor.compact(
        session.call(CHAT, chat_history(52), settings, WINDOW, summarizer)
    )
    assert len(summarizer.transcripts) == 1  # the second call did not try again
    assert later is not None and later.failures[0].startswith("summarize: not retried")
    # Other sessions are not affected.
    await compactor.compact(other.call(CHAT, chat_history(50), settings, WINDOW, summarizer))
    assert len(summarizer.transcripts) == 2


async def test_without_an_upstream_to_call_summarize_is_skipped() -> None:
    session = Session()
    call = session.call(CHAT, chat_history(50), context(), WINDOW, summarize=None)
    outcome = await Compactor(count).compact(call)
    assert outcome is not None
    assert outcome.strategies == ["truncate"]
    assert outcome.failures == ["summarize: no upstream to call"]


async def test_failures_alone_are_kept_when_nothing_else_happened() -> None:
    session = Session()
    call = session.call(
        CHAT, chat_history(50), context(strategies=["summarize"]), WINDOW, Summarizer(fail="x")
    )
    outcome = await Compactor(count).compact(call)
    assert outcome is not None
    assert outcome.items is None and outcome.rewrite is None and outcome.strategies == []
    assert outcome.failures == ["summarize: x"]
    assert outcome.header().startswith("none; saved_tokens=0; ")
    assert session.kept == [outcome] and session.saved == []


async def test_prompt_hands_the_overflow_back_to_the_agent() -> None:
    items = big_history()
    summarizer = Summarizer()
    session = Session()
    call = session.call(CHAT, items, context(strategies=["prompt"]), WINDOW, summarizer)
    with pytest.raises(Overflow) as raised:
        await Compactor(count).compact(call)
    assert raised.value.tokens == tokens(items)
    assert raised.value.maximum == round(0.8 * WINDOW)
    assert "strategy prompt" in raised.value.reason
    assert summarizer.transcripts == [] and session.kept == [] and session.saved == []


async def test_prompt_lets_a_helper_call_through() -> None:
    """A call without tools (the agent's own compaction call) is not refused by ``prompt``."""
    items = big_history()
    session = Session()
    call = session.call(CHAT, items, context(strategies=["prompt"]), WINDOW)
    call.helper = True
    outcome = await Compactor(count).compact(call)
    assert outcome is not None
    assert outcome.items is None and outcome.strategies == [] and outcome.failures == []
    assert outcome.before == tokens(items) > 0.8 * WINDOW
    assert session.kept == []
    # The strategies after prompt still run for it.
    call = session.call(CHAT, items, context(strategies=["prompt", "truncate"]), WINDOW)
    call.helper = True
    outcome = await Compactor(count).compact(call)
    assert outcome is not None and outcome.strategies == ["truncate"]


async def test_prompt_counts_as_the_provider_does() -> None:
    compactor = Compactor(count)
    for _ in range(5):
        compactor.calibration.observe("gpt-4o", 1000, 1300)
    items = chat_history(20, chars=3000)
    call = Session().call(CHAT, items, context(strategies=["prompt"]), WINDOW)
    with pytest.raises(Overflow) as raised:
        await compactor.compact(call)
    assert raised.value.tokens == round(tokens(items) * 1.3)


async def test_prompt_after_a_strategy_that_fell_short() -> None:
    """Elision helped but the request is still past compact_at: hand it back to the agent."""
    items = big_history(40)
    settings = context(strategies=["elide_tool_output", "prompt"], keep_last=30)
    call = Session().call(CHAT, items, settings, WINDOW)
    with pytest.raises(Overflow) as raised:
        await Compactor(count).compact(call)
    assert round(0.8 * WINDOW) <= raised.value.tokens < tokens(items)
    assert raised.value.maximum == round(0.8 * WINDOW)


async def test_prompt_after_a_strategy_that_sufficed_is_not_reached() -> None:
    """Elision brought the request under compact_at (not under target): it goes out."""
    items = big_history()
    settings = context(strategies=["elide_tool_output", "prompt"], target=0.1)
    outcome = await Compactor(count).compact(Session().call(CHAT, items, settings, WINDOW))
    assert outcome is not None and outcome.strategies == ["elide_tool_output"]
    assert outcome.after < 0.8 * WINDOW


async def test_still_over_the_window_after_every_strategy() -> None:
    items = chat_history(30)
    system = tool_output(99, 100_000)  # a system prompt of its own larger than the window
    fixed = raws([system])
    call = Session().call(CHAT, items, context(), WINDOW, Summarizer(), fixed=fixed)
    call.body_size += len(fixed[0])
    with pytest.raises(Overflow) as raised:
        await Compactor(count).compact(call)
    assert raised.value.maximum == WINDOW
    assert raised.value.tokens > WINDOW
    assert raised.value.reason == (
        "still over the window after elide_tool_output, summarize, truncate"
    )


# -- calibration and may_reach -------------------------------------------------------------------


async def test_the_threshold_applies_to_the_calibrated_count() -> None:
    items = chat_history(20, chars=3000)  # 13,600 estimated: under 16,000
    compactor = Compactor(count)
    for _ in range(5):
        compactor.calibration.observe("claude-sonnet-4-6", 10_000, 13_000)
    call = Session().call(CHAT, items, context(), WINDOW, model="claude-sonnet-4-6")
    outcome = await compactor.compact(call)
    assert outcome is not None and outcome.items is not None
    estimate = tokens(items, "claude-sonnet-4-6")
    assert outcome.before == round(estimate * 1.3)
    assert outcome.after == round(outcome.estimate * 1.3) <= 0.5 * WINDOW
    # Another model is not affected.
    other = await compactor.compact(Session("s2").call(CHAT, items, context(), WINDOW))
    assert other is not None and other.items is None


def test_may_reach() -> None:
    compactor = Compactor(count)
    settings = context()  # compact_at 0.8
    boundary = round(0.8 * WINDOW * MIN_BYTES_PER_TOKEN)  # 1.2 bytes per threshold token
    assert not compactor.may_reach("gpt-4o", boundary - 1, WINDOW, settings)
    assert compactor.may_reach("gpt-4o", boundary, WINDOW, settings)
    assert compactor.may_reach("gpt-4o", 10_000_000, WINDOW, settings)
    assert not compactor.may_reach("gpt-4o", 9_000_000, 10_000_000, settings)
    # A model the provider counts as more tokens reaches it with a smaller body...
    for _ in range(3):
        compactor.calibration.observe("claude-sonnet-4-6", 1000, 2000)
    assert compactor.may_reach("claude-sonnet-4-6", boundary // 2, WINDOW, settings)
    assert not compactor.may_reach("gpt-4o", boundary // 2, WINDOW, settings)
    # ...but a factor under 1 never lets a body skip counting that might reach it.
    for _ in range(3):
        compactor.calibration.observe("cheap", 1000, 500)
    assert compactor.may_reach("cheap", boundary, WINDOW, settings)
    assert compactor.may_reach(None, boundary, WINDOW, context(compact_at=0.8, target=0.2))


# -- one compaction per session at a time --------------------------------------------------------


async def test_concurrent_requests_of_a_session_make_one_summary() -> None:
    compactor = Compactor(count)
    summarizer = Summarizer(delay=0.05)
    session = SlowSession()
    settings = context(strategies=["summarize"])
    items = chat_history(50)
    calls = [session.call(CHAT, items, settings, WINDOW, summarizer) for _ in range(2)]
    outcomes = await asyncio.gather(*(compactor.compact(call) for call in calls))

    assert len(summarizer.transcripts) == 1
    made = [o for o in outcomes if o is not None and not o.reused]
    reused = [o for o in outcomes if o is not None and o.reused]
    assert len(made) == 1 and len(reused) == 1
    assert made[0].summary is not None and made[0].rewrite is not None
    assert reused[0].items == made[0].items
    assert len(session.kept) == 1 and len(session.saved) == 1


async def test_a_request_arriving_during_a_compaction_reuses_it() -> None:
    compactor = Compactor(count)
    summarizer = Summarizer(delay=0.05)
    session = SlowSession()
    settings = context(strategies=["summarize"])
    items = chat_history(50)
    first = asyncio.ensure_future(
        compactor.compact(session.call(CHAT, items, settings, WINDOW, summarizer))
    )
    await asyncio.sleep(0)
    assert len(summarizer.transcripts) == 1  # the first is waiting for its summary
    longer = [*items, *chat_exchange(50)]
    second = await compactor.compact(session.call(CHAT, longer, settings, WINDOW, summarizer))
    made = await first
    assert made is not None and made.items is not None and not made.reused
    assert second is not None and second.reused and second.items is not None
    assert second.items[:3] == made.items[:3]
    assert len(summarizer.transcripts) == 1


async def test_sessions_compact_independently() -> None:
    compactor = Compactor(count)
    waiting: list[str] = []
    both = asyncio.Event()

    async def summarize(transcript: str) -> Summary:
        """Answers once both sessions wait for a summary (a lock shared by both would hang)."""
        waiting.append(transcript)
        if len(waiting) == 2:
            both.set()
        await asyncio.wait_for(both.wait(), 2)
        return Summary("Read many files.", "summary-model")

    settings = context(strategies=["summarize"])
    items = chat_history(50)
    calls = [Session(f"s{n}").call(CHAT, items, settings, WINDOW) for n in range(2)]
    for call in calls:
        call.summarize = summarize
    outcomes = await asyncio.gather(*(compactor.compact(call) for call in calls))
    assert all(o is not None and o.summary is not None for o in outcomes)


# -- every API ------------------------------------------------------------------------------------

APIS: dict[str, tuple[Dialect, Any]] = {
    "chat": (OPENAI_CHAT, chat_history),
    "responses": (OPENAI_RESPONSES, responses_history),
    "messages": (ANTHROPIC_MESSAGES, anthropic_history),
}


def validate(dialect: Dialect, items: list[Any]) -> None:
    if dialect is OPENAI_CHAT:
        validate_chat({"model": "gpt-4o", "messages": items})
    elif dialect is OPENAI_RESPONSES:
        validate_responses({"model": "gpt-4o", "input": items})
    else:
        body = {"model": "claude-sonnet-4-6", "max_tokens": 1024, "messages": items}
        validate_messages(body, {"anthropic-version": "2023-06-01"})


@pytest.mark.parametrize("api", list(APIS))
@pytest.mark.parametrize("strategy", ["elide_tool_output", "summarize", "truncate", "clear"])
async def test_each_strategy_leaves_a_valid_request_in_every_api(api: str, strategy: str) -> None:
    dialect, history = APIS[api]
    items = history(25, chars=3000)
    validate(dialect, items)
    session = Session()
    call = session.call(
        dialect.history, items, context(strategies=[strategy]), WINDOW, Summarizer()
    )
    outcome = await Compactor(count).compact(call)
    assert outcome is not None and outcome.items is not None
    assert outcome.strategies == [strategy]
    assert outcome.after < outcome.before
    validate(dialect, decoded(outcome.items))
    # Reused on the next turn, still valid.
    longer = history(26, chars=3000)
    again = await Compactor(count).compact(
        session.call(dialect.history, longer, context(strategies=[strategy]), WINDOW)
    )
    assert again is not None and again.reused and again.items is not None
    validate(dialect, decoded(again.items))


# -- the rewrite as the store keeps it ------------------------------------------------------------


def test_rewrite_json_round_trip() -> None:
    rewrite = Rewrite(
        digest="0" * 32,
        count=7,
        ops=[0, 1, ["elide", 2], ["note", "summary text", 3], 6],
        strategies=["elide_tool_output", "summarize"],
        at=1_760_000_000.5,
        summary_model="gpt-4o-mini",
    )
    data = orjson.loads(orjson.dumps(rewrite.to_json()))
    assert data == {
        "digest": "0" * 32,
        "count": 7,
        "ops": [0, 1, ["elide", 2], ["note", "summary text", 3], 6],
        "strategies": ["elide_tool_output", "summarize"],
        "at": 1_760_000_000.5,
        "summary_model": "gpt-4o-mini",
    }
    assert Rewrite.from_json(data) == rewrite
