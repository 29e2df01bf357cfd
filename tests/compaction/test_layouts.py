"""Each API's ``History``: layouts, elision, notes, the summary call, overflow wording; and the
recorded Claude Code and Codex requests laid out and compacted into bodies the APIs accept."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.compaction import Compactor
from gateway.compaction.transcript import INSTRUCTIONS
from gateway.dialects import ANTHROPIC_MESSAGES, OPENAI_CHAT, OPENAI_RESPONSES, ErrorKind
from gateway.dialects.base import Dialect, History, Layout
from gateway.fake_provider.validation import (
    MID_CONVERSATION_SYSTEM_BETA,
    validate_chat,
    validate_messages,
    validate_responses,
)
from tests.compaction.builders import (
    Session,
    Summarizer,
    anthropic_exchange,
    anthropic_history,
    chat_exchange,
    chat_history,
    context,
    count,
    decoded,
    responses_exchange,
    responses_history,
    tokens,
    tool_output,
    user_input,
)
from tests.conftest import load_fixture
from tests.dialects.streams import split_events

CHAT: History = OPENAI_CHAT.history
RESPONSES: History = OPENAI_RESPONSES.history
MESSAGES: History = ANTHROPIC_MESSAGES.history
CLAUDE_CODE = "claude-code-2.1.197-messages-turn4.json"
CODEX = "codex-0.169.0-responses-turn268.json"
ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01"}


def note_for(size: int) -> str:
    return (
        f"[Tool output removed by the gateway to fit the context window: {size:,} bytes. "
        "Run the tool again if it is still needed.]"
    )


def unit_of(layout: Layout, index: int) -> int:
    for position, (start, end) in enumerate(layout.units):
        if start <= index < end:
            return position
    raise AssertionError(f"item {index} is in no unit (system: {layout.system})")


def assert_units_cover(layout: Layout, count: int) -> None:
    """Units follow each other without gaps from the system items to the end."""
    assert len(layout.units) == len(layout.inputs)
    position = layout.system
    for start, end in layout.units:
        assert start == position and end > start
        position = end
    assert position == count


# -- Chat Completions ---------------------------------------------------------------------------


def test_chat_tool_messages_join_their_assistant_message() -> None:
    items = chat_history(3)
    layout = CHAT.layout(items)
    assert layout.system == 1
    assert layout.units == [(1, 2), (2, 4), (4, 6), (6, 8)]
    assert layout.inputs == [True, False, False, False]


def test_chat_parallel_tool_messages_stay_with_their_assistant_message() -> None:
    items = [*chat_history(0), *chat_exchange(0, parallel=3), {"role": "user", "content": "ok?"}]
    layout = CHAT.layout(items)
    assert layout.units == [(1, 2), (2, 6), (6, 7)]
    assert layout.inputs == [True, False, True]


def test_chat_leading_system_and_developer_messages_are_the_system_part() -> None:
    items = [
        {"role": "system", "content": "A"},
        {"role": "developer", "content": "B"},
        {"role": "user", "content": "task"},
        {"role": "assistant", "content": "answer"},
        {"role": "system", "content": "a reminder mid-conversation"},
        {"role": "user", "content": "more"},
    ]
    layout = CHAT.layout(items)
    assert layout.system == 2
    assert layout.units == [(2, 3), (3, 4), (4, 5), (5, 6)]
    assert layout.inputs == [True, False, False, True]


def test_chat_without_a_system_prompt() -> None:
    layout = CHAT.layout([{"role": "user", "content": "hi"}])
    assert (layout.system, layout.units, layout.inputs) == (0, [(0, 1)], [True])
    assert CHAT.layout([]).units == []


# -- Responses ----------------------------------------------------------------------------------


def test_responses_outputs_join_their_call_and_reasoning_joins_the_next_item() -> None:
    items = responses_history(3)  # developer, task, then reasoning + call + output each
    layout = RESPONSES.layout(items)
    assert layout.system == 1
    assert layout.units == [(1, 2), (2, 5), (5, 8), (8, 11)]
    assert layout.inputs == [True, False, False, False]


def test_responses_calls_without_reasoning() -> None:
    items = [user_input("go"), *responses_exchange(0, reasoning=False)]
    items += responses_exchange(1, reasoning=False)
    layout = RESPONSES.layout(items)
    assert layout.system == 0
    assert layout.units == [(0, 1), (1, 3), (3, 5)]


def test_responses_parallel_calls_stay_in_one_unit() -> None:
    call_a, out_a = responses_exchange(0, reasoning=False)
    call_b, out_b = responses_exchange(1, reasoning=False)
    reasoning = responses_exchange(2)[0]
    answer = {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "Both read."}],
    }
    items = [user_input("read both"), reasoning, call_a, call_b, out_b, out_a, answer]
    layout = RESPONSES.layout(items)
    assert layout.units == [(0, 1), (1, 6), (6, 7)]
    assert layout.inputs == [True, False, False]


def test_responses_reasoning_before_a_message_joins_it() -> None:
    reasoning = responses_exchange(0)[0]
    answer = {"type": "message", "role": "assistant", "content": [{"type": "output_text"}]}
    items = [user_input("q"), reasoning, answer, user_input("next")]
    layout = RESPONSES.layout(items)
    assert layout.units == [(0, 1), (1, 3), (3, 4)]
    assert layout.inputs == [True, False, True]


def test_responses_custom_and_shell_calls_are_paired_too() -> None:
    items = [
        user_input("patch it"),
        {"type": "custom_tool_call", "call_id": "c1", "name": "apply_patch", "input": "*** x"},
        {"type": "custom_tool_call_output", "call_id": "c1", "output": "Done"},
        {"type": "local_shell_call", "call_id": "c2", "action": {"command": ["ls"]}},
        {"type": "local_shell_call_output", "call_id": "c2", "output": "a b"},
    ]
    assert RESPONSES.layout(items).units == [(0, 1), (1, 3), (3, 5)]


def test_responses_a_user_message_with_role_only_is_input() -> None:
    items = [{"role": "developer", "content": "d"}, {"role": "user", "content": "plain string"}]
    layout = RESPONSES.layout(items)
    assert (layout.system, layout.units, layout.inputs) == (1, [(1, 2)], [True])


# -- Anthropic Messages -------------------------------------------------------------------------


def test_anthropic_tool_results_join_the_assistant_turn() -> None:
    items = anthropic_history(3)
    layout = MESSAGES.layout(items)
    assert layout.system == 0
    assert layout.units == [(0, 1), (1, 3), (3, 5), (5, 7)]
    assert layout.inputs == [True, False, False, False]


def test_anthropic_tool_results_with_text_mark_new_input() -> None:
    assistant, results = anthropic_exchange(0)
    results = {**results, "content": [*results["content"], {"type": "text", "text": "Stop."}]}
    items = [anthropic_history(0)[0], assistant, results]
    layout = MESSAGES.layout(items)
    assert layout.units == [(0, 1), (1, 3)]
    assert layout.inputs == [True, True]


def test_anthropic_plain_turns_are_units_of_their_own() -> None:
    items = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
        {"role": "user", "content": "bye"},
        {"role": "system", "content": "a mid-conversation note"},
    ]
    layout = MESSAGES.layout(items)
    assert layout.units == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert layout.inputs == [True, False, True, False]


# -- the recorded agents ------------------------------------------------------------------------


def tool_pairs(dialect: Dialect, items: list[Any]) -> list[tuple[int, int]]:
    """(call index, result index) of every tool call answered in the history."""
    calls: dict[str, int] = {}
    pairs = []
    for index, item in enumerate(items):
        if dialect is ANTHROPIC_MESSAGES:
            for block in item["content"] if isinstance(item["content"], list) else []:
                if block["type"] == "tool_use":
                    calls[block["id"]] = index
                elif block["type"] == "tool_result":
                    pairs.append((calls[block["tool_use_id"]], index))
        elif item.get("type") in ("function_call", "custom_tool_call"):
            calls[item["call_id"]] = index
        elif item.get("type") in ("function_call_output", "custom_tool_call_output"):
            pairs.append((calls[item["call_id"]], index))
    return pairs


def recorded(name: str) -> tuple[Dialect, dict[str, Any], dict[str, str]]:
    fixture = load_fixture(name)
    dialect = ANTHROPIC_MESSAGES if "messages" in fixture["body"] else OPENAI_RESPONSES
    headers = {key.lower(): value for key, value in fixture["headers"].items()}
    return dialect, fixture["body"], headers


@pytest.mark.parametrize("name", [CLAUDE_CODE, CODEX, "codex-0.169.0-responses-turn3.json"])
def test_every_recorded_tool_call_lands_in_one_unit_with_its_result(name: str) -> None:
    dialect, body, _ = recorded(name)
    items = body[dialect.history.field]
    layout = dialect.history.layout(items)
    assert_units_cover(layout, len(items))
    pairs = tool_pairs(dialect, items)
    assert pairs
    for call, result in pairs:
        assert unit_of(layout, call) == unit_of(layout, result)


def test_the_recorded_claude_code_request_layout() -> None:
    _, body, _ = recorded(CLAUDE_CODE)
    layout = MESSAGES.layout(body["messages"])
    # The task, Claude Code's mid-conversation system message, three Read exchanges.
    assert layout.units == [(0, 1), (1, 2), (2, 4), (4, 6), (6, 8)]
    assert layout.inputs == [True, False, False, False, False]


def test_the_recorded_codex_request_layout() -> None:
    _, body, _ = recorded(CODEX)
    items = body["input"]
    layout = RESPONSES.layout(items)
    assert layout.system == 2  # Codex's two developer messages
    assert layout.inputs[:2] == [True, True]  # AGENTS.md and environment, then the task
    assert not any(layout.inputs[2:])
    assert len(layout.units) == 2 + (len(items) - 4) // 2


def with_large_outputs(dialect: Dialect, items: list[Any]) -> list[Any]:
    """The recorded history with every tool output 3,000 bytes long (so elision has work)."""
    out = []
    for index, item in enumerate(items):
        if dialect is ANTHROPIC_MESSAGES and isinstance(item["content"], list):
            blocks = [
                {**block, "content": tool_output(index, 3000)}
                if block["type"] == "tool_result"
                else block
                for block in item["content"]
            ]
            item = {**item, "content": blocks}
        elif item.get("type") == "function_call_output":
            item = {**item, "output": tool_output(index, 3000)}
        out.append(item)
    return out


def validate(dialect: Dialect, body: dict[str, Any], headers: dict[str, str]) -> None:
    if dialect is ANTHROPIC_MESSAGES:
        validate_messages(body, headers)
    else:
        validate_responses(body)


@pytest.mark.parametrize("name", [CLAUDE_CODE, CODEX])
@pytest.mark.parametrize("strategy", ["elide_tool_output", "summarize", "truncate", "clear"])
async def test_recorded_requests_compact_into_bodies_the_api_accepts(
    name: str, strategy: str
) -> None:
    dialect, body, headers = recorded(name)
    field = dialect.history.field
    items = body[field]
    if strategy == "elide_tool_output":
        items = with_large_outputs(dialect, items)
    validate(dialect, {**body, field: items}, headers)
    window = int(tokens(items, body["model"]) / 0.9)
    summarizer = Summarizer()
    call = Session().call(
        dialect.history,
        items,
        context(strategies=[strategy], keep_last=2),
        window,
        summarizer,
        model=body["model"],
    )
    outcome = await Compactor(count).compact(call)

    assert outcome is not None and outcome.items is not None, outcome
    assert outcome.strategies == [strategy]
    assert outcome.after < outcome.before
    compacted = decoded(outcome.items)
    assert len(summarizer.transcripts) == (strategy == "summarize")
    validate(dialect, {**body, field: compacted}, headers)
    # The latest exchanges (two; one for clear) reach the provider as they were sent.
    layout = dialect.history.layout(items)
    tail = layout.units[-1 if strategy == "clear" else -2][0]
    assert outcome.items[-(len(items) - tail) :] == call.originals[tail:]
    for call_index, result in tool_pairs(dialect, compacted):
        new_layout = dialect.history.layout(compacted)
        assert unit_of(new_layout, call_index) == unit_of(new_layout, result)


def test_claude_code_bodies_need_the_mid_conversation_system_beta() -> None:
    _, body, headers = recorded(CLAUDE_CODE)
    assert MID_CONVERSATION_SYSTEM_BETA in headers["anthropic-beta"]
    validate_messages(body, headers)
    with pytest.raises(Exception, match="role"):
        validate_messages(body, ANTHROPIC_HEADERS)


async def test_recorded_outputs_too_small_to_elide_are_left_alone() -> None:
    _, body, _ = recorded(CODEX)
    items = body["input"]
    call = Session().call(
        RESPONSES,
        items,
        context(strategies=["elide_tool_output"]),
        int(tokens(items, body["model"]) / 0.9),
        model=body["model"],
    )
    outcome = await Compactor(count).compact(call)
    assert outcome is not None
    assert (outcome.items, outcome.strategies, outcome.rewrite) == (None, [], None)


# -- elide ---------------------------------------------------------------------------------------


def test_chat_elide_replaces_a_large_tool_output_with_a_note() -> None:
    message = {"role": "tool", "tool_call_id": "call_1", "name": "read", "content": "x" * 3000}
    elided = CHAT.elide(message, 2048)
    assert elided == {
        "role": "tool",
        "tool_call_id": "call_1",
        "name": "read",
        "content": note_for(3000),
    }
    assert message["content"] == "x" * 3000  # the original is not touched
    assert CHAT.elide(message, 2048) == elided  # the same item gives the same note


def test_chat_elide_leaves_small_outputs_and_other_messages() -> None:
    assert CHAT.elide({"role": "tool", "tool_call_id": "c", "content": "x" * 2047}, 2048) is None
    assert CHAT.elide({"role": "user", "content": "x" * 10_000}, 2048) is None
    assert CHAT.elide({"role": "assistant", "content": "x" * 10_000}, 2048) is None
    exact = CHAT.elide({"role": "tool", "tool_call_id": "c", "content": "x" * 2048}, 2048)
    assert exact is not None and exact["content"] == note_for(2048)


def test_elide_counts_bytes_not_characters() -> None:
    elided = CHAT.elide({"role": "tool", "tool_call_id": "c", "content": "é" * 1500}, 2048)
    assert elided is not None and elided["content"] == note_for(3000)


def test_chat_elide_of_content_parts_counts_their_json() -> None:
    parts = [{"type": "text", "text": "y" * 3000}]
    elided = CHAT.elide({"role": "tool", "tool_call_id": "c", "content": parts}, 2048)
    assert elided is not None
    assert elided["content"] == note_for(len(orjson.dumps(parts)))


def test_responses_elide_keeps_every_other_field() -> None:
    output = {
        "type": "function_call_output",
        "id": "fco_1",
        "call_id": "call_1",
        "status": "completed",
        "output": tool_output(1, 5000),
    }
    assert RESPONSES.elide(output, 2048) == {**output, "output": note_for(5000)}
    custom = {"type": "custom_tool_call_output", "call_id": "c", "output": "z" * 4096}
    assert RESPONSES.elide(custom, 2048) == {**custom, "output": note_for(4096)}


def test_responses_elide_leaves_calls_messages_and_small_outputs() -> None:
    call = {"type": "function_call", "call_id": "c", "name": "n", "arguments": "a" * 9000}
    assert RESPONSES.elide(call, 2048) is None
    assert RESPONSES.elide(user_input("q" * 9000), 2048) is None
    assert RESPONSES.elide({"type": "function_call_output", "call_id": "c"}, 2048) is None
    small = {"type": "function_call_output", "call_id": "c", "output": "ok"}
    assert RESPONSES.elide(small, 2048) is None


def test_anthropic_elide_keeps_the_tool_use_id_and_error_flag() -> None:
    big = {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "is_error": True,
        "cache_control": {"type": "ephemeral"},
        "content": "E" * 2500,
    }
    small = {"type": "tool_result", "tool_use_id": "toolu_2", "content": "fine"}
    text = {"type": "text", "text": "T" * 5000}
    message = {"role": "user", "content": [big, small, text]}
    elided = MESSAGES.elide(message, 2048)
    assert elided == {
        "role": "user",
        "content": [{**big, "content": note_for(2500)}, small, text],
    }
    assert MESSAGES.elide(message, 2048) == elided


def test_anthropic_elide_of_block_content() -> None:
    blocks = [{"type": "text", "text": tool_output(2, 4000)}]
    result = {"type": "tool_result", "tool_use_id": "t", "content": blocks}
    message = {"role": "user", "content": [result]}
    elided = MESSAGES.elide(message, 2048)
    assert elided is not None
    assert elided["content"][0]["content"] == note_for(len(orjson.dumps(blocks)))


def test_anthropic_elide_leaves_what_holds_no_large_tool_output() -> None:
    assert MESSAGES.elide({"role": "user", "content": "x" * 9000}, 2048) is None
    text = {"role": "user", "content": [{"type": "text", "text": "x" * 9000}]}
    assert MESSAGES.elide(text, 2048) is None
    assistant = anthropic_exchange(0, chars=9000)[0]
    assert MESSAGES.elide(assistant, 2048) is None
    small = anthropic_exchange(0, chars=100)[1]
    assert MESSAGES.elide(small, 2048) is None


# -- notes and the summary call -----------------------------------------------------------------


def test_notes_are_user_messages_in_each_api() -> None:
    assert CHAT.note("N") == {"role": "user", "content": "N"}
    assert RESPONSES.note("N") == {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": "N"}],
    }
    assert MESSAGES.note("N") == {"role": "user", "content": [{"type": "text", "text": "N"}]}


def test_chat_summary_request() -> None:
    body = CHAT.summary_request("gpt-4o", INSTRUCTIONS, "[user]\nhi", 4096)
    assert body == {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": INSTRUCTIONS},
            {"role": "user", "content": "[user]\nhi"},
        ],
        "max_completion_tokens": 4096,
    }
    validate_chat(body)


def test_responses_summary_request() -> None:
    body = RESPONSES.summary_request("gpt-5.1-codex", INSTRUCTIONS, "[user]\nhi", 2048)
    assert body == {
        "model": "gpt-5.1-codex",
        "instructions": INSTRUCTIONS,
        "input": [RESPONSES.note("[user]\nhi")],
        "max_output_tokens": 2048,
        "store": False,
    }
    validate_responses(body)


def test_anthropic_summary_request() -> None:
    body = MESSAGES.summary_request("claude-sonnet-4-6", INSTRUCTIONS, "[user]\nhi", 1024)
    assert body == {
        "model": "claude-sonnet-4-6",
        "system": INSTRUCTIONS,
        "messages": [{"role": "user", "content": "[user]\nhi"}],
        "max_tokens": 1024,
    }
    validate_messages(body, ANTHROPIC_HEADERS)


@pytest.mark.parametrize("history", [CHAT, RESPONSES, MESSAGES])
def test_summary_requests_are_plain_calls(history: History) -> None:
    body = history.summary_request("m", INSTRUCTIONS, "t", 256)
    assert not {"stream", "tools", "tool_choice"} & body.keys()


def test_chat_summary_text() -> None:
    answer = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "The user wants X.", "refusal": None},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 900, "completion_tokens": 5, "total_tokens": 905},
    }
    assert CHAT.summary_text(answer) == "The user wants X."
    refused = {"choices": [{"message": {"role": "assistant", "content": None, "refusal": "no"}}]}
    assert CHAT.summary_text(refused) == ""
    assert CHAT.summary_text({"choices": []}) == ""
    assert CHAT.summary_text({}) == ""


def test_responses_summary_text() -> None:
    answer = {
        "id": "resp_1",
        "object": "response",
        "status": "completed",
        "output": [
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"},
            {
                "type": "message",
                "id": "msg_1",
                "role": "assistant",
                "status": "completed",
                "content": [
                    {"type": "output_text", "text": "Goal: X. ", "annotations": []},
                    {"type": "output_text", "text": "Done: Y.", "annotations": []},
                ],
            },
        ],
        "usage": {"input_tokens": 900, "output_tokens": 10, "total_tokens": 910},
    }
    assert RESPONSES.summary_text(answer) == "Goal: X. Done: Y."
    assert RESPONSES.summary_text({"output": []}) == ""
    refusal = {"type": "message", "content": [{"type": "refusal", "refusal": "no"}]}
    assert RESPONSES.summary_text({"output": [refusal]}) == ""


def test_anthropic_summary_text() -> None:
    answer = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-6",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "text", "text": "Goal: X.\n"},
            {"type": "text", "text": "Next: Z."},
        ],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 900, "output_tokens": 12},
    }
    assert MESSAGES.summary_text(answer) == "Goal: X.\nNext: Z."
    assert MESSAGES.summary_text({"content": []}) == ""
    assert MESSAGES.summary_text({"type": "error"}) == ""


# -- overflow -------------------------------------------------------------------------------------


def test_anthropic_overflow_wording() -> None:
    text = MESSAGES.overflow(210_345, 200_000)
    assert text == "prompt is too long: 210345 tokens > 200000 maximum"


def test_chat_overflow_wording() -> None:
    assert CHAT.overflow(140_000, 128_000) == (
        "This model's maximum context length is 128000 tokens. However, your messages "
        "resulted in 140000 tokens. Please reduce the length of the messages."
    )


def test_responses_overflow_wording() -> None:
    text = RESPONSES.overflow(300_000, 272_000)
    assert text.startswith("Your input exceeds the context window of this model.")
    assert "300000 tokens > 272000 maximum" in text


def test_responses_context_overflow_becomes_a_failed_response_event() -> None:
    error = OPENAI_RESPONSES.error(ErrorKind.CONTEXT_OVERFLOW, RESPONSES.overflow(9, 8))
    stream = OPENAI_RESPONSES.stream_failure(error)
    assert stream is not None
    (event,) = split_events(stream)
    assert event.event == "response.failed"
    payload = orjson.loads(event.data)
    assert payload["type"] == "response.failed"
    assert payload["sequence_number"] == 0
    response = payload["response"]
    assert response["id"].startswith("resp_gw_")
    assert response["object"] == "response" and response["status"] == "failed"
    assert response["error"] == {
        "code": "context_length_exceeded",
        "message": RESPONSES.overflow(9, 8),
    }
    assert response["output"] == [] and response["usage"] is None
    assert isinstance(response["created_at"], int)


def test_responses_other_errors_stay_plain_http() -> None:
    for kind in (ErrorKind.RATE_LIMIT, ErrorKind.INVALID_REQUEST, ErrorKind.UPSTREAM):
        assert OPENAI_RESPONSES.stream_failure(OPENAI_RESPONSES.error(kind, "no")) is None
    other = OPENAI_RESPONSES.error(ErrorKind.INVALID_REQUEST, "bad", code="invalid_value")
    assert OPENAI_RESPONSES.stream_failure(other) is None


@pytest.mark.parametrize("dialect", [OPENAI_CHAT, ANTHROPIC_MESSAGES])
def test_other_dialects_answer_overflow_as_plain_http(dialect: Dialect) -> None:
    error = dialect.error(ErrorKind.CONTEXT_OVERFLOW, dialect.history.overflow(9, 8))
    assert error.status == 400
    assert dialect.stream_failure(error) is None
