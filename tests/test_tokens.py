"""TokenCounter: offline tables, counts close to tiktoken, one miss per new message."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from gateway.dialects.text import INLINE_MEDIA_TOKENS
from gateway.tokens import (
    CL100K,
    MESSAGE_OVERHEAD,
    MIN_RATIO,
    O200K,
    TokenCounter,
    encoding_for,
    use_bundled_tables,
)

BUNDLED = Path(str(resources.files("gateway") / "data" / "tiktoken"))
TEXT = "The gateway counts each turn and token of the session; résumé ✓ 1234567."


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    counter = TokenCounter()
    counter.load()
    return counter


def _history(n: int) -> list[dict[str, Any]]:
    return [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}: {TEXT}"}
        for i in range(n)
    ]


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4", CL100K),
        ("gpt-4-turbo", CL100K),
        ("gpt-4-0613", CL100K),
        ("gpt-3.5-turbo", CL100K),
        ("text-embedding-3-small", CL100K),
        ("gpt-4o", O200K),
        ("gpt-4o-mini", O200K),
        ("gpt-4.1", O200K),
        ("openai/gpt-4o", O200K),
        ("GPT-4o", O200K),
        ("azure/gpt-3.5-turbo", CL100K),
        ("gpt-5", O200K),
        ("gpt-5-codex", O200K),
        ("o3", O200K),
        ("claude-sonnet-4-6", O200K),
        ("claude-opus-4-8", O200K),
        ("", O200K),
        (None, O200K),
    ],
)
def test_encoding_for(model: str | None, encoding: str) -> None:
    assert encoding_for(model) == encoding


def test_count_text_equals_plain_tiktoken(counter: TokenCounter) -> None:
    for model, name in (("gpt-4o", O200K), ("gpt-4", CL100K), ("claude-sonnet-4-6", O200K)):
        plain = len(tiktoken.get_encoding(name).encode(TEXT))
        assert counter.count_text(TEXT, model) == plain > 0


def test_count_text_does_not_choke_on_special_tokens(counter: TokenCounter) -> None:
    assert counter.count_text("<|endoftext|> and <|im_start|>") > 0


def test_count_items_is_close_to_plain_count(counter: TokenCounter) -> None:
    enc = tiktoken.get_encoding(O200K)
    assert counter.count_items([TEXT], "gpt-5") == len(enc.encode(TEXT)) + MESSAGE_OVERHEAD
    messages = _history(4)
    plain = sum(len(enc.encode(m["content"])) for m in messages)
    counted = counter.count_items(messages, "gpt-5")
    assert plain < counted <= plain + len(messages) * (MESSAGE_OVERHEAD + 3)


def test_ids_and_types_are_not_counted(counter: TokenCounter) -> None:
    bare = {"role": "user", "content": [{"type": "text", "text": TEXT}]}
    tagged = {
        "role": "user",
        "content": [{"type": "text", "text": TEXT, "id": "x" * 200, "cache_control": {}}],
    }
    assert counter.count_items([bare]) == counter.count_items([tagged])


def test_inline_image_counts_as_a_flat_figure(counter: TokenCounter) -> None:
    image = {
        "role": "user",
        "content": [{"type": "image", "source": {"type": "base64", "data": "QUJD" * 5000}}],
    }
    count = counter.count_items([image], "claude-sonnet-4-6")
    assert INLINE_MEDIA_TOKENS < count < INLINE_MEDIA_TOKENS + 20


def test_count_content_joins_deltas(counter: TokenCounter) -> None:
    enc = tiktoken.get_encoding(O200K)
    assert counter.count_content(["Hel", "lo", " world"]) == len(enc.encode("Hello world"))
    assert counter.count_content([]) == 0


def test_second_count_of_a_history_hits_the_cache() -> None:
    counter = TokenCounter()
    history = _history(5)
    first = counter.count_items(history, "gpt-5")
    assert (counter.hits, counter.misses) == (0, 5)
    assert counter.count_items(history, "gpt-5") == first
    assert (counter.hits, counter.misses) == (5, 5)


def test_a_history_grown_by_one_message_costs_one_miss() -> None:
    counter = TokenCounter()
    history = _history(6)
    counter.count_items(history[:5], "gpt-5")
    hits, misses = counter.hits, counter.misses
    grown = counter.count_items(history, "gpt-5")
    assert counter.misses == misses + 1
    assert counter.hits == hits + 5
    assert grown == counter.count_items(history[:5], "gpt-5") + counter.count_items(
        history[5:], "gpt-5"
    )


def test_cache_is_per_encoding() -> None:
    counter = TokenCounter()
    history = _history(3)
    counter.count_items(history, "gpt-5")
    counter.count_items(history, "gpt-4")
    assert (counter.hits, counter.misses) == (0, 6)


def test_cache_is_bounded_and_evicts_the_oldest_half() -> None:
    counter = TokenCounter(max_entries=4)
    items = _history(5)
    counter.count_items(items[:4])
    counter.count_items(items[4:])  # full: the oldest two (items 0 and 1) go
    assert (counter.hits, counter.misses) == (0, 5)
    counter.count_items(items[2:])
    assert counter.hits == 3
    counter.count_items(items[:1])
    assert counter.misses == 6


def test_use_bundled_tables_points_inside_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "placeholder")  # so teardown restores it
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    use_bundled_tables()
    folder = Path(os.environ["TIKTOKEN_CACHE_DIR"])
    assert folder == BUNDLED
    assert folder.is_dir()
    assert len(list(folder.iterdir())) == 2


def test_use_bundled_tables_respects_the_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/srv/tiktoken")
    use_bundled_tables()
    TokenCounter()
    assert os.environ["TIKTOKEN_CACHE_DIR"] == "/srv/tiktoken"


def test_tables_load_with_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network access: {args}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "placeholder")
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    # Forget encodings built earlier in this process, so they are loaded from the files.
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    before = sorted((p.name, p.stat().st_size) for p in BUNDLED.iterdir())

    counter = TokenCounter()
    counter.load()

    assert counter.count_text("hello world", "gpt-4o") == 2
    assert counter.count_text("hello world", "gpt-4") == 2
    assert set(tiktoken.registry.ENCODINGS) == {O200K, CL100K}
    # tiktoken deletes a cached table whose hash does not match; the bundled ones match.
    assert sorted((p.name, p.stat().st_size) for p in BUNDLED.iterdir()) == before


# -- bounded work ------------------------------------------------------------------------------
PATHOLOGICAL = {
    # text, tokens per character when counted in full (o200k, in pieces)
    "one character": ("a", 1 / 8),
    "digits": ("7", 1 / 3),
    "a multi-byte character": ("\u65e5", 1 / 2),
    "punctuation": ("!", 1 / 16),
}


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
async def test_counting_on_the_loop_is_bounded_and_errs_high(
    counter: TokenCounter, name: str
) -> None:
    """10 MB of one character once took 9.5 s (BPE is superlinear in one pre-token). On the
    event loop a count now stops after its budget and estimates the rest, never below the
    true count by more than the pieces' rounding."""
    char, ratio = PATHOLOGICAL[name]
    text = char * 10_000_000
    await asyncio.sleep(0)  # a fresh budget
    started = time.perf_counter()
    estimate = counter.count_text(text, "gpt-4o")
    assert time.perf_counter() - started < 0.1
    assert estimate >= 0.99 * ratio * len(text)
    assert estimate <= max(MIN_RATIO, ratio) * len(text) * 1.01


def test_off_the_loop_a_long_run_is_counted_in_full_in_linear_time(counter: TokenCounter) -> None:
    text = "a" * 300_000
    started = time.perf_counter()
    assert counter.count_text(text, "gpt-4o") == 300_000 // 8
    assert time.perf_counter() - started < 1.0  # whole, it is about 3 s
    ordinary = TEXT * 50
    enc = tiktoken.get_encoding(O200K)
    assert counter.count_text(ordinary, "gpt-4o") == len(enc.encode(ordinary))


async def test_an_estimate_is_not_cached(counter: TokenCounter) -> None:
    """A text past the loop's budget is estimated, and counted properly when it comes back."""
    item = {"role": "user", "content": TEXT * 150_000}  # 11 MB
    await asyncio.sleep(0)
    estimated = counter.count_item(item, "gpt-4o")
    exact = await asyncio.to_thread(counter.count_item, item, "gpt-4o")
    assert exact < estimated < 1.1 * exact  # errs high: an upper bound for decisions
    assert await asyncio.to_thread(counter.count_item, item, "gpt-4o") == exact
