"""``transcript()``: a conversation of any API as plain text for the summary call."""

from __future__ import annotations

from typing import Any

from gateway.compaction.transcript import CLIP_CHARS, INSTRUCTIONS, transcript
from tests.compaction.builders import (
    TASK,
    anthropic_history,
    chat_history,
    responses_history,
    tool_output,
)

BIG = 1_000_000


def test_chat_roles_text_and_tool_calls() -> None:
    items = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "List the files."},
        {
            "role": "assistant",
            "content": "Listing them now.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "shell", "arguments": '{"cmd": "ls"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "README.md\nsetup.py"},
        {"role": "assistant", "content": [{"type": "text", "text": "Two files."}]},
    ]
    assert transcript(items, BIG) == (
        "[system]\nYou are terse.\n\n"
        "[user]\nList the files.\n\n"
        '[assistant]\nListing them now.\n(calls shell with {"cmd": "ls"})\n\n'
        "[tool]\nREADME.md\nsetup.py\n\n"
        "[assistant]\nTwo files."
    )


def test_chat_ids_never_reach_the_transcript() -> None:
    text = transcript(chat_history(3), BIG)
    assert "call_0_0" not in text and "tool_call_id" not in text
    assert text.count("(calls read_file with ") == 3
    assert text.count("[tool]\n") == 3
    assert text.startswith("[system]\nYou are a coding agent.")
    assert f"[user]\n{TASK}" in text


def test_responses_items() -> None:
    items: list[Any] = [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "D"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Go."}]},
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [{"type": "summary_text", "text": "SECRET PLAN"}],
            "encrypted_content": "gAAAAENCRYPTED",
        },
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "call_1",
            "name": "exec_command",
            "arguments": '{"cmd": "pytest -q"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "3 passed"},
        {"type": "custom_tool_call", "call_id": "call_2", "name": "apply_patch", "input": "*** X"},
        {"type": "custom_tool_call_output", "call_id": "call_2", "output": "Done!"},
        {
            "type": "message",
            "role": "assistant",
            "id": "msg_1",
            "status": "completed",
            "content": [{"type": "output_text", "text": "All green.", "annotations": []}],
        },
    ]
    assert transcript(items, BIG) == (
        "[developer]\nD\n\n"
        "[user]\nGo.\n\n"
        '[function_call] exec_command({"cmd": "pytest -q"})\n\n'
        "[function_call_output]\n3 passed\n\n"
        "[custom_tool_call] apply_patch(*** X)\n\n"
        "[custom_tool_call_output]\nDone!\n\n"
        "[assistant]\nAll green."
    )


def test_responses_reasoning_and_encrypted_content_are_left_out() -> None:
    text = transcript(responses_history(4), BIG)
    assert "gAAAAB" not in text and "I should read file" not in text
    assert "rs_0" not in text and "call_0" not in text
    assert text.count("[function_call] read_file(") == 4


def test_anthropic_messages() -> None:
    items = [
        {"role": "user", "content": "Fix the bug."},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "PRIVATE THOUGHT", "signature": "SIGNATURE=="},
                {"type": "redacted_thinking", "data": "REDACTED-BLOB"},
                {"type": "text", "text": "Reading the file."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "Read",
                    "input": {"file_path": "/src/app.py"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "is_error": True,
                    "content": [{"type": "text", "text": "Permission denied"}],
                    "cache_control": {"type": "ephemeral"},
                },
                {"type": "text", "text": "Try sudo."},
            ],
        },
    ]
    assert transcript(items, BIG) == (
        "[user]\nFix the bug.\n\n"
        '[assistant]\nReading the file.\n(calls Read with {"file_path":"/src/app.py"})\n\n'
        "[user]\nPermission denied\nTry sudo."
    )


def test_anthropic_thinking_and_signatures_are_left_out() -> None:
    text = transcript(anthropic_history(3), BIG)
    assert "Read file 0 next" not in text and "EqQBCkYI" not in text
    assert "toolu_" not in text
    assert text.count("(calls Read with ") == 3


def test_images_and_documents_are_named_not_dumped() -> None:
    data = "iVBORw0KGgo" * 500
    items = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this?"},
                {"type": "image", "source": {"type": "base64", "data": data}},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                {"type": "input_image", "image_url": f"data:image/png;base64,{data}"},
                {"type": "document", "source": {"type": "base64", "data": data}},
            ],
        }
    ]
    text = transcript(items, BIG)
    assert data not in text
    assert text == (
        "[user]\nWhat is in this?\n(image omitted)\n(image_url omitted)\n"
        "(input_image omitted)\n(document omitted)"
    )


def test_items_without_words_are_left_out() -> None:
    items = [
        {"role": "assistant", "content": None},
        {"type": "reasoning", "summary": [], "encrypted_content": "x"},
        {"role": "user", "content": "hello"},
    ]
    assert transcript(items, BIG) == "[user]\nhello"
    assert transcript([], BIG) == ""


def test_a_long_tool_output_is_clipped_in_the_middle() -> None:
    output = "HEAD " + tool_output(1, 20_000) + " TAIL"
    text = transcript([{"type": "function_call_output", "call_id": "c", "output": output}], BIG)
    body = text.removeprefix("[function_call_output]\n")
    assert body.startswith(output[: CLIP_CHARS // 2])
    assert body.endswith(output[-CLIP_CHARS // 2 :])
    assert f"\n[... {len(output) - CLIP_CHARS} characters clipped ...]\n" in body
    assert len(body) < CLIP_CHARS + 100


def test_long_call_arguments_are_clipped_too() -> None:
    patch = "+" * 10_000
    text = transcript([{"type": "custom_tool_call", "name": "apply_patch", "input": patch}], BIG)
    assert "characters clipped" in text
    assert len(text) < CLIP_CHARS + 100


def test_an_output_at_the_clip_size_is_kept_whole() -> None:
    output = "y" * CLIP_CHARS
    text = transcript([{"role": "tool", "tool_call_id": "c", "content": output}], BIG)
    assert text == f"[tool]\n{output}"


def test_past_max_chars_the_oldest_lines_are_left_out_with_a_marker() -> None:
    items = [{"role": "user", "content": f"message {n:02d}: " + "w" * 90} for n in range(50)]
    full = transcript(items, BIG)
    line = len("[user]\n") + len(items[0]["content"])  # 109 characters per message
    assert len(full) == 50 * line + 49 * 2

    text = transcript(items, 10 * (line + 2))
    lines = text.split("\n\n")
    assert lines[0] == "[... 40 older messages left out: too long to summarize ...]"
    assert [chunk.split(":")[0] for chunk in lines[1:]] == [
        f"[user]\nmessage {n:02d}" for n in range(40, 50)
    ]
    # The kept lines fit max_chars; only the marker comes on top.
    assert len(text) - len(lines[0]) - 2 <= 10 * (line + 2)


def test_the_newest_lines_are_kept_whole() -> None:
    items = [{"role": "user", "content": f"m{n} " + "z" * 300} for n in range(10)]
    text = transcript(items, 1000)
    kept = text.split("\n\n")[1:]
    assert kept == [f"[user]\nm{n} " + "z" * 300 for n in (7, 8, 9)]


def test_earlier_summaries_come_first_and_whole() -> None:
    earlier = ["[Summary of the earlier part ...]\n\nThe agent read 40 files. " + "s" * 5000]
    items = [{"role": "user", "content": f"m{n}"} for n in range(3)]
    text = transcript(items, BIG, earlier)
    assert text == f"{earlier[0]}\n\n[user]\nm0\n\n[user]\nm1\n\n[user]\nm2"
    assert "clipped" not in text  # a summary is never clipped


def test_earlier_summaries_count_against_max_chars() -> None:
    earlier = ["S" * 500, "T" * 300]
    items = [{"role": "user", "content": f"m{n} " + "z" * 90} for n in range(10)]
    line = len("[user]\n") + len(items[0]["content"])
    text = transcript(items, 800 + 4 + 3 * (line + 2), earlier)
    chunks = text.split("\n\n")
    assert chunks[:3] == [
        "S" * 500,
        "T" * 300,
        "[... 7 older messages left out: too long to summarize ...]",
    ]
    assert [chunk[:9] for chunk in chunks[3:]] == ["[user]\nm7", "[user]\nm8", "[user]\nm9"]


def test_a_transcript_that_fits_has_no_marker() -> None:
    text = transcript(chat_history(5), BIG)
    assert "left out" not in text


def test_instructions_ask_for_a_summary_only() -> None:
    assert "summary" in INSTRUCTIONS and "Answer with the summary only." in INSTRUCTIONS
