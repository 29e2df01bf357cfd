"""The one walk over a message's text: the counter's reading and the prose reading."""

from __future__ import annotations

from gateway.dialects.text import INLINE_MEDIA_TOKENS, count_texts, texts

IMAGE = "iVBORw0KGgo" * 200  # base64, over the inline-media threshold


def counted(value: object) -> tuple[list[str], int]:
    parts: list[str] = []
    extra = count_texts(value, parts)
    return parts, extra


def test_the_counter_reads_everything_billed_but_ids_and_markers() -> None:
    message = {
        "role": "assistant",
        "id": "msg_1",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "tool_use", "id": "t1", "name": "ls", "input": {"path": "/", "depth": 2}},
            {"type": "text", "text": "done", "cache_control": {"type": "ephemeral"}},
        ],
    }
    assert counted(message) == (["assistant", "hmm", "ls", "/", "2", "done"], 0)


def test_inline_media_is_counted_by_the_image_not_its_characters() -> None:
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png"}}
    block["source"]["data"] = IMAGE  # type: ignore[index]
    assert counted(block) == (["image/png"], INLINE_MEDIA_TOKENS)


def test_prose_writes_calls_as_sentences_and_leaves_out_reasoning_and_media() -> None:
    message = {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "tool_use", "id": "t1", "name": "ls", "input": {"path": "/"}},
            {"type": "image", "source": {"type": "base64", "data": IMAGE}},
            {"type": "text", "text": "done"},
        ],
        "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{}"}}],
    }
    assert texts(message) == [
        '(calls ls with {"path":"/"})',
        "(image omitted)",
        "done",
        "(calls f with {})",
    ]
